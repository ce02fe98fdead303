"""Scoring: the log-probability of each next token, for any model, over the same sliding windows.

A *scorer* is any callable ``scorer(input_ids, targets) -> logprobs`` where ``input_ids`` is a
LongTensor [B, L], ``targets`` a LongTensor [B, n] holding the next tokens of the last ``n``
input positions, and ``logprobs`` a float tensor [B, n] of log p(target). ``score_tokens`` feeds
the same windows to every scorer, so their per-token NLLs compare token for token.

Mixing in log space: ``mix_logprobs`` gives log((1-λ)·p_base + λ·p_mem) from two log-probabilities,
on target log-probs [...] as well as on full rows [..., V]; λ=0 is exactly the base, λ=1 exactly
the other model. Nothing of vocabulary size is built to score targets: per-row logsumexp + gather.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import check_lambda
from .errors import MemdecError
from .data import sliding_windows, window_batches
from .loss import chunk_rows
from .models import with_prefix

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


LSE_BUDGET_BYTES = 256 * 2**20  # the fp32 temporaries of one logsumexp chunk stay under this


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without materialising the log-softmax.

    logits: [..., V]; targets: [...] long. Returns float32 [...]. The logsumexp runs over chunks of
    rows whose fp32 temporaries fit ``LSE_BUDGET_BYTES``, so that a window of a 262k-token
    vocabulary costs no second window-sized buffer.
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    flat = logits.reshape(-1, logits.shape[-1])
    rows = chunk_rows(logits.shape[-1], LSE_BUDGET_BYTES)
    lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], rows):
        lse[s : s + rows] = torch.logsumexp(flat[s : s + rows].float(), dim=-1)
    return picked - lse.reshape(picked.shape)


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A memory decoder's logits divided by its temperature (``memdec.json`` ``temperature``), in
    float32; at temperature 1 the logits themselves, unchanged (no copy, no cast)."""
    return logits if temperature == 1.0 else logits.float() / temperature


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


def score_tokens(
    scorer: Scorer,
    tokens: np.ndarray,
    block_size: int,
    stride: int,
    batch_size: int = 1,
    device: str = "cpu",
    desc: str = "scoring",
    progress: bool = True,
    prefix: int | None = None,
) -> tuple[np.ndarray, float]:
    """Negative log-likelihood of every position of a token stream.

    tokens: int array [N]. Returns (nll float32 [N-1], seconds), where nll[p] = -log p(tokens[p+1]).
    ``prefix`` (``models.bos_prefix``): a token put in front of every window; the scorer still
    scores the window's last positions, so nothing else changes.
    """
    windows = sliding_windows(len(tokens), block_size, stride)
    nll = np.empty(len(tokens) - 1, dtype=np.float32)
    stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    t0 = time.perf_counter()
    with tqdm(total=len(nll), desc=desc, unit="tok", disable=not progress, leave=False) as bar:
        for batch in window_batches(windows, batch_size):
            start, end, score_start = batch[:, 0], batch[:, 1], batch[:, 2]
            n_keep = int(end[0] - score_start[0])
            length = int(end[0] - start[0])
            idx = torch.as_tensor(start)[:, None] + torch.arange(length + 1)[None, :]
            chunk = stream[idx]  # [B, L+1]
            input_ids = with_prefix(chunk[:, :-1], prefix).to(device)
            targets = chunk[:, -n_keep:].to(device)
            logprobs = scorer(input_ids, targets).float().cpu().numpy()
            for row, s in enumerate(score_start):
                nll[s : s + n_keep] = -logprobs[row]
            bar.update(n_keep * len(batch))
    return nll, time.perf_counter() - t0


LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1


def mix_nll(nll_base: np.ndarray, nll_other: np.ndarray, lmbda: float) -> np.ndarray:
    """Per-token NLL of the mixture, from the two per-token NLLs [N] (float64)."""
    return -mix_logprobs(-np.asarray(nll_base, np.float64), -np.asarray(nll_other, np.float64), lmbda)


def lambda_curve(nll_base: np.ndarray, nll_other: np.ndarray, grid=LAMBDA_GRID) -> np.ndarray:
    """Perplexity of the mixture at each λ of ``grid``: float64 [len(grid)] (``mean_ppl``'s)."""
    return np.array([mean_ppl(mix_nll(nll_base, nll_other, lam)) for lam in grid])


def mix_logprobs(logp_base, logp_mem, lmbda: float):
    """log((1-λ)·p_base + λ·p_mem) from log-probabilities, elementwise (numpy or torch).

    Works on target log-probs [..., ] as well as on full rows [..., V]; λ=0 returns logp_base
    exactly and λ=1 returns logp_mem exactly.
    """
    check_lambda(lmbda)
    if lmbda == 0.0:
        return logp_base
    if lmbda == 1.0:
        return logp_mem
    if isinstance(logp_base, torch.Tensor):
        return torch.logaddexp(logp_base + math.log1p(-lmbda), logp_mem + math.log(lmbda))
    return np.logaddexp(logp_base + math.log1p(-lmbda), logp_mem + math.log(lmbda))


def mean_ppl(nll: np.ndarray) -> float:
    """exp of the mean NLL: inf where that overflows a float (never an OverflowError), NaN where one is NaN."""
    mean = float(np.mean(nll, dtype=np.float64))
    return math.inf if mean > LARGEST_LOG else math.exp(mean)


LARGEST_LOG = math.log(np.finfo(np.float64).max)  # math.exp of more overflows


def check_finite_scores(nll: np.ndarray, what: str, inf_ok: bool = False) -> np.ndarray:
    """``nll`` (per-token scores) unless one is NaN, or infinite where ``inf_ok`` is off (a model's finite
    logits give finite log-probabilities; a kNN distribution may give a token none): else MemdecError
    naming ``what`` (the system and the corpus), so no perplexity is ever computed from them."""
    bad = np.isnan(nll) if inf_ok else ~np.isfinite(nll)
    if bad.any():
        kind = "NaN" if np.isnan(nll).any() else "infinite"
        raise MemdecError(f"{what}: {int(bad.sum())} of {len(nll)} per-token scores are {kind} (the first at position "
                          f"{int(np.argmax(bad))}): its outputs are not finite (check its weights); no perplexity "
                          f"is reported")
    return nll
