"""Mutation fuzzing of the fixture files through the CLI.

Bytes are flipped, overwritten, truncated, spliced, duplicated and deleted, in the raw file and
inside its structure (the pickle inside a valid .pt archive, the JSON header of a safetensors
file, a shard index), and each mutant goes through `inspect` and `to-linear`. Every run must
end with a documented exit code and one sentence, no traceback, no hang, and nothing partial.

The default run tries a few hundred mutants; `pytest -m fuzz` tries several thousand.
Every case is reproducible from its seed file, strategy and number.
"""

from __future__ import annotations

import io
import json
import random
import signal
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import FIXTURES, Runner

# Exit codes a mutant may get: done, usage/selection, unsafe, corrupt. Verification of our own
# output failing (1), an output error (5) or an internal error (70) is a finding.
ALLOWED = {0, 2, 3, 4}
CASE_SECONDS = 30

# Options that make each seed convertible as it is (square weights need a decision).
OPTIONS = {
    "square_nobias.safetensors": ["--layers", "*.weight"],
    "seed000_W.pt": ["--layers", "W"],
    "flax.msgpack": ["--preset", "flax"],
}


@dataclass
class Finding:
    seed: str
    strategy: str
    case: int
    command: str
    why: str


# --- mutators: bytes -> bytes, driven by one random.Random -----------------------------------


def _flip(rng: random.Random, b: bytes) -> bytes:
    out = bytearray(b)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _poke(rng: random.Random, b: bytes) -> bytes:
    out = bytearray(b)
    for _ in range(rng.choice([1, 2, 3])):
        i = rng.randrange(len(out))
        value = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01, 0x20, 0x7B, 0x7D, 0x22])
        width = rng.choice([1, 1, 2, 4, 8])
        out[i:i + width] = bytes([value]) * width
    return bytes(out[: len(b)])


def _truncate(rng: random.Random, b: bytes) -> bytes:
    if rng.random() < 0.3:
        return b[: rng.randrange(min(len(b), 64))]
    return b[: rng.randrange(len(b))]


def _splice(rng: random.Random, b: bytes, donor: bytes) -> bytes:
    src = donor if rng.random() < 0.5 else b
    i, j = sorted(rng.randrange(len(src) + 1) for _ in range(2))
    chunk = src[i:j][:4096]
    at = rng.randrange(len(b) + 1)
    if rng.random() < 0.5:
        return b[:at] + chunk + b[at:]  # insert
    return b[:at] + chunk + b[at + len(chunk):]  # overwrite


def _delete(rng: random.Random, b: bytes) -> bytes:
    i = rng.randrange(len(b))
    return b[:i] + b[i + rng.randrange(1, 64):]


def _duplicate(rng: random.Random, b: bytes) -> bytes:
    i = rng.randrange(len(b))
    j = min(len(b), i + rng.randrange(1, 256))
    return b[:j] + b[i:j] + b[j:]


def _any_byte_mutation(rng: random.Random, b: bytes, donor: bytes) -> tuple[str, bytes]:
    name = rng.choice(["flip", "poke", "truncate", "splice", "delete", "duplicate"])
    if not b:
        return name, b
    if name == "splice":
        return name, _splice(rng, b, donor)
    return name, {"flip": _flip, "poke": _poke, "truncate": _truncate, "delete": _delete,
                  "duplicate": _duplicate}[name](rng, b)


def _mutate_pickle_in_zip(rng: random.Random, b: bytes, donor: bytes) -> tuple[str, bytes]:
    """Mutate data.pkl (or another member) and re-zip it stored, so that the archive stays
    valid and the mutation reaches torch's unpickler."""
    with zipfile.ZipFile(io.BytesIO(b)) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    pkl = [k for k, (name, _) in enumerate(members) if name.endswith("data.pkl")]
    k = pkl[0] if pkl and rng.random() < 0.8 else rng.randrange(len(members))
    name, data = members[k]
    how, data = _any_byte_mutation(rng, data, donor)
    members[k] = (name, data)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for member, payload in members:
            z.writestr(member, payload)
    return f"zip:{name.rsplit('/', 1)[-1]}:{how}", out.getvalue()


