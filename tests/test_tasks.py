"""lm-evaluation-harness: the memdec model, the facts and general task writers, the CLI (offline, tiny models)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

from memdec.cli import main  # noqa: E402
from memdec.tasks import memdec_lm_class, register, write_facts_task, write_general_task  # noqa: E402
from test_joint import write_checkpoint  # noqa: E402


def read_items(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def facts_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("facts")
    write_facts_task("austen:train", "austen:test", out, tokenizer, n_items=12, max_tokens=20000, heldout_max_tokens=8000)
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
    held = tokenizer.decode(__import__("memdec.data", fromlist=["x"]).load_token_stream("austen:test", tokenizer, 8000).tolist())
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
    ours = evaluate(memdec_lm_class()(base=str(tiny_llama_dir), memdec=str(ckpt), lmbda=0.0, device="cpu"), include, tasks)
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
