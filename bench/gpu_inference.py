"""Joint (base + memory decoder) inference cost ÷ the base alone, across GPT-2 base sizes, in one run.

Random-initialised GPT-2 configs (no weights travel): bases small (124M), medium (355M), large (774M),
xl (1.5B); memory decoder GPT-2 small; bf16, SDPA on CUDA. For each base size:

- scoring: one batch of ``--score-batch`` × ``--score-len`` tokens (8 × 1024), target log-probs of
  every position: the base alone (``base_scorer``) vs the joint model (``MemoryDecoderModel.scorer``);
- decoding: greedy, ``--new-tokens`` (128) new tokens after a ``--prompt-len`` prompt, EOS
  suppressed (``min_new_tokens``), at each ``--batches`` size (1 and 8): the base alone and the joint
  model, each eager (Hugging Face ``generate``) and fast (``memdec.fast.FastJointGenerator``: static
  caches, one CUDA graph per step, the decoder on a second stream; "base fast" is the same generator at
  λ = 0, which skips the decoder; "one stream" is the joint fast path with both models on one stream);
  scoring also with ``memdec.fast.fast_scorer`` (the two forwards on two streams);
- the physical limit of each ratio: scoring 1 + N_dec/N_base (FLOPs ≈ 2·N per token); decoding
  (bytes_base + bytes_dec)/bytes_base with bytes = weights (bf16, tied embeddings once) + the KV cache
  read at the mean context length, for that batch size.

kNN-LM rows: ``--knn-keys`` random fp16 keys (1M and 10M) of dimension d = the largest base's
hidden size (768 with ``--size small``), exact search as fp16 matmuls over blocks of keys (squared L2
through the key norms) and ``torch.topk`` per block, merged (k = ``--knn-k``, 1024), then the neighbours' values
scattered into a vocabulary distribution. Cost per decoded token (1 and 8 queries per step) and per
scored token (``--knn-score-queries`` queries, divided), compared with the base's time per token and
with the memory decoder's own overhead. (memdec's ``TorchFlatIndex`` keeps fp32 keys, 64 GB at 10M ×
1600, and multiplies in exact fp32; the fp16 search here is the cheaper bound for kNN-LM.)

Round three (issue 28):

- ``--llama-sizes``: the bases are random ``LlamaConfig`` models of GPT-2's widths, depths and heads (small
  768 × 12, medium 1024 × 24, large 1280 × 36, xl 1600 × 48; vocabulary 50257, tied embeddings, MLP width
  ⌈8/3·d⌉ rounded to 64, so that the three-matrix SwiGLU MLP holds GPT-2's 8·d² parameters per block), since
  the decoder shapes need ``model.model.layers`` (GPT-2 has ``transformer.h``). The separate decoder is then
  the Llama of GPT-2-small size. ``--sizes tiny`` (128 × 4) is for CPU checks only.
- ``--decoder SPEC`` (repeatable): ``separate`` (default: the GPT-2-small-sized decoder above, or the
  4-block shortened copy with ``--model``) and any shape of ``memdec.decoders`` built from each base
  (``fork:K``, ``lora:R@K``; ``copy`` is a second base): each spec gets its scoring and decoding rows;
  a fork or LoRA decoder scores on the shared trunk (``MemoryDecoderModel``), the fast path runs it as a
  separate model (docs/benchmarks-gpu.md).
- ``--router``: per spec, a random ``memdec.router.TokenRouter`` attached: scoring (the routed scorer)
  and eager decoding at each batch size, against the base and the fixed-λ joint model (the fast path
  falls back to eager with a token router, so eager is its cost).
- ``--compile``: scoring also with the decoder ``torch.compile``d (the base eager), the first call (the
  compile) timed apart.
- ``--decoder-score-batch M``: scoring also with the decoder alone on M rows at once (M a multiple of
  ``--score-batch``), the base on its ``--score-batch`` rows at a time: the ratio over the same M rows.

Each timing is the median of ``--reps`` runs after one warm-up (which includes the CUDA graph capture),
the runs of a row taking turns.
``--budget-s`` skips the rows that would start after that many seconds and still writes the JSON.

    python bench/gpu_inference.py --out gpu.json                            # the GPU run
    python bench/gpu_inference.py --device cpu --size small --new-tokens 8 --score-len 128 \\
        --knn-keys 20000 --knn-k 64 --out /tmp/cpu.json                     # a quick CPU check
    python bench/gpu_inference.py --device cpu --model smollm2-135m --batches 1 --no-scoring  # default model
    python bench/gpu_inference.py --llama-sizes --decoder separate --decoder fork:4 --decoder lora:16@4 \
        --router --compile --decoder-score-batch 32 --knn-keys 1e6 --out round3.json   # round three, GPU
    python bench/gpu_inference.py --device cpu --llama-sizes --sizes tiny --decoder separate --decoder fork:1 \
        --decoder lora:4@1 --router --score-batch 2 --score-len 64 --decoder-score-batch 4 --new-tokens 4 \
        --batches 1 2 --reps 1 --knn-keys 20000 --knn-k 64 --knn-score-queries 16 --out /tmp/r3.json  # CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from memdec.decoders import blocks_and_norm, parse_shape, shared_split
from memdec.errors import MemdecError
from memdec.evaluate import base_scorer
from memdec.fast import FastJointGenerator, fast_scorer
from memdec.joint import MemoryDecoderModel
from memdec.router import RouterFeatures, TokenRouter
from memdec.scoring import causal_lm_logits, mix_logprobs, target_logprobs

GPT2_SIZES = {"small": (768, 12, 12), "medium": (1024, 24, 16), "large": (1280, 36, 20), "xl": (1600, 48, 25),
              "tiny": (128, 4, 4)}  # tiny: CPU checks only
VOCAB = 50257
SEPARATE = "separate"  # --decoder: the separate GPT-2-small-sized decoder (the paper's), not a shape of the base


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpt2(size: str, device: str, dtype: torch.dtype, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd, n_layer, n_head = GPT2_SIZES[size]
    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=VOCAB, n_positions=1024)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: fast for 1.5B parameters
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype=dtype).eval()


def llama(size: str, device: str, dtype: torch.dtype, seed: int):
    """A random Llama of GPT-2 ``size``'s width, depth and heads, GPT-2's parameter count per block (the
    SwiGLU MLP ⌈8/3·d⌉ wide, rounded to 64) and vocabulary; tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_embd, n_layer, n_head = GPT2_SIZES[size]
    cfg = LlamaConfig(hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
                      num_key_value_heads=n_head, intermediate_size=64 * math.ceil(8 * n_embd / 3 / 64),
                      vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=dtype).eval()


