"""Benchmark: linconvert's streaming conversion against the naive way, in one run.

    python tests/benchmarks/bench_convert.py                 # 12 layers, ~810 MB
    python tests/benchmarks/bench_convert.py --layers 12 --layers 24 --repeat 5

Generates a GPT-2-small-like float32 checkpoint in the param layout (d=1024, fused c_attn
1024x3072, c_proj 1024x1024, c_fc 1024x4096, mlp c_proj 4096x1024, biases, layer norms, a
50257x1024 embedding, a 1024x1024 position embedding), as .safetensors and .pt. Then runs, as
separate processes interleaved A/B and repeated (median, min, max):

- naive safetensors: load_file -> .t().contiguous() on the four weight kinds -> save_file
- naive .pt: torch.load -> the same -> torch.save
- naive safetensors -> .pt: load_file -> the same -> torch.save
- linconvert to-linear --no-verify, safetensors -> safetensors and .pt -> safetensors
- linconvert to-linear --no-verify into .pt (streamed in torch.save's format), from both
- linconvert to-linear with verification (the wall it adds is a target)
- floor: copy the file and fsync
- linconvert --help, and inspect of the safetensors file

The package's bytecode is compiled first, as pip does when it installs the package (with
PYTHONDONTWRITEBYTECODE set, an editable install would compile every module in every run:
50-60 ms of each linconvert row here). Wall time and peak RSS come from each child's own
rusage (os.wait4). The naive scripts do not
fsync; linconvert does. Prints a table, then each of issue 18's targets as a ratio with PASS or
FAIL (and DESIGN.md's aim for the floor, met or not).
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

KINDS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

NAIVE_ST = f"""
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
kinds = {KINDS!r}
save_file({{k: (v.t().contiguous() if k.endswith(kinds) else v) for k, v in sd.items()}},
          sys.argv[2])
"""

NAIVE_PT = f"""
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
kinds = {KINDS!r}
torch.save({{k: (v.t().contiguous() if k.endswith(kinds) else v) for k, v in sd.items()}},
           sys.argv[2])
"""

NAIVE_ST_PT = f"""
import sys, torch
from safetensors.torch import load_file
sd = load_file(sys.argv[1])
kinds = {KINDS!r}
torch.save({{k: (v.t().contiguous() if k.endswith(kinds) else v) for k, v in sd.items()}},
           sys.argv[2])
"""

FLOOR = """
import os, shutil, sys
shutil.copyfile(sys.argv[1], sys.argv[2])
fd = os.open(sys.argv[2], os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


def make_checkpoint(folder: Path, layers: int) -> tuple[Path, Path]:
    """The checkpoint's two files, generated in a child process: this process stays small, so
    the children it forks start small (a forked child's peak RSS counts its parent's pages)."""
    st, pt = folder / f"gpt2like-{layers}.safetensors", folder / f"gpt2like-{layers}.pt"
    if not (st.exists() and pt.exists()):
        subprocess.run([sys.executable, __file__, "--generate", str(layers), "--workdir",
                        str(folder)], check=True)
    return st, pt


def generate(folder: Path, layers: int, d: int = 1024, vocab: int = 50257) -> None:
    """Write the param-layout GPT-2-like checkpoint as .safetensors and .pt."""
    import torch
    from safetensors.torch import save_file

    st, pt = folder / f"gpt2like-{layers}.safetensors", folder / f"gpt2like-{layers}.pt"
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g) * 0.02

    sd = {"transformer.wte.weight": rand(vocab, d), "transformer.wpe.weight": rand(1024, d)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": torch.ones(d), p + "ln_1.bias": torch.zeros(d),
               p + "attn.c_attn.weight": rand(d, 3 * d), p + "attn.c_attn.bias": rand(3 * d),
               p + "attn.c_proj.weight": rand(d, d), p + "attn.c_proj.bias": rand(d),
               p + "ln_2.weight": torch.ones(d), p + "ln_2.bias": torch.zeros(d),
               p + "mlp.c_fc.weight": rand(d, 4 * d), p + "mlp.c_fc.bias": rand(4 * d),
               p + "mlp.c_proj.weight": rand(4 * d, d), p + "mlp.c_proj.bias": rand(d)}
    sd |= {"transformer.ln_f.weight": torch.ones(d), "transformer.ln_f.bias": torch.zeros(d)}
    save_file(sd, str(st))
    torch.save(sd, pt)


NAIVE_MOE = """
import re, sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
out, groups = {}, {}
for k, v in sd.items():
    m = re.fullmatch(r"layers\\.(\\d+)\\.experts\\.(\\d+)\\.(w[12])\\.weight", k)
    if m:
        groups.setdefault((m[1], m[3]), {})[int(m[2])] = v
    else:
        out[k] = v
for (layer, w), members in groups.items():
    out[f"layers.{layer}.experts.{w}"] = torch.stack(
        [members[e].t() for e in range(len(members))]).contiguous()
save_file(out, sys.argv[2])
"""
MOE_RULES = ["--stack", "layers.{l}.experts.{e}.w1.weight", "layers.{l}.experts.w1",
             "--stack", "layers.{l}.experts.{e}.w2.weight", "layers.{l}.experts.w2",
             "--layers", "layers.*.experts.*.weight"]


