"""A built datastore, read only: the typed manifest record, the memory-mapped arrays, and the hook.

Every module that only reads a datastore (train, knnlm, knowledge, transfer, tasks, evaluate)
imports this one; ``memdec.datastore`` (the builder) writes what it reads.

``DIR/manifest.json`` is a ``Manifest``: the identity of the inputs (model and, where it has a local
folder, the fingerprint of its weights, ``model_hash``, which kNN-LM checks against the base it is
used with; tokenizer, corpus, windowing), the keys' layer and dimension, and one record per build
step (``KeysStep``, ``IndexStep``, ``TargetsStep``: status, parameters, counters). ``Manifest.from_json`` checks every
field it types (one line naming the file and the field), ``to_json`` gives the same JSON back key
for key, in the same order (a record keeps the order its keys were read or set in, as a dict
does), so the bytes of a manifest, and every hash taken from it, never change by going through
the record. A field a record lacks reads as None; ``drop`` removes one.

The hook: ``FFNInputCapture`` records the input of the last transformer block's feed-forward
layer, the kNN-LM key, for the builder (``forward_ffn_inputs``, ``window_keys``) and for
retrieval at inference (``memdec.knnlm``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .checks import (BOOL, COUNT, LIST, NON_NEGATIVE, OBJECT, POSITIVE, SCORE, TEXT, WHOLE, Kind, check_field, one_of,
                     or_null)
from .errors import DatastoreError
from .files import atomic_write_json, check_npy, read_json_object
from .index import load_index
from .models import with_prefix
from .targets import PROB_DTYPES, KnnTargets, load_targets

MANIFEST = "manifest.json"
VERSION = 1
DEFAULT_K = 1024  # neighbours per position of a new datastore, and of kNN-LM where a datastore records none
DEFAULT_KNN_TEMP = 1.0
FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
STATUS = one_of("pending", "running", "done")


# --- records: typed JSON objects that keep their keys' order -------------------------------------


def typed(kind: Kind | None = None, *, required: bool = False, always: bool = False, default=None):
    """A record field of ``kind`` (None: any JSON value). ``required``: a manifest lacking it is refused;
    ``always``: a record built in code writes it even when it is None (as null)."""
    return field(default=default, metadata={"kind": kind, "required": required, "always": always or required})


@dataclass
class Record:
    """A JSON object with typed fields, written back key for key in the order they were read or set.

    A field set for the first time goes last, as in a dict; ``drop`` removes one. Keys a record
    does not type are kept as they were (``extra``), so a manifest round-trips exactly.
    """

    WHEN_DONE: ClassVar[dict[str, Kind]] = {}  # fields a finished step must hold (status "done")

    def __post_init__(self) -> None:
        order = [f.name for f in dataclasses.fields(self) if f.metadata["always"] or getattr(self, f.name) is not None]
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_extra", {})

    def __setattr__(self, name: str, value) -> None:
        order = self.__dict__.get("_order")
        if order is not None and name not in order:
            order.append(name)
        object.__setattr__(self, name, value)

    def drop(self, name: str) -> None:
        """Remove the field ``name`` (it is no longer written, and reads as None)."""
        if name in self._order:
            self._order.remove(name)
        if name in self._extra:
            del self._extra[name]
        else:
            object.__setattr__(self, name, None)

    def has(self, name: str) -> bool:
        """Whether the record holds the field ``name`` (typed or not), null or not."""
        return name in self._order

    def get_extra(self, name: str):
        """The value of ``name``, a key this record does not type (None where absent)."""
        return self._extra.get(name)

    def set_extra(self, name: str, value) -> None:
        """Set ``name``, a key this record does not type (an index's ``<suffix>_bytes``)."""
        if name in {f.name for f in dataclasses.fields(self)}:
            setattr(self, name, value)
            return
        if name not in self._order:
            self._order.append(name)
        self._extra[name] = value

    def update(self, **values) -> None:
        """Set several fields, in the order given (new ones go last in that order)."""
        for name, value in values.items():
            setattr(self, name, value)

    def to_json(self) -> dict:
        """The JSON object: every field the record holds, in its order."""
        out = {}
        for name in self._order:
            value = self._extra[name] if name in self._extra else getattr(self, name)
            out[name] = value.to_json() if isinstance(value, Record) else value
        return out

    @classmethod
    def from_json(cls, root: dict, where, path: str = ""):
        """The record at the dotted ``path`` of ``root`` (the JSON object read from the file ``where``),
        every typed field checked: DatastoreError naming the file and the field."""
        obj = root if not path else check_field(root, path, where, OBJECT, error=DatastoreError)
        prefix = f"{path}." if path else ""
        values = {}
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("record")
            if sub is not None:
                values[f.name] = sub.from_json(root, where, prefix + f.name)
            elif f.metadata["kind"] is not None:
                check_field(root, prefix + f.name, where, f.metadata["kind"], optional=not f.metadata["required"],
                            error=DatastoreError)
                values[f.name] = obj.get(f.name)
            else:
                values[f.name] = obj.get(f.name)
        if obj.get("status") == "done":
            for name, kind in cls.WHEN_DONE.items():
                check_field(root, name, where, kind, error=DatastoreError)
        record = cls(**values)
        names = {f.name for f in dataclasses.fields(cls)}
        object.__setattr__(record, "_order", list(obj))
        object.__setattr__(record, "_extra", {k: v for k, v in obj.items() if k not in names})
        return record


def nested(cls: type[Record]):
    """A field holding the record ``cls`` (always there)."""
    return field(default_factory=cls, metadata={"kind": OBJECT, "required": True, "always": True, "record": cls})


@dataclass
class KeysStep(Record):
    """Step 1: the keys, chunk by chunk (with several processes, ``shards``: their chunk ranges)."""

    status: str = typed(STATUS, required=True, default="pending")
    batch_size: int | None = typed(COUNT)
    key_model: dict | None = typed(OBJECT)  # {spec, hash}; absent: the base model's own keys
    chunks_done: int | None = typed(WHOLE)
    shards: list | None = typed(LIST)
    chunks_total: int | None = typed(WHOLE)
    positions_done: int | None = typed(WHOLE)
    seconds: float | None = typed(NON_NEGATIVE)
    positions: int | None = typed(WHOLE)
    tokens_per_s: float | None = typed(NON_NEGATIVE)
    processes: int | None = typed(COUNT)
    shard_tokens_per_s: list | None = typed(LIST)
    shard_positions: list | None = typed(LIST)
    dropped: bool | None = typed(BOOL)  # keys.npy deleted after the build (--no-keep-keys)


@dataclass
class IndexStep(Record):
    """Step 2: the index (``type``, its ``params``), and the size of its file(s)."""

    WHEN_DONE: ClassVar[dict[str, Kind]] = {"steps.index.type": TEXT, "steps.index.params": OBJECT}

    status: str = typed(STATUS, required=True, default="pending")
    type: str | None = typed(TEXT)
    params: dict | None = typed(OBJECT)
    bytes: int | None = typed(WHOLE)
    seconds: float | None = typed(NON_NEGATIVE)


@dataclass
class TargetsStep(Record):
    """Step 3: the kNN targets, their settings (k, temperature, top_m, index, prob_dtype) and counters."""

    WHEN_DONE: ClassVar[dict[str, Kind]] = {"steps.targets.k": COUNT, "steps.targets.temperature": POSITIVE,
                                            "steps.targets.nnz": WHOLE}

    status: str = typed(STATUS, required=True, default="pending")
    k: int | None = typed(COUNT)
    temperature: float | None = typed(POSITIVE)
    top_m: int | None = typed(COUNT)
    index: dict | None = typed(OBJECT)  # the index params the targets were searched with
    prob_dtype: str | None = typed(one_of(*PROB_DTYPES))  # absent: float16 (a step from before uint8)
    nprobe: int | None = typed(COUNT)
    search_batch: int | None = typed(COUNT)
    rows_done: int | None = typed(WHOLE)
    nnz: int | None = typed(WHOLE)
    kl_sum: float | None = typed(SCORE)
    self_missing: int | None = typed(WHOLE)
    empty_slots: int | None = typed(WHOLE)
    seconds: float | None = typed(NON_NEGATIVE)
    shards: list | None = typed(LIST)
    merged: int | None = typed(WHOLE)
    shard_rows_per_s: list | None = typed(LIST)
    processes: int | None = typed(COUNT)
    rows_per_s: float | None = typed(NON_NEGATIVE)
    mean_support: float | None = typed(NON_NEGATIVE)
    support_percentiles: dict | None = typed(OBJECT)
    kl_truncation_mean: float | None = typed(SCORE)
    bytes_per_token: float | None = typed(NON_NEGATIVE)


@dataclass
class Steps(Record):
    """The three build steps, each with its status."""

    keys: KeysStep = nested(KeysStep)
    index: IndexStep = nested(IndexStep)
    targets: TargetsStep = nested(TargetsStep)


IDENTITY_FIELDS = ("model", "tokenizer_hash", "corpus_hash", "block_size", "stride", "prefix_token")


@dataclass
class Manifest(Record):
    """``DIR/manifest.json``: what a datastore was built from, and the state of each step."""

    WHEN_DONE: ClassVar[dict[str, Kind]] = {}

    version: int = typed(WHOLE, required=True, default=VERSION)
    model: str = typed(TEXT, required=True, default="")
    model_hash: str | None = typed(TEXT)  # the base's weights (models.base_fingerprint); absent: not recorded
    tokenizer_hash: str = typed(TEXT, required=True, default="")
    corpus: str = typed(TEXT, required=True, default="")
    corpus_hash: str = typed(TEXT, required=True, default="")
    text_field: str | None = typed(TEXT, always=True)
    n_keys: int = typed(COUNT, required=True, default=1)  # positions: tokens with a successor
    block_size: int = typed(COUNT, required=True, default=1)
    stride: int = typed(COUNT, required=True, default=1)
    max_tokens: int | None = typed(COUNT, always=True)
    prefix_token: int | None = typed(WHOLE)  # the BOS put before every window (models.bos_prefix)
    layer: str | None = typed(or_null(TEXT), required=True)  # the hooked module, once the keys began
    dim: int | None = typed(or_null(COUNT), required=True)
    distance: str | None = typed(TEXT, always=True, default="squared_l2")
    key_dtype: str | None = typed(TEXT, always=True, default="float16")
    steps: Steps = nested(Steps)
    corpus_source: dict | None = typed()  # what a stdlib corpus read (data.corpus_source)
    disk: dict | None = typed(OBJECT)  # the files' sizes once built

    @classmethod
    def from_json(cls, root: dict, where, path: str = "") -> Manifest:
        """The manifest read from the file ``where``: its version, every typed field, and the fields
        each finished step records; one DatastoreError line naming the file and the field, and how
        to rebuild."""
        try:
            version = check_field(root, "version", where, WHOLE, error=DatastoreError)
            if version != VERSION:
                raise DatastoreError(f"{where}: not a version-{VERSION} memdec manifest (version {version})")
            manifest = super().from_json(root, where, path)
            if manifest.steps.keys.status == "done":
                check_field(root, "layer", where, TEXT, error=DatastoreError)
                check_field(root, "dim", where, COUNT, error=DatastoreError)
        except DatastoreError as e:
            raise DatastoreError(f"{e}; {rebuild_hint(root)}") from None
        return manifest

    def identity(self) -> dict:
        """The fields that say what the datastore was built from (``IDENTITY_FIELDS``)."""
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}


