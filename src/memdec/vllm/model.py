"""memdec's joint model as a vLLM model class: the base's stack beside the memory decoder's, mixed in fp32 in
``compute_logits``.

vLLM imports this module in its own processes (``memdec.vllm.register``, the ``vllm.general_plugins`` entry
point, names it) when it loads a folder that ``memdec export vllm`` wrote (``memdec.vllm.format``). It imports vLLM,
torch and memdec's mixing and router code only (never memdec's Hugging Face joint model: vLLM pins another
transformers).

Shapes (the record's ``shape``):
- ``copy``: a second whole stack, embeddings and head of its own (``decoder_config`` may differ from the base's).
- ``fork``: the base's trunk (embeddings, blocks ``0..S-1``) run once; the decoder's own blocks ``S..L-1`` and
  final norm continue from the trunk's output; the base's LM head (a fork shares it). A ``lora:R@K`` decoder is
  exported as a fork with ``S = L - K`` and the adapters merged into its own copy of the blocks they touch.

``forward`` returns both final hidden states side by side, [T, d_base + d_mem]; ``compute_logits`` splits them,
and returns the mixture's log-probabilities log((1 - λ)·p_base + λ·p_mem) [N, V] (λ_t per row with a token
router) in float32: vLLM's logprobs, temperature, top-k/p and penalties then act on the mixture, as they do on
``MemoryDecoderModel``'s output in memdec's own ``generate``. At λ = 0 without a router it returns the base's
logits unchanged (vLLM's base, exactly).

What the joint model cannot do is refused when vLLM builds it, in one line: pipeline and tensor parallelism (one
rank holds both stacks; untested beyond), speculative decoding (its drafts read the target's hidden states, which
are two models' here), prompt embeddings (the copy embeds tokens itself), an architecture other than Llama's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from ..router import distribution_scalars, load_router, mix_routed, router_log_weights
from ..scoring import mix_logprobs, scale_logits
from .format import ARCHITECTURE, MODEL_TYPES, JointRecord, decoder_layer


class MemoryStack(nn.Module):
    """The decoder's own modules: blocks ``memdec.layers.{L + j}`` for its blocks ``j`` in ``own``, a final norm,
    and (a copy) its own embeddings and LM head."""

    def __init__(self, vllm_config: VllmConfig, config, n_base_layers: int, own: range, whole: bool):
        super().__init__()
        config = copy.deepcopy(config)
        config.target_layer_count = n_base_layers  # vLLM reads block j's layer type at j = number - L
        self.layers = nn.ModuleDict({
            str(decoder_layer(n_base_layers, j)): LlamaDecoderLayer(
                vllm_config=vllm_config, config=config, prefix=f"memdec.layers.{decoder_layer(n_base_layers, j)}")
            for j in own})
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_size = config.hidden_size
        if whole:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="memdec.lm_head")
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.embed_tokens)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The decoder's final hidden state [T, d'] from its first own block's input (hidden, residual [T, d'])."""
        for layer in self.layers.values():
            hidden, residual = layer(positions, hidden, residual)
        return self.norm(hidden, residual)[0] if residual is not None else self.norm(hidden)


