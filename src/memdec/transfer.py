"""Move a memory decoder to a base model with another tokenizer: keep its body, rebuild its ends.

    memdec transfer --decoder SRC --model NEW_BASE --datastore NEW_DS --out CKPT [--max-steps N | --budget F]

1. The source decoder's transformer body (every block, the final norm) is kept as it is; its
   architecture need not match the new base's, only the tokenizer changes.
2. Its input embeddings and LM head get one row per row of the new base's logits. ``init="mapped"``:
   each new token's text (decoded in context, so a leading space survives) is tokenized with the
   source tokenizer, and its row is the mean of the source rows of those pieces; the special tokens
   eos, bos, pad and unk take the source's row of the same role; a token whose text cannot be
   recovered (a partial UTF-8 byte, an empty string) or a special token without a role gets the
   mean of all source rows, unless it is a byte token (``<0xNN>``, or a byte-level BPE string of a
   partial character): then its bytes map to the source's byte tokens. ``init="random"`` (the ablation): every row
   drawn from N(0, σ²), σ the
   standard deviation of the source rows.
3. ``memdec.train`` trains it on the new base's datastore (``TransferRecipe``: the same loop,
   schedule, validation, checkpoints and resume as ``memdec train``), for ``--max-steps`` or a
   ``--budget`` fraction of the source decoder's own training tokens, optionally with the body
   frozen for the first ``--freeze-body-steps`` steps (its gradients are dropped, so AdamW leaves it
   exactly as it was).
4. ``CKPT`` is an ordinary memory-decoder checkpoint for the new base; ``memdec.json`` adds
   ``transfer``: the source decoder, its base model and tokenizer hash, the init and the mapping's
   coverage.

``memdec adapt --transfer-from SRC`` runs this as its train stage: each teacher candidate is
``transfer(TransferConfig(source=SRC, model=settings.model, train=TrainConfig(datastore=RUN/datastore, ...)))`` in
place of ``train``, with the train stage's settings, ``--transfer-budget`` and ``--transfer-init``;
the stage's fingerprint adds ``source_fingerprint(SRC)`` (the hash of SRC's ``memdec.json``), the
budget and the init.

The mapping is vectorised: every vocabulary string is decoded in one batch call and tokenized in
one batch call; the rows are a segment mean (``index_add_`` over a flat index array).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from .checkpoint import MEMDEC_JSON, load_memory_decoder, read_memdec_json, write_memdec_json
from .checks import check_device
from .decoders import FULL_COPY, is_full_copy, parse_shape, recorded_shape_name
from .errors import MemdecError, one_line
from .models import check_tokenizer, load_tokenizer, local_model_folder, tokenizer_fingerprint
from .options import check_options, help_of, nested, option
from .store import Manifest, open_datastore
from .train import Recipe, TrainConfig, Trainer, TrainingData, window_starts

INITS = ("mapped", "random")
ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")


def _check_new_rows(value, what: str) -> str:
    if value not in INITS:
        raise MemdecError(f"unknown {what} '{value}' (mapped or random)")
    return value


@dataclass
class TransferConfig:
    """``memdec transfer``'s options: its own (the source decoder, the new base, the new rows, the budget)
    beside the run's ``TrainConfig`` (steps, batch, lr, schedule, validation, resume; its ``decoder`` and
    ``init`` have no flag here: a transferred decoder is a copy, initialised from ``source``). The flags
    keep their old spellings: ``--decoder`` sets ``source`` and ``--init`` sets ``new_rows``."""

    source: str = option("the source memory decoder checkpoint (trained for another tokenizer); a copy decoder (a "
                         "full model): fork and lora decoders share their base's trunk and cannot change tokenizer",
                         flag="--decoder")
    model: str = option("the new base model spec; its tokenizer is the one the new decoder is built for")
    train: TrainConfig = nested(omit=("decoder", "init"))  # --datastore: the new base's; --out: the new checkpoint
    new_rows: str = option("new embedding and LM-head rows: 'mapped' (mean of the source rows of each token's pieces) "
                           "or 'random' (the ablation)", "mapped", flag="--init", check=_check_new_rows)
    budget: float | None = option("instead of --max-steps: this fraction of the source decoder's training tokens",
                                  None)
    freeze_body_steps: int = option("train only the new embeddings and LM head for the first N steps", 0)

    @classmethod
    def from_flat(cls, **flat) -> TransferConfig:
        """A config from one flat mapping, as ``memdec.json``'s ``train_config`` of a transfer records it (and
        as the class took it before it was composed): ``decoder`` is the source, ``init`` the new rows, every
        other key not of this class a ``TrainConfig`` field."""
        own = {f.name for f in dataclasses.fields(cls)} - {"train"}
        mine = {k: flat.pop(k) for k in list(flat) if k in own}
        if "decoder" in flat:
            mine["source"] = flat.pop("decoder")
        if "init" in flat:
            mine["new_rows"] = flat.pop("init")
        return cls(**mine, train=TrainConfig(**flat))

    def flat(self) -> dict:
        """The options of the run beyond ``TrainConfig``'s under their recorded names (``decoder``: the source,
        ``init``: the new rows): what ``memdec.json``'s ``train_config`` and the run's fingerprint add."""
        return {"decoder": self.source, "init": self.new_rows, "model": self.model, "budget": self.budget,
                "freeze_body_steps": self.freeze_body_steps}


TRANSFER_HELP = help_of(TransferConfig)  # each of its own options' help, by field name


# --------------------------------------------------------------------------------------------
# The vocabulary mapping


@dataclass
class VocabMapping:
    """Which source rows make each new row: ``flat`` [nnz] source ids, ``segment`` [nnz] the new
    id each belongs to (rows with no entry get the fallback); ``coverage``: the counts."""

    n_rows: int
    flat: torch.Tensor
    segment: torch.Tensor
    coverage: dict


def _token_texts(tokenizer, ids: list[int]) -> list[str | None]:
    """The text each token adds after an anchor token (so a SentencePiece '▁' decodes as a space):
    one ``batch_decode`` call; None where the text is lost (a partial UTF-8 byte, nothing)."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    head = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode([anchor + [i] for i in ids], clean_up_tokenization_spaces=False)
    out = []
    for text in texts:
        piece = text[len(head):] if text.startswith(head) else None
        out.append(piece if piece and "\ufffd" not in piece else None)
    return out


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = {b: chr(b) for b in bs}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return chars


