"""Each option declared once (``memdec.options``): the help and check of an option offered by several commands
come from the stage's config that owns it; ``memdec transfer`` composes a ``TrainConfig`` and keeps its old flags;
and one versioned fingerprint rule gives every training run the fingerprint the earlier clauses gave it."""

import dataclasses
import hashlib
import json
from dataclasses import asdict

import pytest

from memdec import adapt
from memdec.baselines import BaselineConfig
from memdec.baselines.lora import LORA_R, LoraOptions
from memdec.cli import build_parser, config_from_args, main
from memdec.datastore import DatastoreConfig
from memdec.decoders import is_full_copy
from memdec.errors import MemdecError
from memdec.options import declared, fingerprint, fingerprint_fields, help_of, option, option_from, since_first
from memdec.train import TRAIN_HELP, TrainConfig, check_config, run_fingerprint
from memdec.transfer import TRANSFER_HELP, TransferConfig


def old_run_fingerprint(cfg, manifest_hash, init_hash=None, lr_scale=1.0) -> str:
    """train/plan.py's run_fingerprint before the versioned rule (its compatibility clauses), verbatim."""
    keep = asdict(cfg)
    for k in ("out", "device", "resume", "log_every", "eval_every", "save_every", "patience", "keep_trainer_state",
              "save_dtype"):
        keep.pop(k)
    if is_full_copy(keep["decoder"]):
        keep.pop("decoder")
    if not keep["teacher_base_weight"]:
        keep.pop("teacher_base_weight")
    if init_hash is not None:
        keep["init_hash"] = init_hash
    if lr_scale != 1.0:
        keep["lr_scale"] = lr_scale
    keep["datastore_manifest_hash"] = manifest_hash
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(kw_only=True)
class FlatTransferConfig(TrainConfig):
    """The shape TransferConfig had before it was composed (a TrainConfig subclass redefining decoder and init)."""

    decoder: str
    model: str
    init: str = "mapped"
    budget: float | None = None
    freeze_body_steps: int = 0


TRAIN = dict(datastore="ds", out="o")


@pytest.mark.parametrize("cfg, init_hash, lr_scale", [
    (TrainConfig(**TRAIN), None, 1.0),
    (TrainConfig(**TRAIN, device="cpu", patience=3, save_dtype="bfloat16", keep_trainer_state=True), None, 1.0),
    (TrainConfig(**TRAIN, decoder="lora:16", teacher_base_weight=0.5), None, 10.0),
    (TrainConfig(**TRAIN, init="some/model", lambdas=[0.5]), "abc123", 1.0),
    (BaselineConfig(method="lora", out="o", datastore="ds", lora_r=4), None, 1.0),
    (BaselineConfig(method="dapt", out="o", model="m", corpus="c", max_tokens=100), None, 1.0),
])
def test_run_fingerprints_are_those_of_the_earlier_clauses(cfg, init_hash, lr_scale):
    new = run_fingerprint(cfg, "m" * 16, init_hash, lr_scale)
    assert new == old_run_fingerprint(cfg, "m" * 16, init_hash, lr_scale)


@pytest.mark.parametrize("own", [{}, dict(init="random", budget=0.25, freeze_body_steps=2, teacher_base_weight=0.5)])
def test_a_composed_transfer_keeps_the_fingerprint_and_record_of_the_flat_one(own):
    flat = dict(decoder="src/ckpt", model="gemma", datastore="ds", out="o", max_steps=3, lr=1e-3, **own)
    cfg = TransferConfig.from_flat(**flat)
    assert (cfg.source, cfg.new_rows, cfg.train.decoder, cfg.train.init) == (
        "src/ckpt", own.get("init", "mapped"), "copy", None)
    old = FlatTransferConfig(**flat)
    assert run_fingerprint(cfg.train, "h" * 16, options=cfg.flat()) == old_run_fingerprint(old, "h" * 16)
    record = {**asdict(cfg.train), **cfg.flat()}  # Trainer.options: memdec.json's train_config
    assert list(record.items()) == list(asdict(old).items())  # the same keys, in the same order


