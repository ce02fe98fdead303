"""The fork:K decoder (memdec.decoders) and its shared-trunk joint path (memdec.joint).

Sharing is an optimisation, never a semantic change: a fork mixed with its own base must give what
the same decoder gives as a separate full model with its OWN copy of the trunk (``copy.deepcopy``),
run through the two-model path. Before each comparison the fork's own blocks and norm are perturbed,
so that the decoder differs from the base.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from memdec.checkpoint import load_memory_decoder, read_memdec_json, write_memdec_json
from memdec.decoders import (
    OWN_WEIGHTS,
    SHAPES,
    CopyShape,
    ForkShape,
    load_decoder,
    parse_shape,
    shared_split,
    trunk_hash,
)
from memdec.errors import MemdecError
from memdec.joint import JointCache, MemoryDecoderModel, position_ids_from_mask
from memdec.models import load_model, tokenizer_fingerprint
from memdec.testing import save_tiny_model, tiny_model

PEAKED = {"initializer_range": 0.3}  # varied, non-flat distributions
LAYERS = {"llama": 4, "gemma3": 6}  # gemma3: sliding, sliding, full, sliding, sliding, full
BLOCKS = 3  # own blocks: one full-attention and two sliding-window blocks of the tiny Gemma 3
PROMPTS = ["It is a truth universally acknowledged, that a single man in possession of a good", "Emma"]


def perturbed_fork(base, blocks=BLOCKS, seed=0):
    """A fork of ``base`` whose own blocks and norm have been moved away from the base's."""
    decoder = ForkShape(blocks).build(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ForkShape(blocks).own_tensors(decoder).values():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return decoder


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def models(request, tokenizer):
    """(arch, base, fork decoder, the fork materialised as a separate model with its own trunk)."""
    arch = request.param
    base = tiny_model(arch, tokenizer, seed=0, n_layers=LAYERS[arch], **PEAKED)
    fork = perturbed_fork(base)
    return arch, base, fork, copy.deepcopy(fork)


def joints(models, lmbda=0.4):
    """(shared-trunk joint model, reference two-model joint model)."""
    _, base, fork, ref = models
    shared, separate = MemoryDecoderModel(base, fork, lmbda=lmbda), MemoryDecoderModel(base, ref, lmbda=lmbda)
    assert shared.shares_trunk and not separate.shares_trunk
    return shared, separate


def encoded(tokenizer):
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(enc["attention_mask"].all())  # a left-padded batch
    assert enc["input_ids"].shape[1] > 16  # longer than the tiny Gemma 3's sliding window
    return enc


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- specs and building ----------------------------------------------------------------------


@pytest.mark.parametrize("spec, needle", [
    ("fork", "positive integer"), ("fork:", "positive integer"), ("fork:0", "positive integer"),
    ("fork:-2", "positive integer"), ("fork:two", "positive integer"), ("fork:1.5", "positive integer"),
    ("copy:3", "takes no argument"), ("branch:2", "unknown decoder shape"), ("", "unknown decoder shape"),
    (8, "must be a string"),
])
def test_bad_specs_are_one_line(spec, needle):
    with pytest.raises(MemdecError, match=needle) as err:
        parse_shape(spec)
    assert "\n" not in str(err.value)


def test_specs_parse_and_print_back(tokenizer):
    assert {"copy", "fork"} <= set(SHAPES)
    assert parse_shape("copy") == CopyShape() and parse_shape("fork:8") == ForkShape(8)
    assert parse_shape("fork:8").spec == "fork:8" and parse_shape("copy").spec == "copy"
    base = tiny_model("llama", tokenizer, n_layers=4)
    ForkShape(4).check(base)  # K = L: the trunk is the embeddings alone
    for shape in (ForkShape(5), ForkShape(0)):
        with pytest.raises(MemdecError, match=r"must lie in 1\.\.4 \(the base model has 4 blocks\)"):
            shape.build(base)
    with pytest.raises(
        MemdecError,
        match=r"needs a model with model.layers and model.norm \(Llama, Gemma 3...\); a GPT2LMHeadModel has not",
    ):
        ForkShape(1).build(tiny_model("gpt2", tokenizer))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fork_shares_the_trunk_and_owns_its_top_blocks(tokenizer, arch):
    base = tiny_model(arch, tokenizer, n_layers=LAYERS[arch])
    split = LAYERS[arch] - BLOCKS
    fork = ForkShape(BLOCKS).build(base)
    b, f = base.model, fork.model
    assert f.embed_tokens is b.embed_tokens and fork.lm_head is base.lm_head and f.rotary_emb is b.rotary_emb
    assert all(f.layers[i] is b.layers[i] for i in range(split))
    assert all(f.layers[i] is not b.layers[i] for i in range(split, LAYERS[arch])) and f.norm is not b.norm
    assert [m.self_attn.layer_idx for m in f.layers[split:]] == list(range(split, LAYERS[arch]))
    trainable = {
        n.split(".")[2] if n.startswith("model.layers.") else n for n, p in fork.named_parameters() if p.requires_grad
    }
    assert trainable == {str(i) for i in range(split, LAYERS[arch])} | {"model.norm.weight"}
    assert not any(p.requires_grad for p in base.model.layers[0].parameters())  # frozen, as it is shared
    assert shared_split(base, fork) == split and shared_split(base, copy.deepcopy(fork)) is None
    assert shared_split(base, base) is None
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():  # unperturbed, the fork is the base
        assert torch.equal(fork(ids).logits, base(ids).logits)


# -- the shared trunk gives what the separate decoder gives ----------------------------------


def test_forward_and_scoring_equal_the_materialised_decoder(models, tokenizer):
    _, base, fork, ref = models
    shared, separate = joints(models)
    enc = encoded(tokenizer)
    with torch.no_grad():
        got, want = shared(**enc, use_cache=False).logits, separate(**enc, use_cache=False).logits
        assert (got - torch.log_softmax(base(**enc).logits, -1)).abs().max() > 0.1  # the decoder is not the base
        close(got, want)
        close(shared(**enc, use_cache=False, logits_to_keep=3).logits, want[:, -3:])
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])] * 2)
    targets = ids[:, -7:].roll(-1, dims=1)
    for a, b in zip(shared.target_logprobs_pair(ids, targets), separate.target_logprobs_pair(ids, targets)):
        close(a, b)
    close(shared.scorer(0.7)(ids, targets), separate.scorer(0.7)(ids, targets))
    close(shared.memdec_scorer()(ids, targets), separate.memdec_scorer()(ids, targets))


