"""Validation: the decoder's perplexity on a held-out corpus, alone and mixed with the base at each λ."""

from __future__ import annotations

import math

import numpy as np

from ..data import load_token_stream
from ..models import bos_prefix, load_model
from ..scoring import base_scorer, mean_ppl, mix_logprobs, score_tokens
from .config import TrainConfig


class Validator:
    """Scores the decoder on a validation corpus, alone and mixed with the base at each λ."""

    def __init__(self, cfg: TrainConfig, base_model: str, tokenizer, device: str):
        self.tokens = load_token_stream(cfg.valid, tokenizer, cfg.valid_max_tokens)
        self.block = cfg.block_size
        self.device = device
        base, _ = load_model(base_model, device=device)
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
        base, mem = -self.base_nll.astype(np.float64), -mem_nll.astype(np.float64)
        joint = {lam: float(-np.mean(mix_logprobs(base, mem, lam))) for lam in self.lambdas}
        best_lam = min(joint, key=joint.get)
        return {
            "valid_ppl_base": mean_ppl(self.base_nll),
            "valid_ppl_memdec": mean_ppl(mem_nll),
            "valid_ppl_joint": {f"{lam:g}": math.exp(v) for lam, v in joint.items()},
            "best_lambda": best_lam,
            "best_ppl": math.exp(joint[best_lam]),
        }
