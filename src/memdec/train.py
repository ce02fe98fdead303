"""Train the memory decoder: sparse KL to the kNN targets plus next-token cross-entropy.

    loss = α · KL(p_kNN ‖ p_mem) + (1 − α) · CE(next token)

The kNN targets are CSR rows (see ``targets``); the KL is computed over each row's stored
support only, by gathering the decoder's log-probabilities at the stored token ids, so no
vocabulary-sized target row is ever built. Training windows are non-overlapping slices of the
datastore's token stream, aligned position for position with the CSR rows.

Output folder ``--out CKPT``:

- ``CKPT/`` itself is the best checkpoint by validation score (or the last, without ``--valid``):
  a Hugging Face model folder that ``AutoModelForCausalLM.from_pretrained`` loads, plus
  ``memdec.json``;
- ``CKPT/trainer_state/step-NNNNNNNN/``: the last saved step with optimizer, scheduler and RNG
  state, for resume; each step is staged whole and committed by one rename (``TrainerState``);
- ``CKPT/log.jsonl``: one line per logged step and per validation.

Every file is written through a temporary file and renamed into place. The best checkpoint's
``memdec.json`` is removed before its weights change and written last, so ``CKPT/`` is a loadable
checkpoint exactly when it holds one; a router kept beside the weights (``router.json``...) was made
for the old ones and goes with them. A folder that memdec did not create is refused as ``--out``, and
so is a checkpoint of another run (``--no-resume`` starts the same run over, nothing else); what a save
killed mid-way left (``.save.*/``, ``.NAME.tmp``) is removed when the run is taken up again. A
non-finite loss or gradient stops the run before the update, and no non-finite weight is saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from .checkpoint import (BASELINE_FORMAT, BASELINE_JSON, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, DOMAIN_ROUTER_JSON,
                         DOMAIN_ROUTER_WEIGHTS, MEMDEC_JSON, ROUTER_JSON, ROUTER_WEIGHTS, load_safetensors,
                         write_memdec_json)
from .checks import (COUNT, LIST, NON_NEGATIVE, OBJECT, SCORE, TEXT, WHOLE, Kind, check_device, check_field,
                     check_fields, check_non_negative, check_own_folder, check_positive, check_positive_int,
                     check_seed, check_unit_interval, holds_record, mark_own_folder, or_null)
from .data import load_token_stream
from .decoders import SHAPES, DecoderShape, parse_shape
from .store import open_datastore
from .errors import MemdecError, one_line
from .files import (append_jsonl, atomic_write_json, atomic_write_stream, atomic_write_text, fsync_path,
                    fsync_tree, os_errors_named, read_json_object, read_jsonl, remove_interrupted_writes)
from .loss import head_kl_ce_loss, last_hidden, lm_head, sparse_kl_ce_loss
from .models import (bos_prefix, check_same_tokenizer, check_tokenizer, load_config, load_model, model_fingerprint,
                     resolve_device, shortened_copy, vocab_rows, with_prefix)
from .scoring import base_scorer, mean_ppl, mix_logprobs, score_tokens
from .targets import KnnTargets

@dataclass
class TrainConfig:
    datastore: str
    out: str
    init: str | None = None  # any causal LM spec with the same tokenizer; default: a full copy of the base
    init_layers: int | None = None  # or: a shortened copy of the base with this many blocks
    layer_selection: str = "first"  # "first" N blocks or "spread" (evenly spaced)
    alpha: float = 0.5
    teacher_base_weight: float = 0.0  # β: the teacher is (1−β)·p_kNN + β·p_base
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 2
    grad_accum: int = 1
    block_size: int = 512
    valid: str | None = None
    valid_max_tokens: int = 4096
    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    eval_every: int = 50
    patience: int | None = None  # early stopping: stop after this many validations without a better score
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    decoder: str = "copy"  # the decoder's shape (memdec.decoders): copy, fork:K, ...
    keep_trainer_state: bool = False  # keep CKPT/trainer_state/ once the run finishes (to extend it later)
    save_dtype: str = "float32"  # the dtype of the decoder's weights in CKPT/ (trainer steps stay float32)


CHECKPOINT_META_FILES = (MEMDEC_JSON, BASELINE_JSON)  # each marks a finished checkpoint memdec wrote
# what other commands keep beside a checkpoint's weights, made for those weights: stale once they change
# (each record before its weights, as their writers commit them in the other order)
WEIGHTS_DEPENDENTS = (ROUTER_JSON, ROUTER_WEIGHTS, DOMAIN_ROUTER_JSON, DOMAIN_ROUTER_WEIGHTS)
SAVE_PREFIX = ".save."  # ``save_files``' staging folders inside a checkpoint folder
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OWN_STEP_WEIGHTS = "decoder.safetensors"  # a trainer step of a decoder shape other than copy: its own tensors


def _shapes_help() -> str:
    """The registered decoder shapes, each with its one-line ``summary``."""
    return "; ".join(f"{cls.summary}" for _, cls in sorted(SHAPES.items()))


TRAIN_HELP = {
    "datastore": "datastore folder built by `memdec datastore` (its targets step must be done)",
    "out": "checkpoint folder: the best checkpoint, plus trainer_state/ for resume",
    "init": "initialise from this model spec (same tokenizer as the base): a memory decoder checkpoint, a dapt "
            "baseline or any model folder, e.g. a CE-trained decoder for a second, kNN phase (fresh optimizer and "
            "schedule; its weights' hash is part of the run, so resume starts from the same ones); "
            "default: a full copy of the base",
    "init_layers": "initialise from a shortened copy of the base model with N blocks",
    "layer_selection": "with --init-layers: 'first' N blocks or 'spread' (evenly spaced)",
    "alpha": "weight of KL(p_kNN || p_mem); 1-alpha weighs next-token cross-entropy",
    "teacher_base_weight": "mix the base model's distribution into the kNN teacher: (1-b)*p_kNN + b*p_base "
                           "(costs a frozen base forward per step)",
    "epochs": "passes over the datastore's windows (ignored if --max-steps is set)",
    "max_steps": "optimizer steps to run",
    "lr": "peak learning rate (AdamW) of a full copy; a shape's own scale multiplies it (lora: 10x)",
    "min_lr_ratio": "cosine decay ends at lr * this",
    "warmup": "linear warm-up steps",
    "weight_decay": "AdamW weight decay of the matrices (norms and biases get none)",
    "max_grad_norm": "clip the global gradient norm to this value",
    "log_every": "write a line to CKPT/log.jsonl every K optimizer steps",
    "seed": "random seed (window order, initialisation of new parameters)",
    "device": "auto, cpu or cuda",
    "batch_size": "windows per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "block_size": "window length in tokens",
    "valid": "validation corpus spec; chooses lambda and the best checkpoint",
    "valid_max_tokens": "validate on the first N tokens of --valid",
    "lambdas": "interpolation weights tried at validation",
    "eval_every": "validate every K optimizer steps",
    "patience": "with --valid: stop early once this many validations in a row found no better checkpoint "
                "(the schedule stays that of the full run; default: never stop early)",
    "save_every": "save a resumable checkpoint every K optimizer steps",
    "resume": "continue from CKPT/trainer_state if it exists; --no-resume starts the same run over (a checkpoint of "
              "another run in --out is refused either way)",
    "decoder": f"the memory decoder's shape, built from the base ({_shapes_help()}). A shape other than copy "
               f"shares the base's frozen trunk and saves only its own tensors; it trains from the base "
               f"(no --init or --init-layers)",
    "keep_trainer_state": "keep CKPT/trainer_state/ (optimizer state, for resume) once the run finishes; an "
                          "interrupted run always keeps it. Without it a finished run cannot be extended (e.g. "
                          "rerun with a larger --patience)",
    "save_dtype": f"dtype of the decoder's weights in the final checkpoint ({', '.join(SAVE_DTYPES)}; bfloat16 "
                  f"halves the file); trainer steps stay float32 so that resume is exact; loading casts to the "
                  f"base model's dtype",
}


# --------------------------------------------------------------------------------------------
# Data


def window_starts(n_positions: int, block_size: int) -> np.ndarray:
    """Starts of non-overlapping training windows covering positions [0, n_positions).

    The last window is moved back to end at n_positions, so every position is trained on.
    Returns int64 [n_windows].
    """
    block = min(block_size, n_positions)
    starts = np.arange(0, n_positions - block + 1, block, dtype=np.int64)
    if starts[-1] + block < n_positions:
        starts = np.append(starts, n_positions - block)
    return starts


def collate(tokens: np.ndarray, targets: KnnTargets | None, starts: np.ndarray, block: int, need_targets: bool = True) -> dict:
    """One micro-batch of windows starting at ``starts``.

    Returns input_ids [B, T], labels [B, T] (the next tokens), and, when ``need_targets``,
    target_rows / target_ids / target_probs [nnz] indexing the flattened B*T positions.
    """
    positions = starts[:, None] + np.arange(block, dtype=np.int64)[None, :]  # [B, T]
    batch = {
        "input_ids": torch.from_numpy(tokens[positions].astype(np.int64)),
        "labels": torch.from_numpy(tokens[positions + 1].astype(np.int64)),
    }
    if need_targets:
        offsets, ids, probs = targets.gather(positions.reshape(-1))
        batch["target_rows"] = torch.from_numpy(np.repeat(np.arange(positions.size, dtype=np.int64), np.diff(offsets)))
        batch["target_ids"] = torch.from_numpy(ids.astype(np.int64))
        batch["target_probs"] = torch.from_numpy(probs.astype(np.float32))
    return batch


def epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled window order of one epoch; a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def micro_batch_starts(starts: np.ndarray, seed: int, micro_index: int, batch_size: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Window starts of global micro-batch ``micro_index`` for process ``rank`` of ``world``.

    Each global micro-batch holds batch_size*world windows in shuffled order; the epoch follows
    from the index, so a resume needs nothing but the step count.
    """
    per_global = batch_size * world
    per_epoch = max(len(starts) // per_global, 1)
    epoch, k = divmod(micro_index, per_epoch)
    order = epoch_order(len(starts), seed, epoch)
    picked = order[(k * per_global + np.arange(per_global)) % len(order)]
    return starts[picked[rank * batch_size : (rank + 1) * batch_size]]


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step``: linear warm-up, then cosine decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Initialisation


def init_memory_decoder(cfg: TrainConfig, manifest: dict, device: str):
    """Build the decoder to train; its tokenizer must equal the datastore's. Returns (model, tokenizer)."""
    if cfg.init is not None and cfg.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")
    spec = cfg.init or manifest["model"]  # an --init was checked before any weights loaded (Recipe.init_hash)
    model, tokenizer = load_model(spec, device="cpu", dtype=torch.float32)
    check_tokenizer(tokenizer, manifest["tokenizer_hash"], f"--init {spec}: the training data", made_with=manifest["model"])
    if cfg.init_layers is not None:
        model = shortened_copy(model, cfg.init_layers, cfg.layer_selection)
    model.config.use_cache = False
    return model.to(device).train(), tokenizer


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_model_folder(model, tokenizer, folder: Path) -> None:
    """Save an HF model folder: written whole into a temporary folder, then moved in file by file.

    Each file's move is an atomic rename, so no file of ``folder`` is ever half-written.
    """
    save_files(folder, lambda tmp: write_model_files(model, tokenizer, tmp))


def save_files(folder: Path, write) -> None:
    """``write(tmp)`` writes files into a temporary folder inside ``folder``; each is then moved into
    ``folder`` by an atomic rename, so no file of ``folder`` is ever half-written."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=SAVE_PREFIX, dir=folder))
    try:
        write(tmp)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    except OSError as exc:  # name the file the user will look for, not its temporary twin
        if exc.filename is not None and Path(exc.filename).parent == tmp:
            exc.filename = str(folder / Path(exc.filename).name)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_model_files(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of the model (with ``use_cache`` on, as users load it) and its tokenizer."""
    model.config.use_cache = True
    with os_errors_named(folder / "model.safetensors"):  # the weights: a full disk is an OSError naming them
        model.save_pretrained(folder)
    model.config.use_cache = False
    tokenizer.save_pretrained(folder)


def run_fingerprint(cfg: TrainConfig, manifest_hash: str, init_hash: str | None = None, lr_scale: float = 1.0) -> str:
    """What makes two training runs the same run: everything but budget-free knobs.

    ``init_hash``: the ``model_fingerprint`` of ``--init``, so that a resume starts from the very
    weights the run began with (a folder retrained in place is another run).
    """
    keep = asdict(cfg)
    for k in ("out", "device", "resume", "log_every", "eval_every", "save_every", "patience", "keep_trainer_state",
              "save_dtype"):
        keep.pop(k)
    if keep["decoder"] == "copy":  # added later: copy runs keep their fingerprint
        keep.pop("decoder")
    if not keep["teacher_base_weight"]:  # added later: runs without it keep their fingerprint
        keep.pop("teacher_base_weight")
    if init_hash is not None:  # only with --init: other runs keep their fingerprint
        keep["init_hash"] = init_hash
    if lr_scale != 1.0:  # the decoder shape's own lr scale (lora): another run
        keep["lr_scale"] = lr_scale
    keep["datastore_manifest_hash"] = manifest_hash
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def cast_for_saving(model, names: set[str] | None, dtype: torch.dtype):
    """Within the block, ``model``'s parameters named in ``names`` (all with None) hold ``dtype``
    copies; afterwards the very tensors they held before, so training goes on unchanged."""
    params = [p for n, p in model.named_parameters() if (names is None or n in names) and p.dtype != dtype]
    kept = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in zip(params, kept):
            p.data = data


def check_finite_weights(model, what: str) -> None:
    """MemdecError unless every parameter of ``model`` is finite: nothing non-finite is ever saved."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise MemdecError(f"{what}: non-finite weights in {len(bad)} tensors ({bad[0]}, ...); nothing was saved. "
                          f"Lower --lr or --max-grad-norm, or check the datastore's targets")


class TrainerState:
    """``CKPT/trainer_state/``: the resumable checkpoints of a run, one folder per saved step.

    A step is written whole into ``.step-NNNNNNNN.tmp/`` (weights, ``optimizer.pt``,
    ``rng-RANK.json`` of every process, then ``state.json``) and renamed to ``step-NNNNNNNN/``:
    one atomic rename commits it, after every staged file and folder is fsynced. Only then are older steps deleted, so an interruption at any
    point leaves the previous complete step in place, and a resume takes the newest complete one.
    Nothing here is unpickled: RNG states are JSON, the optimizer is read with ``weights_only=True``.
    """

    def __init__(self, out: Path):
        self.dir = out / "trainer_state"

    def step_dirs(self) -> list[Path]:
        """Complete steps, oldest first (a ``step-*`` folder exists only once its rename committed it)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name))

    def latest(self) -> dict | None:
        """``state.json`` of the newest complete step, with its ``folder``; None if there is none.
        MemdecError naming the file and the field if it is unreadable or a field is wrong."""
        steps = self.step_dirs()
        if steps:
            file = steps[-1] / "state.json"
            state = read_state_json(file, _STATE_FIELDS)
            if state["step"] != int(steps[-1].name.removeprefix("step-")):
                raise MemdecError(f'{file}: field "step" is {state["step"]}, not the step of its folder (corrupt)')
            return {**state, "folder": steps[-1]}
        legacy = self.dir / "state.json"  # memdec before per-step folders: readable, not resumable
        if legacy.is_file():
            return {**read_state_json(legacy, {"step": WHOLE}), "folder": None}
        return None

    def staging(self, step: int) -> Path:
        return self.dir / f".step-{step:08d}.tmp"

    def begin(self, step: int) -> Path:
        """A fresh staging folder for ``step`` (the main process calls this before any rank writes)."""
        tmp = self.staging(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def promote(self, step: int) -> Path:
        """Rename the staged step into place: the commit. The caller then ``clean``s the older ones."""
        final = self.dir / f"step-{step:08d}"
        if final.exists():  # a leftover of an interrupted run at the same step, newer than any resumed from
            shutil.rmtree(final)
        fsync_tree(self.staging(step))  # the step's bytes on the disk before the rename commits it
        os.rename(self.staging(step), final)
        fsync_path(self.dir)  # and the rename itself
        return final

    def clean(self, keep: Path | None) -> None:
        """Delete staging folders and every step but ``keep``."""
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if p != keep and p.is_dir() and (p.name.startswith(".step-") or re.fullmatch(r"step-\d{8}", p.name)):
                shutil.rmtree(p, ignore_errors=True)


_STATE_FIELDS: dict[str, Kind] = {"step": COUNT, "total_steps": COUNT, "run_fingerprint": TEXT}
_STATE_OPTIONAL: dict[str, Kind] = {"recipe": TEXT, "best": OBJECT, "seconds": NON_NEGATIVE}


def read_state_json(file: Path, required: dict[str, Kind]) -> dict:
    """A trainer ``state.json`` with the ``required`` fields and the optional ones checked
    (``best``, where there is one, names its ``step``). Raises MemdecError naming the file and field."""
    state = read_json_object(file, "trainer state")
    check_fields(state, file, required)
    check_fields(state, file, _STATE_OPTIONAL, optional=True)
    if state.get("best") is not None:
        check_field(state, "best.step", file, COUNT)
    return state


_RNG_FIELDS: dict[str, Kind] = {"step": COUNT, "rng": OBJECT, "rng.torch": LIST, "rng.numpy": LIST, "rng.python": LIST,
                                "rng.cuda": or_null(LIST)}


def read_rng_json(file: Path, step: int) -> dict:
    """The RNG states in ``rng-R.json`` (``rng_state_json``'s form) of the checkpoint ``step``.
    Raises MemdecError naming the file and the field."""
    record = read_json_object(file, "RNG state")
    check_fields(record, file, _RNG_FIELDS)
    if record["step"] != step:
        raise MemdecError(f"{file}: RNG state is from step {record['step']}, not {step} (corrupt)")
    return record["rng"]


def rng_state_json() -> dict:
    """Every RNG this process uses, as plain JSON (never a pickle)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [version, list(internal), gauss],
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}


def restore_rng_state(file: Path, state: dict) -> None:
    """``set_rng_state_json``, or MemdecError naming ``file`` (read by ``read_rng_json``) if its
    states do not fit this process's generators."""
    try:
        set_rng_state_json(state)
    except (TypeError, ValueError, OverflowError, RuntimeError, IndexError) as exc:
        raise MemdecError(f'{file}: field "rng" does not hold RNG states memdec wrote ({one_line(exc)}); '
                          f"delete {file.parent.parent} or use --no-resume to start over") from None


def set_rng_state_json(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------------------------
# What to train


class Recipe:
    """What ``train`` trains, and how it saves and reloads it: by default, the memory decoder.

    ``memdec.baselines`` subclasses it (full fine-tuning, LoRA, the α=0 decoder); the loop, the
    schedule, validation, checkpoints and resume are shared, so every recipe sees the same
    windows in the same order under the same budget.

    name: the system's name in logs. meta_file: the JSON file that commits a checkpoint (meta_files:
    all of its metadata files).
    select: the validation score that picks the best checkpoint: ``best_ppl`` (mixed with the
    base at the best λ) or ``valid_ppl_memdec`` (the trained model alone).
    """

    name = "memdec"
    meta_file = MEMDEC_JSON
    meta_files: tuple[str, ...] = (MEMDEC_JSON,)  # every metadata file a checkpoint of this recipe holds
    select = "best_ppl"

    def data(self, cfg: TrainConfig) -> tuple[np.ndarray, dict]:
        """The training token stream, int32 [N+1], and the manifest naming its base model and tokenizer."""
        store = open_datastore(cfg.datastore)
        return np.asarray(store.tokens), store.manifest.to_json()

    def init_model(self, cfg: TrainConfig, manifest: dict):
        """(model, tokenizer): the model to train, fp32 on CPU, in train mode."""
        return init_memory_decoder(cfg, manifest, "cpu")

    def init_hash(self, cfg: TrainConfig, manifest: dict) -> str | None:
        """``model_fingerprint`` of ``--init`` (None without it), its tokenizer checked first: one
        clear line, before any weights load, if it does not share the training data's. The hash
        joins the run's fingerprint, so a resume starts from the same weights."""
        spec = cfg.init
        if spec is None:
            return None
        check_same_tokenizer(spec, manifest["tokenizer_hash"], f"--init {spec}: the training data", made_with=manifest["model"])
        return model_fingerprint(spec)

    def decoder_shape(self, cfg: TrainConfig, manifest: dict) -> DecoderShape:
        """The shape of the decoder to train (``--decoder``), checked against the base model's config
        before any weights load (``check_decoder_shape``)."""
        return check_decoder_shape(cfg.decoder, manifest["model"], cfg.init, cfg.init_layers)

    def load_weights(self, model, folder: Path) -> None:
        """Load into ``model`` the weights that a save wrote to ``folder`` (to resume)."""
        sd = load_safetensors(folder / "model.safetensors")
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # a tensor of another shape
            raise MemdecError(f"{folder / 'model.safetensors'}: the saved weights do not fit the model "
                              f"({one_line(exc)})") from None
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise MemdecError(f"{folder}: the saved weights do not fit the model ({missing[:3]} {unexpected[:3]})")
        model.tie_weights()

    def write_meta(self, folder: Path, info: dict) -> None:
        """Write the checkpoint's metadata; written last, it commits the checkpoint."""
        write_memdec_json(folder, info)



# --------------------------------------------------------------------------------------------
# Validation


class Validator:
    """Scores the decoder on a validation corpus, alone and mixed with the base at each λ."""

    def __init__(self, cfg: TrainConfig, manifest: dict, tokenizer, device: str):
        self.tokens = load_token_stream(cfg.valid, tokenizer, cfg.valid_max_tokens)
        self.block = cfg.block_size
        self.device = device
        base, _ = load_model(manifest["model"], device=device)
        self.prefix = bos_prefix(tokenizer)
        self.base_nll, _ = score_tokens(base_scorer(base), self.tokens, self.block, self.block // 2, device=device,
                                        desc="valid base", progress=False, prefix=self.prefix)
        del base
        self.lambdas = sorted(set(cfg.lambdas))

    def __call__(self, model) -> dict:
        was_training = model.training
        model.eval()
        mem_nll, _ = score_tokens(base_scorer(model), self.tokens, self.block, self.block // 2, device=self.device,
                                  desc="valid", progress=False, prefix=self.prefix)
        model.train(was_training)
        joint = {lam: float(-np.mean(mix_logprobs(-self.base_nll.astype(np.float64), -mem_nll.astype(np.float64), lam))) for lam in self.lambdas}
        best_lam = min(joint, key=joint.get)
        return {
            "valid_ppl_base": mean_ppl(self.base_nll),
            "valid_ppl_memdec": mean_ppl(mem_nll),
            "valid_ppl_joint": {f"{lam:g}": math.exp(v) for lam, v in joint.items()},
            "best_lambda": best_lam,
            "best_ppl": math.exp(joint[best_lam]),
        }


# --------------------------------------------------------------------------------------------
# The loop


def check_config(cfg: TrainConfig) -> None:
    """Reject every bad setting with one clear line, before anything is loaded or written."""
    check_unit_interval(cfg.alpha, "--alpha")
    check_unit_interval(cfg.teacher_base_weight, "--teacher-base-weight")
    if not cfg.lambdas:
        raise MemdecError("--lambdas needs at least one value in [0, 1]")
    for lam in cfg.lambdas:
        check_unit_interval(lam, "--lambdas")
    check_non_negative(cfg.lr, "--lr")
    check_unit_interval(cfg.min_lr_ratio, "--min-lr-ratio")
    check_positive(cfg.max_grad_norm, "--max-grad-norm")
    check_non_negative(cfg.weight_decay, "--weight-decay")
    check_non_negative(cfg.warmup, "--warmup")
    if cfg.max_steps is None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise MemdecError(f"--epochs must be a positive number, got {cfg.epochs}: the schedule has no steps")
    for flag, value in (("--max-steps", cfg.max_steps), ("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum),
                        ("--block-size", cfg.block_size), ("--eval-every", cfg.eval_every),
                        ("--save-every", cfg.save_every), ("--log-every", cfg.log_every), ("--patience", cfg.patience)):
        if value is not None:
            check_positive_int(value, flag)
    if cfg.patience is not None and not cfg.valid:
        raise MemdecError("--patience stops on the validation score: give --valid CORPUS")
    if cfg.valid_max_tokens < 2:
        raise MemdecError(f"--valid-max-tokens must be at least 2, got {cfg.valid_max_tokens}")
    if cfg.init is not None and cfg.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")
    if cfg.init_layers is not None:
        check_positive_int(cfg.init_layers, "--init-layers")
    if cfg.layer_selection not in ("first", "spread"):
        raise MemdecError(f"unknown --layer-selection '{cfg.layer_selection}' (first or spread)")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise MemdecError(f"unknown --save-dtype '{cfg.save_dtype}' ({', '.join(SAVE_DTYPES)})")
    check_seed(cfg.seed)
    check_device(cfg.device)


def check_decoder_shape(spec: str, model_spec: str, init: str | None = None, init_layers: int | None = None) -> DecoderShape:
    """The shape ``--decoder spec`` names, checked against the base ``model_spec``'s config (its number
    of blocks...) on a weightless skeleton: one MemdecError line before any weights load. A shape
    other than copy is built from the base itself, so ``--init`` and ``--init-layers`` are refused."""
    try:
        shape = parse_shape(spec)
    except MemdecError as exc:
        raise MemdecError(f"--decoder: {exc}") from None
    if shape == parse_shape("copy"):
        return shape
    if init is not None or init_layers is not None:
        raise MemdecError(f"--decoder {spec} is built from the base model itself (its trunk is shared): "
                          f"--init and --init-layers apply to --decoder copy only")
    config = load_config(model_spec)  # first: reading it may convert or fetch the model, never under "meta"
    with torch.device("meta"):  # the architecture without any weights
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        shape.check(skeleton)
    except MemdecError as exc:
        raise MemdecError(f"--decoder: {exc}") from None
    return shape


def planned_steps(cfg: TrainConfig, n_positions: int, world: int = 1) -> int:
    """Optimizer steps of a run over ``n_positions`` training positions: ``--max-steps``, else
    ``--epochs`` passes over its windows (what a budget of "the same steps" means)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    n_windows = len(window_starts(n_positions, min(cfg.block_size, n_positions)))
    return math.ceil(cfg.epochs * n_windows / (cfg.batch_size * cfg.grad_accum * world))


def check_out_folder(out: Path, recipe: "Recipe", datastore: str | None) -> None:
    """``--out`` must be new, empty, or a checkpoint folder of this kind that memdec made: a folder
    memdec did not create is never changed."""
    if datastore is not None:
        ds = Path(datastore).expanduser().resolve()
        if out.resolve() == ds or ds in out.resolve().parents:
            raise MemdecError(f"--out {out} lies inside the datastore {datastore}; choose a folder of its own")
    # a finished checkpoint without trainer state (a meta file): the resume logic says what to do
    check_own_folder(out, "checkpoint", legacy=is_unmarked_checkpoint)


def is_unmarked_checkpoint(out: Path) -> bool:
    """Whether ``out`` is a checkpoint folder memdec made before folder markers: a ``memdec.json`` or
    ``baseline.json`` of memdec's format, or a ``trainer_state/`` of its committed or staged steps."""
    if holds_record(out / MEMDEC_JSON, format=CHECKPOINT_FORMAT) or holds_record(out / BASELINE_JSON,
                                                                               format=BASELINE_FORMAT):
        return True
    state = out / "trainer_state"
    step = re.compile(r"\.?step-\d{8}(\.tmp)?")  # TrainerState's committed and staged steps
    return state.is_dir() and any(p.is_dir() and step.fullmatch(p.name) or p.name == "state.json" for p in state.iterdir())


class Trainer:
    """One training run, resumable: ``Trainer(cfg, recipe).run()`` returns the checkpoint folder.

    Plan (windows, steps), resume (the newest complete step of ``CKPT/trainer_state``), step
    (micro-batches, a finite-loss check, clipping, the update), validate (``Validator``) and save
    (the best checkpoint in ``CKPT/``, the resumable state in ``TrainerState``).
    ``on_step(step, record)`` runs after every optimizer step; ``on_save(event, step)`` at each
    point of a save (``rng``, ``weights``, ``optimizer``, ``state``, ``renamed``: tests interrupt there).
    """

    def __init__(self, cfg: TrainConfig, recipe: "Recipe | None" = None, on_step=None, on_save=None):
        check_config(cfg)
        self.cfg, self.recipe = cfg, recipe or Recipe()
        self.on_step, self.on_save = on_step, on_save
        self.out = Path(cfg.out).expanduser()
        check_out_folder(self.out, self.recipe, cfg.datastore)
        self.state = TrainerState(self.out)
        self.tokens, self.manifest = self.recipe.data(cfg)
        self.shape = self.recipe.decoder_shape(cfg, self.manifest)  # checked before any weights load
        self.own_only = self.shape != parse_shape("copy")  # steps and checkpoints hold the own tensors only
        self.targets = open_datastore(cfg.datastore).load_targets() if cfg.alpha > 0 else None
        self.manifest_hash = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]
        self.init_hash = self.recipe.init_hash(cfg, self.manifest)
        self.fingerprint = run_fingerprint(cfg, self.manifest_hash, self.init_hash, self.shape.lr_scale)
        self.device = resolve_device(cfg.device)
        self.cpu = not self.device.startswith("cuda")
        self.accelerator = Accelerator(cpu=self.cpu, mixed_precision="no" if self.cpu else "bf16", gradient_accumulation_steps=1)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self._plan()
        self.previous = self._previous()

    # -- plan and resume ---------------------------------------------------------------------

    def _plan(self) -> None:
        cfg = self.cfg
        n_positions = len(self.tokens) - 1
        self.block = min(cfg.block_size, n_positions)
        self.starts = window_starts(n_positions, self.block)
        self.windows_per_step = cfg.batch_size * cfg.grad_accum * self.world
        self.total_steps = planned_steps(cfg, n_positions, self.world)
        if self.total_steps < 1:
            raise MemdecError(f"the schedule has no steps: {len(self.starts)} windows of {self.block} tokens, "
                              f"{self.windows_per_step} per step, epochs={cfg.epochs}, max_steps={cfg.max_steps}")

    def _previous(self) -> dict | None:
        """The state of the newest complete step of an earlier call of this run, to resume from. A folder
        holding another run is refused, with or without --no-resume: that starts this very run over."""
        prev = self.state.latest()
        if prev is None:
            if self._meta_file() is not None:
                return self._finished_without_state() if self.cfg.resume else self._check_same_finished_run()
            return None
        if prev.get("run_fingerprint") != self.fingerprint or prev.get("recipe", self.recipe.name) != self.recipe.name:
            raise self._another_run()
        if not self.cfg.resume:
            return None
        if prev["folder"] is None and prev["step"] < self.total_steps:
            raise MemdecError(f"{self.state.dir} was written by an older memdec and cannot be resumed; "
                              f"delete {self.out} (or use --no-resume) to start over")
        if prev["folder"] is not None:  # read before any model loads: a bad file is one line, at once
            if prev.get("best") is not None:
                check_field(prev, f"best.{self.recipe.select}", prev["folder"] / "state.json", SCORE)
            prev["rng_file"] = prev["folder"] / f"rng-{self.rank}.json"
            prev["rng"] = read_rng_json(prev["rng_file"], prev["step"])
        return prev

    def _meta_file(self) -> Path | None:
        """The metadata file of a finished checkpoint in ``--out`` (this recipe's first; any recipe's
        marks the folder as memdec's), or None."""
        names = dict.fromkeys([self.recipe.meta_file, *self.recipe.meta_files, *CHECKPOINT_META_FILES])
        return next((self.out / n for n in names if (self.out / n).is_file()), None)

    def _another_run(self) -> MemdecError:
        return MemdecError(f"{self.out} holds a checkpoint of another run (other datastore, settings or method); "
                           f"choose another --out, or delete {self.out} to start over (--no-resume starts over the "
                           f"same run only)")

    def _check_same_finished_run(self) -> None:
        """--no-resume over a finished checkpoint without trainer state: None (start over) when it is this
        very run (its recipe's metadata, its ``run_fingerprint``); MemdecError when it is another run."""
        file = self._meta_file()
        meta = read_json_object(file, file.name)
        others = [n for n in CHECKPOINT_META_FILES if n not in self.recipe.meta_files and (self.out / n).is_file()]
        if others or meta.get("run_fingerprint") != self.fingerprint:
            raise self._another_run()

    def _finished_without_state(self) -> dict:
        """A finished run whose ``trainer_state/`` was dropped (no --keep-trainer-state): this very run
        asked again is done (``folder`` None); asked to train further, or another run, one line."""
        file = self._meta_file()
        meta = read_json_object(file, file.name)
        if "dropped_trainer_state_at" not in meta:
            raise MemdecError(f"{self.out} holds a finished checkpoint without trainer state; choose another --out")
        step = check_field(meta, "dropped_trainer_state_at", file, COUNT)
        if check_field(meta, "run_fingerprint", file, TEXT) != self.fingerprint:
            raise self._another_run()
        patience = (meta.get("train_config") or {}).get("patience")
        if step < self.total_steps and patience != self.cfg.patience:
            raise MemdecError(f"{self.out}: this run finished at step {step} and its trainer state was dropped (it ran "
                              f"without --keep-trainer-state), so it cannot be extended to step {self.total_steps}; "
                              f"train into a new --out, with --keep-trainer-state to extend it later")
        return {"step": step, "folder": None}

    def _load_resumed(self, optimizer, scheduler) -> None:
        """Optimizer, scheduler and RNG states of ``self.previous`` (weights are loaded before ``prepare``)."""
        folder, step = self.previous["folder"], self.previous["step"]
        try:
            payload = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt or crafted file: refuse it, never unpickle
            raise MemdecError(f"{folder / 'optimizer.pt'}: unreadable optimizer state ({type(exc).__name__}); "
                              f"delete {self.state.dir} or use --no-resume to start over") from None
        file = folder / "optimizer.pt"
        if not isinstance(payload, dict) or not {"optimizer", "scheduler"} <= payload.keys():
            raise MemdecError(f"{file}: not an optimizer state memdec wrote (corrupt)")
        if payload.get("step") != step:
            raise MemdecError(f"{folder}: optimizer state is from step {payload.get('step')}, not {step} (corrupt)")
        try:
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise MemdecError(f"{file}: the optimizer state does not fit this run ({one_line(exc)})") from None
        restore_rng_state(self.previous["rng_file"], self.previous["rng"])

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> Path:
        if self.accelerator.is_main_process:  # saves killed mid-way (SIGKILL) left these; --out is memdec's
            remove_interrupted_writes(self.out, SAVE_PREFIX)
        if self.previous is not None and self.previous["folder"] is None:  # a finished run of an older memdec
            return self.out
        set_seed(self.cfg.seed)
        model, self.tokenizer = self.recipe.init_model(self.cfg, self.manifest)
        if self.own_only:  # the base itself: the shape shares what it shares and copies the rest
            model = self.shape.build(model)
            model.config.use_cache = False
            model.train()
        self.prefix = bos_prefix(self.tokenizer)
        if self.targets is not None:
            self.targets.check_vocab(vocab_rows(model), self.cfg.datastore)
        if self.previous:
            self._load_weights(model, self.previous["folder"])
        optimizer, scheduler = self._optimizer(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        start_step, self.best = 0, None
        if self.previous:
            self._load_resumed(self.optimizer, self.scheduler)
            start_step, self.best = self.previous["step"], self.previous.get("best")
        self.saved_step = start_step
        self.seconds_before = float(self.previous.get("seconds", 0.0)) if self.previous else 0.0
        self.teacher_base = self._teacher_base()
        self.heads = self._heads()
        self.validator = None
        if self.cfg.valid and self.accelerator.is_main_process:
            self.validator = Validator(self.cfg, self.manifest, self.tokenizer, self.accelerator.device.type)
        self.info = self._info()
        self._open_log(start_step)
        self._loop(start_step)
        return self.out

    def _load_weights(self, model, folder: Path) -> None:
        """The weights of the step ``folder``: the recipe's, or a shape's own tensors (``OWN_STEP_WEIGHTS``)."""
        if not self.own_only:
            self.recipe.load_weights(model, folder)
            return
        file = folder / OWN_STEP_WEIGHTS
        saved, own = load_safetensors(file), self.shape.own_tensors(model)
        if saved.keys() != own.keys() or any(saved[k].shape != own[k].shape for k in own):
            raise MemdecError(f"{file}: the saved tensors do not fit the {self.shape.spec} decoder "
                              f"(delete {self.state.dir} or use --no-resume to start over)")
        model.load_state_dict(saved, strict=False)

    def _optimizer(self, model):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:  # frozen (the base weights under LoRA)
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr * self.shape.lr_scale, betas=(0.9, 0.95), eps=1e-8,
        )
        total = self.total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, cfg.warmup, cfg.min_lr_ratio))
        return optimizer, scheduler

    def _teacher_base(self):
        """The frozen base model, when the teacher mixes in its distribution (β > 0)."""
        if not (self.cfg.alpha > 0 and self.cfg.teacher_base_weight > 0):
            return None
        base, _ = load_model(self.manifest["model"], device=str(self.accelerator.device))
        return base.eval().requires_grad_(False)

    def _heads(self):
        """(the decoder's LM head, the teacher base's or None) for the chunked loss; None where a
        head does not reproduce its model's logits: then the loss takes the full logits."""
        probe = with_prefix(torch.from_numpy(self.tokens[:16].astype(np.int64))[None], self.prefix).to(self.accelerator.device)
        head = lm_head(self.unwrapped, probe)
        teacher = lm_head(self.teacher_base, probe) if self.teacher_base is not None else None
        if head is None or (self.teacher_base is not None and teacher is None):
            return None
        return head, teacher

    def _info(self) -> dict:
        cfg, manifest, model = self.cfg, self.manifest, self.unwrapped
        targets = manifest.get("steps", {}).get("targets", {})
        made = f"first {cfg.init_layers} blocks" if cfg.init_layers else \
            "full copy" if self.shape.spec == "copy" else self.shape.spec
        init = cfg.init or f"{manifest['model']} ({made})"
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "base_model": manifest["model"], "tokenizer_hash": manifest["tokenizer_hash"],
            "datastore": str(Path(cfg.datastore).resolve()) if cfg.datastore else None,
            "datastore_manifest_hash": self.manifest_hash,
            "corpus": manifest.get("corpus"), "corpus_hash": manifest.get("corpus_hash"),
            "k": targets.get("k"), "knn_temperature": targets.get("temperature"),
            "alpha": cfg.alpha, "teacher_base_weight": cfg.teacher_base_weight, "init": init,
            **({"init_hash": self.init_hash} if self.init_hash else {}),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "world_size": self.world, "run_fingerprint": self.fingerprint,
        }

    def train_seconds(self) -> float:
        """Wall time of the loop (validation and saves included), over every call that resumed it."""
        return self.seconds_before + time.perf_counter() - self.t_start

    def _loop(self, start_step: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        bar = tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step", disable=not acc.is_main_process)
        self.t_start, tokens_done = time.perf_counter(), 0
        self.model.train()
        stopped = None
        for step in range(start_step, self.total_steps):
            if self._patience_spent(step):  # a resumed run that had already stopped early
                stopped = step
                break
            record = self._step(step)
            tokens_done += self.windows_per_step * self.block
            record["tokens_per_s"] = tokens_done / (time.perf_counter() - self.t_start)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}", ce=f"{record['ce']:.3f}",
                            lr=f"{record['lr']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            done = step + 1 == self.total_steps
            if self.validator is not None and ((step + 1) % cfg.eval_every == 0 or done):
                self._validate(step + 1, record, bar)
                if not done and self._patience_spent(step + 1):
                    done, stopped = True, step + 1
                    record["stopped_early"] = True
                    bar.write(f"step {step + 1}: no better checkpoint in {cfg.patience} validations "
                              f"(best: step {self.best['step']}): stopping early")
            if (step + 1) % cfg.log_every == 0 or "best_ppl" in record or done:
                self._log(record)
            if (step + 1) % cfg.save_every == 0 or done:
                acc.wait_for_everyone()
                if self.validator is None and acc.is_main_process:
                    self._save_best(record)
                self._save_state(step + 1)
            if self.on_step is not None:
                self.on_step(step + 1, record)
            if stopped is not None:
                break
        bar.close()
        acc.wait_for_everyone()
        if acc.is_main_process and start_step < self.total_steps:  # the whole loop's time, not the best step's
            meta = read_json_object(self.out / self.recipe.meta_file, self.recipe.meta_file)
            extra = {"stopped_early_at": stopped} if stopped is not None else {}
            if not cfg.keep_trainer_state:  # recorded first: a rerun of this very run then knows it is done
                extra["dropped_trainer_state_at"] = self.saved_step
            self.recipe.write_meta(self.out, {**meta, "train_seconds": round(self.train_seconds(), 1), **extra})
            if not cfg.keep_trainer_state:
                shutil.rmtree(self.state.dir)
        acc.wait_for_everyone()

    def _patience_spent(self, step: int) -> bool:
        """Early stopping: ``--patience`` validations since the best one (a function of the step and
        the best step alone, so a resumed run stops where the straight one did)."""
        cfg = self.cfg
        if cfg.patience is None or self.validator is None or self.best is None:
            return False
        return step - self.best["step"] >= cfg.patience * cfg.eval_every

    def _step(self, step: int) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; MemdecError (before the update) if
        the loss or the gradient norm is not finite on any process."""
        cfg, acc, n_micro = self.cfg, self.accelerator, self.cfg.grad_accum
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
        for micro in range(n_micro):
            starts = micro_batch_starts(self.starts, cfg.seed, step * n_micro + micro, cfg.batch_size, self.rank, self.world)
            batch = {k: v.to(acc.device) for k, v in collate(self.tokens, self.targets, starts, self.block, cfg.alpha > 0).items()}
            sync = micro == n_micro - 1
            with acc.no_sync(self.model) if (not sync and self.world > 1) else nullcontext():
                loss, kl, ce = self._loss(batch)
                acc.backward(loss / n_micro)
            for key, value in (("loss", loss), ("kl", kl), ("ce", ce)):
                sums[key] += value.item() / n_micro
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        bad = torch.tensor(float(not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm))), device=acc.device)
        if self.world > 1:
            bad = acc.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise MemdecError(
                f"step {step + 1}: the loss ({sums['loss']:.4g}) or the gradient norm ({grad_norm:.4g}) is not finite; "
                f"stopped before the update. The last good checkpoint is step {self.saved_step} in {self.state.dir}. "
                f"Lower --lr, or check the datastore's targets")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step + 1, **sums, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}

    def _loss(self, batch: dict):
        """The loss of one micro-batch; with a BOS prefix, the window gets it and its logits lose it.

        The loss goes from the final hidden states through the LM head chunk by chunk
        (``loss.head_kl_ce_loss``: no [positions × vocab] logits held); from the full logits only
        for a model whose head ``loss.lm_head`` cannot reproduce."""
        cfg = self.cfg
        input_ids, n = with_prefix(batch["input_ids"], self.prefix), batch["input_ids"].shape[1]
        labels = batch["labels"].reshape(-1)
        targets = ((batch["target_rows"], batch["target_ids"], batch["target_probs"]) if cfg.alpha > 0
                   else (None, None, None))
        with self.accelerator.autocast():
            if self.heads is not None:
                head, teacher_head = self.heads
                hidden = last_hidden(self.model, input_ids, n)  # [P, d]
                teacher = None
                if self.teacher_base is not None:
                    with torch.no_grad():
                        teacher = (last_hidden(self.teacher_base, input_ids, n), teacher_head)
                return head_kl_ce_loss(hidden, head, labels, *targets, cfg.alpha, teacher, cfg.teacher_base_weight)
            logits = self.model(input_ids=input_ids).logits[:, -n:]
            logits = logits.reshape(-1, logits.shape[-1])
            base_logits = None
            if self.teacher_base is not None:
                with torch.no_grad():
                    base_logits = self.teacher_base(input_ids=input_ids).logits[:, -n:].reshape(logits.shape)
        return sparse_kl_ce_loss(logits, labels, *targets, cfg.alpha, base_logits, cfg.teacher_base_weight)

    def _validate(self, step: int, record: dict, bar) -> None:
        scores = self.validator(self.unwrapped)
        record.update(scores)
        select = self.recipe.select
        if self.best is None or scores[select] < self.best[select]:
            self.best = {"step": step, **scores}
            self._save_best(record)
        bar.write(f"step {step}: valid ppl base {scores['valid_ppl_base']:.2f}, {self.recipe.name} "
                  f"{scores['valid_ppl_memdec']:.2f}, joint {scores['best_ppl']:.2f} at lambda {scores['best_lambda']:g}")

    # -- saving ------------------------------------------------------------------------------

    def _event(self, name: str, step: int) -> None:
        if self.on_save is not None:
            self.on_save(name, step)

    def _save_best(self, record: dict) -> None:
        """The best checkpoint, in ``CKPT/`` itself: its metadata files go first and come back last,
        so the folder is a loadable checkpoint exactly when they are there."""
        if not self.accelerator.is_main_process:
            return
        check_finite_weights(self.unwrapped, f"{self.out} (step {record['step']})")
        for name in (*self.recipe.meta_files, *WEIGHTS_DEPENDENTS):  # a router made for the old weights goes too
            (self.out / name).unlink(missing_ok=True)
        shape = self._save_decoder()
        self.recipe.write_meta(self.out, {**self.info, **shape, "lambda": record.get("best_lambda", 0.5),
                                          "train_seconds": round(self.train_seconds(), 1),
                                          "train_stats": record, "train_config": asdict(self.cfg)})

    def _save_decoder(self) -> dict:
        """The decoder's files in ``CKPT/`` (weights in ``--save-dtype``), returned as ``memdec.json``'s
        ``decoder`` record where the shape is not copy (a copy is today's full model folder)."""
        model, dtype = self.unwrapped, SAVE_DTYPES[self.cfg.save_dtype]
        if not self.own_only:
            with cast_for_saving(model, None, dtype):
                save_model_folder(model, self.tokenizer, self.out)
            return {}
        record = {}

        def write(tmp: Path) -> None:
            with cast_for_saving(model, set(self.shape.own_tensors(model)), dtype):
                record.update(self.shape.save(model, tmp))
            self.tokenizer.save_pretrained(tmp)

        save_files(self.out, write)
        return {"decoder": record}

    def _save_state(self, step: int) -> None:
        """Stage every process's share of the step, then commit it with one rename (``TrainerState``)."""
        acc, main = self.accelerator, self.accelerator.is_main_process
        if main:
            check_finite_weights(self.unwrapped, f"{self.state.dir} (step {step})")
            self.state.begin(step)
        acc.wait_for_everyone()
        stage = self.state.staging(step)
        atomic_write_json(stage / f"rng-{self.rank}.json", {"step": step, "rng": rng_state_json()})
        self._event("rng", step)
        acc.wait_for_everyone()
        if main:
            try:
                self._write_stage(stage, step)
            except OSError:  # a full disk: the staged step goes, the previous complete one stays
                shutil.rmtree(stage, ignore_errors=True)
                raise
            final = self.state.promote(step)
            self.saved_step = step
            self._event("renamed", step)
            self.state.clean(keep=final)
        acc.wait_for_everyone()

    def _write_stage(self, stage: Path, step: int) -> None:
        """The main process's share of a step: weights, optimizer and scheduler, then ``state.json``."""
        if self.own_only:  # the shape's own tensors, float32: the rest is the base's
            tensors = {k: v.detach().contiguous() for k, v in self.shape.own_tensors(self.unwrapped).items()}
            with os_errors_named(stage / OWN_STEP_WEIGHTS):
                save_file(tensors, str(stage / OWN_STEP_WEIGHTS), metadata={"format": "pt"})
        else:
            write_model_files(self.unwrapped, self.tokenizer, stage)
        self._event("weights", step)
        payload = {"step": step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        atomic_write_stream(stage / "optimizer.pt", lambda f: torch.save(payload, f))
        self._event("optimizer", step)
        atomic_write_json(stage / "state.json", {
            "step": step, "total_steps": self.total_steps, "run_fingerprint": self.fingerprint,
            "recipe": self.recipe.name, "best": self.best, "seconds": round(self.train_seconds(), 3)})
        self._event("state", step)

    # -- the log -----------------------------------------------------------------------------

    def _open_log(self, start_step: int) -> None:
        """``log.jsonl`` of this run: started afresh, or cut back to the resumed step so no step repeats."""
        if not self.accelerator.is_main_process:
            return
        mark_own_folder(self.out, "checkpoint")  # first: the marker says the folder is memdec's
        self.state.dir.mkdir(parents=True, exist_ok=True)  # from here on the folder is this run's
        self.log_path = self.out / "log.jsonl"
        if start_step == 0:
            self.log_path.unlink(missing_ok=True)
        elif self.log_path.is_file():  # a line cut short by an interruption is dropped too
            records = read_jsonl(self.log_path)
            for r in records:
                check_field(r, "step", self.log_path, COUNT)
            kept = [r for r in records if r["step"] <= start_step]
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.log_path, record)


def train(cfg: TrainConfig, on_step=None, recipe: "Recipe | None" = None, on_save=None) -> Path:
    """Train a memory decoder (or what ``recipe`` says); returns the checkpoint folder.

    Resumes from the newest complete step in ``CKPT/trainer_state``. ``on_step(step, record)``
    is called after every optimizer step, ``on_save(event, step)`` inside each save (tests).
    """
    return Trainer(cfg, recipe, on_step=on_step, on_save=on_save).run()
