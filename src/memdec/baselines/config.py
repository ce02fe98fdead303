"""``BaselineConfig``: the options of ``memdec baseline``, a dataclass that readers and type checkers see.

Its fields, in the order ``baseline.json``'s ``train_config`` and adapt's fingerprints keep them:
``memdec train``'s (``TrainConfig``: the budget), the training tokens and ``method`` (``BaselineOptions``),
then each method's own flags (its ``Method.options`` dataclass, one base each: ``LoraOptions``). A method
with flags of its own adds its options class to ``BaselineConfig``'s bases below; ``fix_options`` (at the
import of ``memdec.baselines``) refuses a registered method whose options are missing here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from ..train import TrainConfig
from .lora import LoraOptions


@dataclass(kw_only=True)
class BaselineOptions(TrainConfig):
    """``memdec train``'s options (the budget: steps, batch, block, lr, schedule, validation) plus the
    training tokens and ``method``: what every method shares."""

    method: str = option("")  # the registered methods' list: BASELINE_HELP
    datastore: str | None = option("train on this datastore's token stream: exactly the memory decoder's tokens", None)
    model: str | None = option("with --corpus: the base model spec", None)
    corpus: str | None = option("instead of --datastore: train on this corpus, tokenized as `memdec datastore` does",
                                None)
    max_tokens: int | None = option("with --corpus: use its first N tokens (as `memdec datastore --max-tokens`)", None)
    text_field: str = option("with --corpus: the JSONL / dataset field that holds the text", "text")
    alpha: float = option("must be 0: the baselines learn next-token cross-entropy only", 0.0)


@dataclass(kw_only=True)
class BaselineConfig(LoraOptions, BaselineOptions):
    """``memdec train``'s options (the budget: steps, batch, block, lr, schedule, validation) plus the
    training tokens, ``method`` and each method's own options (``Method.options``: ``LoraOptions``)."""