_BYTE_CHARS = _byte_chars()
_CHAR_BYTES = {c: b for b, c in _BYTE_CHARS.items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(token: str) -> bytes | None:
    """The raw bytes of a byte token: SentencePiece's ``<0xNN>`` or a byte-level BPE string."""
    if m := _BYTE_TOKEN.fullmatch(token):
        return bytes([int(m.group(1), 16)])
    if token and all(c in _CHAR_BYTES for c in token):
        return bytes(_CHAR_BYTES[c] for c in token)
    return None


def _byte_pieces(old_tok, new_tok, ids: list[int]) -> dict[int, list[int]]:
    """Old byte tokens for the new tokens whose text is a partial character (a few hundred at most)."""
    vocab = old_tok.get_vocab()
    old_byte = {b: vocab.get(_BYTE_CHARS[b], vocab.get(f"<0x{b:02X}>")) for b in range(256)}
    out = {}
    for i, token in zip(ids, new_tok.convert_ids_to_tokens(ids)):
        raw = _token_bytes(token or "")
        if raw and all(old_byte[b] is not None for b in raw):
            out[i] = [old_byte[b] for b in raw]
    return out


def _role_ids(old_tok, new_tok) -> dict[int, int]:
    """new special id -> old special id, for the roles both tokenizers have."""
    pairs = {}
    for role in ROLES:
        new_id, old_id = getattr(new_tok, f"{role}_id", None), getattr(old_tok, f"{role}_id", None)
        if new_id is not None and old_id is not None and new_id not in pairs:
            pairs[new_id] = old_id
    return pairs


def build_mapping(old_tok, new_tok, n_rows: int | None = None) -> VocabMapping:
    """The source pieces of every new token (see the module docstring). ``n_rows``: the new
    model's logits width (at least the tokenizer's size; extra rows are never a token)."""
    n_tok = len(new_tok)
    n_rows = max(n_rows or n_tok, n_tok)
    roles = _role_ids(old_tok, new_tok)
    special = set(new_tok.all_special_ids) | set(getattr(new_tok, "added_tokens_decoder", {}) or {})
    by_text = [i for i in range(n_tok) if i not in special]
    texts = _token_texts(new_tok, by_text)
    kept = [(i, t) for i, t in zip(by_text, texts) if t is not None]
    pieces = old_tok([t for _, t in kept], add_special_tokens=False)["input_ids"] if kept else []
    n_text = len(kept)
    by_bytes = _byte_pieces(old_tok, new_tok, [i for i, t in zip(by_text, texts) if t is None])
    kept += [(i, None) for i in by_bytes]
    pieces += list(by_bytes.values())
    lengths = np.array([len(p) for p in pieces] + [1] * len(roles), dtype=np.int64)
    new_ids = np.array([i for i, _ in kept] + list(roles), dtype=np.int64)
    flat = np.fromiter((j for p in pieces for j in p), dtype=np.int64, count=int(lengths[: len(kept)].sum()))
    flat = np.concatenate([flat, np.array(list(roles.values()), dtype=np.int64)])
    segment = np.repeat(new_ids, lengths)
    coverage = {
        "tokens": n_tok, "rows": n_rows, "by_text": n_text, "by_bytes": len(by_bytes), "by_role": len(roles),
        "single_piece": int((lengths[: len(kept)] == 1).sum()),
        "fallback": n_tok - len(kept) - len(roles),
        "mean_pieces": round(float(lengths[: len(kept)].mean()), 4) if kept else 0.0,
        "coverage": round((len(kept) + len(roles)) / n_tok, 6),
    }
    return VocabMapping(n_rows, torch.from_numpy(flat), torch.from_numpy(segment), coverage)


def mapped_rows(old: torch.Tensor, mapping: VocabMapping) -> torch.Tensor:
    """[n_rows, d]: the segment mean of ``old`` [V_old, d] rows; rows without pieces get the mean row."""
    old = old.detach().float()
    sums = torch.zeros(mapping.n_rows, old.shape[1]).index_add_(0, mapping.segment, old[mapping.flat])
    counts = torch.zeros(mapping.n_rows).index_add_(0, mapping.segment, torch.ones(len(mapping.segment)))
    rows = sums / counts.clamp(min=1)[:, None]
    rows[counts == 0] = old.mean(0)
    return rows


def random_rows(old: torch.Tensor, n_rows: int, seed: int) -> torch.Tensor:
    """[n_rows, d] drawn from N(0, σ²), σ the standard deviation of ``old``'s entries."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, old.shape[1], generator=gen) * old.detach().float().std()


def transfer_model(model, old_tok, new_tok, n_rows: int, init: str = "mapped", seed: int = 0):
    """``model`` (changed in place) with ``n_rows`` new input and output rows; returns (model, coverage)."""
    if init not in INITS:
        raise MemdecError(f"unknown --init '{init}' (mapped or random)")
    old_in = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    old_out = None if head is None or tied else head.weight.detach().clone()
    mapping = build_mapping(old_tok, new_tok, n_rows)
    model.resize_token_embeddings(n_rows, mean_resizing=False)

    def rows(old, salt):
        return mapped_rows(old, mapping) if init == "mapped" else random_rows(old, n_rows, seed + salt)

    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(rows(old_in, 0))
        if old_out is not None:
            model.get_output_embeddings().weight.copy_(rows(old_out, 1))
    cfg = model.config
    for role in ("bos", "eos", "pad"):
        value = getattr(new_tok, f"{role}_token_id", None)
        for target in {id(cfg): cfg, id(model.generation_config): model.generation_config}.values():
            if hasattr(target, f"{role}_token_id"):
                setattr(target, f"{role}_token_id", value)
    return model, {**mapping.coverage, "init": init}


# --------------------------------------------------------------------------------------------
# Training: memdec.train with a recipe whose model is the transferred one


def _body_parameters(model) -> list[torch.nn.Parameter]:
    ends = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        ends.add(id(model.get_output_embeddings().weight))
    return [p for p in model.parameters() if id(p) not in ends]


class TransferRecipe(Recipe):
    """``memdec train``'s memory decoder, initialised by ``transfer_model`` from a source decoder."""

    name = "transfer"

    def __init__(self, cfg: TransferConfig, source_info: dict):  # cfg.train: the Trainer's TrainConfig
        self.cfg, self.source_info = cfg, source_info
        self.step, self.origin, self._hooks = 0, None, []

    def run_options(self, cfg: TrainConfig) -> dict:
        """The source (``decoder``), the new rows (``init``), the new base, the budget and the frozen steps: part
        of the run (its fingerprint, ``train_config``), under the names transfers always recorded."""
        return self.cfg.flat()

    def init_hash(self, cfg: TrainConfig, data: TrainingData) -> None:
        """None: a transfer starts from its source decoder, part of the run through ``run_options``."""
        return None

    def decoder_shape(self, cfg: TrainConfig, data: TrainingData):
        """A transferred decoder is a full model."""
        return parse_shape(FULL_COPY)

    def init_model(self, cfg: TrainConfig, data: TrainingData):
        new_tok = load_tokenizer(self.cfg.model)
        check_tokenizer(new_tok, data.tokenizer_hash, f"the datastore {cfg.datastore}", made_with=data.model)
        try:
            old_tok = AutoTokenizer.from_pretrained(str(Path(self.cfg.source).expanduser()))
        except Exception as exc:  # noqa: BLE001
            raise MemdecError(f"{self.cfg.source}: cannot load the source decoder's tokenizer "
                              f"({one_line(exc)})") from None
        model, _ = load_memory_decoder(self.cfg.source, dtype=torch.float32)
        model, coverage = transfer_model(model, old_tok, new_tok, new_vocab_rows(self.cfg.model), self.cfg.new_rows,
                                         cfg.seed)
        self.origin = {"source_decoder": str(Path(self.cfg.source).expanduser().resolve()),
                       "source_base_model": self.source_info.get("base_model"),
                       "source_tokenizer_hash": tokenizer_fingerprint(old_tok),
                       "freeze_body_steps": self.cfg.freeze_body_steps, "mapping": coverage,
                       "init": self.cfg.new_rows}
        self._freeze(model)
        model.config.use_cache = False
        return model.train(), new_tok

    def _freeze(self, model) -> None:
        """Drop the body's gradients while ``self.step`` < freeze_body_steps (AdamW skips them)."""
        if self.cfg.freeze_body_steps <= 0:
            return

        def drop(p):
            if self.step < self.cfg.freeze_body_steps:
                p.grad = None

        self._hooks = [p.register_post_accumulate_grad_hook(drop) for p in _body_parameters(model)]

    def on_step(self, step: int, record: dict) -> None:
        self.step = step

    def write_meta(self, folder: Path, info: dict) -> None:
        write_memdec_json(folder, {**info, "transfer": self.origin})


def new_vocab_rows(spec: str) -> int:
    """The logits width of model ``spec``, from its config (the weights are not loaded)."""
    cfg = AutoConfig.from_pretrained(local_model_folder(spec))
    return int(cfg.get_text_config().vocab_size)


def budget_steps(cfg: TransferConfig, source_info: dict, manifest: Manifest) -> int:
    """Optimizer steps that train ``cfg.budget`` × the source decoder's training tokens."""
    src = source_info.get("train_config") or {}
    per_step = (
        src.get("batch_size", 0)
        * src.get("grad_accum", 1)
        * src.get("block_size", 0)
        * source_info.get("world_size", 1)
    )
    steps = src.get("max_steps")
    if steps is None and src.get("datastore"):
        try:
            n_positions = open_datastore(src["datastore"]).n_keys
        except MemdecError:
            n_positions = None
        if n_positions:
            n_windows = len(window_starts(n_positions, min(src["block_size"], n_positions)))
            steps = math.ceil(src.get("epochs", 1.0) * n_windows / (src["batch_size"] * src.get("grad_accum", 1)))
    if not steps or not per_step:
        raise MemdecError(f"{cfg.source}: its memdec.json does not say how long it trained; give --max-steps")
    new_per_step = cfg.train.batch_size * cfg.train.grad_accum * min(cfg.train.block_size, manifest.n_keys)
    return max(1, math.ceil(cfg.budget * steps * per_step / new_per_step))


def check_source(path: str) -> dict:
    """The source decoder's ``memdec.json``; MemdecError (one line) unless ``path`` is a copy memory-decoder
    checkpoint folder (a full model) with a model config and a tokenizer. Reads files only: nothing is loaded."""
    folder = Path(path).expanduser()
    info = read_memdec_json(folder)
    if not folder.is_dir():
        raise MemdecError(f"{path}: give the source decoder's checkpoint folder, not a file")
    shape = recorded_shape_name(info)
    if not is_full_copy(shape):
        raise MemdecError(f"{path}: a {shape} memory decoder holds only its own tensors on its base's trunk; only a "
                          f"copy decoder (a full model, `memdec train --decoder copy`) transfers to another tokenizer")
    for name, what in (("config.json", "model config"), ("tokenizer_config.json", "tokenizer")):
        if not (folder / name).is_file():
            raise MemdecError(f"{path}: not a memory decoder checkpoint (no {what}, {name})")
    return info


def source_fingerprint(path: str) -> str:
    """The hash of the source decoder's ``memdec.json``: which decoder (trained how) a transfer starts from."""
    return hashlib.sha256((Path(path).expanduser() / MEMDEC_JSON).read_bytes()).hexdigest()[:16]


def check_transfer_config(cfg: TransferConfig) -> None:
    check_options(cfg)
    if cfg.train.init_layers is not None:
        raise MemdecError("--init-layers does not apply to a transfer: the source decoder's body is kept whole")
    if cfg.budget is not None and cfg.train.max_steps is not None:
        raise MemdecError("give --max-steps or --budget, not both")
    if cfg.budget is not None and not (math.isfinite(cfg.budget) and 0 < cfg.budget <= 100):
        raise MemdecError(f"--budget must be a positive fraction of the source's training, got {cfg.budget}")
    if cfg.freeze_body_steps < 0:
        raise MemdecError(f"--freeze-body-steps must be at least 0, got {cfg.freeze_body_steps}")
    check_device(cfg.train.device)  # before the source decoder and the datastore are read


def transfer(cfg: TransferConfig, on_step=None) -> Path:
    """Transfer ``cfg.source`` to ``cfg.model``'s tokenizer and train it; returns the checkpoint folder."""
    check_transfer_config(cfg)
    source_info = check_source(cfg.source)
    manifest = open_datastore(cfg.train.datastore).manifest  # its tokenizer must be --model's (TransferRecipe)
    if cfg.budget is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, max_steps=budget_steps(cfg, source_info, manifest)))
    recipe = TransferRecipe(cfg, source_info)

    def step_callback(step, record):
        recipe.on_step(step, record)
        if on_step is not None:
            on_step(step, record)

    trainer = Trainer(cfg.train, recipe, on_step=step_callback)
    recipe.step = trainer.previous["step"] if trainer.previous else 0
    return trainer.run()
