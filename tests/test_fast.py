"""The fast decode path (memdec.fast) gives the same tokens as MemoryDecoderModel.generate."""

from __future__ import annotations

import warnings

import pytest
import torch

from memdec.fast import FastJointGenerator, fast_generate, fast_scorer
from memdec.joint import MemoryDecoderModel
from memdec.testing import tiny_model

PEAKED = {"initializer_range": 0.3}  # random tiny models with varied, non-flat distributions
PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome,"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def joint(request, tokenizer):
    """A tiny base of each architecture with a memory decoder of the other (shared vocabulary)."""
    other = "gpt2" if request.param == "llama" else "llama"
    base = tiny_model(request.param, tokenizer, seed=0, **PEAKED)
    memdec = tiny_model(other, tokenizer, seed=1, n_layers=1, **PEAKED)
    return MemoryDecoderModel(base, memdec, lmbda=0.4, temperature=1.3)


def encode(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def both(joint, enc, seed=None, gen=None, **kw):
    """(eager tokens, fast tokens) of the same call."""
    kw = {"pad_token_id": 1, **kw}
    if seed is not None:
        torch.manual_seed(seed)
    eager = joint.generate(**enc, **kw)
    if seed is not None:
        torch.manual_seed(seed)
    gen = gen if gen is not None else FastJointGenerator(joint)
    fast = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    return eager, fast, gen


def test_greedy_batch_one(joint, tokenizer):
    eager, fast, gen = both(joint, encode(tokenizer, PROMPTS[:1]), max_new_tokens=12)
    assert gen.last_path == "static"
    assert eager.shape[1] == encode(tokenizer, PROMPTS[:1])["input_ids"].shape[1] + 12
    assert torch.equal(eager, fast)


def test_greedy_left_padded_batch_and_reuse(joint, tokenizer):
    enc = encode(tokenizer, PROMPTS)
    assert (enc["attention_mask"] == 0).any()  # really padded
    eager, fast, gen = both(joint, enc, max_new_tokens=10)
    assert torch.equal(eager, fast)
    # the same generator again, other prompts of the same shape: its caches are reset and reused
    enc2 = tokenizer(["Mr. Darcy was", "The family of Dashwood had"], return_tensors="pt", padding="max_length",
                     max_length=enc["input_ids"].shape[1])
    eager2, fast2, _ = both(joint, enc2, gen=gen, max_new_tokens=10)
    assert len(gen._states) == 1
    assert torch.equal(eager2, fast2)


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]])
def test_eos_stops_and_pads_like_generate(joint, tokenizer, prompts):
    enc = encode(tokenizer, prompts)
    plain = joint.generate(**enc, max_new_tokens=10, pad_token_id=1)
    n = enc["input_ids"].shape[1]
    eos = int(plain[0, n + 2])  # the first row emits it by step 3: it stops there
    eager, fast, _ = both(joint, enc, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(eager, fast)
    first = n + int((eager[0, n:] == eos).nonzero()[0, 0])
    assert first <= n + 2 and (eager[0, first + 1 :] == 1).all()  # padded after its EOS
    if len(prompts) == 1:
        assert eager.shape[1] == first + 1  # and generation ended there
    # checking for the end only every 4 steps (as on CUDA): the extra steps are dropped
    gen = FastJointGenerator(joint, sync_every=4)
    _, fast4, _ = both(joint, enc, gen=gen, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(eager, fast4)


def test_sampling_with_seed(joint, tokenizer):
    enc = encode(tokenizer, PROMPTS)
    for kw in ({}, {"temperature": 0.7, "top_k": 20}, {"top_p": 0.8, "repetition_penalty": 1.3}):
        eager, fast, gen = both(joint, enc, seed=7, do_sample=True, max_new_tokens=10, **kw)
        assert gen.last_path == "static"
        assert torch.equal(eager, fast), kw
    other, _, _ = both(joint, enc, seed=8, do_sample=True, max_new_tokens=10)
    assert not torch.equal(other, eager)  # the seed matters: the test compares real draws


def test_beam_search_falls_back_once_and_equals(joint, tokenizer):
    enc = encode(tokenizer, PROMPTS)
    gen = FastJointGenerator(joint)
    with pytest.warns(UserWarning, match="beam search"):
        _, fast, _ = both(joint, enc, gen=gen, num_beams=3, max_new_tokens=6)
    assert gen.last_path == "fallback"
    assert torch.equal(joint.generate(**enc, num_beams=3, max_new_tokens=6, pad_token_id=1), fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per generator
        both(joint, enc, gen=gen, num_beams=3, max_new_tokens=6)


def test_several_sequences_fall_back(joint, tokenizer):
    enc = encode(tokenizer, PROMPTS[:1])
    with pytest.warns(UserWarning, match="num_return_sequences"):
        eager, fast, _ = both(joint, enc, seed=3, do_sample=True, num_return_sequences=2, max_new_tokens=5)
    assert torch.equal(eager, fast)


def test_lambda_zero_is_the_base_model(joint, tokenizer):
    enc = encode(tokenizer, PROMPTS)
    lmbda = joint.lmbda
    try:
        joint.lmbda = 0.0
        gen = FastJointGenerator(joint)
        fast = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=10, pad_token_id=1)
        assert list(gen._states.values())[0].caches.keys() == {"base"}  # the decoder is not run
    finally:
        joint.lmbda = lmbda
    assert torch.equal(joint.base.generate(**enc, max_new_tokens=10, pad_token_id=1), fast)


def test_eager_attention_and_fast_generate(tokenizer):
    base = tiny_model("llama", tokenizer, seed=0, **PEAKED)
    memdec = tiny_model("llama", tokenizer, seed=2, n_layers=1, **PEAKED)
    memdec.set_attn_implementation("eager")  # an additive float mask for this one
    joint = MemoryDecoderModel(base, memdec, lmbda=0.6)
    enc = encode(tokenizer, PROMPTS)
    fast = fast_generate(joint, enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=8,
                         pad_token_id=1)
    assert torch.equal(joint.generate(**enc, max_new_tokens=8, pad_token_id=1), fast)
    assert fast_generate(joint, enc["input_ids"][:1, -3:], max_new_tokens=1, pad_token_id=1).shape == (1, 4)


def test_refuses_what_is_not_a_joint_model(tokenizer):
    from memdec.errors import MemdecError

    with pytest.raises(MemdecError, match="needs a MemoryDecoderModel"):
        FastJointGenerator(tiny_model("llama", tokenizer))


def test_fast_scorer_equals_the_joint_scorer(joint, tokenizer):
    ids = encode(tokenizer, PROMPTS[:1])["input_ids"]
    inputs, targets = ids[:, :-1], ids[:, -5:]
    assert torch.equal(fast_scorer(joint)(inputs, targets), joint.scorer()(inputs, targets))
    assert torch.equal(fast_scorer(joint, 0.0)(inputs, targets), joint.scorer(0.0)(inputs, targets))
