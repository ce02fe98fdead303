"""The presets (``PRESETS``: the value of every option the user leaves out) and ``Settings``, the
resolved values per stage (``resolve_settings``), checked whole by ``check_config``."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import asdict, dataclass

from ..errors import MemdecError
from ..store import DEFAULT_K, DEFAULT_KNN_TEMP
from ..transfer import INITS
from .options import (DEFAULT_DECODER, LORA_LR_SCALE, TRANSFER_BUDGET, AdaptConfig, BaselineInputs, DatastoreInputs,
                      EvalInputs, RouterInputs, RunInputs, SampleInputs, TaskInputs, TrainInputs, TransferInputs,
                      check_fields, full_model_decoder)


@dataclass
class Preset:
    """A preset: the value of every stage option that the user leaves out, and of those no flag sets."""

    train_tokens: int | None
    valid_tokens: int
    test_tokens: int
    k: int
    knn_temp: float
    ds_block_size: int
    ds_stride: int
    init_layers: int | None
    alpha: list[float]
    lr: float
    epochs: float
    batch_size: int
    train_block_size: int
    eval_every: int
    eval_block_size: int
    eval_stride: int
    samples: int
    sample_tokens: int
    task_items: int
    router_tokens: int = 32_768


PRESETS: dict[str, Preset] = {
    # Fits 15 minutes of wall time on a 2-core CPU with the default model, set-up included.
    "quick": Preset(train_tokens=24_000, valid_tokens=2_048, test_tokens=4_096, k=DEFAULT_K, knn_temp=DEFAULT_KNN_TEMP,
                    ds_block_size=1024, ds_stride=768, init_layers=None, alpha=[0.25, 0.0], lr=2e-4, epochs=1.0,
                    batch_size=4, train_block_size=512, eval_every=3, eval_block_size=1024, eval_stride=512, samples=3,
                    sample_tokens=40, task_items=0,  # lm-eval tasks: opt in with --task-items on a CPU
                    router_tokens=4_096),  # the router stage: about a minute of the quick run's 15 (docs/router.md)
    # The whole training split; meant for a GPU.
    "full": Preset(train_tokens=None, valid_tokens=32_768, test_tokens=32_768, k=DEFAULT_K, knn_temp=DEFAULT_KNN_TEMP,
                   ds_block_size=1024, ds_stride=512, init_layers=None, alpha=[0.25, 0.0], lr=1e-4, epochs=2.0,
                   batch_size=8, train_block_size=1024, eval_every=50, eval_block_size=1024, eval_stride=512, samples=5,
                   sample_tokens=60, task_items=500),
}


@dataclass
class Settings:
    """The resolved settings of a run, per stage: the preset's values with the user's overrides on top.
    ``s.lora_r`` reads any stage's option by its (unique) name: ``s.baseline.lora_r``."""

    run: RunInputs
    datastore: DatastoreInputs
    train: TrainInputs
    eval: EvalInputs
    baseline: BaselineInputs
    tasks: TaskInputs
    sample: SampleInputs
    transfer: TransferInputs
    token_router: RouterInputs

    def __getattr__(self, name: str):
        if not name.startswith("_"):
            for stage in STAGES:
                if stage in self.__dict__ and name in OPTION_STAGE.get(stage, ()):
                    return getattr(self.__dict__[stage], name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}")

    def flat(self) -> dict:
        """Every setting under its own name: ``RUN/settings.json`` and the report's ``settings``."""
        return {k: v for stage in STAGES for k, v in asdict(getattr(self, stage)).items()}


STAGES: dict[str, type] = {f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)}
OPTION_STAGE: dict[str, set[str]] = {stage: {f.name for f in dataclasses.fields(cls)} for stage, cls in STAGES.items()}
assert sum(map(len, OPTION_STAGE.values())) == len(set().union(*OPTION_STAGE.values())), "an option named twice"
assert not set(STAGES) & set().union(*OPTION_STAGE.values()), "a stage named like an option"


