"""Inference cost of each mixed system relative to the base model alone, on one machine, in one run.

For each system (``memdec``, and ``knn-lm`` when ``--knn DATASTORE`` is given):

- scoring:  tokens/s of joint scoring ÷ tokens/s of the base alone, over the same sliding windows;
- decoding: tokens/s of joint greedy decoding ÷ the base alone's ``generate()``, batch 1,
  ``--new-tokens`` (128) new tokens, EOS suppressed so every run makes all of them.

Default: the default base model (smollm2-135m) and a 4-layer memory decoder made from it
(embeddings + first 4 blocks + final norm + tied head; its weights do not matter for speed).
For GPU runs, ``--arch gpt2 --size xl`` builds a randomly initialised GPT-2 base instead, with
``--memdec-size small`` for the paper's GPT-2-small decoder (default: a shortened copy).

    python bench/inference.py                      # CPU, default model
    python bench/inference.py --knn runs/demo/datastore   # with the kNN-LM rows
    python bench/inference.py --arch gpt2 --size xl --memdec-size small --device cuda --json r.json

Each timing is the best of ``--repeats`` runs after a warm-up.

Decoder shapes (``--decoder SPEC``, repeatable: ``copy``, ``fork:8``, any shape of
``memdec.decoders``): one row per shape, printed (and written to ``--json``) as soon as it is
measured: the cost of the base + decoder mixture, in seconds, over the base alone's, timed in turns
with a base run of its own, for scoring and for greedy decoding. Each decoder is built from the base
(``shape.build``): its weights are the base's, which changes nothing to its speed.

    python bench/inference.py --decoder copy --decoder fork:8 --decoder fork:15 \
        --score-tokens 1024 --block-size 1024 --stride 1024 --new-tokens 128 --json shapes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from memdec.decoders import parse_shape
from memdec.files import atomic_write_json
from memdec.joint import MemoryDecoderLogitsProcessor, MemoryDecoderModel
from memdec.scoring import Scorer, base_scorer, score_tokens

GPT2_SIZES = {  # n_embd, n_layer, n_head
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
    "large": (1280, 36, 20),
    "xl": (1600, 48, 25),
}


@dataclass
class System:
    """A mixed system under test: how it scores windows and how it decodes greedily."""

    name: str
    scorer: Scorer
    decode: Callable[[torch.Tensor, int], torch.Tensor]  # (prompt ids [1, L], new tokens) -> ids
    note: str = ""
    scores: bool = True  # False: a decoding-only variant, its scoring is another row's


# --------------------------------------------------------------------------------------------
# Models


def gpt2_model(size: str, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd, n_layer, n_head = GPT2_SIZES[size]
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=50257, n_positions=1024)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()


def build_models(args) -> tuple[torch.nn.Module, torch.nn.Module, np.ndarray, str]:
    """(base, memory decoder, corpus token ids, description)."""
    from memdec.models import shortened_copy

    if args.arch == "gpt2":
        base = gpt2_model(args.size, args.device, args.dtype)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, base.config.vocab_size, args.score_tokens + 1)
        desc = f"gpt2-{args.size} (random init)"
    else:
        from memdec.data import load_token_stream
        from memdec.models import load_model

        base, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        tokens = load_token_stream(args.corpus, tokenizer, args.score_tokens + 1)
        desc = args.model
    if args.decoder:
        return base, None, tokens, desc
    if args.memdec_size is not None:
        if args.arch != "gpt2":
            raise SystemExit("--memdec-size needs --arch gpt2")
        memdec = gpt2_model(args.memdec_size, args.device, args.dtype, seed=1)
        desc += f" + gpt2-{args.memdec_size} memory decoder"
    else:
        memdec = shortened_copy(base, args.memdec_layers).eval()
        desc += f" + {args.memdec_layers}-layer shortened copy as memory decoder"
    return base, memdec, tokens, desc


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Systems


def memdec_system(base, memdec, lmbda: float = 0.3) -> list[System]:
    joint = MemoryDecoderModel(base, memdec, lmbda=lmbda)

    def decode_processor(ids: torch.Tensor, new: int) -> torch.Tensor:
        proc = MemoryDecoderLogitsProcessor(memdec, lmbda)
        return greedy(base, ids, new, logits_processor=[proc])

    return [
        System("memdec", joint.scorer(), lambda ids, new: greedy(joint, ids, new), "MemoryDecoderModel"),
        System("memdec-processor", joint.scorer(), decode_processor, "logits processor", scores=False),
    ]


def knnlm_system(base, memdec, datastore: str | None = None, lmbda: float = 0.25, temperature: float = 1.0,
                 k: int = 1024) -> list[System]:
    """kNN-LM with real retrieval at every position (needs --knn DATASTORE built from the base)."""
    from memdec.knnlm import KnnLMLogitsProcessor, KnnRetriever, knn_lm_scorer

    if datastore is None:
        return []
    retriever = KnnRetriever(datastore, k=k)
    proc = KnnLMLogitsProcessor(base, retriever, lmbda, temperature)

    def decode(ids: torch.Tensor, new: int) -> torch.Tensor:
        with proc:
            return greedy(base, ids, new, logits_processor=[proc])

    return [System("knn-lm", knn_lm_scorer(base, retriever, lmbda, temperature), decode,
                   f"k={k}, {retriever.store.n_keys} keys, {retriever.index.__class__.__name__}")]


SYSTEMS = {"memdec": memdec_system, "knn-lm": knnlm_system}


def own_params(base, decoder) -> int:
    """Parameters of ``decoder`` that are not the base's own tensors (a shared trunk is not counted)."""
    shared = {p.data_ptr() for p in base.parameters()}
    return sum(p.numel() for p in decoder.parameters() if p.data_ptr() not in shared)


