"""A fast decode path for ``MemoryDecoderModel``: static KV caches, one step for both models, CUDA graphs.

    gen = FastJointGenerator(joint)              # keep it: its caches and graphs are reused
    out = gen.generate(input_ids, attention_mask=mask, max_new_tokens=128)
    out = fast_generate(joint, input_ids, attention_mask=mask, do_sample=True, top_p=0.9)

``generate`` takes the arguments of ``MemoryDecoderModel.generate`` and returns the same token ids:
Hugging Face ``generate`` still prepares everything (generation config, logits processors, stopping
criteria, attention mask and position ids), and hands the decoding loop to this module
(``custom_generate``). The loop differs from ``generate``'s own in three ways only:

- each model keeps a ``StaticCache`` of ``max_length - 1`` slots, allocated once per batch size and
  length and reused by later calls; the decode steps get a ready 4D attention mask over those slots;
- one step function runs both models' single-token forwards and the log-space mix
  (``MemoryDecoderModel.mix_logits``, the eager path's own); at λ = 0 the memory decoder is skipped;
- on CUDA that step is captured once as a CUDA graph and replayed (no Python or launches per layer),
  the memory decoder on a second stream beside the base model (at small batches neither fills the
  GPU, so the decoder's layers run in the base model's shadow), and the loop checks whether every sequence has
  finished only every ``sync_every`` steps, then
  drops the steps past the end (their tokens would all be padding).

Greedy decoding and sampling (temperature, top-k, top-p and every other logits processor, EOS and
padding, left-padded batches) are supported. Beam search, assisted decoding, several sequences per
prompt, streamers, ``return_dict_in_generate`` and caches passed in fall back to
``joint.generate(...)`` with a one-time warning saying why; so do models whose attention is neither
``sdpa`` nor ``eager`` and caches with sliding-window or linear layers.

``fast_scorer(joint)`` is ``joint.scorer()`` with the two forwards on two CUDA streams.

A joint model with a token router (``joint.router``: λ_t per position) falls back to the eager path in
both (``generate`` with its one-time warning, ``fast_scorer`` silently: the same values either way):
the captured step mixes at one λ, and never stands in for the router's λ_t.

On the CPU the loop is exact but not faster than ``generate`` (no launches to save, and every step
attends over all static slots); measurements in docs/benchmarks-gpu.md.

Sampling draws from the global torch generator exactly as ``generate`` does, so a seeded call gives
the same tokens. (On CUDA the last ``sync_every`` steps past the end may draw more numbers than
``generate`` would, so a *second* seeded call can differ; on the CPU the loop checks every step.)
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin, StaticCache
from transformers.generation.configuration_utils import GenerationMode

from .errors import MemdecError
from .scoring import causal_lm_logits, mix_logprobs, scale_logits, target_logprobs
from .joint import MemoryDecoderModel

__all__ = ["FastJointGenerator", "fast_generate", "fast_scorer"]

_SUPPORTED_ATTENTION = ("sdpa", "eager")
_FALLBACK_ARGS = {  # generate() arguments that the fast loop does not handle, and why
    "streamer": "a streamer",
    "assistant_model": "assisted decoding",
    "prefix_allowed_tokens_fn": None,  # fine: a logits processor
    "synced_gpus": "synced_gpus",
    "custom_generate": "a custom_generate",
    "cache": "a cache passed in",
    "past_key_values": "a cache passed in",
    "inputs_embeds": "inputs_embeds",
    "negative_prompt_ids": "classifier-free guidance",
}


@dataclass
class _State:
    """Static caches, input buffers and (on CUDA) the captured step for one (batch, slots) shape."""

    batch: int
    slots: int
    caches: dict[str, StaticCache]
    masks: dict[str, torch.Tensor]  # per model: [B, 1, 1, slots], bool (sdpa) or additive float (eager)
    tok: torch.Tensor  # [B, 1] long: the token to feed
    pos: torch.Tensor  # [B, 1] long: its position id
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    out: torch.Tensor | None = None  # the graph's output: mixed log-probs [B, V] float32
    graph_error: str | None = None
    two_streams: bool = False


class StaticSteps:
    """The static side of ``FastJointGenerator``: per (batch, slots) shape, the models' ``StaticCache`` objects, the
    4D masks over their slots and the input buffers (``_State``), one decode step of both models mixed
    (``_step``) and its capture as a CUDA graph (``_capture``). Needs ``joint``, ``streams``, ``max_states``,
    ``_states`` and ``_warned`` (``FastJointGenerator.__init__`` sets them)."""

    joint: MemoryDecoderModel
    streams: bool
    max_states: int
    _states: dict[tuple, _State]
    _warned: set[str]

    def _models(self) -> dict[str, torch.nn.Module]:
        joint = self.joint
        return {"base": joint.base} if joint.lmbda == 0.0 else {"base": joint.base, "memdec": joint.memdec}

    def _state(self, batch: int, slots: int, device: torch.device) -> _State:
        models = self._models()
        key = (batch, slots, str(device), tuple(models), tuple(id(m) for m in models.values()))
        state = self._states.get(key)
        if state is None:
            while len(self._states) >= self.max_states:
                self._states.pop(next(iter(self._states)))
            masks = {}
            for which, model in models.items():
                if model.config._attn_implementation == "sdpa":
                    masks[which] = torch.zeros((batch, 1, 1, slots), dtype=torch.bool, device=device)
                else:
                    dtype = next(model.parameters()).dtype
                    masks[which] = torch.full((batch, 1, 1, slots), torch.finfo(dtype).min, dtype=dtype, device=device)
            caches = {which: StaticCache(config=model.config, max_cache_len=slots) for which, model in models.items()}
            state = _State(batch, slots, caches, masks,
                           tok=torch.zeros((batch, 1), dtype=torch.long, device=device),
                           pos=torch.zeros((batch, 1), dtype=torch.long, device=device))
            self._states[key] = state
        else:  # most recently used last
            self._states[key] = self._states.pop(key)
        return state

    @staticmethod
    def _open(state: _State, which: str, slot) -> None:
        """Let every query attend to cache slot(s) ``slot`` of model ``which``."""
        mask = state.masks[which]
        if mask.dtype == torch.bool:
            mask[..., slot] = True
        else:
            mask[..., slot] = 0.0

    def _step(self, state: _State, side=None) -> torch.Tensor:
        """One decode step of both models on ``state.tok``: mixed log-probs [B, V] float32.
        ``side``: a CUDA stream that runs the memory decoder while the current stream runs the base."""
        joint = self.joint
        logits = {}

        def run(which: str, model) -> None:
            kw = joint._model_kwargs(which, state.masks[which], state.pos, 1)
            logits[which] = model(input_ids=state.tok, cache=state.caches[which], use_cache=True, **kw).logits[:, -1]

        models = self._models()
        if side is not None and "memdec" in models:
            main = torch.cuda.current_stream()
            side.wait_stream(main)  # fork: the decoder sees this step's token, mask and position
            with torch.cuda.stream(side):
                run("memdec", models["memdec"])
            run("base", models["base"])
            main.wait_stream(side)  # join
        else:
            for which, model in models.items():
                run(which, model)
        return self._mix(logits)

    def _mix(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        if "memdec" not in logits:  # λ = 0: what mix_logits returns, without running the decoder
            return torch.log_softmax(logits["base"].float(), dim=-1)
        return self.joint.mix_logits(logits["base"], logits["memdec"])

    def _capture(self, state: _State, seen: int) -> None:
        """Capture ``_step`` as a CUDA graph (two streams, else one). The warm-up steps write cache slot
        ``seen``; the cache lengths are put back to ``seen`` after, and the slot is rewritten before use."""
        errors = []
        for side in ([torch.cuda.Stream()] if self.streams else []) + [None]:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._step(state, side)
                        self._rewind(state, seen)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = self._step(state, side)
                self._rewind(state, seen)
                state.graph, state.out, state.two_streams = graph, out, side is not None
                break
            except Exception as exc:  # noqa: BLE001 - any capture failure: try one stream, then eager steps
                torch.cuda.synchronize()
                self._rewind(state, seen)
                errors.append(f"{'two streams' if side is not None else 'one stream'}: {type(exc).__name__}: {exc}")
        if errors:
            state.graph_error = "; ".join(errors)
            how = "one stream" if state.graph is not None else "static caches, eager steps"
            why = f"CUDA graph capture failed ({state.graph_error}); decoding with {how}"
            if why not in self._warned:
                self._warned.add(why)
                warnings.warn(why, stacklevel=4)

    @staticmethod
    def _rewind(state: _State, seen: int) -> None:
        for cache in state.caches.values():
            for layer in cache.layers:
                layer.cumulative_length.fill_(seen)


class FastJointGenerator(StaticSteps):
    """Decode with a ``MemoryDecoderModel`` through static caches and (on CUDA) one CUDA graph per shape.

    joint: the MemoryDecoderModel (its λ and temperature are read at each call; the two models must
        not change while the generator holds graphs of them).
    cuda_graphs: capture the decode step on CUDA (default: True on CUDA, off elsewhere).
    streams: inside the captured step, run the memory decoder on a second CUDA stream, beside the
        base model (default True): at small batch sizes neither model fills the GPU, so the
        decoder's layers hide in the base model's.
    sync_every: how many steps run between checks that every sequence has finished (each check waits
        for the device); default 16 on CUDA, 1 elsewhere.
    max_states: how many (batch, length) shapes keep their caches and graphs (oldest dropped first).

    ``generate(input_ids, attention_mask=None, **generate_kwargs)`` returns what
    ``joint.generate(...)`` returns: the token ids [B, L + new]. ``last_path`` says what the last
    call used: "graph", "static" (static caches, eager steps) or "fallback".
    """

    def __init__(self, joint: MemoryDecoderModel, *, cuda_graphs: bool | None = None, streams: bool = True,
                 sync_every: int | None = None, max_states: int = 2):
        if not isinstance(joint, MemoryDecoderModel):
            raise MemdecError(f"FastJointGenerator needs a MemoryDecoderModel, got {type(joint).__name__}")
        if sync_every is not None and sync_every < 1:
            raise MemdecError(f"sync_every must be at least 1, got {sync_every}")
        self.joint = joint
        self.cuda_graphs = cuda_graphs
        self.streams = streams
        self.sync_every = sync_every
        self.max_states = max_states
        self.last_path: str | None = None
        self._states: dict[tuple, _State] = {}
        self._warned: set[str] = set()

    # -- public ------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``joint.generate(input_ids, attention_mask=..., **kwargs)``, decoded on the fast path where it applies."""
        why = self._unsupported(input_ids, kwargs)
        if why is not None:
            return self._fallback(why, input_ids, attention_mask, kwargs)
        self.last_path = None
        return self.joint.generate(input_ids, attention_mask=attention_mask, custom_generate=self._decode, **kwargs)

    __call__ = generate

    def reset(self) -> None:
        """Free every static cache and captured graph."""
        self._states.clear()

    # -- deciding ----------------------------------------------------------------------------

    def _unsupported(self, input_ids, kwargs: dict) -> str | None:
        """Why the fast loop cannot serve this call, or None."""
        for name, why in _FALLBACK_ARGS.items():
            if why is not None and kwargs.get(name) is not None and kwargs.get(name) is not False:
                return why
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            return "input_ids must be a 2D tensor"
        if self.joint.router is not None:  # the captured step mixes at one λ; λ_t per position is the eager path's
            return "a token router (λ_t per position; the fast step mixes at one fixed λ)"
        for which in ("base", "memdec"):
            model = getattr(self.joint, which)
            impl = getattr(model.config, "_attn_implementation", None) or "eager"
            if impl not in _SUPPORTED_ATTENTION:
                supported = ", ".join(_SUPPORTED_ATTENTION)
                return f"the {which} model's attention is {impl!r} (the fast path supports {supported})"
            kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
            if kinds - {"full_attention"} or getattr(model.config, "sliding_window", None):
                return f"the {which} model has layers other than full attention ({sorted(kinds)})"
        gen_kwargs = {k: v for k, v in kwargs.items() if k not in ("logits_processor", "stopping_criteria")}
        config, _ = self.joint._prepare_generation_config(gen_kwargs.pop("generation_config", None), **gen_kwargs)
        mode = config.get_generation_mode()
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            return f"{mode.value.replace('_', ' ')} (the fast path does greedy decoding and sampling)"
        if config.num_return_sequences not in (None, 1):
            return "num_return_sequences > 1"
        if config.return_dict_in_generate:
            return "return_dict_in_generate"
        if config.cache_implementation not in (None, "dynamic", "static"):
            return f"cache_implementation={config.cache_implementation!r}"
        if config.use_cache is False:
            return "use_cache=False"
        return None

    def _fallback(self, why: str, input_ids, attention_mask, kwargs: dict):
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"memdec fast path not used: {why}; falling back to MemoryDecoderModel.generate",
                          stacklevel=3)
        self.last_path = "fallback"
        if attention_mask is not None:
            kwargs = {**kwargs, "attention_mask": attention_mask}
        return self.joint.generate(input_ids, **kwargs)

    # -- the decoding loop (generate's custom_generate) --------------------------------------

    @torch.no_grad()
    def _decode(self, model, input_ids, logits_processor, stopping_criteria, generation_config,
                synced_gpus: bool = False, streamer=None, **model_kwargs):
        if synced_gpus or streamer is not None:  # ruled out before; kept as a guard
            self.last_path = "fallback"
            return GenerationMixin._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                           synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        device = input_ids.device
        batch, length = input_ids.shape
        max_length = int(generation_config.max_length)
        slots = max(max_length - 1, length)
        attention_mask = model_kwargs.get("attention_mask")  # None: no padding
        position_ids = model_kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None]
        state = self._state(batch, slots, device)
        models = self._models()

        # prefill: the whole prompt, eagerly, into the static caches
        for cache in state.caches.values():
            cache.reset()
        logits = {}
        for which, m in models.items():
            kw = self.joint._model_kwargs(which, attention_mask, position_ids, 1)
            out = m(input_ids=input_ids, cache=state.caches[which], use_cache=True, **kw)
            logits[which] = out.logits[:, -1]
        logp = self._mix(logits)
        del logits, out
        for which, mask in state.masks.items():
            if mask.dtype == torch.bool:
                mask.zero_()
            else:
                mask.fill_(torch.finfo(mask.dtype).min)
            prompt = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            opened = prompt[:, None, None, :] if mask.dtype == torch.bool else \
                torch.where(prompt, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)[:, None, None, :]
            mask[..., :length] = opened
        state.pos.copy_((position_ids[:, -1:] + 1).expand(batch, 1))

        use_graph = device.type == "cuda" and self.cuda_graphs is not False and max_length - length > 1
        sync_every = self.sync_every or (16 if device.type == "cuda" else 1)
        pad = generation_config._pad_token_tensor
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        do_sample = bool(generation_config.do_sample)
        ids = torch.empty((batch, max_length), dtype=torch.long, device=device)
        ids[:, :length] = input_ids
        unfinished = torch.ones(batch, dtype=torch.long, device=device)
        all_done = torch.zeros(max_length - length, dtype=torch.bool, device=device)
        end = max_length
        path = "static"
        for cur in range(length, max_length):
            step = cur - length
            scores = logp.to(copy=True, dtype=torch.float32) if len(logits_processor) else logp
            scores = logits_processor(ids[:, :cur], scores)
            if do_sample:
                next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(scores, dim=-1)
            if has_eos:
                next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
            ids[:, cur] = next_tokens
            unfinished = unfinished & ~stopping_criteria(ids[:, : cur + 1], None)
            all_done[step] = unfinished.max() == 0
            if cur + 1 == max_length:
                break
            if (step + 1) % sync_every == 0 and bool(all_done[step]):
                break
            # feed the new token: it goes into cache slot `cur`
            state.tok.copy_(next_tokens[:, None])
            for which in state.masks:
                self._open(state, which, cur)
            if use_graph and state.graph is None and not state.graph_error:
                self._capture(state, seen=cur)
            if use_graph and state.graph is not None:
                state.graph.replay()
                logp = state.out
                path = "graph"
            else:
                logp = self._step(state)
            state.pos.add_(1)
        done = torch.nonzero(all_done[: cur - length + 1])
        if len(done):
            end = length + int(done[0, 0]) + 1
        self.last_path = path
        return ids[:, :end]


