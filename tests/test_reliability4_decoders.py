"""Issue 32 item 2 and issue 36 items 6, 7, 11 and 17: decoder shapes and what a decoder loads with.

A LoRA rank is bounded by the base's layer widths, checked on one line before any allocation (train, adapt,
a memdec.json record); every shape's loaded weights are finite and of a sane size, and its record's numbers
(temperature, LoRA scale) in their ranges, checked once as it loads; a copy decoder's weights are exactly
those of its config; load errors say what is wrong (the record, the adapters, the trunk). Tiny Llama (2
blocks, width 64) from conftest; the decoders are built from it and perturbed, as training would.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memdec.adapt import AdaptConfig, adapt
from memdec.checkpoint import read_memdec_json
from memdec.cli import main
from memdec.decoders import OWN_WEIGHTS, ForkShape, LoraShape, load_decoder, parse_shape
from memdec.errors import MemdecError
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model
from memdec.train import TrainConfig, train

SHAPES = {"copy": None, "fork": ForkShape(1), "lora": LoraShape(4)}
WEIGHTS = {"copy": "model.safetensors", "fork": OWN_WEIGHTS, "lora": OWN_WEIGHTS}


def perturbed(shape, base, seed: int = 0):
    """A decoder of ``shape`` (None: a full copy) built from ``base``, its trainable tensors moved a little."""
    decoder = copy.deepcopy(base) if shape is None else shape.build(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in decoder.parameters():
            if param.requires_grad or shape is None:
                param.add_(torch.randn(param.shape, generator=gen) * 0.01)
    return decoder


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama_dir, base, tokenizer) -> dict[str, Path]:
    """A saved copy, fork:1 and lora:4 checkpoint of the tiny base, by shape name."""
    out = {}
    for name, shape in SHAPES.items():
        folder = tmp_path_factory.mktemp(f"ck-{name}")
        MemoryDecoderModel(base, perturbed(shape, base), lmbda=0.4).save_pretrained(folder, tokenizer=tokenizer)
        info = json.loads((folder / "memdec.json").read_text())
        (folder / "memdec.json").write_text(json.dumps({**info, "base_model": str(tiny_llama_dir)}))
        out[name] = folder
    return out


def variant(checkpoints, name: str, tmp_path: Path, tensors=None, info=None, config=None) -> Path:
    """A copy of the ``name`` checkpoint with its weights (``tensors(dict) -> dict``), memdec.json
    (``info(dict) -> dict``) or config.json (``config(dict) -> dict``) edited."""
    folder = tmp_path / f"{name}-variant"
    shutil.copytree(checkpoints[name], folder)
    for file, edit, read, write in (
        (
            folder / WEIGHTS[name],
            tensors,
            lambda f: load_file(str(f)),
            lambda f, v: save_file(v, str(f), metadata={"format": "pt"}),
        ),
        (folder / "memdec.json", info, lambda f: json.loads(f.read_text()), lambda f, v: f.write_text(json.dumps(v))),
        (folder / "config.json", config, lambda f: json.loads(f.read_text()), lambda f, v: f.write_text(json.dumps(v))),
    ):
        if edit is not None:
            write(file, edit(read(file)))
    return folder


def load_error(folder: Path, base) -> str:
    """The one-line MemdecError of loading the checkpoint ``folder`` on ``base``."""
    with pytest.raises(MemdecError) as err:
        load_decoder(folder, read_memdec_json(folder), base)
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg, msg
    return msg


def one_line_error(capsys, argv: list[str]) -> str:
    """The one `memdec: error:` line of a refused command (exit 2, no traceback)."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "c10" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("memdec: error:")]
    assert len(errors) == 1 and err.strip() == errors[0], err
    return errors[0]


def generate_argv(tiny_llama_dir, folder) -> list[str]:
    return ["generate", "--model", str(tiny_llama_dir), "--memdec", str(folder), "--prompt", "Anne walked",
            "--max-new-tokens", "2", "--device", "cpu"]


# --- issue 32 item 2, issue 36 item 11: ranks bounded by the base's sizes, before any allocation --------------


@pytest.mark.parametrize("spec", ["lora:65", "lora:1000@1", "lora:99999999999999999999"])
def test_a_rank_above_every_adapted_layers_width_is_one_line(base, spec):
    with pytest.raises(MemdecError, match=r"exceeds the width of every adapted layer .*give a rank in 1\.\.64") as err:
        parse_shape(spec).check(base)
    assert str(err.value).startswith(f"decoder shape {spec!r}: rank ") and "\n" not in str(err.value)
    parse_shape("lora:64@1").check(base)  # the widest layer's width itself is a rank


