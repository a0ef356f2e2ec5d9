"""The Python API for migration scripts: the commands' operations, returning report objects.

`to_linear`, `to_param` and `inspect_checkpoint` take the command-line options as keyword
arguments and raise `ConvertError` subclasses (each with its exit code) instead of printing.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, open_checkpoint, open_written, source_kind
from .companions import CompanionError, Role, classify, companion_map, quantized_weight
from .dtypes import is_float_weight
from .errors import UsageError
from .layout import Layout
from .selection import (
    Selection,
    bias_evidence,
    build_reference,
    selection_from,
    with_config,
)

if TYPE_CHECKING:  # planning, execution and verification load on first use, not for inspect
    from .plan import Plan
    from .verify import VerifyReport


@dataclass
class ConversionReport:
    """What a conversion planned and wrote."""

    source: str
    destination: str | None
    layout: Layout
    plan: Plan
    dry_run: bool
    files: list[str] = field(default_factory=list)
    keys_written: int = 0
    bytes_written: int = 0
    source_sha256: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    verification: VerifyReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "destination": self.destination,
            "direction": self.plan.direction, "dry_run": self.dry_run,
            "files": self.files,
            "keys_written": self.keys_written, "bytes_written": self.bytes_written,
            "source_sha256": self.source_sha256, "seconds": round(self.seconds, 4),
            "warnings": self.warnings, "plan": self.plan.to_dict(),
            "verification": self.verification.to_dict() if self.verification else None,
        }


def plan_conversion(ckpt: Checkpoint, target: Layout, selection: Selection | None = None,
                    **options: Any) -> Plan:
    """The entries of a conversion of an opened checkpoint (headers only; a `--model` in the
    selection imports torch). OPTIONS, instead of SELECTION, are its parts as keywords."""
    from .plan import build_plan

    selection = with_config(selection_from(selection, options), Path(ckpt.path))
    reference = build_reference(selection.model) if selection.model else None
    return build_plan(ckpt.specs, target, selection, reference=reference,
                      provenance=ckpt.provenance, tied=ckpt.tied, source=str(ckpt.path))


def convert(src: str | Path, dst: str | Path | None = None, *, target: Layout | None,
            layout: Layout | str | None = None,
            selection: Selection | None = None, state_dict_key: str | None = None,
            allow_global: Sequence[str] = (), dry_run: bool = False, overwrite: bool = False,
            format: str | None = None, max_shard_size: str | int | None = None,
            verify: bool = True, device: str = "cpu", opset: int | None = None,
            external_data: bool = False, input_shape: Sequence[Sequence[int]] = (),
            input_dtype: str = "float32", progress: Callable[[int, int], None] | None = None,
            html: str | Path | None = None, **selection_options: Any) -> ConversionReport:
    """Plan and (unless dry_run) write a conversion of SRC into TARGET's layout.

    Which keys are transposed, dropped and renamed is one `Selection`: pass it as
    `selection=`, or its parts as keywords (`layers`, `exclude`, `drop`, `rename`, `rules`,
    `preset`, `model`), as the command line does. TARGET None is `export`: the layout SRC
    holds (LAYOUT, else its provenance, else the evidence) is kept.

    The plan (its entries and its output plan) is built first, from headers alone, and every
    refusal that needs no tensor data is raised there, dry run or not. With `verify` (the
    default) the written files, fsynced and read back from disk under their temporary names,
    are verified against SRC layer by layer before DST is renamed into place; a difference
    raises NotEquivalentError (exit 1) and leaves no DST. HTML names a verdict page to write
    (see `convert.verify.html`), also when verification fails.
    """
    from .execute import apply_plan
    from .plan import build_export_plan, plan_output, resolve_output, source_facts

    src_path = Path(src)
    if os.fspath(src) == "-":
        raise UsageError("SRC '-' (standard input) is not supported; name a checkpoint file.")
    if not src_path.exists():
        raise UsageError(f"SRC '{src}' does not exist.")
    selection = selection_from(selection, selection_options)
    model = selection.model
    if target is None and dst is None:
        raise UsageError("export needs -o DST: the file (or folder) to write.")
    if isinstance(layout, str):
        layout = _layout_option(layout)
    output = resolve_output(src_path, dst, target or Layout.LINEAR, fmt=format,
                            max_shard_size=max_shard_size, overwrite=overwrite)
    if output.format != "onnx" and (opset is not None or external_data or input_shape):
        raise UsageError("--opset, --external-data and --input-shape apply to ONNX output "
                         "only (-o FILE.onnx).")
    with _verifier(verify and not dry_run and output.format != "onnx") as worker, \
            open_checkpoint(src_path, state_dict_key=state_dict_key,
                            allow_globals=allow_global) as ckpt:
        if target is None:
            reference = build_reference(model) if model else None
            plan = build_export_plan(ckpt.specs, selection, layout=layout, reference=reference,
                                     provenance=ckpt.provenance, tied=ckpt.tied,
                                     source=str(ckpt.path),
                                     layers_matter=output.format == "onnx")
        else:
            plan = plan_conversion(ckpt, target, selection)
        plan = plan_output(plan, source_facts(ckpt), output,
                           whole_model=bool(model and input_shape), external_data=external_data,
                           opset=opset)
        assert plan.output is not None
        report = ConversionReport(str(src_path), str(plan.output.display), plan.layout, plan,
                                  dry_run, files=[str(f.path) for f in plan.output.files],
                                  warnings=[*getattr(ckpt, "notes", []), *plan.warnings])
        command = "" if html is None else _command(
            target, src, dst, dry_run=dry_run, overwrite=overwrite, format=format,
            max_shard_size=max_shard_size, verify=verify, device=device, html=html,
            **selection_options)
        if dry_run:
            _write_conversion_page(html, report, command)
            return report
        if verify and device != "cpu":  # fail fast on a CUDA that is not there
            from .verify import resolve_device

            resolve_device(device)
        if output.format == "onnx":
            from .onnx_export import write_onnx

            result = _with_page(html, report, command, lambda: write_onnx(
                plan, ckpt, model=model, input_shape=input_shape, input_dtype=input_dtype,
                opset=opset, verify=verify))
            return _finish_report(report, result, html, command)

        from .verify import pairs_from_plan

        # a .pt written from a source whose nesting is not kept holds a flat state dict
        dst_key = state_dict_key if ckpt.keeps_extras else None
        job = {"src": str(src_path), "state_dict_key": state_dict_key,
               "allow_globals": list(allow_global), "format": output.format,
               "display": str(output.path), "dst_key": dst_key,
               "pairs": pairs_from_plan(plan) if verify else [],
               "dropped": set(plan.dropped), "dst_layout": plan.layout, "pairing": "the plan",
               "device": device, "companion_rules": selection.companions}

        def check(paths: list[Path]) -> None:
            from .verify.worker import WorkerGone

            report.verification = None
            if worker is not None:
                try:
                    report.verification = worker.result(paths)
                except WorkerGone as e:
                    report.warnings.append(f"verification ran in this process: the verifying "
                                           f"process failed ({e}).")
            if report.verification is None:
                report.verification = _verify_written(ckpt, paths, job)
            report.verification.raise_if_different()

        if worker is not None:
            worker.job = job
        result = _with_page(html, report, command, lambda: apply_plan(
            plan, ckpt, check if verify else None, progress=progress,
            streamed=_import_torch_in_background if verify and worker is None else None,
            watcher=worker if output.format == "safetensors" else None))
    return _finish_report(report, result, html, command)


@contextmanager
def _verifier(wanted: bool) -> Iterator[Any]:
    """A verifier in a second process (convert.verify.worker), where one pays: the command
    line's single conversions, in a process that has not imported torch; None elsewhere.
    Ended on the way out: killed if the conversion failed (it may still be importing torch)."""
    from .command import EARLY_VERIFIER, VERIFY_ELSEWHERE

    if not wanted or not VERIFY_ELSEWHERE.get() or _torch_imported():
        yield None  # (one the command line started early ends with it)
        return
    from .verify.worker import VerifyProcess

    worker = EARLY_VERIFIER.get() or VerifyProcess()
    try:
        yield worker
    except BaseException:
        worker.close(kill=True)
        raise
    worker.close()


def _torch_imported() -> bool:
    """Whether this process has torch already (then a second process would only cost)."""
    import sys

    return "torch" in sys.modules


def _verify_written(ckpt: Checkpoint, paths: list[Path], job: Mapping[str, Any]) -> Any:
    """JOB's checks of the fsynced files PATHS against CKPT, in this process."""
    from .verify import verify_checkpoints

    with open_written(paths, job["format"], Path(job["display"]),
                      state_dict_key=job["dst_key"],
                      allow_globals=job["allow_globals"]) as written:
        return verify_checkpoints(ckpt, written, pairs=job["pairs"], dropped=job["dropped"],
                                  dst_layout=job["dst_layout"], pairing=job["pairing"],
                                  device=job["device"], companion_rules=job["companion_rules"])


