"""The training loss: α·KL(t ‖ p_mem) + (1 − α)·CE over sparse kNN targets, fused, two ways.

- ``sparse_kl_ce_loss(logits, ...)``: from the decoder's logits [P, V]. It holds them, and one
  softmax-sized gradient in backward: 2·P·V·4 bytes, 4 GiB for a batch of 4×512 positions
  under Gemma 3's 262,144-token vocabulary.
- ``head_kl_ce_loss(hidden, head, ...)``: from the decoder's final hidden states [P, d] and its
  LM head. It applies the head to a chunk of positions at a time, so that a chunk's fp32 logits
  stay under ``LOGITS_BUDGET_BYTES``, and recomputes each chunk's logits in backward, so that
  nothing of size P·V is held. Where P·V·4 bytes fit ``KEEP_LOGITS_BYTES`` (a small vocabulary:
  SmolLM2's 49,152 tokens at 4×512 positions take 384 MiB), the chunks' logits are kept for
  backward instead, so that case costs no extra matmul and still holds one chunk's gradient only.
  The teacher's base-model part (β > 0) is chunked the same way, from the base model's hidden
  states and head.

Both give the same loss and gradients (up to fp32 summation order); the hand-written backward is
dL/dz = ((α·s + 1−α)·softmax(z) − α·(1−β)·p_scatter − α·β·p_base − (1−α)·onehot) / P, where
s = (1−β)·(each row's kNN mass, 1 up to fp16 rounding) + β, and, with the head's logit
soft-capping z = c·tanh(u/c), dL/du = dL/dz·(1 − (z/c)²).

``lm_head(model, probe)`` returns the head that ``head_kl_ce_loss`` applies, after checking that
it reproduces the model's own logits on a probe; a model whose logits it cannot reproduce (a
LoRA-wrapped head, an extra logit scale) gets None, and training falls back to the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_unit_interval
from .errors import MemdecError

LOGITS_BUDGET_BYTES = 256 * 2**20  # a chunk's fp32 logits stay under this
KEEP_LOGITS_BYTES = 2**30  # all chunks' logits kept for backward (no recompute) when they total at most this


# --------------------------------------------------------------------------------------------
# The LM head


@dataclass(frozen=True)
class LMHead:
    """logits = c·tanh((h·Wᵀ + b)/c), or h·Wᵀ + b without soft-capping (c = ``softcap``).

    weight: [V, d] (the input embeddings when tied); bias: [V] or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def cast(self, dtype: torch.dtype) -> "LMHead":
        """The same head with its weights in ``dtype`` (detached: for the loss's own matmuls)."""
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        return LMHead(self.weight.detach().to(dtype), bias, self.softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[c, d] -> fp32 [c, V], the matmul in the head's dtype."""
        z = torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        if self.softcap is not None:
            z = torch.tanh(z.div_(self.softcap)).mul_(self.softcap)
        return z


def lm_head(model, probe: torch.Tensor, rtol: float = 1e-4) -> LMHead | None:
    """``model``'s LM head as ``head_kl_ce_loss`` applies it, or None where that would not give the
    model's own logits. probe: LongTensor [1, L], a few tokens; the check runs in eval mode, without
    gradients or autocast, and draws no random numbers."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # a LoRA-wrapped or otherwise custom head
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    found = LMHead(head.weight, head.bias, float(softcap) if softcap else None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(probe.device.type, enabled=False):
            out = model(input_ids=probe, output_hidden_states=True, use_cache=False)
            ours = found.cast(torch.float32).logits(out.hidden_states[-1][0].float())
            same = ours.shape == out.logits[0].shape and torch.allclose(
                ours, out.logits[0].float(), rtol=rtol, atol=rtol
            )
    except (TypeError, AttributeError, IndexError):  # no hidden states, another output type
        same = False
    finally:
        model.train(was_training)
    return found if same else None


def last_hidden(model, input_ids: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The final hidden states (after the last norm, the LM head's input) of the last ``n_keep``
    positions, flattened: [B·n_keep, d]. The model's own LM head runs on one position only."""
    out = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1][:, -n_keep:]
    return hidden.reshape(-1, hidden.shape[-1])


