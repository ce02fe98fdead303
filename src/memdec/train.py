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
- ``CKPT/trainer_state/``: the last checkpoint with optimizer, scheduler and RNG state, for resume;
- ``CKPT/log.jsonl``: one line per logged step and per validation.

Every file is written through a temporary file and renamed into place; ``memdec.json`` and
``trainer_state/state.json`` are written last, so they commit a save.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import MemdecError, TokenizerMismatchError
from .files import atomic_write

if TYPE_CHECKING:
    from .targets import KnnTargets

CHECKPOINT_FORMAT = "memdec"
CHECKPOINT_VERSION = 1


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
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    resume: bool = True


TRAIN_HELP = {
    "datastore": "datastore folder built by `memdec datastore` (its targets step must be done)",
    "out": "checkpoint folder: the best checkpoint, plus trainer_state/ for resume",
    "init": "initialise from this model spec (same tokenizer as the base); default: a full copy of the base",
    "init_layers": "initialise from a shortened copy of the base model with N blocks",
    "layer_selection": "with --init-layers: 'first' N blocks or 'spread' (evenly spaced)",
    "alpha": "weight of KL(p_kNN || p_mem); 1-alpha weighs next-token cross-entropy",
    "teacher_base_weight": "mix the base model's distribution into the kNN teacher: (1-b)*p_kNN + b*p_base "
                           "(costs a frozen base forward per step)",
    "epochs": "passes over the datastore's windows (ignored if --max-steps is set)",
    "max_steps": "optimizer steps to run",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "cosine decay ends at lr * this",
    "warmup": "linear warm-up steps",
    "batch_size": "windows per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "block_size": "window length in tokens",
    "valid": "validation corpus spec; chooses lambda and the best checkpoint",
    "valid_max_tokens": "validate on the first N tokens of --valid",
    "lambdas": "interpolation weights tried at validation",
    "eval_every": "validate every K optimizer steps",
    "save_every": "save a resumable checkpoint every K optimizer steps",
    "resume": "continue from CKPT/trainer_state if it exists",
}


# --------------------------------------------------------------------------------------------
# Loss


class _SparseKLCE(torch.autograd.Function):
    """Fused α·KL(t ‖ softmax(z)) + (1−α)·CE over sparse targets, with a hand-written backward.

    The teacher is t = (1−β)·p_kNN + β·p_base: the sparse kNN rows, optionally mixed with the
    frozen base model's distribution (``base_logits``, the base's own [P, V] logits of the batch).
    Autograd through logsumexp + gather + advanced indexing allocates several [P, V] buffers;
    the closed form needs one: dL/dz = ((α·s + 1−α)·softmax(z) − α·(1−β)·p_scatter − α·β·p_base
    − (1−α)·onehot) / P, where s = (1−β)·(each row's kNN mass, 1 up to fp16 rounding) + β.
    """

    @staticmethod
    def forward(ctx, logits, labels, target_rows, target_ids, target_probs, alpha: float, base_logits=None, beta: float = 0.0):
        logits = logits.float()
        n = logits.shape[0]
        lse = torch.logsumexp(logits, dim=-1)  # [P]
        ce = (lse - logits.gather(1, labels[:, None]).squeeze(1)).mean()
        p_base = None
        if alpha > 0:
            knn = target_probs * (1 - beta)
            log_q = logits[target_rows, target_ids] - lse[target_rows]  # [nnz]
            mass = torch.zeros(n, device=logits.device).index_add_(0, target_rows, knn)
            if beta > 0:
                p_base = torch.softmax(base_logits.float(), dim=-1)  # [P, V]
                at_support = beta * p_base[target_rows, target_ids]  # [nnz]
                # Σ t·log t over the vocabulary: the dense β·p_base part, corrected where kNN rows add mass
                neg_entropy = (torch.special.xlogy(beta * p_base, beta * p_base).sum()
                               + (torch.special.xlogy(knn + at_support, knn + at_support)
                                  - torch.special.xlogy(at_support, at_support)).sum())
                cross = (knn * log_q).sum() + beta * (p_base * (logits - lse[:, None])).sum()
                mass = mass + beta
            else:
                neg_entropy = torch.special.xlogy(knn, knn).sum()
                cross = (knn * log_q).sum()
            kl = (neg_entropy - cross) / n
        else:
            kl, mass, knn = torch.zeros((), device=logits.device), None, target_probs
        ctx.save_for_backward(logits, lse, labels, target_rows, target_ids, knn, mass, p_base)
        ctx.alpha, ctx.beta = alpha, beta
        return alpha * kl + (1 - alpha) * ce, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_kl, grad_ce):
        logits, lse, labels, target_rows, target_ids, knn, mass, p_base = ctx.saved_tensors
        a, n = ctx.alpha, logits.shape[0]
        # only the loss is differentiated; kl and ce are reported values
        grad = torch.exp(logits - lse[:, None])  # softmax, [P, V]
        row_scale = (1 - a) + (a * mass if mass is not None else 0.0)
        grad.mul_(row_scale[:, None] if torch.is_tensor(row_scale) else row_scale)
        if a > 0:
            grad.index_put_((target_rows, target_ids), -a * knn, accumulate=True)
            if p_base is not None:
                grad.add_(p_base, alpha=-a * ctx.beta)
        if a < 1:
            rows = torch.arange(n, device=grad.device)
            grad.index_put_((rows, labels), torch.full((n,), -(1 - a), device=grad.device), accumulate=True)
        grad.mul_(grad_loss / n)
        return grad, None, None, None, None, None, None, None


