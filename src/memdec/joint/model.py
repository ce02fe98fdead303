"""``MemoryDecoderModel``: a frozen base causal LM and a memory decoder, mixed in log space, a causal LM
itself; its forward pass on two models or on a shared trunk. Loading, scoring and routing are its mixins."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from ..checkpoint import check_same_vocab
from ..checks import check_lambda, check_temperature
from ..decoders import blocks_and_norm, shared_split
from ..errors import MemdecError
from ..loss import LMHead, lm_head
from ..models import vocab_rows
from ..router import Router
from ..scoring import mix_logprobs, scale_logits
from .cache import JointCache, _accepts
from .hooks import _capture, _hidden_in, _other_args, _with_cache
from .loading import LoadingMixin
from .scoring import RoutingMixin, ScoringMixin


class MemoryDecoderModel(LoadingMixin, ScoringMixin, RoutingMixin, PreTrainedModel, GenerationMixin):
    """A frozen base causal LM and a memory decoder, mixed in log space: a causal LM itself.

    ``forward(input_ids [B, L], ...)`` returns ``logits`` [B, L', V] = the mixed log-probs
    log((1-λ)·p_base + λ·p_mem), where L' = L or ``logits_to_keep``. Log-probs are valid logits,
    so ``generate()``, its logits processors, warpers and beam search work as for any LM.

    Build it with ``MemoryDecoderModel.from_pretrained(base_model, memdec_path)``, or directly
    from two loaded models: ``MemoryDecoderModel(base, memdec, lmbda=0.3)``. The two models
    always see the same input ids, attention mask and position ids; the wrapper's config and
    generation config are copies of the base model's.

    Attributes: ``base``, ``memdec`` (the two models), ``lmbda`` (λ in [0, 1]), ``temperature``
    (divides the memory decoder's logits), ``memdec_info`` (its ``memdec.json``, or {}), ``router``
    (a ``memdec.router.Router`` giving λ_t per position in place of ``lmbda``, or None).
    """

    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, base, memdec, lmbda: float = 0.5, temperature: float = 1.0, memdec_info: dict | None = None):
        super().__init__(copy.deepcopy(base.config))
        check_same_vocab(base, memdec)
        self.base = base
        self.memdec = memdec
        self.lmbda = lmbda
        self.temperature = check_temperature(temperature, "the memory decoder's temperature")
        self.memdec_info = dict(memdec_info or {})
        if getattr(base, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(base.generation_config)
        self._keep_ok = {"base": _accepts(base, "logits_to_keep"), "memdec": _accepts(memdec, "logits_to_keep")}
        self._pos_ok = {"base": _accepts(base, "position_ids"), "memdec": _accepts(memdec, "position_ids")}
        self._split, self._softcap = self._find_shared_trunk()
        self.router: Router | None = None  # λ_t per position (memdec.router); None: the fixed lmbda
        self._hidden: dict | None = None  # while a router's features are captured: the final hidden states

    def _find_shared_trunk(self) -> tuple[int | None, float | None]:
        """(L − K, the head's soft-capping) where the decoder is a fork of this base whose head
        ``memdec.loss.lm_head`` reproduces, else (None, None): the two models run separately."""
        split = shared_split(self.base, self.memdec)
        if split is None or not all(self._keep_ok.values()):
            return None, None
        device = self.base.get_input_embeddings().weight.device
        probe = torch.arange(min(8, vocab_rows(self.memdec)), device=device)[None]
        head = lm_head(self.memdec, probe)
        return (None, None) if head is None else (split, head.softcap)

    @property
    def shares_trunk(self) -> bool:
        """Whether the two models run their shared trunk once (a fork decoder of this base)."""
        return self._split is not None

    # -- construction ------------------------------------------------------------------------

    @property
    def lmbda(self) -> float:
        return self._lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self._lmbda = check_lambda(value)

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    # -- mixing ------------------------------------------------------------------------------

    def memdec_logprobs(self, memdec_logits: torch.Tensor) -> torch.Tensor:
        """log_softmax(logits / T) in float32; [..., V] -> [..., V]."""
        return F.log_softmax(scale_logits(memdec_logits.float(), self.temperature), dim=-1)

    def mix_logits(self, base_logits: torch.Tensor, memdec_logits: torch.Tensor) -> torch.Tensor:
        """Mixed log-probs [..., V] from the two models' raw logits [..., V] (full rows)."""
        return mix_logprobs(F.log_softmax(base_logits.float(), dim=-1), self.memdec_logprobs(memdec_logits), self.lmbda)

    def _model_kwargs(self, which: str, attention_mask, position_ids, logits_to_keep) -> dict:
        kw: dict[str, Any] = {"attention_mask": attention_mask}
        if position_ids is not None and self._pos_ok[which]:
            kw["position_ids"] = position_ids
        if self._keep_ok[which]:
            kw["logits_to_keep"] = logits_to_keep
        return kw

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Run both models on the same inputs and mix.

        input_ids [B, L]; attention_mask [B, past+L] (1 = token, 0 = padding); position_ids [B, L];
        cache: a JointCache (or an empty Cache, or None: one is made when ``use_cache``).
        Returns CausalLMOutputWithPast with ``logits`` = mixed log-probs [B, L', V] (float32),
        ``cache`` = the JointCache, and ``loss`` = mean NLL of the shifted ``labels`` if given.
        """
        if inputs_embeds is not None:
            raise MemdecError("MemoryDecoderModel takes input_ids only: both models must see the same token ids")
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self._joint_cache(cache) if use_cache else None
        common = {"input_ids": input_ids, "use_cache": use_cache, **kwargs}
        with self._final_hidden(self.router is not None and self.router.needs_features) as hidden:
            base_logits, mem_logits = self._both_logits(common, cache, attention_mask, position_ids, logits_to_keep)
        logp = self.mix_logits(base_logits, mem_logits) if self.router is None else \
            self._routed_rows(base_logits, mem_logits, hidden)
        loss = None
        if labels is not None:
            tgt = labels[:, 1:].to(logp.device)
            lp = logp[:, -tgt.shape[1] - 1 : -1]
            keep = tgt != -100
            picked = lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            loss = -(picked * keep).sum() / keep.sum().clamp_min(1)
        return CausalLMOutputWithPast(loss=loss, logits=logp, cache=cache)

    def _both_logits(self, common: dict, cache: JointCache | None, attention_mask, position_ids,
                     logits_to_keep) -> tuple[torch.Tensor, torch.Tensor]:
        """The base model's and the decoder's logits [B, L', V] on the same inputs (``common``: input
        ids, use_cache and generate's extra keyword arguments), on a shared trunk where there is one."""
        cache_b, cache_m = (cache.base, cache.memdec) if cache is not None else (None, None)
        kw_b = self._model_kwargs("base", attention_mask, position_ids, logits_to_keep)
        if self._split is not None:
            return self._forked_logits(common, cache_b, cache_m, kw_b, logits_to_keep)
        out_b = self.base(**common, cache=cache_b, **kw_b)
        out_m = self.memdec(**common, cache=cache_m,
                            **self._model_kwargs("memdec", attention_mask, position_ids, logits_to_keep))
        return out_b.logits, out_m.logits

    def _forked_logits(self, common: dict, cache_b: Cache | None, cache_m: Cache | None, kw_b: dict,
                       logits_to_keep) -> tuple[torch.Tensor, torch.Tensor]:
        """One base forward, hooked at its top K blocks, then the decoder's own top K blocks on the
        captured hidden state with the captured per-block arguments and the decoder's cache, its
        final norm and the LM head (``memdec.loss.LMHead``, with the head's soft-capping)."""
        base_layers, _ = blocks_and_norm(self.base)
        mem_layers, mem_norm = blocks_and_norm(self.memdec)
        calls: list[tuple[tuple, dict]] = []
        hooks = [layer.register_forward_pre_hook(functools.partial(_capture, calls), with_kwargs=True)
                 for layer in base_layers[self._split:]]
        try:
            out_b = self.base(**common, cache=cache_b, **kw_b)
        finally:
            for hook in hooks:
                hook.remove()
        if len(calls) != len(mem_layers) - self._split:
            raise MemdecError(f"the base model ran {len(calls)} of its top {len(mem_layers) - self._split} blocks "
                              f"once each; a shared trunk needs each exactly once")
        hidden = _hidden_in(calls[0])
        for layer, call in zip(mem_layers[self._split:], calls):
            args, kwargs = _other_args(call)
            out = layer(hidden, *args, **_with_cache(kwargs, cache_m))
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = slice_logits_to_keep(mem_norm(hidden), logits_to_keep)
        if self._hidden is not None:  # a router reads the decoder's final hidden state
            self._hidden["memdec"] = hidden
        head = self.memdec.get_output_embeddings()
        return out_b.logits, LMHead(head.weight, head.bias, self._softcap).logits(hidden)

    def _joint_cache(self, cache: Cache | None) -> JointCache:
        if isinstance(cache, JointCache):
            return cache
        if cache is not None and cache.get_seq_length() > 0:
            raise MemdecError("MemoryDecoderModel needs a JointCache (one cache per model), not a single model's cache")
        base_cache = cache if cache is not None else DynamicCache(config=self.base.config)
        return JointCache(base_cache, DynamicCache(config=self.memdec.config))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """As in GenerationMixin, then wrap the base model's fresh cache into a JointCache."""
        user_cache = model_kwargs.get("cache")
        if user_cache is not None and not isinstance(user_cache, JointCache):
            raise MemdecError("MemoryDecoderModel.generate() takes a JointCache, or no cache")
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise MemdecError(
                f"MemoryDecoderModel supports dynamic caches only, not cache_implementation="
                f"{generation_config.cache_implementation!r}"
            )
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if cache is not None and not isinstance(cache, JointCache):
            model_kwargs["cache"] = self._joint_cache(cache)

    # -- scoring -----------------------------------------------------------------------------