def fast_scorer(joint: MemoryDecoderModel, lmbda: float | None = None):
    """``joint.scorer(lmbda)`` with the memory decoder's forward on a second CUDA stream, beside the
    base model's; the same operations, so the same values. Elsewhere than CUDA: ``joint.scorer``."""
    eager = joint.scorer(lmbda)
    if joint.router is not None and lmbda is None:  # λ_t per position: the eager scorer's, never a fixed λ
        return eager
    lmbda = joint.lmbda if lmbda is None else lmbda
    side: list = []

    @torch.inference_mode()
    def score(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if input_ids.device.type != "cuda" or lmbda == 0.0:
            return eager(input_ids, targets)
        if not side:
            side.append(torch.cuda.Stream(device=input_ids.device))
        main = torch.cuda.current_stream(input_ids.device)
        side[0].wait_stream(main)
        n = targets.shape[1]
        with torch.cuda.stream(side[0]):
            mem_logits = scale_logits(causal_lm_logits(joint.memdec, input_ids, n), joint.temperature)
            lp_mem = target_logprobs(mem_logits, targets)
            del mem_logits
        lp_base = target_logprobs(causal_lm_logits(joint.base, input_ids, n), targets)
        main.wait_stream(side[0])
        lp_mem.record_stream(main)
        return mix_logprobs(lp_base, lp_mem, lmbda)

    return score


_GENERATORS: "weakref.WeakKeyDictionary[MemoryDecoderModel, FastJointGenerator]" = weakref.WeakKeyDictionary()


def fast_generate(joint: MemoryDecoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  **generate_kwargs) -> torch.Tensor:
    """``joint.generate(...)`` through a ``FastJointGenerator`` kept per joint model (its caches and
    CUDA graphs are reused by later calls with the same batch size and length)."""
    gen = _GENERATORS.get(joint)
    if gen is None:
        gen = _GENERATORS[joint] = FastJointGenerator(joint)
    return gen.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)
