"""What one optimizer step needs: the optimizer and its schedule, the frozen teacher base, the loss.

    loss = α · KL(p_teacher ‖ p_mem) + (1 − α) · CE(next token),  p_teacher = (1 − β)·p_kNN + β·p_base

``DecoderLoss`` computes it on one micro-batch, from the final hidden states through the LM head a
chunk of positions at a time (``loss.head_kl_ce_loss``), or from the full logits where a model's
head cannot be reproduced (``loss.lm_head`` says None).
"""

from __future__ import annotations

import numpy as np
import torch

from ..loss import head_kl_ce_loss, last_hidden, lm_head, sparse_kl_ce_loss
from ..models import load_model, with_prefix
from .config import TrainConfig
from .windows import lr_at


def make_optimizer(model, cfg: TrainConfig, lr_scale: float, total_steps: int):
    """(AdamW over ``model``'s trainable parameters, its LambdaLR schedule): the matrices decay by
    ``--weight-decay``, norms and biases not; peak lr ``--lr`` × ``lr_scale`` (the decoder shape's)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (the base weights under LoRA)
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr * lr_scale, betas=(0.9, 0.95), eps=1e-8,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total_steps, cfg.warmup, cfg.min_lr_ratio))
    return optimizer, scheduler


def load_teacher_base(cfg: TrainConfig, base_model: str, device: str):
    """The frozen base model, when the teacher mixes in its distribution (α > 0 and β > 0); else None."""
    if not (cfg.alpha > 0 and cfg.teacher_base_weight > 0):
        return None
    base, _ = load_model(base_model, device=device)
    return base.eval().requires_grad_(False)


class DecoderLoss:
    """The loss of one micro-batch for ``model`` (the prepared model; ``unwrapped``: the same, unwrapped,
    whose LM head is probed); with a BOS ``prefix``, each window gets it and its logits lose it.

    ``probe``: a few tokens of the stream, int [n], on which ``loss.lm_head`` checks that a head reproduces
    its model's logits. Calling it with a batch (``windows.collate``'s, on the device) gives (loss, kl, ce).
    """

    def __init__(self, cfg: TrainConfig, accelerator, model, unwrapped, teacher_base, probe: np.ndarray,
                 prefix: int | None):
        self.cfg, self.accelerator, self.model, self.teacher_base = cfg, accelerator, model, teacher_base
        self.prefix = prefix
        self.heads = self._heads(unwrapped, probe)

    def _heads(self, unwrapped, probe: np.ndarray):
        """(the decoder's LM head, the teacher base's or None) for the chunked loss; None where a
        head does not reproduce its model's logits: then the loss takes the full logits."""
        ids = with_prefix(torch.from_numpy(probe.astype(np.int64))[None], self.prefix).to(self.accelerator.device)
        head = lm_head(unwrapped, ids)
        teacher = lm_head(self.teacher_base, ids) if self.teacher_base is not None else None
        if head is None or (self.teacher_base is not None and teacher is None):
            return None
        return head, teacher

    def __call__(self, batch: dict):
        """(loss, kl, ce) of ``batch``: input_ids and labels [B, T], and with α > 0 its kNN targets
        (target_rows / target_ids / target_probs [nnz] over the B*T positions)."""
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
