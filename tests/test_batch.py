"""linconvert batch: many inputs, failures isolated, resume, shards, manifests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import convert
from convert.batching import parse_shard, plan_items, select_shard


def _lines(stdout: str, status: str) -> int:
    """Per-item lines (SRC -> DST) with STATUS, not the summary table's rows."""
    return sum(1 for line in stdout.splitlines() if line.startswith(status) and " -> " in line)


@pytest.fixture
def zoo(tmp_path, fixture_dir):
    """Several checkpoints in nested folders, and one corrupt file."""
    src = tmp_path / "zoo"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    shutil.copy(fixture_dir / "mlp_param.pt", src / "a" / "one.pt")
    shutil.copy(fixture_dir / "training.pt", src / "a" / "two.pt")
    shutil.copy(fixture_dir / "mlp_param.safetensors", src / "b" / "three.safetensors")
    torch.manual_seed(0)
    save_file({"l.weight": torch.randn(3, 5), "l.bias": torch.randn(5)},
              str(src / "four.safetensors"))
    (src / "b" / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return src


def test_corrupt_item_does_not_stop_the_batch(zoo, tmp_path, runner):
    out = tmp_path / "out"
    res = runner("batch", zoo, "--direction", "to-linear", "--out-dir", out, "-j", "2",
                 "--report", tmp_path / "r.json")
    assert res.exit_code == 4
    assert "broken.pt" in res.stderr
    assert _lines(res.stdout, "converted") == 4
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                  and not p.name.startswith(".")) == [
        "a/one.linear.pt", "a/two.linear.pt", "b/three.linear.safetensors",
        "four.linear.safetensors"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["exit_code"] == 4 and data["counts"] == {"converted": 4, "failed": 1}
    # a rerun skips what is done, for .pt outputs too, and reports the bad file again
    res = runner("batch", zoo, "--direction", "to-linear", "--out-dir", out, "-j", "2")
    assert res.exit_code == 4
    assert _lines(res.stdout, "skipped") == 4 and _lines(res.stdout, "converted") == 0


def test_resume_from_provenance_without_the_journal(zoo, tmp_path):
    out = tmp_path / "out"
    convert.batch([zoo / "four.safetensors"], direction="to-linear", out_dir=out, jobs=1)
    (out / ".linconvert-journal.jsonl").unlink()
    report = convert.batch([zoo / "four.safetensors"], direction="to-linear", out_dir=out,
                           jobs=1)
    assert [r.message for r in report.items] == ["done (provenance)"]


def test_unaccounted_existing_output_is_exit_5_then_overwrite_and_force(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "four.linear.safetensors").write_bytes(b"someone else's file")
    report = convert.batch([zoo / "four.safetensors"], direction="to-linear", out_dir=out)
    assert report.exit_code == 5
    assert (out / "four.linear.safetensors").read_bytes() == b"someone else's file"
    report = convert.batch([zoo / "four.safetensors"], direction="to-linear", out_dir=out,
                           overwrite=True)
    assert report.exit_code == 0 and report.items[0].status == "converted"
    report = convert.batch([zoo / "four.safetensors"], direction="to-linear", out_dir=out)
    assert report.items[0].status == "skipped"
    report = convert.batch([zoo / "four.safetensors"], direction="to-linear", out_dir=out,
                           force=True)
    assert report.items[0].status == "converted"


def test_changed_options_are_not_taken_for_done(zoo, tmp_path):
    out = tmp_path / "out"
    convert.batch([zoo / "four.safetensors"], direction="to-linear", out_dir=out)
    report = convert.batch([zoo / "four.safetensors"], direction="to-linear", out_dir=out,
                           drop=["l.bias"])
    assert report.exit_code == 5  # the old output is not what these options make


def test_shards_partition_the_items_exactly(zoo):
    items = plan_items([str(zoo)], direction="to-linear")
    assert [it.source for it in items] == sorted(it.source for it in items)
    parts = [select_shard(items, parse_shard(f"{i}/3")) for i in range(3)]
    flat = [it.source for part in parts for it in part]
    assert sorted(flat) == sorted(it.source for it in items) and len(flat) == len(set(flat))
    assert [it.source for it in parts[1]] == [it.source for it in items[1::3]]
    for bad in ("3/3", "-1/2", "x", "1/0"):
        with pytest.raises(convert.UsageError):
            parse_shard(bad)


def test_shard_runs_cover_every_item_once(zoo, tmp_path):
    seen = []
    for i in range(3):
        report = convert.batch([zoo], direction="to-linear", out_dir=tmp_path / "o",
                               shard=f"{i}/3", jobs=1)
        seen += [r.source for r in report.items]
    assert sorted(seen) == sorted(it.source for it in plan_items([str(zoo)],
                                                                  direction="to-linear"))


def test_manifest_with_mixed_directions(tmp_path, fixture_dir, runner):
    shutil.copy(fixture_dir / "mlp_param.pt", tmp_path / "p.pt")
    shutil.copy(fixture_dir / "mlp_linear.safetensors", tmp_path / "l.safetensors")
    shutil.copy(fixture_dir / "square_nobias.safetensors", tmp_path / "sq.safetensors")
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text(
        "source,destination,direction,layers\n"
        "p.pt,out/p.safetensors,to-linear,\n"
        "l.safetensors,out/l.pt,to-param,\n"
        "sq.safetensors,out/sq.safetensors,to-linear,*.weight\n")
    res = runner("batch", "--manifest", csv_manifest, "-j", "2")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert (tmp_path / "out" / "l.pt").exists() and (tmp_path / "out" / "sq.safetensors").exists()
    back = torch.load(tmp_path / "out" / "l.pt", weights_only=True)
    assert back["fc1.weight"].shape == (4, 6)  # param layout: in x out
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"source": "p.pt", "destination": "j/p.pt",
                                 "direction": "to-linear",
                                 "rename": [["^fc1\\.", "first."]]}) + "\n")
    report = convert.batch(manifest=jsonl)
    assert report.exit_code == 0
    assert "first.weight" in torch.load(tmp_path / "j" / "p.pt", weights_only=True)


