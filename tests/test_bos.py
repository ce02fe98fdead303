"""A tokenizer that puts BOS before every text (Gemma 3) gets it before every window memdec feeds a
model: scoring, datastore keys, kNN-LM and training, each against a brute-force forward."""

import copy
import json

import numpy as np
import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from memdec.data import load_token_stream
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.store import FFNInputCapture, forward_ffn_inputs, open_datastore
from memdec.models import bos_prefix, load_model, with_prefix
from memdec.scoring import base_scorer, score_tokens
from memdec.testing import TINY_EOS, TINY_PAD, save_tiny_model
from memdec.train import TrainConfig, micro_batch_starts, train, window_starts


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The tiny tokenizer, but adding its BOS (id 0) in front of every text, as Gemma's does."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.post_processor = processors.TemplateProcessing(single=f"{TINY_EOS} $A", special_tokens=[(TINY_EOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS, pad_token=TINY_PAD, bos_token=TINY_EOS)


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, bos_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("bos") / "model", "llama", bos_tokenizer, seed=3)


def test_bos_prefix_is_found_only_where_the_tokenizer_adds_it(tokenizer, bos_tokenizer, bos_model_dir):
    assert bos_prefix(tokenizer) is None and bos_prefix(bos_tokenizer) == 0
    _, loaded = load_model(str(bos_model_dir))
    assert bos_prefix(loaded) == 0  # it survives save and load
    ids = torch.tensor([[5, 6], [7, 8]])
    assert with_prefix(ids, None) is ids and with_prefix(ids, 0).tolist() == [[0, 5, 6], [0, 7, 8]]


def test_scoring_puts_bos_before_every_window(bos_model_dir, bos_tokenizer):
    model, _ = load_model(str(bos_model_dir))
    tokens = load_token_stream("austen:valid", bos_tokenizer, 300)
    nll, _ = score_tokens(base_scorer(model), tokens, 64, 32, prefix=0, progress=False)
    start, end, first = 96, 160, 128  # one window of 64 tokens whose last 32 positions it owns
    ids = torch.as_tensor(np.concatenate([[0], tokens[start:end]]).astype(np.int64))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    want = -logp[1 + first - start : 1 + end - start - 1].gather(
        1, torch.as_tensor(tokens[first + 1 : end]).long()[:, None]
    )
    np.testing.assert_allclose(nll[first : end - 1], want[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    plain, _ = score_tokens(base_scorer(model), tokens, 64, 32, progress=False)
    assert not np.allclose(plain, nll)  # the prefix matters


def test_datastore_keys_and_training_see_bos(bos_model_dir, bos_tokenizer, tmp_path):
    out = build_datastore(
        DatastoreConfig(
            model=str(bos_model_dir),
            corpus="austen:valid",
            out=str(tmp_path / "ds"),
            k=8,
            block_size=64,
            stride=32,
            max_tokens=400,
            progress=False,
        )
    )
    store = open_datastore(out)
    assert store.manifest.prefix_token == 0
    model, _ = load_model(str(bos_model_dir))
    tokens = np.array(store.tokens)
    with FFNInputCapture(model, stop=True) as capture:
        hidden = forward_ffn_inputs(
            model, torch.as_tensor(np.concatenate([[0], tokens[:64]]).astype(np.int64))[None], capture
        )
    np.testing.assert_allclose(store.keys[:64].astype(np.float32), hidden[0, 1:].half().float().numpy(), atol=2e-3)

    ckpt = train(TrainConfig(datastore=str(out), out=str(tmp_path / "ck"), alpha=0.0, lr=0.0, max_steps=1, batch_size=1,
                             block_size=32, warmup=0, seed=0))
    logged = json.loads((ckpt / "log.jsonl").read_text().splitlines()[0])
    (s,) = micro_batch_starts(window_starts(len(tokens) - 1, 32), 0, 0, 1)  # the window of step 1, as the seed chose it
    ids = torch.as_tensor(np.concatenate([[0], tokens[s : s + 32]]).astype(np.int64))[None]
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, 1:].float(),
                                               torch.as_tensor(tokens[s + 1 : s + 33]).long())
    assert abs(logged["ce"] - float(ce)) < 1e-4
