"""Transfer of a memory decoder to a base with another tokenizer and architecture (tiny Llama -> tiny Gemma 3)."""

import json

import numpy as np
import pytest
import torch

from memdec.adapt import AdaptConfig, adapt
from memdec.checkpoint import read_memdec_json, write_memdec_json
from memdec.cli import main
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.errors import MemdecError
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model, tokenizer_fingerprint
from memdec.scoring import base_scorer, score_tokens
from memdec.testing import save_tiny_model, tiny_model, tiny_tokenizer
from memdec.transfer import TransferConfig, build_mapping, mapped_rows, source_fingerprint, transfer, transfer_model


@pytest.fixture(scope="module")
def new_tokenizer():
    return tiny_tokenizer(vocab_size=512, n_chars=30_000)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer, tiny_llama_dir):
    """A memory decoder checkpoint for the tiny Llama (tokenizer A, 384 tokens), made by hand."""
    folder = save_tiny_model(tmp_path_factory.mktemp("src-decoder"), "llama", tokenizer, seed=3)
    write_memdec_json(folder, {"base_model": str(tiny_llama_dir), "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                               "lambda": 0.3, "world_size": 1,
                               "train_config": {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "block_size": 64}})
    return folder


@pytest.fixture(scope="module")
def new_base(tmp_path_factory, new_tokenizer):
    """A tiny Gemma 3 base with tokenizer B (512 tokens) and its datastore."""
    base = save_tiny_model(tmp_path_factory.mktemp("gemma-base"), "gemma3", new_tokenizer, seed=0)
    ds = tmp_path_factory.mktemp("gemma-store") / "ds"
    build_datastore(DatastoreConfig(model=str(base), corpus="austen:valid", out=str(ds), k=8, block_size=64,
                                    stride=32, max_tokens=400, progress=False))
    return base, ds


def cfg_for(source, new_base, out, **kw):
    base, ds = new_base
    settings = dict(decoder=str(source), model=str(base), datastore=str(ds), out=str(out), max_steps=2, batch_size=2,
                    block_size=64, warmup=0, lr=1e-3, save_every=50, device="cpu")
    return TransferConfig.from_flat(**{**settings, **kw})  # the flat names: decoder (the source), init (new rows)


def test_mapping_coverage_on_the_known_tokenizers(tokenizer, new_tokenizer):
    cov = build_mapping(tokenizer, new_tokenizer).coverage
    # 128 single bytes >= 0x80 decode to no text: they map byte for byte
    assert cov == {"tokens": 512, "rows": 512, "by_text": 382, "by_bytes": 128, "by_role": 2, "single_piece": 378,
                   "fallback": 0, "mean_pieces": 1.2843, "coverage": 1.0}
    back = build_mapping(new_tokenizer, tokenizer).coverage  # into the larger vocabulary: nearly all one piece
    assert (back["by_text"], back["by_bytes"], back["single_piece"], back["coverage"]) == (254, 128, 378, 1.0)


def test_mapped_rows_are_the_mean_of_the_source_pieces(tokenizer, new_tokenizer):
    old = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    rows = mapped_rows(old, build_mapping(tokenizer, new_tokenizer, n_rows=520))
    assert rows.shape == (520, 8)
    old_vocab = tokenizer.get_vocab()
    for i in range(len(new_tokenizer)):  # brute force, one token at a time
        text = new_tokenizer.decode(new_tokenizer.encode("a") + [i])[1:]
        if i in (0, 1):  # eos/bos and pad: by role
            pieces = [i]
        elif "\ufffd" in text:  # a byte of a longer character: the same byte-level symbols
            pieces = [old_vocab[c] for c in new_tokenizer.convert_ids_to_tokens(i)]
        else:
            pieces = tokenizer.encode(text)
        torch.testing.assert_close(rows[i], old[pieces].mean(0), msg=f"token {i}")
    torch.testing.assert_close(rows[515], old.mean(0))  # a row that is no token: the mean row