def rebuild_hint(root: dict) -> str:
    """How to build a datastore anew from what a (corrupt or old) manifest says it was built from."""
    model, corpus = (root.get(f) if isinstance(root.get(f), str) else f.upper() for f in ("model", "corpus"))
    return f"rebuild it with: memdec datastore --model {model} --corpus {corpus} --out NEW"


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the datastore folder ``path``, every field checked; DatastoreError naming the
    file and the field if it is missing, corrupt or of another version."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise DatastoreError(f"{path}: not a datastore (no {MANIFEST}); build one with memdec datastore")
    return Manifest.from_json(read_json_object(mpath, "datastore manifest", DatastoreError), mpath)


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> None:
    """Write the manifest of the folder ``path`` atomically (temporary file, then rename)."""
    atomic_write_json(Path(path) / MANIFEST, manifest.to_json())


def key_model_text(key_model: dict | None) -> str:
    """A key model (``{spec, hash}``, or None: the base) in words."""
    return f"{key_model['spec']} (hash {key_model['hash']})" if key_model else "the base model"


# --- the hook on the last FFN input ----------------------------------------------------------


def _arch(model) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    return f"{type(model).__name__} (model_type '{model_type}')"


def find_ffn_input_module(model: nn.Module) -> tuple[str, nn.Module]:
    """The feed-forward layer of the last transformer block: ``(qualified name, module)``.

    Generic: the block list is the ``nn.ModuleList`` whose blocks have an ``mlp``-like child
    (``mlp``, ``feed_forward``, ``ffn``, ``block_sparse_moe``), preferring one as long as the
    config's layer count. This places Llama, Qwen2, Mistral, Gemma (``model.layers.{-1}.mlp``),
    GPT-2 (``transformer.h.{-1}.mlp``) and GPT-NeoX (``gpt_neox.layers.{-1}.mlp``).
    Raises DatastoreError naming the architecture where there is none.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            ffn = next((f for f in FFN_NAMES if isinstance(getattr(mod[-1], f, None), nn.Module)), None)
            if ffn is not None:
                candidates.append((len(mod) == n_layers, len(mod), name, ffn, mod))
    if not candidates:
        raise DatastoreError(
            f"cannot place the kNN hook in {_arch(model)}: no transformer block list whose blocks have a "
            f"feed-forward submodule named {' / '.join(FFN_NAMES)} (memdec knows Llama, Qwen2, Mistral, "
            f"Gemma, GPT-2 and GPT-NeoX layouts)"
        )
    _, _, name, ffn, blocks = max(candidates, key=lambda c: (c[0], c[1]))
    prefix = f"{name}." if name else ""
    return f"{prefix}{len(blocks) - 1}.{ffn}", getattr(blocks[-1], ffn)


class _StopForward(Exception):
    """Raised by the hook to end a forward as soon as the key is captured."""


class FFNInputCapture:
    """Context manager: a forward pre-hook that records the input of the last block's FFN.

    After each forward, ``.last`` is that input, a tensor [B, L, d] (detached). With
    ``stop=True`` the hook also ends the forward right there (the rest of the last block, the
    final norm and the LM head never run); call the model through ``forward_ffn_inputs``, which
    expects that. Usable at inference (kNN-LM) with ``stop=False`` around a normal forward.
    """

    def __init__(self, model: nn.Module, stop: bool = False):
        self.model, self.stop = model, stop
        self.name, self.module = find_ffn_input_module(model)
        self.last: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.last = hidden.detach()
        if self.stop:
            raise _StopForward

    def __enter__(self) -> FFNInputCapture:
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def model_body(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (``model.base_model``, e.g. ``model.model``)."""
    return getattr(model, "base_model", model)


