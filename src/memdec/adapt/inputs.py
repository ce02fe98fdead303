"""What each stage depends on (``stage_inputs``): its own options and its upstream stages' inputs,
the payload of its fingerprint in ``RUN/stages.json``."""

from __future__ import annotations

from ..baselines import methods
from ..report import (FACTS_CONTEXT_TOKENS, GENERAL_CONTEXT_WORDS, ROUTER_PLOT_TOKENS, SAMPLING, TASK_CHOICES,
                      TASK_SEED)
from ..transfer import source_fingerprint
from ..options import since_first
from .options import ROUTER_GENERAL, stage_fields
from .presets import Settings

LATER_ENTRIES = {"transfer": None}  # stage inputs added after the first version, and their value before (the one rule:
# memdec.options.since_first); each option's own is declared beside it (``before``)
HELDOUT_TOKENS_PER_ITEM = 200  # the facts task reads this many test tokens per item wanted (at least --test-tokens)


def stage_inputs(s: Settings) -> dict[str, dict]:
    """The settings each stage depends on, its upstream stages' included."""
    datastore = dict(model=s.model, corpus=s.corpus, text_field=s.text_field, **stage_fields(s.datastore))
    transfer = None if s.transfer_from is None else dict(
        source=source_fingerprint(s.transfer_from), budget=s.transfer_budget, init=s.transfer_init)
    train = since_first(dict(datastore=datastore, valid=s.valid, **stage_fields(s.train), transfer=transfer),
                        LATER_ENTRIES)
    # the baselines: the memory decoder's budget (tokens, steps, batch, windows, schedule, validation), alpha=0
    budget = {k: v for k, v in train.items()
              if k not in ("init", "init_layers", "alpha", "teacher_base_weight", "train_budget", "transfer",
                           "two_phase", "decoder")}
    baselines = {m.name: dict(budget, **m.adapt_inputs(s)) for m in methods()}
    evaluation = dict(train=train, test=s.test, valid_tokens=s.valid_tokens, recurring="datastore",
                      **stage_fields(s.eval))
    if s.general:
        evaluation["general"] = s.general
    else:
        del evaluation["general_tokens"]
    if s.baselines:
        evaluation["baselines"] = baselines
    samples = dict(eval=evaluation, test=s.test, sampling=SAMPLING, **stage_fields(s.sample))
    tasks = dict(eval=evaluation, test=s.test, heldout_tokens=task_heldout_tokens(s), general=s.general,
                 seed=TASK_SEED, context_tokens=FACTS_CONTEXT_TOKENS, context_words=GENERAL_CONTEXT_WORDS,
                 n_choices=TASK_CHOICES, **stage_fields(s.tasks))  # text_field: in eval
    router = dict(eval=evaluation, corpus=s.corpus, general=ROUTER_GENERAL, valid=s.valid, valid_tokens=s.valid_tokens,
                  plot_tokens=ROUTER_PLOT_TOKENS, **stage_fields(s.token_router))
    return {"datastore": datastore, "train": train, **baselines, "eval": evaluation, "router": router,
            "samples": samples, "tasks": tasks}


def task_heldout_tokens(s: Settings) -> int | None:
    """Test tokens the facts task reads: enough for ``task_items`` items, never fewer than --test-tokens."""
    if s.test_tokens is None:
        return None
    return max(s.test_tokens, HELDOUT_TOKENS_PER_ITEM * s.task_items)