def build_base(size: str, args):
    return (llama if args.llama_sizes else gpt2)(size, args.device, args.dtype, seed=0)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def kv_bytes_per_token(model, dtype) -> int:
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.hidden_size * torch.finfo(dtype).bits // 8


def timed_all(runs: dict, reps: int, device: str) -> tuple[dict, dict, dict]:
    """(median seconds, all seconds, last result) of each run: one warm-up each, then ``reps`` rounds
    taking turns, so that drift (clocks, other load) hits every run alike."""
    outs = {name: fn() for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            outs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}, times, outs


def timed(fn, reps: int, device: str) -> tuple[float, list[float], object]:
    """(median seconds, all seconds, last result) of ``reps`` runs after one warm-up."""
    out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def ok(self, what: str) -> bool:
        if self.elapsed() > self.seconds:
            self.skipped.append(what)
            print(f"[budget] {self.elapsed():.0f}s > {self.seconds:.0f}s: skipping {what}", flush=True)
            return False
        return True


# --------------------------------------------------------------------------------------------
# memdec rows


def scoring_row(base, joint, args) -> dict:
    g = torch.Generator().manual_seed(0)
    chunk = torch.randint(0, base.config.vocab_size, (args.score_batch, args.score_len + 1), generator=g).to(
        args.device
    )
    ids, targets = chunk[:, :-1], chunk[:, 1:]
    med, runs, _ = timed_all({"base": lambda: base_scorer(base)(ids, targets),
                              "joint": lambda: joint.scorer()(ids, targets),
                              "joint_2streams": lambda: fast_scorer(joint)(ids, targets)}, args.reps, args.device)
    n = second_pass_params(base, joint.memdec) / n_params(base)
    return {"kind": "scoring", "batch": args.score_batch, "length": args.score_len,
            "base_s": med["base"], "joint_s": med["joint"], "joint_2streams_s": med["joint_2streams"],
            "ratio": med["joint"] / med["base"], "ratio_2streams": med["joint_2streams"] / med["base"], "limit": 1 + n,
            "base_tok_s": args.score_batch * args.score_len / med["base"], "runs_s": runs}


def own_params(base, decoder) -> int:
    """Parameters of ``decoder`` that are not the base's own tensors (a shared trunk is not counted)."""
    shared = {p.data_ptr() for p in base.parameters()}
    return sum(p.numel() for p in decoder.parameters() if p.data_ptr() not in shared)


