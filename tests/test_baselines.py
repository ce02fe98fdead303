"""Baselines on tiny models: LoRA's exact start, the α=0 ablation, one harness for every row, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from memdec.adapt import AdaptConfig, adapt
from memdec.report import format_summary
from memdec.baselines import BaselineConfig, add_lora, train_baseline
from memdec.cli import main
from memdec.data import load_token_stream, read_corpus
from memdec.errors import CorpusError, MemdecError
from memdec.evaluate import EvalConfig, run_eval_report
from memdec.scoring import base_scorer, score_tokens
from memdec.testing import save_tiny_model, tiny_model, tiny_tokenizer
from memdec.train import TrainConfig, train

BUDGET = dict(max_steps=4, batch_size=2, block_size=32, lr=1e-3, warmup=1, save_every=2, eval_every=2, seed=0,
              valid="austen:test", valid_max_tokens=200)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A memory decoder (alpha 0.5), and the three baselines, all with BUDGET on the same datastore."""
    root = tmp_path_factory.mktemp("trained")
    out = {"memdec": train(TrainConfig(datastore=str(store), out=str(root / "memdec"), alpha=0.5, **BUDGET))}
    for method in ("ce-decoder", "dapt", "lora"):
        out[method] = train_baseline(
            BaselineConfig(method=method, datastore=str(store), out=str(root / method), **BUDGET)
        )
    return out


# -- LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_with_zero_b_is_the_base_model_exactly(tokenizer, arch):
    base = tiny_model(arch, tokenizer, seed=3)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(ids).logits.clone()
    lora = add_lora(base, BaselineConfig(method="lora", out="unused", datastore="unused"))
    adapters = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert adapters and all(torch.count_nonzero(p) == 0 for p in adapters)  # B starts at zero
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the base is frozen
    lora.eval()
    with torch.no_grad():
        assert torch.equal(lora(input_ids=ids).logits, expected)


def test_lora_unknown_target_modules_is_one_clear_error(tokenizer):
    with pytest.raises(MemdecError, match="linear layers: .*q_proj"):
        add_lora(
            tiny_model("llama", tokenizer), BaselineConfig(method="lora", out="x", datastore="x", lora_targets=["qkv"])
        )


def test_lora_resumes_exactly(store, tmp_path, interrupt_at):
    cfg = dict(method="lora", datastore=str(store), **{**BUDGET, "valid": None})
    straight = train_baseline(BaselineConfig(out=str(tmp_path / "a"), **cfg))
    with pytest.raises(interrupt_at.error):
        train_baseline(BaselineConfig(out=str(tmp_path / "b"), **cfg), on_step=interrupt_at(2))
    resumed = train_baseline(BaselineConfig(out=str(tmp_path / "b"), **cfg))
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(torch.count_nonzero(a[k]) for k in a if "lora_B" in k)  # it did learn


# -- training: same tokens, same budget ------------------------------------------------------


def test_baselines_record_their_budget(trained, store):
    manifest = json.loads((store / "manifest.json").read_text())
    infos = {m: json.loads((trained[m] / "baseline.json").read_text()) for m in ("ce-decoder", "dapt", "lora")}
    memdec = json.loads((trained["memdec"] / "memdec.json").read_text())
    for method, info in infos.items():
        assert info["method"] == method and info["corpus_hash"] == manifest["corpus_hash"] == memdec["corpus_hash"]
        assert info["train_config"]["max_steps"] == 4 and info["train_config"]["alpha"] == 0.0
        assert info["train_seconds"] > 0 and info["tokenizer_hash"] == manifest["tokenizer_hash"]
    assert (
        infos["lora"]["trainable_parameters"] < infos["dapt"]["trainable_parameters"] == memdec["trainable_parameters"]
    )
    assert infos["dapt"]["lambda"] is None and 0 < infos["ce-decoder"]["lambda"] <= 1
    assert (trained["ce-decoder"] / "memdec.json").is_file()  # it loads as a memory decoder
    assert (trained["lora"] / "adapter_model.safetensors").is_file()