@pytest.mark.parametrize("spec", ["lora:1000@1", "lora:99999999999999999999", "lora:4@99999999999999999999",
                                  "lora:" + "9" * 5000, "fork:" + "9" * 5000])
def test_train_refuses_a_huge_shape_in_one_line_before_anything_is_written(store, tmp_path, capsys, spec):
    out = tmp_path / "run"
    line = one_line_error(capsys, ["train", "--datastore", str(store), "--out", str(out), "--decoder", spec,
                                   "--max-steps", "1", "--device", "cpu"])
    assert "--decoder" in line and len(line) < 400
    assert not out.exists()


def test_adapt_refuses_a_huge_rank_before_any_stage_runs(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    line = one_line_error(capsys, ["adapt", "--model", str(tiny_llama_dir), "--corpus", "austen:valid", "--valid",
                                   "austen:test", "--test", "austen:train", "--general", "none", "--out", str(run),
                                   "--decoder", "lora:1000@1", "--train-tokens", "400", "--max-steps", "1",
                                   "--device", "cpu"])
    assert "rank 1000 exceeds" in line
    assert not run.exists()
    with pytest.raises(MemdecError, match="rank 99999999999999999999 exceeds"):
        adapt(AdaptConfig(model=str(tiny_llama_dir), corpus="austen:valid", valid="austen:test", test="austen:train",
                          out=str(run), decoder="lora:99999999999999999999", general="none"))
    assert not run.exists()


def test_a_huge_rank_in_memdec_json_is_one_line(checkpoints, tmp_path, tiny_llama_dir, base, capsys):
    folder = variant(checkpoints, "lora", tmp_path, info=lambda i: {**i, "decoder": {
        **i["decoder"], "rank": 99999999999999999999, "alpha": 99999999999999999999}})
    assert "decoder.rank 99999999999999999999" in load_error(folder, base)
    line = one_line_error(capsys, generate_argv(tiny_llama_dir, folder))
    assert "memdec.json's decoder.rank 99999999999999999999" in line


# --- issue 36 item 6: what a decoder loads with is finite and of a sane size -----------------------------------


def _first(tensors: dict, value) -> dict:
    name = sorted(tensors)[0]
    bad = tensors[name].clone()
    bad.view(-1)[0] = value
    return {**tensors, name: bad}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("edit, needle", [
    (lambda t: _first(t, float("nan")), "holds non-finite values"),
    (lambda t: _first(t, float("inf")), "holds non-finite values"),
    (lambda t: {k: v * 1e18 for k, v in t.items()}, "above 10000, which no trained weight reaches"),
], ids=["nan", "inf", "scaled"])
def test_non_finite_or_absurd_weights_are_one_line_at_load(checkpoints, tmp_path, base, name, edit, needle):
    folder = variant(checkpoints, name, tmp_path, tensors=edit)
    assert needle in load_error(folder, base)


def test_non_finite_weights_stop_generate_in_one_line(checkpoints, tmp_path, tiny_llama_dir, capsys):
    for name in SHAPES:
        folder = variant(checkpoints, name, tmp_path / name, tensors=lambda t: _first(t, float("nan")))
        assert "holds non-finite values" in one_line_error(capsys, generate_argv(tiny_llama_dir, folder))


@pytest.mark.parametrize("name, edit, needle", [
    ("lora", lambda d: {**d, "alpha": 1e30}, "scales the adapters by 2.5e+29, outside [0.001, 1000]"),
    ("lora", lambda d: {**d, "alpha": 1e-30}, "scales the adapters by 2.5e-31, outside [0.001, 1000]"),
])
def test_a_lora_scale_out_of_range_is_one_line(checkpoints, tmp_path, tiny_llama_dir, capsys, name, edit, needle):
    folder = variant(checkpoints, name, tmp_path, info=lambda i: {**i, "decoder": edit(i["decoder"])})
    with pytest.raises(MemdecError, match=re.escape(needle)):
        read_memdec_json(folder)
    assert needle in one_line_error(capsys, generate_argv(tiny_llama_dir, folder))


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-4, 1e4, 1e300])
def test_a_temperature_out_of_range_in_memdec_json_is_one_line(checkpoints, tmp_path, name, temperature):
    folder = variant(checkpoints, name, tmp_path, info=lambda i: {**i, "temperature": temperature})
    with pytest.raises(MemdecError, match=r'field "temperature" must be a number in \[0\.001, 1000\]'):
        read_memdec_json(folder)


def test_generate_refuses_a_tiny_temperature_in_one_line(checkpoints, tmp_path, tiny_llama_dir, capsys):
    folder = variant(checkpoints, "lora", tmp_path, info=lambda i: {**i, "temperature": 1e-45})
    assert '"temperature"' in one_line_error(capsys, generate_argv(tiny_llama_dir, folder))