def _mutate_safetensors_header(rng: random.Random, b: bytes, donor: bytes) -> tuple[str, bytes]:
    """Change one field of the JSON header (dtype, a dimension, an offset, a name, metadata)
    and write a header length that matches, so that validation past the JSON is exercised."""
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    data = b[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return _any_byte_mutation(rng, b, donor)
    name = rng.choice(names)
    entry = header[name]
    what = rng.choice(["dtype", "dim", "offset", "rename", "drop", "dup-offsets", "metadata",
                       "shape-type", "extra-bytes"])
    big = rng.choice([0, 1, 2, 3, 7, 2**31, 2**32 + 1, 2**40, 2**62, 2**63, 2**64, -1])
    if what == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F4",
                                     "F8_E4M3", "Q4", "f32", "", 3])
    elif what == "dim":
        if entry["shape"] and rng.random() < 0.8:
            entry["shape"][rng.randrange(len(entry["shape"]))] = big
        else:
            entry["shape"].append(big)
    elif what == "offset":
        entry["data_offsets"][rng.randrange(2)] = big
    elif what == "rename":
        header[rng.choice(names) + rng.choice(["", ".x", "W"])] = header.pop(name)
    elif what == "drop":
        header.pop(name)
    elif what == "dup-offsets":
        other = header[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"])
    elif what == "metadata":
        header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"a": None}, None,
                                             {"linconvert": "{not json"},
                                             {"linconvert": '{"version": 99}'}])
    elif what == "shape-type":
        entry["shape"] = rng.choice([None, "2,3", [2.0, 3], [True], {}, [[2]]])
    else:
        data += b"\0" * rng.randrange(1, 16)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return f"header:{what}", struct.pack("<Q", len(text)) + text + data


# --- seeds -----------------------------------------------------------------------------------


def _seed_files(folder: Path) -> dict[str, bytes]:
    seeds = {p.name: p.read_bytes() for p in sorted(FIXTURES.iterdir())
             if p.suffix in (".pt", ".safetensors")}
    g = torch.Generator().manual_seed(9)
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.randn(3, 5, generator=g), "fc.bias": torch.randn(5, generator=g),
                "step": torch.tensor(3)}, buf, _use_new_zipfile_serialization=False)
    seeds["legacy.pt"] = buf.getvalue()
    flax_seed = _flax_seed()
    if flax_seed is not None:
        seeds["flax.msgpack"] = flax_seed
    return seeds


def _flax_seed() -> bytes | None:
    """A Flax MLP's variables as flax writes them (when flax is installed), one array chunked."""
    try:
        import flax.serialization
        import jax
        from flax import linen
    except ImportError:
        return None

    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(3, name="fc2")(linen.LayerNorm(name="norm")(
                linen.Dense(6, name="fc1")(x)))

    variables = MLP().init(jax.random.PRNGKey(0), np.ones((1, 4), np.float32))
    limit = flax.serialization.MAX_CHUNK_SIZE
    flax.serialization.MAX_CHUNK_SIZE = 40  # so that the seed holds a chunked array too
    try:
        return flax.serialization.to_bytes(variables)
    finally:
        flax.serialization.MAX_CHUNK_SIZE = limit