def test_one_rule_for_entries_added_later():
    assert since_first({"a": 1, "b": None, "c": [0.0]}, {"b": None, "c": [0.0]}) == {"a": 1}
    assert since_first({"a": 1, "b": 2, "c": []}, {"b": None, "c": [0.0]}) == {"a": 1, "b": 2, "c": []}
    payload = {"x": 1, "later": 0.0}
    assert fingerprint(payload, {"later": 0.0}) == fingerprint({"x": 1}) != fingerprint(payload)
    assert len(fingerprint(payload, length=12)) == 12
    fields = fingerprint_fields(TrainConfig(**TRAIN))
    assert "out" not in fields and "device" not in fields and "decoder" not in fields and fields["lr"] == 1e-4
    assert fingerprint_fields(TrainConfig(**TRAIN, decoder="fork:2"))["decoder"] == "fork:2"
    assert fingerprint_fields(TrainConfig(**TRAIN), omit_unchanged=False)["decoder"] == "copy"


def test_an_offered_option_takes_its_help_and_check_from_its_owner():
    assert adapt.AdaptConfig.__dataclass_fields__["lr"].metadata["help"] == TRAIN_HELP["lr"]
    assert declared(adapt.AdaptConfig, "k").metadata["help"] == help_of(DatastoreConfig)["k"]
    lora_r = declared(adapt.AdaptConfig, "lora_r")
    assert lora_r.metadata["check"] is declared(LoraOptions, "lora_r").metadata["check"]
    assert lora_r.metadata["help"] == f"--baselines: LoRA rank (default {LORA_R})" and lora_r.default is None
    assert adapt.resolve_settings(adapt.AdaptConfig()).lora_r == LORA_R == BaselineConfig(method="lora", out="o").lora_r

    @dataclasses.dataclass
    class Offers:
        alpha: list[float] | None = option_from(TrainConfig, "alpha", None, each=True, help="{help}; several ok")
        note: int = option("mine", 3, check=lambda v, what: v)

    f = declared(Offers, "alpha")
    assert f.metadata["help"] == TRAIN_HELP["alpha"] + "; several ok" and f.default is None
    assert f.metadata["key"] is None and f.metadata["identity"]  # the fingerprint rule is the offering config's
    with pytest.raises(KeyError, match="no option"):
        option_from(TrainConfig, "nope")


def test_train_checks_come_from_the_declarations():
    for bad, flag in ((dict(alpha=1.5), "--alpha"), (dict(lambdas=[0.5, 2.0]), "--lambdas"),
                      (dict(batch_size=0), "--batch-size"), (dict(save_dtype="int8"), "--save-dtype"),
                      (dict(layer_selection="last"), "--layer-selection"), (dict(valid_max_tokens=1), "--valid-max")):
        with pytest.raises(MemdecError, match=flag):
            check_config(TrainConfig(**TRAIN, **bad))
    with pytest.raises(MemdecError, match="at least one value"):
        check_config(TrainConfig(**TRAIN, lambdas=[]))


def test_transfer_keeps_its_old_flags():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["transfer"]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {"--decoder", "--init", "--model", "--datastore", "--out", "--budget", "--init-layers", "--lr"} <= flags
    args = sub.parse_args(["--decoder", "SRC", "--init", "random", "--model", "M", "--datastore", "D", "--out", "O",
                           "--lr", "0.5"])
    cfg = config_from_args(TransferConfig, args)
    assert (cfg.source, cfg.new_rows, cfg.model, cfg.train.datastore, cfg.train.out, cfg.train.lr) == (
        "SRC", "random", "M", "D", "O", 0.5)
    assert cfg.train.decoder == "copy" and cfg.train.init is None
    assert set(TRANSFER_HELP) == {"source", "model", "train", "new_rows", "budget", "freeze_body_steps"}


def test_a_bad_new_rows_is_one_line(tmp_path, capsys):
    assert main(["transfer", "--decoder", str(tmp_path), "--init", "copy", "--model", "m", "--datastore", "d",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--init 'copy' (mapped or random)" in err and len(err.strip().splitlines()) == 1