def sparse_kl_ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_rows: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    alpha: float,
    base_logits: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """α·KL(t ‖ p_mem) + (1−α)·CE, averaged over positions, with teacher t = (1−β)·p_kNN + β·p_base.

    logits: [P, V] decoder logits of P positions; labels: [P] next tokens.
    target_rows: [nnz] long, the position (0..P-1) of each stored kNN entry;
    target_ids: [nnz] long token ids; target_probs: [nnz] float, each row summing to 1.
    base_logits: [P, V] the frozen base model's logits at the same positions (needed when β > 0).
    The kNN part of the KL is gathered at the stored ids only, so no vocabulary-sized target row
    is built from the datastore. With α=0 the targets may be None.
    Returns (loss, kl, ce), scalars; only ``loss`` carries a gradient.
    """
    if not 0.0 <= beta <= 1.0:
        raise MemdecError(f"the teacher's base weight must lie in [0, 1], got {beta}")
    if alpha > 0:
        target_probs = target_probs.float()
        if beta > 0 and base_logits is None:
            raise MemdecError("a teacher mixed with the base model (beta > 0) needs the base logits")
    else:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        target_rows, target_ids, target_probs = empty, empty, torch.zeros(0, device=logits.device)
        beta = 0.0
    loss, kl, ce = _SparseKLCE.apply(logits, labels, target_rows, target_ids, target_probs, float(alpha),
                                     base_logits if beta > 0 else None, float(beta))
    return loss, kl.detach(), ce.detach()


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


def collate(tokens: np.ndarray, targets: "KnnTargets | None", starts: np.ndarray, block: int, need_targets: bool = True) -> dict:
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


def decoder_layers(model) -> tuple[torch.nn.Module, str]:
    """(parent module, attribute name) of a causal LM's list of transformer blocks."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers"):
        parent, ok = model, True
        *heads, last = path.split(".")
        for name in heads:
            parent = getattr(parent, name, None)
            if parent is None:
                ok = False
                break
        if ok and isinstance(getattr(parent, last, None), torch.nn.ModuleList):
            return parent, last
    raise MemdecError(f"cannot find the transformer blocks of a {type(model).__name__}")


def select_layers(n_total: int, n_keep: int, selection: str) -> list[int]:
    if not 1 <= n_keep <= n_total:
        raise MemdecError(f"--init-layers must be between 1 and {n_total}, got {n_keep}")
    if selection == "first":
        return list(range(n_keep))
    if selection == "spread":
        return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, n_keep)})
    raise MemdecError(f"unknown --layer-selection '{selection}' (first or spread)")


def shortened_copy(model, n_layers: int, selection: str = "first"):
    """A copy of ``model`` with ``n_layers`` of its blocks, and its embeddings, final norm and head."""
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    keep = select_layers(len(layers), n_layers, selection)
    small = copy.deepcopy(model)
    s_parent, _ = decoder_layers(small)
    new_layers = torch.nn.ModuleList([copy.deepcopy(layers[i]) for i in keep])
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(s_parent, attr, new_layers)
    cfg = small.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, name):
            setattr(cfg, name, len(keep))
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return small


def init_memory_decoder(cfg: TrainConfig, manifest: dict, device: str):
    """Build the decoder to train; its tokenizer must equal the datastore's. Returns (model, tokenizer)."""
    from .models import load_model, tokenizer_fingerprint

    if cfg.init is not None and cfg.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")
    spec = cfg.init or manifest["model"]
    model, tokenizer = load_model(spec, device="cpu", dtype=torch.float32)
    fp = tokenizer_fingerprint(tokenizer)
    if fp != manifest["tokenizer_hash"]:
        raise TokenizerMismatchError(
            f"--init {spec}: its tokenizer ({fp}) differs from the datastore's ({manifest['tokenizer_hash']}, "
            f"model {manifest['model']}); a memory decoder must share the base model's tokenizer exactly"
        )
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
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", dir=folder))
    try:
        model.config.use_cache = True
        model.save_pretrained(tmp)
        model.config.use_cache = False
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_memdec_json(folder: Path, info: dict) -> None:
    atomic_write(folder / "memdec.json", lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))


