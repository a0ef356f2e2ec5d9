"""Flax msgpack and Keras 3 weights, made by the real libraries, into nn.Linear twins."""

from __future__ import annotations

import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import convert

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported anywhere

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # keras/numpy 2 chatter


class TorchTwin(nn.Module):
    """The PyTorch model both frameworks' MLPs are ported to."""

    def __init__(self, eps: float, square: bool = False):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(4, 6)
        self.sq = nn.Linear(6, 6) if square else None
        self.norm = nn.LayerNorm(6, eps=eps)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.emb(ids)))
        if self.sq is not None:
            h = self.sq(h)
        return self.fc2(self.norm(h))


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    """Within the verification tolerances (float32, whole model: sqrt(in) = 1)."""
    from convert.verify import compare_outputs, tolerance_for

    rtol, atol = tolerance_for("F32", None, None)
    ok, max_abs, *_ = compare_outputs(actual.detach(), torch.tensor(np.array(expected)),
                                      1, rtol, atol)
    assert ok, f"max abs error {max_abs}"


# --- Flax -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flax_mlp():
    flax = pytest.importorskip("flax")
    jax = pytest.importorskip("jax")
    from flax import linen

    class FlaxMLP(linen.Module):
        @linen.compact
        def __call__(self, ids):
            h = linen.relu(linen.Dense(6, name="fc1")(linen.Embed(10, 4, name="emb")(ids)))
            h = linen.LayerNorm(name="norm")(h)
            return linen.Dense(3, name="fc2")(h)

    model = FlaxMLP()
    ids = np.array([[1, 2, 3, 9], [0, 4, 5, 7]], dtype=np.int32)
    variables = model.init(jax.random.PRNGKey(0), ids)
    return flax, model, variables, ids


def _write_flax(flax_mlp, path, variables=None):
    flax, _, default, _ = flax_mlp
    path.write_bytes(flax.serialization.to_bytes(variables or default))
    return path


def test_flax_mlp_loads_strictly_into_its_torch_twin(flax_mlp, tmp_path, runner):
    _, model, variables, ids = flax_mlp
    src = _write_flax(flax_mlp, tmp_path / "mlp.msgpack")
    res = runner("to-linear", src, "-o", tmp_path / "mlp.safetensors", "--preset", "flax")
    assert res.exit_code == 0, res.stderr
    assert "verified equivalent" in res.stderr
    twin = TorchTwin(eps=1e-6)
    twin.load_state_dict(load_file(tmp_path / "mlp.safetensors"), strict=True)
    _close(twin(torch.from_numpy(ids).long()), model.apply(variables, ids))


def test_flax_to_pt_onnx_and_dry_run(flax_mlp, tmp_path, runner):
    src = _write_flax(flax_mlp, tmp_path / "mlp.msgpack")
    res = runner("to-linear", src, "--preset", "flax", "--dry-run",
                 "--rename", r"^emb\.", "embed.")
    assert res.exit_code == 0 and "params.emb.embedding  embed.weight" in res.stdout
    assert convert.to_linear(src, tmp_path / "m.pt", preset="flax").verification.equivalent
    assert torch.load(tmp_path / "m.pt", weights_only=True)["fc1.weight"].shape == (6, 4)
    assert convert.to_linear(src, tmp_path / "m.onnx", preset="flax").verification.equivalent
    report = convert.to_linear(src, tmp_path / "shards", preset="flax", max_shard_size="100B")
    assert report.verification.equivalent and len(report.files) > 2


def test_flax_chunked_array_is_reassembled(flax_mlp, tmp_path, monkeypatch):
    import flax.serialization

    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 32)  # 8 float32s per chunk
    src = _write_flax(flax_mlp, tmp_path / "chunked.msgpack")
    assert b"__msgpack_chunked_array__" in src.read_bytes()
    convert.to_linear(src, tmp_path / "out.safetensors", preset="flax")
    out = load_file(tmp_path / "out.safetensors")
    kernel = np.asarray(flax_mlp[2]["params"]["fc1"]["kernel"])
    assert torch.equal(out["fc1.weight"], torch.from_numpy(kernel).t())


def test_flax_bfloat16_kept_exactly(flax_mlp, tmp_path):
    import jax
    import jax.numpy as jnp

    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), flax_mlp[2])
    src = _write_flax(flax_mlp, tmp_path / "bf16.msgpack", bf16)
    convert.to_linear(src, tmp_path / "out.safetensors", preset="flax")
    out = load_file(tmp_path / "out.safetensors")
    assert out["fc2.weight"].dtype == torch.bfloat16
    kernel = np.asarray(bf16["params"]["fc2"]["kernel"]).view(np.uint16)
    assert torch.equal(out["fc2.weight"].view(torch.int16),
                       torch.from_numpy(kernel.astype(np.int16)).t())


