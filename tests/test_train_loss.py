"""The training loss and data path against dense, straightforward references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memdec.models import shortened_copy
from memdec.targets import KnnTargets
from memdec.train import collate, lr_at, micro_batch_starts, sparse_kl_ce_loss, window_starts
from memdec.testing import tiny_model


def random_csr(n_rows: int, vocab: int, max_support: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_support + 1, n_rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([rng.choice(vocab, size=n, replace=False) for n in lengths]).astype(np.int32)
    probs = rng.random(offsets[-1]).astype(np.float32)
    rows = np.repeat(np.arange(n_rows), lengths)
    probs /= np.bincount(rows, weights=probs)[rows]
    return KnnTargets(offsets=offsets, token_ids=ids, probs=probs.astype(np.float16), k=0, temperature=1.0, top_m=None)


def dense_rows(csr, positions, vocab):
    dense = torch.zeros(len(positions), vocab, dtype=torch.float64)
    for i, p in enumerate(positions):
        s, e = csr.offsets[p], csr.offsets[p + 1]
        dense[i, csr.token_ids[s:e]] = torch.from_numpy(csr.probs[s:e].astype(np.float64))
    return dense


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_sparse_kl_equals_dense_kl_div(tokenizer, alpha):
    vocab = len(tokenizer)
    csr = random_csr(64, vocab, 40)
    tokens = np.random.default_rng(1).integers(0, vocab, 65).astype(np.int32)
    model = tiny_model("llama", tokenizer)
    batch = collate(tokens, csr, np.array([0, 32]), 32)
    logits = model(input_ids=batch["input_ids"]).logits.reshape(-1, vocab)
    loss, kl, ce = sparse_kl_ce_loss(
        logits, batch["labels"].reshape(-1), batch["target_rows"], batch["target_ids"], batch["target_probs"], alpha
    )

    p = dense_rows(csr, np.arange(64), vocab)
    log_q = F.log_softmax(logits.double(), -1)
    dense_kl = F.kl_div(log_q, p, reduction="batchmean")
    dense_ce = F.cross_entropy(logits.double(), batch["labels"].reshape(-1))
    if alpha > 0:
        torch.testing.assert_close(kl.double(), dense_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce.double(), dense_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), alpha * dense_kl + (1 - alpha) * dense_ce, rtol=1e-5, atol=1e-5)

    # and the gradients agree too
    logits2 = logits.detach().double().requires_grad_()
    ref = alpha * F.kl_div(F.log_softmax(logits2, -1), p, reduction="batchmean") + (1 - alpha) * F.cross_entropy(
        logits2, batch["labels"].reshape(-1)
    )
    ref.backward()
    logits3 = logits.detach().requires_grad_()
    sparse_kl_ce_loss(
        logits3, batch["labels"].reshape(-1), batch["target_rows"], batch["target_ids"], batch["target_probs"], alpha
    )[0].backward()
    torch.testing.assert_close(logits3.grad.double(), logits2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.3), (1.0, 1.0), (0.7, 0.0)])
def test_teacher_mixed_with_base_equals_dense_reference(tokenizer, alpha, beta):
    """t = (1-β)·p_kNN + β·softmax(base): loss, KL and gradient against a dense kl_div."""
    vocab = len(tokenizer)
    csr = random_csr(64, vocab, 40, seed=3)
    batch = collate(np.random.default_rng(2).integers(0, vocab, 65).astype(np.int32), csr, np.array([0, 32]), 32)
    labels = batch["labels"].reshape(-1)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, vocab, generator=gen) * 3
    base_logits = torch.randn(64, vocab, generator=gen) * 3
    teacher = (1 - beta) * dense_rows(csr, np.arange(64), vocab) + beta * F.softmax(base_logits.double(), -1)
    ref_logits = logits.double().requires_grad_()
    dense_kl = F.kl_div(F.log_softmax(ref_logits, -1), teacher, reduction="batchmean")
    ref = alpha * dense_kl + (1 - alpha) * F.cross_entropy(ref_logits, labels)
    ref.backward()
    ours = logits.clone().requires_grad_()
    loss, kl, _ = sparse_kl_ce_loss(
        ours, labels, batch["target_rows"], batch["target_ids"], batch["target_probs"], alpha, base_logits, beta
    )
    loss.backward()
    torch.testing.assert_close(kl.double(), dense_kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-7)


def test_teacher_mixed_with_one_hot_is_a_smaller_alpha(tokenizer):
    """KL to (1-γ)·p_kNN + γ·onehot, weighted α, has the gradient of plain kNN distillation at α(1-γ).

    So sweeping α already sweeps the 'kNN mixed with the next token' teacher; it needs no option.
    """
    vocab = len(tokenizer)
    csr = random_csr(64, vocab, 40, seed=4)
    batch = collate(np.random.default_rng(5).integers(0, vocab, 65).astype(np.int32), csr, np.array([0, 32]), 32)
    labels = batch["labels"].reshape(-1)
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    alpha, gamma = 0.6, 0.25
    onehot = F.one_hot(labels, vocab).double()
    teacher = (1 - gamma) * dense_rows(csr, np.arange(64), vocab) + gamma * onehot
    mixed = logits.clone().requires_grad_()
    (alpha * F.kl_div(F.log_softmax(mixed, -1), teacher, reduction="batchmean")
     + (1 - alpha) * F.cross_entropy(mixed, labels)).backward()
    smaller = logits.float().requires_grad_()
    sparse_kl_ce_loss(
        smaller, labels, batch["target_rows"], batch["target_ids"], batch["target_probs"], alpha * (1 - gamma)
    )[0].backward()
    torch.testing.assert_close(smaller.grad.double(), mixed.grad, rtol=1e-4, atol=1e-7)


def test_collate_aligns_tokens_labels_and_targets():
    csr = random_csr(100, 30, 5)
    tokens = np.arange(101, dtype=np.int32)
    b = collate(tokens, csr, np.array([10, 60]), 8)
    assert b["input_ids"][1, 0] == 60 and b["labels"][1, 0] == 61 and b["labels"][0, -1] == 18
    dense = torch.zeros(16, 30, dtype=torch.float64)
    dense.index_put_((b["target_rows"], b["target_ids"]), b["target_probs"].double(), accumulate=True)
    torch.testing.assert_close(dense, dense_rows(csr, np.r_[10:18, 60:68], 30))


def test_windows_cover_every_position():
    for n, block in [(100, 32), (64, 64), (10, 32), (97, 10)]:
        starts = window_starts(n, block)
        covered = np.zeros(n, int)
        for s in starts:
            covered[s : s + min(block, n)] += 1
        assert covered.min() >= 1 and starts.max() + min(block, n) == n


def test_data_order_is_a_pure_function_and_shards_disjointly():
    starts = window_starts(1000, 10)
    a = micro_batch_starts(starts, 0, 7, 4)
    assert np.array_equal(a, micro_batch_starts(starts, 0, 7, 4))
    r0, r1 = micro_batch_starts(starts, 0, 3, 2, 0, 2), micro_batch_starts(starts, 0, 3, 2, 1, 2)
    assert not set(r0) & set(r1)
    seen = np.concatenate([micro_batch_starts(starts, 0, i, 4) for i in range(25)])
    assert sorted(seen) == sorted(starts)  # one epoch visits each window once


def test_lr_schedule():
    lrs = [lr_at(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] < lrs[9] <= 1.0 and abs(lrs[10] - 1.0) < 1e-9 and lrs[-1] >= 0.1 and lrs[-1] < 0.11


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shortened_copy_keeps_first_blocks(tokenizer, arch):
    big = tiny_model(arch, tokenizer, n_layers=4)
    small = shortened_copy(big, 2)
    assert small.config.num_hidden_layers == 2
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        hs = big(ids, output_hidden_states=True).hidden_states[2]  # after two blocks
        ref = big.get_output_embeddings()(big.base_model.norm(hs) if arch == "llama" else big.base_model.ln_f(hs))
        torch.testing.assert_close(small(ids).logits, ref, rtol=1e-5, atol=1e-5)
