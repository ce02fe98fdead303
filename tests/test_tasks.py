"""lm-evaluation-harness: the memdec model, the facts and general task writers, the CLI (offline, tiny models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from memdec.cli import main  # noqa: E402
from memdec.tasks import memdec_lm_class, register, write_facts_task, write_general_task  # noqa: E402
from test_baselines import trained  # noqa: E402,F401  (the memory decoder and baselines, 4 steps each)
from test_joint import write_checkpoint  # noqa: E402


def read_items(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def facts_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("facts")
    write_facts_task(
        "austen:train", "austen:test", out, tokenizer, n_items=12, max_tokens=20000, heldout_max_tokens=8000
    )
    return out


@pytest.fixture(scope="module")
def general_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("general")
    write_general_task("general:test", out, n_items=12, context_words=30)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("memdec-ckpt"), tokenizer)


# -- the task writers ------------------------------------------------------------------------


def test_facts_items_are_true_continuations_with_distinct_distractors(facts_dir, tokenizer):
    items = read_items(facts_dir / "memdec_facts.jsonl")
    assert 5 <= len(items) <= 12
    held = tokenizer.decode(
        __import__("memdec.data", fromlist=["x"]).load_token_stream("austen:test", tokenizer, 8000).tolist()
    )
    for it in items:
        assert it["answer"] == it["choices"][it["label"]]
        assert len(set(it["choices"])) == 4
        assert it["context"] + it["answer"] in held  # the true continuation of the held-out text
        assert it["kind"] in ("name", "number") and it["source"] == "austen:test"
    assert [it["position"] for it in items] == sorted(it["position"] for it in items)
    assert "output_type: \"multiple_choice\"" in (facts_dir / "memdec_facts.yaml").read_text()


def test_facts_task_is_deterministic_per_seed(tmp_path, tokenizer, facts_dir):
    kw = dict(n_items=12, max_tokens=20000, heldout_max_tokens=8000)
    write_facts_task("austen:train", "austen:test", tmp_path / "a", tokenizer, **kw)
    write_facts_task("austen:train", "austen:test", tmp_path / "b", tokenizer, seed=1, **kw)
    same = (tmp_path / "a" / "memdec_facts.jsonl").read_text() == (facts_dir / "memdec_facts.jsonl").read_text()
    assert same
    assert (tmp_path / "b" / "memdec_facts.jsonl").read_text() != (facts_dir / "memdec_facts.jsonl").read_text()


def test_general_task_items(general_dir):
    items = read_items(general_dir / "memdec_general.jsonl")
    assert len(items) == 12
    for it in items:
        assert it["target"].startswith(" ") and it["target"][1:].isalpha()
        assert it["choices"][it["label"]] == it["target"] and len(set(it["choices"])) == 4
        assert len(it["context"].split()) <= 30
    assert {p.name for p in general_dir.glob("*.yaml")} == {"memdec_general_lambada.yaml", "memdec_general_cloze.yaml"}


# -- lm-eval: the memdec model at λ=0 is lm-eval's own hf model -----------------------------


def evaluate(model, include, tasks, limit=6):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
    return simple_evaluate(model=model, tasks=tasks, task_manager=tm, limit=limit, log_samples=True,
                           bootstrap_iters=0, batch_size=1, device="cpu")


def per_item(res, task):
    return [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_lambda_0_equals_lm_evals_hf_model(tiny_llama_dir, ckpt, facts_dir, general_dir):
    from lm_eval.models.huggingface import HFLM

    tasks = ["memdec_facts", "memdec_general_lambada", "memdec_general_cloze"]
    include = [facts_dir, general_dir]
    ours = evaluate(
        memdec_lm_class()(base=str(tiny_llama_dir), memdec=str(ckpt), lmbda=0.0, device="cpu"), include, tasks
    )
    hf = evaluate(HFLM(pretrained=str(tiny_llama_dir), device="cpu", batch_size=1), include, tasks)
    for task in tasks:
        assert ours["results"][task]["acc,none"] == hf["results"][task]["acc,none"], task
        a, b = per_item(ours, task), per_item(hf, task)
        assert len(a) == 6 and all(math.isclose(x, y, abs_tol=1e-5) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    mixed = evaluate(memdec_lm_class()(base=str(tiny_llama_dir), memdec=str(ckpt), lmbda=0.5), include, tasks[:1])
    assert per_item(mixed, tasks[0]) != per_item(hf, tasks[0])  # λ > 0 changes the scores


def test_registered_name_and_generate_until(tiny_llama_dir, ckpt):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    register()
    lm = get_model("memdec").create_from_arg_string(f"base={tiny_llama_dir},memdec={ckpt},lmbda=0.3")
    assert lm.system.generator.lmbda == 0.3
    req = Instance("generate_until", {}, ("Emma Woodhouse, handsome", {"until": ["\n"], "max_gen_toks": 5}), 0)
    (text,) = lm.generate_until([req])
    assert isinstance(text, str) and "\n" not in text
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Emma was happy.",), 0)])
    assert ll < 0


# -- the command line ------------------------------------------------------------------------


def test_cli_writes_tasks_and_runs_lm_eval(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "t"
    assert main(["tasks", "general", "--out", str(out), "--n-items", "4"]) == 0
    assert (out / "memdec_general_cloze.yaml").is_file()
    rc = main(["lm-eval", "--model", "memdec", "--model_args", f"base={tiny_llama_dir}", "--tasks",
               "memdec_general_cloze", "--include_path", str(out), "--limit", "2", "--device", "cpu",
               "--output_path", str(tmp_path / "res")])
    assert rc == 0
    assert "memdec_general_cloze" in capsys.readouterr().out


def test_cli_tasks_errors_are_one_line(tmp_path, tiny_llama_dir, capsys):
    assert main(["tasks", "facts", "--corpus", "austen:train", "--heldout", str(tmp_path / "missing.txt"),
                 "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o")]) == 2
    assert main(["tasks", "general", "--corpus", "general:test", "--out", str(tmp_path / "o"), "--n-items", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("memdec: error:") for line in err)


# -- batching, kNN-LM and the baselines through the same adapter -----------------------------


def token_requests(tokenizer, n=7):
    """``n`` (None, context, continuation) token requests of varied lengths from the held-out text."""
    from memdec.data import load_token_stream

    stream = load_token_stream("austen:test", tokenizer, 600).tolist()
    shapes = [(5, 1), (40, 3), (12, 2), (40, 1), (77, 4), (3, 5), (25, 2)][:n]
    return [(None, stream[10 * i: 10 * i + c], stream[10 * i + c: 10 * i + c + k]) for i, (c, k) in enumerate(shapes)]


def shared_input_requests(tokenizer):
    """Requests whose inputs coincide: one-token choices after one context, one request twice, and a
    two-token continuation whose input is another request's (context + first token)."""
    (_, ctx, cont), (_, ctx2, cont2) = token_requests(tokenizer)[1:3]
    choices = [(None, ctx, [t]) for t in (cont[0], cont2[0], 7, cont[0])]
    return choices + [(None, ctx, cont[:2]), (None, ctx + cont[:1], [cont2[1]]), (None, ctx2, cont2)]


