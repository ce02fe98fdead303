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
from .cache import JointCache, position_ids_from_mask
from .hooks import router_log_weights
from .loading import LoadingMixin, attach_router
from .model import MemoryDecoderModel
from .processor import MemoryDecoderLogitsProcessor
from .scoring import RoutingMixin, ScoringMixin

__all__ = ["JointCache", "LoadingMixin", "MemoryDecoderLogitsProcessor", "MemoryDecoderModel", "RoutingMixin",
           "ScoringMixin", "attach_router", "position_ids_from_mask", "router_log_weights"]