class MemdecJointForCausalLM(nn.Module):
    """A base causal LM and its memory decoder as one vLLM model (module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        where = f"{vllm_config.model_config.model}/config.json"
        self.record = JointRecord.from_json(getattr(config, "memdec", None), where)
        refuse_unsupported(vllm_config, config)
        self.config = config
        self.model = LlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        n = config.num_hidden_layers
        if self.record.shape == "copy":
            mem_config = type(config).from_dict(self.record.decoder_config)
            self.split = None
            self.memdec = MemoryStack(vllm_config, mem_config, n, range(mem_config.num_hidden_layers), whole=True)
            self.memdec_logits = LogitsProcessor(mem_config.vocab_size, scale=getattr(mem_config, "logit_scale", 1.0))
        else:
            if not 0 <= self.record.split < n:
                raise ValueError(f"{where}: memdec.split {self.record.split} must lie in 0..{n - 1} (the base's "
                                 f"blocks)")
            self.split = self.record.split
            self.memdec = MemoryStack(vllm_config, config, n, range(self.split, n), whole=False)
            self.memdec_logits = self.logits_processor
        self._router = ()  # held outside the module tree: its weights are the router folder's, not vLLM's to load
        if self.record.router is not None:
            self._router = (load_router(Path(vllm_config.model_config.model) / self.record.router)[0].eval(),)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    # -- vLLM's model interface -----------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Both models' final hidden states side by side, [T, d_base + d_mem], for the T scheduled tokens."""
        if input_ids is None:
            raise ValueError("memdec's joint model takes token ids, not prompt embeddings")
        hidden, residual, trunk = self.model.embed_input_ids(input_ids), None, None
        for i, layer in enumerate(self.model.layers):
            if i == self.split:  # the fork's input: the base's blocks below modify these tensors in place
                trunk = (hidden.clone(), None if residual is None else residual.clone())
            hidden, residual = layer(positions, hidden, residual)
        base_hidden = self.model.norm(hidden, residual)[0]
        if trunk is None:  # a copy: its own embeddings
            trunk = (self.memdec.embed_tokens(input_ids), None)
        return torch.cat([base_hidden, self.memdec(positions, *trunk)], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The mixture's log-probabilities [N, V] (float32) from ``forward``'s rows [N, d_base + d_mem]."""
        base_hidden, mem_hidden = hidden_states.split([self.config.hidden_size, self.memdec.hidden_size], dim=-1)
        base_logits = self.logits_processor(self.lm_head, base_hidden)
        router = self.router_on(hidden_states.device)
        if self.record.lmbda == 0.0 and router is None:
            return base_logits  # the base, exactly
        head = self.lm_head if self.split is not None else self.memdec.lm_head
        mem_logits = self.memdec_logits(head, mem_hidden)
        if base_logits is None:  # not the rank that samples
            return None
        lp_base = F.log_softmax(base_logits.float(), dim=-1)
        lp_mem = F.log_softmax(scale_logits(mem_logits.float(), self.record.temperature), dim=-1)
        if router is None:
            return mix_logprobs(lp_base, lp_mem, self.record.lmbda)
        log_1m, log_lam = router_log_weights(router, lp_base[:, 0], lambda: (base_hidden, mem_hidden),
                                             lambda: distribution_scalars(lp_base, lp_mem))
        return mix_routed(lp_base, lp_mem, log_1m[:, None].to(lp_base.device), log_lam[:, None].to(lp_base.device))

    def router_on(self, device: torch.device):
        """The token router (None without one), on ``device``."""
        if not self._router:
            return None
        if next(self._router[0].parameters(), torch.empty(0, device=device)).device != device:
            self._router = (self._router[0].to(device),)
        return self._router[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base's tensors (``model.``, ``lm_head.``) and the decoder's (``memdec.``), Hugging Face names."""
        return AutoWeightsLoader(self).load_weights(weights, mapper=LlamaModel.hf_to_vllm_mapper)


def refuse_unsupported(vllm_config: VllmConfig, config) -> None:
    """ValueError (one line) for what the joint model cannot do (module docstring)."""
    where = f"memdec's joint model ({ARCHITECTURE})"
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        raise ValueError(f"{where} runs Llama-architecture bases ({', '.join(MODEL_TYPES)}); this one is "
                         f"{getattr(config, 'model_type', None)!r}")
    if vllm_config.speculative_config is not None:
        raise ValueError(f"{where} cannot be speculated: drafts read the target's hidden states, which are two "
                         f"models' here; drop the speculative config")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1 or parallel.tensor_parallel_size != 1:
        raise ValueError(f"{where} runs on one rank (tensor_parallel_size = pipeline_parallel_size = 1); got "
                         f"tp {parallel.tensor_parallel_size}, pp {parallel.pipeline_parallel_size}")