def _finish_report(report: ConversionReport, result: Any, html: str | Path | None = None,
                   command: str = "") -> ConversionReport:
    report.files = [str(p) for p in result.files]
    report.keys_written = result.keys_written
    report.bytes_written = result.bytes_written
    report.source_sha256 = result.source_sha256
    report.seconds = result.seconds
    report.warnings += result.warnings
    if result.verification is not None:
        report.verification = result.verification
    _write_conversion_page(html, report, command)
    return report


def _command(target: Layout | None, *args: Any, **kwargs: Any) -> str:
    from .verify.html import command_line

    name = "export" if target is None else target.command.replace("-", "_")
    return command_line(name, *args, **kwargs)


def _with_page(html: str | Path | None, report: ConversionReport, command: str,
               run: Callable[[], Any]) -> Any:
    """RUN the conversion; if its verification fails, write the verdict page before the
    error goes on (that is when people look), and let the error carry the report."""
    from .errors import NotEquivalentError

    try:
        return run()
    except NotEquivalentError as e:
        if e.report is not None:
            report.verification = e.report
        e.conversion = report
        _write_conversion_page(html, report, command)
        raise


def _write_conversion_page(html: str | Path | None, report: ConversionReport,
                           command: str) -> None:
    if html is not None:
        from .verify.html import conversion_section, write_html

        write_html(html, [conversion_section(report)], command=command)