GENERATE = {
    "greedy": {},
    "sampling": {"do_sample": True, "top_k": 0, "temperature": 1.5},
    "beam": {"num_beams": 3, "num_return_sequences": 2},
}


@pytest.mark.parametrize("strategy", GENERATE)
def test_generate_equals_the_materialised_decoder(models, tokenizer, strategy):
    """Same tokens and the same scores (1e-5) for every strategy, on a left-padded batch."""
    shared, separate = joints(models)
    enc = encoded(tokenizer)

    def gen(model):
        torch.manual_seed(7)
        return model.generate(**enc, max_new_tokens=10, pad_token_id=1, output_scores=True,
                              return_dict_in_generate=True, **GENERATE[strategy])

    got, want = gen(shared), gen(separate)
    assert torch.equal(got.sequences, want.sequences)
    close(torch.stack(got.scores), torch.stack(want.scores))


def test_lambda_zero_is_the_base_exactly(models, tokenizer):
    _, base, fork, _ = models
    shared = MemoryDecoderModel(base, fork, lmbda=0.0)
    enc = encoded(tokenizer)
    with torch.no_grad():
        assert torch.equal(shared(**enc, use_cache=False).logits, torch.log_softmax(base(**enc).logits.float(), -1))
    for kw in GENERATE.values():
        torch.manual_seed(3)
        got = shared.generate(**enc, max_new_tokens=8, pad_token_id=1, **kw)
        torch.manual_seed(3)
        assert torch.equal(got, base.generate(**enc, max_new_tokens=8, pad_token_id=1, **kw))


def test_a_resumed_cache_equals_the_materialised_decoder(models, tokenizer):
    """Prefill, then one token at a time through the JointCache (whose decoder cache holds the top
    blocks only), then generate() resumed on that cache: what the separate decoder gives."""
    shared, separate = joints(models)
    enc = encoded(tokenizer)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = position_ids_from_mask(mask, ids.shape[1])
    k = ids.shape[1] - 4

    def incremental(model):
        with torch.no_grad():
            out = model(ids[:, :k], attention_mask=mask[:, :k], position_ids=pos[:, :k], use_cache=True)
            cache, steps = out.cache, [out.logits]
            for t in range(k, ids.shape[1]):
                out = model(
                    ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1], cache=cache
                )
                steps.append(out.logits)
        return torch.cat(steps, dim=1), cache

    (got, cache), (want, ref_cache) = incremental(shared), incremental(separate)
    real = mask.bool()
    close(got[real], want[real])
    with torch.no_grad():
        close(got[real], shared(**enc, use_cache=False).logits[real])
    split = LAYERS[models[0]] - BLOCKS
    assert isinstance(cache, JointCache) and cache.get_seq_length() == ids.shape[1]
    assert cache.memdec.layers[0].get_seq_length() == 0 and cache.memdec.layers[split].get_seq_length() > 0

    def resumed(model, c):
        torch.manual_seed(1)
        return model.generate(input_ids=ids, attention_mask=mask, cache=c, max_new_tokens=6, pad_token_id=1,
                              output_scores=True, return_dict_in_generate=True)

    got, want = resumed(shared, cache), resumed(separate, ref_cache)
    assert torch.equal(got.sequences, want.sequences)
    close(torch.stack(got.scores), torch.stack(want.scores))