def second_pass_params(base, decoder) -> int:
    """The parameters that a joint forward runs a second time for ``decoder``: all of a separate model's;
    a shared trunk's own blocks (fork or LoRA: the blocks from ``shared_split`` on), final norm and head."""
    split = shared_split(base, decoder)
    if split is None:
        return n_params(decoder)
    layers, norm = blocks_and_norm(decoder)
    again = [*layers[split:], norm, decoder.get_output_embeddings()]
    return sum(p.numel() for m in again for p in m.parameters())


def split_scorer(base, decoder, temperature: float, lmbda: float, base_batch: int):
    """The joint scorer with the two forwards apart: the base on ``base_batch`` rows at a time, the decoder
    (``decoder``: any callable model, e.g. ``torch.compile``d) on all the rows it is given at once."""

    @torch.inference_mode()
    def score(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = targets.shape[1]
        lp_base = torch.cat(
            [
                target_logprobs(causal_lm_logits(base, ids[i : i + base_batch], n), targets[i : i + base_batch])
                for i in range(0, len(ids), base_batch)
            ]
        )
        lp_mem = target_logprobs(causal_lm_logits(decoder, ids, n).float() / temperature, targets)
        return mix_logprobs(lp_base, lp_mem, lmbda)

    return score


def base_chunks(base, base_batch: int):
    """The base alone on ``base_batch`` rows at a time (the denominator of ``split_scorer``'s rows)."""
    scorer = base_scorer(base)
    return lambda ids, targets: torch.cat([scorer(ids[i : i + base_batch], targets[i : i + base_batch])
                                           for i in range(0, len(ids), base_batch)])


def scoring_extra_row(base, joint, args) -> dict:
    """``--compile`` and ``--decoder-score-batch``: the separate decoder compiled, and/or fed M rows at once,
    the base eager on ``--score-batch`` rows at a time; each ratio over the same M × ``--score-len`` tokens."""
    m = args.decoder_score_batch or args.score_batch
    g = torch.Generator().manual_seed(2)
    chunk = torch.randint(0, base.config.vocab_size, (m, args.score_len + 1), generator=g).to(args.device)
    ids, targets = chunk[:, :-1], chunk[:, 1:]
    temp, lam, b = joint.temperature, joint.lmbda, args.score_batch
    fns = {"base": base_chunks(base, b), "joint_split": split_scorer(base, joint.memdec, temp, lam, b)}
    row = {"kind": "scoring_extra", "batch": b, "decoder_batch": m, "length": args.score_len}
    if args.compile:
        compiled = torch.compile(joint.memdec, dynamic=False)
        fns["joint_compiled"] = split_scorer(base, compiled, temp, lam, b)
        t0 = time.perf_counter()
        fns["joint_compiled"](ids, targets)  # the compile itself, timed apart from the runs
        sync(args.device)
        row["compile_s"] = time.perf_counter() - t0
    runs = {name: (lambda fn=fn: fn(ids, targets)) for name, fn in fns.items()}
    med, row["runs_s"], outs = timed_all(runs, args.reps, args.device)
    for name in runs:
        row[f"{name}_s"] = med[name]
        if name != "base":
            row[f"ratio_{name.removeprefix('joint_')}"] = med[name] / med["base"]
    if args.compile:
        row["compiled_max_abs_diff"] = float((outs["joint_compiled"] - outs["joint_split"]).abs().max())
    return row


def router_row(base, joint, args) -> dict:
    """A random ``TokenRouter`` attached: scoring (routed) and eager greedy decoding at each batch size, each
    against the base alone and the fixed-λ joint model; the fast path falls back to eager with a router."""
    features = RouterFeatures(base.config.hidden_size, joint.memdec.config.hidden_size)
    torch.manual_seed(3)
    router = TokenRouter(features).to(base.device)
    torch.nn.init.normal_(router.out.weight, std=0.1)  # not the constant λ it starts at
    g = torch.Generator().manual_seed(0)
    chunk = torch.randint(0, base.config.vocab_size, (args.score_batch, args.score_len + 1), generator=g).to(
        args.device
    )
    ids, targets = chunk[:, :-1], chunk[:, 1:]
    fixed = joint.scorer()
    joint.router = router
    try:
        row = {"kind": "router", "batch": args.score_batch, "length": args.score_len,
               "router_params": sum(p.numel() for p in router.parameters())}
        med, row["runs_s"], _ = timed_all(
            {
                "base": lambda: base_scorer(base)(ids, targets),
                "joint": lambda: fixed(ids, targets),
                "routed": lambda: joint.scorer()(ids, targets),
            },
            args.reps,
            args.device,
        )
        row.update(score_base_s=med["base"], score_joint_s=med["joint"], score_routed_s=med["routed"],
                   score_ratio_joint=med["joint"] / med["base"], score_ratio_routed=med["routed"] / med["base"])
        for batch in args.router_batches:
            prompt = torch.randint(0, base.config.vocab_size, (batch, args.prompt_len), generator=g).to(args.device)
            kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, do_sample=False, num_beams=1, pad_token_id=0)
            fixed_joint = MemoryDecoderModel(base, joint.memdec, lmbda=joint.lmbda)
            med, _, _ = timed_all(
                {
                    "base": lambda: base.generate(prompt, **kw),
                    "joint": lambda: fixed_joint.generate(prompt, **kw),
                    "routed": lambda: joint.generate(prompt, **kw),
                },
                args.reps,
                args.device,
            )
            row[f"decode_b{batch}"] = {
                "base_eager_s": med["base"],
                "joint_eager_s": med["joint"],
                "routed_eager_s": med["routed"],
                "ratio_joint": med["joint"] / med["base"],
                "ratio_routed": med["routed"] / med["base"],
            }
    finally:
        joint.router = None
    return row


