"""The plan: one frozen entry per destination tensor, plus the output plan.

`build_plan` decides the entries from headers alone; `plan_output` adds where and how they are
written, refusing whatever needs no tensor data. `--dry-run` prints the result and the executor
consumes that same object.
"""

from .decide import build_export_plan, build_plan
from .entries import Because, Drop, Entry, FilePlan, OutputPlan, Piece, Plan
from .output import (
    DEFAULT_MAX_SHARD_SIZE,
    Output,
    SourceFacts,
    onnx_layers,
    parse_size,
    plan_output,
    resolve_output,
    shard_names,
    source_facts,
    split_shards,
)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE", "Because", "Drop", "Entry", "FilePlan", "Output", "OutputPlan",
    "Piece", "Plan", "SourceFacts", "build_export_plan", "build_plan", "onnx_layers",
    "parse_size", "plan_output", "resolve_output", "shard_names", "source_facts", "split_shards",
]
