"""The formats that travel between stages: a memory decoder checkpoint, a baseline folder, an adapt run.

- **Memory decoder checkpoint**: a Hugging Face model folder plus ``memdec.json`` (``MEMDEC_JSON``):
  ``format`` ("memdec"), ``version`` (1), ``base_model``, ``tokenizer_hash``, ``lambda`` (the
  recommended λ, in [0, 1]); optional ``temperature`` (divides the decoder's logits at inference,
  default 1), ``alpha``, ``teacher_base_weight``, ``k``, ``knn_temperature``, ``datastore``,
  ``datastore_manifest_hash``, ``corpus_hash``, ``n_parameters``, ``trainable_parameters``,
  ``train_seconds``, ``train_stats``, ``train_config``, ``lambda_source``, ``decoder`` (the decoder's
  shape, ``memdec.decoders``: absent or ``{"shape": "copy"}`` for a full model folder;
  ``{"shape": "fork", "blocks": K, "trunk_hash": sha256 hex, "trunk_dtype": "float32"}`` for a fork,
  whose folder holds only its own blocks in ``decoder.safetensors``; ``DECODER_RECORDS``).
- **Baseline folder**: a model folder (dapt, ce-decoder) or a peft adapter (lora) plus
  ``baseline.json`` (``BASELINE_JSON``): ``format`` ("memdec-baseline"), ``version``, ``method``
  (one of ``METHODS``), ``base_model``, ``tokenizer_hash``, ``corpus_hash``, the budget keys and
  ``lambda`` (ce-decoder only; it also holds a ``memdec.json``, so it loads as a memory decoder).
- **Adapt run folder**: ``settings.json``, ``memdec/`` (a checkpoint), ``datastore/``,
  ``baselines/METHOD/``: what ``eval --run`` and ``generate --run`` take (``run_paths``).

This module is the only reader and writer of these files.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from transformers import AutoModelForCausalLM

from .checks import check_lambda
from .errors import MemdecError, TokenizerMismatchError, one_line
from .files import atomic_write_json, read_json_object
from .models import check_tokenizer, vocab_rows

MEMDEC_JSON = "memdec.json"
CHECKPOINT_FORMAT = "memdec"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = ("format", "version", "base_model", "tokenizer_hash", "lambda")

METHODS = ("ce-decoder", "dapt", "lora")  # also the order of their rows in a table
BASELINE_JSON = "baseline.json"
BASELINE_FORMAT = "memdec-baseline"
BASELINE_VERSION = 1
LORA_ADAPTER = "adapter_model.safetensors"


# --- memory decoder checkpoints -----------------------------------------------------------------


def read_memdec_json(path: str | Path) -> dict:
    """The ``memdec.json`` of a memory decoder checkpoint (the folder, or the file itself), checked.

    Raises MemdecError if it is missing or invalid (the module docstring lists the keys).
    """
    path = Path(path).expanduser()
    file = path / MEMDEC_JSON if path.is_dir() else path
    if not path.exists():
        raise MemdecError(f"{path}: no such memory decoder checkpoint")
    if not file.is_file():
        raise MemdecError(f"{path}: not a memory decoder checkpoint (no {MEMDEC_JSON}; train one with `memdec train`)")
    info = read_json_object(file, MEMDEC_JSON)
    missing = [k for k in _REQUIRED_KEYS if k not in info]
    if missing:
        raise MemdecError(f"{file}: {MEMDEC_JSON} lacks {', '.join(missing)}")
    if info["format"] != CHECKPOINT_FORMAT or info["version"] != CHECKPOINT_VERSION:
        raise MemdecError(f"{file}: unsupported checkpoint format {info['format']!r} version {info['version']!r}")
    check_lambda(info["lambda"], what=f"{file}: lambda")
    check_decoder_record(info.get("decoder"), file)
    return info


DECODER_RECORDS = {  # memdec.json "decoder": each shape's fields (besides "shape") and their checks
    "copy": {},
    "fork": {
        "blocks": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "trunk_hash": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
        "trunk_dtype": lambda v: isinstance(v, str) and v.isidentifier(),
    },
}


def check_decoder_record(record, file: str | Path) -> None:
    """MemdecError naming ``file`` and the field unless ``record`` (``memdec.json``'s ``decoder``)
    is absent or one of ``DECODER_RECORDS`` with exactly its fields, each valid."""
    if record is None:
        return
    if not isinstance(record, dict) or record.get("shape") not in DECODER_RECORDS:
        shape = record.get("shape") if isinstance(record, dict) else record
        raise MemdecError(f"{file}: decoder.shape {shape!r} is not one of {', '.join(DECODER_RECORDS)}")
    fields = DECODER_RECORDS[record["shape"]]
    for key in sorted(set(fields) | set(record) - {"shape"}):
        if key not in fields:
            raise MemdecError(f"{file}: decoder.{key} is not a field of a {record['shape']!r} decoder")
        if key not in record or not fields[key](record[key]):
            raise MemdecError(f"{file}: decoder.{key} is missing or invalid ({record.get(key)!r})")


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


def load_memory_decoder(path: str | Path, device=None, dtype=None):
    """Load ``(model, info)`` from a checkpoint folder, in eval mode."""
    info = read_memdec_json(path)
    if (info.get("decoder") or {}).get("shape", "copy") != "copy":
        raise MemdecError(f"{path}: a {info['decoder']['shape']} memory decoder holds only its own blocks; "
                          f"load it with its base model (memdec.decoders.load_decoder)")
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(path).expanduser()), **kwargs)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign weights file raises many kinds
        raise MemdecError(f"{path}: cannot load the memory decoder ({one_line(exc)})") from None
    if device is not None:
        model.to(device)
    return model.eval(), info


# --- baseline folders ---------------------------------------------------------------------------


def read_baseline_json(path: str | Path) -> dict:
    """The ``baseline.json`` of a baseline folder, checked. Raises MemdecError."""
    path = Path(path).expanduser()
    file = path / BASELINE_JSON
    if not path.is_dir():
        raise MemdecError(f"{path}: no such baseline folder")
    if not file.is_file():
        raise MemdecError(f"{path}: not a baseline (no {BASELINE_JSON}; train one with `memdec baseline`)")
    info = read_json_object(file, BASELINE_JSON)
    if info.get("format") != BASELINE_FORMAT or info.get("version") != BASELINE_VERSION:
        raise MemdecError(f"{file}: not a memdec baseline of a known format")
    if info.get("method") not in METHODS:
        raise MemdecError(f"{file}: unknown method {info.get('method')!r}")
    return info


def write_baseline_json(folder: str | Path, info: dict, method: str) -> None:
    """Write ``baseline.json`` for ``method``; a ce-decoder also gets a ``memdec.json`` (written first)."""
    folder = Path(folder)
    if method == "ce-decoder":  # a memory decoder with α=0: loadable as one
        write_memdec_json(folder, {k: v for k, v in info.items() if k != "method"})
    meta = {**info, "format": BASELINE_FORMAT, "version": BASELINE_VERSION, "method": method}
    if method != "ce-decoder":
        meta["lambda"] = None  # evaluated alone
    atomic_write_json(folder / BASELINE_JSON, meta)


# --- adapt run folders ---------------------------------------------------------------------------


def run_paths(run: str | Path) -> dict:
    """What a finished ``memdec adapt`` run folder provides to ``eval`` and ``generate``:
    model, memdec, knn, baseline folders, corpora."""
    run = Path(run)
    settings = run / "settings.json"
    if not settings.is_file() or not (run / "memdec" / MEMDEC_JSON).is_file():
        raise MemdecError(f"{run}: not a finished memdec adapt run (no settings.json or memdec/{MEMDEC_JSON})")
    s = read_json_object(settings, "run settings")
    baselines = [str(run / "baselines" / m) for m in METHODS if (run / "baselines" / m / BASELINE_JSON).is_file()]
    return {"model": s["model"], "memdec": str(run / "memdec"), "knn": str(run / "datastore"), "baseline": baselines,
            "valid": s["valid"], "test": s["test"], "test_tokens": s["test_tokens"]}


def apply_run(cfg):
    """A copy of an eval/generate config with --model, --memdec (and --knn, and the run's baselines
    unless --baseline is given) taken from ``cfg.run``; the config itself if it names no run."""
    if getattr(cfg, "run", None) is None:
        return cfg
    paths = run_paths(cfg.run)
    names = {f.name for f in dataclasses.fields(cfg)}
    given = {k: paths[k] for k in ("model", "memdec", "knn") if k in names}
    if "baseline" in names and not cfg.baseline and paths["baseline"]:
        given["baseline"] = paths["baseline"]
    return dataclasses.replace(cfg, **given)
