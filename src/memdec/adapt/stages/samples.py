"""4. The samples stage: continuations of a few test prompts, the base beside the joint model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...data import load_token_stream
from ...evaluate import read_eval_json
from ...files import atomic_write_json
from ...joint import MemoryDecoderModel
from ...models import load_model, resolve_device
from ...report import SAMPLING
from ..job import AdaptRun
from ..presets import Settings


def samples_stage(job: AdaptRun) -> None:
    """4. Continuations of a few test prompts, base beside joint, in ``RUN/samples.json``."""
    s, book = job.s, job.book
    done, _ = book.begin("samples", job.inputs["samples"],
                         f"{s.samples} continuations of {s.test} prompts, base beside joint")
    if done:
        return

    def work() -> None:
        lmbda = next(r["lambda"] for r in read_eval_json(job.run / "eval.json", ("base", "memdec"))["results"]
                     if r["system"] == "memdec")
        atomic_write_json(job.run / "samples.json", generate_samples(s, job.ckpt, job.device, lmbda),
                          ensure_ascii=False)

    book.run("samples", job.inputs["samples"], work)


def sample_prompts(s: Settings, tokenizer, n: int, prompt_tokens: int = 48) -> list[str]:
    """``n`` prompts from the test corpus: the text before evenly spaced positions of its scored slice."""
    tokens = load_token_stream(s.test, tokenizer, s.test_tokens, s.text_field)
    picks = np.linspace(prompt_tokens, len(tokens) - 1, n + 1, dtype=np.int64)[:-1] if n else []
    return [tokenizer.decode(tokens[p - prompt_tokens : p]) for p in picks]


def generate_samples(s: Settings, ckpt: Path, device: str, lmbda: float | None = None) -> list[dict]:
    """Continuations of test prompts by the base alone and by the joint model (at ``lmbda``, default
    the checkpoint's), drawn as ``SAMPLING`` says, with the same seed for both."""
    base, tokenizer = load_model(s.model, device=resolve_device(device))
    joint = MemoryDecoderModel.from_pretrained(base, str(ckpt), lmbda=lmbda, tokenizer=tokenizer)
    gen = dict(max_new_tokens=s.sample_tokens, pad_token_id=tokenizer.pad_token_id,
               **{k: v for k, v in SAMPLING.items() if k != "seed"})
    out = []
    for prompt in sample_prompts(s, tokenizer, s.samples):
        ids = tokenizer(prompt, return_tensors="pt").to(base.device)
        n = ids.input_ids.shape[1]
        with torch.no_grad():
            torch.manual_seed(SAMPLING["seed"])
            b = base.generate(**ids, **gen)[0, n:]
            torch.manual_seed(SAMPLING["seed"])
            j = joint.generate(**ids, **gen)[0, n:]
        out.append({"prompt": prompt, "base": tokenizer.decode(b, skip_special_tokens=True),
                    "memdec": tokenizer.decode(j, skip_special_tokens=True), "lambda": joint.lmbda})
    return out
