"""Generation with a memory decoder: the equivalences that anchor it, the logits processor, the CLI."""

import json

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from memdec.cli import main
from memdec.errors import MemdecError
from memdec.generate import GenerateConfig, run_generate
from memdec.joint import MemoryDecoderLogitsProcessor, MemoryDecoderModel
from memdec.models import tokenizer_fingerprint
from memdec.testing import save_tiny_model, tiny_model, tiny_tokenizer

PEAKED = {"initializer_range": 0.3}  # random tiny models with varied, non-flat distributions
PROMPTS = ["It is a truth universally acknowledged, that", "Emma", "The family of Dashwood had long been settled"]
STRATEGIES = {
    "greedy": {},
    "sample": {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95},
    "beam": {"num_beams": 3},
}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request, tokenizer):
    base = tiny_model(request.param, tokenizer, seed=0, **PEAKED)
    memdec = tiny_model(request.param, tokenizer, seed=1, **PEAKED)
    return base, memdec


def encode(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def gen(model, enc, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(**enc, max_new_tokens=12, pad_token_id=1, **kw)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lambda_0_is_the_base_and_lambda_1_the_memory_decoder(models, tokenizer, strategy):
    base, memdec = models
    enc = encode(tokenizer, PROMPTS[:2])
    kw = STRATEGIES[strategy]
    joint = MemoryDecoderModel(base, memdec, lmbda=0.0)
    assert torch.equal(gen(joint, enc, **kw), gen(base, enc, **kw))
    joint.lmbda = 1.0
    assert torch.equal(gen(joint, enc, **kw), gen(memdec, enc, **kw))
    joint.lmbda = 0.5  # and the mixture is neither
    mixed = gen(joint, enc, **kw)
    assert not torch.equal(mixed, gen(base, enc, **kw)) and not torch.equal(mixed, gen(memdec, enc, **kw))


@pytest.mark.parametrize("strategy", ["beam", "beam_sample", "sample"])
def test_cached_generation_equals_recomputation(models, tokenizer, strategy):
    """With caches, beam search must reorder both models' caches; without, each step reruns the full prefix."""
    kw = {"beam": {"num_beams": 4}, "beam_sample": {"num_beams": 3, "do_sample": True}, "sample": {"do_sample": True}}
    joint = MemoryDecoderModel(*models, lmbda=0.4)
    enc = encode(tokenizer, PROMPTS)
    cached = gen(joint, enc, seed=5, **kw[strategy])
    assert torch.equal(cached, gen(joint, enc, seed=5, use_cache=False, **kw[strategy]))


def test_batched_left_padded_prompts_equal_each_alone(models, tokenizer):
    joint = MemoryDecoderModel(*models, lmbda=0.4)
    enc = encode(tokenizer, PROMPTS)
    assert (enc["attention_mask"] == 0).any()
    batch = gen(joint, enc)
    width = enc["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        one = encode(tokenizer, [prompt])
        alone = gen(joint, one)[0, one["input_ids"].shape[1] :].tolist()
        row = batch[i, width:].tolist()
        # a prompt alone stops at EOS (id 0); in the batch, its row goes on with padding (id 1)
        assert row[: len(alone)] == alone and set(row[len(alone) :]) <= {1}, prompt


def test_eos_and_stopping_criteria(models, tokenizer):
    base, memdec = models
    joint = MemoryDecoderModel(base, memdec, lmbda=0.4)
    enc = encode(tokenizer, PROMPTS[:1])
    n = enc["input_ids"].shape[1]
    free = gen(joint, enc)[0, n:].tolist()
    eos = free[3]  # make the 4th generated token the EOS
    stopped = gen(joint, enc, eos_token_id=eos)[0, n:].tolist()
    assert stopped == free[: free.index(eos) + 1]

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= n + 5, dtype=torch.bool)

    for kw in ({}, {"num_beams": 2}):
        out = gen(joint, enc, stopping_criteria=StoppingCriteriaList([StopAfter()]), **kw)
        assert out.shape[1] == n + 5
    # at λ=0 EOS handling is the base model's own, in a batch with padding after EOS
    joint.lmbda = 0.0
    batch = encode(tokenizer, PROMPTS)
    assert torch.equal(gen(joint, batch, eos_token_id=eos), gen(base, batch, eos_token_id=eos))


# -- the logits processor --------------------------------------------------------------------


def test_processor_agrees_with_the_wrapper(models, tokenizer):
    base, memdec = models
    joint = MemoryDecoderModel(base, memdec, lmbda=0.35)
    for texts in (PROMPTS[:1], PROMPTS):
        enc = encode(tokenizer, texts)
        for kw in ({}, {"do_sample": True, "top_k": 30}):
            proc = MemoryDecoderLogitsProcessor(memdec, 0.35, attention_mask=enc["attention_mask"])
            via_proc = gen(base, enc, logits_processor=LogitsProcessorList([proc]), **kw)
            assert torch.equal(via_proc, gen(joint, enc, **kw)), (texts, kw)
    # λ=0: the processor leaves the base model's choices alone
    enc = encode(tokenizer, PROMPTS)
    proc = MemoryDecoderLogitsProcessor(memdec, 0.0, attention_mask=enc["attention_mask"])
    assert torch.equal(gen(base, enc, logits_processor=[proc]), gen(base, enc))


def test_processor_keeps_earlier_masks(models, tokenizer):
    base, memdec = models
    enc = encode(tokenizer, PROMPTS[:1])
    n = enc["input_ids"].shape[1]
    free = gen(base, enc, logits_processor=[MemoryDecoderLogitsProcessor(memdec, 0.5)])[0, n:].tolist()
    banned = free[0]
    out = gen(base, enc, bad_words_ids=[[banned]], logits_processor=[MemoryDecoderLogitsProcessor(memdec, 0.5)])
    assert banned not in out[0, n:].tolist()
    # directly: whatever an earlier processor set to -inf stays -inf, the rest is a distribution
    ids = enc["input_ids"]
    with torch.no_grad():
        scores = base(ids).logits[:, -1]
    scores[:, :10] = -float("inf")
    mixed = MemoryDecoderLogitsProcessor(memdec, 0.5)(ids, scores)
    assert torch.isneginf(mixed[:, :10]).all() and torch.isfinite(mixed[:, 10:]).all()


def test_processor_refuses_beam_search(models, tokenizer):
    base, memdec = models
    enc = encode(tokenizer, PROMPTS[:2])
    with pytest.raises(MemdecError, match="beam search"):  # found at the first call, from the mask's batch size
        gen(base, enc, num_beams=3, logits_processor=[MemoryDecoderLogitsProcessor(memdec, 0.5, enc["attention_mask"])])
    with pytest.raises(MemdecError, match="beam search"):  # without a mask: found when beams are reordered
        gen(base, encode(tokenizer, PROMPTS[:1]), num_beams=3, max_length=40,
            logits_processor=[MemoryDecoderLogitsProcessor(memdec, 0.5)])
    with pytest.raises(MemdecError, match="lambda"):
        MemoryDecoderLogitsProcessor(memdec, 1.01)
    proc = MemoryDecoderLogitsProcessor(memdec, 0.5)
    one = encode(tokenizer, PROMPTS[:1])
    gen(base, one, logits_processor=[proc])
    with pytest.raises(MemdecError, match="reset"):  # a second call needs reset()
        gen(base, one, logits_processor=[proc])
    proc.reset()
    gen(base, one, logits_processor=[proc])


# -- memdec generate -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    folder = save_tiny_model(tmp_path_factory.mktemp("memdec-ckpt"), "llama", tokenizer, seed=1, **PEAKED)
    (folder / "memdec.json").write_text(json.dumps({
        "format": "memdec", "version": 1, "base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "lambda": 0.3, "alpha": 0.5, "k": None, "knn_temperature": None, "datastore_manifest_hash": None,
        "train_stats": {}}))
    return folder


def test_generate_cli_compare(tiny_llama_dir, ckpt, capsys):
    rc = main(["generate", "--model", str(tiny_llama_dir), "--memdec", str(ckpt), "--prompt", "It is a truth", "Emma",
               "--compare", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("prompt: ") == 2 and "base + memdec (λ=0.30)" in out and "base" in out
    # λ=0: base and joint continuations agree, for greedy, sampling and beams; the processor agrees too
    for extra in ({}, {"do_sample": True, "top_k": 20}, {"num_beams": 2}, {"processor": True}):
        cfg = GenerateConfig(memdec=str(ckpt), prompt=["It is a truth", "Emma"], model=str(tiny_llama_dir),
                             lmbda=0.0, compare=True, max_new_tokens=6, **extra)
        assert all(r["base"] == r["joint"] for r in run_generate(cfg)), extra
    cfg = GenerateConfig(memdec=str(ckpt), prompt=["It is a truth"], model=str(tiny_llama_dir), max_new_tokens=6)
    joint_only = run_generate(cfg)
    assert joint_only[0]["base"] is None and joint_only[0]["lambda"] == 0.3
    via_processor = run_generate(GenerateConfig(**{**cfg.__dict__, "processor": True}))
    assert via_processor[0]["joint"] == joint_only[0]["joint"]


def test_generate_cli_errors(tiny_llama_dir, ckpt, tmp_path, capsys):
    other = tiny_tokenizer(vocab_size=400)
    wrong = save_tiny_model(tmp_path / "wrong", "llama", other, seed=1)
    (wrong / "memdec.json").write_text(json.dumps({"format": "memdec", "version": 1, "base_model": "x",
                                                   "tokenizer_hash": tokenizer_fingerprint(other), "lambda": 0.3}))
    base = ["generate", "--model", str(tiny_llama_dir), "--prompt", "Emma", "--max-new-tokens", "3"]
    cases = [
        (["--memdec", str(ckpt), "--processor", "--num-beams", "2"], "--num-beams does not work with --processor"),
        (["--memdec", str(ckpt), "--lambda", "-0.5"], "must lie in [0, 1]"),
        (["--memdec", str(wrong)], "another tokenizer"),
        (["--memdec", str(ckpt), "--top-k", "5"], "only apply with --do-sample"),
    ]
    for extra, needle in cases:
        rc = main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err)
