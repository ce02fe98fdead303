"""3. The eval stage: every system on the test split (and ``--general``), λ chosen on --valid."""

from __future__ import annotations

from ...checkpoint import read_memdec_json, write_memdec_json
from ...evaluate import EvalConfig, run_eval_report
from ...files import atomic_write_json
from ..job import AdaptRun


def eval_stage(job: AdaptRun, baseline_dirs: list[str]) -> None:
    """3. Every system on the test split, λ chosen on --valid; the memory decoder's chosen λ is
    written into its checkpoint, so that loading ``RUN/memdec`` gives the λ the report shows."""
    s, book = job.s, job.book
    done, _ = book.begin("eval", job.inputs["eval"], f"base, kNN-LM, memory decoder"
                         f"{' and baselines' if s.baselines else ''} on {s.test}"
                         f"{f' and {s.general}' if s.general else ''}, lambda chosen on {s.valid}")
    if done:
        return

    def work() -> None:
        report = run_eval_report(EvalConfig(
            model=s.model, corpus=s.test, max_tokens=s.test_tokens, block_size=s.eval_block_size, stride=s.eval_stride,
            device=job.device, memdec=str(job.ckpt), knn=str(job.datastore), sweep=True, valid=s.valid,
            valid_max_tokens=s.valid_tokens, plot=str(job.run / "lambda.png"), json=None,
            baseline=baseline_dirs or None, general=s.general, general_max_tokens=s.general_tokens,
            recurring=str(job.datastore)))
        atomic_write_json(job.run / "eval.json", report.to_json(s.test))
        chosen = next(r.lmbda for r in report.rows if r.system == "memdec")
        write_memdec_json(job.ckpt, {**read_memdec_json(job.ckpt), "lambda": chosen,
                                     "lambda_source": f"memdec adapt: chosen on {s.valid} ({s.valid_tokens} tokens)"})

    book.run("eval", job.inputs["eval"], work)