def generate_moe(folder: Path, experts: int, layers: int, h: int = 256, inter: int = 512) -> Path:
    """The Hub's per-expert layout: E nn.Linear weights per projection and layer."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for layer in range(layers):
        for e in range(experts):
            sd[f"layers.{layer}.experts.{e}.w1.weight"] = torch.rand(inter, h, generator=g)
            sd[f"layers.{layer}.experts.{e}.w2.weight"] = torch.rand(h, inter, generator=g)
        sd[f"layers.{layer}.norm.weight"] = torch.ones(h)
    path = folder / f"moe-{experts}x{layers}.safetensors"
    save_file(sd, str(path))
    return path


def measure_moe(folder: Path, experts: int, layers: int,
                repeat: int) -> dict[str, list[tuple[float, float]]]:
    src = folder / f"moe-{experts}x{layers}.safetensors"
    if not src.exists():
        subprocess.run([sys.executable, __file__, "--generate-moe", f"{experts}x{layers}",
                        "--workdir", str(folder)], check=True)
    out = folder / "moe-out.safetensors"
    lc = linconvert()
    cases = {
        "naive: load_file, stack(w.t()), save_file": [sys.executable, "-c", NAIVE_MOE, str(src),
                                                       str(out)],
        "linconvert to-param --stack, --no-verify": [*lc, "to-param", str(src), "-o", str(out),
                                                     *MOE_RULES, "--no-verify", "--overwrite",
                                                     "-q"],
        "linconvert to-param --stack, verified": [*lc, "to-param", str(src), "-o", str(out),
                                                  *MOE_RULES, "--overwrite", "-q"],
    }
    return interleave(cases, repeat, (out,))


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss / 1024


def compile_package() -> None:
    """The package's .pyc files, written once (what a normal install leaves)."""
    import convert

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(convert.__file__).parent)],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ,
                                                               "PYTHONDONTWRITEBYTECODE": ""})


def linconvert() -> list[str]:
    exe = shutil.which("linconvert", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "convert"]


def measure(layers: int, folder: Path, repeat: int) -> dict[str, list[tuple[float, float]]]:
    st, pt = make_checkpoint(folder, layers)
    out_st, out_pt = folder / "out.safetensors", folder / "out.pt"
    lc = linconvert()
    common = ["--preset", "gpt2", "--overwrite", "-q"]
    cases = {
        "naive safetensors (load_file/save_file)": [sys.executable, "-c", NAIVE_ST, str(st),
                                                    str(out_st)],
        "linconvert st->st --no-verify": [*lc, "to-linear", str(st), "-o", str(out_st),
                                          "--no-verify", *common],
        "naive .pt (torch.load/torch.save)": [sys.executable, "-c", NAIVE_PT, str(pt),
                                              str(out_pt)],
        "linconvert pt->st --no-verify": [*lc, "to-linear", str(pt), "-o", str(out_st),
                                          "--no-verify", *common],
        "naive st->.pt (load_file/torch.save)": [sys.executable, "-c", NAIVE_ST_PT, str(st),
                                                 str(out_pt)],
        "linconvert st->.pt --no-verify": [*lc, "to-linear", str(st), "-o", str(out_pt),
                                           "--no-verify", *common],
        "linconvert .pt->.pt --no-verify": [*lc, "to-linear", str(pt), "-o", str(out_pt),
                                            "--no-verify", *common],
        "linconvert st->st with verify": [*lc, "to-linear", str(st), "-o", str(out_st),
                                          *common],
        "floor: copy + fsync": [sys.executable, "-c", FLOOR, str(st), str(out_st)],
        "linconvert --help": [*lc, "--help"],
        "linconvert inspect": [*lc, "inspect", str(st)],
    }
    return interleave(cases, repeat, (out_st, out_pt))


def interleave(cases: dict[str, list[str]], repeat: int,
               outputs: tuple[Path, ...]) -> dict[str, list[tuple[float, float]]]:
    """(wall, peak RSS) of every case, REPEAT rounds, every case once per round, each run
    starting with its OUTPUTS removed."""
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(repeat):
        for name, cmd in cases.items():
            for p in outputs:
                p.unlink(missing_ok=True)
            results[name].append(run(cmd))
    return results


def summarize(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


def print_table(res: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Print each case's wall and peak RSS (median (min-max)); return the medians."""
    print(f"| {'case':42} | {'wall s':>19} | {'peak RSS MiB':>21} |")
    print(f"|{'-' * 44}|{'-' * 21}|{'-' * 23}|")
    for name, runs in res.items():
        print(f"| {name:42} | {summarize([w for w, _ in runs]):>19} | "
              f"{summarize([r for _, r in runs]):>21} |")
    return {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v))
            for k, v in res.items()}