def one_at_a_time(lm, requests):
    return [lm._score(ctx, cont) for _, ctx, cont in requests]


@pytest.mark.parametrize("system", ["base", "memdec", "knn"])
def test_batched_requests_equal_one_at_a_time(system, tiny_llama_dir, ckpt, store, tokenizer):
    args = {"base": str(tiny_llama_dir), "memdec": {"memdec": str(ckpt), "lmbda": 0.5},
            "knn": {"knn": str(store), "lmbda": 0.4, "knn_temp": 3.0}}
    lm = memdec_lm_class()(base=str(tiny_llama_dir), device="cpu", batch_size=5,
                           **(args[system] if system != "base" else {}))
    requests = token_requests(tokenizer) + shared_input_requests(tokenizer)
    batched = lm._loglikelihood_tokens(requests, disable_tqdm=True)  # 9 distinct inputs: two forwards, right-padded
    single = one_at_a_time(lm, requests)
    assert [g for _, g in batched] == [g for _, g in single]
    np.testing.assert_allclose([x for x, _ in batched], [x for x, _ in single], rtol=1e-5, atol=1e-5)
    lm.system.close()


def test_knn_lm_path_equals_the_knn_lm_scorer(tiny_llama_dir, store, tokenizer):
    """Every request's log-likelihood is the sum of kNN-LM's mixed log-probs of its continuation tokens, as
    ``memdec.knnlm.knn_lm_scorer`` (the evaluation's kNN-LM) scores them; λ=0 is the base exactly."""
    from memdec.knnlm import KnnRetriever, knn_lm_scorer
    from memdec.models import load_model

    model, _ = load_model(str(tiny_llama_dir))
    requests = token_requests(tokenizer)
    for lam in (0.0, 0.4):
        lm = memdec_lm_class()(base=str(tiny_llama_dir), knn=str(store), lmbda=lam, knn_k=16, knn_temp=3.0,
                               device="cpu", batch_size=4)
        ours = [x for x, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
        lm.system.close()
        scorer = knn_lm_scorer(model, KnnRetriever(str(store), k=16, tokenizer=tokenizer), lam, 3.0)
        ref = [float(scorer(torch.tensor([ctx + cont[:-1]]), torch.tensor([cont])).sum()) for _, ctx, cont in requests]
        scorer.close()
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
        if lam == 0.0:
            base = memdec_lm_class()(base=str(tiny_llama_dir), device="cpu")
            np.testing.assert_allclose(ours, [x for x, _ in base._loglikelihood_tokens(requests, disable_tqdm=True)],
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["dapt", "lora"])
def test_dapt_and_lora_paths_equal_lm_evals_hf_model(method, trained, tiny_llama_dir, facts_dir, general_dir):
    """dapt alone is lm-eval's hf model on its folder; lora is the hf model on the base with the PEFT adapters."""
    from lm_eval.models.huggingface import HFLM

    tasks = ["memdec_facts", "memdec_general_cloze"]
    include = [facts_dir, general_dir]
    ours = evaluate(memdec_lm_class()(base=str(tiny_llama_dir), baseline=str(trained[method]), device="cpu"),
                    include, tasks)
    if method == "dapt":
        ref = HFLM(pretrained=str(trained[method]), tokenizer=str(tiny_llama_dir), device="cpu", batch_size=1)
    else:
        ref = HFLM(pretrained=str(tiny_llama_dir), peft=str(trained[method]), device="cpu", batch_size=1)
    hf = evaluate(ref, include, tasks)
    base = evaluate(HFLM(pretrained=str(tiny_llama_dir), device="cpu", batch_size=1), include, tasks[:1])
    for task in tasks:
        a, b = per_item(ours, task), per_item(hf, task)
        assert ours["results"][task]["acc,none"] == hf["results"][task]["acc,none"], task
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(per_item(ours, tasks[0]), per_item(base, tasks[0]), atol=1e-4)  # trained: not the base


def test_ce_decoder_path_is_the_mixture_of_two_direct_forwards(trained, tiny_llama_dir, tokenizer):
    """ce-decoder at λ: log((1-λ) p_base + λ p_decoder) of the continuation tokens, both models run directly."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    decoder = AutoModelForCausalLM.from_pretrained(str(trained["ce-decoder"])).eval()
    requests = token_requests(tokenizer)
    lm = memdec_lm_class()(base=str(tiny_llama_dir), baseline=str(trained["ce-decoder"]), lmbda=0.3, device="cpu")
    ours = [x for x, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
    ref = []
    with torch.no_grad():
        for _, ctx, cont in requests:
            ids = torch.tensor([ctx + cont[:-1]])
            p = 0.7 * base(ids).logits[0].softmax(-1) + 0.3 * decoder(ids).logits[0].softmax(-1)
            ref.append(float(p[-len(cont):].log().gather(-1, torch.tensor(cont)[:, None]).sum()))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_cli_tasks_honour_text_field(tmp_path, tiny_llama_dir, capsys):
    """JSONL corpora whose text is under another field: --text-field reads it (facts: both corpora)."""
    from memdec.data import read_corpus

    def jsonl(spec, chars, name):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": i, "body": d.text[:chars]}) + "\n"
                                for i, d in enumerate(read_corpus(spec))))
        return str(path)

    train, test = jsonl("austen:train", 60_000, "train.jsonl"), jsonl("austen:test", 20_000, "test.jsonl")
    out = tmp_path / "t"
    assert main(["tasks", "facts", "--corpus", train, "--heldout", test, "--model", str(tiny_llama_dir),
                 "--text-field", "body", "--out", str(out), "--n-items", "8"]) == 0
    held = "".join(d.text for d in read_corpus(test, "body"))
    items = read_items(out / "memdec_facts.jsonl")
    assert len(items) == 8 and all(it["context"] + it["answer"] in held and it["source"] == test for it in items)
    assert (
        main(["tasks", "general", "--corpus", test, "--text-field", "body", "--out", str(out), "--n-items", "5"]) == 0
    )
    flat = " ".join(held.split())  # the general task's contexts are whitespace-normalised
    assert all(it["context"] + it["target"] in flat for it in read_items(out / "memdec_general.jsonl"))
    capsys.readouterr()
    assert main(["tasks", "facts", "--corpus", train, "--heldout", test, "--model", str(tiny_llama_dir),
                 "--out", str(tmp_path / "o")]) == 2  # the default field "text" is not there: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memdec: error:")
