"""Verify-after-convert in a second process (convert.verify.worker), as the command line does.

The test process has torch imported, where the command line would verify in its own process;
`_torch_imported` is patched so the conversions here take the second process as `linconvert`
run from a shell does. Faults are planted in this (the writing) process: the verifying process
does not share them, and must catch them.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert.api as api
import convert.execute as ex
from convert.verify import worker as vw

from .conftest import ROOT


@pytest.fixture
def elsewhere(monkeypatch):
    """Conversions from the command line verify in a second process, as from a shell."""
    monkeypatch.setattr(api, "_torch_imported", lambda: False)
    started = []
    real = vw.VerifyProcess.__init__

    def counted(self):
        real(self)
        started.append(self)

    monkeypatch.setattr(vw.VerifyProcess, "__init__", counted)

    def not_here(*args):
        raise AssertionError("verified in the converting process, not the second one")

    monkeypatch.setattr(api, "_verify_written", not_here)
    return started


REAL_VERIFY_WRITTEN = api._verify_written


@pytest.fixture
def gpt2_like(tmp_path):
    """Two param-layout layers with biases, a square one among them, and an embedding."""
    g = torch.Generator().manual_seed(3)
    sd = {"wte.weight": torch.randn(300, 64, generator=g)}
    for i in range(2):
        sd[f"h.{i}.attn.c_attn.weight"] = torch.randn(64, 192, generator=g)
        sd[f"h.{i}.attn.c_attn.bias"] = torch.randn(192, generator=g)
        sd[f"h.{i}.attn.c_proj.weight"] = torch.randn(64, 64, generator=g)
        sd[f"h.{i}.attn.c_proj.bias"] = torch.randn(64, generator=g)
        sd[f"h.{i}.ln_1.weight"] = torch.randn(64, generator=g)
    src = tmp_path / "gpt2.safetensors"
    save_file(sd, str(src))
    return src, sd


def plant_bit_flip(monkeypatch, byte: int | None = 0, mask: int = 0x80,
                   square_only: bool = False) -> None:
    """The writer's transpose flips MASK in BYTE of each matrix it writes (the last byte where
    BYTE is None; only square ones with SQUARE_ONLY): the verifier must catch it."""
    real = ex.transpose_bytes

    def flip(src, rows, cols, itemsize, out):
        view = real(src, rows, cols, itemsize, out)
        if rows == cols or not square_only:
            out[rows * cols * itemsize - 1 if byte is None else byte] ^= mask
        return view

    monkeypatch.setattr(ex, "transpose_bytes", flip)


def _convert(runner, src, dst, *extra):
    return runner("to-linear", src, "-o", dst, "--layers", "*.attn.*.weight", *extra)


def test_clean_conversion_is_verified_by_the_second_process(runner, elsewhere, gpt2_like,
                                                           tmp_path):
    src, sd = gpt2_like
    dst = tmp_path / "o.safetensors"
    res = _convert(runner, src, dst, "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.stderr
    assert len(elsewhere) == 1 and elsewhere[0].proc.returncode is not None
    assert "verification ran in this process" not in res.stderr
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    layers = [r for r in report["verification"]["results"] if r["kind"] == "layer"]
    assert len(layers) == 4 and all(r["passed"] and r["bit_exact"] for r in layers)
    out = load_file(dst)
    assert torch.equal(out["h.1.attn.c_proj.weight"], sd["h.1.attn.c_proj.weight"].T)
    assert torch.equal(out["wte.weight"], sd["wte.weight"])


def test_a_bad_transpose_in_the_writer_fails_in_the_second_process(runner, elsewhere, gpt2_like,
                                                                   tmp_path, monkeypatch):
    plant_bit_flip(monkeypatch, 5, 0x01, square_only=True)  # the square c_proj weights
    dst = tmp_path / "o.safetensors"
    res = _convert(runner, src := gpt2_like[0], dst)
    assert res.exit_code == 1, res.stderr
    assert "h.0.attn.c_proj.weight" in res.stderr and "nothing was written" in res.stderr
    assert len(elsewhere) == 1
    assert not dst.exists() and not [p for p in src.parent.iterdir() if p.name.startswith(".")]


def test_a_copied_tensor_written_wrong_fails_in_the_second_process(runner, elsewhere, gpt2_like,
                                                                   tmp_path, monkeypatch):
    real = ex._stream_piece

    def zero_embedding(key, dtype, piece, ckpt, sink, inbuf, outbuf):
        if key != "wte.weight":
            return real(key, dtype, piece, ckpt, sink, inbuf, outbuf)
        sink.write(key, bytes(300 * 64 * 4))

    monkeypatch.setattr(ex, "_stream_piece", zero_embedding)
    dst = tmp_path / "o.safetensors"
    res = _convert(runner, gpt2_like[0], dst)
    assert res.exit_code == 1 and "wte.weight" in res.stderr and not dst.exists()


def test_pt_output_is_verified_by_the_second_process_once_finished(runner, elsewhere,
                                                                   gpt2_like, tmp_path,
                                                                   monkeypatch):
    dst = tmp_path / "o.pt"
    res = _convert(runner, gpt2_like[0], dst)
    assert res.exit_code == 0, res.stderr
    assert len(elsewhere) == 1
    assert torch.load(dst, weights_only=True).keys() == gpt2_like[1].keys()
    plant_bit_flip(monkeypatch)
    dst.unlink()
    res = _convert(runner, gpt2_like[0], dst)
    assert res.exit_code == 1 and "c_attn.weight" in res.stderr and not dst.exists()


def test_a_second_process_that_dies_leaves_the_check_to_this_one(runner, elsewhere, gpt2_like,
                                                                 tmp_path, monkeypatch):
    monkeypatch.setattr(vw.VerifyProcess, "COMMAND", (sys.executable, "-c", "pass"))
    monkeypatch.setattr(api, "_verify_written", REAL_VERIFY_WRITTEN)
    dst = tmp_path / "o.safetensors"
    res = _convert(runner, gpt2_like[0], dst)
    assert res.exit_code == 0, res.stderr
    assert "verification ran in this process" in res.stderr
    plant_bit_flip(monkeypatch)
    res = _convert(runner, gpt2_like[0], dst, "--overwrite")
    assert res.exit_code == 1 and "h.0.attn.c_attn.weight" in res.stderr


def test_a_second_process_that_cannot_start_leaves_the_check_to_this_one(runner, elsewhere,
                                                                         gpt2_like, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(vw.VerifyProcess, "COMMAND", (str(tmp_path / "no-such-python"),))
    monkeypatch.setattr(api, "_verify_written", REAL_VERIFY_WRITTEN)
    res = _convert(runner, gpt2_like[0], tmp_path / "o.safetensors")
    assert res.exit_code == 0 and "could not be started" in res.stderr


def test_no_second_process_for_no_verify_dry_run_or_a_process_with_torch(runner, gpt2_like,
                                                                        tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(vw, "VerifyProcess", lambda: started.append(1))
    dst = tmp_path / "o.safetensors"
    assert _convert(runner, gpt2_like[0], dst).exit_code == 0  # torch is imported here
    monkeypatch.setattr(api, "_torch_imported", lambda: False)
    assert _convert(runner, gpt2_like[0], dst, "--overwrite", "--no-verify").exit_code == 0
    assert _convert(runner, gpt2_like[0], dst, "--overwrite", "--dry-run").exit_code == 0
    import convert

    convert.to_linear(gpt2_like[0], tmp_path / "api.safetensors", layers=["*.attn.*.weight"])
    assert started == []  # a script's conversions verify in their own process


def test_the_reply_is_read_with_an_allow_list():
    hostile = pickle.dumps(("report", os.system))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        vw._ReportUnpickler(io.BytesIO(hostile)).load()
    from convert.verify.report import CheckResult, VerifyReport

    report = VerifyReport("a", "b", "cpu", "plan", "the plan",
                          results=[CheckResult("k", "k", "layer", True)])
    back = vw._ReportUnpickler(io.BytesIO(pickle.dumps(("report", report)))).load()[1]
    assert back.results[0].name == "k" and back.equivalent


def test_a_final_header_unlike_the_verified_one_fails(tmp_path):
    a = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(2, 3), "y": torch.zeros(4)}, str(a))
    progress = vw._Progress()
    progress.done = True
    dst = vw._growing_source(a, [a], progress)
    assert vw._final_headers_match(dst, [a]) == []
    save_file({"x": torch.zeros(3, 2), "y": torch.zeros(4)}, str(a))  # same size, other shape
    failures = vw._final_headers_match(dst, [a])
    assert [f.name for f in failures] == ["x"] and not failures[0].passed
    dst.close()


def test_the_second_process_ends_when_this_one_goes(tmp_path):
    """No job, no report: closing the pipe ends it, quietly (Ctrl-C in the parent)."""
    proc = subprocess.Popen([sys.executable, "-m", "convert.verify.worker"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(0.2)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stdout.read() == b"" and proc.stderr.read() == b""
    proc.stdout.close()
    proc.stderr.close()


def test_the_command_line_verifies_in_a_second_process(tmp_path, gpt2_like):
    """`linconvert` from a shell: torch is not imported in it, the check runs beside it."""
    dst = tmp_path / "o.safetensors"
    proc = subprocess.run([sys.executable, "-m", "convert", "to-linear", str(gpt2_like[0]), "-o",
                           str(dst), "--layers", "*.attn.*.weight", "-v"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "verification ran in this process" not in proc.stderr
    assert "verified" in proc.stderr + proc.stdout


def test_the_byte_proofs_find_a_flipped_bit(gpt2_like, tmp_path):
    """The numpy checks made while the file is written (before torch is needed) are the
    bit-exact checks the report then gives: right where the bytes are, wrong where one bit is."""
    from convert.checkpoint import open_checkpoint
    from convert.verify import pair_keys

    sd = gpt2_like[1]
    src, dst = _flipped_output(gpt2_like, tmp_path)
    with open_checkpoint(src) as s, open_checkpoint(dst) as d:
        pairs = pair_keys(s, d, api.selection_from(None, {"layers": ["*.attn.*.weight"]}))[0]
    job = {"src": str(src), "state_dict_key": None, "allow_globals": [], "display": str(dst),
           "paths": [str(dst)], "pairs": pairs}
    progress = vw._Progress()
    progress.done = True
    proofs = vw._Proofs(job, progress)
    proofs.run()
    wrong = sorted(t for (s_, t), ok in proofs.results.items() if not ok)
    assert wrong == ["h.1.attn.c_attn.weight", "wte.weight"]
    assert len(proofs.results) == len(sd)


def test_the_growing_file_is_opened_once_its_header_is_written(tmp_path):
    """A direct-I/O writer holds the header in its buffer until the buffer is full: the
    verifier waits for the bytes instead of reading a file that is still empty."""
    import threading

    full = tmp_path / "full.safetensors"
    save_file({"x": torch.arange(6.0).reshape(2, 3)}, str(full))
    data = full.read_bytes()
    path = tmp_path / "growing.safetensors"
    path.write_bytes(b"")
    progress = vw._Progress()
    opened = []
    t = threading.Thread(target=lambda: opened.append(vw._growing_source(path, [path],
                                                                        progress)))
    t.start()
    time.sleep(0.2)
    assert not opened  # nothing to read yet: it waits
    path.write_bytes(data)
    with progress.cond:
        progress.sizes[0] = len(data)
        progress.cond.notify_all()
    t.join(10)
    dst = opened[0]
    assert torch.equal(dst.tensor("x"), torch.arange(6.0).reshape(2, 3))
    dst.close()



def test_code_in_the_folder_linconvert_runs_in_is_not_imported(tmp_path, gpt2_like):
    """A downloaded model's folder with a numpy.py (or torch/, convert/) in it: the verifying
    process does not put the folder on sys.path, so nothing there runs."""
    import shutil

    here = tmp_path / "model"
    here.mkdir()
    marker = tmp_path / "ran"
    for name in ("numpy.py", "torch.py"):
        (here / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n"
                                 "raise SystemExit('hostile')\n")
    (here / "convert").mkdir()
    (here / "convert" / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('pkg')\n")
    exe = shutil.which("linconvert", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("needs the linconvert console script of this environment")
    proc = subprocess.run([exe, "to-linear", str(gpt2_like[0]), "-o",
                           str(tmp_path / "o.safetensors"), "--layers", "*.attn.*.weight"],
                          cwd=here, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), marker.read_text()
    assert "verification ran in this process" not in proc.stderr
    assert "Traceback" not in proc.stderr


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "little") + payload


def test_dotted_names_cannot_reach_past_the_allow_list():
    def short(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    for name in ("CheckResult.__init__", "describe_failures.__builtins__.get"):
        data = b"\x80\x04" + short("convert.verify.report") + short(name) + b"\x93."
        with pytest.raises(pickle.UnpicklingError, match="sent convert.verify.report"):
            vw._ReportUnpickler(io.BytesIO(data)).load()


def test_a_frame_the_child_cannot_read_ends_it_quietly():
    proc = subprocess.Popen(list(vw.VerifyProcess.COMMAND), cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(_frame(b"not a pickle"))
    proc.stdin.flush()
    assert proc.wait(timeout=60) == 0  # the parent is broken: it waits for no job
    assert proc.stdout.read() == b"" and proc.stderr.read() == b""
    for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()


def test_a_child_that_fails_leaves_the_check_to_this_process(runner, elsewhere, gpt2_like,
                                                             tmp_path, monkeypatch):
    script = ("import pickle, sys; d = pickle.dumps(('crash', 'ImportError: no torch here'));"
              "sys.stdout.buffer.write(len(d).to_bytes(8, 'little') + d)")
    monkeypatch.setattr(vw.VerifyProcess, "COMMAND", (sys.executable, "-c", script))
    monkeypatch.setattr(api, "_verify_written", REAL_VERIFY_WRITTEN)
    res = _convert(runner, gpt2_like[0], tmp_path / "o.safetensors")
    assert res.exit_code == 0, res.stderr
    assert "verification ran in this process" in res.stderr and "no torch here" in res.stderr


def test_a_refused_conversion_does_not_wait_for_the_child(runner, elsewhere, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    res = runner("to-linear", bad, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 4, res.stderr
    assert len(elsewhere) == 1
    import signal

    assert elsewhere[0].proc.returncode == -signal.SIGKILL  # killed, not waited for


def test_sharded_output_is_verified_by_the_second_process(runner, elsewhere, gpt2_like,
                                                          tmp_path, monkeypatch):
    out = tmp_path / "shards"
    res = _convert(runner, gpt2_like[0], out, "--max-shard-size", "40KB")
    assert res.exit_code == 0, res.stderr
    assert len(list(out.glob("*.safetensors"))) > 3 and len(elsewhere) == 1
    plant_bit_flip(monkeypatch, None, 0x40, square_only=True)
    res = _convert(runner, gpt2_like[0], tmp_path / "shards2", "--max-shard-size", "40KB")
    assert res.exit_code == 1 and "c_proj.weight" in res.stderr
    assert not (tmp_path / "shards2").exists() or not list((tmp_path / "shards2").iterdir())


@pytest.mark.parametrize("kind", ["pt", "dcp"])
def test_pt_and_dcp_sources_are_verified_by_the_second_process(runner, elsewhere, gpt2_like,
                                                               tmp_path, monkeypatch, kind):
    """The child opens SRC itself: a torch.save file, a DCP folder written by torch's own
    dcp.save; a planted fault is still caught there."""
    import warnings

    sd = gpt2_like[1]
    if kind == "pt":
        src = tmp_path / "ckpt.pt"
        torch.save(sd, src)
    else:
        import torch.distributed.checkpoint as dcp

        src = tmp_path / "dcp"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({k: v.clone() for k, v in sd.items()}, checkpoint_id=src)
    dst = tmp_path / "o.safetensors"
    res = _convert(runner, src, dst)
    assert res.exit_code == 0, res.stderr
    assert len(elsewhere) == 1
    assert torch.equal(load_file(dst)["h.0.attn.c_attn.weight"], sd["h.0.attn.c_attn.weight"].T)
    plant_bit_flip(monkeypatch)
    res = _convert(runner, src, tmp_path / "o2.safetensors")
    assert res.exit_code == 1 and "c_attn.weight" in res.stderr


FORKED_PROVER = r"""
import json, os, pickle, sys
from convert.checkpoint import open_checkpoint
from convert.verify import pair_keys
from convert import api
from convert.verify import worker as vw