def _import_torch_in_background() -> None:
    """Verification will need torch: import it on a thread (1.4 s here) while the files are
    finished and fsynced and the source's hash completes, all of which wait on the kernel.
    Not while streaming: the import holds the GIL for most of its time, and the transpose
    loop, which takes it back after every strip, then ran 2-3x slower (measured: 1.2 s ->
    3.4 s for the 12-layer benchmark's stream)."""
    import sys
    import threading

    if "torch" not in sys.modules:
        threading.Thread(target=__import__, args=("torch",), daemon=True).start()


def _layout_option(text: str) -> Layout:
    try:
        return Layout(text)
    except ValueError as e:
        raise UsageError(f"layout '{text}' is not linear or param.") from e


def export(src: str | Path, dst: str | Path, *, layout: Layout | str | None = None,
           **options: Any) -> ConversionReport:
    """Write SRC in another format with its layout unchanged (see `convert`), verified the same
    way: every tensor bit for bit, an ONNX graph in onnxruntime."""
    return convert(src, dst, target=None, layout=layout, **options)


def to_linear(src: str | Path, dst: str | Path | None = None, **options: Any) -> ConversionReport:
    """Rewrite SRC so its linear weights are `nn.Linear`'s out x in (see `convert`)."""
    return convert(src, dst, target=Layout.LINEAR, **options)


def to_param(src: str | Path, dst: str | Path | None = None, **options: Any) -> ConversionReport:
    """Rewrite SRC so its linear weights are the param layout's in x out (see `convert`)."""
    return convert(src, dst, target=Layout.PARAM, **options)


# --- verify ---------------------------------------------------------------------------------

