"""The chunked LM-head loss equals the loss over the full logits: values and every gradient."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import memdec.loss
import memdec.train.step
from memdec.loss import LMHead, head_kl_ce_loss, last_hidden, lm_head, sparse_kl_ce_loss
from memdec.testing import tiny_model
from memdec.train import TrainConfig, collate, train
from test_train_loss import random_csr

P_WINDOW, BATCH = 24, 3  # 72 positions


def batch_of(vocab: int, seed: int = 0, with_targets: bool = True):
    csr = random_csr(BATCH * P_WINDOW, vocab, 30, seed=seed)
    tokens = np.random.default_rng(seed + 1).integers(0, vocab, BATCH * P_WINDOW + 1).astype(np.int32)
    return collate(tokens, csr, np.arange(BATCH) * P_WINDOW, P_WINDOW, with_targets)


def targets_of(batch, alpha):
    if alpha == 0 and "target_rows" not in batch:
        return None, None, None
    return batch["target_rows"], batch["target_ids"], batch["target_probs"]


def grads(model) -> dict:
    out = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def dense_run(model, batch, alpha, base=None, beta=0.0):
    logits = model(input_ids=batch["input_ids"]).logits.reshape(-1, model.config.vocab_size)
    base_logits = base(input_ids=batch["input_ids"]).logits.reshape(logits.shape).detach() if base is not None else None
    loss, kl, ce = sparse_kl_ce_loss(
        logits, batch["labels"].reshape(-1), *targets_of(batch, alpha), alpha, base_logits, beta
    )
    loss.backward()
    return (loss.detach(), kl, ce), grads(model)


def chunked_run(model, batch, alpha, budget, base=None, beta=0.0, keep=0):
    probe = batch["input_ids"][:1, :8]
    head = lm_head(model, probe)
    assert head is not None
    hidden = last_hidden(model, batch["input_ids"], P_WINDOW)
    teacher = None
    if base is not None:
        with torch.no_grad():
            teacher = (last_hidden(base, batch["input_ids"], P_WINDOW), lm_head(base, probe))
    loss, kl, ce = head_kl_ce_loss(hidden, head, batch["labels"].reshape(-1), *targets_of(batch, alpha), alpha,
                                   teacher, beta, budget=budget, keep=keep)
    loss.backward()
    return (loss.detach(), kl, ce), grads(model)


def assert_same(dense, chunked):
    for a, b in zip(dense[0], chunked[0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert dense[1].keys() == chunked[1].keys()
    for name in dense[1]:
        torch.testing.assert_close(chunked[1][name], dense[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True), ("gemma3", True)])
@pytest.mark.parametrize("alpha,with_targets", [(0.0, False), (0.0, True), (0.5, True), (1.0, True)])
# 72 positions in 15 chunks or in one; their logits recomputed in backward (keep=0) or kept
@pytest.mark.parametrize("rows_per_chunk,keep", [(5, 0), (5, None), (None, 0)])
def test_chunked_equals_full_logits(tokenizer, arch, tied, alpha, with_targets, rows_per_chunk, keep):
    model = tiny_model(arch, tokenizer, tie_word_embeddings=tied)
    vocab = model.config.vocab_size
    batch = batch_of(vocab, with_targets=with_targets)
    budget = rows_per_chunk * 4 * vocab if rows_per_chunk else None
    dense = dense_run(model, batch, alpha)
    chunked = chunked_run(model, batch, alpha, budget, keep=keep)
    assert_same(dense, chunked)
    embed = model.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is embed) == tied
    assert "lm_head.weight" in chunked[1] or tied  # the untied head gets its gradient too


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.3), (1.0, 1.0)])
def test_chunked_teacher_mixed_with_base(tokenizer, alpha, beta):
    model, base = tiny_model("llama", tokenizer, seed=0), tiny_model("llama", tokenizer, seed=1)
    batch = batch_of(model.config.vocab_size, seed=2)
    assert_same(
        dense_run(model, batch, alpha, base, beta),
        chunked_run(model, batch, alpha, 7 * 4 * model.config.vocab_size, base, beta),
    )


def test_soft_capped_head_and_bias(tokenizer):
    """Gemma 2's final logit soft-capping is reproduced; a head bias gets its gradient."""
    model = tiny_model("gemma3", tokenizer, final_logit_softcapping=3.0)
    batch = batch_of(model.config.vocab_size, seed=3)
    assert lm_head(model, batch["input_ids"][:1, :8]).softcap == 3.0
    assert_same(dense_run(model, batch, 0.5), chunked_run(model, batch, 0.5, 9 * 4 * model.config.vocab_size))

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(50, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 50, (40,), generator=gen)
    h1 = hidden.clone().requires_grad_()
    logits = 2.0 * torch.tanh((h1 @ weight.T + bias) / 2.0)
    sparse_kl_ce_loss(logits, labels, None, None, None, 0.0)[0].backward()
    ref = (h1.grad, weight.grad, bias.grad)
    weight.grad = bias.grad = None
    h2 = hidden.clone().requires_grad_()
    head_kl_ce_loss(h2, LMHead(weight, bias, 2.0), labels, None, None, None, 0.0, budget=3 * 4 * 50)[0].backward()
    for got, want in zip((h2.grad, weight.grad, bias.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # the loss works in fp32


def test_head_that_is_not_reproducible_is_refused(tokenizer):
    model = tiny_model("llama", tokenizer)
    probe = torch.tensor([[5, 6, 7, 8]])
    assert lm_head(model, probe) is not None
    model.config.final_logit_softcapping = 1.0  # Llama ignores it: the head's logits would differ
    assert lm_head(model, probe) is None
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Sequential(model.lm_head)  # a wrapped head (as LoRA on lm_head)
    assert lm_head(model, probe) is None


def test_training_chunked_equals_training_on_full_logits(store, tmp_path, monkeypatch, tokenizer):
    """Two steps through ``train``: several chunks recomputed in backward, one chunk kept, and the full logits."""
    cfg = dict(datastore=str(store), max_steps=2, batch_size=2, block_size=32, lr=1e-3, warmup=1, save_every=2, seed=0)
    patches = {
        "chunks": [(memdec.loss, "LOGITS_BUDGET_BYTES", 7 * 4 * len(tokenizer)), (memdec.loss, "KEEP_LOGITS_BYTES", 0)],
        "one": [],
        "logits": [(memdec.train.step, "lm_head", lambda model, probe: None)],
    }
    runs = {}
    for name, patch in patches.items():
        with monkeypatch.context() as m:
            for target in patch:
                m.setattr(*target)
            out = train(TrainConfig(out=str(tmp_path / name), **cfg))
        runs[name] = (load_file(out / "model.safetensors"),
                      [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()])
    for name in ("chunks", "one"):
        np.testing.assert_allclose(runs[name][1], runs["logits"][1], rtol=1e-5)
        for key, value in runs["logits"][0].items():
            torch.testing.assert_close(runs[name][0][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_lora_wrapped_model(tokenizer):
    """Under LoRA the head is frozen (no weight gradient is made) and the adapters' gradients match;
    adapters on the head itself make it one the chunked loss cannot reproduce."""
    pytest.importorskip("peft")
    from memdec.baselines import BaselineConfig, add_lora

    lora = add_lora(tiny_model("llama", tokenizer), BaselineConfig(datastore="ds", out="o", method="lora", alpha=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))  # B = 0 would hide a wrong gradient
    batch = batch_of(lora.config.vocab_size, with_targets=False)
    dense, chunked = dense_run(lora, batch, 0.0), chunked_run(lora, batch, 0.0, 7 * 4 * lora.config.vocab_size)
    assert_same(dense, chunked)
    assert dense[1] and all("lora_" in name for name in chunked[1])
    on_head = add_lora(tiny_model("llama", tokenizer), BaselineConfig(datastore="ds", out="o", method="lora", alpha=0.0,
                                                                      lora_targets=["lm_head", "q_proj"]))
    assert lm_head(on_head, batch["input_ids"][:1, :8]) is None
