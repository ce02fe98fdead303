"""Run vLLM on joint folders and write what it produced: the engine half of tests/test_vllm.py.

    .venv-vllm/bin/python tests/vllm_engine.py JOB.json OUT.json

Runs in vLLM's own venv (``make vllm-venv``), in a subprocess of the test: vLLM starts workers with ``spawn`` and
now and then aborts at exit, so the test judges it by OUT.json, written before the interpreter exits. JOB.json:
``{"models": [{"name", "path", "kv_cache_mib"?, "prompts"?}], "prompts": [[token ids]], "max_tokens",
"prompt_logprobs"}`` (a model's own "prompts" in place of the job's);
OUT.json: per model name, per prompt, the greedy tokens, their logprobs and the prompt's logprobs (of its own
tokens). One engine per model, one after the other, fp32, eager, a small KV cache.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def run_model(spec: dict, job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=spec["path"], dtype="float32", enforce_eager=True, max_model_len=job.get("max_model_len", 256),
              max_num_seqs=16, kv_cache_memory_bytes=spec.get("kv_cache_mib", 64) << 20, seed=0)
    start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=0,
                            prompt_logprobs=0 if job.get("prompt_logprobs") else None, ignore_eos=True)
    prompts = spec.get("prompts", job["prompts"])
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    rows = []
    for prompt, out in zip(prompts, outs):
        done = out.outputs[0]
        row = {"tokens": list(done.token_ids),
               "logprobs": [lp[t].logprob for t, lp in zip(done.token_ids, done.logprobs)]}
        if job.get("prompt_logprobs"):
            row["prompt_logprobs"] = [None if lp is None else lp[t].logprob
                                      for t, lp in zip(prompt, out.prompt_logprobs)]
        rows.append(row)
    del llm
    gc.collect()
    return {"rows": rows, "start_s": start}


def main() -> None:
    job = json.load(open(sys.argv[1]))
    result = {spec["name"]: run_model(spec, job) for spec in job["models"]}
    with open(sys.argv[2] + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's exit path, which aborts now and then (../shared/VLLM.md)


if __name__ == "__main__":
    main()