def verify(src: str | Path, dst: str | Path, *, selection: Selection | None = None,
           state_dict_key: str | None = None, allow_global: Sequence[str] = (),
           device: str = "cpu", atol: float | None = None, rtol: float | None = None,
           batch_size: int = 8, seed: int = 0, source_model: str | None = None,
           target_model: str | None = None, input_shape: Sequence[Sequence[int]] = (),
           input_dtype: str = "float32", input_high: int | None = None,
           logits: str | None = None, reference: str | None = None,
           min_cosine: float | None = None, max_kl: float | None = None,
           min_top1: float | None = None, html: str | Path | None = None,
           **selection_options: Any) -> VerifyReport:
    """Check that DST computes what SRC computes; returns the report (see `VerifyReport`).

    Pairs come from DST's provenance, else the selection options, else names and transposed
    shapes. With `source_model` and `target_model` the two models are compared whole, with
    each output's figures (cosine; top-1 and KL for `logits`), gated by `min_cosine`, `max_kl`
    and `min_top1` where given. `reference="float64"` also runs the source side in float64
    and reports each side's distance from it. HTML names a verdict page to write (also when
    DST is not equivalent).
    """
    from .verify.models import check_gates

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1.")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not value >= 0:  # NaN too
            raise UsageError(f"--{name} {value} is not a tolerance; give a number >= 0.")
    for p in (src, dst):
        if os.fspath(p) == "-" or not Path(p).exists():
            raise UsageError(f"'{p}' does not exist.")
    if bool(source_model) != bool(target_model):
        raise UsageError("whole-model verification needs both --source-model and "
                         "--target-model.")
    gates = check_gates({"min_cosine": min_cosine, "max_kl": max_kl, "min_top1": min_top1},
                        reference)
    if (gates or logits is not None) and not source_model:
        raise UsageError("--logits, --min-cosine, --max-kl and --min-top1 judge whole-model "
                         "outputs: give --source-model and --target-model (and --input-shape).")
    selection = selection_from(selection, selection_options)
    report, provenance = _verify(src, dst, selection, state_dict_key, allow_global, device,
                                 atol, rtol, batch_size, seed, source_model, target_model,
                                 input_shape, input_dtype, input_high, logits, reference, gates)
    if html is not None:
        from .verify.html import command_line, verification_section, write_html

        command = command_line("verify", src, dst, device=device, atol=atol, rtol=rtol,
                               source_model=source_model, target_model=target_model,
                               input_shape=list(input_shape), logits=logits,
                               reference=reference, html=html, **gates, **selection_options)
        write_html(html, [verification_section(report, provenance=provenance)],
                   command=command)
    return report


def _verify(src: str | Path, dst: str | Path, selection: Selection, state_dict_key: str | None,
            allow_global: Sequence[str], device: str, atol: float | None, rtol: float | None,
            batch_size: int, seed: int, source_model: str | None, target_model: str | None,
            input_shape: Sequence[Sequence[int]], input_dtype: str, input_high: int | None,
            logits: str | None, reference: str | None,
            gates: Mapping[str, float]) -> tuple[VerifyReport, dict[str, Any] | None]:
    """`verify`'s checks, and DST's provenance in words where it has one."""
    from .verify import pair_keys, verify_checkpoints, verify_models

    src_key = state_dict_key if source_kind(Path(src)) in ("pt", "dcp") else None
    if Path(dst).suffix.lower() == ".onnx":
        from .verify import verify_onnx_layers

        with open_checkpoint(src, state_dict_key=src_key, allow_globals=allow_global) as s:
            if reference:
                raise UsageError(f"--reference applies to checkpoints, not to the ONNX file "
                                 f"'{dst}'; leave it out.")
            return verify_onnx_layers(s, Path(dst), seed=seed, batch_size=batch_size,
                                      atol=atol, rtol=rtol), None
    dst_key = state_dict_key if source_kind(Path(dst)) in ("pt", "dcp") else None
    with open_checkpoint(src, state_dict_key=src_key, allow_globals=allow_global) as s, \
            open_checkpoint(dst, state_dict_key=dst_key, allow_globals=allow_global) as d:
        prov = d.provenance
        provenance = None if prov is None else {
            "layout": prov.layout.value, "written from": prov.source_name,
            "source SHA-256": prov.source_sha256, "options hash": prov.options_hash,
            "tool version": prov.tool_version}
        if source_model and target_model:
            report = verify_models(s, d, source_model=source_model, target_model=target_model,
                                   input_shapes=[tuple(x) for x in input_shape],
                                   input_dtype=input_dtype, input_high=input_high,
                                   device=device, seed=seed, atol=atol, rtol=rtol,
                                   logits=logits, reference=reference, **gates)
            if prov is not None:  # per-layer pairs that need no guess
                pairs, dropped, layout, how = pair_keys(s, d)
                layers_report = verify_checkpoints(s, d, pairs=pairs, dropped=dropped,
                                                   dst_layout=layout, pairing=how,
                                                   device=device, batch_size=batch_size,
                                                   seed=seed, atol=atol, rtol=rtol,
                                                   reference=reference)
                report = replace(report, results=[*report.results, *layers_report.results],
                                 pairing=f"{report.pairing} and DST's provenance")
            return report, provenance
        model = build_reference(selection.model) if selection.model else None
        pairs, dropped, layout, how = pair_keys(s, d, with_config(selection, Path(src)), model)
        return verify_checkpoints(s, d, pairs=pairs, dropped=dropped, dst_layout=layout,
                                  pairing=how, device=device, batch_size=batch_size, seed=seed,
                                  atol=atol, rtol=rtol, reference=reference,
                                  companion_rules=selection.companions), provenance