def test_random_init_and_roles(tokenizer, new_tokenizer):
    model = tiny_model("llama", tokenizer, seed=3)
    old = model.get_input_embeddings().weight.detach().clone()
    model, cov = transfer_model(model, tokenizer, new_tokenizer, 512, init="random", seed=0)
    new = model.get_input_embeddings().weight
    assert new.shape == (512, old.shape[1]) and cov["init"] == "random"
    assert not torch.allclose(new[0], old[0]) and abs(float(new.detach().std()) / float(old.std()) - 1) < 0.1
    assert model.config.vocab_size == 512 and model.get_output_embeddings().weight is new  # still tied


def test_transfer_round_trip_and_lambda_0_is_the_new_base(tmp_path, source, new_base, tokenizer):
    out = transfer(cfg_for(source, new_base, tmp_path / "ckpt"))
    info = json.loads((out / "memdec.json").read_text())
    base_dir, _ = new_base
    base, new_tok = load_model(str(base_dir))
    assert info["tokenizer_hash"] == tokenizer_fingerprint(new_tok)
    origin = info["transfer"]
    assert origin["source_tokenizer_hash"] == tokenizer_fingerprint(tokenizer) and origin["init"] == "mapped"
    assert origin["mapping"]["coverage"] == 1.0 and origin["source_decoder"] == str(source.resolve())
    joint = MemoryDecoderModel.from_pretrained(base, out, lmbda=0.0)
    ids = np.asarray(new_tok("It is a truth universally acknowledged, that a single man")["input_ids"], dtype=np.int32)
    base_nll, _ = score_tokens(base_scorer(base), ids, 16, 8, progress=False)
    joint_nll, _ = score_tokens(joint.scorer(0.0), ids, 16, 8, progress=False)
    np.testing.assert_array_equal(joint_nll, base_nll)
    enc = new_tok(["Emma Woodhouse, handsome, clever"], return_tensors="pt")
    assert torch.equal(
        joint.generate(**enc, max_new_tokens=6, pad_token_id=1), base.generate(**enc, max_new_tokens=6, pad_token_id=1)
    )
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_frozen_body_keeps_the_body_and_trains_the_ends(tmp_path, source, new_base, tokenizer, new_tokenizer):
    out = transfer(cfg_for(source, new_base, tmp_path / "ckpt", max_steps=1, freeze_body_steps=1))
    start, _ = transfer_model(tiny_model("llama", tokenizer, seed=3), tokenizer, new_tokenizer, 512)
    trained, _ = load_model(str(out))
    before, after = start.state_dict(), trained.state_dict()
    body = [k for k in before if "embed_tokens" not in k and "lm_head" not in k]
    assert body and all(torch.equal(before[k], after[k]) for k in body)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_budget_is_a_fraction_of_the_source_tokens(tmp_path, source, new_base):
    out = transfer(cfg_for(source, new_base, tmp_path / "ckpt", max_steps=None, budget=0.25, init="random"))
    info = json.loads((out / "memdec.json").read_text())
    assert info["train_config"]["max_steps"] == 1 and info["transfer"]["init"] == "random"  # 0.25 x 4 steps of 2x64