def test_corpus_route_trains_on_the_datastore_tokens(trained, store, tiny_llama_dir, tmp_path):
    out = train_baseline(BaselineConfig(method="dapt", model=str(tiny_llama_dir), corpus="austen:valid", max_tokens=600,
                                        out=str(tmp_path / "dapt"), **BUDGET))
    info = json.loads((out / "baseline.json").read_text())
    assert info["corpus_hash"] == json.loads((store / "manifest.json").read_text())["corpus_hash"]
    a, b = load_file(out / "model.safetensors"), load_file(trained["dapt"] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ce_decoder_rows_equal_a_memory_decoder_trained_with_alpha_0(store, trained, tiny_llama_dir, tmp_path):
    alpha0 = train(TrainConfig(datastore=str(store), out=str(tmp_path / "alpha0"), alpha=0.0, **BUDGET))
    a, b = load_file(alpha0 / "model.safetensors"), load_file(trained["ce-decoder"] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = run_eval_report(EvalConfig(model=str(tiny_llama_dir), corpus="austen:train", max_tokens=300, block_size=64,
                                        memdec=str(alpha0), baseline=[str(trained["ce-decoder"])], sweep=True,
                                        valid="austen:test", general="general:test"))
    mem, ce = report.rows[1].to_json(), report.rows[2].to_json()
    assert (mem["system"], ce["system"]) == ("memdec", "ce-decoder")
    for key in ("lambda", "nll", "ppl", "alone_ppl", "valid_ppl", "general_ppl", "trainable_parameters"):
        assert mem[key] == ce[key], key
    assert (
        report.extra["sweep"]["systems"]["memdec"]["test_ppl"]
        == report.extra["sweep"]["systems"]["ce-decoder"]["test_ppl"]
    )


# -- evaluation: one harness, the same tokens, the general corpus ------------------------------


def test_eval_every_row_on_the_same_tokens(trained, store, tiny_llama_dir, tokenizer, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [
        "eval",
        "--model",
        str(tiny_llama_dir),
        "--corpus",
        "austen:train",
        "--max-tokens",
        "300",
        "--block-size",
        "64",
        "--memdec",
        str(trained["memdec"]),
        "--knn",
        str(store),
        "--sweep",
        "--valid",
        "austen:test",
        "--general",
        "general:test",
        "--general-max-tokens",
        "250",
        "--json",
        str(out),
    ]
    for method in ("lora", "dapt", "ce-decoder"):  # any order: rows come out in a fixed one
        args += ["--baseline", str(trained[method])]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [r["system"] for r in rows] == ["base", "knn-lm", "memdec", "ce-decoder", "dapt", "lora"]
    assert report["tokens"] == 299 and all(r["tokens"] == report["tokens"] for r in rows)
    assert report["general"] == {"corpus": "general:test", "tokens": 249}
    assert all(r["general_ppl"] is not None and r["general_ppl"] > 1 for r in rows)
    assert [r["lambda"] is None for r in rows] == [True, False, False, False, True, True]
    assert all({"trainable_parameters", "train_seconds", "inference_ratio"} <= set(r) for r in rows)
    by = {r["system"]: r for r in rows}
    assert by["base"]["trainable_parameters"] == 0 == by["knn-lm"]["trainable_parameters"]
    assert by["lora"]["trainable_parameters"] < by["dapt"]["trainable_parameters"]
    assert by["base"]["inference_ratio"] == 1.0 and by["memdec"]["train_seconds"] > 0
    # each row's number is its own model scored on those same windows
    general = load_token_stream("general:test", tokenizer, 250)
    nll, _ = score_tokens(base_scorer(tiny_model_from(tiny_llama_dir)), general, 64, 32, progress=False)
    assert math.isclose(by["base"]["general_ppl"], math.exp(float(np.mean(nll, dtype=np.float64))), rel_tol=1e-4)
    dapt = tiny_model_from(trained["dapt"])
    test = load_token_stream("austen:train", tokenizer, 300)
    nll, _ = score_tokens(base_scorer(dapt), test, 64, 32, progress=False)
    assert math.isclose(by["dapt"]["nll"], float(np.mean(nll, dtype=np.float64)), rel_tol=1e-5)
    assert "general ppl" in printed and "lora" in printed


def tiny_model_from(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def test_baseline_errors_are_one_line(store, trained, tiny_llama_dir, tmp_path, capsys):
    train_args = [
        "baseline",
        "--datastore",
        str(store),
        "--out",
        str(tmp_path / "x"),
        "--max-steps",
        "1",
        "--block-size",
        "32",
    ]
    other = save_tiny_model(tmp_path / "other-base", "llama", tiny_tokenizer(), seed=7)  # same tokenizer, other weights
    other_tok = save_tiny_model(tmp_path / "other-tok", "llama", tiny_tokenizer(vocab_size=300))
    eval_args = ["eval", "--corpus", "austen:test", "--max-tokens", "60", "--block-size", "32"]
    cases = [
        (train_args + ["--method", "prefix-tuning"], "unknown --method 'prefix-tuning'"),
        (train_args + ["--method", "dapt", "--alpha", "0.5"], "--alpha must be 0"),
        (
            train_args + ["--method", "dapt", "--corpus", "austen:valid", "--model", str(tiny_llama_dir)],
            "--datastore DS",
        ),
        (train_args + ["--method", "lora", "--init-layers", "1"], "starts from the base model itself"),
        (train_args + ["--method", "lora", "--lora-targets", "nope"], "this model's linear layers"),
        (eval_args + ["--model", str(other), "--baseline", str(trained["dapt"])], "was trained from base model"),
        (eval_args + ["--model", str(other_tok), "--baseline", str(trained["lora"])], "another tokenizer"),
        (eval_args + ["--model", str(tiny_llama_dir), "--baseline", str(tmp_path)], "no baseline.json"),
        (
            eval_args
            + ["--model", str(tiny_llama_dir), "--baseline", str(trained["dapt"]), "--baseline", str(trained["dapt"])],
            "one per method",
        ),
    ]
    for args, needle in cases:
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


# -- the general corpus ----------------------------------------------------------------------


def test_general_corpus_is_built_in():
    docs = read_corpus("general:test")
    assert len(docs) == 261 and docs[0].text.startswith("Afghanistan\n\n")
    assert 250_000 < sum(len(d.text) for d in docs) < 400_000
    assert not any("austen" in d.text.lower() for d in docs)
    with pytest.raises(CorpusError, match="general:test"):
        read_corpus("general:valid")


# -- the main job ----------------------------------------------------------------------------


def test_adapt_with_baselines(tiny_llama_dir, tmp_path, capsys):
    cfg = AdaptConfig(
        model=str(tiny_llama_dir),
        corpus="austen:valid",
        valid="austen:test",
        test="austen:train",
        out=str(tmp_path / "run"),
        train_tokens=600,
        valid_tokens=200,
        test_tokens=200,
        k=8,
        block_size=64,
        batch_size=2,
        max_steps=3,
        lr=1e-3,
        samples=1,
        baselines=True,
        general_tokens=150,
        task_items=4,
    )
    run = adapt(cfg)
    report = json.loads((run / "report.json").read_text())
    rows = report["results"]
    assert [r["system"] for r in rows] == ["base", "knn-lm", "memdec", "ce-decoder", "dapt", "lora"]
    assert all(r["tokens"] == report["tokens"] == 199 for r in rows)
    assert all(r["general_ppl"] is not None and r["trainable_parameters"] is not None for r in rows)
    assert all(r["train_seconds"] is not None for r in rows)
    assert all(r["inference_ratio"] > 0 for r in rows)
    for method in ("ce-decoder", "dapt", "lora"):  # the memory decoder's budget
        info = json.loads((run / "baselines" / method / "baseline.json").read_text())
        memdec = json.loads((run / "memdec" / "memdec.json").read_text())
        for key in ("max_steps", "batch_size", "block_size", "warmup", "min_lr_ratio", "seed", "valid", "epochs"):
            assert info["train_config"][key] == memdec["train_config"][key], key
        assert info["corpus_hash"] == memdec["corpus_hash"]
        assert info["train_config"]["lr"] == (5 * 1e-3 if method == "lora" else 1e-3)
    md = (run / "report.md").read_text()
    assert "| lora |" in md and "general ppl" in md and "trainable params" in md
    # the ce-decoder is the α=0 teacher candidate, the same recipe on the same tokens: reused, not trained twice
    ce = run / "baselines" / "ce-decoder"
    assert json.loads((ce / "baseline.json").read_text())["reused_from"] == "candidates/alpha-0"
    weights = "model.safetensors"  # adapt's default decoder, a full copy: its model file
    assert (ce / weights).samefile(run / "candidates" / "alpha-0" / weights)
    assert "not trained twice" in md
    assert "lora" in format_summary(run)
    tasks = json.loads((run / "tasks.json").read_text())  # every system, the baselines too, on the lm-eval tasks
    assert [r["system"] for r in tasks["results"]] == [r["system"] for r in rows]
    assert all(e["n"] == tasks["tasks"][t]["items"] for r in tasks["results"] for t, e in r["tasks"].items())
    assert "| facts acc | general acc |" in md
    capsys.readouterr()

    adapt(cfg)  # every stage cached
    out = capsys.readouterr().out
    assert out.count("cached") == 9 and "[3/9] ce-decoder" in out  # the router stage too

    # the run's folder gives eval its baselines too
    assert main(["eval", "--run", str(run), "--corpus", "austen:test", "--max-tokens", "80", "--block-size", "64",
                 "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [r["system"] for r in rows] == ["base", "knn-lm", "memdec", "ce-decoder", "dapt", "lora"]