def chunk_rows(vocab: int, budget: int) -> int:
    """Positions per chunk: fp32 [rows, vocab] logits fit in ``budget`` bytes (at least one row)."""
    return max(1, budget // (4 * vocab))


# --------------------------------------------------------------------------------------------
# One chunk of positions


@dataclass
class _Targets:
    """The sparse kNN part of the teacher, sorted by position: rows, ids [nnz] long; knn [nnz] fp32,
    the kNN probabilities times (1 − β); mass [P]: each row's teacher mass (kNN part + β)."""

    rows: torch.Tensor
    ids: torch.Tensor
    knn: torch.Tensor
    mass: torch.Tensor | None

    @classmethod
    def build(cls, n: int, rows, ids, probs, alpha: float, beta: float, device) -> "_Targets":
        if alpha <= 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return cls(empty, empty, torch.zeros(0, device=device), None)
        if rows.numel() > 1 and not bool((rows[1:] >= rows[:-1]).all()):
            order = torch.argsort(rows, stable=True)
            rows, ids, probs = rows[order], ids[order], probs[order]
        knn = probs.float() * (1 - beta)
        mass = torch.zeros(n, device=device).index_add_(0, rows, knn) + beta
        return cls(rows, ids, knn, mass)

    def bounds(self, starts: list[int]) -> list[int]:
        """Entry offsets where each chunk starting at ``starts`` begins, plus the end."""
        edges = torch.searchsorted(self.rows, torch.tensor(starts, device=self.rows.device)).tolist()
        return edges + [self.rows.numel()]


def _chunk_forward(z, labels, t_rows, t_ids, knn, p_base, beta: float):
    """Sums over one chunk. z: fp32 [c, V]; t_rows index the chunk's rows. Returns
    (lse [c], Σ CE, Σ t·log q, Σ t·log t); the last two are zero without targets."""
    lse = torch.logsumexp(z, dim=-1)
    ce = (lse - z.gather(1, labels[:, None]).squeeze(1)).sum()
    cross = (knn * (z[t_rows, t_ids] - lse[t_rows])).sum()
    if p_base is None:
        return lse, ce, cross, torch.special.xlogy(knn, knn).sum()
    at_support = beta * p_base[t_rows, t_ids]  # [nnz]
    # Σ t·log t: the dense β·p_base part, corrected where the kNN rows add mass
    scaled = beta * p_base
    neg_entropy = (torch.special.xlogy(scaled, scaled).sum()
                   + (torch.special.xlogy(knn + at_support, knn + at_support)
                      - torch.special.xlogy(at_support, at_support)).sum())
    cross = cross + beta * (p_base * (z - lse[:, None])).sum()
    return lse, ce, cross, neg_entropy


def _chunk_grad(z, lse, mass, labels, t_rows, t_ids, knn, p_base, alpha: float, beta: float, inplace: bool):
    """dL/dz of one chunk times P (the caller scales): fp32 [c, V]; with ``inplace``, built in z's buffer."""
    g = (z.sub_(lse[:, None]) if inplace else z - lse[:, None]).exp_()  # softmax
    scale = (1 - alpha) + (alpha * mass if mass is not None else 0.0)
    g.mul_(scale[:, None] if torch.is_tensor(scale) else scale)
    if alpha > 0:
        g.index_put_((t_rows, t_ids), -alpha * knn, accumulate=True)
        if p_base is not None:
            g.add_(p_base, alpha=-alpha * beta)
    if alpha < 1:
        rows = torch.arange(len(labels), device=g.device)
        g.index_put_((rows, labels), torch.full((len(labels),), -(1 - alpha), device=g.device), accumulate=True)
    return g


def _finish(ce, cross, neg_entropy, n: int, alpha: float):
    kl = (neg_entropy - cross) / n if alpha > 0 else torch.zeros((), device=ce.device)
    ce = ce / n
    return alpha * kl + (1 - alpha) * ce, kl, ce


# --------------------------------------------------------------------------------------------
# From the logits


class _SparseKLCE(torch.autograd.Function):
    """The fused loss over given logits [P, V] (see the module docstring); one softmax-sized grad."""

    @staticmethod
    def forward(ctx, logits, labels, targets: _Targets, alpha: float, base_logits, beta: float):
        logits = logits.float()
        p_base = torch.softmax(base_logits.float(), dim=-1) if base_logits is not None else None
        lse, ce, cross, neg = _chunk_forward(logits, labels, targets.rows, targets.ids, targets.knn, p_base, beta)
        ctx.save_for_backward(logits, lse, labels, p_base)
        ctx.targets, ctx.alpha, ctx.beta = targets, alpha, beta
        return _finish(ce, cross, neg, logits.shape[0], alpha)

    @staticmethod
    def backward(ctx, grad_loss, grad_kl, grad_ce):
        logits, lse, labels, p_base = ctx.saved_tensors
        t = ctx.targets
        g = _chunk_grad(logits, lse, t.mass, labels, t.rows, t.ids, t.knn, p_base, ctx.alpha, ctx.beta, inplace=False)
        return g.mul_(grad_loss / logits.shape[0]), None, None, None, None, None


def _check_teacher(alpha: float, beta: float, teacher) -> float:
    """β as used: 0 without the kNN term; MemdecError when β > 0 has no base model to mix in."""
    check_unit_interval(beta, "the teacher's base weight")
    if alpha <= 0:
        return 0.0
    if beta > 0 and teacher is None:
        raise MemdecError("a teacher mixed with the base model (beta > 0) needs the base logits")
    return float(beta)


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
    beta = _check_teacher(alpha, beta, base_logits)
    targets = _Targets.build(logits.shape[0], target_rows, target_ids, target_probs, alpha, beta, logits.device)
    loss, kl, ce = _SparseKLCE.apply(logits, labels, targets, float(alpha), base_logits if beta > 0 else None, beta)
    return loss, kl.detach(), ce.detach()


# --------------------------------------------------------------------------------------------
# From the hidden states, chunk by chunk


@dataclass
class _Plan:
    """How ``_HeadKLCE`` runs: the head (and the teacher's base hidden states [P, d_b] and head,
    when β > 0), the matmuls' dtype, the positions per chunk, and up to how many bytes of logits
    are kept for backward rather than recomputed."""

    head: LMHead
    dtype: torch.dtype
    rows: int
    keep: int
    teacher_hidden: torch.Tensor | None = None
    teacher_head: LMHead | None = None

    def chunks(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.rows, n)) for s in range(0, n, self.rows)]

    def base_probs(self, head: LMHead | None, s: int, e: int) -> torch.Tensor | None:
        """softmax of the teacher's base logits of positions [s, e): fp32 [e-s, V], or None."""
        if head is None:
            return None
        return torch.softmax(head.logits(self.teacher_hidden[s:e]), dim=-1)


