"""The lora:R[@K] decoder (memdec.decoders.LoraShape) and its shared-trunk joint path.

A LoRA decoder is a fork whose own top blocks hold the base's own weight tensors plus peft LoRA
adapters. Sharing is an optimisation, never a semantic change: mixed with its own base it must give
what the same decoder gives MATERIALISED, a separate full model with the deltas merged into a copy
of the base's weights (``LoraShape.materialise``). peft starts B at zero (the decoder would be the
base), so the B matrices are perturbed first.

The joint-model equality tests of tests/test_fork_decoder.py (scoring, greedy, sampling, beam
search, a resumed cache, λ = 0, cache reordering) are imported below and run here on this module's
``models`` fixture: the same assertions, on a LoRA decoder and its merged materialisation.
"""

import copy
import json
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_fork_decoder import (  # noqa: F401  (the imported tests run on this module's `models` fixture)
    BLOCKS,
    LAYERS,
    PEAKED,
    PROMPTS,
    close,
    encoded,
    test_a_resumed_cache_equals_the_materialised_decoder,
    test_forward_and_scoring_equal_the_materialised_decoder,
    test_generate_equals_the_materialised_decoder,
    test_joint_cache_reorders_and_crops_a_decoder_cache_with_empty_lower_layers,
    test_lambda_zero_is_the_base_exactly,
)

from memdec.checkpoint import read_memdec_json, write_memdec_json
from memdec.decoders import (
    LORA_TARGETS,
    OWN_WEIGHTS,
    SHAPES,
    ForkShape,
    LoraShape,
    decoder_shape,
    load_decoder,
    parse_shape,
    shared_split,
)
from memdec.errors import MemdecError
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model, tokenizer_fingerprint
from memdec.testing import save_tiny_model, tiny_model

RANK = 4
SHAPE = LoraShape(RANK, BLOCKS)  # lora:4@3


def perturbed_lora(base, shape=SHAPE, seed=0):
    """A LoRA decoder of ``base`` whose B matrices (zero at initialisation) have been made random."""
    decoder = shape.build(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in shape.own_tensors(decoder).items():
            if ".lora_B." in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return decoder


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def models(request, tokenizer):
    """(arch, base, LoRA decoder, the decoder materialised: a separate model with merged weights)."""
    arch = request.param
    base = tiny_model(arch, tokenizer, seed=0, n_layers=LAYERS[arch], **PEAKED)
    decoder = perturbed_lora(base)
    return arch, base, decoder, SHAPE.materialise(decoder)


def projections(block) -> dict[str, torch.nn.Linear]:
    """A base block's LoRA targets by path in the block ("self_attn.q_proj")."""
    return {name: m for name, m in block.named_modules() if name.rsplit(".", 1)[-1] in LORA_TARGETS}


def lora_parameters(base, shape_blocks: int, rank: int) -> int:
    """R·(in + out) for each target of each of the top blocks: the trainable parameters."""
    layers = base.model.layers
    return sum(rank * (m.in_features + m.out_features) for block in layers[len(layers) - shape_blocks:]
               for m in projections(block).values())


# -- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["lora", "lora:", "lora:0", "lora:8@0", "lora:x", "lora:8@", "lora:@8", "lora:-1",
                                  "lora:8@2@3", "lora:1.5", "lora:8@x"])
def test_bad_specs_are_one_line(spec):
    with pytest.raises(
        MemdecError, match=r"give the LoRA rank and, after '@', the number of adapted top blocks"
    ) as err:
        parse_shape(spec)
    assert str(err.value).startswith(f"decoder shape {spec!r}: ") and "\n" not in str(err.value)


