"""The torch index (exact search without faiss) and the torch kNN distributions against faiss/numpy."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import memdec.index as index_mod
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.store import open_datastore, open_targets, read_manifest
from memdec.errors import DatastoreError
from memdec.index import (
    TorchFlatIndex,
    build_index,
    choose_params,
    index_kind,
    load_index,
    save_index,
    search,
)
from memdec.knnlm import KnnRetriever
from memdec.targets import drop_self, drop_self_torch, knn_distribution, knn_distribution_torch

TARGET_FILES = ["targets/offsets.npy", "targets/token_ids.npy", "targets/probs.npy"]


def random_keys(n=2000, d=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float16)  # fp16, as on disk


def store_config(tiny_llama_dir, out, **kw) -> DatastoreConfig:
    """The config of the session ``store`` fixture, so that a copy of it resumes with its keys."""
    base = dict(model=str(tiny_llama_dir), corpus="austen:valid", out=str(out), k=16, block_size=64, stride=32,
                max_tokens=600, progress=False)
    return DatastoreConfig(**{**base, **kw})


# --- search --------------------------------------------------------------------------------------


def test_torch_search_equals_faiss_flat(monkeypatch):
    keys = random_keys()
    queries = np.random.default_rng(1).normal(size=(150, 16)).astype(np.float32)
    monkeypatch.setattr(index_mod.torch_flat, "query_chunk_rows", lambda n: 7)  # many query chunks
    index = build_index(keys, "torch", add_batch=300)  # several upload chunks
    assert isinstance(index, TorchFlatIndex) and index_kind(index) == "torch"
    assert (index.d, index.ntotal) == (16, 2000) and index.keys.device == index.device  # CUDA where there is one
    dists, ids = search(index, queries, 20, batch_size=64)
    ref_d, ref_i = search(build_index(keys, "flat"), queries, 20)
    assert dists.dtype == np.float32 and ids.dtype == np.int64 and dists.shape == (150, 20)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-5, atol=1e-4)
    same = ids == ref_i
    assert same.mean() > 0.99 and np.allclose(dists[~same], ref_d[~same], atol=1e-4)  # only ties swap
    assert (np.diff(dists, axis=1) >= 0).all()  # nearest first

    d_t, i_t = index.search_torch(torch.from_numpy(queries[:5]), 3)
    assert isinstance(d_t, torch.Tensor) and d_t.device == index.device and i_t.dtype == torch.int64
    np.testing.assert_array_equal(i_t.cpu().numpy(), ids[:5, :3])
    self_d = index.search_torch(torch.from_numpy(keys[:4].astype(np.float32)), 1)[0]
    assert (self_d >= 0).all() and self_d.max() < 1e-4  # |q|² − 2q·k + |k|² clamped at 0
    with pytest.raises(DatastoreError, match="k=2001"):
        index.search_torch(torch.zeros(1, 16), 2001)
    with pytest.raises(DatastoreError, match="shape"):
        index.search_torch(torch.zeros(1, 8), 1)


def test_auto_chooses_torch_on_cuda_without_faiss_gpu(monkeypatch):
    monkeypatch.setattr(index_mod, "gpu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (8 * 2**30, 80 * 2**30))
    assert choose_params(2**20, 1024).kind == "torch"  # 4 GiB of fp32 keys: half the free 8 GiB
    assert choose_params(2**20, 1025).kind == "ivfpq"  # just over half: the faiss choice
    assert choose_params(50_000, 32_768).kind == "flat"  # too big for the GPU, small for flat
    assert choose_params(10, 8, "torch").to_json() == {"kind": "torch", "seed": 0}
    assert choose_params(10, 8, "flat").to_json() == {"kind": "flat", "seed": 0}  # unchanged


# --- distributions -------------------------------------------------------------------------------


@pytest.mark.parametrize("top_m", [None, 1, 4])
@pytest.mark.parametrize("temperature", [0.5, 3.0, 40.0])
def test_knn_distribution_torch_equals_numpy(top_m, temperature):
    rng = np.random.default_rng(int(temperature * 10) + (top_m or 0))
    dists = np.sort(rng.integers(5, 30, (40, 33)), axis=1).astype(np.float32)  # integer: tied weights
    values = rng.integers(0, 9, (40, 33)).astype(np.int32)
    values[rng.random(values.shape) < 0.2] = -1  # empty slots
    values[3] = -1  # a row without any neighbour
    dists[5] += 200  # tiny weights at low T: below min_prob but for the row's top
    for min_prob in (0.0, 2.0**-25, 0.05):
        want = knn_distribution(dists, values, temperature, top_m, min_prob=min_prob, return_kept_mass=True)
        got = knn_distribution_torch(torch.from_numpy(dists), torch.from_numpy(values), temperature, top_m,
                                     min_prob=min_prob, return_kept_mass=True)
        for w, g in zip(want, got):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])  # same tokens, same order
        np.testing.assert_allclose(got[2], want[2], rtol=1e-6)
        np.testing.assert_allclose(got[3], want[3], rtol=1e-12)
    assert len(knn_distribution_torch(torch.from_numpy(dists), torch.from_numpy(values), 1.0)) == 3
    with pytest.raises(DatastoreError, match="top-m"):
        knn_distribution_torch(torch.from_numpy(dists), torch.from_numpy(values), 1.0, 0)


def test_drop_self_torch_equals_numpy():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(30)[:9] for _ in range(50)]).astype(np.int64)
    ids[7, 2:4] = 7  # a duplicate of the query's own id: only its first entry goes
    dists = np.sort(rng.random((50, 9)), axis=1).astype(np.float32)
    query_ids = np.arange(50)
    want = drop_self(dists, ids, query_ids)
    got = drop_self_torch(torch.from_numpy(dists), torch.from_numpy(ids), torch.from_numpy(query_ids))
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g.numpy(), w)


# --- the datastore -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_store(tmp_path_factory, store, tiny_llama_dir):
    """The session ``store`` rebuilt with a torch index: its keys kept, index and targets redone."""
    out = tmp_path_factory.mktemp("torch-store") / "ds"
    shutil.copytree(store, out)
    return build_datastore(store_config(tiny_llama_dir, out, index="torch"))


def test_torch_datastore_targets_equal_flat(store, torch_store):
    m = read_manifest(torch_store)
    assert m.steps.index.type == "torch" and m.steps.index.params == {"kind": "torch", "seed": 0}
    assert m.steps.targets.status == "done" and m.steps.targets.nprobe is None
    assert m.steps.targets.empty_slots == 0
    flat, torch_t = open_targets(store), open_targets(torch_store)
    np.testing.assert_array_equal(torch_t.offsets, flat.offsets)
    np.testing.assert_array_equal(torch_t.token_ids, flat.token_ids)
    np.testing.assert_allclose(torch_t.probs.astype(np.float32), flat.probs.astype(np.float32), rtol=2e-3, atol=1e-4)
    want = read_manifest(store).steps.targets
    for key in ("nnz", "self_missing", "mean_support", "support_percentiles"):
        assert getattr(m.steps.targets, key) == getattr(want, key), key
    assert m.steps.targets.kl_truncation_mean == pytest.approx(want.kl_truncation_mean, abs=1e-9)


def test_torch_index_file_round_trips_and_serves_knnlm(store, torch_store):
    path = torch_store / "index.faiss"
    assert json.loads(path.read_text()) == {"format": "memdec-torch-flat", "keys": "keys.npy", "n": 599, "d": 64}
    assert read_manifest(torch_store).steps.index.bytes == path.stat().st_size
    index = load_index(path, gpu=False)
    assert isinstance(index, TorchFlatIndex) and (index.ntotal, index.d) == (599, 64)
    keys = np.asarray(open_datastore(torch_store).keys)
    np.testing.assert_array_equal(index.keys.numpy(), keys.astype(np.float32))
    queries = keys[::7].astype(np.float32) + 0.01
    flat_d, _ = search(load_index(store / "index.faiss"), queries, 10)
    np.testing.assert_allclose(search(index, queries, 10)[0], flat_d, rtol=1e-4, atol=1e-3)
    # kNN-LM retrieval through a torch index: the same neighbours as through the flat one
    d_t, v_t = KnnRetriever(str(torch_store), k=10).neighbours(torch.from_numpy(queries))
    d_f, v_f = KnnRetriever(str(store), k=10).neighbours(torch.from_numpy(queries))
    np.testing.assert_allclose(d_t, d_f, rtol=1e-4, atol=1e-3)
    assert (v_t == v_f).mean() > 0.99


def test_torch_targets_resume_byte_identical(tmp_path, torch_store, tiny_llama_dir):
    out = tmp_path / "resumed"
    shutil.copytree(torch_store, out)
    cfg = store_config(tiny_llama_dir, out, index="torch", k=8, search_batch=128)

    class Stop(Exception):
        pass

    def stop_at_targets_chunk_1(step, chunk):
        if (step, chunk) == ("targets", 1):
            raise Stop

    with pytest.raises(Stop):
        build_datastore(cfg, on_chunk=stop_at_targets_chunk_1)
    assert read_manifest(out).steps.targets.rows_done == 256
    build_datastore(cfg)
    fresh = tmp_path / "fresh"
    shutil.copytree(torch_store, fresh)
    build_datastore(store_config(tiny_llama_dir, fresh, index="torch", k=8, search_batch=128))
    for name in TARGET_FILES + ["index.faiss"]:
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    got, want = read_manifest(out).steps.targets, read_manifest(fresh).steps.targets
    assert {k: v for k, v in got.to_json().items() if k not in ("seconds", "rows_per_s")} == \
        {k: v for k, v in want.to_json().items() if k not in ("seconds", "rows_per_s")}


def test_corrupt_or_mismatched_torch_index_file(tmp_path):
    keys = random_keys(100, 8)
    np.save(tmp_path / "keys.npy", keys)
    index = build_index(keys, "torch")
    path = tmp_path / "index.faiss"
    assert save_index(index, path) == path.stat().st_size
    assert load_index(path).ntotal == 100
    bad = {
        "describes 99 keys of dimension 8": {"format": "memdec-torch-flat", "keys": "keys.npy", "n": 99, "d": 8},
        "not a memdec-torch-flat index": {"format": "other", "keys": "keys.npy", "n": 100, "d": 8},
        "needs format, keys, n, d": {"format": "memdec-torch-flat", "keys": "../keys.npy", "n": 100, "d": 8},
        "cannot read its keys": {"format": "memdec-torch-flat", "keys": "gone.npy", "n": 100, "d": 8},
    }
    for message, payload in bad.items():
        path.write_text(json.dumps(payload))
        with pytest.raises(DatastoreError, match=message):
            load_index(path)
    path.write_text('{"format": "memdec-torch-flat", "n": 1')
    with pytest.raises(DatastoreError, match="unreadable torch index file"):
        load_index(path)
    with pytest.raises(DatastoreError, match=r"holds \[100, 8\], not the index's \[50, 8\]"):
        save_index(build_index(keys[:50], "torch"), path)


def test_memdec_works_without_faiss(tmp_path):
    faiss_file = tmp_path / "flat.faiss"
    save_index(build_index(random_keys(50, 8), "flat"), faiss_file)
    script = f"""
import sys
sys.modules["faiss"] = None  # import faiss now raises ImportError
import numpy as np
import memdec, memdec.datastore, memdec.knnlm, memdec.targets
import memdec.index as m
from memdec.errors import DatastoreError

assert not m.faiss_available() and not m.gpu_available() and m.set_num_threads(2) == 2
assert m.choose_params(10_000_000, 64).kind == "torch"
keys = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float16)
index = m.build_index(keys)
assert m.index_kind(index) == "torch" and m.auto_nprobe(index, 10) == 0 and m.to_gpu(index) is index
dists, ids = m.search(index, keys[:5], 3)
assert (ids[:, 0] == np.arange(5)).all()
disk = lambda: m.build_ondisk_index(keys, {str(tmp_path / "disk.faiss")!r}, m.IndexParams("ivfpq-disk"))
for call in (lambda: m.load_index({str(faiss_file)!r}), lambda: m.build_index(keys, "flat"), disk):
    try:
        call()
    except DatastoreError as exc:
        assert "pip install faiss-cpu" in str(exc), exc
    else:
        raise AssertionError("no DatastoreError")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