def print_ratios(med: dict[str, tuple[float, float]], naive: str, ours: str) -> None:
    """Case OURS's median wall and peak RSS as fractions of case NAIVE's."""
    (nw, nr), (ow, orss) = med[naive], med[ours]
    print(f"\n- wall / naive: {ow / nw:.2f}; peak RSS / naive: {orss / nr:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, action="append",
                    help="transformer layers (repeatable; default 12)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per case (median reported)")
    ap.add_argument("--workdir", type=Path, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--moe", metavar="ExL",
                    help="instead: stacked experts, E experts x L layers (e.g. 64x8), per-expert "
                         "-> stacked with --stack against a naive load-stack-save")
    ap.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--generate-moe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(args.workdir, args.generate)
        return
    if args.generate_moe:
        generate_moe(args.workdir, *map(int, args.generate_moe.split("x")))
        return
    if args.moe:
        compile_package()
        folder = args.workdir or Path(tempfile.mkdtemp(prefix="linconvert-bench-"))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            experts, layers = map(int, args.moe.split("x"))
            res = measure_moe(folder, experts, layers, args.repeat)
            size = (folder / f"moe-{experts}x{layers}.safetensors").stat().st_size / 1e6
            print(f"\n## stacked experts: {experts} experts x {layers} layers, {size:.0f} MB "
                  f"float32, {args.repeat} rounds (median (min-max))\n")
            print_ratios(print_table(res), "naive: load_file, stack(w.t()), save_file",
                         "linconvert to-param --stack, --no-verify")
        finally:
            if args.workdir is None:
                shutil.rmtree(folder, ignore_errors=True)
        return
    compile_package()
    layer_counts = args.layers or [12]
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="linconvert-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    peak: dict[int, float] = {}
    try:
        for layers in layer_counts:
            res = measure(layers, folder, args.repeat)
            size = (folder / f"gpt2like-{layers}.safetensors").stat().st_size / 1e6
            print(f"\n## {layers} layers, {size:.0f} MB float32, {args.repeat} rounds "
                  f"(median (min-max))\n")
            med = print_table(res)
            n_st, l_st = med["naive safetensors (load_file/save_file)"], \
                med["linconvert st->st --no-verify"]
            n_pt, l_pt = med["naive .pt (torch.load/torch.save)"], \
                med["linconvert pt->st --no-verify"]
            n_st_pt, l_st_pt = med["naive st->.pt (load_file/torch.save)"], \
                med["linconvert st->.pt --no-verify"]
            l_pt_pt = med["linconvert .pt->.pt --no-verify"]
            floor = med["floor: copy + fsync"][0]
            peak[layers] = l_st[1]
            verified = med["linconvert st->st with verify"][0]
            checks = [  # issue 18's targets
                ("st->st peak RSS / naive", l_st[1] / n_st[1], 0.1, "target"),
                ("st->st wall / naive", l_st[0] / n_st[0], 0.5, "target"),
                ("st->st wall / floor (copy+fsync)", l_st[0] / floor, 1.5, "target"),
                ("pt->st wall / naive .pt", l_pt[0] / n_pt[0], 0.6, "target"),
                ("pt->st peak RSS / naive .pt", l_pt[1] / n_pt[1], 0.3, "target"),
                ("st->.pt wall / naive st->.pt", l_st_pt[0] / n_st_pt[0], 0.8, "target"),
                ("st->.pt peak RSS / naive st->.pt", l_st_pt[1] / n_st_pt[1], 0.3, "target"),
                (".pt->.pt wall / naive .pt", l_pt_pt[0] / n_pt[0], 0.8, "target"),
                (".pt->.pt peak RSS / naive .pt", l_pt_pt[1] / n_pt[1], 0.3, "target"),
                ("st->st wall added by verification", verified / l_st[0] - 1, 0.25, "target"),
                ("--help wall (s)", med["linconvert --help"][0], 0.15, "target"),
                (f"inspect of the {size:.0f} MB file, wall (s)", med["linconvert inspect"][0],
                 0.2, "target (1.4 GB file)"),
                ("st->st wall / floor (copy+fsync)", l_st[0] / floor, 2.0, "DESIGN.md's aim"),
            ]
            print()
            for what, value, bound, kind in checks:
                verdict = ("PASS" if value <= bound else "FAIL") if kind.startswith(
                    "target") else ("met" if value <= bound else "not met")
                print(f"- {what}: {value:.2f} ({kind} <= {bound}) {verdict}")
        if len(peak) > 1:
            lo, hi = min(peak), max(peak)
            growth = peak[hi] / peak[lo] - 1
            print(f"\n- linconvert st->st peak RSS, {hi} vs {lo} layers: +{growth:.1%} "
                  f"(target <= +15%) {'PASS' if growth <= 0.15 else 'FAIL'}")
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