def test_broken_msgpack_files(flax_mlp, tmp_path, runner):
    import msgpack

    good = _write_flax(flax_mlp, tmp_path / "good.msgpack").read_bytes()
    cases = {
        "truncated.msgpack": good[: len(good) // 2],
        "garbage.msgpack": b"\xc1\xc1\xc1 not msgpack",
        "ext.msgpack": msgpack.packb({"params": {"w": msgpack.ExtType(5, b"boom")}}),
        "liar.msgpack": msgpack.packb({"params": {"w": msgpack.ExtType(
            1, msgpack.packb(((1000, 1000), "float32", b"\0" * 16), use_bin_type=True))}}),
        "list.msgpack": msgpack.packb([1, 2, 3]),
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        res = runner("to-linear", tmp_path / name, "-o", tmp_path / "o.safetensors",
                     "--preset", "flax")
        assert res.exit_code == 4, (name, res.stderr)
        assert name in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "o.safetensors").exists()
    assert "extension type 5" in runner("inspect", tmp_path / "ext.msgpack").stderr


def test_missing_msgpack_is_exit_2_with_the_install_command(flax_mlp, tmp_path, runner,
                                                            monkeypatch):
    src = _write_flax(flax_mlp, tmp_path / "m.msgpack")
    monkeypatch.setitem(sys.modules, "msgpack", None)
    res = runner("inspect", src)
    assert res.exit_code == 2 and "pip install 'linconvert[flax]'" in res.stderr


# --- Keras ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_mlp():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras runs with another backend in this process")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(shape=(4,), dtype="int32"),
        keras.layers.Embedding(10, 4, name="emb"),
        keras.layers.Dense(6, name="fc1", activation="relu"),
        keras.layers.Dense(6, name="sq"),  # a square kernel: the name is the evidence
        keras.layers.LayerNormalization(name="norm"),
        keras.layers.Dense(3, name="fc2"),
    ])
    ids = np.array([[1, 2, 3, 9], [0, 4, 5, 7]], dtype=np.int32)
    return keras, model, ids


@pytest.mark.parametrize("kind", ["weights.h5", "keras"])
def test_keras_mlp_loads_strictly_into_its_torch_twin(keras_mlp, tmp_path, runner, kind):
    _, model, ids = keras_mlp
    src = tmp_path / f"mlp.{kind}"
    if kind == "keras":
        model.save(src)
    else:
        model.save_weights(src)
    res = runner("to-linear", src, "--preset", "keras")
    assert res.exit_code == 0, res.stderr
    dst = tmp_path / "mlp.linear.safetensors"
    assert res.stdout.strip() == str(dst)
    twin = TorchTwin(eps=1e-3, square=True)
    twin.load_state_dict(load_file(dst), strict=True)
    expected = model(ids).detach().cpu().numpy()
    _close(twin(torch.from_numpy(ids).long()), expected)


def test_keras_unknown_layer_keeps_indices_and_says_so(keras_mlp, tmp_path):
    keras = keras_mlp[0]

    @keras.saving.register_keras_serializable(package="lc_test")
    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 2), name="w")
            self.v = self.add_weight(shape=(2,), name="v")

        def call(self, x):
            return x @ self.w + self.v

    model = keras.Sequential([keras.Input(shape=(3,)), Scale(name="custom")])
    model.save_weights(tmp_path / "c.weights.h5")
    report = convert.to_linear(tmp_path / "c.weights.h5", dry_run=True, layers=["custom.0"])
    assert [a.source for a in report.plan.actions] == ["custom.0", "custom.1"]
    assert any("keep their indices" in w for w in report.warnings)


def test_broken_keras_files(keras_mlp, tmp_path, runner):
    _, model, _ = keras_mlp
    model.save_weights(tmp_path / "good.weights.h5")
    good = (tmp_path / "good.weights.h5").read_bytes()
    (tmp_path / "trunc.weights.h5").write_bytes(good[: len(good) // 3])
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as z:
        z.writestr("config.json", "{}")
    (tmp_path / "trunc.keras").write_bytes(b"PK\x03\x04 truncated")
    with zipfile.ZipFile(tmp_path / "deflated.keras", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.weights.h5", good)
    for name in ("trunc.weights.h5", "junk.h5", "empty.keras", "trunc.keras", "deflated.keras"):
        res = runner("to-linear", tmp_path / name, "-o", tmp_path / "o.safetensors",
                     "--preset", "keras")
        assert res.exit_code == 4, (name, res.stderr)
        assert name in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "o.safetensors").exists()


def test_conv_kernels_are_listed_unchanged_with_a_warning(keras_mlp, tmp_path):
    keras = keras_mlp[0]
    model = keras.Sequential([keras.Input(shape=(8, 3)), keras.layers.Conv1D(4, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="head")])
    model.save_weights(tmp_path / "conv.weights.h5")
    report = convert.to_linear(tmp_path / "conv.weights.h5", tmp_path / "o.safetensors",
                               preset="keras")
    conv = next(a for a in report.plan.actions if a.source == "conv.kernel")
    assert not conv.transpose and conv.target == "conv.weight"
    assert any("'conv.kernel'" in w and "skipped" in w for w in report.warnings)