def test_bad_settings_are_one_line(tmp_path, source, new_base):
    for kw, msg in (({"init": "copy"}, "mapped or random"), ({"budget": 0.5}, "not both"),
                    ({"init_layers": 1}, "body is kept whole"), ({"freeze_body_steps": -1}, "at least 0")):
        with pytest.raises(MemdecError, match=msg):
            transfer(cfg_for(source, new_base, tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, source, new_base, capsys):
    base, ds = new_base
    rc = main(["transfer", "--decoder", str(source), "--model", str(base), "--datastore", str(ds), "--out",
               str(tmp_path / "c"), "--max-steps", "1", "--block-size", "32", "--device", "cpu", "--init", "random"])
    assert rc == 0 and "transferred memory decoder" in capsys.readouterr().out
    assert main(["transfer", "--decoder", str(tmp_path), "--model", str(base), "--datastore", str(ds),
                 "--out", str(tmp_path / "d"), "--max-steps", "1"]) == 2


# --------------------------------------------------------------------------------------------
# memdec adapt --transfer-from


def adapt_cfg(source, new_base, out, **kw):
    base, _ = new_base
    settings = dict(model=str(base), corpus="austen:valid", valid="austen:test", test="austen:train", out=str(out),
                    train_tokens=400, valid_tokens=120, test_tokens=120, k=8, block_size=64, batch_size=2, lr=1e-3,
                    samples=0, alpha=[0.5], task_items=0, general="none", transfer_from=str(source))
    return AdaptConfig(**{**settings, **kw})


def test_adapt_transfer_from_runs_end_to_end(tmp_path, source, new_base, capsys):
    run = adapt(adapt_cfg(source, new_base, tmp_path / "run"))
    info = read_memdec_json(run / "memdec")
    origin = info["transfer"]
    assert origin["source_decoder"] == str(source.resolve()) and origin["init"] == "mapped"
    assert info["train_config"]["max_steps"] == 1  # 0.25 x the source's 4 steps of 2x64 tokens, at 2x64 per step
    stages = json.loads((run / "stages.json").read_text())
    assert stages["train"]["inputs"]["transfer"] == {
        "source": source_fingerprint(str(source)),
        "budget": 0.25,
        "init": "mapped",
    }
    report = json.loads((run / "report.json").read_text())
    assert report["sizes"]["memdec_transfer"] == origin
    kept_router = stages["router"]["summary"]["kept"]  # the router stage adds its row only where it wins on valid
    assert [r["system"] for r in report["results"]] == ["base", "knn-lm", "memdec"] + ["memdec+router"] * kept_router
    assert f"transferred from `{source.resolve()}`" in (run / "report.md").read_text()

    base, new_tok = load_model(str(new_base[0]))
    joint = MemoryDecoderModel.from_pretrained(base, run / "memdec", lmbda=0.0)  # the result loads for the new base
    ids = np.asarray(new_tok("It is a truth universally acknowledged, that a single man")["input_ids"], dtype=np.int32)
    base_nll, _ = score_tokens(base_scorer(base), ids, 16, 8, progress=False)
    np.testing.assert_array_equal(score_tokens(joint.scorer(0.0), ids, 16, 8, progress=False)[0], base_nll)

    capsys.readouterr()
    adapt(adapt_cfg(source, new_base, run))  # the same settings: cached
    assert (
        "train: memory decoder" in (out := capsys.readouterr().out)
        and "cached" in out.split("train:")[1].splitlines()[0]
    )
    adapt(adapt_cfg(source, new_base, run, transfer_init="random"))  # another init: the train stage is redone
    assert read_memdec_json(run / "memdec")["transfer"]["init"] == "random"


def test_adapt_bad_transfer_settings_are_one_line_before_anything_loads(tmp_path, source, new_base, capsys):
    not_a_decoder = tmp_path / "plain"
    not_a_decoder.mkdir()
    half = tmp_path / "half"  # a memdec.json without the model
    half.mkdir()
    (half / "memdec.json").write_text((source / "memdec.json").read_text())
    for kw, msg in (({"transfer_from": str(not_a_decoder)}, "--transfer-from: .*no memdec.json"),
                    ({"transfer_from": str(tmp_path / "missing")}, "no such memory decoder"),
                    ({"transfer_from": str(half)}, "no model config"),
                    ({"transfer_init": "copy"}, "mapped or random"),
                    ({"transfer_budget": 0.5, "max_steps": 3}, "give one"),
                    ({"transfer_budget": -1.0}, "positive fraction"),
                    ({"init_layers": 1}, "one or the other"),
                    ({"transfer_from": None, "transfer_budget": 0.5}, "need --transfer-from")):
        with pytest.raises(MemdecError, match=msg):
            adapt(adapt_cfg(source, new_base, tmp_path / "run", **kw))
    assert not (tmp_path / "run").exists()  # nothing written, so nothing loaded
    base, _ = new_base
    rc = main(["adapt", "--model", str(base), "--out", str(tmp_path / "run"), "--transfer-from", str(not_a_decoder)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--transfer-from" in err and not (tmp_path / "run").exists()