def run_fingerprint(cfg: TrainConfig, manifest_hash: str) -> str:
    """What makes two training runs the same run: everything but budget-free knobs."""
    keep = asdict(cfg)
    for k in ("out", "device", "resume", "log_every", "eval_every", "save_every"):
        keep.pop(k)
    if not keep["teacher_base_weight"]:  # added later: runs without it keep their fingerprint
        keep.pop("teacher_base_weight")
    keep["datastore_manifest_hash"] = manifest_hash
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# What to train


class Recipe:
    """What ``train`` trains, and how it saves and reloads it: by default, the memory decoder.

    ``memdec.baselines`` subclasses it (full fine-tuning, LoRA, the α=0 decoder); the loop, the
    schedule, validation, checkpoints and resume are shared, so every recipe sees the same
    windows in the same order under the same budget.

    name: the system's name in logs. meta_file: the JSON file that commits a checkpoint.
    select: the validation score that picks the best checkpoint: ``best_ppl`` (mixed with the
    base at the best λ) or ``valid_ppl_memdec`` (the trained model alone).
    """

    name = "memdec"
    meta_file = "memdec.json"
    select = "best_ppl"

    def data(self, cfg: TrainConfig) -> tuple[np.ndarray, dict]:
        """The training token stream, int32 [N+1], and the manifest naming its base model and tokenizer."""
        from .datastore import open_datastore

        store = open_datastore(cfg.datastore)
        return np.asarray(store.tokens), store.manifest

    def init_model(self, cfg: TrainConfig, manifest: dict):
        """(model, tokenizer): the model to train, fp32 on CPU, in train mode."""
        return init_memory_decoder(cfg, manifest, "cpu")

    def load_weights(self, model, folder: Path) -> None:
        """Load into ``model`` the weights that a save wrote to ``folder`` (to resume)."""
        from safetensors.torch import load_file

        sd = load_file(str(folder / "model.safetensors"))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise MemdecError(f"{folder}: the saved weights do not fit the model ({missing[:3]} {unexpected[:3]})")
        model.tie_weights()

    def write_meta(self, folder: Path, info: dict) -> None:
        """Write the checkpoint's metadata; written last, it commits the checkpoint."""
        write_memdec_json(folder, info)

    def read_meta(self, folder: Path) -> dict:
        return json.loads((folder / self.meta_file).read_text())


# --------------------------------------------------------------------------------------------
# Validation


