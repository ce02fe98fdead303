"""Baselines for the memory decoder, trained on the same tokens under the same budget.

    memdec baseline --method dapt|lora|ce-decoder --out DIR --datastore DS [--valid V] [train options]
    memdec baseline --method ... --out DIR --model M --corpus TRAIN [--max-tokens N] ...

- ``dapt``: full fine-tuning of a copy of the base model (domain-adaptive pre-training),
  evaluated on its own, as in the paper.
- ``lora``: LoRA adapters (peft) on the frozen base model, evaluated on their own (merged
  into a copy of the base, so they add nothing to inference time).
- ``ce-decoder``: the memory decoder's own recipe with α=0 (next-token cross-entropy only, no kNN
  targets), interpolated with the base at the λ chosen on validation: the ablation that shows
  what the kNN distillation adds. It honours ``--init``/``--init-layers`` like ``memdec train``.

Every method runs ``train.train`` with a ``BaselineRecipe``: the same windows of the same token
stream in the same order, the same steps, batch, warm-up and cosine schedule, the same
validation and checkpoints, and the same resume. Only what is trained, which validation score
picks the best checkpoint (mixed at the best λ for ce-decoder, alone for dapt and lora), and how
it is saved differ.

Training data: ``--datastore DS`` trains on the memory decoder's own token stream
(``DS/tokens.npy``), so the tokens are the same by construction. ``--model M --corpus C
--max-tokens N`` tokenizes the corpus as ``memdec datastore`` does (``data.load_token_stream``),
which gives the same stream for the same corpus and N; ``baseline.json`` records the stream's
``corpus_hash`` either way, as ``memdec.json`` does, and each row of ``memdec eval --json`` carries it.

Output folder ``DIR``: a Hugging Face model folder (dapt, ce-decoder) or a peft adapter folder
(lora), ``trainer_state/`` and ``log.jsonl`` as for ``memdec train``, and ``baseline.json``:
``format`` ("memdec-baseline"), ``version``, ``method``, ``base_model``, ``tokenizer_hash``,
``corpus_hash``, ``trainable_parameters``, ``n_parameters``, ``train_seconds``, ``lambda``
(ce-decoder: the recommended λ), ``train_stats``, ``train_config``. A ce-decoder folder also has a
``memdec.json``, so it loads wherever a memory decoder does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import (
    BASELINE_JSON,
    LORA_ADAPTER,
    MEMDEC_JSON,
    METHODS,
    check_checkpoint_tokenizer,
    load_model_folder,
    load_safetensors,
    read_baseline_json,
    write_baseline_json,
)
from .checks import check_unit_interval
from .data import load_token_stream, token_stream_hash
from .errors import MemdecError, one_line
from .joint import MemoryDecoderModel
from .models import load_model, load_tokenizer, resolve_model_spec, tokenizer_fingerprint
from .train import Recipe, TrainConfig, init_memory_decoder, train


@dataclass(kw_only=True)
class BaselineConfig(TrainConfig):
    """``memdec train``'s options (the budget: steps, batch, block, lr, schedule, validation) plus these."""

    method: str
    datastore: str | None = None  # the memory decoder's datastore: exactly its token stream
    model: str | None = None  # or: a base model and a corpus, tokenized as `memdec datastore` does
    corpus: str | None = None
    max_tokens: int | None = None
    text_field: str = "text"
    alpha: float = 0.0  # next-token cross-entropy only: the baselines see no kNN target
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # module names; default: every linear layer of the blocks


