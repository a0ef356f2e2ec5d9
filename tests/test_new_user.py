"""Defects a new user hit (issue 19): each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file, save_file

import convert

MODELS = Path(__file__).resolve().parent.parent / "fixtures" / "models.py"


def _one_line(stderr: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("linconvert: error: ")


# 1. A false "verified" -----------------------------------------------------------------------

def test_an_opset_onnxruntime_cannot_run_is_refused_before_writing(fixture_dir, runner):
    for flags in ([], ["--dry-run"]):
        res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "x.onnx",
                     "--opset", "99", *flags)
        assert res.exit_code == 2 and _one_line(res.stderr), res.stderr
        assert "--opset 99" in res.stderr and "onnxruntime" in res.stderr
        assert not (fixture_dir / "x.onnx").exists()


def test_verify_of_an_onnx_file_onnxruntime_cannot_load_is_not_equivalent(fixture_dir, runner):
    dst = fixture_dir / "x.onnx"
    convert.to_linear(fixture_dir / "mlp_param.pt", dst)
    model = onnx.load(dst)
    model.opset_import[0].version = 99  # what onnxruntime refuses to load
    onnx.save(model, dst)
    res = runner("verify", fixture_dir / "mlp_param.pt", dst)
    assert res.exit_code == 1, res.stdout + res.stderr
    assert "could not run" in res.stdout and "NOT equivalent" in res.stdout


# 2. User errors reported as internal bugs ----------------------------------------------------

def test_a_wrong_input_shape_is_a_usage_error_in_verify(fixture_dir, runner):
    res = runner("verify", fixture_dir / "mlp_param.pt", fixture_dir / "mlp_linear.safetensors",
                 "--source-model", f"{MODELS}:build_param_mlp",
                 "--target-model", f"{MODELS}:build_linear_mlp", "--input-shape", "4,784")
    assert res.exit_code == 2 and _one_line(res.stderr), res.stderr
    assert "4x784" in res.stderr and "'fc1'" in res.stderr and "4x6" in res.stderr


def test_a_wrong_input_shape_is_a_usage_error_in_an_onnx_export(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "m.onnx",
                 "--model", f"{MODELS}:build_linear_mlp", "--input-shape", "1,784")
    assert res.exit_code == 2 and _one_line(res.stderr), res.stderr
    assert "takes 4 features" in res.stderr
    assert not list(fixture_dir.glob("*onnx*"))


# 4. Paths ------------------------------------------------------------------------------------

def test_a_trailing_slash_means_a_folder(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "mlp_param.safetensors", "-o",
                 f"{fixture_dir}/gpt2.param/")
    assert res.exit_code == 0, res.stderr
    folder = fixture_dir / "gpt2.param"
    assert (folder / "model.safetensors.index.json").is_file()
    assert load_file(folder / "model-00001-of-00001.safetensors")["fc1.weight"].shape == (6, 4)


def test_a_sharded_file_prints_and_reports_its_index(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "mlp_param.safetensors", "-o",
                 fixture_dir / "y.safetensors", "--max-shard-size", "1GB")
    assert res.exit_code == 0, res.stderr
    index = fixture_dir / "y.safetensors.index.json"
    assert res.stdout.strip() == str(index) and index.is_file()
    assert f"'{index}'" in res.stderr


# 5. Silent successes -------------------------------------------------------------------------

def test_batch_of_nothing_is_a_usage_error(tmp_path, runner):
    (tmp_path / "empty").mkdir()
    res = runner("batch", tmp_path / "empty", "--direction", "to-linear")
    assert res.exit_code == 2 and _one_line(res.stderr), res.stderr
    assert "no checkpoint" in res.stderr


def test_negative_or_nan_tolerances_are_refused(fixture_dir, runner):
    for flag, value in (("--atol", "-1"), ("--rtol", "-0.5"), ("--atol", "nan")):
        res = runner("verify", fixture_dir / "mlp_param.pt", fixture_dir / "mlp_linear.safetensors",
                     flag, value)
        assert res.exit_code == 2, (flag, value, res.stdout, res.stderr)


def test_keys_that_pair_with_nothing_say_which_rename_would(fixture_dir, runner):
    sd = load_file(fixture_dir / "mlp_linear.safetensors")
    save_file({f"model.{k}": v for k, v in sd.items()}, str(fixture_dir / "renamed.safetensors"))
    res = runner("verify", fixture_dir / "mlp_param.pt", fixture_dir / "renamed.safetensors")
    assert res.exit_code == 2 and _one_line(res.stderr), res.stdout + res.stderr
    assert "no key" in res.stderr and "--rename '^' 'model.'" in res.stderr
    res = runner("verify", fixture_dir / "mlp_param.pt", fixture_dir / "renamed.safetensors",
                 "--rename", "^", "model.")
    assert res.exit_code == 0, res.stdout + res.stderr


def test_pairs_from_a_rename_in_the_other_direction(fixture_dir, runner):
    sd = {f"transformer.{k}": v for k, v in load_file(fixture_dir /
                                                       "mlp_param.safetensors").items()}
    torch.save(sd, fixture_dir / "prefixed.pt")
    res = runner("verify", fixture_dir / "prefixed.pt", fixture_dir / "mlp_linear.safetensors")
    assert res.exit_code == 2 and r"--rename '^transformer\.' ''" in res.stderr, res.stderr


# 6. Exporting an already converted checkpoint ------------------------------------------------

def test_export_writes_another_format_with_the_layout_kept(fixture_dir, runner):
    lin = fixture_dir / "mlp_linear.safetensors"
    res = runner("to-linear", lin, "-o", fixture_dir / "x.onnx")
    assert res.exit_code == 2 and "linconvert export" in res.stderr
    res = runner("export", lin, "-o", fixture_dir / "x.onnx")
    assert res.exit_code == 0 and "verified equivalent" in res.stderr, res.stderr
    graph = onnx.load(fixture_dir / "x.onnx")
    assert [n.op_type for n in graph.graph.node] == ["Gemm", "Gemm"]  # nn.Linear layers
    res = runner("verify", lin, fixture_dir / "x.onnx")
    assert res.exit_code == 0, res.stdout
    res = runner("export", lin, "-o", fixture_dir / "x.pt")
    assert res.exit_code == 0, res.stderr
    back = torch.load(fixture_dir / "x.pt", weights_only=True)
    for k, v in load_file(lin).items():
        assert torch.equal(back[k], v), k


def test_an_exported_file_converts_by_its_evidence(fixture_dir, runner):
    res = runner("export", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "p.safetensors")
    assert res.exit_code == 0, res.stderr
    assert runner("to-param", fixture_dir / "p.safetensors", "-o",
                  fixture_dir / "q.safetensors").exit_code == 2  # already param: provenance
    res = runner("to-linear", fixture_dir / "p.safetensors", "-o", fixture_dir / "l.safetensors")
    assert res.exit_code == 0, res.stderr
    want = load_file(fixture_dir / "mlp_linear.safetensors")
    got = load_file(fixture_dir / "l.safetensors")
    assert got["fc1.weight"].shape == want["fc1.weight"].shape == (6, 4)


def test_export_needs_a_layout_it_can_tell(fixture_dir, runner):
    sq = fixture_dir / "square_nobias.safetensors"
    res = runner("export", sq, "-o", fixture_dir / "s.onnx")
    assert res.exit_code == 2 and _one_line(res.stderr), res.stderr
    res = runner("export", sq, "-o", fixture_dir / "s.pt", "--layout", "linear")
    assert res.exit_code == 0, res.stderr
    res = runner("export", sq, "-o", fixture_dir / "s.onnx", "--layout", "linear",
                 "--layers", "*.weight")
    assert res.exit_code == 0, res.stderr
    assert runner("export", sq).exit_code == 2  # -o is required


# 7. The hand-written W/b layer ---------------------------------------------------------------

def _wb(tmp: Path, square: bool = False) -> Path:
    g = torch.Generator().manual_seed(3)
    n = 4 if square else 5
    sd = {"l1.W": torch.randn(4, n, generator=g), "l1.b": torch.randn(n, generator=g),
          "l2.W": torch.randn(n, 2, generator=g), "l2.b": torch.randn(2, generator=g)}
    torch.save(sd, tmp / "wb.pt")
    return tmp / "wb.pt"


def test_w_keys_get_the_wb_preset_offered_and_it_loads_into_nn_linear(tmp_path, runner):
    src = _wb(tmp_path)
    res = runner("to-linear", src, "-o", tmp_path / "a.safetensors")
    assert res.exit_code == 0 and "--preset wb" in res.stderr, res.stderr
    res = runner("to-linear", src, "-o", tmp_path / "b.safetensors", "--preset", "wb")
    assert res.exit_code == 0 and "--preset wb" not in res.stderr, res.stderr
    model = torch.nn.Sequential()
    model.add_module("l1", torch.nn.Linear(4, 5))
    model.add_module("l2", torch.nn.Linear(5, 2))
    model.load_state_dict(load_file(tmp_path / "b.safetensors"), strict=True)
    x = torch.randn(3, 4)
    sd = torch.load(src, weights_only=True)
    want = (x @ sd["l1.W"] + sd["l1.b"]) @ sd["l2.W"] + sd["l2.b"]
    torch.testing.assert_close(model(x), want)


def test_a_bare_w_warning_offers_the_preset(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "seed000_W.pt", "--layers", "W", "--preset", "wb",
                 "-o", fixture_dir / "w.safetensors")
    assert res.exit_code == 0, res.stderr
    assert list(load_file(fixture_dir / "w.safetensors")) == ["weight"]


def test_model_with_other_names_says_which_rename_matches(tmp_path, runner):
    src = _wb(tmp_path, square=True)
    (tmp_path / "mine.py").write_text(
        "import torch\n\ndef build():\n    m = torch.nn.Sequential()\n"
        "    m.add_module('l1', torch.nn.Linear(4, 4))\n"
        "    m.add_module('l2', torch.nn.Linear(4, 2))\n    return m\n")
    res = runner("to-linear", src, "-o", tmp_path / "o.safetensors", "--model",
                 f"{tmp_path / 'mine.py'}:build")
    assert res.exit_code == 2 and _one_line(res.stderr), res.stderr
    assert r"--rename '\.W$' '.weight'" in res.stderr and r"--rename '\.b$' '.bias'" in res.stderr
    res = runner("to-linear", src, "-o", tmp_path / "o.safetensors", "--model",
                 f"{tmp_path / 'mine.py'}:build", "--rename", r"\.W$", ".weight", "--rename",
                 r"\.b$", ".bias")
    assert res.exit_code == 0, res.stderr


def test_the_square_error_suggests_a_pattern_for_all_its_keys(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "square_nobias.safetensors")
    assert res.exit_code == 2 and "--layers '*.weight'" in res.stderr, res.stderr


# 8. Smaller ----------------------------------------------------------------------------------

def test_onnx_external_data_gets_ordinary_permissions(fixture_dir):
    import os
    import stat

    convert.to_linear(fixture_dir / "mlp_param.pt", fixture_dir / "m.onnx", external_data=True)
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    for name in ("m.onnx", "m.onnx.data"):
        assert stat.S_IMODE((fixture_dir / name).stat().st_mode) == want, name


def test_help_names_exit_code_1_and_verbosity_goes_before_the_command(fixture_dir, runner):
    res = runner("--help")
    assert "1 verification found a difference" in " ".join(res.stdout.split())
    res = runner("-q", "to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "o.pt")
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    res = runner("-v", "inspect", fixture_dir / "mlp_param.pt")
    assert res.exit_code == 0


def test_batch_summary_is_one_line_on_stderr_and_q_silences_it(fixture_dir, runner, tmp_path):
    res = runner("batch", fixture_dir / "mlp_param.pt", "--direction", "to-linear",
                 "--out-dir", tmp_path / "o")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.count("\n") == 1 and res.stdout.startswith("converted")
    assert res.stderr.startswith("linconvert: batch: 1 items") and res.stderr.count("\n") == 1
    res = runner("-q", "batch", fixture_dir / "mlp_param.pt", "--direction", "to-linear",
                 "--out-dir", tmp_path / "o", "--force", "--overwrite")
    assert res.exit_code == 0 and res.stderr == "", res.stderr


def test_a_presets_unneeded_rules_are_said_under_v_only(fixture_dir, runner):
    args = ["to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "o.pt", "--preset",
            "gpt2", "--layers", "*.weight", "--overwrite"]
    res = runner(*args)
    assert res.exit_code == 0 and "skipped" not in res.stderr, res.stderr
    res = runner("-v", *args)
    assert res.exit_code == 0 and "linconvert: note:" in res.stderr and "skipped" in res.stderr


def test_a_rename_a_preset_already_made_says_so(fixture_dir, runner):
    res = runner("to-linear", fixture_dir / "seed000_W.pt", "--preset", "wb", "--rename",
                 "^W$", "weight", "-o", fixture_dir / "o.safetensors")
    assert res.exit_code == 2 and "already renamed 'W' to 'weight'" in res.stderr, res.stderr


def test_the_python_api_names_keyword_arguments_not_flags(fixture_dir, runner):
    import pytest

    (fixture_dir / "o.safetensors").write_bytes(b"old")
    with pytest.raises(convert.OutputError, match=r"overwrite=True") as e:
        convert.to_linear(fixture_dir / "mlp_param.pt", fixture_dir / "o.safetensors")
    assert "--overwrite" not in str(e.value)
    with pytest.raises(convert.UsageError, match=r"layers=\['\*\.weight'\]"):
        convert.to_linear(fixture_dir / "square_nobias.safetensors", dry_run=True)
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "o.safetensors")
    assert res.exit_code == 5 and "--overwrite" in res.stderr  # the CLI keeps its words


def test_verify_of_a_round_trip_pairs_by_name_not_by_the_middle_files_provenance(fixture_dir,
                                                                                  runner):
    src = fixture_dir / "mlp_param.safetensors"
    convert.to_linear(src, fixture_dir / "l.safetensors")
    convert.to_param(fixture_dir / "l.safetensors", fixture_dir / "back.safetensors")
    res = runner("verify", src, fixture_dir / "back.safetensors")
    assert res.exit_code == 0, res.stdout
    assert "bit for bit" in res.stdout


def test_progress_is_heard_by_bytes_and_a_batch_says_its_total(fixture_dir, tmp_path):
    from convert.api import convert as run_conversion
    from convert.batching import batch

    heard: list[tuple[int, int]] = []
    run_conversion(fixture_dir / "mlp_param.safetensors", fixture_dir / "o.safetensors",
                   target=convert.Layout.LINEAR, progress=lambda d, t: heard.append((d, t)))
    assert heard[-1] == (204, 204) and heard[0][0] == 0
    totals: list[int] = []
    batch([fixture_dir / "mlp_param.pt", fixture_dir / "mlp_param.safetensors"],
          direction="to-linear", out_dir=tmp_path / "o", on_plan=totals.append)
    assert totals == [2]


def test_a_missing_extra_says_how_to_install_it_from_a_clone():
    import pytest

    from convert.formats import import_extra

    with pytest.raises(convert.UsageError, match=r"pip install -e '\.\[flax\]'"):
        import_extra("no_such_module_here", "Flax msgpack", "flax")