@torch.inference_mode()
def forward_ffn_inputs(model: nn.Module, input_ids: torch.Tensor, capture: FFNInputCapture) -> torch.Tensor:
    """Run the model body over ``input_ids`` [B, L] and return the captured FFN inputs [B, L, d]."""
    capture.last = None
    try:
        model_body(model)(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    if capture.last is None:
        raise DatastoreError(f"the hook on {capture.name} of {_arch(model)} never fired")
    return capture.last


def window_keys(model, tokens: np.ndarray, batch: np.ndarray, capture: FFNInputCapture, device="cpu",
                prefix: int | None = None) -> np.ndarray:
    """Keys of the positions a batch of windows stores: float16 [P, d], P = batch[-1,1] - batch[0,2].

    tokens: int [n_tokens] (a memory-mapped stream: only the batch's windows are read); batch:
    int64 [b, 3] of equal-shaped windows; ``prefix``: a token put in front of every window
    (``models.bos_prefix``).
    """
    start, end, score_start = batch[:, 0], batch[:, 1], batch[:, 2]
    length, n_keep = int(end[0] - start[0]), int(end[0] - score_start[0])
    idx = np.asarray(start)[:, None] + np.arange(length)[None, :]
    ids = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    hidden = forward_ffn_inputs(model, with_prefix(ids, prefix).to(device), capture)[:, -n_keep:]
    keys = hidden.reshape(-1, hidden.shape[-1]).to(torch.float16).cpu()
    if not torch.isfinite(keys).all():
        raise DatastoreError(f"non-finite keys at {capture.name} (the hidden state overflows float16)")
    return keys.numpy()


# --- reading a datastore ---------------------------------------------------------------------


@dataclass
class Datastore:
    """A built datastore, memory-mapped: ``keys[p]`` (fp16 [d]) has value ``values[p] == tokens[p+1]``."""

    path: Path
    manifest: Manifest
    tokens: np.ndarray  # int32 [N+1]
    keys: np.ndarray | None  # float16 [N, d]; None where deleted after the build (--no-keep-keys)
    values: np.ndarray  # int32 [N]

    @property
    def n_keys(self) -> int:
        return self.manifest.n_keys

    @property
    def dim(self) -> int:
        return int(self.manifest.dim)

    def load_index(self, nprobe: int | None = None):
        """The index (faiss, or a TorchFlatIndex), with the nprobe the targets used unless given."""
        if self.manifest.steps.index.status != "done":
            raise DatastoreError(f"{self.path}: the index is not built; rerun memdec datastore --out {self.path}")
        return load_index(self.path / "index.faiss", nprobe or self.manifest.steps.targets.nprobe)

    def load_targets(self) -> KnnTargets:
        """The kNN targets, memory-mapped and validated (``targets.load_targets``)."""
        return targets_of(self.path, self.manifest)


def open_datastore(path: str | os.PathLike) -> Datastore:
    """Memory-map a datastore whose keys step is done, checking every file against the manifest.

    Raises DatastoreError on a missing manifest, an unfinished keys step, or a missing,
    truncated or mismatched tokens/keys/values file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    status = manifest.steps.keys.status
    if status != "done":
        raise DatastoreError(f"{path}: the keys are not finished (status: {status}); "
                             f"rerun memdec datastore with --out {path} to resume")
    n, d = manifest.n_keys, int(manifest.dim)
    dropped = bool(manifest.steps.keys.dropped)
    check_npy(path / "tokens.npy", np.int32, (n + 1,), "token stream")
    if not dropped:
        check_npy(path / "keys.npy", np.float16, (n, d), "keys")
    check_npy(path / "values.npy", np.int32, (n,), "values")
    return Datastore(
        path=path,
        manifest=manifest,
        tokens=np.load(path / "tokens.npy", mmap_mode="r"),
        keys=None if dropped else np.load(path / "keys.npy", mmap_mode="r"),
        values=np.load(path / "values.npy", mmap_mode="r"),
    )


def open_targets(path: str | os.PathLike) -> KnnTargets:
    """The kNN targets of the datastore at ``path``, memory-mapped and validated."""
    return targets_of(path, read_manifest(path))


def targets_of(path: str | os.PathLike, manifest: Manifest) -> KnnTargets:
    """The kNN targets of the datastore at ``path`` whose manifest is ``manifest`` (``targets.load_targets``
    on the fields its targets step records)."""
    step = manifest.steps.targets
    return load_targets(path, n_keys=manifest.n_keys, status=step.status, nnz=step.nnz, k=step.k,
                        temperature=step.temperature, top_m=step.top_m, prob_dtype=step.prob_dtype)


def recorded_k(path: str | os.PathLike) -> int:
    """The k of the datastore's targets, else ``DEFAULT_K``."""
    return read_manifest(path).steps.targets.k or DEFAULT_K


def describe(path: str | os.PathLike) -> str:
    """A few lines summing up a built datastore (for the CLI)."""
    m = read_manifest(path)
    keys, index, targets = m.steps.keys, m.steps.index, m.steps.targets
    pct = targets.support_percentiles or {}
    lines = [
        f"datastore {path}: {m.n_keys} keys of dim {m.dim} at {m.layer} ({m.model}, {m.corpus})",
        f"  keys: {keys.seconds or 0:.1f} s, {keys.tokens_per_s or 0:.1f} tok/s"
        + (f", from the key model {key_model_text(keys.key_model)}" if keys.key_model else ""),
        f"  index: {index.type} {json.dumps(index.params or {})}, {index.seconds or 0:.1f} s",
        f"  targets: k={targets.k} T={targets.temperature} top_m={targets.top_m or 'all'} "
        f"probs={targets.prob_dtype or 'float16'} "
        f"nprobe={targets.nprobe}, {targets.seconds or 0:.1f} s, {targets.rows_per_s or 0:.1f} rows/s",
        f"  distinct tokens per row: mean {targets.mean_support or 0:.1f}, "
        + ", ".join(f"{q} {v:g}" for q, v in pct.items()),
        f"  KL lost to truncation (mean -log kept mass): {targets.kl_truncation_mean or 0:.3g} nats",
        f"  disk: {(m.disk or {}).get('bytes_per_token', 0):.1f} bytes/token "
        f"(targets {targets.bytes_per_token or 0:.1f})",
    ]
    if keys.dropped:
        lines.append("  keys.npy deleted after the build (--no-keep-keys)")
    if targets.self_missing:
        lines.append(f"  note: {targets.self_missing} positions did not find themselves among their neighbours")
    return "\n".join(lines)
