"""Sharded datastore builds: two processes under ``accelerate launch`` (gloo on CPU) write the bytes
one process writes, and a shard killed part-way resumes from its last finished chunk."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from memdec.data import sliding_windows, window_batches
from memdec.datastore import DatastoreConfig, Ranks, build_datastore, shard_bounds, support_stats
from memdec.store import read_manifest
from test_datastore import read_bytes  # the bytes of every file a build writes

OPTIONS = dict(corpus="austen:valid", k=8, max_tokens=600, block_size=64, stride=32, search_batch=128)


def launch(model_dir, out, processes=2):
    """``memdec datastore`` under ``accelerate launch --num_processes N`` (CPU, gloo)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "memdec.cli", "datastore",
           "--model", str(model_dir), "--out", str(out), "--threads", "1", "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("one") / "ds"
    return build_datastore(DatastoreConfig(model=str(tiny_llama_dir), out=str(out), progress=False, **OPTIONS))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("two") / "ds"
    proc = launch(tiny_llama_dir, out)
    assert proc.stdout.count("datastore ") == 1  # rank 0 alone prints the summary
    return out


def test_shard_bounds_tile_the_range():
    assert shard_bounds(0, 10, 3) == [[0, 3], [3, 6], [6, 10]]
    assert shard_bounds(0, 599, 2, 64) == [[0, 320], [320, 599]]
    assert shard_bounds(5, 5, 2) == [[5, 5], [5, 5]]
    for start, end, world, align in [(0, 1000, 7, 64), (3, 18, 4, 1), (0, 65, 8, 64)]:
        b = shard_bounds(start, end, world, align)
        assert b[0][0] == start and b[-1][1] == end and all(x[1] == y[0] for x, y in zip(b, b[1:]))
        assert all((x[0] - start) % align == 0 for x in b)


def test_support_stats_read_in_chunks_equal_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 1000, 12345):
        lengths = rng.integers(0, 300, n)
        mean, percentiles = support_stats(np.concatenate([[0], np.cumsum(lengths)]), chunk=100)
        assert percentiles == {f"p{q}": float(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 99, 100)}
        assert mean == pytest.approx(lengths.mean(), rel=1e-12)


def test_two_processes_write_the_bytes_of_one(single, sharded):
    assert read_bytes(sharded) == read_bytes(single)
    keys, targets = (getattr(read_manifest(sharded).steps, s) for s in ("keys", "targets"))
    assert keys.processes == 2 and sum(keys.shard_positions) == read_manifest(single).n_keys
    assert targets.processes == 2 and targets.nnz == read_manifest(single).steps.targets.nnz
    leftovers = [p.name for p in sharded.rglob("*") if p.name.startswith((".keys-shard", "shard-"))]
    assert leftovers == []


def killed_in_keys(src, dst, done_in_shard_1: int):
    """A copy of ``src`` as a 2-process run leaves it when rank 1 is killed after ``done_in_shard_1``
    chunks of its shard (rank 0 finished its own): the rows it never wrote hold garbage."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    chunks = window_batches(sliding_windows(manifest["n_keys"] + 1, 64, 32), 1)
    shards = shard_bounds(0, len(chunks), 2)
    manifest["steps"] = {"keys": {"status": "running", "batch_size": 1, "chunks_total": len(chunks), "chunks_done": 0,
                                  "shards": shards},
                         "index": {"status": "pending"}, "targets": {"status": "pending"}}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    for i, done in enumerate([shards[0][1] - shards[0][0], done_in_shard_1]):
        (dst / f".keys-shard-{i}.json").write_text(json.dumps({"chunks_done": done, "seconds": 1.0}))
    first_missing = int(chunks[shards[1][0] + done_in_shard_1][0, 2])
    keys = np.load(dst / "keys.npy", mmap_mode="r+")
    keys[first_missing:] = 7.0
    keys.flush()
    (dst / "index.faiss").unlink()
    shutil.rmtree(dst / "targets")
    return first_missing


def test_killed_shard_resumes_from_its_last_chunk(single, sharded, tmp_path, tiny_llama_dir):
    out = tmp_path / "killed"
    first_missing = killed_in_keys(sharded, out, done_in_shard_1=3)
    launch(tiny_llama_dir, out)
    assert read_bytes(out) == read_bytes(single)
    keys = read_manifest(out).steps.keys
    assert keys.shard_positions == [0, read_manifest(single).n_keys - first_missing]  # nothing done twice


def test_resumed_by_another_number_of_processes(single, sharded, tmp_path, tiny_llama_dir):
    """Keys begun by 2 processes and resumed by 1 keep the chunks finished in a row from the start;
    targets begun by 2 start again under 1. Either way the bytes are those of one process."""
    out = tmp_path / "keys"
    killed_in_keys(sharded, out, done_in_shard_1=3)
    build_datastore(DatastoreConfig(model=str(tiny_llama_dir), out=str(out), progress=False, **OPTIONS))
    assert read_bytes(out) == read_bytes(single) and not list(out.glob(".keys-shard-*"))

    out = tmp_path / "targets"
    shutil.copytree(sharded, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["steps"]["targets"].update(status="running", shards=shard_bounds(0, manifest["n_keys"], 2, 64), merged=0)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "targets" / "shard-1").mkdir()
    build_datastore(DatastoreConfig(model=str(tiny_llama_dir), out=str(out), progress=False, **OPTIONS))
    assert read_bytes(out) == read_bytes(single) and not list((out / "targets").glob("shard-*"))


def test_killed_target_shards_resume(single, tmp_path, tiny_llama_dir, monkeypatch):
    """The ranks of a 2-process targets step run one after another in this process (their barriers
    then wait for nobody): rank 0 is killed after its first chunk, rank 1 after its second; each
    rerun resumes its shard from its last finished chunk, rank 0 merges, and the bytes are those of
    one process."""
    import memdec.datastore.build as build_mod  # build_datastore asks it for its ranks

    out = tmp_path / "ds"
    shutil.copytree(single, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["steps"]["targets"] = {"status": "pending"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "targets")
    cfg = DatastoreConfig(model=str(tiny_llama_dir), out=str(out), progress=False, **{**OPTIONS, "search_batch": 64})

    class Killed(Exception):
        pass

    def run_as(rank, kill_after=None):
        monkeypatch.setattr(build_mod, "launched_ranks", lambda device: Ranks(rank, 2, "cpu"))
        chunks = []

        def on_chunk(step, chunk):
            chunks.append(chunk)
            if len(chunks) == kill_after:
                raise Killed

        if kill_after is None:
            build_datastore(cfg, on_chunk=on_chunk)
        else:
            with pytest.raises(Killed):
                build_datastore(cfg, on_chunk=on_chunk)
        return chunks

    assert run_as(0, kill_after=1) == [0]  # shard 0: positions [0, 320), chunks 0..4 of 64
    assert run_as(1, kill_after=2) == [5, 6]  # shard 1: [320, 599), chunks 5..9
    step = read_manifest(out).steps.targets
    assert step.status == "running" and step.shards == [[0, 320], [320, 599]]
    assert run_as(1) == [7, 8, 9]
    assert run_as(0) == [1, 2, 3, 4]
    assert read_bytes(out) == read_bytes(single) and not list((out / "targets").glob("shard-*"))
    assert read_manifest(out).steps.targets.nnz == read_manifest(single).steps.targets.nnz
