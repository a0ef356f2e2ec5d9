"""Benchmark: a torch.distributed.checkpoint folder to safetensors, against the naive way.

    python tests/benchmarks/bench_dcp.py                       # 24 layers, ~400 MB, one rank
    python tests/benchmarks/bench_dcp.py --ranks 4 --repeat 3  # sharded as FSDP's Shard(0)

Writes a param-layout MLP (`--layers` of `--d` x `--d` float32 weights plus biases, under
`model`, as torchtitan saves it) with torch's own `dcp.save` (one rank) or, with `--ranks N`,
as N ranks of a sharded run write it (each weight cut along dim 0, one `__R_0.distcp` per
rank). Then runs, as separate processes interleaved and repeated (median, min, max):

- naive: `dcp_to_torch_save` -> `torch.load` -> `.t().contiguous()` -> `save_file`
- linconvert to-linear --no-verify, and verified

Wall time and peak RSS come from each child's own rusage (os.wait4).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import interleave, linconvert, print_ratios, print_table  # noqa: E402

NAIVE = """
import sys, tempfile, torch
from pathlib import Path
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
with tempfile.TemporaryDirectory() as tmp:
    dcp_to_torch_save(sys.argv[1], Path(tmp) / "all.pt")
    sd = torch.load(Path(tmp) / "all.pt", weights_only=True)["model"]
save_file({k: (v.t().contiguous() if v.dim() == 2 else v) for k, v in sd.items()}, sys.argv[2])
"""


def generate(folder: Path, layers: int, d: int, ranks: int) -> None:
    """The DCP folder: torch's dcp.save for one rank, else the ranks of a sharded run."""
    import warnings

    import torch

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(layers):
        sd[f"layers.{i}.weight"] = torch.rand(d, d, generator=g) * 0.02
        sd[f"layers.{i}.bias"] = torch.rand(d, generator=g)
    if ranks == 1:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": sd}, checkpoint_id=folder)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
    from test_dcp import save_ranks

    save_ranks(folder, sd, {k: (ranks,) for k in sd if k.endswith(".weight")}, ranks=ranks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d", type=int, default=2048, help="layer width")
    ap.add_argument("--ranks", type=int, default=1, help="ranks the weights are sharded over")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per case (median reported)")
    ap.add_argument("--workdir", type=Path, help="where the folders go (default: a temp dir)")
    ap.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="linconvert-bench-"))
    src = folder / f"dcp-{args.layers}x{args.d}-r{args.ranks}"
    if args.generate:
        generate(src, args.layers, args.d, args.ranks)
        return
    try:
        if not (src / ".metadata").exists():  # in a child: this process stays small
            subprocess.run([sys.executable, __file__, "--generate", "--workdir", str(folder),
                            "--layers", str(args.layers), "--d", str(args.d),
                            "--ranks", str(args.ranks)], check=True)
        out = folder / "out.safetensors"
        lc = linconvert()
        common = ["--layers", "layers.*.weight", "--overwrite", "-q"]  # square: say which
        cases = {
            "naive: dcp_to_torch_save, load, .t(), save": [sys.executable, "-c", NAIVE,
                                                           str(src), str(out)],
            "linconvert to-linear --no-verify": [*lc, "to-linear", str(src), "-o", str(out),
                                                 "--no-verify", *common],
            "linconvert to-linear, verified": [*lc, "to-linear", str(src), "-o", str(out),
                                               *common],
        }
        results = interleave(cases, args.repeat, (out,))
        size = sum(p.stat().st_size for p in src.iterdir()) / 1e6
        print(f"\n## DCP folder: {args.layers} x {args.d}x{args.d} float32 + biases, "
              f"{args.ranks} rank(s), {size:.0f} MB, {args.repeat} rounds (median (min-max))\n")
        print_ratios(print_table(results), "naive: dcp_to_torch_save, load, .t(), save",
                     "linconvert to-linear --no-verify")
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