# --- inspect --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor as `inspect` shows it."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    layout: str  # param, linear, ambiguous, other
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "shape": list(self.shape), "dtype": self.dtype,
                "layout": self.layout, "evidence": self.evidence}


@dataclass
class InspectReport:
    """Every tensor of a checkpoint with its detected layout."""

    source: str
    format: str
    sharded: bool
    tensors: list[TensorInfo]
    extras: list[str]
    tied: list[list[str]]
    provenance: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "sharded": self.sharded,
                "tensors": [t.to_dict() for t in self.tensors], "extras": self.extras,
                "tied": self.tied, "provenance": self.provenance}


def inspect_checkpoint(src: str | Path, *, state_dict_key: str | None = None,
                       allow_global: Sequence[str] = ()) -> InspectReport:
    """List every tensor with shape, dtype and detected layout (`param`, `linear`,
    `ambiguous`, `other`) and the evidence for it."""
    src_path = Path(src)
    if not src_path.exists():
        raise UsageError(f"SRC '{src}' does not exist.")
    with open_checkpoint(src_path, state_dict_key=state_dict_key,
                         allow_globals=allow_global) as ckpt:
        shapes = {k: s.shape for k, s in ckpt.specs.items()}
        prov = ckpt.provenance
        tensors = []
        comps = companion_map(shapes)
        for k, spec in ckpt.specs.items():
            tensors.append(TensorInfo(k, spec.shape, spec.dtype,
                                      *_detect(k, spec.shape, spec.dtype, shapes, prov, comps)))
        prov_dict = None
        if prov is not None:
            prov_dict = {"layout": prov.layout.value, "source": prov.source_name,
                         "source_sha256": prov.source_sha256, "tool_version": prov.tool_version,
                         "transposed": sum(t for _, t in prov.keys.values()),
                         "dropped": list(prov.dropped)}
        return InspectReport(str(src_path), ckpt.format, ckpt.sharded, tensors,
                             list(getattr(ckpt, "extras", [])), [list(g) for g in ckpt.tied],
                             prov_dict)


def _detect(key: str, shape: tuple[int, ...], dtype: str, shapes: dict[str, tuple[int, ...]],
            prov: Any, comps: Mapping[str, tuple[str, Role, Any]]) -> tuple[str, str]:
    if key in comps:
        weight, role, block = comps[key]
        try:
            return "companion", classify(key, weight, role, shape, shapes[weight],
                                         block).evidence
        except CompanionError as e:
            return "companion", f"does not fit: {e}"
    if prov is not None and key in prov.keys and prov.keys[key][1]:
        return prov.layout.value, f"provenance: transposed from '{prov.keys[key][0]}'"
    if not is_float_weight(dtype, shape) and not quantized_weight(key, dtype, shape, shapes):
        return "other", "not a 2-D float tensor"
    stack = (f"a stack of {'x'.join(map(str, shape[:-2]))} matrices (dims 0-{len(shape) - 3} "
             "stacked); " if len(shape) > 2 else "")
    evidence = bias_evidence(key, shape, shapes)
    if evidence:
        return evidence[0].value, stack + evidence[1]
    if shape[-1] == shape[-2]:
        return "ambiguous", (stack + "square with no bias sibling: --layers, --exclude or "
                             "--model decides")
    what = "stack" if stack else "2-D"
    return "other", (stack or "") + (f"{what} with no bias sibling: not a linear weight unless "
                                     "selected")


