"""Many domains on one base: routed perplexity against the oracle and the best single decoder.

    PYTHONPATH=src .venv/bin/python bench/domains.py corpora --out runs/domains          # the third domain's files
    PYTHONPATH=src .venv/bin/python bench/domains.py measure --model smollm2-135m --router runs/domains/router \
        --test austen=austen:test --test code=stdlib:test --test pydocs=runs/domains/corpora/pydocs-test.jsonl \
        --general general:test --out runs/domains/stream.json [--segments 24 --segment-tokens 512 --budget-s 1800]

The three domains: Jane Austen's novels (``austen:*``), the Python standard library's source
(``stdlib:*``), and the Python language reference (``pydocs``): the prose of docs.python.org's
reference manual that CPython ships as ``pydoc_data/topics.py`` (PSF licence), one JSONL document per
topic, split 80/20 by a hash of the topic's name (``corpora`` writes them). General text is the
Factbook (``general:test``). Note: ``pydoc_data`` is a module of ``stdlib:train``; a code decoder
trained on a prefix of it meets that file only if its prefix reaches ``pydoc_data/`` (sorted by path).

``measure`` builds a stream that cycles through the domains and general text, ``--segment-tokens``
tokens of each test corpus in turn (``--segments`` in all, or as many as ``--budget-s`` allows), each
segment scored alone (no context from the one before). Each segment's first ``--prompt-tokens``
tokens are its prompt: the domain router (``memdec router --domains``) routes the segment from them,
and every system is scored on the positions after them. Each decoder's target log-probs are computed
once per segment (``MemoryDecoderModel.target_logprobs_pair``), so every mixture below costs no further
forward pass:

- ``routed``: the routed decoder at its checkpoint's λ (or the base alone for "none"): one decoder per
  segment, what ``serve``'s ``auto`` model answers with;
- ``oracle``: each segment by its own domain's decoder at that domain's best λ on the stream (hindsight,
  over ``LAMBDA_GRID``), general segments by the base alone;
- ``single:NAME``: one decoder at its checkpoint's λ on every segment; ``best single`` is the lowest;
- ``base``: the base alone.

Also the routing accuracy per segment kind. Prints a table; ``--out`` keeps the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from itertools import cycle
from pathlib import Path

import numpy as np
import torch

from memdec.checkpoint import NO_DOMAIN
from memdec.data import load_token_stream
from memdec.files import atomic_write_json, atomic_write_text
from memdec.joint import MemoryDecoderModel
from memdec.models import bos_prefix, load_model, resolve_device
from memdec.router import load_domain_router, pooled_states
from memdec.scoring import LAMBDA_GRID, mix_logprobs
from memdec.tables import render_table

GENERAL = "general"


def write_corpora(out: Path) -> list[Path]:
    """``OUT/corpora/pydocs-{train,test}.jsonl``: the Python reference manual's topics, one per line."""
    from pydoc_data.topics import topics

    parts: dict[str, list[str]] = {"train": [], "test": []}
    for name in sorted(topics):
        split = "test" if int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 5 == 0 else "train"
        parts[split].append(json.dumps({"topic": name, "text": topics[name]}, ensure_ascii=False))
    files = []
    for split, lines in parts.items():
        file = out / "corpora" / f"pydocs-{split}.jsonl"
        atomic_write_text(file, "\n".join(lines) + "\n")
        files.append(file)
    return files