def test_joint_cache_reorders_and_crops_a_decoder_cache_with_empty_lower_layers(models, tokenizer):
    shared, _ = joints(models)
    ids = torch.tensor([tokenizer.encode("It is a truth")] * 3)
    ids[1, -1] = 50
    split = LAYERS[models[0]] - BLOCKS
    with torch.no_grad():
        cache = shared(ids, use_cache=True).cache
    top = cache.memdec.layers[split]
    keys = top.keys.clone()
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert torch.equal(top.keys, keys[[1, 1, 0]]) and cache.memdec.layers[0].get_seq_length() == 0
    cache.crop(-1)
    assert cache.base.get_seq_length() == top.get_seq_length() == ids.shape[1] - 1


# -- saving and loading ------------------------------------------------------------------------


def save_fork(folder, fork, tokenizer, base_model):
    """A fork checkpoint: its own blocks plus memdec.json (written last)."""
    record = ForkShape(BLOCKS).save(fork, folder)
    write_memdec_json(folder, {"base_model": str(base_model), "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                               "lambda": 0.4, "decoder": record})
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """(base folder, base, fork, checkpoint folder) for a tiny Llama saved to disk."""
    base_dir = save_tiny_model(tmp_path_factory.mktemp("fork-base"), "llama", tokenizer, seed=0,
                               n_layers=LAYERS["llama"], **PEAKED)
    base, _ = load_model(str(base_dir))
    fork = perturbed_fork(base)
    return base_dir, base, fork, save_fork(tmp_path_factory.mktemp("fork-ckpt"), fork, tokenizer, base_dir)


def test_save_holds_the_own_blocks_only_and_loads_back_identical(saved, tokenizer):
    _, base, fork, folder = saved
    names = set(load_file(str(folder / OWN_WEIGHTS)))
    assert names == {f"model.layers.{i}.{p}" for i in (1, 2, 3) for p in [
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight"]} | {"model.norm.weight"}
    assert sorted(p.name for p in folder.iterdir()) == [OWN_WEIGHTS, "memdec.json"]  # no temporary file left
    info = read_memdec_json(folder)
    assert info["decoder"] == {"shape": "fork", "blocks": BLOCKS, "trunk_hash": trunk_hash(base, BLOCKS),
                               "trunk_dtype": "float32"}
    loaded = load_decoder(folder, info, base)
    assert shared_split(base, loaded) == 1 and not loaded.training
    want = fork.state_dict()
    assert all(torch.equal(t, want[n]) for n, t in loaded.state_dict().items())
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    model = MemoryDecoderModel.from_pretrained(base, folder, tokenizer=tokenizer)
    assert model.shares_trunk and model.lmbda == 0.4
    with torch.no_grad():
        close(model(ids).logits, MemoryDecoderModel(base, copy.deepcopy(fork), lmbda=0.4)(ids).logits)


def test_save_pretrained_of_a_fork_saves_its_own_blocks(saved, tokenizer, tmp_path):
    _, base, fork, _ = saved
    MemoryDecoderModel(base, fork, lmbda=0.2).save_pretrained(tmp_path / "out", tokenizer=tokenizer)
    assert set(load_file(str(tmp_path / "out" / OWN_WEIGHTS))) == set(ForkShape(BLOCKS).own_tensors(fork))
    assert not (tmp_path / "out" / "model.safetensors").exists()
    again = MemoryDecoderModel.from_pretrained(base, tmp_path / "out", tokenizer=tokenizer)
    assert again.shares_trunk and again.lmbda == 0.2 and again.memdec_info["decoder"]["shape"] == "fork"
    # the same decoder, separate from the base: a full model folder, recorded as a copy (no decoder record)
    MemoryDecoderModel(base, copy.deepcopy(fork), lmbda=0.2, memdec_info=again.memdec_info).save_pretrained(
        tmp_path / "full", tokenizer=tokenizer)
    assert "decoder" not in read_memdec_json(tmp_path / "full") and (tmp_path / "full" / "model.safetensors").is_file()


def test_another_base_is_detected_and_gets_a_separate_decoder(saved, tokenizer):
    """A base with another trunk (same tokenizer): the hash tells, and the decoder is built on the
    recorded base as a separate model, with the materialised decoder's outputs."""
    _, base, fork, folder = saved
    other = tiny_model("llama", tokenizer, seed=5, n_layers=LAYERS["llama"], **PEAKED)
    assert trunk_hash(other, BLOCKS) != trunk_hash(base, BLOCKS)
    model = MemoryDecoderModel.from_pretrained(other, folder, tokenizer=tokenizer)
    assert not model.shares_trunk and shared_split(base, model.memdec) is None
    reference = MemoryDecoderModel(other, copy.deepcopy(fork), lmbda=0.4)
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    shorter = tiny_model("llama", tokenizer, seed=5, n_layers=2, **PEAKED)  # fewer blocks than the fork owns
    model = MemoryDecoderModel.from_pretrained(shorter, folder, tokenizer=tokenizer)
    assert not model.shares_trunk and len(model.memdec.model.layers) == LAYERS["llama"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, MemoryDecoderModel(shorter, copy.deepcopy(fork), lmbda=0.4)(ids).logits)


def test_the_same_base_in_another_dtype_still_shares(saved, tokenizer):
    """In bf16 the trunk hash differs from the recorded (fp32) one; the recorded base, loaded in bf16,
    has this base's trunk, so the decoder shares it after all."""
    base_dir, _, fork, folder = saved
    base16, _ = load_model(str(base_dir), dtype=torch.bfloat16)
    decoder = load_decoder(folder, read_memdec_json(folder), base16)
    assert shared_split(base16, decoder) == 1 and decoder.dtype == torch.bfloat16
    want = {n: t.to(torch.bfloat16) for n, t in ForkShape(BLOCKS).own_tensors(fork).items()}
    assert all(torch.equal(t, want[n]) for n, t in ForkShape(BLOCKS).own_tensors(decoder).items())


def test_bad_fork_checkpoints_are_one_line(saved, tokenizer, tmp_path):
    base_dir, base, fork, good = saved
    info = json.loads((good / "memdec.json").read_text())
    cases = {
        "blocks": ({**info["decoder"], "blocks": 0}, r"decoder\.blocks is missing or invalid \(0\)"),
        "hash": ({**info["decoder"], "trunk_hash": "abc"}, r"decoder\.trunk_hash is missing or invalid"),
        "missing": (
            {k: v for k, v in info["decoder"].items() if k != "trunk_dtype"},
            r"decoder\.trunk_dtype is missing",
        ),
        "extra": ({**info["decoder"], "head": "own"}, r"decoder\.head is not a field of a 'fork' decoder"),
        "shape": ({"shape": "branch"}, r"decoder\.shape 'branch' is not one of copy, fork"),
        "type": ("fork:3", r"decoder\.shape 'fork:3' is not one of"),
    }
    for name, (record, needle) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "memdec.json").write_text(json.dumps({**info, "decoder": record}))
        with pytest.raises(MemdecError, match=needle) as err:
            read_memdec_json(folder)
        assert str(folder / "memdec.json") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MemdecError, match="holds only its own blocks; load it with its base model"):
        load_memory_decoder(good)

    def broken(name, write):
        folder = tmp_path / "weights" / name
        folder.mkdir(parents=True)
        (folder / "memdec.json").write_text((good / "memdec.json").read_text())
        write(folder / OWN_WEIGHTS)
        with pytest.raises(MemdecError) as err:
            load_decoder(folder, read_memdec_json(folder), base)
        assert str(folder / OWN_WEIGHTS) in str(err.value) and "\n" not in str(err.value)
        return str(err.value)

    own = load_file(str(good / OWN_WEIGHTS))
    assert "missing" in broken("absent", lambda f: None)
    assert "unreadable" in broken("truncated", lambda f: f.write_bytes((good / OWN_WEIGHTS).read_bytes()[:300]))
    assert "lacks model.norm.weight" in broken("lacking", lambda f: save_file(
        {k: v for k, v in own.items() if k != "model.norm.weight"}, str(f)))
    assert "holds model.layers.0.mlp.up_proj.weight" in broken("extra", lambda f: save_file(
        {**own, "model.layers.0.mlp.up_proj.weight": own["model.layers.1.mlp.up_proj.weight"].clone()}, str(f)))
    assert "has shape (3,)" in broken("shape", lambda f: save_file({**own, "model.norm.weight": torch.ones(3)}, str(f)))
    # the base named in memdec.json changed since training: refused, not silently used
    changed = tmp_path / "changed"
    save_fork(changed, fork, tokenizer, save_tiny_model(tmp_path / "other-base", "llama", tokenizer, seed=9,
                                                         n_layers=LAYERS["llama"], **PEAKED))
    other = tiny_model("llama", tokenizer, seed=5, n_layers=LAYERS["llama"], **PEAKED)
    with pytest.raises(MemdecError, match="no longer has the trunk this fork decoder was trained on"):
        load_decoder(changed, read_memdec_json(changed), other)
