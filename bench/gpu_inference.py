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

Each timing is the median of ``--reps`` runs after one warm-up (which includes the CUDA graph capture),
the runs of a row taking turns.
``--budget-s`` skips the rows that would start after that many seconds and still writes the JSON.

    python bench/gpu_inference.py --out gpu.json                            # the GPU run
    python bench/gpu_inference.py --device cpu --size small --new-tokens 8 --score-len 128 \\
        --knn-keys 20000 --knn-k 64 --out /tmp/cpu.json                     # a quick CPU check
    python bench/gpu_inference.py --device cpu --model smollm2-135m --batches 1 --no-scoring  # default model
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time

import torch

from memdec.evaluate import base_scorer
from memdec.fast import FastJointGenerator, fast_scorer
from memdec.joint import MemoryDecoderModel

GPT2_SIZES = {"small": (768, 12, 12), "medium": (1024, 24, 16), "large": (1280, 36, 20), "xl": (1600, 48, 25)}
VOCAB = 50257


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
    chunk = torch.randint(0, base.config.vocab_size, (args.score_batch, args.score_len + 1), generator=g).to(args.device)
    ids, targets = chunk[:, :-1], chunk[:, 1:]
    med, runs, _ = timed_all({"base": lambda: base_scorer(base)(ids, targets),
                              "joint": lambda: joint.scorer()(ids, targets),
                              "joint_2streams": lambda: fast_scorer(joint)(ids, targets)}, args.reps, args.device)
    n = n_params(joint.memdec) / n_params(base)
    return {"kind": "scoring", "batch": args.score_batch, "length": args.score_len,
            "base_s": med["base"], "joint_s": med["joint"], "joint_2streams_s": med["joint_2streams"],
            "ratio": med["joint"] / med["base"], "ratio_2streams": med["joint_2streams"] / med["base"], "limit": 1 + n,
            "base_tok_s": args.score_batch * args.score_len / med["base"], "runs_s": runs}


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
    b_dec = wbytes(joint.memdec) + batch * ctx * kv_bytes_per_token(joint.memdec, args.dtype)
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
                keys[i : i + step] = torch.randn((min(step, n_keys - i), d), generator=g, device=dev, dtype=torch.float16)
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
    lines = [f"{result['device_name']}, {result['dtype']}, torch {result['torch']}, transformers {result['transformers']}",
             "", "| base | params | row | base eager / fast | joint eager / fast | joint/base eager | joint/base fast "
             "| fast, one stream | limit |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size in result["sizes"]:
        for r in size["rows"]:
            if r["kind"] == "scoring":
                lines.append(f"| {size['name']} | {size['base_params'] / 1e6:.0f}M | scoring {r['batch']}×{r['length']} "
                             f"| {1000 * r['base_s']:.1f} ms | {1000 * r['joint_s']:.1f} / {1000 * r['joint_2streams_s']:.1f} ms "
                             f"| {f(r['ratio'], '.3f')} | {f(r['ratio_2streams'], '.3f')} | – | {f(r['limit'], '.3f')} |")
            else:
                lines.append(f"| {size['name']} | {size['base_params'] / 1e6:.0f}M | decode b{r['batch']}, {r['new_tokens']} tok "
                             f"| {1000 * r['base_eager_s']:.0f} / {1000 * r['base_fast_s']:.0f} ms "
                             f"| {1000 * r['joint_eager_s']:.0f} / {1000 * r['joint_fast_s']:.0f} ms "
                             f"| {f(r['ratio_eager'], '.3f')} | {f(r['ratio_fast'], '.3f')} | {f(r['ratio_fast_1stream'], '.3f')} "
                             f"| {f(r['limit'], '.3f')} |")
    if result.get("knn"):
        lines += ["", "| kNN-LM keys | d | decode b1 ms/token | ÷ base fast | ÷ memdec overhead (fast) "
                  "| decode b8 ms/token | ÷ memdec overhead (fast) | scoring ms/token | ÷ base | ÷ memdec overhead |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["knn"]:
            if "error" in r:
                lines.append(f"| {r['n_keys']:,} | {r['d']} | {r['error']} |")
                continue
            lines.append(f"| {r['n_keys']:,} | {r['d']} | {r['decode_b1_ms_per_token']:.3f} | {f(r.get('decode_b1_fast_vs_base'))} "
                         f"| {f(r.get('decode_b1_fast_knn_over_memdec'), '.1f')} | {r['decode_b8_ms_per_token']:.3f} "
                         f"| {f(r.get('decode_b8_fast_knn_over_memdec'), '.1f')} | {r['score_ms_per_token']:.4f} "
                         f"| {f(r.get('score_vs_base'))} | {f(r.get('score_knn_over_memdec'), '.1f')} |")
    if result["skipped"]:
        lines += ["", f"skipped (budget): {', '.join(result['skipped'])}"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(GPT2_SIZES), default=["xl", "large", "medium", "small"],
                   help="base sizes, in this order (the kNN rows run right after the first)")
    p.add_argument("--size", choices=list(GPT2_SIZES), help="one base size only (and kNN d=768 if small)")
    p.add_argument("--model", help="a memdec model spec (e.g. smollm2-135m) instead of GPT-2 bases; its "
                                   "memory decoder is a 4-block shortened copy; no kNN rows")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--score-batch", type=int, default=8)
    p.add_argument("--score-len", type=int, default=1024)
    p.add_argument("--no-scoring", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--knn-keys", type=float, nargs="*", default=[1e6, 1e7])
    p.add_argument("--knn-k", type=int, default=1024)
    p.add_argument("--knn-score-queries", type=int, default=512)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    if args.size:
        args.sizes = [args.size]
    args.dtype = (torch.bfloat16 if args.device.startswith("cuda") else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    import transformers

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    result = {"device_name": device_name, "device": args.device, "dtype": str(args.dtype).replace("torch.", ""),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "args": {k: (str(v) if k == "dtype" else v) for k, v in vars(args).items()},
              "sizes": [], "knn": [], "skipped": budget.skipped}
    print(f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}, {result['dtype']}",
          flush=True)

    def write():
        result["elapsed_s"] = budget.elapsed()
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)

    if args.model:
        from memdec.models import load_model
        from memdec.train import shortened_copy

        base, _ = load_model(args.model, device=args.device, dtype=args.dtype)
        memdec = shortened_copy(base, 4).eval()
        plan = [(args.model, base, memdec)]
        args.knn_keys = []
    else:
        memdec = gpt2("small", args.device, args.dtype, seed=1)
        plan = [(size, None, memdec) for size in args.sizes]
    knn_d = 768 if args.sizes == ["small"] else GPT2_SIZES[args.sizes[0]][0]

    for i, (name, base, dec) in enumerate(plan):
        if not budget.ok(f"base {name}"):
            continue
        t0 = time.perf_counter()
        if base is None:
            base = gpt2(name, args.device, args.dtype, seed=0)
        joint = MemoryDecoderModel(base, dec, lmbda=0.3)
        size = {"name": name, "base_params": n_params(base), "memdec_params": n_params(dec),
                "build_s": time.perf_counter() - t0, "rows": []}
        result["sizes"].append(size)
        print(f"\n== base {name}: {size['base_params'] / 1e6:.0f}M parameters, decoder {size['memdec_params'] / 1e6:.0f}M",
              flush=True)
        if not args.no_scoring and budget.ok(f"{name} scoring"):
            r = scoring_row(base, joint, args)
            size["rows"].append(r)
            print(f"scoring {r['batch']}×{r['length']}: base {1000 * r['base_s']:.1f} ms, joint {1000 * r['joint_s']:.1f} ms, "
                  f"2 streams {1000 * r['joint_2streams_s']:.1f} ms; ratio {r['ratio']:.3f}, 2 streams "
                  f"{r['ratio_2streams']:.3f} (limit {r['limit']:.3f})", flush=True)
            write()
        for b in args.batches:
            if not budget.ok(f"{name} decoding b{b}"):
                continue
            r = decoding_row(base, joint, b, args)
            size["rows"].append(r)
            print(f"decode b{b}: base eager {r['base_eager_s']:.3f}s fast {r['base_fast_s']:.3f}s; joint eager "
                  f"{r['joint_eager_s']:.3f}s fast {r['joint_fast_s']:.3f}s (one stream {r['joint_fast1_s']:.3f}s); ratio eager "
                  f"{r['ratio_eager']:.3f} fast {r['ratio_fast']:.3f} (one stream {r['ratio_fast_1stream']:.3f}, limit "
                  f"{r['limit']:.3f}); paths {r['fast_paths']}, two streams {r['two_streams']}; "
                  f"fast==eager tokens base {r['base_fast_equal_tokens']:.2f} joint {r['joint_fast_equal_tokens']:.2f}"
                  + (f"; GRAPH ERRORS {r['graph_errors']}" if r.get("graph_errors") else ""), flush=True)
            write()
        del joint, base
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if i == 0 and args.knn_keys:
            result["knn"] = knn_rows([int(n) for n in args.knn_keys], knn_d, args, budget)
            result["knn_base"] = name
            compare_knn(result["knn"], size["rows"], args.batches)
            write()
    write()
    print("\n" + markdown(result), flush=True)
    print(f"\ntotal {budget.elapsed():.0f}s", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
