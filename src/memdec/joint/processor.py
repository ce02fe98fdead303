"""``MemoryDecoderLogitsProcessor``: a memory decoder mixed into an unmodified model's ``generate()``."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor
from transformers.cache_utils import DynamicCache

from ..checks import check_lambda, check_temperature
from ..errors import MemdecError, TokenizerMismatchError
from ..router import Router, distribution_scalars, mix_routed
from ..scoring import mix_logprobs, scale_logits
from .cache import _accepts, position_ids_from_mask
from .hooks import _record_last, router_log_weights


class MemoryDecoderLogitsProcessor(LogitsProcessor):
    """Mix a memory decoder into an unmodified model's ``generate()``: greedy decoding and sampling.

        out = base.generate(**enc, logits_processor=[MemoryDecoderLogitsProcessor(memdec, 0.3,
                            attention_mask=enc["attention_mask"])])

    Each call receives ``input_ids`` [B, cur_len] and the base model's ``scores`` [B, V] and returns
    the mixed log-probs [B, V]. The processor runs the memory decoder itself, with its own KV cache:
    the whole prompt on the first call, then only the newest token.

    - Give the prompt's ``attention_mask`` [B, L] for left-padded batches.
    - Order: ``generate`` runs user processors after its own (repetition penalty, min length,
      bad words...) and before the sampling warpers (temperature, top-k, top-p). The processor
      applies ``log_softmax`` to the scores it receives; tokens that an earlier processor set to
      -inf stay at -inf. Put it first in your own list.
    - Beam search (and ``num_return_sequences`` > 1) is refused: ``generate`` reorders beams
      without telling processors, which would desynchronise the decoder's cache. Use
      ``MemoryDecoderModel`` for beam search.
    - One processor serves one ``generate()`` call; call ``reset()`` to reuse it.
    - ``router`` (a ``memdec.router.Router``): λ_t per step in place of ``lmbda``. A router that reads
      features needs ``base``, the model whose ``generate()`` runs: a forward pre-hook on its LM head
      records its final hidden state (removed by ``close()``, or use the processor as a context
      manager). The scores it mixes are those ``generate`` hands over; with no other processor
      before it they are the base's own, and the tokens equal ``MemoryDecoderModel`` with the router.
    """

    def __init__(self, memdec, lmbda: float, attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
                 router: Router | None = None, base=None):
        self.memdec = memdec
        self.lmbda = check_lambda(lmbda)
        self.temperature = check_temperature(temperature, "the memory decoder's temperature")
        self.attention_mask = attention_mask
        self.router = router
        self._pos_ok = _accepts(memdec, "position_ids")
        self._keep_ok = _accepts(memdec, "logits_to_keep")
        self._base_states: list[torch.Tensor] = []  # the base's final hidden states, newest last
        self._hook = None
        if router is not None and router.needs_features:
            if base is None:
                raise MemdecError("MemoryDecoderLogitsProcessor: a router that reads features needs base=, the model "
                                  "whose generate() runs (its final hidden state is one of the features)")
            self._hook = base.get_output_embeddings().register_forward_pre_hook(
                functools.partial(_record_last, self._base_states))
        self.reset()

    def close(self) -> None:
        """Remove the hook on the base model's LM head (a router's feature); the processor mixes no more."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> "MemoryDecoderLogitsProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the cache, to start a new ``generate()`` call."""
        self._cache: DynamicCache | None = None
        self._prefix: torch.Tensor | None = None  # the ids the cache holds, [B, seen]
        self._mask: torch.Tensor | None = None  # attention mask of the cache, [B, seen] (None: no padding)
        self._next_pos: torch.Tensor | None = None  # [B, 1]
        self._base_states.clear()

    def _refuse(self, why: str) -> None:
        raise MemdecError(
            f"MemoryDecoderLogitsProcessor: {why}. It supports greedy decoding and sampling with one sequence "
            f"per prompt; for beam search use MemoryDecoderModel (memdec generate without --processor). "
            f"Use a new processor (or reset()) for each generate() call."
        )

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = next(self.memdec.parameters()).device
        ids = input_ids.to(device)
        batch, cur = ids.shape
        if self._cache is None:  # prefill: the whole prompt
            mask = self.attention_mask
            if mask is not None:
                mask = mask.to(device)
                if mask.shape[0] != batch:
                    self._refuse(f"got {batch} sequences but an attention mask for {mask.shape[0]} prompts "
                                 f"(beam search or num_return_sequences > 1?)")
                if mask.shape[1] != cur:
                    self._refuse(f"the attention mask has {mask.shape[1]} positions but the prompt has {cur}")
                if bool(mask.all()):
                    mask = None  # as generate() does: no padding, no mask
            pos = position_ids_from_mask(mask, cur, device).expand(batch, -1)
            self._cache, self._mask, new = DynamicCache(config=self.memdec.config), mask, ids
        else:
            seen = self._prefix.shape[1]
            if batch != self._prefix.shape[0] or cur != seen + 1 or not torch.equal(ids[:, :seen], self._prefix):
                self._refuse("the sequences changed between steps (beam search reorders them)")
            if self._mask is not None:
                self._mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
            pos, new = self._next_pos, ids[:, seen:]
        kw: dict[str, Any] = {"attention_mask": self._mask}
        if self._pos_ok:
            kw["position_ids"] = pos
        if self._keep_ok:
            kw["logits_to_keep"] = 1
        mem_states: list[torch.Tensor] = []
        head = self.memdec.get_output_embeddings()
        hook = head.register_forward_pre_hook(functools.partial(_record_last, mem_states)) \
            if self.router is not None and self.router.needs_features else None
        try:
            out = self.memdec(input_ids=new, cache=self._cache, use_cache=True, **kw)
        finally:
            if hook is not None:
                hook.remove()
        self._cache, self._prefix, self._next_pos = out.cache, ids, pos[:, -1:] + 1

        mem_logits = out.logits[:, -1].float()
        if mem_logits.shape[-1] != scores.shape[-1]:
            raise TokenizerMismatchError(
                f"the memory decoder scores {mem_logits.shape[-1]} tokens but the base model {scores.shape[-1]}"
            )
        lp_mem = F.log_softmax(scale_logits(mem_logits, self.temperature), dim=-1).to(scores.device)
        lp_base = F.log_softmax(scores.float(), dim=-1)
        if self.router is None:
            mixed = mix_logprobs(lp_base, lp_mem, self.lmbda)
        else:
            log_1m, log_lam = self._router_weights(lp_base, lp_mem, mem_states)
            mixed = mix_routed(lp_base, lp_mem, log_1m[:, None], log_lam[:, None])
        return mixed.masked_fill(torch.isneginf(scores), -math.inf)

    def _router_weights(self, lp_base: torch.Tensor, lp_mem: torch.Tensor,
                        mem_states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's (log(1 − λ_t), log λ_t) [B] at this step, from both rows of log-probs [B, V]
        and the two models' final hidden states at the newest position."""
        def states() -> tuple[torch.Tensor, torch.Tensor]:
            if not self._base_states or not mem_states:
                self._refuse("the router's features need the base model's final hidden state: give base=, the "
                             "model whose generate() runs this processor")
            h_base, h_mem = self._base_states.pop().to(lp_base.device), mem_states[-1].to(lp_base.device)
            return h_base, h_mem

        log_1m, log_lam = router_log_weights(self.router, lp_base[:, 0], states,
                                             lambda: distribution_scalars(lp_base, lp_mem))
        return log_1m.to(lp_base.device), log_lam.to(lp_base.device)