BASELINE_HELP = {
    "method": "dapt (full fine-tuning of the base), lora (peft adapters on the base) or ce-decoder "
              "(the memory decoder's recipe with alpha=0, interpolated with the base)",
    "datastore": "train on this datastore's token stream: exactly the memory decoder's tokens",
    "model": "with --corpus: the base model spec",
    "corpus": "instead of --datastore: train on this corpus, tokenized as `memdec datastore` does",
    "max_tokens": "with --corpus: use its first N tokens (as `memdec datastore --max-tokens`)",
    "text_field": "with --corpus: the JSONL / dataset field that holds the text",
    "alpha": "must be 0: the baselines learn next-token cross-entropy only",
    "init": "ce-decoder: initialise from this model spec (as `memdec train --init`)",
    "init_layers": "ce-decoder: initialise from the base's first N blocks (as `memdec train --init-layers`)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)",
    "lora_dropout": "dropout on the LoRA branch's input",
    "lora_targets": "module names to adapt, e.g. q_proj v_proj (default: every linear layer of the blocks)",
}


def check_config(cfg: BaselineConfig) -> None:
    """Reject a bad combination of options with one clear line."""
    if cfg.method not in METHODS:
        raise MemdecError(f"unknown --method '{cfg.method}' (choose from: {', '.join(METHODS)})")
    if cfg.alpha != 0:
        raise MemdecError(f"baselines learn next-token cross-entropy only: --alpha must be 0, got {cfg.alpha} "
                          f"(a memory decoder with alpha > 0 is `memdec train`)")
    if (cfg.datastore is None) == (cfg.corpus is None):
        raise MemdecError("give the training tokens as --datastore DS (the memory decoder's own) or as --model M --corpus C")
    if cfg.corpus is not None and cfg.model is None:
        raise MemdecError("--corpus needs --model: the base model whose tokenizer reads it")
    if cfg.method != "ce-decoder" and (cfg.init is not None or cfg.init_layers is not None):
        raise MemdecError(f"--init and --init-layers choose a decoder's initialisation; {cfg.method} starts from the base model itself")
    if cfg.lora_r < 1:
        raise MemdecError(f"--lora-r must be at least 1, got {cfg.lora_r}")
    if check_unit_interval(cfg.lora_dropout, "--lora-dropout") == 1.0:
        raise MemdecError("--lora-dropout 1 drops every input of the adapters: give a value in [0, 1)")


def add_lora(model, cfg: BaselineConfig):
    """Wrap ``model`` with trainable LoRA adapters (peft), B initialised to zero: a PeftModel.

    Only the adapters require gradients. With B = 0 the wrapped model computes exactly the base
    model's logits.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MemdecError("--method lora needs the peft package: pip install peft") from None
    targets = list(cfg.lora_targets) if cfg.lora_targets else "all-linear"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if type(m).__name__ in ("Linear", "Conv1D") and "lm_head" not in name})
        raise MemdecError(f"--lora-targets {' '.join(targets) if isinstance(targets, list) else targets}: "
                          f"{str(exc).splitlines()[0]} (this model's linear layers: {', '.join(linear)})") from None


class BaselineRecipe(Recipe):
    """``train``'s recipe for one baseline method; see the module's docstring."""

    meta_file = BASELINE_JSON

    def __init__(self, method: str):
        if method not in METHODS:
            raise MemdecError(f"unknown --method '{method}' (choose from: {', '.join(METHODS)})")
        self.name = method
        self.meta_files = (BASELINE_JSON, MEMDEC_JSON) if method == "ce-decoder" else (BASELINE_JSON,)
        # ce-decoder is judged mixed with the base, as the memory decoder is; dapt and lora alone
        self.select = "best_ppl" if method == "ce-decoder" else "valid_ppl_memdec"

    def data(self, cfg: BaselineConfig) -> tuple[np.ndarray, dict]:
        if cfg.datastore is not None:
            tokens, manifest = super().data(cfg)
            if cfg.model is not None and cfg.model != manifest["model"]:
                raise MemdecError(f"--model {cfg.model} differs from the datastore's base model {manifest['model']}")
            return tokens, manifest

        tokenizer = load_tokenizer(cfg.model)
        tokens = load_token_stream(cfg.corpus, tokenizer, cfg.max_tokens, cfg.text_field)
        manifest = {"model": cfg.model, "tokenizer_hash": tokenizer_fingerprint(tokenizer), "corpus": cfg.corpus,
                    "corpus_hash": token_stream_hash(tokens), "max_tokens": cfg.max_tokens, "text_field": cfg.text_field,
                    "n_keys": len(tokens) - 1}
        return tokens, manifest

    def init_model(self, cfg: BaselineConfig, manifest: dict):
        model, tokenizer = init_memory_decoder(cfg, manifest, "cpu")  # dapt, lora: a full copy of the base
        if self.name == "lora":
            model = add_lora(model, cfg)
            model.train()
        return model, tokenizer

    def load_weights(self, model, folder: Path) -> None:
        if self.name != "lora":
            return super().load_weights(model, folder)
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_safetensors(folder / LORA_ADAPTER))
        if result.unexpected_keys:
            raise MemdecError(f"{folder}: the saved adapters do not fit the model ({result.unexpected_keys[:3]})")

    def write_meta(self, folder: Path, info: dict) -> None:
        write_baseline_json(folder, info, self.name)


def train_baseline(cfg: BaselineConfig, on_step=None) -> Path:
    """Train one baseline with ``train.train``; returns its folder (resumes like ``memdec train``)."""
    check_config(cfg)
    return train(cfg, on_step=on_step, recipe=BaselineRecipe(cfg.method))


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


@dataclass
class LoadedBaseline:
    """A baseline ready to score. ``model``: a causal LM scored alone (dapt, lora merged into a copy
    of the base) or a ``MemoryDecoderModel`` (ce-decoder), on the base model's device and dtype."""

    method: str
    path: str
    info: dict
    model: Any
    extra: dict = field(default_factory=dict)  # budget columns for the row

    def budget(self) -> dict:
        return {"trainable_parameters": self.info.get("trainable_parameters"),
                "train_seconds": self.info.get("train_seconds"), "corpus_hash": self.info.get("corpus_hash")}