def build_stream(
    tests: dict[str, str], general: str, tokenizer, segments: int, seg_tokens: int
) -> list[tuple[str, np.ndarray]]:
    """(kind, tokens) for each segment: the domains and general text in turn, each corpus read onwards."""
    kinds = [*tests, GENERAL]
    per_kind = -(-segments // len(kinds))
    streams = {k: load_token_stream(tests.get(k, general), tokenizer, per_kind * seg_tokens) for k in kinds}
    taken = dict.fromkeys(kinds, 0)
    out = []
    for kind in cycle(kinds):
        if len(out) == segments:
            break
        start = taken[kind]
        piece = streams[kind][start : start + seg_tokens]
        if len(piece) < seg_tokens:  # that corpus ran out
            break
        taken[kind] += seg_tokens
        out.append((kind, piece))
    return out


@torch.inference_mode()
def score_segment(tokens: np.ndarray, prompt: int, joints: dict, base, router, prefix: int | None, device) -> dict:
    """The route of one segment and every decoder's (log p_base, log p_mem) of its positions after the prompt."""
    ids = torch.as_tensor(([prefix] if prefix is not None else []) + tokens.tolist(), dtype=torch.long, device=device)[
        None
    ]
    lead = 1 if prefix is not None else 0
    route = router.route(pooled_states(base, ids[:, : lead + prompt]).to(router.mean.device))[0]
    n = len(tokens) - 1 - prompt  # the positions after the prompt
    inputs, targets = ids[:, :-1], ids[:, -n:]
    pairs = {name: joint.target_logprobs_pair(inputs, targets) for name, joint in joints.items()}
    lp_base = next(iter(pairs.values()))[0][0].double().cpu()
    return {"route": route, "lp_base": lp_base, "lp_mem": {k: v[1][0].double().cpu() for k, v in pairs.items()}}


def mix(lp_base: torch.Tensor, lp_mem: torch.Tensor, lmbda: float) -> torch.Tensor:
    return mix_logprobs(lp_base, lp_mem, lmbda)


def summarise(scored: list[tuple[str, dict]], lambdas: dict[str, float]) -> dict:
    """Perplexities of every system over all segments, per kind, and the routing accuracy per kind."""
    kinds = sorted({k for k, _ in scored})
    best_lambda = {}
    for name in lambdas:  # the oracle's λ: each domain's best on its own segments (hindsight)
        own = [s for k, s in scored if k == name]
        nll = {
            lam: float(torch.cat([-mix(s["lp_base"], s["lp_mem"][name], lam) for s in own]).mean())
            for lam in LAMBDA_GRID
        }
        best_lambda[name] = min(nll, key=nll.get) if own else lambdas[name]

    def system_nll(pick) -> dict:
        rows = {k: [] for k in kinds}
        for kind, s in scored:
            rows[kind].append(pick(kind, s))
        per = {k: torch.cat(v) for k, v in rows.items()}
        every = torch.cat(list(per.values()))
        return {"ppl": math.exp(float(every.mean())), **{f"ppl_{k}": math.exp(float(v.mean())) for k, v in per.items()}}

    def routed(kind, s):
        r = s["route"]
        return -s["lp_base"] if r == NO_DOMAIN else -mix(s["lp_base"], s["lp_mem"][r], lambdas[r])

    def oracle(kind, s):
        return -s["lp_base"] if kind == GENERAL else -mix(s["lp_base"], s["lp_mem"][kind], best_lambda[kind])

    systems = {
        "base": system_nll(lambda k, s: -s["lp_base"]),
        "routed": system_nll(routed),
        "oracle": system_nll(oracle),
    }
    for name in lambdas:
        systems[f"single:{name}"] = system_nll(lambda k, s, n=name: -mix(s["lp_base"], s["lp_mem"][n], lambdas[n]))
    singles = [k for k in systems if k.startswith("single:")]
    best = min(singles, key=lambda k: systems[k]["ppl"])
    accuracy = {}
    for k in kinds:
        want = NO_DOMAIN if k == GENERAL else k
        routes = [s["route"] for kind, s in scored if kind == k]
        accuracy[k] = {"segments": len(routes), "accuracy": sum(r == want for r in routes) / len(routes),
                       "routes": routes}
    return {"systems": systems, "best_single": best, "oracle_lambda": best_lambda, "routing": accuracy}


def format_summary(result: dict) -> str:
    systems, kinds = result["systems"], sorted(result["routing"])
    order = ["base", "oracle", "routed", result["best_single"]] + sorted(k for k in systems if k.startswith("single:")
                                                                         and k != result["best_single"])
    rows = [[name + (" (best single)" if name == result["best_single"] else ""), f"{systems[name]['ppl']:.3f}",
             *(f"{systems[name][f'ppl_{k}']:.3f}" for k in kinds)] for name in order]
    lines = render_table(["system", "ppl (all)", *(f"ppl {k}" for k in kinds)], rows)
    lines += [
        "",
        *render_table(
            ["segments of", "n", "routing accuracy"],
            [[k, str(v["segments"]), f"{v['accuracy']:.3f}"] for k, v in result["routing"].items()],
        ),
    ]
    return "\n".join(lines)


def measure(args) -> dict:
    tests = dict(spec.split("=", 1) for spec in args.test)
    device = resolve_device(args.device)
    router, info = load_domain_router(args.router)
    base, tokenizer = load_model(args.model, device=device)
    router.to(base.device)
    ckpts = {d["name"]: d["checkpoint"] for d in info["domains"]}
    ckpts.update(dict(spec.split("=", 1) for spec in args.memdec or []))
    missing = sorted(set(tests) - set(ckpts))
    if missing:
        sys.exit(f"domains.py: --test {missing[0]} names no domain of the router ({', '.join(ckpts)})")
    joints = {name: MemoryDecoderModel.from_pretrained(base, ckpts[name], tokenizer=tokenizer, auto_router=False)
              for name in tests}
    lambdas = {name: joint.lmbda for name, joint in joints.items()}
    stream = build_stream(tests, args.general, tokenizer, args.segments, args.segment_tokens)
    t0, scored = time.perf_counter(), []
    for kind, tokens in stream:
        if args.budget_s is not None and scored and time.perf_counter() - t0 > args.budget_s:
            break
        scored.append((kind, score_segment(tokens, args.prompt_tokens, joints, base, router, bos_prefix(tokenizer),
                                           base.device)))
    result = summarise(scored, lambdas)
    result.update(
        model=args.model,
        router=str(args.router),
        tests=tests,
        general=args.general,
        segments=len(scored),
        planned_segments=len(stream),
        segment_tokens=args.segment_tokens,
        prompt_tokens=args.prompt_tokens,
        checkpoint_lambda=lambdas,
        seconds=round(time.perf_counter() - t0, 1),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpora", help="write the third domain's corpus files (pydocs-train/test.jsonl)")
    c.add_argument("--out", required=True, type=Path)
    m = sub.add_parser("measure", help="the three-domain stream: routed vs oracle vs best single decoder")
    m.add_argument("--model", required=True)
    m.add_argument("--router", required=True, help="a domain router folder (memdec router --domains)")
    m.add_argument("--memdec", action="append", help="NAME=CKPT: a decoder in place of the router's record")
    m.add_argument("--test", action="append", required=True, help="NAME=SPEC: a domain's test text (repeat)")
    m.add_argument("--general", default="general:test")
    m.add_argument("--segments", type=int, default=24)
    m.add_argument("--segment-tokens", type=int, default=512)
    m.add_argument("--prompt-tokens", type=int, default=64)
    m.add_argument("--budget-s", type=float, default=None, help="stop adding segments after this many seconds")
    m.add_argument("--device", default="auto")
    m.add_argument("--out", type=Path, default=None, help="JSON of the result")
    args = parser.parse_args(argv)
    if args.command == "corpora":
        for f in write_corpora(args.out):
            print(f"wrote {f}")
        return 0
    if not 1 <= args.prompt_tokens < args.segment_tokens - 1:
        sys.exit("domains.py: --prompt-tokens must lie between 1 and --segment-tokens - 2")
    result = measure(args)
    print(format_summary(result))
    print(f"{result['segments']} of {result['planned_segments']} segments of {args.segment_tokens} tokens in "
          f"{result['seconds']} s; oracle λ {result['oracle_lambda']}")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