def test_two_items_onto_one_destination_is_exit_2_before_any_work(tmp_path, fixture_dir, runner):
    shutil.copy(fixture_dir / "mlp_param.pt", tmp_path / "x.pt")
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,destination,direction\nx.pt,o.pt,to-linear\n"
                        "x.pt,o.pt,to-linear\n")
    res = runner("batch", "--manifest", manifest)
    assert res.exit_code == 2 and "both be written" in res.stderr
    assert not (tmp_path / "o.pt").exists()


def test_plain_inputs_need_a_direction(zoo, runner):
    res = runner("batch", zoo)
    assert res.exit_code == 2 and "--direction" in res.stderr


def test_fail_fast_stops(zoo, tmp_path):
    items = plan_items([str(zoo)], direction="to-linear")
    broken = [i for i, it in enumerate(items) if it.source.endswith("broken.pt")][0]
    report = convert.batch([zoo], direction="to-linear", out_dir=tmp_path / "o", jobs=1,
                           fail_fast=True)
    assert len(report.items) == broken + 1 and report.exit_code == 4


def test_killed_worker_leaves_no_partial_output_and_a_rerun_finishes(zoo, tmp_path):
    """SIGKILL a real worker of a real `linconvert batch` as soon as its temporary file appears."""
    big = zoo / "b" / "big.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({f"h.{i}.fc.weight": torch.rand(512, 1024, generator=g) for i in range(48)}
              | {f"h.{i}.fc.bias": torch.rand(1024, generator=g) for i in range(48)}, str(big))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "convert", "batch", str(zoo), "--direction", "to-linear",
           "--out-dir", str(out), "-j", "2"]
    partial = out / "b" / ".big.linear.safetensors.partial"
    killed = False
    for _ in range(3):  # the kill races the write: retry a lost race, never assert on it
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not killed:
            if partial.exists():
                for child in _children(proc.pid):
                    os.kill(child, signal.SIGKILL)
                    killed = True
            time.sleep(0.002)
        proc.communicate(timeout=120)
        if killed:
            break
    assert killed, "the worker finished before it could be killed"
    assert proc.returncode != 0
    assert not (out / "b" / "big.linear.safetensors").exists()
    report = convert.batch([zoo], direction="to-linear", out_dir=out, jobs=2)
    assert (out / "b" / "big.linear.safetensors").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]
    assert {r.source.rsplit("/", 1)[-1]: r.status for r in report.items}["big.safetensors"] \
        == "converted"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def test_default_jobs_is_the_affinity():
    from convert.batching import default_jobs

    assert default_jobs() == len(os.sched_getaffinity(0))


def test_workers_die_with_a_killed_batch(zoo, tmp_path):
    """SIGKILL to `linconvert batch` itself: its workers end too, and its pipes close."""
    g = torch.Generator().manual_seed(1)
    for name in ("c1", "c2", "c3"):
        save_file({f"h.{i}.fc.weight": torch.rand(512, 1024, generator=g) for i in range(48)}
                  | {f"h.{i}.fc.bias": torch.rand(1024, generator=g) for i in range(48)},
                  str(zoo / f"{name}.safetensors"))
    cmd = [sys.executable, "-m", "convert", "batch", str(zoo), "--direction", "to-linear",
           "--out-dir", str(tmp_path / "out"), "-j", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while not workers and proc.poll() is None and time.monotonic() < deadline:
        workers = _children(proc.pid)
        time.sleep(0.01)
    assert workers, "the batch ended before it started its workers"
    proc.kill()
    proc.wait(timeout=10)
    # Its stdout closes once every process holding it has gone: a pipe reader must not hang.
    out, _ = proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)], "workers outlived their batch"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
