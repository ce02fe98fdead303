"""Index kinds are plugins: the registry lists the built-in kinds, and a kind defined here (a
brute-force numpy index, the whole of it in this file) is built, saved, loaded and searched
through the public functions, and builds a datastore, with the flat index's results."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from memdec.datastore import DATASTORE_HELP, DatastoreConfig, build_datastore

from memdec.store import open_datastore, read_manifest
from memdec.errors import DatastoreError
from memdec.files import atomic_write
from memdec.index import (
    INDEX_KINDS,
    IndexKind,
    IndexParams,
    Machine,
    auto_kind,
    build_index,
    check_kind,
    choose_params,
    get_kind,
    index_kind,
    kind_names,
    kinds_help,
    load_index,
    named_kind,
    register,
    save_index,
    search,
    unregister,
)
from memdec.index.base import auto_pick

BUILT_IN = ("flat", "ivfpq", "ivfpq-disk", "torch")
NPY_MAGIC = b"\x93NUMPY"


def test_the_registry_lists_exactly_the_built_in_kinds(tmp_path):
    assert kind_names() == BUILT_IN and INDEX_KINDS == ("auto", *BUILT_IN)
    assert [get_kind(name).name for name in BUILT_IN] == list(BUILT_IN)
    assert [name for name in BUILT_IN if get_kind(name).needs_keys_at_search] == ["torch"]
    path = tmp_path / "index.faiss"
    assert {name: get_kind(name).extra_files(path) for name in BUILT_IN} == {
        "flat": (), "ivfpq": (), "ivfpq-disk": (tmp_path / "index.ivfdata",), "torch": ()}
    assert DATASTORE_HELP["index"] == kinds_help() == (
        "auto, flat (exact), ivfpq (approximate, for large datastores), ivfpq-disk (ivfpq with its lists on disk, "
        "memory-mapped: the keys are never in memory together) or torch (exact, on CUDA; no faiss needed)")
    with pytest.raises(DatastoreError, match="unknown index type 'hnsw'; choose one of: auto, flat, ivfpq, "
                                             "ivfpq-disk, torch"):
        get_kind("hnsw")
    with pytest.raises(ValueError, match="registered already"):
        register(get_kind("flat"))


# --- a kind of this test's own: brute force in numpy, saved as a .npy file ------------------------


class NumpyFlatIndex:
    """Exact squared-L2 search over fp32 keys held in a numpy array: faiss's ``.d``, ``.ntotal``,
    ``.search``."""

    def __init__(self, keys: np.ndarray):
        self.keys = np.ascontiguousarray(keys, dtype=np.float32)
        self.d, self.ntotal = self.keys.shape[1], self.keys.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q, keys = queries.astype(np.float64), self.keys.astype(np.float64)
        dist = (q**2).sum(1)[:, None] - 2 * q @ keys.T + (keys**2).sum(1)[None, :]
        ids = np.argsort(dist, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dist, ids, axis=1).astype(np.float32), ids.astype(np.int64)


class NumpyKind(IndexKind):
    name = "numpy-brute"
    description = "exact, numpy, a test's"

    def build(self, keys, params: IndexParams, *, add_batch: int = 65_536, progress: bool = False):
        return NumpyFlatIndex(keys)

    def save(self, index: NumpyFlatIndex, path: Path) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, index.keys)

        atomic_write(path, write)

    def reads(self, head: bytes) -> bool:
        return head.startswith(NPY_MAGIC)

    def load(self, path: Path, *, nprobe=None, gpu=None) -> NumpyFlatIndex:
        return NumpyFlatIndex(np.load(path, allow_pickle=False))

    def matches(self, index) -> bool:
        return isinstance(index, NumpyFlatIndex)


@pytest.fixture
def numpy_kind():
    register(NumpyKind())
    yield "numpy-brute"
    unregister("numpy-brute")


def test_a_kind_registered_from_a_test_builds_saves_loads_and_searches_as_flat(tmp_path, numpy_kind):
    assert kind_names() == (*BUILT_IN, "numpy-brute") and INDEX_KINDS == ("auto", *BUILT_IN)
    assert check_kind("numpy-brute") == "numpy-brute" and kinds_help().endswith(
        "or numpy-brute (exact, numpy, a test's)"
    )
    assert choose_params(500, 16, "numpy-brute") == IndexParams("numpy-brute")
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(500, 16)).astype(np.float16)  # fp16, as on disk
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    index = build_index(keys, "numpy-brute")
    assert index_kind(index) == "numpy-brute"
    path = tmp_path / "index.faiss"
    assert save_index(index, path) == path.stat().st_size and path.read_bytes().startswith(NPY_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss"]  # no temporary file left
    loaded = load_index(path)
    assert index_kind(loaded) == "numpy-brute"
    flat_path = tmp_path / "flat.faiss"
    save_index(build_index(keys, "flat"), flat_path)
    flat = load_index(flat_path)  # a faiss file still goes to faiss with another kind registered
    assert index_kind(flat) == "flat"
    got, want = search(loaded, queries, 10, batch_size=16), search(flat, queries, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
    unregister("numpy-brute")
    with pytest.raises(DatastoreError, match="unknown index type 'numpy-brute'"):
        build_index(keys, "numpy-brute")
    with pytest.raises(DatastoreError, match="cannot read the faiss index"):
        load_index(path)  # no kind reads .npy files any more: faiss says what is wrong


def test_a_kind_registered_from_a_test_builds_a_datastore(tmp_path, store, tiny_llama_dir, numpy_kind):
    out = tmp_path / "ds"
    shutil.copytree(store, out)  # its keys: only the index and the targets are rebuilt
    build_datastore(DatastoreConfig(model=str(tiny_llama_dir), corpus="austen:valid", out=str(out), k=16,
                                    block_size=64, stride=32, max_tokens=600, progress=False, index="numpy-brute"))
    step = read_manifest(out).steps.index
    assert step.type == "numpy-brute" and step.status == "done"
    assert index_kind(open_datastore(out).load_index()) == "numpy-brute"
    ours, flat = open_datastore(out).load_targets(), open_datastore(store).load_targets()
    np.testing.assert_array_equal(ours.offsets, flat.offsets)
    np.testing.assert_array_equal(ours.token_ids, flat.token_ids)
    np.testing.assert_allclose(ours.probs.astype(np.float32), flat.probs.astype(np.float32), atol=2e-3)


def test_auto_is_each_kinds_own_rule():
    """``auto`` names no kind: each built-in kind says where it is asked and what it takes, so the same
    machine facts give the rule of docs (torch without faiss or on CUDA that faiss lacks, flat up to the
    threshold, ivfpq above)."""
    assert [(k, get_kind(k).auto_order) for k in BUILT_IN] == [("flat", 1), ("ivfpq", 2), ("ivfpq-disk", None),
                                                               ("torch", 0)]
    assert [k for k in BUILT_IN if get_kind(k).device_search] == ["torch"]
    assert named_kind("auto") is None and named_kind("flat") is get_kind("flat")
    with pytest.raises(DatastoreError, match="unknown index type 'hnsw'"):
        named_kind("hnsw")
    cpu = Machine(faiss=True, faiss_gpu=False)
    assert auto_pick(10, 8, Machine(faiss=False, faiss_gpu=False)).name == "torch"
    assert auto_pick(100_000, 8, cpu).name in ("flat", "torch")  # torch where CUDA has room
    assert auto_pick(2_000_000, 8, Machine(faiss=True, faiss_gpu=True)).name == "flat"
    assert auto_pick(2_000_001, 8, Machine(faiss=True, faiss_gpu=True)).name == "ivfpq"
    assert auto_pick(500, 8, Machine(faiss=True, faiss_gpu=True, flat_threshold=499)).name == "ivfpq"
    assert auto_kind(500, 8) == choose_params(500, 8).kind


def test_a_registered_kind_that_says_so_is_autos_choice(numpy_kind, monkeypatch):
    """A new kind joins ``auto`` by its own attributes, nothing else changed."""
    kind = get_kind(numpy_kind)
    assert choose_params(500, 8).kind != numpy_kind  # auto_order None: never picked
    monkeypatch.setattr(kind, "auto_order", -1, raising=False)
    monkeypatch.setattr(kind, "picks_for", lambda n, d, machine: n <= 1000, raising=False)
    assert choose_params(500, 8).kind == numpy_kind
    assert choose_params(1001, 8).kind != numpy_kind  # it said no: the built-in rule