def test_a_missing_peft_is_one_line_at_parse_time(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(MemdecError, match=r"^decoder shape 'lora' needs the peft package: pip install"):
        parse_shape("lora:8")


def test_specs_parse_and_print_back():
    assert set(SHAPES) == {"copy", "fork", "lora"}
    assert parse_shape("lora:16") == LoraShape(16) and parse_shape("lora:16@8") == LoraShape(16, 8)
    assert parse_shape("lora:16").spec == "lora:16" and parse_shape("lora:16@8").spec == "lora:16@8"
    shape = parse_shape("lora:16@8")
    assert (shape.rank, shape.blocks, shape.alpha, shape.targets) == (16, 8, 16, LORA_TARGETS)
    assert LoraShape(16, 8, alpha=32) != shape and LoraShape(16, 8) != ForkShape(8)


def test_shapes_that_do_not_fit_the_base_are_one_line(tokenizer):
    base = tiny_model("llama", tokenizer, n_layers=4)
    for spec in ("lora:8@999", "lora:8@5"):
        with pytest.raises(MemdecError, match=rf"decoder shape '{spec}': the number of own blocks must lie in 1\.\.4 "
                                              r"\(the base model has 4 blocks\)"):
            parse_shape(spec).build(base)
    with pytest.raises(MemdecError, match=r"decoder shape 'lora:2@1': block 3 of the base model has no linear layer "
                                          r"'c_attn' \(its linear layers: down_proj, gate_proj, k_proj, "):
        LoraShape(2, 1, targets=("q_proj", "c_attn")).check(base)
    with pytest.raises(MemdecError, match=r"needs a model with model.layers and model.norm"):
        parse_shape("lora:2").build(tiny_model("gpt2", tokenizer))


# -- building: the base's own tensors, the adapters its own ------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lora_shares_the_base_weights_and_trains_the_adapters_only(tokenizer, arch):
    base = tiny_model(arch, tokenizer, n_layers=LAYERS[arch])
    n, split = LAYERS[arch], LAYERS[arch] - BLOCKS
    before = {name: p.data_ptr() for name, p in base.named_parameters()}
    decoder = SHAPE.build(base)
    b, d = base.model, decoder.model
    assert d.embed_tokens is b.embed_tokens and decoder.lm_head is base.lm_head and d.norm is b.norm
    assert all(d.layers[i] is b.layers[i] for i in range(split))
    assert all(d.layers[i] is not b.layers[i] for i in range(split, n))
    for i in range(split, n):  # new block objects, with the base's own weight tensors: shared memory
        ours, theirs = d.layers[i], b.layers[i]
        assert ours.self_attn.layer_idx == i and ours.mlp is not theirs.mlp
        for path, linear in projections(theirs).items():
            adapted = ours.get_submodule(path)
            assert type(linear) is torch.nn.Linear and adapted.r["default"] == RANK  # the base is untouched by peft
            assert adapted.get_base_layer().weight is linear.weight
            assert adapted.get_base_layer().weight.data_ptr() == linear.weight.data_ptr()
        assert ours.input_layernorm.weight is theirs.input_layernorm.weight
    assert {name: p.data_ptr() for name, p in base.named_parameters()} == before
    trainable = {name for name, p in decoder.named_parameters() if p.requires_grad}
    assert trainable == set(SHAPE.own_tensors(decoder))
    assert len(trainable) == 2 * len(LORA_TARGETS) * BLOCKS and all(
        ".lora_A." in t or ".lora_B." in t for t in trainable
    )
    assert sum(p.numel() for p in decoder.parameters() if p.requires_grad) == lora_parameters(base, BLOCKS, RANK)
    assert not any(p.requires_grad for p in base.parameters())  # frozen, as it is shared
    assert shared_split(base, decoder) == split and shared_split(base, copy.deepcopy(decoder)) is None
    assert decoder_shape(base, decoder) == SHAPE and decoder_shape(base, ForkShape(2).build(base)) == ForkShape(2)
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():  # B = 0: the decoder is the base, exactly
        assert torch.equal(decoder(ids).logits, base(ids).logits)


def test_the_trainable_count_is_r_times_in_plus_out_per_target(tokenizer):
    base = tiny_model("llama", tokenizer, n_layers=4)  # hidden 64, MLP 128, 2 of 4 heads for k and v: 32
    per_block = 64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 128 + 64 + 128 + 128 + 64  # q k v o gate up down
    for spec, want in [("lora:4@3", 4 * per_block * 3), ("lora:8", 8 * per_block * 4), ("lora:1@1", per_block)]:
        decoder = parse_shape(spec).build(base)
        assert sum(p.numel() for p in decoder.parameters() if p.requires_grad) == want, spec


def test_materialise_merges_the_deltas_into_a_plain_copy(models):
    _, base, decoder, plain = models
    split = len(base.model.layers) - BLOCKS
    assert not any(hasattr(m, "lora_A") for m in plain.modules())
    assert plain.model.embed_tokens.weight.data_ptr() != base.model.embed_tokens.weight.data_ptr()
    q = decoder.model.layers[split].self_attn.q_proj
    want = base.model.layers[split].self_attn.q_proj.weight + (q.lora_B["default"].weight @ q.lora_A["default"].weight)
    assert SHAPE.alpha / SHAPE.rank == 1.0
    close(plain.model.layers[split].self_attn.q_proj.weight, want)
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lora_on_every_block_shares_only_the_embeddings_and_equals_its_materialisation(tokenizer, arch):
    base = tiny_model(arch, tokenizer, seed=0, n_layers=LAYERS[arch], **PEAKED)
    shape = parse_shape(f"lora:{RANK}")  # K = L: all blocks adapted
    decoder = perturbed_lora(base, shape)
    assert shared_split(base, decoder) == 0 and decoder_shape(base, decoder) == LoraShape(RANK, LAYERS[arch])
    shared = MemoryDecoderModel(base, decoder, lmbda=0.4)
    separate = MemoryDecoderModel(base, shape.materialise(decoder), lmbda=0.4)
    assert shared.shares_trunk and not separate.shares_trunk
    enc = encoded(tokenizer)
    with torch.no_grad():
        close(shared(**enc, use_cache=False).logits, separate(**enc, use_cache=False).logits)
    got, want = (m.generate(**enc, max_new_tokens=8, pad_token_id=1, output_scores=True, return_dict_in_generate=True)
                 for m in (shared, separate))
    assert torch.equal(got.sequences, want.sequences)
    close(torch.stack(got.scores), torch.stack(want.scores))


# -- saving and loading ------------------------------------------------------------------------


def save_lora(folder, decoder, tokenizer, base_model, shape=SHAPE):
    """A LoRA checkpoint: its adapters plus memdec.json (written last)."""
    record = shape.save(decoder, folder)
    write_memdec_json(folder, {"base_model": str(base_model), "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                               "lambda": 0.4, "decoder": record})
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """(base folder, base, LoRA decoder, checkpoint folder) for a tiny Llama saved to disk."""
    base_dir = save_tiny_model(tmp_path_factory.mktemp("lora-base"), "llama", tokenizer, seed=0,
                               n_layers=LAYERS["llama"], **PEAKED)
    base, _ = load_model(str(base_dir))
    decoder = perturbed_lora(base)
    return base_dir, base, decoder, save_lora(tmp_path_factory.mktemp("lora-ckpt"), decoder, tokenizer, base_dir)


def test_save_holds_the_adapters_only_and_loads_back_identical(saved, tokenizer):
    _, base, decoder, folder = saved
    file = folder / OWN_WEIGHTS
    tensors = load_file(str(file))
    paths = [f"self_attn.{t}" for t in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"mlp.{t}" for t in ("gate_proj", "up_proj", "down_proj")]
    assert set(tensors) == {
        f"model.layers.{i}.{p}.lora_{ab}.default.weight" for i in (1, 2, 3) for p in paths for ab in "AB"
    }
    assert sum(t.numel() for t in tensors.values()) == lora_parameters(base, BLOCKS, RANK) == 12288
    header = struct.unpack("<Q", file.read_bytes()[:8])[0]
    assert file.stat().st_size == 8 + header + 4 * 12288  # the adapters in fp32: 48 KiB, plus the header
    assert sorted(p.name for p in folder.iterdir()) == [OWN_WEIGHTS, "memdec.json"]  # no temporary file left
    info = read_memdec_json(folder)
    assert info["decoder"] == {"shape": "lora", "rank": RANK, "blocks": BLOCKS, "alpha": RANK,
                               "targets": list(LORA_TARGETS), "trunk_hash": SHAPE.hash_trunk(base),
                               "trunk_dtype": "float32"}
    assert SHAPE.hash_trunk(decoder) == SHAPE.hash_trunk(base) != ForkShape(BLOCKS).hash_trunk(base)
    loaded = load_decoder(folder, info, base)
    assert shared_split(base, loaded) == 1 and not loaded.training
    assert loaded.model.layers[3].mlp.up_proj.get_base_layer().weight is base.model.layers[3].mlp.up_proj.weight
    want = SHAPE.own_tensors(decoder)
    assert all(torch.equal(t, want[n]) for n, t in SHAPE.own_tensors(loaded).items())
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    model = MemoryDecoderModel.from_pretrained(base, folder, tokenizer=tokenizer)
    assert model.shares_trunk and model.lmbda == 0.4
    with torch.no_grad():
        close(model(ids).logits, MemoryDecoderModel(base, SHAPE.materialise(decoder), lmbda=0.4)(ids).logits)


def test_save_pretrained_of_a_lora_decoder_saves_its_adapters(saved, tokenizer, tmp_path):
    """The joint model saves a LoRA decoder as one (not as a fork of its top blocks)."""
    _, base, decoder, _ = saved
    MemoryDecoderModel(base, decoder, lmbda=0.2).save_pretrained(tmp_path / "out", tokenizer=tokenizer)
    assert set(load_file(str(tmp_path / "out" / OWN_WEIGHTS))) == set(SHAPE.own_tensors(decoder))
    info = read_memdec_json(tmp_path / "out")
    assert info["decoder"]["shape"] == "lora" and info["decoder"]["rank"] == RANK
    again = MemoryDecoderModel.from_pretrained(base, tmp_path / "out", tokenizer=tokenizer)
    assert again.shares_trunk and again.lmbda == 0.2


def test_another_base_gets_the_recorded_base_with_the_deltas_merged(saved, tokenizer):
    _, base, decoder, folder = saved
    other = tiny_model("llama", tokenizer, seed=5, n_layers=LAYERS["llama"], **PEAKED)
    model = MemoryDecoderModel.from_pretrained(other, folder, tokenizer=tokenizer)
    assert not model.shares_trunk and not any(hasattr(m, "lora_A") for m in model.memdec.modules())
    assert torch.equal(model.memdec.model.embed_tokens.weight, base.model.embed_tokens.weight)
    reference = MemoryDecoderModel(other, SHAPE.materialise(decoder), lmbda=0.4)
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        close(model(ids).logits, reference(ids).logits)
    assert (
        decoder.model.layers[3].self_attn.q_proj.get_base_layer().weight is base.model.layers[3].self_attn.q_proj.weight
    )


def test_the_same_base_in_another_dtype_still_shares(saved, tokenizer):
    base_dir, _, decoder, folder = saved
    base16, _ = load_model(str(base_dir), dtype=torch.bfloat16)
    loaded = load_decoder(folder, read_memdec_json(folder), base16)
    assert shared_split(base16, loaded) == 1 and loaded.dtype == torch.bfloat16
    assert (
        loaded.model.layers[2].self_attn.v_proj.get_base_layer().weight
        is base16.model.layers[2].self_attn.v_proj.weight
    )
    want = {n: t.to(torch.bfloat16) for n, t in SHAPE.own_tensors(decoder).items()}
    assert all(torch.equal(t, want[n]) for n, t in SHAPE.own_tensors(loaded).items())


@pytest.mark.parametrize("field, value, needle", [
    ("rank", 0, r"decoder\.rank is missing or invalid \(0\)"),
    ("rank", True, r"decoder\.rank is missing or invalid \(True\)"),
    ("alpha", 0, r"decoder\.alpha is missing or invalid \(0\)"),
    ("alpha", "16", r"decoder\.alpha is missing or invalid \('16'\)"),
    ("targets", [], r"decoder\.targets is missing or invalid \(\[\]\)"),
    ("targets", ["q_proj", "q_proj"], r"decoder\.targets is missing or invalid"),
    ("targets", "q_proj", r"decoder\.targets is missing or invalid"),
    ("targets", ["q.proj"], r"decoder\.targets is missing or invalid"),
    ("blocks", None, r"decoder\.blocks is missing or invalid \(None\)"),
    ("dropout", 0.1, r"decoder\.dropout is not a field of a 'lora' decoder"),
    ("trunk_hash", ..., r"decoder\.trunk_hash is missing or invalid"),
])
def test_bad_lora_records_are_one_line(saved, tmp_path, field, value, needle):
    _, _, _, good = saved
    info = json.loads((good / "memdec.json").read_text())
    record = {k: v for k, v in info["decoder"].items() if k != field}
    if value is not ...:
        record[field] = value
    (tmp_path / "memdec.json").write_text(json.dumps({**info, "decoder": record}))
    with pytest.raises(MemdecError, match=needle) as err:
        read_memdec_json(tmp_path)
    assert str(tmp_path / "memdec.json") in str(err.value) and "\n" not in str(err.value)


def test_bad_lora_weights_are_one_line(saved, tmp_path):
    _, base, _, good = saved
    own = load_file(str(good / OWN_WEIGHTS))
    a = "model.layers.1.self_attn.q_proj.lora_A.default.weight"

    def broken(name, write):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "memdec.json").write_text((good / "memdec.json").read_text())
        write(folder / OWN_WEIGHTS)
        with pytest.raises(MemdecError) as err:
            load_decoder(folder, read_memdec_json(folder), base)
        assert str(folder / OWN_WEIGHTS) in str(err.value) and "\n" not in str(err.value)
        return str(err.value)

    assert "missing; a lora memory decoder keeps its adapters there" in broken("absent", lambda f: None)
    assert "unreadable" in broken("truncated", lambda f: f.write_bytes((good / OWN_WEIGHTS).read_bytes()[:300]))
    assert f"lacks {a}" in broken("lacking", lambda f: save_file({k: v for k, v in own.items() if k != a}, str(f)))
    base_weight = "model.layers.1.self_attn.q_proj.base_layer.weight"  # a base tensor is never taken from the file
    assert f"holds {base_weight}" in broken("extra", lambda f: save_file(
        {**own, base_weight: base.model.layers[1].self_attn.q_proj.weight.detach().clone()}, str(f)))
    assert f"{a} has shape (8, 64)" in broken("rank", lambda f: save_file({**own, a: torch.zeros(8, 64)}, str(f)))