def resolve_settings(cfg: AdaptConfig) -> Settings:
    """Each stage's settings: the user's value, else the preset's, else the option's ``fallback``."""
    if cfg.preset not in PRESETS:
        raise MemdecError(f"unknown --preset '{cfg.preset}' (choose from: {', '.join(PRESETS)})")
    preset = asdict(PRESETS[cfg.preset])  # a deep copy: no run shares the preset's lists
    values = {}
    for cls in STAGES.values():
        for f in dataclasses.fields(cls):
            given = getattr(cfg, f.name, None)
            values[f.name] = given if given is not None else preset.get(f.name)
            if values[f.name] is None and f.metadata["fallback"] is not None:
                values[f.name] = copy.copy(f.metadata["fallback"])
    if cfg.block_size is not None:
        b = cfg.block_size
        values.update(ds_block_size=b, ds_stride=max(b // 2, 1), eval_block_size=b, eval_stride=max(b // 2, 1),
                      train_block_size=min(values["train_block_size"], b))
    if values["train_tokens"] == 0:
        values["train_tokens"] = None
    if str(values["general"]).lower() in ("", "none"):
        values["general"] = None
    values["baselines"] = bool(values["baselines"])
    if values["general_tokens"] is None:
        values["general_tokens"] = values["test_tokens"]
    if values["decoder"] is None:
        values["decoder"] = DEFAULT_DECODER
    if values["lora_lr"] is None:
        values["lora_lr"] = LORA_LR_SCALE * values["lr"]
    if values["transfer_from"] is not None and values["transfer_budget"] is None and values["max_steps"] is None:
        values["transfer_budget"] = TRANSFER_BUDGET
    for split in ("valid", "test"):
        if values[split] == values["corpus"]:
            raise MemdecError(f"--{split} is the training corpus; held-out text must not be trained on")
    return Settings(**{stage: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
                       for stage, cls in STAGES.items()})


def check_config(s: Settings) -> None:
    """Every resolved setting checked, one clear line each: before any model loads or file is written.
    Each option's own check is declared beside its field; here are those that relate two options."""
    for stage in STAGES:
        check_fields(getattr(s, stage))
    if s.init is not None and s.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")
    if not s.alpha:
        raise MemdecError("--alpha needs at least one value in [0, 1]")
    if s.two_phase and not full_model_decoder(s.decoder):
        raise MemdecError(f"--two-phase starts its second phase from the first one's checkpoint (--init), which "
                          f"--decoder copy alone takes: drop --two-phase or use --decoder copy, not {s.decoder}")
    if s.two_phase and s.max_steps is not None and s.max_steps < 2:
        raise MemdecError(f"--two-phase splits the steps in two: --max-steps must be at least 2, got {s.max_steps}")
    _check_transfer_options(s)


def _check_transfer_options(s: Settings) -> None:
    """--transfer-from and its options: one clear line each, before anything loads."""
    if s.transfer_from is None:
        if s.transfer_budget is not None or s.transfer_init != "mapped":
            raise MemdecError("--transfer-budget and --transfer-init need --transfer-from")
        return
    if s.transfer_init not in INITS:
        raise MemdecError(f"unknown --transfer-init '{s.transfer_init}' (mapped or random)")
    if s.two_phase:
        raise MemdecError("--two-phase trains a decoder from the base; --transfer-from starts from the source "
                          "decoder instead: give one or the other")
    if s.init is not None or s.init_layers is not None:
        raise MemdecError("--init and --init-layers choose a decoder trained from the base; --transfer-from "
                          "starts from the source decoder instead: give one or the other")
    if s.transfer_budget is not None and s.max_steps is not None:
        raise MemdecError("--transfer-budget and --max-steps both set the transfer's length: give one")
    if s.transfer_budget is not None and not (math.isfinite(s.transfer_budget) and 0 < s.transfer_budget <= 100):
        raise MemdecError(f"--transfer-budget must be a positive fraction of the source's training, "
                          f"got {s.transfer_budget}")
