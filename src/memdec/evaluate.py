"""Perplexity of every system over the same tokens, with the same sliding windows.

A *scorer* is any callable ``scorer(input_ids, targets) -> logprobs`` where ``input_ids`` is a
LongTensor [B, L], ``targets`` a LongTensor [B, n] holding the next tokens of the last ``n``
input positions, and ``logprobs`` a float tensor [B, n] of log p(target). The harness feeds the
same windows to every scorer, so their rows compare token for token.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import sliding_windows

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without materialising the log-softmax.

    logits: [..., V]; targets: [...] long. Returns float32 [...].
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def causal_lm_logits(model, input_ids: torch.Tensor, n_keep: int, **kwargs) -> torch.Tensor:
    """Logits [B, n_keep, V] of the last ``n_keep`` positions only: the LM head skips the rest."""
    try:
        out = model(input_ids=input_ids, logits_to_keep=n_keep, use_cache=False, **kwargs)
    except TypeError:  # a model class without logits_to_keep
        out = model(input_ids=input_ids, use_cache=False, **kwargs)
    return out.logits[:, -n_keep:]


def base_scorer(model) -> Scorer:
    """Scorer for a plain causal LM."""

    @torch.inference_mode()
    def score(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return target_logprobs(causal_lm_logits(model, input_ids, targets.shape[1]), targets)

    return score


def _batches(windows: np.ndarray, batch_size: int):
    """Group consecutive windows of equal shape (length, scored count) into batches."""
    batch: list[np.ndarray] = []
    for w in windows:
        shape = (w[1] - w[0], w[1] - w[2])
        if batch and (len(batch) == batch_size or (batch[0][1] - batch[0][0], batch[0][1] - batch[0][2]) != shape):
            yield np.stack(batch)
            batch = []
        batch.append(w)
    if batch:
        yield np.stack(batch)


def score_tokens(
    scorer: Scorer,
    tokens: np.ndarray,
    block_size: int,
    stride: int,
    batch_size: int = 1,
    device: str = "cpu",
    desc: str = "scoring",
    progress: bool = True,
) -> tuple[np.ndarray, float]:
    """Negative log-likelihood of every position of a token stream.

    tokens: int array [N]. Returns (nll float32 [N-1], seconds), where nll[p] = -log p(tokens[p+1]).
    """
    windows = sliding_windows(len(tokens), block_size, stride)
    nll = np.empty(len(tokens) - 1, dtype=np.float32)
    stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    t0 = time.perf_counter()
    with tqdm(total=len(nll), desc=desc, unit="tok", disable=not progress, leave=False) as bar:
        for batch in _batches(windows, batch_size):
            start, end, score_start = batch[:, 0], batch[:, 1], batch[:, 2]
            n_keep = int(end[0] - score_start[0])
            length = int(end[0] - start[0])
            idx = torch.as_tensor(start)[:, None] + torch.arange(length + 1)[None, :]
            chunk = stream[idx]  # [B, L+1]
            input_ids = chunk[:, :-1].to(device)
            targets = chunk[:, -n_keep:].to(device)
            logprobs = scorer(input_ids, targets).float().cpu().numpy()
            for row, s in enumerate(score_start):
                nll[s : s + n_keep] = -logprobs[row]
            bar.update(n_keep * len(batch))
    return nll, time.perf_counter() - t0


@dataclass
class ResultRow:
    """One system's score on one corpus; the JSON contract of ``memdec eval``."""

    system: str  # "base" | "knn-lm" | "memdec" | baselines
    model: str
    nll: float
    ppl: float
    tokens_per_s: float
    extra: dict = field(default_factory=dict)
    lambda_: float | None = None

    def to_json(self) -> dict:
        row = {
            "system": self.system,
            "model": self.model,
            "lambda": self.lambda_,
            "nll": round(self.nll, 6),
            "ppl": round(self.ppl, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }
        row.update(self.extra)
        return row


def make_row(system: str, model: str, nll: np.ndarray, seconds: float, lmbda: float | None = None, **extra) -> ResultRow:
    mean = float(np.mean(nll, dtype=np.float64))
    return ResultRow(system, model, mean, math.exp(mean), len(nll) / max(seconds, 1e-9), extra, lmbda)


def write_report_json(path: str | os.PathLike, corpus: str, n_tokens: int, rows: list[ResultRow], **extra) -> None:
    """Write the eval JSON atomically: {"tokens", "corpus", "results": [...]}."""
    payload = {"tokens": n_tokens, "corpus": corpus, **extra, "results": [r.to_json() for r in rows]}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_table(rows: list[ResultRow], n_tokens: int, corpus: str) -> str:
    lines = [f"{n_tokens} tokens of {corpus}", f"{'system':<12} {'lambda':>7} {'nll':>8} {'ppl':>10} {'tok/s':>9}  model"]
    for r in rows:
        lam = "-" if r.lambda_ is None else f"{r.lambda_:.2f}"
        lines.append(f"{r.system:<12} {lam:>7} {r.nll:>8.4f} {r.ppl:>10.3f} {r.tokens_per_s:>9.1f}  {r.model}")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    corpus: str = "austen:test"
    block_size: int = 1024
    stride: int = 512
    max_tokens: int | None = None
    batch_size: int = 1
    device: str = "auto"
    text_field: str = "text"
    json: str | None = None


def check_block_size(model, block_size: int, spec: str) -> None:
    from .errors import MemdecError
    from .models import max_context

    ctx = max_context(model)
    if ctx is not None and block_size > ctx:
        raise MemdecError(f"{spec}: --block-size {block_size} is larger than the model's context of {ctx} tokens")


def run_eval(cfg: EvalConfig) -> tuple[list[ResultRow], int]:
    """Score the base model on a corpus. Returns (rows, number of scored tokens)."""
    from .data import load_token_stream
    from .models import load_model, resolve_device

    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device)
    check_block_size(model, cfg.block_size, cfg.model)
    tokens = load_token_stream(cfg.corpus, tokenizer, cfg.max_tokens, cfg.text_field)
    nll, seconds = score_tokens(base_scorer(model), tokens, cfg.block_size, cfg.stride, cfg.batch_size, device, desc="base")
    return [make_row("base", cfg.model, nll, seconds)], len(nll)


def mix_logprobs(logp_base, logp_mem, lmbda: float):
    """log((1-λ)·p_base + λ·p_mem) from log-probabilities, elementwise (numpy or torch).

    Works on target log-probs [..., ] as well as on full rows [..., V]; λ=0 returns logp_base
    exactly and λ=1 returns logp_mem exactly.
    """
    if not 0.0 <= lmbda <= 1.0:
        from .errors import MemdecError

        raise MemdecError(f"lambda must lie in [0, 1], got {lmbda}")
    if lmbda == 0.0:
        return logp_base
    if lmbda == 1.0:
        return logp_mem
    if isinstance(logp_base, torch.Tensor):
        return torch.logaddexp(logp_base + math.log1p(-lmbda), logp_mem + math.log(lmbda))
    return np.logaddexp(logp_base + math.log1p(-lmbda), logp_mem + math.log(lmbda))
