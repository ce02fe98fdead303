"""The formats that travel between stages: a memory decoder checkpoint, a baseline folder, an adapt run.

- **Memory decoder checkpoint**: a Hugging Face model folder plus ``memdec.json`` (``MEMDEC_JSON``):
  ``format`` ("memdec"), ``version`` (1), ``base_model``, ``tokenizer_hash``, ``lambda`` (the
  recommended λ, in [0, 1]); optional ``temperature`` (divides the decoder's logits at inference,
  default 1, within ``TEMPERATURE_RANGE``), ``alpha``, ``teacher_base_weight``, ``k``, ``knn_temperature``,
  ``datastore``, ``datastore_manifest_hash``, ``corpus_hash``, ``n_parameters``, ``trainable_parameters``,
  ``train_seconds``, ``train_stats``, ``train_config``, ``lambda_source``, ``decoder`` (the decoder's
  shape, ``memdec.decoders``: absent or ``{"shape": "copy"}`` for a full model folder; else the shape's
  own record, e.g. ``{"shape": "fork", "blocks": K, "trunk_hash": sha256 hex, "trunk_dtype": "float32"}``,
  whose folder holds only its own tensors in ``decoder.safetensors``). Each shape owns its record: it
  registers the record's check in ``DECODER_RECORDS`` (a ``memdec.registry.Registry``), which
  ``read_memdec_json`` looks up; this module names no shape.
- **Baseline folder**: what its method saves (a model folder, a peft adapter) plus ``baseline.json``
  (``BASELINE_JSON``): ``format`` ("memdec-baseline"), ``version``, ``method`` (one of the names the
  reader is given: ``memdec.baselines``' registry), ``base_model``, ``tokenizer_hash``,
  ``corpus_hash``, the budget keys and ``lambda`` (null but for a method mixed with the base, whose
  folder also holds a ``memdec.json``, so it loads as a memory decoder). This module names no method.
- **Router folder** (``memdec router``, ``memdec.router``): ``router.safetensors`` (``ROUTER_WEIGHTS``, the
  gate's tensors) and ``router.json`` (``ROUTER_JSON``, written last): ``format`` ("memdec-router"),
  ``version`` (1), ``kind`` (a router kind of ``memdec.router``, which registers its record's own check in
  ``ROUTER_KINDS``: "mlp", or "constant" with its ``lambda``), ``d_base``,
  ``d_mem`` (the two models' hidden sizes), ``hidden`` (the gate's width), ``scalars`` (the names of the
  scalar features, in order), ``base_model``, ``tokenizer_hash``, ``decoder_fingerprint`` (the decoder's
  weights it was trained for, ``decoder_fingerprint``); optional ``base_fingerprint``, ``decoder``,
  ``fixed_lambda``, ``temperature``, ``train_config``, ``train_stats``, ``valid``.
- **Domain router folder** (``memdec router --domains``, ``memdec.router.DomainRouter``):
  ``domains.safetensors`` (``DOMAIN_ROUTER_WEIGHTS``, the classifier's tensors) and ``domains.json``
  (``DOMAIN_ROUTER_JSON``, written last): ``format`` ("memdec-domain-router"), ``version`` (1), ``d_base``
  (the base's hidden size), ``hidden`` (0: a linear classifier, else the MLP's width), ``classes``
  ("none", then each domain's name, in the classifier's order), ``domains`` (one object per domain:
  ``name`` (the model id serve answers it under: ``checks.check_model_name``), ``checkpoint`` (its folder),
  ``decoder_fingerprint``), ``base_model``, ``tokenizer_hash``; optional ``base_fingerprint``,
  ``train_config``, ``train_stats``, ``valid``. A router's ``base_fingerprint`` is checked against the base
  it is used with (``models.check_base_identity``). A folder that holds only what a save killed before
  its JSON leaves (``ROUTER_UNFINISHED``, ``DOMAIN_ROUTER_UNFINISHED``) is taken by the rerun as memdec's.
- **Adapt run folder**: ``settings.json``, ``memdec/`` (a checkpoint), ``datastore/``,
  ``baselines/METHOD/``: what ``eval --run`` and ``generate --run`` take (``run_paths``).

This module is the only reader and writer of these files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from .checks import (COUNT, LIST, NON_NEGATIVE, OBJECT, POSITIVE, TEXT, UNIT, WHOLE, Kind, check_field, check_fields,
                     check_model_name, one_of, or_null, shown, within)
from .errors import MemdecError, TokenizerMismatchError, one_line
from .files import atomic_write_json, read_json_object, temp_path
from .models import DEFAULT_MODEL, check_tokenizer, vocab_rows
from .registry import Registry

MEMDEC_JSON = "memdec.json"
CHECKPOINT_FORMAT = "memdec"
CHECKPOINT_VERSION = 1
# The sane ranges of what a decoder loads with (its weights, its record), checked once, as it loads:
TEMPERATURE_RANGE = (1e-3, 1e3)  # divides the decoder's logits (O(10)): beyond, one-hot or uniform to fp32 precision
MAX_ABS_WEIGHT = 1e4  # trained weights are O(1) (norm gains reach tens); a weight above this is corrupt or scaled
_MEMDEC_FIELDS: dict[str, Kind] = {"base_model": TEXT, "tokenizer_hash": TEXT, "lambda": UNIT}
_MEMDEC_OPTIONAL: dict[str, Kind] = {
    "temperature": within(*TEMPERATURE_RANGE), "alpha": UNIT, "teacher_base_weight": UNIT, "k": COUNT,
    "knn_temperature": POSITIVE,
    "datastore": TEXT, "datastore_manifest_hash": TEXT, "corpus_hash": TEXT, "n_parameters": WHOLE,
    "trainable_parameters": WHOLE, "train_seconds": NON_NEGATIVE, "train_stats": OBJECT, "train_config": OBJECT,
    "lambda_source": TEXT,
}  # absent or null where a writer had none

BASELINE_JSON = "baseline.json"
BASELINE_FORMAT = "memdec-baseline"
BASELINE_VERSION = 1
_BASELINE_FIELDS: dict[str, Kind] = {"base_model": TEXT, "tokenizer_hash": TEXT}  # and "method": one of the methods
_BASELINE_OPTIONAL: dict[str, Kind] = {
    "lambda": UNIT, "corpus_hash": TEXT, "n_parameters": WHOLE, "trainable_parameters": WHOLE,
    "train_seconds": NON_NEGATIVE, "train_stats": OBJECT, "train_config": OBJECT, "reused_from": TEXT,
}  # absent or null where a writer had none (lambda: null but for a mixed method)


# --- memory decoder checkpoints -----------------------------------------------------------------


def read_memdec_json(path: str | Path) -> dict:
    """The ``memdec.json`` of a memory decoder checkpoint (the folder, or the file itself), checked.

    Raises MemdecError if it is missing or invalid (the module docstring lists the keys).
    """
    file, info = _read_versioned_json(path, MEMDEC_JSON, "memory decoder checkpoint", "memdec train",
                                      ("checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION), _MEMDEC_FIELDS,
                                      _MEMDEC_OPTIONAL)
    check_decoder_record(info.get("decoder"), file)
    return info


def _read_versioned_json(path: str | Path, name: str, what: str, command: str, known: tuple[str, str, int],
                         fields: dict[str, Kind], optional: dict[str, Kind]) -> tuple[Path, dict]:
    """``(file, record)`` of the JSON file ``name`` in the folder ``path`` (or ``path`` itself): its
    ``format`` and ``version`` must be those of ``known`` = (kind, format, version), its ``fields``
    present and, like the ``optional`` ones, of their kinds. One MemdecError line naming the file and
    the field otherwise; ``command`` makes one."""
    kind, fmt, version = known
    path = Path(path).expanduser()
    file = path / name if path.is_dir() else path
    if not path.exists():
        raise MemdecError(f"{path}: no such {what}")
    if not file.is_file():
        raise MemdecError(f"{path}: not a {what} (no {name}; train one with `{command}`)")
    info = read_json_object(file, name)
    check_fields(info, file, {"format": TEXT, "version": WHOLE})
    if info["format"] != fmt or info["version"] != version:
        raise MemdecError(f"{file}: unsupported {kind} format {info['format']!r} version {info['version']!r}")
    check_fields(info, file, fields)
    check_fields(info, file, optional, optional=True)
    return file, info


@dataclasses.dataclass(frozen=True)
class DecoderRecord:
    """What a decoder shape registers in ``DECODER_RECORDS`` (``memdec.decoders.register``): the check of its
    ``memdec.json`` ``decoder`` record (``check(record, file)``, one MemdecError line naming the file and the
    field) and whether its folder is a full model folder (``load_memory_decoder`` loads only those)."""

    check: Callable[[dict, Path], None]
    full_model: bool = False


DECODER_RECORDS: Registry[DecoderRecord] = Registry(
    "decoder shape", unknown="{where}: decoder.shape {name!r} is not one of {names}")


def check_decoder_record(record, file: str | Path) -> None:
    """MemdecError naming ``file`` and the field unless ``record`` (``memdec.json``'s ``decoder``) is absent
    or an object whose ``shape`` is a registered one and whose fields that shape's check accepts."""
    if record is None:
        return
    if not isinstance(record, dict) or record.get("shape") not in DECODER_RECORDS:
        shape = record.get("shape") if isinstance(record, dict) else record
        raise MemdecError(DECODER_RECORDS.unknown_message(shape, where=str(file)))
    DECODER_RECORDS.get(record["shape"]).check(record, Path(file))


def write_memdec_json(folder: str | Path, info: dict) -> None:
    """Write ``memdec.json`` (format and version added); written last, it commits a checkpoint."""
    atomic_write_json(Path(folder) / MEMDEC_JSON, {**info, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION})


def check_checkpoint_tokenizer(tokenizer, info: dict, what: str) -> None:
    """``what`` (a checkpoint or baseline whose metadata is ``info``) must share ``tokenizer``."""
    check_tokenizer(tokenizer, info.get("tokenizer_hash"), what, made_with=info.get("base_model"))


def check_same_vocab(base, memdec) -> None:
    """Both models must produce logits over the same vocabulary. Raises TokenizerMismatchError."""
    nb, nm = vocab_rows(base), vocab_rows(memdec)
    if nb != nm:
        raise TokenizerMismatchError(
            f"the memory decoder scores {nm} tokens but the base model scores {nb}; "
            f"a memory decoder must be built for the base model's tokenizer"
        )


def load_safetensors(file: str | Path) -> dict:
    """The tensors of a safetensors file (on CPU); MemdecError naming it if it is missing, truncated
    or not safetensors."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise MemdecError(f"{file}: unreadable weights ({one_line(exc)})") from None


def check_weights(named: Iterable[tuple[str, torch.Tensor]], where) -> None:
    """MemdecError (one line naming ``where`` and the first bad tensor) unless every floating-point tensor
    of ``named`` ((name, tensor) pairs) is finite and no larger than ``MAX_ABS_WEIGHT`` in magnitude: what
    a decoder loads is checked once, as it loads, so that a corrupt file never gives NaN or empty text."""
    for name, tensor in named:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        low, high = (float(x) for x in torch.aminmax(tensor.detach()))  # NaN propagates
        peak = max(-low, high)
        if not math.isfinite(peak):
            raise MemdecError(f"{where}: {name} holds non-finite values (NaN or inf): the weights are corrupt")
        if peak > MAX_ABS_WEIGHT:
            raise MemdecError(f"{where}: {name} holds a weight of magnitude {peak:.3g}, above {MAX_ABS_WEIGHT:g}, "
                              f"which no trained weight reaches: the weights are corrupt or scaled")


def load_model_folder(path: str | Path, what: str, dtype=None):
    """``AutoModelForCausalLM`` from the folder ``path``, its weights from safetensors only (a pickled
    ``.bin`` is never read), which must be exactly those its ``config.json`` describes (a tied head may
    be absent) and sane (``check_weights``); MemdecError naming the folder and its weights files if not."""
    path = Path(path).expanduser()
    kwargs = {} if dtype is None else {"dtype": dtype}
    files = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))) or "no .safetensors file"
    try:
        with _quiet_transformers():  # its load report is many lines: the one line below says what is wrong
            model, loading = AutoModelForCausalLM.from_pretrained(
                str(path), use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign weights file raises many kinds
        raise MemdecError(f"{path}: cannot load {what} ({files}): {one_line(exc)}") from None
    wrong = [f"{len(keys)} {kind}: {_some(keys)}" for kind, keys in
             (("missing", loading.get("missing_keys")), ("unexpected", loading.get("unexpected_keys")),
              ("of another shape", [k[0] if isinstance(k, tuple) else k for k in loading.get("mismatched_keys") or ()]))
             if keys]
    if wrong:
        raise MemdecError(f"{path}: the weights ({files}) do not match its config.json (tensors {'; '.join(wrong)}): "
                          f"{what} would load as a partly random model")
    check_weights(model.named_parameters(), f"{path} ({what})")
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs errors only, inside the block."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _some(names, n: int = 3) -> str:
    """The first ``n`` of ``names`` (sorted), and how many more."""
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


def load_memory_decoder(path: str | Path, device=None, dtype=None):
    """Load ``(model, info)`` from a checkpoint folder, in eval mode."""
    info = read_memdec_json(path)
    if info.get("decoder") is not None and not DECODER_RECORDS.get(info["decoder"]["shape"]).full_model:
        raise MemdecError(f"{path}: a {info['decoder']['shape']} memory decoder holds only its own blocks; "
                          f"load it with its base model (memdec.decoders.load_decoder)")
    model = load_model_folder(path, "the memory decoder", dtype)
    if device is not None:
        model.to(device)
    return model.eval(), info


# --- baseline folders ---------------------------------------------------------------------------


def read_baseline_json(path: str | Path, methods: Collection[str]) -> dict:
    """The ``baseline.json`` of a baseline folder, checked; its ``method`` must be one of ``methods``
    (the caller's registry). Raises MemdecError."""
    path = Path(path).expanduser()
    file = path / BASELINE_JSON
    if not path.is_dir():
        raise MemdecError(f"{path}: no such baseline folder")
    if not file.is_file():
        raise MemdecError(f"{path}: not a baseline (no {BASELINE_JSON}; train one with `memdec baseline`)")
    info = read_json_object(file, BASELINE_JSON)
    if info.get("format") != BASELINE_FORMAT or check_field(info, "version", file, WHOLE) != BASELINE_VERSION:
        raise MemdecError(f"{file}: not a memdec baseline of a known format")
    check_fields(info, file, {"method": one_of(*methods), **_BASELINE_FIELDS})
    check_fields(info, file, _BASELINE_OPTIONAL, optional=True)
    return info


def write_baseline_json(folder: str | Path, info: dict, method: str, mixed: bool) -> None:
    """Write ``baseline.json`` for ``method``. A method ``mixed`` with the base like a memory decoder
    also gets a ``memdec.json`` (written first: loadable as one) and keeps its ``lambda``; a method
    scored alone gets ``lambda`` null."""
    folder = Path(folder)
    if mixed:
        write_memdec_json(folder, {k: v for k, v in info.items() if k != "method"})
    meta = {**info, "format": BASELINE_FORMAT, "version": BASELINE_VERSION, "method": method}
    if not mixed:
        meta["lambda"] = None  # evaluated alone
    atomic_write_json(folder / BASELINE_JSON, meta)


# --- router folders ----------------------------------------------------------------------------


ROUTER_JSON = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FORMAT = "memdec-router"
ROUTER_VERSION = 1
# each router kind (memdec.router) registers the check of its own fields (check(info, file): one MemdecError line)
ROUTER_KINDS: Registry[Callable[[dict, Path], None]] = Registry(
    "router kind", unknown='{where}: field "kind" must be one of {shown_names}, got {shown}')
# what a router's save killed before router.json leaves: a rerun of the command takes the folder as its own
ROUTER_UNFINISHED = (ROUTER_WEIGHTS, temp_path(ROUTER_WEIGHTS).name, temp_path(ROUTER_JSON).name)
_ROUTER_FIELDS: dict[str, Kind] = {
    "kind": TEXT, "d_base": COUNT, "d_mem": COUNT, "hidden": COUNT, "scalars": LIST,
    "base_model": TEXT, "tokenizer_hash": TEXT, "decoder_fingerprint": TEXT,
}
_ROUTER_OPTIONAL: dict[str, Kind] = {
    "lambda": UNIT, "base_fingerprint": TEXT, "decoder": TEXT, "fixed_lambda": UNIT, "temperature": POSITIVE,
    "train_config": OBJECT, "train_stats": OBJECT, "valid": OBJECT,
}  # absent or null where a writer had none ("lambda": the constant of a "constant" router)


def is_router_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding ``router.json`` (a router, or a checkpoint with one beside it)."""
    return (Path(path).expanduser() / ROUTER_JSON).is_file()


def read_router_json(path: str | Path) -> dict:
    """The ``router.json`` of a router folder (or the file itself), every field checked: one MemdecError
    line naming the file and the field."""
    file, info = _read_versioned_json(path, ROUTER_JSON, "router", "memdec router",
                                      ("router", ROUTER_FORMAT, ROUTER_VERSION), _ROUTER_FIELDS, _ROUTER_OPTIONAL)
    if not all(isinstance(name, str) for name in info["scalars"]):
        raise MemdecError(f'{file}: field "scalars" must be a list of strings, got {shown(info["scalars"])}')
    ROUTER_KINDS.get(info["kind"], where=str(file))(info, file)
    return info


def write_router_json(folder: str | Path, info: dict) -> None:
    """Write ``router.json`` (format and version added); written after the weights, it commits a router."""
    atomic_write_json(Path(folder) / ROUTER_JSON, {**info, "format": ROUTER_FORMAT, "version": ROUTER_VERSION})


DOMAIN_ROUTER_JSON = "domains.json"
DOMAIN_ROUTER_WEIGHTS = "domains.safetensors"
DOMAIN_ROUTER_FORMAT = "memdec-domain-router"
DOMAIN_ROUTER_VERSION = 1
# what a domain router's save killed before domains.json leaves (as ``ROUTER_UNFINISHED``)
DOMAIN_ROUTER_UNFINISHED = (DOMAIN_ROUTER_WEIGHTS, temp_path(DOMAIN_ROUTER_WEIGHTS).name,
                            temp_path(DOMAIN_ROUTER_JSON).name)
NO_DOMAIN = "none"  # the class of text no decoder should answer: the base alone
_DOMAIN_ROUTER_FIELDS: dict[str, Kind] = {
    "d_base": COUNT, "hidden": WHOLE, "classes": LIST, "domains": LIST, "base_model": TEXT, "tokenizer_hash": TEXT,
}
_DOMAIN_ROUTER_OPTIONAL: dict[str, Kind] = {
    "base_fingerprint": TEXT, "train_config": OBJECT, "train_stats": OBJECT, "valid": OBJECT,
}
_DOMAIN_FIELDS: dict[str, Kind] = {"name": TEXT, "checkpoint": TEXT, "decoder_fingerprint": TEXT}


def is_domain_router_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding ``domains.json`` (a domain router)."""
    return (Path(path).expanduser() / DOMAIN_ROUTER_JSON).is_file()


def read_domain_router_json(path: str | Path) -> dict:
    """The ``domains.json`` of a domain router folder, every field checked (one MemdecError line naming
    the file and the field); ``classes`` must be "none" then each domain's name, in order."""
    path = Path(path).expanduser()
    file = path / DOMAIN_ROUTER_JSON
    if not path.is_dir():
        raise MemdecError(f"{path}: no such domain router folder")
    if not file.is_file():
        raise MemdecError(f"{path}: not a domain router (no {DOMAIN_ROUTER_JSON}; train one with `memdec router "
                          f"--domains`)")
    info = read_json_object(file, DOMAIN_ROUTER_JSON)
    check_fields(info, file, {"format": TEXT, "version": WHOLE})
    if info["format"] != DOMAIN_ROUTER_FORMAT or info["version"] != DOMAIN_ROUTER_VERSION:
        raise MemdecError(f"{file}: unsupported domain router format {info['format']!r} version {info['version']!r}")
    check_fields(info, file, _DOMAIN_ROUTER_FIELDS)
    check_fields(info, file, _DOMAIN_ROUTER_OPTIONAL, optional=True)
    for i, domain in enumerate(info["domains"]):
        if not isinstance(domain, dict):
            raise MemdecError(f'{file}: field "domains" item {i} must be a JSON object, got {shown(domain)}')
        check_fields(domain, f"{file} (domains item {i})", _DOMAIN_FIELDS)
        check_model_name(domain["name"], f'{file}: field "domains" item {i}: the name')
    names = [NO_DOMAIN, *(d["name"] for d in info["domains"])]
    if info["classes"] != names or len(set(names)) != len(names) or len(names) < 2:
        raise MemdecError(f'{file}: field "classes" must be "{NO_DOMAIN}" then each domain\'s name once, in order '
                          f'({names}), got {shown(info["classes"])}')
    return info


def write_domain_router_json(folder: str | Path, info: dict) -> None:
    """Write ``domains.json`` (format and version added); written after the weights, it commits a domain router."""
    atomic_write_json(Path(folder) / DOMAIN_ROUTER_JSON,
                      {**info, "format": DOMAIN_ROUTER_FORMAT, "version": DOMAIN_ROUTER_VERSION})


def decoder_fingerprint(folder: str | Path) -> str:
    """sha256 (16 hex digits) of a memory decoder's weights: every ``*.safetensors`` file of its folder
    (name and bytes), so that a rewritten ``memdec.json`` (a new λ) keeps it and retrained weights do not.
    A router's weights kept beside them (``ROUTER_WEIGHTS``, ``DOMAIN_ROUTER_WEIGHTS``) are not the decoder's:
    a router saved into its checkpoint folder must not change the fingerprint it was trained for."""
    digest = hashlib.sha256()
    for f in sorted(Path(folder).expanduser().glob("*.safetensors")):
        if f.name in (ROUTER_WEIGHTS, DOMAIN_ROUTER_WEIGHTS):
            continue
        digest.update(f"{f.name}\0".encode())
        with open(f, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:16]


# --- adapt run folders ---------------------------------------------------------------------------


_RUN_FIELDS: dict[str, Kind] = {"model": TEXT, "valid": TEXT, "test": TEXT, "test_tokens": or_null(COUNT)}


def read_run_settings(file: Path) -> dict:
    """An adapt run's ``settings.json``, with the fields ``eval --run`` and ``generate --run`` take
    checked (``test_tokens``: a count, or null for the whole corpus). Raises MemdecError."""
    settings = read_json_object(file, "run settings")
    check_fields(settings, file, _RUN_FIELDS)
    return settings


def run_paths(run: str | Path) -> dict:
    """What a finished ``memdec adapt`` run folder provides to ``eval`` and ``generate``:
    model, memdec, knn, baseline folders (each ``baselines/*/`` with a ``baseline.json``, by name; eval
    orders their rows), corpora."""
    run = Path(run)
    settings = run / "settings.json"
    if not settings.is_file() or not (run / "memdec" / MEMDEC_JSON).is_file():
        raise MemdecError(f"{run}: not a finished memdec adapt run (no settings.json or memdec/{MEMDEC_JSON})")
    s = read_run_settings(settings)
    baselines = sorted(str(f.parent) for f in (run / "baselines").glob(f"*/{BASELINE_JSON}") if f.is_file())
    return {"model": s["model"], "memdec": str(run / "memdec"), "knn": str(run / "datastore"), "baseline": baselines,
            "valid": s["valid"], "test": s["test"], "test_tokens": s["test_tokens"]}


RUN_FLAGS = ("model", "memdec", "knn")  # what a run folder gives eval and generate: never beside --run


def apply_run(cfg):
    """A copy of an eval/generate config with --model, --memdec (and --knn, and the run's baselines
    unless --baseline is given) taken from ``cfg.run``. A flag that the run would replace is refused,
    never silently overridden (like ``memdec serve``). Without a run, --model left out is DEFAULT_MODEL."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if getattr(cfg, "run", None) is None:
        return dataclasses.replace(cfg, model=DEFAULT_MODEL) if getattr(cfg, "model", "") is None else cfg
    paths = run_paths(cfg.run)
    given = {k: paths[k] for k in RUN_FLAGS if k in names}
    clash = [k for k in given if getattr(cfg, k) is not None]
    if clash:
        replaced = "; ".join(f"--{k} {getattr(cfg, k)} by the run's {given[k]}" for k in clash)
        raise MemdecError(f"give --run or {' or '.join('--' + k for k in clash)}, not both: --run {cfg.run} names "
                          f"its own and would replace {replaced}")
    if "baseline" in names and not cfg.baseline and paths["baseline"]:
        given["baseline"] = paths["baseline"]
    return dataclasses.replace(cfg, **given)