def decoding_row(base, joint, batch: int, args) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, base.config.vocab_size, (batch, args.prompt_len), generator=g).to(args.device)
    mask = torch.ones_like(prompt)
    new = args.new_tokens
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
              pad_token_id=0)
    base_only = MemoryDecoderModel(base, joint.memdec, lmbda=0.0)
    fast_joint, fast_base = FastJointGenerator(joint), FastJointGenerator(base_only)
    fast_joint1 = FastJointGenerator(joint, streams=False)
    runs = {
        "base_eager": lambda: base.generate(prompt, **kw),
        "joint_eager": lambda: joint.generate(prompt, **kw),
        "base_fast": lambda: fast_base.generate(prompt, **kw),
        "joint_fast": lambda: fast_joint.generate(prompt, **kw),
        "joint_fast1": lambda: fast_joint1.generate(prompt, **kw),
    }
    row = {"kind": "decoding", "batch": batch, "prompt": args.prompt_len, "new_tokens": new}
    med, row["runs_s"], outs = timed_all(runs, args.reps, args.device)
    for name in runs:
        row[f"{name}_s"] = med[name]
        assert outs[name].shape == (batch, args.prompt_len + new), (name, outs[name].shape)
    gens = {"base": fast_base, "joint": fast_joint, "joint_1stream": fast_joint1}
    row["fast_paths"] = {k: g_.last_path for k, g_ in gens.items()}
    row["two_streams"] = any(st.two_streams for st in fast_joint._states.values())
    errors = {k: st.graph_error for k, g_ in gens.items() for st in g_._states.values() if st.graph_error}
    if errors:
        row["graph_errors"] = errors
    for who in ("base", "joint"):  # do fast and eager agree? (bf16 near-ties of random models may split them)
        eager, fast = outs[f"{who}_eager"][:, args.prompt_len:], outs[f"{who}_fast"][:, args.prompt_len:]
        same = (eager == fast).all(dim=0)
        row[f"{who}_fast_equal_tokens"] = float((eager == fast).float().mean())
        row[f"{who}_fast_first_diff"] = int(same.logical_not().nonzero()[0, 0]) if not bool(same.all()) else None
    row["ratio_eager"] = row["joint_eager_s"] / row["base_eager_s"]
    row["ratio_fast"] = row["joint_fast_s"] / row["base_fast_s"]
    row["ratio_fast_1stream"] = row["joint_fast1_s"] / row["base_fast_s"]
    row["fast_speedup_joint"] = row["joint_eager_s"] / row["joint_fast_s"]
    ctx = args.prompt_len + new / 2
    wbytes = lambda m: n_params(m) * torch.finfo(args.dtype).bits // 8  # noqa: E731
    b_base = wbytes(base) + batch * ctx * kv_bytes_per_token(base, args.dtype)
    b_dec = wbytes(joint.memdec) + batch * ctx * kv_bytes_per_token(joint.memdec, args.dtype)  # the fast path
    # runs a fork or LoRA decoder as a whole separate model: this limit is the fast path's, not the shared trunk's
    row["limit"] = 1 + b_dec / b_base
    row["base_fast_ms_per_step"] = 1000 * row["base_fast_s"] / new
    del fast_joint, fast_base, fast_joint1
    return row


