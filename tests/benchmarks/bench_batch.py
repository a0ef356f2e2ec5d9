"""Benchmark: `linconvert batch -j 2` against `-j 1` on 8 medium checkpoints, in one run.

    python tests/benchmarks/bench_batch.py [--count 8] [--layers 6] [--repeat 2]

Each checkpoint is GPT-2-like in the param layout (default d=768, float32, ~325 MB at 6
layers; `--d`, `--vocab`, `--layers` resize it; each file's values differ). Runs
`linconvert batch DIR --direction to-linear --out-dir OUT -j N --preset gpt2` with
verification (the default) and with `--no-verify`, into a fresh output folder each time,
interleaved, and prints the medians and the speed-up of -j 2 over -j 1. With them, what bounds
the speed-up: the CPU time of each run (user + sys of the batch and its workers, from rusage),
the cores it kept busy on average (CPU time / wall), and so the most -j 2 can gain on the cores
this process may use if the work stays the same: cores / (cores busy at -j 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GENERATE = """
import sys, torch
from safetensors.torch import save_file
folder, count, layers, d, vocab = sys.argv[1], *map(int, sys.argv[2:6])
for n in range(count):
    g = torch.Generator().manual_seed(n)
    r = lambda *s: torch.rand(s, generator=g) * 0.02
    sd = {"transformer.wte.weight": r(vocab, d), "transformer.wpe.weight": r(1024, d)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": torch.ones(d), p + "ln_1.bias": torch.zeros(d),
               p + "attn.c_attn.weight": r(d, 3 * d), p + "attn.c_attn.bias": r(3 * d),
               p + "attn.c_proj.weight": r(d, d), p + "attn.c_proj.bias": r(d),
               p + "ln_2.weight": torch.ones(d), p + "ln_2.bias": torch.zeros(d),
               p + "mlp.c_fc.weight": r(d, 4 * d), p + "mlp.c_fc.bias": r(4 * d),
               p + "mlp.c_proj.weight": r(4 * d, d), p + "mlp.c_proj.bias": r(d)}
    save_file(sd, f"{folder}/ckpt{n}.safetensors")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--d", type=int, default=768, help="model width")
    ap.add_argument("--vocab", type=int, default=50257, help="embedding rows")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="linconvert-batch-bench-"))
    try:
        src = work / "in"
        src.mkdir()
        subprocess.run([sys.executable, "-c", GENERATE, str(src), str(args.count),
                        str(args.layers), str(args.d), str(args.vocab)], check=True)
        size = sum(p.stat().st_size for p in src.iterdir()) / 1e6
        exe = [sys.executable, "-m", "convert"]
        results: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeat):
            for verify in ("--verify", "--no-verify"):
                for jobs in (1, 2):
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    start = time.perf_counter()
                    proc = subprocess.Popen([*exe, "batch", str(src), "--direction",
                                             "to-linear", "--out-dir", str(out), "-j",
                                             str(jobs), "--preset", "gpt2", verify, "-q"],
                                            stdout=subprocess.DEVNULL)
                    _, status, usage = os.wait4(proc.pid, 0)  # its workers are waited for
                    wall = time.perf_counter() - start
                    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here
                    if proc.returncode != 0:
                        raise SystemExit(f"batch -j {jobs} {verify} failed")
                    results.setdefault((verify, jobs), []).append(
                        (wall, usage.ru_utime + usage.ru_stime))
        print(f"\n{args.count} checkpoints, {size:.0f} MB in all, {args.repeat} rounds "
              f"(median wall seconds)\n")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count() or 1
        print("| mode | -j 1 wall s | -j 2 wall s | speed-up | -j 1 CPU s (cores busy) "
              "| -j 2 CPU s (cores busy) | most -j 2 can gain |")
        print("|---|---|---|---|---|---|---|")
        for verify in ("--verify", "--no-verify"):
            (w1, c1), (w2, c2) = (
                (statistics.median(w for w, _ in results[(verify, j)]),
                 statistics.median(c for _, c in results[(verify, j)])) for j in (1, 2))
            print(f"| {verify} | {w1:.2f} | {w2:.2f} | {w1 / w2:.2f}x | {c1:.2f} "
                  f"({c1 / w1:.2f}) | {c2:.2f} ({c2 / w2:.2f}) | {cores * w1 / c1:.2f}x |")
        print(f"\ntarget: -j 2 at least 1.6x faster than -j 1 (with verification, the "
              f"default); {cores} cores here")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
