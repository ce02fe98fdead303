"""kNN-LM at inference: exact retrieval against brute force, mixing, generation, bad input."""

import math

import numpy as np
import pytest
import torch

from memdec.data import load_token_stream
from memdec.store import FFNInputCapture
from memdec.errors import DatastoreError, TokenizerMismatchError
from memdec.scoring import base_scorer, score_tokens
from memdec.knnlm import KnnLMLogitsProcessor, KnnRetriever, choose_temperature_and_lambda, knn_pass, temperature_grid
from memdec.models import load_model


def test_knn_pass_matches_brute_force(store, tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    retriever = KnnRetriever(str(store), k=16, tokenizer=tok)
    tokens = load_token_stream("austen:test", tok, max_tokens=120)
    kp = knn_pass(model, retriever, tokens, 64, 32, progress=False)
    ref_nll, _ = score_tokens(base_scorer(model), tokens, 64, 32, progress=False)
    np.testing.assert_allclose(kp.nll_base, ref_nll, atol=1e-6)

    # brute force: keys of each position from its own window, against every stored key
    from memdec.data import sliding_windows

    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    keys = np.empty((len(tokens) - 1, retriever.store.dim), np.float32)
    with FFNInputCapture(model) as cap, torch.no_grad():
        for start, end, s in sliding_windows(len(tokens), 64, 32):
            model(ids[:, start:end])
            keys[s:end] = cap.last[0, s - start :].numpy()
    stored = torch.from_numpy(np.asarray(retriever.store.keys, dtype=np.float32))
    d2 = torch.cdist(torch.from_numpy(keys), stored) ** 2
    ref_d, ref_i = d2.topk(16, largest=False)
    np.testing.assert_allclose(kp.dists, ref_d.numpy(), rtol=1e-3, atol=1e-3)
    assert (kp.values == np.asarray(retriever.store.values)[ref_i.numpy()]).mean() > 0.99  # ties may swap

    # p_kNN(target) against a direct sum
    t = 2.0
    w = torch.softmax(-ref_d.double() / t, -1)
    hit = (
        torch.from_numpy(np.asarray(retriever.store.values)[ref_i.numpy()])
        == torch.from_numpy(tokens[1:]).long()[:, None]
    )
    ref_knn = -torch.log((w * hit).sum(-1)).numpy()
    np.testing.assert_allclose(kp.knn_nll(t), ref_knn, rtol=1e-3, atol=1e-3)

    lam_t, lam, ppl = choose_temperature_and_lambda(kp, [0.0, 0.25, 0.5], temperature_grid(kp.dists))
    assert lam in (0.25, 0.5) and lam_t > 0 and math.isfinite(ppl)


def test_processor_lambda_zero_is_base_and_one_is_knn_argmax(store, tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    retriever = KnnRetriever(str(store), k=8, tokenizer=tok)
    enc = tok("It was a truth", return_tensors="pt")
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    base = model.generate(**enc, **gen)
    with KnnLMLogitsProcessor(model, retriever, lmbda=0.0, temperature=1.0) as proc:
        assert torch.equal(model.generate(**enc, logits_processor=[proc], **gen), base)
    with KnnLMLogitsProcessor(model, retriever, lmbda=1.0, temperature=1.0) as proc:
        out = model.generate(**enc, logits_processor=[proc], output_scores=True, return_dict_in_generate=True, **gen)
    # every chosen token is one of the retrieved values
    vals = np.asarray(retriever.store.values)
    assert set(out.sequences[0, enc.input_ids.shape[1]:].tolist()) <= set(vals.tolist())


def test_bad_inputs(store, tiny_gpt2_dir, tiny_llama_dir):
    from memdec.testing import tiny_tokenizer

    with pytest.raises(TokenizerMismatchError):
        KnnRetriever(str(store), k=8, tokenizer=tiny_tokenizer(vocab_size=300))
    gpt2, tok = load_model(str(tiny_gpt2_dir))
    retriever = KnnRetriever(str(store), k=8, tokenizer=tok)  # same tokenizer, other model
    with pytest.raises(DatastoreError, match="build the datastore with this base model"):
        knn_pass(gpt2, retriever, np.arange(50, dtype=np.int32), 32, 16, progress=False)
    with pytest.raises(DatastoreError, match="keys"):
        KnnRetriever(str(store), k=10_000)


def test_retrieval_scorer_equals_pass_then_mix(store, tiny_llama_dir):
    from memdec.scoring import mix_nll
    from memdec.knnlm import knn_lm_scorer

    model, tok = load_model(str(tiny_llama_dir))
    retriever = KnnRetriever(str(store), k=8, tokenizer=tok)
    tokens = load_token_stream("austen:test", tok, max_tokens=100)
    kp = knn_pass(model, retriever, tokens, 64, 32, progress=False)
    for lam in (0.0, 0.3):
        scorer = knn_lm_scorer(model, retriever, lam, 2.0)
        nll, _ = score_tokens(scorer, tokens, 64, 32, progress=False)
        scorer.close()
        np.testing.assert_allclose(nll, mix_nll(kp.nll_base, kp.knn_nll(2.0), lam), rtol=1e-5, atol=1e-5)
