"""The registry of index kinds: ``IndexKind`` (what a kind answers), ``IndexParams`` and the helpers
every kind shares.

A kind is one object of an ``IndexKind`` subclass, registered by name (``register``, into ``KINDS``: a
``memdec.registry.Registry``) when its module is imported; ``memdec.index`` imports every module of its
package (``registry.discover``): the built-in ones are ``flat``, ``ivfpq``, ``ivfpq-disk``, ``torch``.
The public functions of ``memdec.index`` (``choose_params``, ``build_index``, ``save_index``,
``load_index``, ``search``, ``index_kind``) and the datastore only ever ask the registered kind, so
adding a kind is one new module (and its test).

An index object is what faiss's indexes are: ``.d``, ``.ntotal`` and ``.search(queries float32
[B, d], k) -> (dists float32 [B, k] squared L2, ids int64 [B, k])``, nearest first, -1 for a slot
an approximate index could not fill.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import DatastoreError
from ..registry import Registry


@dataclass
class IndexParams:
    """The choices behind an index; stored in the manifest."""

    kind: str  # a registered kind's name: "flat" | "ivfpq" | "ivfpq-disk" | "torch" | ...
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None
    refine: int | None = None  # re-rank refine*k candidates exactly; 0 = none
    nprobe: int | None = None  # default lists probed; search() may raise it for large k
    train_size: int | None = None
    seed: int = 0

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Machine:
    """What ``auto`` weighs besides N and d: whether faiss is installed (``faiss``) and has a GPU
    (``faiss_gpu``), and ``--flat-threshold`` (None: the kinds' own defaults)."""

    faiss: bool
    faiss_gpu: bool
    flat_threshold: int | None = None


class IndexKind:
    """One kind of index. Subclass it, set ``name`` and ``description`` and implement ``build``,
    ``save``, ``reads``, ``load`` and ``matches``; the other methods have defaults that suit an
    in-memory index kept in one file.

    - ``name``: the ``--index`` value and the manifest's index ``type``;
    - ``description``: its words in ``memdec datastore --help`` (``--index``);
    - ``needs_keys_at_search``: the index searches the datastore's ``keys.npy`` itself (so
      ``--no-keep-keys`` is refused);
    - ``device_search``: its index also answers ``search_torch(queries tensor [B, d], k)`` with
      tensors on ``index.device``, so the datastore's targets (search, values, distributions) run
      there;
    - ``auto_order`` and ``picks_for``: where ``auto`` asks this kind (lowest first; None, the
      default: ``auto`` never picks it) and whether it takes N keys of dimension d on a ``Machine``:
      the first kind that says yes is ``auto``'s choice.
    """

    name: str = ""
    description: str = ""
    needs_keys_at_search: bool = False
    device_search: bool = False
    auto_order: ClassVar[int | None] = None

    def picks_for(self, n: int, d: int, machine: Machine) -> bool:
        """Whether ``auto`` takes this kind for N keys of dimension d on ``machine`` (asked in
        ``auto_order``, after the kinds before it said no)."""
        return False

    def choose(self, n: int, d: int, *, nlist: int | None = None, pq_m: int | None = None,
               nprobe: int | None = None, refine: int | None = None, train_size: int | None = None,
               seed: int = 0) -> IndexParams:
        """The parameters for N keys of dimension d (``choose_params`` after ``auto``); the IVF
        options are ignored by default. DatastoreError where they cannot work."""
        return IndexParams(self.name, seed=seed)

    def build(self, keys: np.ndarray, params: IndexParams, *, add_batch: int = 65_536, progress: bool = False):
        """An index over keys float16/32 [N, d] (may be a memmap: read ``add_batch`` rows at a time)."""
        raise NotImplementedError

    def write(self, keys: np.ndarray, path: Path, params: IndexParams, *, progress: bool = False) -> None:
        """Build the index over ``keys`` and write it to ``path`` (and its ``extra_files``): what the
        datastore's index step calls. By default ``save(build(...))``."""
        self.save(self.build(keys, params, progress=progress), path)

    def save(self, index, path: Path) -> None:
        """Write ``index`` to ``path`` atomically (``files.atomic_write``)."""
        raise NotImplementedError

    def reads(self, head: bytes) -> bool:
        """Whether a file that starts with ``head`` (its first bytes) is this kind's to load."""
        raise NotImplementedError

    def load(self, path: Path, *, nprobe: int | None = None, gpu: bool | None = None):
        """The index written at ``path``; DatastoreError naming the file where it is unreadable."""
        raise NotImplementedError

    def matches(self, index) -> bool:
        """Whether ``index`` (an object ``build`` or ``load`` returned) is of this kind."""
        raise NotImplementedError

    def extra_files(self, path: Path) -> tuple[Path, ...]:
        """Files beside the index file ``path`` that belong to it; the datastore records the size of
        each as ``<suffix>_bytes`` in its manifest and checks it on resume."""
        return ()

    def for_search(self, index, k: int, nprobe: int | None):
        """The index to search for k neighbours, with ``nprobe`` lists probed where it has lists."""
        return index

    def to_gpu(self, index):
        """The index on the GPU, or unchanged where it cannot move."""
        return index


KINDS: Registry[IndexKind] = Registry("index type", error=DatastoreError, reserved=("auto",),
                                     unknown="unknown index type '{name}'; choose one of: auto, {names}")


def register(kind: IndexKind) -> IndexKind:
    """Add ``kind`` to the registry under ``kind.name`` (a new name, not ``auto``). Returns it."""
    if not kind.name or kind.name == "auto" or kind.name in KINDS:
        raise ValueError(f"index kind name {kind.name!r} is empty, 'auto' or registered already")
    return KINDS.register(kind)


def unregister(name: str) -> None:
    """Remove the kind ``name`` from the registry (a test's kind, once the test is done)."""
    KINDS.unregister(name)


def kind_names() -> tuple[str, ...]:
    """The registered kinds' names, in the order they were registered."""
    return KINDS.names()


def check_kind(name: str) -> str:
    """``name`` where it is ``auto`` or a registered kind; DatastoreError listing the choices."""
    if name != "auto":
        KINDS.get(name)
    return name


def get_kind(name: str) -> IndexKind:
    """The registered kind called ``name``; DatastoreError listing the choices where none is."""
    if name == "auto":
        raise DatastoreError("index type 'auto' is resolved by choose_params, not a kind of its own")
    return KINDS.get(name)


def named_kind(name: str) -> IndexKind | None:
    """The registered kind called ``name``, None for ``auto`` (which ``choose_params`` resolves);
    DatastoreError listing the choices for any other name."""
    return None if check_kind(name) == "auto" else KINDS.get(name)


def auto_pick(n: int, d: int, machine: Machine) -> IndexKind:
    """``auto``'s kind for N keys of dimension d on ``machine``: the first registered kind, in
    ``auto_order``, whose ``picks_for`` says yes."""
    asked = sorted((k for k in KINDS.values() if k.auto_order is not None), key=lambda k: k.auto_order)
    for kind in asked:
        if kind.picks_for(n, d, machine):
            return kind
    raise DatastoreError(f"--index auto: no registered index kind takes {n} keys of dimension {d} here; "
                         f"choose one of {', '.join(KINDS.names())} with --index")


def kind_of(index) -> IndexKind:
    """The registered kind whose ``matches`` says yes to ``index``; DatastoreError where none does."""
    for kind in KINDS.values():
        if kind.matches(index):
            return kind
    raise DatastoreError(f"{type(index).__name__} is not an index of a registered kind ({', '.join(KINDS)})")


def kind_reading(head: bytes) -> IndexKind:
    """The kind that loads a file starting with ``head``: the last registered whose ``reads`` says
    yes (the faiss kinds read any file, faiss reports a corrupt one, so later kinds come first)."""
    for kind in reversed(KINDS.values()):
        if kind.reads(head):
            return kind
    raise DatastoreError(f"no registered index kind ({', '.join(KINDS)}) reads a file starting with {head[:8]!r}")


def or_list(names) -> str:
    """``a, b or c``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def iter_batches(n: int, batch: int):
    """(start, end) of consecutive batches of ``batch`` rows out of ``n``."""
    for i in range(0, n, batch):
        yield i, min(i + batch, n)


def as_f32(x) -> np.ndarray:
    """``x`` as a C-contiguous float32 array (no copy where it is one)."""
    return np.ascontiguousarray(x, dtype=np.float32)
