"""Forward hooks and the router's log-weights: what the joint model and the logits processor record
while the two models run (final hidden states, a shared trunk's per-block arguments)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..router import _device_of, router_log_weights  # noqa: F401  (re-exported: their owner is memdec.router)


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