@pytest.mark.parametrize("name", list(SHAPES))
def test_sane_decoders_and_ranges_still_load(checkpoints, tmp_path, base, name):
    folder = variant(checkpoints, name, tmp_path, info=lambda i: {**i, "temperature": 1e-3})
    model = MemoryDecoderModel.from_pretrained(base, folder, check_tokenizer=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# --- issue 36 item 7: a copy decoder's weights are those of its config --------------------------------------


def test_a_copy_decoder_lacking_tensors_is_one_line(checkpoints, tmp_path, base):
    folder = variant(checkpoints, "copy", tmp_path, tensors=lambda t: {
        k: v for k, v in t.items() if not k.startswith(("model.embed_tokens.", "model.layers.1."))})
    msg = load_error(folder, base)
    assert "do not match its config.json" in msg and "11 missing: lm_head.weight, model.embed_tokens.weight, " in msg


def test_a_copy_decoder_with_more_blocks_than_its_config_is_one_line(checkpoints, tmp_path, base):
    folder = variant(checkpoints, "copy", tmp_path, config=lambda c: {**c, "num_hidden_layers": 1})
    msg = load_error(folder, base)
    assert "(tensors 9 unexpected: model.layers.1.input_layernorm.weight, " in msg and "missing" not in msg


def test_a_copy_decoder_with_a_tensor_of_another_shape_is_one_line(checkpoints, tmp_path, base):
    name = "model.layers.0.mlp.up_proj.weight"
    folder = variant(checkpoints, "copy", tmp_path, tensors=lambda t: {**t, name: torch.zeros(3, 3)})
    msg = load_error(folder, base)
    assert f"1 of another shape: {name})" in msg


def test_generate_refuses_a_copy_decoder_that_does_not_match_its_config(checkpoints, tmp_path, tiny_llama_dir,
                                                                         capsys):
    folder = variant(checkpoints, "copy", tmp_path, config=lambda c: {**c, "num_hidden_layers": 1})
    assert "do not match its config.json" in one_line_error(capsys, generate_argv(tiny_llama_dir, folder))


def test_a_tied_head_may_be_absent(checkpoints, base):
    folder = checkpoints["copy"]
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    decoder = load_decoder(folder, read_memdec_json(folder), base)
    assert decoder.lm_head.weight is decoder.model.embed_tokens.weight


# --- issue 36 item 17: load errors say what is wrong ----------------------------------------------------------


def test_a_lora_decoders_stray_tensor_is_named_as_not_an_adapter(checkpoints, tmp_path, base):
    stray = "model.layers.1.self_attn.q_proj.base_layer.weight"
    folder = variant(checkpoints, "lora", tmp_path, tensors=lambda t: {**t, stray: torch.zeros(64, 64)})
    msg = load_error(folder, base)
    assert f"holds {stray}" in msg and "the adapters of a lora:4@2 decoder" in msg and "fork" not in msg


def test_a_fork_whose_blocks_field_was_edited_is_blamed_on_the_record(checkpoints, tmp_path, base):
    folder = variant(checkpoints, "fork", tmp_path, info=lambda i: {**i, "decoder": {**i["decoder"], "blocks": 2}})
    msg = load_error(folder, base)
    assert "holds tensors of 1 blocks (model.layers.1-1), but memdec.json's decoder.blocks is 2" in msg
    assert "no longer has the trunk" not in msg


def test_a_lora_whose_rank_field_was_edited_is_blamed_on_the_record(checkpoints, tmp_path, base):
    folder = variant(checkpoints, "lora", tmp_path, info=lambda i: {**i, "decoder": {**i["decoder"], "rank": 8,
                                                                                      "alpha": 8}})
    assert "not that of a LoRA matrix of memdec.json's decoder.rank 8" in load_error(folder, base)


def test_a_changed_trunk_names_both_causes(checkpoints, tmp_path, base):
    folder = variant(checkpoints, "fork", tmp_path, info=lambda i: {**i, "decoder": {**i["decoder"],
                                                                                      "trunk_hash": "0" * 64}})
    msg = load_error(folder, base)
    assert "no longer has the trunk this fork decoder was trained on" in msg
    assert "that base changed since, or memdec.json was edited" in msg


def test_train_still_takes_the_widest_rank(store, tmp_path):
    """The bound is the widest adapted layer: lora:64@1 trains (k_proj and v_proj, 32 wide, saturate)."""
    out = train(TrainConfig(datastore=str(store), out=str(tmp_path / "run"), decoder="lora:64@1", max_steps=1,
                            batch_size=1, block_size=32, save_every=1, log_every=1, device="cpu"))
    assert read_memdec_json(out)["decoder"]["rank"] == 64
