"""Peak memory of one training step and of scoring, on a large-vocabulary model (Gemma 3 270M).

Peak RSS (``resource.getrusage``, CPU) of this process is read before and after the measured
part: the model, the datastore and the optimizer are loaded first, so the difference is what the
step (or the scoring) adds on top. Run it once per code version, each in a fresh process:

    # a datastore of the model (8192 tokens are enough for one step of 4x512)
    memdec datastore --model gemma3-270m --corpus austen:valid --max-tokens 8192 --k 64 --out DS
    PYTHONPATH=src python bench/gemma_memory.py train --datastore DS --out /tmp/step
    PYTHONPATH=src python bench/gemma_memory.py score --model gemma3-270m --block-size 1024

``train``: ``memdec.train`` with --batch-size 4 --block-size 512, stopped after its first optimizer
step (before any save). ``score``: ``scoring.score_tokens`` with the base scorer over 2 windows of
--block-size tokens (stride half of it).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Stop(Exception):
    pass


def measure_train(args) -> dict:
    from memdec.train import TrainConfig, Trainer

    shutil.rmtree(args.out, ignore_errors=True)
    result = {}
    original = Trainer._step

    def step(self, i):
        result["peak_before_mib"] = peak_mib()
        t0 = time.perf_counter()
        record = original(self, i)
        result.update(step_s=round(time.perf_counter() - t0, 2), peak_after_mib=peak_mib(), loss=record["loss"])
        raise Stop

    Trainer._step = step
    cfg = TrainConfig(datastore=args.datastore, out=args.out, max_steps=2, batch_size=args.batch_size,
                      block_size=args.block_size, alpha=args.alpha, teacher_base_weight=args.teacher_base_weight,
                      device="cpu", save_every=50, resume=False)
    try:
        Trainer(cfg).run()
    except Stop:
        pass
    shutil.rmtree(args.out, ignore_errors=True)
    return result


def measure_score(args) -> dict:
    import numpy as np

    from memdec.data import load_token_stream
    from memdec.models import bos_prefix, load_model
    from memdec.scoring import base_scorer, score_tokens

    model, tokenizer = load_model(args.model)
    tokens = load_token_stream(args.corpus, tokenizer, 2 * args.block_size + 1)
    before = peak_mib()
    nll, seconds = score_tokens(base_scorer(model), tokens, args.block_size, args.block_size // 2,
                                progress=False, prefix=bos_prefix(tokenizer))
    return {"peak_before_mib": before, "peak_after_mib": peak_mib(), "seconds": round(seconds, 2),
            "mean_nll": float(np.mean(nll)), "tokens": len(nll)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "score"])
    p.add_argument("--datastore", help="train: the model's datastore")
    p.add_argument("--out", default="/tmp/gemma-memory-step", help="train: a scratch checkpoint folder (deleted)")
    p.add_argument("--model", default="gemma3-270m", help="score: the model")
    p.add_argument("--corpus", default="austen:valid", help="score: the text")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=None, help="default: 512 (train), 1024 (score)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--teacher-base-weight", type=float, default=0.0)
    args = p.parse_args()
    if args.block_size is None:
        args.block_size = 512 if args.what == "train" else 1024
    result = measure_train(args) if args.what == "train" else measure_score(args)
    result = {"what": args.what, **result, "added_mib": round(result["peak_after_mib"] - result["peak_before_mib"], 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