def shape_system(base, spec: str, lmbda: float = 0.3) -> tuple[System, int]:
    """(the base mixed with a decoder of shape ``spec`` built from it, the decoder's own parameters)."""
    shape = parse_shape(spec)
    shape.check(base)
    decoder = shape.build(base).eval()
    joint = MemoryDecoderModel(base, decoder, lmbda=lmbda)
    note = "shared trunk" if joint.shares_trunk else "separate model"
    return System(spec, joint.scorer(), lambda ids, new: greedy(joint, ids, new), note), own_params(base, decoder)


def shape_rows(base, tokens: np.ndarray, prompt: torch.Tensor, args, result: dict) -> list[dict]:
    """One row per ``--decoder`` spec, each timed in turns with a base run of its own, printed (and
    written to ``--json``) as soon as it is measured."""
    n_scored = len(tokens) - 1
    print(f"\nscoring: {n_scored} tokens, block {args.block_size}, stride {args.stride}, batch {args.batch_size}; "
          f"decoding: batch 1, {args.new_tokens} new tokens, greedy; cost = seconds of base + decoder / base alone")
    print(f"{'decoder':<10} {'own params':>10} {'score cost':>10} {'decode cost':>11} {'base tok/s':>10} "
          f"{'joint tok/s':>11}  note", flush=True)
    rows = result["rows"]
    for spec in args.decoder:
        system, own = shape_system(base, spec)
        score_s = interleaved_best({"base": scoring_run(base_scorer(base), tokens, args),
                                    spec: scoring_run(system.scorer, tokens, args)}, args.repeats)
        decode_s = interleaved_best({"base": decoding_run(lambda ids, new: greedy(base, ids, new), prompt, args),
                                     spec: decoding_run(system.decode, prompt, args)}, args.repeats)
        row = {"decoder": spec, "note": system.note, "own_params": own,
               "scoring_cost": score_s[spec] / score_s["base"], "decoding_cost": decode_s[spec] / decode_s["base"],
               "base_scoring_tok_s": n_scored / score_s["base"], "scoring_tok_s": n_scored / score_s[spec],
               "base_decoding_tok_s": args.new_tokens / decode_s["base"],
               "decoding_tok_s": args.new_tokens / decode_s[spec]}
        rows.append(row)
        print(f"{spec:<10} {own / 1e6:>9.1f}M {row['scoring_cost']:>9.3f}x {row['decoding_cost']:>10.3f}x "
              f"{row['base_decoding_tok_s']:>10.1f} {row['decoding_tok_s']:>11.1f}  {system.note}", flush=True)
        if args.json:
            atomic_write_json(args.json, result)
        del system
    return rows


# --------------------------------------------------------------------------------------------
# Timing


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def greedy(model, ids: torch.Tensor, new: int, **kw) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, num_beams=1, pad_token_id=0, **kw)