# --- the API's words ------------------------------------------------------------------------

_FLAGS = {"overwrite": "overwrite=True", "external-data": "external_data=True",
          "dry-run": "dry_run=True", "force": "force=True", "fail-fast": "fail_fast=True",
          "no-verify": "verify=False", "verify": "verify=True"}
_LISTS = ("layers", "exclude", "drop", "allow-global")
_WORDS = {"and", "or", "to", "the", "must", "does", "do", "apply", "applies", "used", "with",
          "is", "are", "for", "in", "of", "a", "an", "as", "be", "when", "that", "which", "only",
          "given", "batch", "it", "they"}
_OPTIONS = {"layers", "exclude", "drop", "rename", "stack", "split", "rules", "preset", "model",
            "state-dict-key", "allow-global", "dry-run", "verify", "no-verify", "device",
            "overwrite", "report", "junit", "format", "max-shard-size", "input-shape",
            "input-dtype", "input-high", "opset", "external-data", "layout", "atol", "rtol",
            "batch-size", "seed", "source-model", "target-model", "manifest", "direction",
            "out-dir", "jobs", "shard", "force", "fail-fast", "html", "logits", "reference",
            "min-cosine", "max-kl", "min-top1"}
_VALUED = ("model", "preset", "rules", "format", "layout", "state-dict-key", "max-shard-size",
           "opset", "input-shape", "input-dtype", "input-high", "atol", "rtol", "device",
           "source-model", "target-model", "batch-size", "seed", "jobs", "shard", "out-dir",
           "manifest", "html", "logits", "reference", "min-cosine", "max-kl", "min-top1")


def keyword_message(text: str) -> str:
    """TEXT with the command line's options written as the API's keyword arguments: only
    the options linconvert has, only where they stand as words (never inside a path)."""
    def name(flag: str) -> str:
        return flag.replace("-", "_")

    opt = rf"(?<![\w./-])--({'|'.join(sorted(_OPTIONS, key=len, reverse=True))})(?![\w-])"
    text = re.sub(r"(?<![\w./-])--rename '((?:[^'\\]|\\.)*)' '((?:[^'\\]|\\.)*)'",
                  lambda m: f"rename=[('{m[1]}', '{m[2]}')]", text)
    text = re.sub(r"rename=\[(\(.*?\))\] rename=\[", r"rename=[\1, ", text)
    text = re.sub(rf"(?<![\w./-])--({'|'.join(_LISTS)}) '([^']*)'",
                  lambda m: f"{name(m[1])}=['{m[2]}']", text)

    def valued(m: re.Match[str]) -> str:
        if m[2] is not None:
            return f"{name(m[1])}='{m[2]}'"
        value = m[3].rstrip(".:,;")
        end = m[3][len(value):]
        if value in _WORDS:  # the option named in a sentence, not given a value
            return f"{name(m[1])} {m[3]}"
        shown = value if re.fullmatch(r"-?[0-9.]+", value) else f"'{value}'"
        return f"{name(m[1])}={shown}{end}"

    text = re.sub(rf"(?<![\w./-])--({'|'.join(_VALUED)}) (?:'([^']*)'|([A-Za-z0-9_.:/|\[\]-]+))",
                  valued, text)
    text = re.sub(opt, lambda m: _FLAGS.get(m[1], name(m[1])), text)
    return re.sub(r"(?<![\w./-])-o(?![\w-])", "dst", text)


def public(fn: Callable[..., Any]) -> Callable[..., Any]:
    """FN for scripts: its errors name keyword arguments, not command-line options."""
    import functools

    from .errors import ConvertError

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConvertError as e:
            e.args = (keyword_message(str(e)), *e.args[1:])
            raise
    return call


@functools.cache
def public_api() -> Mapping[str, Callable[..., Any]]:
    """The operations as `convert.<name>` offers them (errors in the API's words)."""
    from types import MappingProxyType

    from .batching import batch
    from .swap import swap_modules

    ops = {"to_linear": to_linear, "to_param": to_param, "export": export, "verify": verify,
           "inspect_checkpoint": inspect_checkpoint, "plan_conversion": plan_conversion,
           "batch": batch, "swap_modules": swap_modules}
    return MappingProxyType({k: public(f) for k, f in ops.items()})
