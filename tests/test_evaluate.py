import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memdec.scoring
from memdec.data import load_token_stream
from memdec.evaluate import make_row
from memdec.scoring import base_scorer, score_tokens, target_logprobs
from memdec.testing import tiny_model


@pytest.mark.parametrize("budget_rows", [None, 1, 4])  # the logsumexp in one chunk, or in chunks of 1 and 4 rows
def test_target_logprobs_matches_log_softmax(monkeypatch, budget_rows):
    if budget_rows:
        monkeypatch.setattr(memdec.scoring, "LSE_BUDGET_BYTES", budget_rows * 4 * 50)
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 5
    targets = torch.randint(0, 50, (3, 7))
    ref = F.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(target_logprobs(logits, targets).double(), ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_window_nll_equals_full_sequence(tokenizer, arch, batch_size):
    """With block_size >= the stream, sliding windows must reproduce one full forward exactly;
    with short windows, each position must equal a forward over exactly its own window."""
    model = tiny_model(arch, tokenizer, context=256)
    tokens = load_token_stream("austen:valid", tokenizer, max_tokens=200)
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    with torch.no_grad():
        full = F.cross_entropy(model(ids).logits[0, :-1].double(), ids[0, 1:], reduction="none").float().numpy()
    nll, _ = score_tokens(base_scorer(model), tokens, block_size=256, stride=128, batch_size=batch_size, progress=False)
    np.testing.assert_allclose(nll, full, atol=2e-5)

    block, stride = 48, 16
    nll_w, _ = score_tokens(base_scorer(model), tokens, block, stride, batch_size=batch_size, progress=False)
    from memdec.data import sliding_windows

    for start, end, score_start in sliding_windows(len(tokens), block, stride):
        with torch.no_grad():
            logits = model(ids[:, start:end]).logits[0].double()
        ref = F.cross_entropy(logits, ids[0, start + 1 : end + 1], reduction="none").float().numpy()
        np.testing.assert_allclose(nll_w[score_start:end], ref[score_start - start :], atol=2e-5)


def test_make_row():
    row = make_row("base", "m", np.array([1.0, 3.0], dtype=np.float32), 0.5)
    assert row.nll == 2.0 and math.isclose(row.ppl, math.exp(2.0)) and row.tokens_per_s == 4.0
    assert row.to_json()["lambda"] is None
