"""Baseline methods are plugins: the registry lists the built-in methods in row order, checkpoint
names none of them, and a method defined here (BitFit on a tiny model: only the norm weights
train, the whole of it in this file) is trained by ``train_baseline``, loaded by ``load_baseline``
and scored by ``memdec eval --baseline`` exactly as its saved model scores directly."""

import ast
import dataclasses
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import memdec.checkpoint
from memdec.baselines import (BASELINE_HELP, METHODS, BaselineConfig, BaselineOptions, BaselineRecipe, LoraOptions,
                              Method, get_method, load_baseline, method_names, register, train_baseline, unregister)
from memdec.checkpoint import load_model_folder
from memdec.cli import build_parser, config_from_args, main
from memdec.data import load_token_stream
from memdec.errors import MemdecError
from memdec.scoring import base_scorer, score_tokens

BUILT_IN = ("ce-decoder", "dapt", "lora")  # today's row order


def test_the_registry_lists_exactly_the_built_in_methods_in_row_order():
    assert method_names() == BUILT_IN
    assert [get_method(m).alone for m in BUILT_IN] == [False, True, True]  # ce-decoder is mixed with λ
    assert [get_method(m).row_label for m in BUILT_IN] == list(BUILT_IN)
    assert [get_method(m).takes_init for m in BUILT_IN] == [True, False, False]
    assert BASELINE_HELP["method"] == (
        "ce-decoder (the memory decoder's recipe with alpha=0 (cross-entropy only), interpolated with the base), "
        "dapt (full fine-tuning of the base model) or lora (LoRA adapters (peft) on the frozen base model)")
    # BaselineConfig: memdec train's fields (datastore, alpha in place), then the shared ones, then lora's:
    # the order of train_config in baseline.json and of the run fingerprint, as before the registry
    assert [f.name for f in dataclasses.fields(BaselineConfig)][-9:] == [
        "method", "model", "corpus", "max_tokens", "text_field", "lora_r", "lora_alpha", "lora_dropout", "lora_targets"]
    assert BaselineConfig(method="dapt", out="o").datastore is None
    with pytest.raises(MemdecError, match=r"unknown --method 'sft' \(choose from: ce-decoder, dapt, lora\)"):
        get_method("sft")
    with pytest.raises(ValueError, match="registered already"):
        register(get_method("dapt"))


def test_the_lora_flags_parse_as_before():
    args = build_parser().parse_args(
        [
            "baseline",
            "--method",
            "lora",
            "--datastore",
            "ds",
            "--out",
            "o",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-dropout",
            "0.1",
            "--lora-targets",
            "q_proj",
            "v_proj",
        ]
    )
    cfg = config_from_args(BaselineConfig, args)
    assert (cfg.method, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) == ("lora", 4, 8.0, 0.1,
                                                                                          ["q_proj", "v_proj"])
    assert isinstance(cfg, BaselineConfig) and cfg.alpha == 0.0 and cfg.init is None


def test_checkpoint_names_no_method():
    """checkpoint sits below baselines: the method names reach it from its callers only."""
    tree = ast.parse(inspect.getsource(memdec.checkpoint))
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    shapes = set(memdec.checkpoint.DECODER_RECORDS)  # decoder shapes ("lora": adapters in the decoder) are its own
    assert not ({"ce-decoder", "dapt", "lora", "adapter_model.safetensors"} - shapes) & literals
    assert "METHODS" not in vars(memdec.checkpoint)


def test_a_method_with_options_cannot_come_after_the_config_is_built():
    @dataclasses.dataclass(kw_only=True)
    class LateOptions:
        late_k: int = dataclasses.field(default=1, metadata={"help": "k"})

    class Late(Method):
        name = "late"
        options = LateOptions

    assert [(o.name, o.default, o.help) for o in Late().extra_options] == [("late_k", 1, "k")]
    with pytest.raises(ValueError, match="brings options .late_k. that BaselineConfig does not hold: add LateOptions"):
        register(Late())
    assert "late" not in method_names()


def test_the_config_is_a_visible_dataclass_holding_each_methods_options():
    """BaselineConfig is written out (config.py): memdec train's fields, the shared ones, then each method's
    options class among its bases, whose fields and help are the flags'."""
    assert issubclass(BaselineConfig, BaselineOptions) and issubclass(BaselineConfig, LoraOptions)
    assert [o.name for o in get_method("lora").extra_options] == [f.name for f in dataclasses.fields(LoraOptions)]
    assert BASELINE_HELP["lora_r"] == "LoRA rank" and BaselineConfig(method="lora", out="o").lora_r == 8
    assert [m.options for m in METHODS.values()] == [None, None, LoraOptions]


# --- a method of this test's own: BitFit-style, only the norm weights train ----------------------


class NormsOnlyRecipe(BaselineRecipe):
    """A full copy of the base with every weight frozen but the RMSNorm scales."""

    def init_model(self, cfg, manifest):
        model, tokenizer = super().init_model(cfg, manifest)
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)
        return model, tokenizer


class NormsOnly(Method):
    name = "norms-only"
    description = "the base model with only its norm weights trained"
    order = 40

    def recipe(self, cfg):
        return NormsOnlyRecipe(self)

    def load(self, path, base_spec, base_model, tokenizer):
        return load_model_folder(path, "the norms-only baseline", base_model.dtype).to(base_model.device).eval()


@pytest.fixture
def norms_only():
    method = register(NormsOnly())
    yield method
    unregister(method.name)


def test_a_method_of_this_file_trains_loads_and_scores_as_its_model(norms_only, store, tiny_llama_dir, tokenizer,
                                                                     tmp_path):
    assert method_names() == (*BUILT_IN, "norms-only")
    out = train_baseline(
        BaselineConfig(
            method="norms-only",
            datastore=str(store),
            out=str(tmp_path / "nb"),
            max_steps=3,
            batch_size=2,
            block_size=32,
            lr=5e-2,
            warmup=1,
            save_every=3,
            seed=0,
            device="cpu",
        )
    )
    info = json.loads((out / "baseline.json").read_text())
    base = load_file(Path(tiny_llama_dir) / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    norms = [k for k in base if "norm" in k]
    assert info["method"] == "norms-only" and info["lambda"] is None and not (out / "memdec.json").exists()
    assert info["trainable_parameters"] == sum(base[k].numel() for k in norms)
    assert all(torch.equal(base[k], trained[k]) for k in base if k not in norms)  # the rest stayed frozen
    assert any(not torch.equal(base[k], trained[k]) for k in norms)  # and it did learn

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    loaded = load_baseline(out, str(tiny_llama_dir), model, tokenizer)
    assert (loaded.method, loaded.alone, loaded.row_label) == ("norms-only", True, "norms-only")

    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--corpus", "austen:test", "--max-tokens", "200",
                 "--block-size", "32", "--device", "cpu", "--baseline", str(out), "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["results"]
    assert [r["system"] for r in rows] == ["base", "norms-only"]
    tokens = load_token_stream("austen:test", tokenizer, 200)
    direct = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    nll, _ = score_tokens(base_scorer(direct), tokens, 32, 16, progress=False)
    assert math.isclose(rows[1]["nll"], float(np.mean(nll, dtype=np.float64)), rel_tol=1e-6)
    assert rows[1]["lambda"] is None and rows[1]["trainable_parameters"] == info["trainable_parameters"]
    assert rows[1]["nll"] != rows[0]["nll"]
