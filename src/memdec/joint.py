"""A base model and a memory decoder, mixed in log space.

    log p(y | x) = logaddexp( log(1-λ) + log p_base(y | x),  log λ + log p_mem(y | x) )

Both models share one tokenizer; the memory decoder's logits may be divided by a temperature
before its softmax. Three ways in:

- ``MemoryDecoderModel``: a wrapper, peft-style, that pairs any loaded causal LM with a memory
  decoder checkpoint. Its forward pass returns the mixed log-probabilities as ``logits``, so
  Hugging Face ``generate()`` works unchanged: greedy, sampling, beam search, batched
  left-padded prompts, EOS and stopping criteria. It keeps one KV cache per model
  (``JointCache``), reordered together under beam search.
- A fork decoder of this very base (``memdec.decoders``, ``fork:K``: its embeddings and first L−K
  blocks are the base's modules) runs on a *shared trunk*: the base's forward runs once, the hidden
  state entering block L−K and each top block's arguments (masks, position embeddings, ...) are
  captured by hooks, and only the decoder's own K blocks, final norm and the LM head run again, on
  the decoder's own KV cache (its layers L−K..L−1). The results are those of the decoder as a
  separate full model: sharing is an optimisation only.
- ``MemoryDecoderLogitsProcessor``: lets an unmodified base model's ``generate()`` use a memory
  decoder, for greedy decoding and sampling (not beam search).
- scorers for ``memdec.evaluate``: target log-probs of each model (per-row logsumexp + gather),
  mixed on the targets only; never a full-vocabulary logaddexp.

A memory decoder checkpoint is a Hugging Face model folder plus ``memdec.json``; its format is
owned by ``memdec.checkpoint``. ``memdec generate`` lives in ``memdec.generate``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GenerationMixin, LogitsProcessor, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_checkpoint_tokenizer,
    check_same_vocab,
    read_memdec_json,
    write_memdec_json,
)
from .checkpoint import decoder_fingerprint, is_router_folder, read_router_json
from .checks import check_lambda, check_temperature
from .decoders import blocks_and_norm, decoder_shape, load_decoder, shared_split
from .errors import MemdecError, TokenizerMismatchError
from .loss import LMHead, lm_head
from .models import check_base_identity, load_model, loaded_folder, tokenizer_fingerprint, vocab_rows
from .router import Router, RouterFeatures, distribution_scalars, load_router, mix_routed, scalars_from_logits
from .scoring import Scorer, causal_lm_logits, mix_logprobs, scale_logits, target_logprobs

# --------------------------------------------------------------------------------------------
# Helpers


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def position_ids_from_mask(attention_mask: torch.Tensor | None, length: int, device=None) -> torch.Tensor:
    """Positions [B, L] (or [1, L]) that skip left padding, as ``generate`` makes them."""
    if attention_mask is None:
        return torch.arange(length, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


# --------------------------------------------------------------------------------------------
# The cache: one per model


class JointCache(Cache):
    """Two KV caches, the base model's and the memory decoder's, moved together.

    ``generate`` sees one Cache: lengths and masks come from the base model's cache; beam-search
    reordering, cropping and batch selection apply to both.
    """

    def __init__(self, base: Cache, memdec: Cache):  # noqa: D107 (no Cache.__init__: the inner caches own the layers)
        self.base = base
        self.memdec = memdec
        self.offloading = False

    @property
    def layers(self):
        return self.base.layers

    def __repr__(self) -> str:
        return f"JointCache(base={self.base!r}, memdec={self.memdec!r})"

    def __len__(self) -> int:
        return len(self.base)

    def update(self, *args, **kwargs):
        raise TypeError("JointCache is not a per-layer cache: pass .base or .memdec to a model")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.base.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.base.get_max_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.base.get_mask_sizes(query_length, layer_idx)

    def _both(self, method: str, *args) -> None:
        getattr(self.base, method)(*args)
        getattr(self.memdec, method)(*args)

    def reset(self) -> None:
        self._both("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._both("reorder_cache", beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        self.base.crop(tokens_to_remove)
        for layer in self.memdec.layers:  # a shared trunk leaves the decoder's lower layers empty:
            if layer.is_initialized:  # a sliding-window layer cannot crop what it never held
                layer.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._both("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._both("batch_select_indices", indices)

    def activate_past_recording(self) -> None:
        self._both("activate_past_recording")

    @property
    def batch_size(self) -> int:
        return self.base.batch_size

    @property
    def is_compileable(self) -> bool:
        return False  # dynamic caches only

    @property
    def is_initialized(self) -> bool:
        return self.base.is_initialized and self.memdec.is_initialized

    @property
    def is_croppable(self) -> bool:
        return self.base.is_croppable and self.memdec.is_croppable

    @property
    def is_sliding(self) -> list[bool]:
        return self.base.is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self.base.is_linear

    @property
    def is_dummy(self) -> list[bool]:
        return self.base.is_dummy


# --------------------------------------------------------------------------------------------
# The joint model


class MemoryDecoderModel(PreTrainedModel, GenerationMixin):
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

    @classmethod
    def from_pretrained(
        cls,
        base_model,
        memdec_path: str | Path,
        lmbda: float | None = None,
        *,
        tokenizer=None,
        temperature: float | None = None,
        check_tokenizer: bool = True,
        router: str | Path | Router | None = None,
        auto_router: bool = True,
    ) -> "MemoryDecoderModel":
        """Pair a base model with the memory decoder checkpoint at ``memdec_path``.

        base_model: a loaded causal LM, or a model spec string (``memdec.models.load_model``).
        lmbda: λ; default: the checkpoint's recommended value (``memdec.json`` ``lambda``).
        tokenizer: the base model's tokenizer. Its fingerprint must equal the checkpoint's
            ``tokenizer_hash``, else TokenizerMismatchError. If omitted, it is loaded from
            ``base_model.name_or_path``; if that fails, MemdecError asks for one. Pass
            ``check_tokenizer=False`` to skip the fingerprint check (the vocabulary sizes of the
            two models are always compared).
        temperature: divides the decoder's logits; default ``memdec.json`` ``temperature`` or 1.

        router: a router folder (``memdec router``) or a ``Router``: λ_t per position in place of λ.
            Without one, router files in the checkpoint folder itself are used when ``auto_router``
            and no ``lmbda`` is given, unless the router lost to the fixed λ on its validation text.

        The decoder is loaded onto the base model's device, in its dtype.
        """
        auto_router = auto_router and router is None and lmbda is None  # a λ given: the fixed mixture
        if isinstance(base_model, (str, Path)):
            base_model, loaded_tok = load_model(str(base_model))
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        info = read_memdec_json(memdec_path)
        if check_tokenizer:
            if tokenizer is None:
                tokenizer = _tokenizer_of(base_model)
            check_checkpoint_tokenizer(tokenizer, info, f"memory decoder {memdec_path}")
        lmbda = info["lambda"] if lmbda is None else lmbda
        temperature = float(info.get("temperature") or 1.0) if temperature is None else temperature
        memdec = load_decoder(memdec_path, info, base_model)
        joint = cls(base_model, memdec, lmbda=lmbda, temperature=temperature, memdec_info=info)
        if auto_router and is_router_folder(memdec_path):
            router = _auto_router(memdec_path)
        if router is not None:
            joint.router = router if isinstance(router, Router) else attach_router(joint, router, memdec_path)
        return joint

    def save_pretrained(self, folder: str | Path, tokenizer=None, **kwargs) -> Path:
        """Save the memory decoder only, peft-style: its model folder (a fork of this base: its own
        blocks, ``memdec.decoders``) plus ``memdec.json``, with the current λ and temperature as the
        recommended ones. ``tokenizer`` (the shared one) is saved
        beside it and, for a wrapper not loaded from a checkpoint, gives ``tokenizer_hash``."""
        info = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "base_model": self.base.name_or_path, "alpha": None, "k": None,
                "knn_temperature": None, "datastore_manifest_hash": None, "train_stats": {}, **self.memdec_info}
        if tokenizer is not None:
            info["tokenizer_hash"] = tokenizer_fingerprint(tokenizer)
        if "tokenizer_hash" not in info:
            raise MemdecError("save_pretrained needs tokenizer=... to record the memory decoder's tokenizer hash")
        info.update({"lambda": self.lmbda, "temperature": self.temperature})
        folder = Path(folder)
        info.pop("decoder", None)
        if shared_split(self.base, self.memdec) is None:
            self.memdec.save_pretrained(folder, **kwargs)
        else:  # a fork of this base (fork:K, lora:R@K...): what it owns only
            info["decoder"] = decoder_shape(self.base, self.memdec).save(self.memdec, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_memdec_json(folder, info)  # last: it commits the checkpoint
        return folder

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


    # -- routing: λ_t per position (memdec.router) ------------------------------------------------

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
        states = (lambda: (hidden["base"][:, -n:], hidden["memdec"][:, -n:]))
        return router_log_weights(self.router, shape_of, states, scalars)

    def _routed_rows(self, base_logits: torch.Tensor, memdec_logits: torch.Tensor, hidden: dict) -> torch.Tensor:
        """Mixed log-probs [B, L', V] at the router's λ_t (broadcast [B, L', 1] over the vocabulary)."""
        lp_base, lp_mem = F.log_softmax(base_logits.float(), dim=-1), self.memdec_logprobs(memdec_logits)
        log_1m, log_lam = self._router_weights(hidden, lp_base[..., 0], lambda: distribution_scalars(lp_base, lp_mem))
        return mix_routed(lp_base, lp_mem, log_1m.to(lp_base.device)[..., None], log_lam.to(lp_base.device)[..., None])

    def _pair_logits(self, input_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' logits [B, n, V] of the last ``n`` positions, the decoder's divided by its temperature."""
        if self._split is not None:
            common = {"input_ids": input_ids, "use_cache": False}
            base_logits, mem_logits = self._forked_logits(common, None, None, {"logits_to_keep": n}, n)
            base_logits, mem_logits = base_logits[:, -n:], mem_logits[:, -n:]
        else:
            base_logits, mem_logits = causal_lm_logits(self.base, input_ids, n), causal_lm_logits(self.memdec, input_ids, n)
        return base_logits, scale_logits(mem_logits, self.temperature)

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


def attach_router(joint: MemoryDecoderModel, folder: str | Path, memdec_path: str | Path) -> Router:
    """The router saved in ``folder``, checked against the models it is to route between (one MemdecError
    line each): the decoder's weights (``decoder_fingerprint``), the tokenizer, the hidden sizes and,
    where both are known, the base model's weights. On the base model's device."""
    router, info = load_router(folder)
    where = Path(folder).expanduser() / "router.json"
    mine = decoder_fingerprint(memdec_path)
    if info["decoder_fingerprint"] != mine:
        raise MemdecError(f"{where}: trained for another memory decoder (decoder_fingerprint "
                          f"{info['decoder_fingerprint']}, {memdec_path} has {mine}); train one with `memdec router`")
    if joint.memdec_info.get("tokenizer_hash") not in (None, info["tokenizer_hash"]):
        raise TokenizerMismatchError(f"{where}: trained with another tokenizer than the memory decoder {memdec_path}'s")
    if router.needs_features:  # a router that reads both models' hidden states must fit their sizes
        sizes = (joint.base.config.get_text_config().hidden_size, joint.memdec.config.get_text_config().hidden_size)
        if sizes != (info["d_base"], info["d_mem"]):
            raise MemdecError(f"{where}: trained on hidden sizes {info['d_base']} (base) and {info['d_mem']} (decoder); "
                              f"these models have {sizes[0]} and {sizes[1]}")
    check_base_identity(info.get("base_fingerprint"), loaded_folder(joint.base), str(where))
    return router.to(joint.base.get_input_embeddings().weight.device)


def _auto_router(memdec_path: str | Path) -> str | None:
    """The checkpoint folder itself as a router folder, unless its router lost to the fixed λ on the
    validation text it was measured on (a router that loses is not used)."""
    valid = read_router_json(memdec_path).get("valid") or {}
    if valid.get("router_ppl") is not None and valid.get("fixed_ppl") is not None \
            and valid["router_ppl"] > valid["fixed_ppl"]:
        warnings.warn(f"{memdec_path}: its router lost to the fixed λ on {valid.get('corpus', 'its validation text')} "
                      f"({valid['router_ppl']:.3f} > {valid['fixed_ppl']:.3f}); mixing with the fixed λ", stacklevel=3)
        return None
    return str(memdec_path)


def router_log_weights(router: Router, shape_of: torch.Tensor, states, scalars) -> tuple[torch.Tensor, torch.Tensor]:
    """``router``'s (log(1 − λ_t), log λ_t), each shaped like ``shape_of`` [...]. Only a router that reads
    features calls ``states()`` (the base's and the decoder's final hidden states [..., d]) and ``scalars()``
    (the scalar features [..., s])."""
    if not router.needs_features:
        return router.log_weights(shape_of)
    h_base, h_mem = states()
    rows = RouterFeatures(h_base.shape[-1], h_mem.shape[-1]).build(h_base, h_mem, scalars())
    return router.log_weights(rows.to(_device_of(router, rows)))


def _device_of(router: Router, default: torch.Tensor) -> torch.device:
    """The device of a router's parameters (``default``'s for one without any)."""
    param = next(router.parameters(), None)
    return default.device if param is None else param.device


def _record_input(calls: list, module, args: tuple) -> None:
    """A forward pre-hook: record a module's input (an LM head's: the model's final hidden state)."""
    calls.append(args[0])


def _record_last(states: list, module, args: tuple) -> None:
    """A forward pre-hook: keep an LM head's input at the last position, [B, d] (a decoding step's state)."""
    states[:] = [args[0][:, -1]]


def _capture(calls: list, module, args: tuple, kwargs: dict) -> None:
    """A forward pre-hook (``with_kwargs=True``): record a block's positional and keyword arguments."""
    calls.append((args, dict(kwargs)))


def _hidden_in(call: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden state a block was called with (its first positional argument, or ``hidden_states``)."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _other_args(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """A block call's arguments other than the hidden state: (positional, keyword)."""
    args, kwargs = call
    if args:
        return args[1:], kwargs
    return (), {k: v for k, v in kwargs.items() if k != "hidden_states"}


def _with_cache(kwargs: dict, cache: Cache | None) -> dict:
    """A block's captured keyword arguments with the decoder's cache in place of the base model's."""
    out = dict(kwargs)
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in out:
            out[name] = cache
    return out


def _tokenizer_of(model):
    """The tokenizer saved beside a loaded model (``name_or_path``), or MemdecError."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "name_or_path", None)
    if name:
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means: we cannot tell
            pass
    raise MemdecError(
        f"cannot load the base model's tokenizer from {name!r} to check it against the memory decoder's; "
        f"pass tokenizer=... (or check_tokenizer=False to skip the check)"
    )


# --------------------------------------------------------------------------------------------
# The logits processor


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

