"""Scoring with a joint model (``ScoringMixin``) and routing it per position (``RoutingMixin``): the
parts of ``MemoryDecoderModel`` that ``memdec.evaluate`` and ``memdec router`` use."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ..checks import check_lambda
from ..errors import MemdecError
from ..router import RouterFeatures, distribution_scalars, mix_routed, scalars_from_logits
from ..scoring import Scorer, causal_lm_logits, mix_logprobs, scale_logits, target_logprobs
from .hooks import _device_of, _record_input, router_log_weights


class ScoringMixin:
    """``MemoryDecoderModel``'s scorers for ``memdec.evaluate``: target log-probs of each model (a per-row
    logsumexp and a gather), mixed on the targets only; never a full-vocabulary logaddexp."""

    @torch.inference_mode()
    def target_logprobs_pair(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_base(target) and log p_mem(target), each float32 [B, n].

        input_ids [B, L]; targets [B, n]: the next tokens of the last n positions. Each model's
        logits [B, n, V] are reduced by a per-row logsumexp and a gather; nothing of size V is mixed.
        """
        base_logits, mem_logits = self._pair_logits(input_ids, targets.shape[1])
        return target_logprobs(base_logits, targets), target_logprobs(mem_logits, targets)

    def scorer(self, lmbda: float | None = None) -> Scorer:
        """An ``evaluate`` scorer of the mixture: (input_ids, targets) -> log p(target) [B, n]. With a
        ``router`` and no ``lmbda``, the mixture of the router's λ_t (``routed_scorer``)."""
        if self.router is not None and lmbda is None:
            return self.routed_scorer()
        lmbda = self.lmbda if lmbda is None else check_lambda(lmbda)

        def score(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            lp_base, lp_mem = self.target_logprobs_pair(input_ids, targets)
            return mix_logprobs(lp_base, lp_mem, lmbda)

        return score

    def memdec_scorer(self) -> Scorer:
        """An ``evaluate`` scorer of the memory decoder alone (with its temperature)."""
        model, temperature = self.memdec, self.temperature

        @torch.inference_mode()
        def score(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = scale_logits(causal_lm_logits(model, input_ids, targets.shape[1]), temperature)
            return target_logprobs(logits, targets)

        return score

    def _pair_logits(self, input_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' logits [B, n, V] of the last ``n`` positions, the decoder's divided by its temperature."""
        if self._split is not None:
            common = {"input_ids": input_ids, "use_cache": False}
            base_logits, mem_logits = self._forked_logits(common, None, None, {"logits_to_keep": n}, n)
            base_logits, mem_logits = base_logits[:, -n:], mem_logits[:, -n:]
        else:
            base_logits = causal_lm_logits(self.base, input_ids, n)
            mem_logits = causal_lm_logits(self.memdec, input_ids, n)
        return base_logits, scale_logits(mem_logits, self.temperature)


class RoutingMixin:
    """``MemoryDecoderModel``'s token routing (``memdec.router``): λ_t per position from both models' final
    hidden states (hooks on the LM heads' inputs) and the scalar features."""

    @contextlib.contextmanager
    def _final_hidden(self, active: bool):
        """While the two models run: ``{"base": [B, L', d], "memdec": [B, L', d']}``, each model's final
        hidden state (its LM head's input: after the final norm, sliced as the logits are). Hooks on the
        heads' inputs, no second forward; a shared trunk's decoder state is recorded by ``_forked_logits``.
        Yields {} untouched when not ``active``."""
        found: dict[str, torch.Tensor] = {}
        if not active:
            yield found
            return
        calls: dict[int, list] = {}
        heads = {"base": self.base.get_output_embeddings()}
        if self._split is None:
            heads["memdec"] = self.memdec.get_output_embeddings()
        hooks = [head.register_forward_pre_hook(functools.partial(_record_input, calls.setdefault(id(head), [])))
                 for head in {id(h): h for h in heads.values()}.values()]
        self._hidden = found
        try:
            yield found
        finally:
            self._hidden = None
            for hook in hooks:
                hook.remove()
        for name, head in heads.items():  # one head for both: the base ran first
            if calls[id(head)]:
                found[name] = calls[id(head)][0 if name == "base" else -1]

    def _router_weights(self, hidden: dict, shape_of: torch.Tensor, scalars) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's (log(1 − λ_t), log λ_t) [B, n] for the positions of ``shape_of`` [B, n];
        ``scalars()`` gives the scalar features [B, n, s] when the router reads features."""
        n = shape_of.shape[-1]
        def states():
            return ((hidden["base"][:, -n:], hidden["memdec"][:, -n:]))
        return router_log_weights(self.router, shape_of, states, scalars)

    def _routed_rows(self, base_logits: torch.Tensor, memdec_logits: torch.Tensor, hidden: dict) -> torch.Tensor:
        """Mixed log-probs [B, L', V] at the router's λ_t (broadcast [B, L', 1] over the vocabulary)."""
        lp_base, lp_mem = F.log_softmax(base_logits.float(), dim=-1), self.memdec_logprobs(memdec_logits)
        log_1m, log_lam = self._router_weights(hidden, lp_base[..., 0], lambda: distribution_scalars(lp_base, lp_mem))
        return mix_routed(lp_base, lp_mem, log_1m.to(lp_base.device)[..., None], log_lam.to(lp_base.device)[..., None])

    @torch.inference_mode()
    def router_rows(self, input_ids: torch.Tensor, targets: torch.Tensor,
                    features: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, dict]:
        """What a router is trained and run on, for the last n positions: (feature rows [B, n, width]
        float32 or None, log p_base(target) [B, n], log p_mem(target) [B, n], the hidden states)."""
        n = targets.shape[1]
        with self._final_hidden(features) as hidden:
            base_logits, mem_logits = self._pair_logits(input_ids, n)
        lp_base, lp_mem = target_logprobs(base_logits, targets), target_logprobs(mem_logits, targets)
        rows = None
        if features:
            h_base, h_mem = hidden["base"][:, -n:], hidden["memdec"][:, -n:]
            rows = RouterFeatures(h_base.shape[-1], h_mem.shape[-1]).build(
                h_base, h_mem, scalars_from_logits(base_logits, mem_logits))
        return rows, lp_base, lp_mem, hidden

    def routed_scorer(self) -> Scorer:
        """An ``evaluate`` scorer of the mixture at the router's λ_t: (input_ids, targets) -> [B, n]."""
        if self.router is None:
            raise MemdecError("routed_scorer needs a router (MemoryDecoderModel.router)")

        @torch.inference_mode()
        def score(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            lp_base, lp_mem, log_1m, log_lam = self.routed_logprobs(input_ids, targets)
            return mix_routed(lp_base, lp_mem, log_1m, log_lam)

        return score

    @torch.inference_mode()
    def routed_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(log p_base(target), log p_mem(target), log(1 − λ_t), log λ_t), each [B, n], for the last n
        positions: what ``routed_scorer`` mixes (and λ_t for the report's plot, part 2)."""
        rows, lp_base, lp_mem, _ = self.router_rows(input_ids, targets, self.router.needs_features)
        log_1m, log_lam = self.router.log_weights(lp_base if rows is None else rows.to(_device_of(self.router, rows)))
        return lp_base, lp_mem, log_1m.to(lp_base.device), log_lam.to(lp_base.device)