class Validator:
    """Scores the decoder on a validation corpus, alone and mixed with the base at each λ."""

    def __init__(self, cfg: TrainConfig, manifest: dict, tokenizer, device: str):
        from .data import load_token_stream
        from .evaluate import base_scorer, score_tokens
        from .models import load_model

        self.tokens = load_token_stream(cfg.valid, tokenizer, cfg.valid_max_tokens)
        self.block = cfg.block_size
        self.device = device
        base, _ = load_model(manifest["model"], device=device)
        self.base_nll, _ = score_tokens(base_scorer(base), self.tokens, self.block, self.block // 2, device=device, desc="valid base", progress=False)
        del base
        self.lambdas = sorted(set(cfg.lambdas))

    def __call__(self, model) -> dict:
        from .evaluate import base_scorer, mix_logprobs, score_tokens

        was_training = model.training
        model.eval()
        mem_nll, _ = score_tokens(base_scorer(model), self.tokens, self.block, self.block // 2, device=self.device, desc="valid", progress=False)
        model.train(was_training)
        joint = {lam: float(-np.mean(mix_logprobs(-self.base_nll.astype(np.float64), -mem_nll.astype(np.float64), lam))) for lam in self.lambdas}
        best_lam = min(joint, key=joint.get)
        return {
            "valid_ppl_base": math.exp(float(np.mean(self.base_nll, dtype=np.float64))),
            "valid_ppl_memdec": math.exp(float(np.mean(mem_nll, dtype=np.float64))),
            "valid_ppl_joint": {f"{lam:g}": math.exp(v) for lam, v in joint.items()},
            "best_lambda": best_lam,
            "best_ppl": math.exp(joint[best_lam]),
        }


# --------------------------------------------------------------------------------------------
# The loop


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: TrainConfig, on_step=None, recipe: Recipe | None = None) -> Path:
    """Train a memory decoder; returns the checkpoint folder. Resumes from CKPT/trainer_state.

    ``on_step(step, record)`` is called after every optimizer step (used by tests and the
    ``adapt`` display). ``recipe`` says what to train (default: the memory decoder); see
    ``memdec.baselines`` for the others.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .models import resolve_device, tokenizer_fingerprint
    from .targets import load_targets

    recipe = recipe or Recipe()
    if not 0.0 <= cfg.alpha <= 1.0:
        raise MemdecError(f"--alpha must lie in [0, 1], got {cfg.alpha}")
    tokens, manifest = recipe.data(cfg)
    targets = load_targets(cfg.datastore) if cfg.alpha > 0 else None
    manifest_hash = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]

    device = resolve_device(cfg.device)
    cpu = not device.startswith("cuda")
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16", gradient_accumulation_steps=1)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)

    n_positions = len(tokens) - 1
    block = min(cfg.block_size, n_positions)
    starts = window_starts(n_positions, block)
    micro_per_step = cfg.grad_accum
    windows_per_step = cfg.batch_size * cfg.grad_accum * world
    total_steps = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.epochs * len(starts) / windows_per_step)
    if total_steps < 1:
        raise MemdecError(
            f"the schedule has no steps: {len(starts)} windows of {block} tokens, {windows_per_step} per step, "
            f"epochs={cfg.epochs}, max_steps={cfg.max_steps}"
        )

    out = Path(cfg.out)
    state_dir = out / "trainer_state"
    fingerprint = run_fingerprint(cfg, manifest_hash)
    resume_state = None
    if (state_dir / "state.json").is_file():
        prev = json.loads((state_dir / "state.json").read_text())
        if prev.get("run_fingerprint") != fingerprint:
            raise MemdecError(
                f"{out} holds a checkpoint of another run (other datastore or settings); "
                f"choose another --out, or delete {out} to start over"
            )
        if cfg.resume:
            resume_state = prev
    elif out.exists() and (out / recipe.meta_file).is_file() and cfg.resume:
        raise MemdecError(f"{out} holds a finished checkpoint without trainer state; choose another --out")

    init_from = str(state_dir) if resume_state else None
    model, tokenizer = recipe.init_model(cfg, manifest)
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer_hash"]:  # init_memory_decoder checks; keep the invariant
        raise TokenizerMismatchError("tokenizer mismatch")
    if init_from:
        recipe.load_weights(model, state_dir)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (the base weights under LoRA)
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, cfg.warmup, cfg.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step, best = 0, None
    if resume_state:
        payload = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=False)
        if payload["step"] != resume_state["step"]:
            raise MemdecError(f"{state_dir}: optimizer state (step {payload['step']}) and state.json (step {resume_state['step']}) disagree")
        rng = torch.load(state_dir / f"rng_{rank}.pt", map_location="cpu", weights_only=False)
        if rng["step"] != resume_state["step"]:
            raise MemdecError(f"{state_dir}: RNG state of process {rank} is from step {rng['step']}, not {resume_state['step']}")
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        _set_rng_state(rng["rng"])
        start_step, best = resume_state["step"], resume_state.get("best")
    seconds_before = float(resume_state.get("seconds", 0.0)) if resume_state else 0.0  # training time of earlier calls

    teacher_base = None  # the frozen base model, when the teacher mixes in its distribution
    if cfg.alpha > 0 and cfg.teacher_base_weight > 0:
        from .models import load_model

        teacher_base, _ = load_model(manifest["model"], device=str(accelerator.device))
        teacher_base.eval().requires_grad_(False)

    validator = None
    if cfg.valid and accelerator.is_main_process:
        validator = Validator(cfg, manifest, tokenizer, accelerator.device.type if not cpu else "cpu")
    unwrapped = accelerator.unwrap_model(model)
    info = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "base_model": manifest["model"], "tokenizer_hash": manifest["tokenizer_hash"],
        "datastore": str(Path(cfg.datastore).resolve()) if cfg.datastore else None, "datastore_manifest_hash": manifest_hash,
        "corpus": manifest.get("corpus"), "corpus_hash": manifest.get("corpus_hash"),
        "k": manifest.get("steps", {}).get("targets", {}).get("k"),
        "knn_temperature": manifest.get("steps", {}).get("targets", {}).get("temperature"),
        "alpha": cfg.alpha, "teacher_base_weight": cfg.teacher_base_weight, "init": cfg.init or (f"{manifest['model']} (first {cfg.init_layers} blocks)" if cfg.init_layers else f"{manifest['model']} (full copy)"),
        "n_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "trainable_parameters": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        "world_size": world,
    }

    def save_best(record: dict) -> None:
        if not accelerator.is_main_process:
            return
        save_model_folder(unwrapped, tokenizer, out)
        recipe.write_meta(out, {**info, "lambda": record.get("best_lambda", 0.5), "train_seconds": round(train_seconds(), 1),
                                "train_stats": record, "train_config": asdict(cfg)})

    def save_state(step: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(state_dir / f"rng_{rank}.pt", lambda p: torch.save({"step": step, "rng": _rng_state()}, p))
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        save_model_folder(unwrapped, tokenizer, state_dir)
        atomic_write(state_dir / "optimizer.pt", lambda p: torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, p))
        atomic_write(state_dir / "state.json", lambda p: p.write_text(json.dumps(
            {"step": step, "total_steps": total_steps, "run_fingerprint": fingerprint, "best": best,
             "seconds": round(train_seconds(), 3)}, indent=2)))

    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and log_path.exists():
            log_path.unlink()

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    tokens_per_step = windows_per_step * block
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not accelerator.is_main_process)
    t_start, tokens_done = time.perf_counter(), 0

    def train_seconds() -> float:
        """Wall time of the loop (validation and saves included), over every call that resumed it."""
        return seconds_before + time.perf_counter() - t_start

    model.train()
    for step in range(start_step, total_steps):
        kl_sum = ce_sum = loss_sum = 0.0
        for micro in range(micro_per_step):
            batch_starts = micro_batch_starts(starts, cfg.seed, step * micro_per_step + micro, cfg.batch_size, rank, world)
            batch = {k: v.to(accelerator.device) for k, v in collate(tokens, targets, batch_starts, block, cfg.alpha > 0).items()}
            sync = micro == micro_per_step - 1
            ctx = accelerator.no_sync(model) if (not sync and world > 1) else nullcontext()
            with ctx:
                with accelerator.autocast():
                    logits = model(input_ids=batch["input_ids"]).logits
                    base_logits = None
                    if teacher_base is not None:
                        with torch.no_grad():
                            base_logits = teacher_base(input_ids=batch["input_ids"]).logits.reshape(-1, logits.shape[-1])
                flat = logits.reshape(-1, logits.shape[-1])
                if cfg.alpha > 0:
                    loss, kl, ce = sparse_kl_ce_loss(flat, batch["labels"].reshape(-1), batch["target_rows"], batch["target_ids"],
                                                     batch["target_probs"], cfg.alpha, base_logits, cfg.teacher_base_weight)
                else:
                    loss, kl, ce = sparse_kl_ce_loss(flat, batch["labels"].reshape(-1), None, None, None, 0.0)
                accelerator.backward(loss / micro_per_step)
            loss_sum += loss.item() / micro_per_step
            kl_sum += kl.item() / micro_per_step
            ce_sum += ce.item() / micro_per_step
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_done += tokens_per_step
        elapsed = time.perf_counter() - t_start
        record = {"step": step + 1, "loss": loss_sum, "kl": kl_sum, "ce": ce_sum,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tokens_done / elapsed}
        bar.set_postfix(loss=f"{loss_sum:.3f}", kl=f"{kl_sum:.3f}", ce=f"{ce_sum:.3f}", lr=f"{record['lr']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        done = step + 1 == total_steps
        if validator is not None and ((step + 1) % cfg.eval_every == 0 or done):
            scores = validator(unwrapped)
            record.update(scores)
            if best is None or scores[recipe.select] < best[recipe.select]:
                best = {"step": step + 1, **scores}
                save_best(record)
            bar.write(f"step {step + 1}: valid ppl base {scores['valid_ppl_base']:.2f}, {recipe.name} {scores['valid_ppl_memdec']:.2f}, "
                      f"joint {scores['best_ppl']:.2f} at lambda {scores['best_lambda']:g}")
        if (step + 1) % cfg.log_every == 0 or "best_ppl" in record or done:
            log(record)
        if (step + 1) % cfg.save_every == 0 or done:
            accelerator.wait_for_everyone()
            if validator is None and accelerator.is_main_process:
                save_best(record)
            save_state(step + 1)
        if on_step is not None:
            on_step(step + 1, record)
    bar.close()
    accelerator.wait_for_everyone()
    if start_step >= total_steps and accelerator.is_main_process and not (out / recipe.meta_file).is_file():
        save_best({"step": total_steps})
    elif start_step < total_steps and accelerator.is_main_process:  # the whole loop's time, not the best step's
        recipe.write_meta(out, {**recipe.read_meta(out), "train_seconds": round(train_seconds(), 1)})
    return out
