"""3b. The router stage: a token router fitted after the eval stage, kept in ``RUN/memdec`` only if it
beats the chosen λ on --valid, with its ``memdec+router`` row and λ_t along a test passage."""

from __future__ import annotations

import shutil
import time

import torch

from ...checkpoint import ROUTER_JSON, ROUTER_WEIGHTS
from ...data import load_token_stream
from ...evaluate import ROUTER_ROW, EvalConfig, read_eval_json, run_eval_report
from ...files import atomic_write, atomic_write_json
from ...joint import MemoryDecoderModel
from ...models import load_model, resolve_device
from ...report import ROUTER_LAMBDA_JSON, ROUTER_PLOT_TOKENS
from ...routing import RouterConfig, train_router
from ..job import AdaptRun, remove
from ..options import ROUTER_GENERAL
from ..stagebook import say


def drop_router(job: AdaptRun) -> None:
    """Take a kept router out of ``RUN/memdec`` (``router.json`` first: it commits one) and its row out of
    ``RUN/eval.json``: before upstream stages redo their work, or with ``--router off``."""
    remove(job.ckpt / ROUTER_JSON, job.ckpt / ROUTER_WEIGHTS)
    file = job.run / "eval.json"
    if file.is_file() and job.book.is_done("eval", job.inputs["eval"]):  # else the eval stage writes it anew
        ev = read_eval_json(file)
        kept = [r for r in ev["results"] if r.get("system") != ROUTER_ROW]
        if len(kept) != len(ev["results"]):
            atomic_write_json(file, {**ev, "results": kept})


def router_stage(job: AdaptRun) -> None:
    """3b. A token router between the base and ``RUN/memdec``, fitted on the training corpus after the
    datastore's tokens and on ``general:train``; kept only if it beats the chosen λ on --valid."""
    s, book = job.s, job.book
    done, _ = book.begin("router", job.inputs["router"], f"token router on {s.corpus} (after the datastore's tokens) "
                         f"and {ROUTER_GENERAL}, kept only if it beats the fixed λ on {s.valid}")
    if done:
        return
    book.run("router", job.inputs["router"], lambda: fit_and_judge_router(job))


def fit_and_judge_router(job: AdaptRun) -> dict:
    """Fit into ``RUN/router``; keep it (copy into ``RUN/memdec``, add the eval row) only if it wins on --valid.
    Returns the stage's summary: ``kept`` and ``why``, the validation numbers, the seconds."""
    s = job.s
    remove(job.run / "router", job.run / "router_lambda.png")
    if s.train_tokens is None:
        why = f"the datastore took all of {s.corpus}: no domain text the decoder did not train on is left to fit on"
        say(f"router: not fitted: {why}")
        return {"kept": False, "why": why}
    t0 = time.perf_counter()
    info = train_router(RouterConfig(
        memdec=str(job.ckpt), domain_corpus=s.corpus, valid=s.valid, out=str(job.run / "router"), model=s.model,
        general=ROUTER_GENERAL, tokens=s.router_tokens, valid_tokens=s.valid_tokens, block_size=s.eval_block_size,
        stride=s.eval_stride, device=job.device, text_field=s.text_field), log=say)
    v = info["valid"]
    kept = v["router_ppl"] < v["fixed_ppl"]
    why = (f"router {v['router_ppl']:.3f} vs fixed λ={v['fixed_lambda']:.2f} {v['fixed_ppl']:.3f} on {v['tokens']} "
           f"positions of {s.valid}: {'kept' if kept else 'not kept (it does not beat the fixed λ)'}")
    say(f"router: {why}")
    summary = {"kept": kept, "why": why, "valid": v, "fit_seconds": round(time.perf_counter() - t0, 1)}
    if kept:
        for name in (ROUTER_WEIGHTS, ROUTER_JSON):  # router.json last: it commits the router
            atomic_write(job.ckpt / name, lambda tmp, src=job.run / "router" / name: shutil.copyfile(src, tmp))
        t1 = time.perf_counter()
        add_router_row(job, v["fixed_lambda"])
        summary["eval_seconds"] = round(time.perf_counter() - t1, 1)
    t2 = time.perf_counter()
    write_router_lambdas(job)
    summary["lambda_t_seconds"] = round(time.perf_counter() - t2, 1)
    return summary


def add_router_row(job: AdaptRun, lmbda: float) -> None:
    """The ``memdec+router`` row on the test (and general) text, scored as ``eval --router`` does, appended
    to ``RUN/eval.json``."""
    s = job.s
    report = run_eval_report(EvalConfig(
        model=s.model, corpus=s.test, max_tokens=s.test_tokens, block_size=s.eval_block_size, stride=s.eval_stride,
        device=job.device, memdec=str(job.ckpt), lmbda=lmbda, router=str(job.ckpt), general=s.general,
        general_max_tokens=s.general_tokens, json=None, plot=None))
    row = next(r for r in report.to_json(s.test)["results"] if r["system"] == ROUTER_ROW)
    ev = read_eval_json(job.run / "eval.json")
    results = [r for r in ev["results"] if r.get("system") != ROUTER_ROW] + [row]
    atomic_write_json(job.run / "eval.json", {**ev, "results": results})


def write_router_lambdas(job: AdaptRun) -> None:
    """λ_t of the fitted router along the first ``ROUTER_PLOT_TOKENS`` positions of the test text, each with
    its token: ``RUN/router/lambda_t.json`` (the report plots it)."""
    s = job.s
    base, tokenizer = load_model(s.model, device=resolve_device(job.device))
    joint = MemoryDecoderModel.from_pretrained(base, str(job.ckpt), tokenizer=tokenizer, router=str(job.run / "router"))
    n = min(ROUTER_PLOT_TOKENS, s.eval_block_size - 1)
    tokens = load_token_stream(s.test, tokenizer, n + 1, s.text_field)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=base.device)[None]
    _, _, _, log_lam = joint.routed_logprobs(ids[:, :-1], ids[:, 1:])
    atomic_write_json(job.run / "router" / ROUTER_LAMBDA_JSON, {
        "corpus": s.test, "fixed_lambda": joint.lmbda, "kept": (job.ckpt / ROUTER_JSON).is_file(),
        "tokens": [tokenizer.decode([t]) for t in tokens[1:].tolist()],
        "lambda_t": [round(x, 5) for x in log_lam[0].exp().tolist()]}, ensure_ascii=False)
