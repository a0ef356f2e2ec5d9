"""The command line: exit codes, stdout (data) vs stderr (diagnostics), nothing partial."""

from __future__ import annotations

import fractions
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_dry_run_prints_the_plan_and_writes_nothing(fixture_dir, runner):
    before = _files(fixture_dir)
    report = fixture_dir.parent / "plan.json"
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "--dry-run", "--report", report)
    assert res.exit_code == 0, res.stderr
    assert "transpose  fc1.weight" in res.stdout
    assert "4x6 -> 6x4" in res.stdout
    assert _files(fixture_dir) == before
    data = json.loads(report.read_text())
    assert data["dry_run"] is True
    assert [a["action"] for a in data["plan"]["actions"]] == ["transpose", "keep"] * 2


def test_default_destination_and_summary_on_stderr(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "mlp_param.safetensors")
    assert res.exit_code == 0, res.stderr
    dst = fixture_dir / "mlp_param.linear.safetensors"
    assert res.stdout.strip() == str(dst)
    assert "2 transposed" in res.stderr
    assert oct(dst.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not any(p.name.endswith(".partial") for p in fixture_dir.iterdir())
    # the reverse needs no options and lands at NAME.param.EXT
    res = runner("to-param", dst)
    assert res.exit_code == 0, res.stderr
    a = load_file(fixture_dir / "mlp_param.safetensors")
    b = load_file(fixture_dir / "mlp_param.param.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_quiet_silences_stderr(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "o.pt", "-q")
    assert res.exit_code == 0
    assert res.stderr == ""


def test_inspect_json(fixture_dir, runner):
    res = runner("inspect", fixture_dir / "square_nobias.safetensors", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    layouts = {t["key"]: t["layout"] for t in data["tensors"]}
    assert layouts == {"proj.weight": "ambiguous", "out.weight": "ambiguous"}
    res = runner("inspect", fixture_dir / "mlp_linear.safetensors")
    assert "linear" in res.stdout and "out x in" in res.stdout
    res = runner("inspect", fixture_dir / "seed000_W.pt", "--json")
    assert json.loads(res.stdout)["tensors"][0]["layout"] == "other"


def test_inspect_training_checkpoint_lists_extras(fixture_dir, runner):
    res = runner("inspect", fixture_dir / "training.pt")
    assert res.exit_code == 0
    assert "extras: optimizer, epoch" in res.stdout


def test_presets(runner):
    res = runner("presets")
    assert res.exit_code == 0
    names = [line.split("\t")[0] for line in res.stdout.splitlines()]
    assert names == ["flax", "gpt-neox-qkv", "gpt2", "gpt2-qkv", "keras", "mixtral", "mixtral-hub",
                     "qwen-moe", "wb"]
    assert "c_attn" in runner("presets", "gpt2").stdout
    assert runner("presets", "nope").exit_code == 2


def test_square_refused_then_converted(fixture_dir, runner):
    src = fixture_dir / "square_nobias.safetensors"
    res = runner("to-linear", src)
    assert res.exit_code == 2
    assert "'out.weight', 'proj.weight'" in res.stderr and "--layers" in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    res = runner("to-linear", src, "--layers", "proj.weight", "--layers", "out.weight")
    assert res.exit_code == 0, res.stderr


def test_double_transpose_refused(fixture_dir, runner):
    src = fixture_dir / "mlp_param.safetensors"
    assert runner("to-linear", src, "-o", fixture_dir / "a.safetensors").exit_code == 0
    res = runner("to-linear", fixture_dir / "a.safetensors", "-o", fixture_dir / "b.safetensors")
    assert res.exit_code == 2 and "twice" in res.stderr
    assert not (fixture_dir / "b.safetensors").exists()


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["to-linear", "{d}/missing.pt"], 2, "does not exist"),
    (["to-linear", "{d}/junk.txt"], 4, "not a checkpoint"),
    (["to-linear", "{d}/junk.safetensors"], 4, "not a valid safetensors"),
    (["to-linear", "{d}/junk.pt"], 4, "not a readable torch checkpoint"),
    (["to-linear", "{d}/mlp_param.pt", "-o", "{d}/out.xyz"], 2, "unknown suffix"),
    (["to-linear", "{d}/mlp_param.pt", "-o", "{d}/mlp_param.pt"], 2, "same path"),
    (["to-linear", "{d}/mlp_param.pt", "-o", "{d}/existing.pt"], 5, "--overwrite"),
    (["to-linear", "{d}/mlp_param.pt", "-o", "{d}/nofolder/x.pt"], 5, "does not exist"),
    (["to-linear", "{d}/mlp_param.pt", "--layers", "nothing*"], 2, "matches no key"),
    (["to-linear", "{d}/mlp_param.pt", "--rename", "(", "x"], 2, "regular expression"),
    (["to-linear", "{d}/mlp_param.pt", "--format", "pt", "-o", "{d}/x.safetensors"], 2,
     "contradicts"),
    (["to-linear", "{d}/mlp_param.pt", "--bogus"], 2, "No such option"),
    (["to-linear", "{d}/mlp_linear.safetensors"], 2, "already in the linear layout"),
    (["to-linear", "{d}/mlp_param.pt", "--rename", ".*", "same"], 2, "both be renamed"),
    (["to-linear", "{d}/mlp_param.pt", "--state-dict-key", "nope"], 2, "no key 'nope'"),
])
def test_bad_input_gets_its_exit_code_and_one_sentence(fixture_dir, runner, args, code, needle):
    (fixture_dir / "junk.txt").write_text("hello\n")
    (fixture_dir / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    (fixture_dir / "junk.pt").write_bytes(b"PK\x03\x04 truncated zip")
    (fixture_dir / "existing.pt").write_bytes(b"keep me")
    before = {p.name: p.read_bytes() for p in fixture_dir.iterdir()}
    res = runner(*[a.format(d=fixture_dir) for a in args])
    assert res.exit_code == code, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len([line for line in res.stderr.splitlines() if "rror:" in line]) == 1
    after = {p.name: p.read_bytes() for p in fixture_dir.iterdir()}
    assert after == before  # nothing written, nothing changed


def test_unsafe_pickle_global_refused_and_allowed_explicitly(tmp_path, runner):
    src = tmp_path / "evil.pt"
    torch.save({"model": {"l.weight": torch.randn(3, 5), "l.bias": torch.randn(5)},
                "ratio": fractions.Fraction(1, 3)}, src)
    res = runner("to-linear", src, "-o", tmp_path / "o.pt")
    assert res.exit_code == 3, res.stderr
    assert "fractions.Fraction" in res.stderr and "--allow-global" in res.stderr
    assert not (tmp_path / "o.pt").exists()
    res = runner("to-linear", src, "-o", tmp_path / "o.pt", "--allow-global", "fractions.Fraction")
    assert res.exit_code == 0, res.stderr
    # the allow-list was per load: a later load without it is refused again
    assert runner("inspect", src).exit_code == 3


def test_overwrite_replaces(fixture_dir, runner):
    dst = fixture_dir / "o.safetensors"
    dst.write_bytes(b"old")
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", dst, "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert set(load_file(dst)) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_rules_file(fixture_dir, runner, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('layers = ["*.weight"]\n[[rename]]\nfrom = \'^proj\\.\'\nto = "p."\n')
    res = runner("to-linear", fixture_dir / "square_nobias.safetensors", "--rules", rules,
                 "-o", fixture_dir / "o.safetensors")
    assert res.exit_code == 0, res.stderr
    assert set(load_file(fixture_dir / "o.safetensors")) == {"p.weight", "out.weight"}


def test_drop(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "o.safetensors",
                 "--drop", "fc2.*", "--dry-run")
    assert res.exit_code == 0
    assert "drop       fc2.weight" in res.stdout


def test_internal_error_is_70_with_one_line(monkeypatch, fixture_dir, runner):
    import convert.execute

    def boom(*a, **k):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(convert.execute, "apply_plan", boom)
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "o.pt")
    assert res.exit_code == 70
    assert "planted bug" in res.stderr and "Traceback" not in res.stderr
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "o.pt", "-v")
    assert res.exit_code == 70 and "Traceback" in res.stderr


def test_help_does_not_import_torch():
    code = ("import sys; from convert.cli import run; run(['--help']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_inspect_safetensors_does_not_import_torch(fixture_dir):
    code = (f"import sys; from convert.cli import run; run(['inspect', "
            f"'{fixture_dir / 'mlp_param.safetensors'}']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_closed_stdout_ends_quietly(tmp_path):
    sd = {f"l{i}.weight": torch.zeros(3, 5) for i in range(3000)}
    src = tmp_path / "many.safetensors"
    save_file(sd, str(src))
    proc = subprocess.run(f"'{sys.executable}' -m convert inspect '{src}' | head -n 1",
                          shell=True, capture_output=True, text=True)
    assert proc.stdout.startswith(str(src))
    assert proc.stderr == ""
