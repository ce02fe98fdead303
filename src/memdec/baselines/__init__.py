"""Baselines for the memory decoder, trained on the same tokens under the same budget.

    memdec baseline --method dapt|lora|ce-decoder --out DIR --datastore DS [--valid V] [train options]
    memdec baseline --method ... --out DIR --model M --corpus TRAIN [--max-tokens N] ...

Methods are plugins: each is a ``Method`` (``base.py``) registered by its own module of this
package, and every module here is imported below (``registry.discover``), so a new method is one new
module and its test (and, for a method with flags of its own, its options class among
``BaselineConfig``'s bases in ``config.py``).
The built-in ones, in row order:

- ``ce-decoder`` (``ce_decoder.py``): the memory decoder's own recipe with α=0 (next-token
  cross-entropy only, no kNN targets), interpolated with the base at the λ chosen on validation:
  the ablation that shows what the kNN distillation adds. It honours ``--init``/``--init-layers``.
- ``dapt`` (``dapt.py``): full fine-tuning of a copy of the base model, evaluated on its own.
- ``lora`` (``lora.py``): LoRA adapters (peft) on the frozen base model, evaluated on their own
  (merged into a copy of the base, so they add nothing to inference time).

Every method runs ``train.train`` with its recipe (``Method.recipe``, a ``BaselineRecipe``): the
same windows of the same token stream in the same order, the same steps, batch, warm-up and cosine
schedule, the same validation and checkpoints, and the same resume. Only what is trained, which
validation score picks the best checkpoint (mixed at the best λ, or alone: ``Method.alone``), and
how it is saved differ.

Training data: ``--datastore DS`` trains on the memory decoder's own token stream
(``DS/tokens.npy``), so the tokens are the same by construction. ``--model M --corpus C
--max-tokens N`` tokenizes the corpus as ``memdec datastore`` does (``data.load_token_stream``),
which gives the same stream for the same corpus and N; ``baseline.json`` records the stream's
``corpus_hash`` either way, as ``memdec.json`` does, and each row of ``memdec eval --json`` carries it.

Output folder ``DIR``: what the method saves (a Hugging Face model folder; a peft adapter folder
for lora), ``trainer_state/`` and ``log.jsonl`` as for ``memdec train``, and ``baseline.json``
(``checkpoint.write_baseline_json``); a method mixed with the base also has a ``memdec.json``, so it
loads wherever a memory decoder does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..checkpoint import check_checkpoint_tokenizer, read_baseline_json
from ..errors import MemdecError
from ..index import or_list
from ..models import resolve_model_spec
from ..registry import discover
from ..train import train
from .base import (METHODS, BaselineRecipe, LoadedBaseline, Method, Option, fix_options, get_method, method_names,
                   method_of_row, methods, register, unregister)
from .config import BaselineConfig, BaselineOptions
from .lora import LoraOptions, add_lora

__all__ = [
    "BASELINE_HELP", "METHODS", "BaselineConfig", "BaselineOptions", "BaselineRecipe", "LoadedBaseline", "LoraOptions",
    "Method", "Option", "add_lora",
    "check_baseline", "check_config", "get_method", "load_baseline", "method_names", "method_of_row", "methods",
    "register", "same_model", "train_baseline", "unregister",
]

discover(__name__, __path__, skip=("base", "config"))  # every method's module registers its method


def _help() -> dict[str, str]:
    """Every ``memdec baseline`` flag's help beyond ``memdec train``'s."""
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(BaselineOptions)
             if f.name in BaselineOptions.__annotations__}  # its own fields, not memdec train's
    helps["method"] = or_list(f"{m.name} ({m.description})" for m in methods())
    initialised = ", ".join(m.name for m in methods() if m.takes_init)
    helps["init"] = f"{initialised}: initialise from this model spec (as `memdec train --init`)"
    helps["init_layers"] = f"{initialised}: initialise from the base's first N blocks (as `memdec train --init-layers`)"
    helps.update((o.name, o.help) for m in methods() for o in m.extra_options)
    return helps


fix_options(BaselineConfig)
BASELINE_HELP = _help()


def check_config(cfg: BaselineConfig) -> None:
    """Reject a bad combination of options with one clear line."""
    method = get_method(cfg.method)
    if cfg.alpha != 0:
        raise MemdecError(f"baselines learn next-token cross-entropy only: --alpha must be 0, got {cfg.alpha} "
                          f"(a memory decoder with alpha > 0 is `memdec train`)")
    if (cfg.datastore is None) == (cfg.corpus is None):
        raise MemdecError(
            "give the training tokens as --datastore DS (the memory decoder's own) or as --model M --corpus C"
        )
    if cfg.corpus is not None and cfg.model is None:
        raise MemdecError("--corpus needs --model: the base model whose tokenizer reads it")
    if not method.takes_init and (cfg.init is not None or cfg.init_layers is not None):
        raise MemdecError(
            f"--init and --init-layers choose a decoder's initialisation; {cfg.method} starts from the base model "
            "itself"
        )
    method.check(cfg)


def train_baseline(cfg: BaselineConfig, on_step=None) -> Path:
    """Train one baseline with ``train.train`` and its method's recipe; returns its folder (resumes like
    ``memdec train``)."""
    check_config(cfg)
    return train(cfg, on_step=on_step, recipe=get_method(cfg.method).recipe(cfg))


# --------------------------------------------------------------------------------------------
# Loading for evaluation


def same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same model (equal, or resolving to the same file or folder)."""
    if a == b:
        return True

    try:
        return resolve_model_spec(a).path == resolve_model_spec(b).path
    except MemdecError:
        return False


def check_baseline(path: str | Path, base_spec: str, tokenizer) -> dict:
    """The ``baseline.json`` of ``path`` (its ``method`` a registered one, whose own checks of the folder
    pass), if it fits the base model ``base_spec`` and its tokenizer.

    Raises TokenizerMismatchError if it was trained for another tokenizer, MemdecError if it was
    trained from another base model or is no baseline.
    """
    info = read_baseline_json(path, method_names())
    method = info["method"]
    get_method(method).check_folder(Path(path).expanduser())
    check_checkpoint_tokenizer(tokenizer, info, f"baseline {path} ({method})")
    if not same_model(str(info.get("base_model")), base_spec):
        raise MemdecError(
            f"baseline {path} ({method}) was trained from base model {info.get('base_model')!r}, not {base_spec!r}"
        )
    return info


def load_baseline(path: str | Path, base_spec: str, base_model, tokenizer) -> LoadedBaseline:
    """Load a baseline folder (checked by ``check_baseline``) for scoring beside ``base_model``, as its
    method does (``Method.load``)."""
    info = check_baseline(path, base_spec, tokenizer)
    method = get_method(info["method"])
    model = method.load(Path(path).expanduser(), base_spec, base_model, tokenizer)
    return LoadedBaseline(method.name, str(path), info, model, method.alone, method.row_label)