def interleaved_best(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Best (smallest) seconds of each run, after a warm-up, taking turns round by round so that
    load from other processes on a shared machine hits every system alike."""
    for fn in runs.values():
        fn()  # warm-up
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], fn())
    return best


def scoring_run(scorer: Scorer, tokens: np.ndarray, args) -> Callable[[], float]:
    """A run of sliding-window scoring over ``tokens``; returns its seconds."""

    def run() -> float:
        with torch.inference_mode():
            _, seconds = score_tokens(scorer, tokens, args.block_size, args.stride, args.batch_size, args.device,
                                      progress=False)
        return seconds

    return run


def decoding_run(decode, prompt: torch.Tensor, args) -> Callable[[], float]:
    """A run of greedy decoding, batch 1, ``args.new_tokens`` new tokens; returns its seconds."""

    def run() -> float:
        sync(args.device)
        t0 = time.perf_counter()
        out = decode(prompt, args.new_tokens)
        sync(args.device)
        assert out.shape[1] == prompt.shape[1] + args.new_tokens, out.shape
        return time.perf_counter() - t0

    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model spec (ignored with --arch)")
    p.add_argument("--arch", choices=["gpt2"], help="a randomly initialised base of this architecture instead")
    p.add_argument("--size", choices=sorted(GPT2_SIZES), default="xl")
    p.add_argument("--memdec-layers", type=int, default=4, help="memory decoder: a shortened copy of the base")
    p.add_argument("--memdec-size", choices=sorted(GPT2_SIZES), help="memory decoder: a separate random GPT-2")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--corpus", default="austen:test")
    p.add_argument("--score-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--knn", help="datastore built from the base model: adds the knn-lm rows")
    p.add_argument("--knn-k", type=int, default=1024)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--decoder", action="append", metavar="SPEC",
                   help="a decoder shape (copy, fork:8, ...), repeatable: one row each, in place of --systems")
    args = p.parse_args(argv)

    from memdec.errors import MemdecError
    from memdec.models import resolve_device

    try:
        for spec in args.decoder or []:  # before any model loads
            parse_shape(spec)
    except MemdecError as exc:
        p.error(str(exc))
    args.device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    else:
        args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    base, memdec, tokens, desc = build_models(args)
    prompt = torch.as_tensor(np.asarray(tokens[: args.prompt_tokens], dtype=np.int64))[None].to(args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"{desc}; {args.device} ({device_name}), {args.dtype}, {torch.get_num_threads()} threads")
    if args.decoder:
        print(f"base {n_params(base) / 1e6:.1f}M parameters; decoders built from it: {', '.join(args.decoder)}")
        result = {"setup": desc, "device": args.device, "device_name": device_name, "dtype": str(args.dtype),
                  "threads": torch.get_num_threads(), "base_params": n_params(base), "score_tokens": len(tokens) - 1,
                  "repeats": args.repeats, "block_size": args.block_size, "stride": args.stride,
                  "new_tokens": args.new_tokens, "rows": []}
        shape_rows(base, tokens, prompt, args, result)
        return result
    print(f"base {n_params(base) / 1e6:.1f}M parameters, memory decoder {n_params(memdec) / 1e6:.1f}M")

    extra = {"knn-lm": dict(datastore=args.knn, k=args.knn_k)}
    systems = [system for name in args.systems for system in SYSTEMS[name](base, memdec, **extra.get(name, {}))]
    score_runs = {"base": scoring_run(base_scorer(base), tokens, args)}
    score_runs.update({s.name: scoring_run(s.scorer, tokens, args) for s in systems if s.scores})
    decode_runs = {"base": decoding_run(lambda ids, new: greedy(base, ids, new), prompt, args)}
    decode_runs.update({s.name: decoding_run(s.decode, prompt, args) for s in systems})
    score_s = interleaved_best(score_runs, args.repeats)
    decode_s = interleaved_best(decode_runs, args.repeats)

    n_scored = len(tokens) - 1
    rows = []
    for name, note in [("base", "")] + [(s.name, s.note) for s in systems]:
        row = {"system": name, "note": note,
               "scoring_tok_s": n_scored / score_s[name] if name in score_s else None,
               "decoding_tok_s": args.new_tokens / decode_s[name]}
        if name != "base":
            row["scoring_ratio"] = None if row["scoring_tok_s"] is None else score_s["base"] / score_s[name]
            row["decoding_ratio"] = decode_s["base"] / decode_s[name]
        rows.append(row)

    print(f"\nscoring: {n_scored} tokens, block {args.block_size}, stride {args.stride}, "
          f"batch {args.batch_size}; decoding: batch 1, {args.new_tokens} new tokens, greedy")
    print(f"{'system':<18} {'score tok/s':>11} {'÷ base':>7} {'decode tok/s':>12} {'÷ base':>7}")
    for row in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{row['system']:<18} {fmt(row['scoring_tok_s'], '.1f'):>11} {fmt(row.get('scoring_ratio'), '.3f'):>7} "
              f"{fmt(row['decoding_tok_s'], '.1f'):>12} {fmt(row.get('decoding_ratio'), '.3f'):>7}")
    result = {"setup": desc, "device": args.device, "device_name": device_name, "dtype": str(args.dtype),
              "threads": torch.get_num_threads(), "base_params": n_params(base), "memdec_params": n_params(memdec),
              "score_tokens": n_scored, "repeats": args.repeats, "block_size": args.block_size, "stride": args.stride,
              "new_tokens": args.new_tokens, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