def _sharded_seed(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(10)
    save_file({"a.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(5, generator=g)},
              str(folder / "s1.safetensors"))
    save_file({"b.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(5, generator=g)},
              str(folder / "s2.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 160},
        "weight_map": {"a.weight": "s1.safetensors", "a.bias": "s1.safetensors",
                       "b.weight": "s2.safetensors", "b.bias": "s2.safetensors"}}))
    return folder


# --- the harness -----------------------------------------------------------------------------


def _timeout(signum, frame):
    raise TimeoutError(f"a case ran past {CASE_SECONDS} s")


def _check(runner: Runner, args: list[object], out_dir: Path,
           codes: Counter) -> str | None:
    """Run one command, counting its exit code; the reason it broke a rule, or None."""
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        res = runner(*args)
    except TimeoutError as e:
        return str(e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    codes[res.exit_code] += 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    left = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    if res.exit_code not in ALLOWED:
        return f"exit {res.exit_code}: {res.stderr.strip()[:300]}"
    if "Traceback" in res.stderr:
        return f"traceback: {res.stderr[:300]}"
    if res.exit_code and (len(lines) != 1 or not lines[0].startswith("linconvert: error: ")):
        return f"not one sentence: {res.stderr[:300]}"
    if "\x1b" in res.stderr or "weights_only=False" in res.stderr:
        return f"raw torch message: {res.stderr[:300]}"
    if any(name.endswith(".partial") for name in left):
        return f"temporary file left: {left}"
    if res.exit_code and left:
        return f"exit {res.exit_code} but wrote {left}"
    return None


def _fuzz(tmp_path: Path, cases_per_seed: int, seed: int) -> tuple[Counter, list[Finding]]:
    runner = Runner()
    work = tmp_path / "work"
    work.mkdir()
    seeds = _seed_files(tmp_path)
    donors = list(seeds.values())
    counts: Counter = Counter()
    codes: Counter = Counter()
    findings: list[Finding] = []

    def one(seed_name: str, strategy: str, case: int, out_dir: Path,
            commands: list[list[object]]) -> None:
        for args in commands:
            counts[seed_name] += 1
            why = _check(runner, args, out_dir, codes)
            if why:
                findings.append(Finding(seed_name, strategy, case, " ".join(map(str, args)),
                                        why))
            for p in out_dir.iterdir():
                if p.is_file():
                    p.unlink()

    for seed_name, blob in seeds.items():
        rng = random.Random(f"{seed}:{seed_name}")
        suffix = Path(seed_name).suffix
        for case in range(cases_per_seed):
            structured = rng.random() < 0.5
            if structured and blob.startswith(b"PK\x03\x04"):
                strategy, mutant = _mutate_pickle_in_zip(rng, blob, rng.choice(donors))
            elif structured and suffix == ".safetensors":
                strategy, mutant = _mutate_safetensors_header(rng, blob, rng.choice(donors))
            else:
                strategy, mutant = _any_byte_mutation(rng, blob, rng.choice(donors))
            src = work / f"mutant{suffix}"
            src.write_bytes(mutant)
            out = work / "out"
            out.mkdir(exist_ok=True)
            fmt = rng.choice([".safetensors", ".pt"])
            commands: list[list[object]] = [["inspect", src]]
            if case % 2 == 0:  # converting costs more: every other mutant
                commands.append(["to-linear", src, "-o", out / f"dst{fmt}",
                                 *OPTIONS.get(seed_name, [])])
            one(seed_name, strategy, case, out, commands)

    # A sharded folder: mutate its index or one of its shards.
    rng = random.Random(f"{seed}:sharded")
    base = _sharded_seed(tmp_path / "sharded-seed")
    for case in range(cases_per_seed):
        folder = _sharded_seed(tmp_path / "sharded")
        target = rng.choice(["model.safetensors.index.json", "s1.safetensors"])
        blob = (base / target).read_bytes()
        if target.endswith(".json") and rng.random() < 0.5:
            strategy, mutant = _mutate_index(rng, blob)
        else:
            strategy, mutant = _any_byte_mutation(rng, blob, rng.choice(donors))
        (folder / target).write_bytes(mutant)
        out = tmp_path / "sharded-out"
        out.mkdir(exist_ok=True)
        commands = [["inspect", folder]]
        if case % 2 == 0:
            commands.append(["to-linear", folder, "-o", out / "dst.safetensors"])
        one("sharded", f"{target}:{strategy}", case, out, commands)
    counts["exit codes"] = codes  # type: ignore[assignment]
    return counts, findings


def _mutate_index(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    index = json.loads(blob)
    wm = index["weight_map"]
    key = rng.choice(sorted(wm))
    what = rng.choice(["dotdot", "absolute", "missing", "move", "drop", "add", "total", "types"])
    if what == "dotdot":
        wm[key] = "../" + wm[key]
    elif what == "absolute":
        wm[key] = "/etc/" + wm[key]
    elif what == "missing":
        wm[key] = "s9.safetensors"
    elif what == "move":
        wm[key] = "s2.safetensors" if wm[key] == "s1.safetensors" else "s1.safetensors"
    elif what == "drop":
        wm.pop(key)
    elif what == "add":
        wm["ghost.weight"] = "s1.safetensors"
    elif what == "total":
        index["metadata"]["total_size"] = rng.choice([0, 159, 161, -1, "160", None, 2**70])
    else:
        wm[key] = rng.choice([None, 3, [], {"a": 1}, "", "s1.safetensors\x00"])
    return f"index:{what}", json.dumps(index).encode()


def _report(counts: Counter, findings: list[Finding], capsys) -> None:
    codes = counts.pop("exit codes")
    total = sum(counts.values())
    by_kind = Counter(f.why.split(":")[0] for f in findings)
    with capsys.disabled():
        print(f"\nfuzz: {total} runs over {len(counts)} seeds "
              f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); exit codes "
              f"{dict(sorted(codes.items()))}; {len(findings)} findings {dict(by_kind)}")
    shown = "\n".join(f"  {f.seed} {f.strategy} case {f.case}: {f.command}\n    {f.why}"
                      for f in findings[:20])
    assert not findings, f"{len(findings)} of {total} fuzz runs broke a rule:\n{shown}"


def test_fuzz_fixtures_default(tmp_path, capsys):
    """A few hundred mutants in the default run."""
    counts, findings = _fuzz(tmp_path, cases_per_seed=60, seed=0)
    _report(counts, findings, capsys)


@pytest.mark.fuzz
def test_fuzz_fixtures_long(tmp_path, capsys):
    """Several thousand mutants (`pytest -m fuzz`)."""
    counts, findings = _fuzz(tmp_path, cases_per_seed=500, seed=1)
    _report(counts, findings, capsys)