def check_baseline(path: str | Path, base_spec: str, tokenizer) -> dict:
    """The ``baseline.json`` of ``path``, if it fits the base model ``base_spec`` and its tokenizer.

    Raises TokenizerMismatchError if it was trained for another tokenizer, MemdecError if it was
    trained from another base model or is no baseline.
    """
    info = read_baseline_json(path)
    method = info["method"]
    check_checkpoint_tokenizer(tokenizer, info, f"baseline {path} ({method})")
    if not same_model(str(info.get("base_model")), base_spec):
        raise MemdecError(f"baseline {path} ({method}) was trained from base model {info.get('base_model')!r}, not {base_spec!r}")
    return info


def _load_lora(base_model, path: Path):
    """The LoRA adapters of ``path`` (its ``adapter_model.safetensors``, checked by ``read_baseline_json``:
    a pickled ``.bin`` is never read) on ``base_model``; MemdecError naming the folder if they do not load."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base_model, str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign adapter raises many kinds
        raise MemdecError(f"{path / LORA_ADAPTER}: cannot load the lora adapter ({one_line(exc)})") from None


def load_baseline(path: str | Path, base_spec: str, base_model, tokenizer) -> LoadedBaseline:
    """Load a baseline folder (checked by ``check_baseline``) for scoring beside ``base_model``."""
    info = check_baseline(path, base_spec, tokenizer)
    method = info["method"]
    device, dtype = base_model.device, base_model.dtype
    if method == "ce-decoder":
        model = MemoryDecoderModel.from_pretrained(base_model, str(path), tokenizer=tokenizer)
    elif method == "dapt":
        model = load_model_folder(path, "the dapt baseline", dtype).to(device).eval()
    else:  # lora: the adapters merged into a fresh copy of the base, as one would deploy them
        copy, _ = load_model(base_spec, device=str(device), dtype=dtype)
        model = _load_lora(copy, Path(path)).merge_and_unload().eval()
    return LoadedBaseline(method, str(path), info, model)