class _HeadKLCE(torch.autograd.Function):
    """The fused loss from hidden states [P, d] and the head's weight [V, d] (and bias [V]),
    chunk by chunk; gradients for the hidden states, the weight and the bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, targets: _Targets, alpha: float, beta: float, plan: _Plan):
        n = hidden.shape[0]
        chunks = plan.chunks(n)
        edges = targets.bounds([s for s, _ in chunks])
        head = plan.head.cast(plan.dtype)
        base = plan.teacher_head.cast(plan.dtype) if beta > 0 else None
        lse = torch.empty(n, device=hidden.device)
        sums = torch.zeros(3, device=hidden.device)  # Σ CE, Σ t·log q, Σ t·log t
        kept = [] if n * head.weight.shape[0] * 4 <= plan.keep else None
        with torch.autocast(hidden.device.type, enabled=False):
            for i, (s, e) in enumerate(chunks):
                z = head.logits(hidden[s:e])
                a, b = edges[i], edges[i + 1]
                lse[s:e], *parts = _chunk_forward(z, labels[s:e], targets.rows[a:b] - s, targets.ids[a:b],
                                                  targets.knn[a:b], plan.base_probs(base, s, e), beta)
                sums += torch.stack(parts)
                if kept is not None:
                    kept.append(z)
        ctx.save_for_backward(hidden, lse, labels)
        ctx.kept, ctx.targets, ctx.alpha, ctx.beta, ctx.plan, ctx.edges = kept, targets, alpha, beta, plan, edges
        ctx.has_bias = bias is not None
        return _finish(sums[0], sums[1], sums[2], n, alpha)

    @staticmethod
    def backward(ctx, grad_loss, grad_kl, grad_ce):
        hidden, lse, labels = ctx.saved_tensors
        t, plan, alpha, beta, n = ctx.targets, ctx.plan, ctx.alpha, ctx.beta, hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head = plan.head.cast(plan.dtype)
        base = plan.teacher_head.cast(plan.dtype) if beta > 0 else None
        weight = plan.head.weight
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b and ctx.has_bias else None
        )
        kept, ctx.kept = ctx.kept, None  # used up here: a second backward recomputes
        with torch.autocast(hidden.device.type, enabled=False):
            for i, (s, e) in enumerate(plan.chunks(n)):
                z = kept[i] if kept is not None else head.logits(hidden[s:e])
                if kept is not None:
                    kept[i] = None
                softcap = head.softcap
                deriv = 1 - (z / softcap) ** 2 if softcap is not None else None  # d z / d u under soft-capping
                a, b = ctx.edges[i], ctx.edges[i + 1]
                mass = t.mass[s:e] if t.mass is not None else None
                g = _chunk_grad(z, lse[s:e], mass, labels[s:e], t.rows[a:b] - s, t.ids[a:b], t.knn[a:b],
                                plan.base_probs(base, s, e), alpha, beta, inplace=True)
                g.mul_(grad_loss / n)
                if deriv is not None:
                    g.mul_(deriv)
                if grad_b is not None:
                    grad_b += g.sum(0)
                g = g.to(plan.dtype)
                if grad_h is not None:
                    grad_h[s:e] = (g @ head.weight).to(hidden.dtype)
                if grad_w is not None:  # accumulated in place: no second weight-sized buffer in fp32
                    h = hidden[s:e].to(plan.dtype)
                    if g.dtype == grad_w.dtype:
                        grad_w.addmm_(g.T, h)
                    else:
                        grad_w.add_(g.T @ h)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(plan.head.bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def head_kl_ce_loss(
    hidden: torch.Tensor,
    head: LMHead,
    labels: torch.Tensor,
    target_rows: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    alpha: float,
    teacher: tuple[torch.Tensor, LMHead] | None = None,
    beta: float = 0.0,
    budget: int | None = None,
    keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sparse_kl_ce_loss`` of the logits ``head`` gives on ``hidden``, never holding them whole.

    hidden: [P, d] the decoder's final hidden states; head: its ``LMHead`` (gradients reach its
    weight and bias, and through ``hidden`` the rest of the model). teacher: (the base model's
    final hidden states [P, d_b], its LMHead), needed when β > 0. Positions go through in chunks
    whose fp32 logits fit ``budget`` bytes (default ``LOGITS_BUDGET_BYTES``); the logits are
    recomputed in backward unless all of them fit ``keep`` bytes (default ``KEEP_LOGITS_BYTES``). Under autocast, the
    head's matmuls run in the
    autocast dtype, as the model's own head would. Returns (loss, kl, ce) as ``sparse_kl_ce_loss``.
    """
    beta = _check_teacher(alpha, beta, teacher)
    n, device = hidden.shape[0], hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else head.weight.dtype
    targets = _Targets.build(n, target_rows, target_ids, target_probs, alpha, beta, device)
    plan = _Plan(
        head,
        dtype,
        chunk_rows(head.weight.shape[0], budget or LOGITS_BUDGET_BYTES),
        KEEP_LOGITS_BYTES if keep is None else keep,
        teacher[0].detach() if beta > 0 else None,
        teacher[1] if beta > 0 else None,
    )
    loss, kl, ce = _HeadKLCE.apply(hidden, head.weight, head.bias, labels, targets, float(alpha), beta, plan)
    return loss, kl.detach(), ce.detach()
