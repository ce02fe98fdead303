import numpy as np
import pytest
import torch

from memdec.errors import DatastoreError
from memdec.index import (
    FLAT_THRESHOLD,
    auto_nprobe,
    build_index,
    build_ondisk_index,
    choose_params,
    ivfdata_path,
    index_kind,
    load_index,
    save_index,
    search,
    train_ivfpq,
)


def clustered(n: int, d: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Gaussian blobs: the shape of real keys, where neighbours crowd in clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (n_clusters, d))
    return (centres[rng.integers(0, n_clusters, n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def test_flat_neighbours_equal_brute_force_cdist():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(3000, 24)).astype(np.float16)  # fp16, as on disk
    queries = rng.normal(size=(200, 24)).astype(np.float32)
    index = build_index(keys, "flat")
    assert index_kind(index) == "flat"
    dists, ids = search(index, queries, 17, batch_size=64)
    ref = torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(keys.astype(np.float64))) ** 2
    ref_d, ref_i = ref.topk(17, largest=False)
    assert dists.dtype == np.float32 and ids.dtype == np.int64 and dists.shape == (200, 17)
    np.testing.assert_array_equal(ids, ref_i.numpy())
    np.testing.assert_allclose(dists, ref_d.numpy(), rtol=1e-4, atol=1e-3)  # squared L2


def test_ivfpq_recall_against_flat(tmp_path):
    keys = clustered(20_000, 32, 64)
    queries = keys[::40]
    k = 32
    flat = build_index(keys, "flat")
    _, exact = search(flat, queries, k)
    index = build_index(keys, "ivfpq")
    assert index_kind(index) == "ivfpq"
    save_index(index, tmp_path / "ivf.faiss")
    index = load_index(tmp_path / "ivf.faiss")
    dists, ids = search(index, queries, k, nprobe=auto_nprobe(index, k))
    recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, exact)])
    assert recall >= 0.9, recall
    # re-ranked distances are exact up to fp16 rounding of the keys
    found = ids >= 0
    true = ((queries[:, None, :] - keys[np.clip(ids, 0, None)]) ** 2).sum(-1)
    np.testing.assert_allclose(dists[found], true[found], rtol=2e-3, atol=1e-2)


def test_choose_params(monkeypatch):
    monkeypatch.setattr(
        "memdec.index.torch_flat.torch_keys_fit_gpu", lambda n, d: False
    )  # the faiss choices, as on a CPU machine
    assert choose_params(FLAT_THRESHOLD, 576).kind == "flat"
    big = choose_params(FLAT_THRESHOLD + 1, 576)
    assert big.kind == "ivfpq" and 576 % big.pq_m == 0 and big.pq_bits == 8
    assert 39 * big.nlist <= big.train_size <= FLAT_THRESHOLD + 1
    assert choose_params(1_000_000, 1024).nlist == 4096 and choose_params(1_000_000, 1024).pq_m == 64
    p = choose_params(50_000, 64, "ivfpq", nlist=100, pq_m=16, nprobe=7, refine=0)
    assert (p.nlist, p.pq_m, p.nprobe, p.refine) == (100, 16, 7, 0)
    with pytest.raises(DatastoreError, match="unknown index type 'hnsw'"):
        choose_params(100, 8, "hnsw")
    with pytest.raises(DatastoreError, match="must divide"):
        choose_params(50_000, 64, "ivfpq", pq_m=7)


def test_plain_ivfpq_without_refine_and_errors(tmp_path):
    keys = clustered(4000, 16, 16, seed=1)
    index = build_index(keys, "ivfpq", refine=0, nlist=32)
    dists, ids = search(index, keys[:10], 5, nprobe=32)
    assert (ids[:, 0] == np.arange(10)).mean() >= 0.8  # each query finds itself
    with pytest.raises(DatastoreError, match="k=5000"):
        search(index, keys[:2], 5000)
    with pytest.raises(DatastoreError, match="shape"):
        search(index, keys[:2, :8], 3)
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not an index")
    with pytest.raises(DatastoreError, match="cannot read"):
        load_index(bad)
    with pytest.raises(DatastoreError, match="no such index"):
        load_index(tmp_path / "missing.faiss")


def test_ondisk_ivfpq_equals_in_memory_ivfpq_from_the_same_training(tmp_path, capfd):
    keys = clustered(6000, 32, 40, seed=2).astype(np.float16)  # fp16, as on disk
    params = choose_params(len(keys), 32, "ivfpq-disk", nlist=64, pq_m=8)
    assert params.kind == "ivfpq-disk" and params.refine == 0
    folder = tmp_path / "store"
    folder.mkdir()
    size = build_ondisk_index(keys, folder / "index.faiss", params, shard_keys=1700, add_batch=500)  # 4 shards
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "index.ivfdata"]  # shards cleaned up
    assert size == (folder / "index.faiss").stat().st_size + ivfdata_path(folder / "index.faiss").stat().st_size
    moved = tmp_path / "moved"
    folder.rename(moved)  # the lists are found beside the index, wherever the folder goes
    disk = load_index(moved / "index.faiss")
    assert index_kind(disk) == "ivfpq-disk" and disk.ntotal == 6000
    memory = train_ivfpq(keys, params)  # the same sample and seed: the same quantizer and codebooks
    memory.add(keys.astype(np.float32))
    code_size = memory.code_size  # 8 sub-quantizers of pq_bits bits
    assert (moved / "index.ivfdata").stat().st_size == 6000 * (code_size + 8)  # the codes and ids live there
    queries = keys[::25].astype(np.float32)
    for k in (16, 200):
        got = search(disk, queries, k, nprobe=12)
        want = search(memory, queries, k, nprobe=12)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert capfd.readouterr().out == ""  # faiss's own messages go to stderr


def test_ondisk_build_resumes_from_its_shards(tmp_path, monkeypatch):
    import memdec.index.ivfpq_disk as index_mod  # where build_ondisk_index writes its files

    keys = clustered(3000, 16, 20, seed=3)
    params = choose_params(len(keys), 16, "ivfpq-disk", nlist=16, pq_m=4)
    path = tmp_path / "index.faiss"
    real, calls = index_mod._write_faiss, []

    def dies_on_third_shard(index, p):
        if p.name == "shard-00002.faiss":
            raise KeyboardInterrupt
        calls.append(p.name)
        real(index, p)

    monkeypatch.setattr(index_mod, "_write_faiss", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_ondisk_index(keys, path, params, shard_keys=700)
    assert calls == ["trained.faiss", "shard-00000.faiss", "shard-00001.faiss"] and not path.exists()
    monkeypatch.setattr(index_mod, "_write_faiss", lambda index, p: calls.append(p.name) or real(index, p))
    build_ondisk_index(keys, path, params, shard_keys=700)
    assert calls[3:] == ["shard-00002.faiss", "shard-00003.faiss", "shard-00004.faiss", "index.faiss"]
    reference = tmp_path / "ref"
    reference.mkdir()
    build_ondisk_index(keys, reference / "index.faiss", params, shard_keys=3000)  # one shard, no interruption
    a, b = load_index(path), load_index(reference / "index.faiss")
    np.testing.assert_array_equal(search(a, keys[:50], 10, nprobe=16)[1], search(b, keys[:50], 10, nprobe=16)[1])


def test_ondisk_ivfpq_refuses_refine():
    with pytest.raises(DatastoreError, match="ivfpq-disk index re-ranks nothing"):
        choose_params(10_000, 32, "ivfpq-disk", refine=4)
    with pytest.raises(DatastoreError, match="build_ondisk_index"):
        build_index(clustered(200, 8, 4), "ivfpq-disk", nlist=2)