# --------------------------------------------------------------------------------------------
# kNN-LM rows


def knn_rows(n_keys_list, d: int, args, budget: Budget) -> list[dict]:
    rows = []
    dev, k = args.device, args.knn_k
    for n_keys in n_keys_list:
        if not budget.ok(f"knn {n_keys}"):
            continue
        try:
            keys = torch.empty((n_keys, d), dtype=torch.float16, device=dev)
            g = torch.Generator(device=dev).manual_seed(0)
            step = 1 << 20
            for i in range(0, n_keys, step):
                keys[i : i + step] = torch.randn(
                    (min(step, n_keys - i), d), generator=g, device=dev, dtype=torch.float16
                )
            norms = keys.float().pow(2).sum(1).half() if dev == "cpu" else torch.cat(
                [keys[i : i + step].float().pow(2).sum(1) for i in range(0, n_keys, step)]).half()
            values = torch.randint(0, VOCAB, (n_keys,), device=dev)
        except torch.OutOfMemoryError as exc:
            rows.append({"n_keys": n_keys, "d": d, "error": f"out of memory: {exc}"[:300]})
            continue
        def search(q: torch.Tensor) -> torch.Tensor:
            """p_kNN [Q, V] of queries q [Q, d]: exact squared-L2 top-k over blocks of keys (at most ~1 GB of
            fp16 distances each), the blocks' candidates merged by one more top-k; softmax(-dist) weights
            scattered onto the neighbours' values."""
            block = max(k, min(n_keys, (1 << 29) // len(q)))
            tops, ids = [], []
            for j in range(0, n_keys, block):
                dist = torch.addmm(norms[None, j : j + block], q, keys[j : j + block].T, beta=1, alpha=-2)
                t, i = torch.topk(dist, min(k, dist.shape[1]), dim=1, largest=False, sorted=False)
                tops.append(t)
                ids.append(i + j)
            top, idx = torch.cat(tops, 1), torch.cat(ids, 1)
            if top.shape[1] > k:
                top, pick = torch.topk(top, k, dim=1, largest=False, sorted=False)
                idx = idx.gather(1, pick)
            w = torch.softmax(-top.float(), dim=1)  # + |q|² is a per-row constant: softmax ignores it
            return torch.zeros((len(q), VOCAB), dtype=torch.float32, device=dev).scatter_add_(1, values[idx], w)

        gq = torch.Generator(device=dev).manual_seed(1)
        q_all = torch.randn((max(8, args.knn_score_queries), d), generator=gq, device=dev, dtype=torch.float16)
        row = {"n_keys": n_keys, "d": d, "k": k, "key_bytes": n_keys * d * 2}
        for b in (1, 8):
            t, ts, _ = timed(lambda: search(q_all[:b]), args.reps, dev)
            row[f"decode_b{b}_s_per_step"] = t
            row[f"decode_b{b}_ms_per_token"] = 1000 * t / b
        nq = args.knn_score_queries
        t, ts, _ = timed(lambda: search(q_all[:nq]), max(1, args.reps - 1), dev)
        row["score_queries"] = nq
        row["score_ms_per_token"] = 1000 * t / nq
        rows.append(row)
        print(f"knn {n_keys:,} keys × {d}: decode b1 {row['decode_b1_ms_per_token']:.2f} ms/token, "
              f"b8 {row['decode_b8_ms_per_token']:.3f} ms/token, scoring {row['score_ms_per_token']:.4f} ms/token",
              flush=True)
        del keys, norms, values, q_all
        gc.collect()
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def compare_knn(knn: list[dict], size_rows: list[dict], batch_sizes) -> None:
    """kNN retrieval cost per token ÷ base cost per token, and ÷ the memory decoder's overhead."""
    score = next((r for r in size_rows if r["kind"] == "scoring"), None)
    for row in knn:
        if "error" in row:
            continue
        if score is not None:
            base_ms = 1000 * score["base_s"] / (score["batch"] * score["length"])
            mem_ms = base_ms * (score["ratio"] - 1)
            row["score_vs_base"] = row["score_ms_per_token"] / base_ms
            row["score_memdec_overhead"] = score["ratio"] - 1
            row["score_knn_over_memdec"] = row["score_ms_per_token"] / mem_ms if mem_ms > 0 else math.inf
        for b in batch_sizes:
            dec = next((r for r in size_rows if r["kind"] == "decoding" and r["batch"] == b), None)
            if dec is None or b not in (1, 8):
                continue
            for mode in ("fast", "eager"):
                base_ms = 1000 * dec[f"base_{mode}_s"] / (dec["new_tokens"] * b)
                mem_ms = base_ms * (dec[f"ratio_{mode}"] - 1)
                row[f"decode_b{b}_{mode}_vs_base"] = row[f"decode_b{b}_ms_per_token"] / base_ms
                row[f"decode_b{b}_{mode}_memdec_overhead"] = dec[f"ratio_{mode}"] - 1
                row[f"decode_b{b}_{mode}_knn_over_memdec"] = (
                    row[f"decode_b{b}_ms_per_token"] / mem_ms if mem_ms > 0 else math.inf)


# --------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    f = lambda v, spec=".2f": "–" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"{result['device_name']}, {result['dtype']}, torch {result['torch']}, transformers {result['transformers']}",
        "",
        "| base | params | row | base eager / fast | joint eager / fast | joint/base eager | joint/base fast "
        "| fast, one stream | limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size in result["sizes"]:
        for r in size["rows"]:
            who = f"{size['name']} {r.get('decoder', SEPARATE)}"
            if "error" in r or r["kind"] not in ("scoring", "decoding"):
                continue
            if r["kind"] == "scoring":
                lines.append(
                    f"| {who} | {size['base_params'] / 1e6:.0f}M | scoring {r['batch']}×{r['length']} "
                    f"| {1000 * r['base_s']:.1f} ms | {1000 * r['joint_s']:.1f} / {1000 * r['joint_2streams_s']:.1f} "
                    "ms "
                    f"| {f(r['ratio'], '.3f')} | {f(r['ratio_2streams'], '.3f')} | – | {f(r['limit'], '.3f')} |"
                )
            else:
                lines.append(
                    f"| {who} | {size['base_params'] / 1e6:.0f}M | decode b{r['batch']}, {r['new_tokens']} tok "
                    f"| {1000 * r['base_eager_s']:.0f} / {1000 * r['base_fast_s']:.0f} ms "
                    f"| {1000 * r['joint_eager_s']:.0f} / {1000 * r['joint_fast_s']:.0f} ms "
                    f"| {f(r['ratio_eager'], '.3f')} | {f(r['ratio_fast'], '.3f')} | "
                    f"{f(r['ratio_fast_1stream'], '.3f')} "
                    f"| {f(r['limit'], '.3f')} |"
                )
    lines += extra_tables(result)
    if result.get("knn"):
        lines += ["", "| kNN-LM keys | d | decode b1 ms/token | ÷ base fast | ÷ memdec overhead (fast) "
                  "| decode b8 ms/token | ÷ memdec overhead (fast) | scoring ms/token | ÷ base | ÷ memdec overhead |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["knn"]:
            if "error" in r:
                lines.append(f"| {r['n_keys']:,} | {r['d']} | {r['error']} |")
                continue
            lines.append(
                f"| {r['n_keys']:,} | {r['d']} | {r['decode_b1_ms_per_token']:.3f} | "
                f"{f(r.get('decode_b1_fast_vs_base'))} "
                f"| {f(r.get('decode_b1_fast_knn_over_memdec'), '.1f')} | {r['decode_b8_ms_per_token']:.3f} "
                f"| {f(r.get('decode_b8_fast_knn_over_memdec'), '.1f')} | {r['score_ms_per_token']:.4f} "
                f"| {f(r.get('score_vs_base'))} | {f(r.get('score_knn_over_memdec'), '.1f')} |"
            )
    if result["skipped"]:
        lines += ["", f"skipped (budget): {', '.join(result['skipped'])}"]
    return "\n".join(lines)


def extra_tables(result: dict) -> list[str]:
    """The round-three rows: the compiled / larger-batch decoder scoring, the router, and any errors."""
    f = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
    rows = [(size, r) for size in result["sizes"] for r in size["rows"]]
    lines = []
    extra = [(s, r) for s, r in rows if r["kind"] == "scoring_extra" and "error" not in r]
    if extra:
        lines += [
            "",
            "| base | base batch | decoder batch | base ms | joint, decoder apart / ratio | decoder compiled / ratio "
            "| compile s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s, r in extra:
            comp = (
                f"{1000 * r['joint_compiled_s']:.1f} ms / {f(r['ratio_compiled'])}" if "joint_compiled_s" in r else "–"
            )
            lines.append(
                f"| {s['name']} | {r['batch']}×{r['length']} | {r['decoder_batch']}×{r['length']} | "
                f"{1000 * r['base_s']:.1f} "
                f"| {1000 * r['joint_split_s']:.1f} ms / {f(r['ratio_split'])} | {comp} | "
                f"{f(r.get('compile_s'), '.1f')} |"
            )
    routed = [(s, r) for s, r in rows if r["kind"] == "router" and "error" not in r]
    if routed:
        batches = sorted({int(k[8:]) for _, r in routed for k in r if k.startswith("decode_b")})
        lines += ["", "| base | decoder | scoring joint / routed ÷ base | " + " | ".join(
            f"decode b{b} eager joint / routed ÷ base" for b in batches) + " |", "|" + " --- |" * (3 + len(batches))]
        for s, r in routed:
            cells = [
                f"{f(r[f'decode_b{b}']['ratio_joint'])} / {f(r[f'decode_b{b}']['ratio_routed'])}"
                if f"decode_b{b}" in r
                else "–"
                for b in batches
            ]
            lines.append(
                f"| {s['name']} | {r['decoder']} | {f(r['score_ratio_joint'])} / {f(r['score_ratio_routed'])} | "
                + " | ".join(cells)
                + " |"
            )
    errors = [(s, r) for s, r in rows if "error" in r]
    if errors:
        lines += [
            "",
            "errors: " + "; ".join(f"{s['name']} {r.get('decoder')} {r['kind']}: {r['error']}" for s, r in errors),
        ]
    return lines


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(GPT2_SIZES), default=["xl", "large", "medium", "small"],
                   help="base sizes, in this order (the kNN rows run right after the first)")
    p.add_argument("--size", choices=list(GPT2_SIZES), help="one base size only (and kNN d=768 if small)")
    p.add_argument("--model", help="a memdec model spec (e.g. smollm2-135m) instead of GPT-2 bases; its "
                                   "separate memory decoder is a 4-block shortened copy; no kNN rows")
    p.add_argument("--llama-sizes", action="store_true",
                   help="random Llama bases of GPT-2's sizes (and a Llama GPT-2-small-sized separate decoder): "
                        "what --decoder shapes need")
    p.add_argument("--decoder", action="append", metavar="SPEC",
                   help=f"{SEPARATE} (the separate small decoder) or a shape built from each base (fork:K, "
                        f"lora:R@K), repeatable: rows per spec (default: {SEPARATE})")
    p.add_argument("--router", action="store_true", help="per spec, a random TokenRouter attached: its cost")
    p.add_argument(
        "--router-batches", type=int, nargs="*", help="the router's decoding batch sizes (default: --batches)"
    )
    p.add_argument("--compile", action="store_true", help="scoring also with the separate decoder torch.compile'd")
    p.add_argument(
        "--decoder-score-batch",
        type=int,
        help="scoring also with the separate decoder on this many rows at once (a multiple of --score-batch)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--score-batch", type=int, default=8)
    p.add_argument("--score-len", type=int, default=1024)
    p.add_argument("--no-scoring", action="store_true")
    p.add_argument(
        "--batches", type=int, nargs="*", default=[1, 8], help="decoding batch sizes (none: no decoding rows)"
    )
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--knn-keys", type=float, nargs="*", default=[1e6, 1e7])
    p.add_argument("--knn-k", type=int, default=1024)
    p.add_argument("--knn-score-queries", type=int, default=512)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--out", help="write the JSON here (rewritten as each row finishes)")
    args = p.parse_args(argv)
    if args.size:
        args.sizes = [args.size]
    args.decoder = list(dict.fromkeys(args.decoder or [SEPARATE]))
    if args.router_batches is None:
        args.router_batches = args.batches
    for spec in args.decoder:  # before any model is built
        if spec == SEPARATE:
            continue
        try:
            parse_shape(spec)
        except MemdecError as exc:
            p.error(f"--decoder {spec}: {exc}")
        if not (args.llama_sizes or args.model):
            p.error(f"--decoder {spec}: decoder shapes need Llama-style bases (model.model.layers); GPT-2 has none: "
                    f"add --llama-sizes or give a Llama-style --model")
    m = args.decoder_score_batch
    if m is not None and (m < args.score_batch or m % args.score_batch):
        p.error(f"--decoder-score-batch {m} must be a multiple of --score-batch {args.score_batch}")
    args.dtype = (torch.bfloat16 if args.device.startswith("cuda") else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    return args


def build_decoder(spec: str, base, separate):
    """The decoder of ``spec`` for ``base``: the separate one, or the shape built from the base."""
    if spec == SEPARATE:
        return separate
    shape = parse_shape(spec)
    shape.check(base)
    return shape.build(base).eval()


def spec_rows(base, spec: str, dec, args, budget: Budget, write) -> list[dict]:
    """Every row of one decoder spec on one base, each kept (and the JSON rewritten) as it finishes; a row
    that fails is kept as its error, and the others still run."""
    joint = MemoryDecoderModel(base, dec, lmbda=0.3)
    rows: list[dict] = []
    plan = [] if args.no_scoring else [("scoring", lambda: scoring_row(base, joint, args))]
    if spec == SEPARATE and not args.no_scoring and (args.compile or args.decoder_score_batch):
        plan.append(("scoring_extra", lambda: scoring_extra_row(base, joint, args)))
    plan += [(f"decoding b{b}", lambda b=b: decoding_row(base, joint, b, args)) for b in args.batches]
    if args.router:
        plan.append(("router", lambda: router_row(base, joint, args)))
    for what, fn in plan:
        if not budget.ok(f"{spec} {what}"):
            continue
        try:
            row = fn()
        except Exception as exc:  # noqa: BLE001 (one failed row must not lose the others)
            row = {"kind": what.split()[0], "error": f"{type(exc).__name__}: {exc}"[:400]}
            if what.startswith("decoding"):
                row["batch"] = int(what.split("b")[-1])
        row["decoder"] = spec
        rows.append(row)
        print(
            f"[{spec}] {what}: " + json.dumps({k: v for k, v in row.items() if k != "runs_s"}, default=str), flush=True
        )
        write(rows)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    import transformers

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    result = {
        "device_name": device_name,
        "device": args.device,
        "dtype": str(args.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "args": {k: (str(v) if k == "dtype" else v) for k, v in vars(args).items()},
        "sizes": [],
        "knn": [],
        "skipped": budget.skipped,
    }
    print(f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}, {result['dtype']}",
          flush=True)

    def write(_rows=None):
        result["elapsed_s"] = budget.elapsed()
        if args.out:
            with open(args.out + ".tmp", "w") as fh:
                json.dump(result, fh, indent=1)
            os.replace(args.out + ".tmp", args.out)

    if args.model:
        from memdec.models import load_model
        from memdec.train import shortened_copy

        base, _ = load_model(args.model, device=args.device, dtype=args.dtype)
        separate = shortened_copy(base, 4).eval()
        plan = [(args.model, base)]
        args.knn_keys = []
    else:
        small = "tiny" if args.sizes == ["tiny"] else "small"
        separate = (llama if args.llama_sizes else gpt2)(small, args.device, args.dtype, seed=1)
        plan = [(size, None) for size in args.sizes]
    knn_d = 768 if args.sizes == ["small"] else GPT2_SIZES[args.sizes[0]][0]

    for i, (name, base) in enumerate(plan):
        if not budget.ok(f"base {name}"):
            continue
        t0 = time.perf_counter()
        if base is None:
            base = build_base(name, args)
        size = {"name": name, "arch": "llama" if args.llama_sizes else ("model" if args.model else "gpt2"),
                "base_params": n_params(base), "memdec_params": n_params(separate),
                "build_s": time.perf_counter() - t0, "rows": []}
        result["sizes"].append(size)
        print(f"\n== base {name}: {size['base_params'] / 1e6:.0f}M parameters, separate decoder "
              f"{size['memdec_params'] / 1e6:.0f}M", flush=True)
        for spec in args.decoder:
            if not budget.ok(f"{name} {spec}"):
                continue
            try:
                dec = build_decoder(spec, base, separate)
            except MemdecError as exc:
                size["rows"].append({"kind": "build", "decoder": spec, "error": str(exc)})
                write()
                continue
            size.setdefault("own_params", {})[spec] = own_params(base, dec)
            done = list(size["rows"])
            size["rows"] = done + spec_rows(base, spec, dec, args, budget,
                                            lambda rows: (size.__setitem__("rows", done + rows), write()))
            del dec
        del base
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if i == 0 and args.knn_keys:
            result["knn"] = knn_rows([int(n) for n in args.knn_keys], knn_d, args, budget)
            result["knn_base"] = name
            first = [r for r in size["rows"] if r.get("decoder") == args.decoder[0] and "error" not in r]
            compare_knn(result["knn"], first, args.batches)
            write()
    write()
    print("\n" + markdown(result), flush=True)
    print(f"\ntotal {budget.elapsed():.0f}s", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