src, dst, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
with open_checkpoint(src) as s, open_checkpoint(dst) as d:
    pairs = pair_keys(s, d, api.selection_from(None, {"layers": ["*.attn.*.weight"]}))[0]
prover = vw._Prover.fork()
mirror = vw._Proofs.made_elsewhere(prover.results)
if kill:
    prover.end()
job = {"src": src, "state_dict_key": None, "allow_globals": [], "display": dst,
       "paths": [dst], "pairs": pairs, "growing": True}
for message in (("job", job), ("written", 0, os.path.getsize(dst)), ("done",)):
    prover.send(pickle.dumps(message))
got = {p.target: mirror.get((p.source, p.target)) for p in pairs}
prover.end()
print(json.dumps({"got": got}))
"""


def _flipped_output(gpt2_like, tmp_path):
    """GPT2_LIKE converted by hand, with one bit flipped in a transposed weight and one in a
    copied tensor."""
    src, sd = gpt2_like
    out = {k: (v.T.contiguous() if ".attn." in k and k.endswith("weight") else v)
           for k, v in sd.items()}
    out["h.1.attn.c_attn.weight"] = out["h.1.attn.c_attn.weight"].clone()
    out["h.1.attn.c_attn.weight"].view(torch.int32)[7, 9] ^= 1
    out["wte.weight"] = out["wte.weight"].clone()
    out["wte.weight"].view(torch.int32)[299, 63] ^= 1 << 30
    dst = tmp_path / "o.safetensors"
    save_file(out, str(dst))
    return src, dst


def test_the_forked_byte_checks_send_back_what_they_find(gpt2_like, tmp_path):
    """The byte checks run in a process forked from the verifying one (no GIL shared with its
    import of torch): it hears the parent's frames, and its results, a flipped bit among
    them, come back for the layer checks to take."""
    import json

    src, dst = _flipped_output(gpt2_like, tmp_path)
    proc = subprocess.run([sys.executable, "-c", FORKED_PROVER, str(src), str(dst), "keep"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    wrong = sorted(k for k, ok in out["got"].items() if ok is False)
    assert wrong == ["h.1.attn.c_attn.weight", "wte.weight"]
    assert all(ok is True for k, ok in out["got"].items() if k not in wrong)
    assert len(out["got"]) == len(gpt2_like[1])


def test_byte_checks_whose_process_died_are_left_to_the_layer_checks(gpt2_like, tmp_path):
    """A forked checker that is gone answers nothing (None: the layer checks make the
    bit-exact check themselves) and nobody waits for it."""
    import json

    src, dst = _flipped_output(gpt2_like, tmp_path)
    proc = subprocess.run([sys.executable, "-c", FORKED_PROVER, str(src), str(dst), "kill"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["got"].values()) == {None}


def test_results_from_another_process_are_plain_data_only():
    """What the forked checker sends is read with no classes at all."""
    r, w = os.pipe()
    with os.fdopen(w, "wb") as out:
        vw._send(out, ("made", ("a", "b"), True))
        vw._send(out, ("made", ("c", "d"), os.system))
    mirror = vw._Proofs.made_elsewhere(os.fdopen(r, "rb"))
    assert mirror.get(("a", "b")) is True
    assert mirror.get(("c", "d")) is None  # the stream ended at the frame it could not read


@pytest.mark.parametrize("args, starts", [
    (["to-linear", "a.safetensors"], True),
    (["-q", "to-linear", "a.safetensors"], True),
    (["to-param", "a.pt", "-o", "b.pt"], True),
    (["export", "a.pt", "-o", "b.safetensors"], True),
    (["to-linear", "a.safetensors", "--no-verify"], False),
    (["to-linear", "a.safetensors", "--dry-run"], False),
    (["to-linear", "a.safetensors", "-o", "b.onnx"], False),
    (["export", "a.pt", "-o", "b", "--format", "onnx"], False),
    (["to-linear", "--help"], False),
    (["inspect", "a.safetensors"], False),
    (["batch", "a.safetensors"], False),
    ([], False),
])
def test_the_command_line_starts_its_verifier_before_planning(monkeypatch, args, starts):
    """As it starts, the command line starts the verifying process of a conversion that will
    verify (torch imports there while this one plans); none where it will not."""
    from convert import cli

    monkeypatch.setattr(cli, "_torch_imported", lambda: False)  # as from a shell
    monkeypatch.setattr(vw, "VerifyProcess", lambda: "started")
    assert (cli._early_verifier(args) == "started") is starts


class _FakeVerifier:
    """Stands for the early verifying process: records how it was ended."""

    def __init__(self):
        self.ends = []
        _FakeVerifier.made.append(self)

    def close(self, *, kill=False):
        self.ends.append(kill)


@pytest.mark.parametrize("case", ["missing SRC", "corrupt SRC"])
def test_an_early_verifier_is_killed_when_the_command_fails(monkeypatch, tmp_path, case):
    """A refusal before the conversion takes the early verifier (click's own usage error)
    or after (a corrupt SRC): the command line kills it on its way out."""
    from convert import cli

    _FakeVerifier.made = []
    monkeypatch.setattr(cli, "_torch_imported", lambda: False)
    monkeypatch.setattr(api, "_torch_imported", lambda: False)
    monkeypatch.setattr(vw, "VerifyProcess", _FakeVerifier)
    src = tmp_path / "bad.safetensors"
    if case == "corrupt SRC":
        src.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    code = cli.run(["to-linear", str(src), "-o", str(tmp_path / "o.safetensors")])
    assert code == (2 if case == "missing SRC" else 4)
    assert len(_FakeVerifier.made) == 1 and _FakeVerifier.made[0].ends[-1] is True
    assert not (tmp_path / "o.safetensors").exists()


def test_the_layer_checks_take_the_forked_checks_results(runner, elsewhere, gpt2_like,
                                                         tmp_path, monkeypatch):
    """End to end: in the verifying process, the layer checks make no bit-exact check of
    their own (a sitecustomize makes that check raise there): the forked process's results
    pass a clean conversion and fail a flipped bit, naming the weight."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib\n"
        "layers = importlib.import_module('convert.verify.layers')\n"
        "def refuse(*args):\n"
        "    raise RuntimeError('the layer checks made a byte check of their own')\n"
        "layers._transposed_bits_equal = refuse\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    res = _convert(runner, gpt2_like[0], tmp_path / "o.safetensors")
    assert res.exit_code == 0, res.stderr
    plant_bit_flip(monkeypatch)
    res = _convert(runner, gpt2_like[0], tmp_path / "o2.safetensors")
    assert res.exit_code == 1, res.stderr
    assert "c_attn.weight" in res.stderr and not (tmp_path / "o2.safetensors").exists()
