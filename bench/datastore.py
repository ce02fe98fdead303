"""Benchmark ``memdec datastore``: key throughput, against a plain body forward, target search, disk.

Prints:
- build throughput (tokens/s): positions keyed per second doing what the keys step does per
  chunk (hooked forward with the early stop, fp16 keys into a memmap, flush, manifest write);
- that throughput as a ratio to a plain forward of the model body alone (no LM head, no hook)
  over the same windows, in the same run (target ≥ 0.9). The two are timed window by window in
  alternating order, so a busy shared machine slows both alike;
- the same ratio without the early stop (does stopping the forward at the hook pay?), and the
  keys-step throughput of a real end-to-end build (noisier: not interleaved);
- target-search throughput (positions/s for the whole targets step) and its split between the
  faiss search and the sparse aggregation;
- bytes per token on disk, and distinct tokens per target row.

usage: .venv/bin/python bench/datastore.py [--model smollm2-135m] [--corpus austen:train]
       [--max-tokens 4096] [--k 1024] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memdec.data import load_token_stream, sliding_windows, window_batches
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.store import (DEFAULT_K, FFNInputCapture, Manifest, model_body, open_datastore, read_manifest,
                          window_keys, write_manifest)
from memdec.index import search, set_num_threads
from memdec.models import load_model
from memdec.targets import drop_self, knn_distribution, lookup_values


def window_inputs(stream: torch.Tensor, batch: np.ndarray) -> torch.Tensor:
    length = int(batch[0, 1] - batch[0, 0])
    return stream[torch.as_tensor(batch[:, 0])[:, None] + torch.arange(length)[None, :]]


@torch.inference_mode()
def body_forward_tps(model, stream, chunks, n_positions: int) -> float:
    """Positions per second of a plain body forward (no LM head, no hook) over the windows."""
    body = model_body(model)
    t0 = time.perf_counter()
    for batch in chunks:
        body(input_ids=window_inputs(stream, batch), use_cache=False)
    return n_positions / (time.perf_counter() - t0)


@torch.inference_mode()
def paired_timings(model, stream, chunks, folder: Path) -> dict[str, float]:
    """Seconds per variant, timed window by window in alternating order, so that both sides of
    each ratio see the same load on a shared machine.

    - body: a plain body forward (no LM head, no hook);
    - keys: what the keys step does per chunk: the hooked forward with the early stop, fp16 keys
      written into a memmap, flushed, and an atomic manifest write;
    - no_stop: the hooked forward that runs the body to its end (keys not written).
    """
    body = model_body(model)
    d = model.config.hidden_size
    n = int(chunks[-1][-1, 1])
    keys = np.lib.format.open_memmap(folder / "keys.npy", mode="w+", dtype=np.float16, shape=(n, d))
    stop, full = FFNInputCapture(model, stop=True), FFNInputCapture(model, stop=False)
    manifest = Manifest(n_keys=n, dim=d)

    def run_body(batch):
        body(input_ids=window_inputs(stream, batch), use_cache=False)

    def run_keys(batch):
        with stop:
            keys[int(batch[0, 2]) : int(batch[-1, 1])] = window_keys(model, stream, batch, stop)
        keys.flush()
        manifest.steps.keys.positions_done = int(batch[-1, 1])
        write_manifest(folder, manifest)

    def run_no_stop(batch):
        with full:
            window_keys(model, stream, batch, full)

    variants = {"body": run_body, "keys": run_keys, "no_stop": run_no_stop}
    seconds = dict.fromkeys(variants, 0.0)
    names = list(variants)
    for i, batch in enumerate(chunks):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            variants[name](batch)
            seconds[name] += time.perf_counter() - t0
    return seconds


def search_split(path: Path, k: int, temperature: float, n_queries: int = 1024) -> dict:
    """Seconds per 1000 positions of the faiss search and of the aggregation into CSR rows."""
    ds = open_datastore(path)
    index = ds.load_index()
    n = min(n_queries, ds.n_keys)
    queries = np.asarray(ds.keys[:n])
    values = np.asarray(ds.values)
    t0 = time.perf_counter()
    dists, ids = search(index, queries, k + 1)
    t1 = time.perf_counter()
    dists, ids = drop_self(dists, ids, np.arange(n))
    knn_distribution(dists, lookup_values(ids, values), temperature)
    t2 = time.perf_counter()
    return {"search_s_per_1k": round((t1 - t0) / n * 1000, 4), "aggregate_s_per_1k": round((t2 - t1) / n * 1000, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="austen:train")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--k", type=int, default=DEFAULT_K)
    ap.add_argument("--knn-temp", type=float, default=1.0)
    ap.add_argument("--out", help="keep the datastore in this folder (default: a temporary one, deleted afterwards)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()

    set_num_threads()
    model, tokenizer = load_model(args.model)
    tokens = load_token_stream(args.corpus, tokenizer, args.max_tokens)
    n = len(tokens) - 1
    stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    chunks = window_batches(sliding_windows(len(tokens), args.block_size, args.stride), 1)
    fed = sum(int(c[0, 1] - c[0, 0]) for c in chunks)
    print(f"{args.model} on {n} positions of {args.corpus}: {len(chunks)} windows, {fed} tokens fed "
          f"(block {args.block_size}, stride {args.stride}), torch threads {torch.get_num_threads()}")

    with torch.inference_mode():  # warm-up
        model_body(model)(input_ids=window_inputs(stream, chunks[0])[:, :64], use_cache=False)

    tmp = Path(tempfile.mkdtemp(prefix="memdec-bench-"))
    out = Path(args.out) if args.out else tmp / "ds"
    try:
        paired = paired_timings(model, stream, chunks, tmp)
        body_tps, keys_tps = n / paired["body"], n / paired["keys"]
        cfg = DatastoreConfig(model=args.model, corpus=args.corpus, out=str(out), k=args.k, knn_temp=args.knn_temp,
                              block_size=args.block_size, stride=args.stride, max_tokens=args.max_tokens,
                              batch_size=1, progress=False)
        t0 = time.perf_counter()
        build_datastore(cfg)
        wall = time.perf_counter() - t0
        body_after = body_forward_tps(model, stream, chunks, n)
        m = read_manifest(out)
        build_tps = m.steps.keys.tokens_per_s
        split = search_split(out, args.k, args.knn_temp)
        t = m.steps.targets
        figures = {
            "positions": n,
            "build_tokens_per_s": round(keys_tps, 1),
            "body_forward_tokens_per_s": round(body_tps, 1),
            "build_to_body_ratio": round(keys_tps / body_tps, 3),
            "no_stop_to_body_ratio": round(paired["body"] / paired["no_stop"], 3),
            "end_to_end_build_keys_tokens_per_s": build_tps,
            "end_to_end_body_tokens_per_s": round(body_after, 1),
            "build_wall_s": round(wall, 2),
            "index_type": m.steps.index.type,
            "index_s": m.steps.index.seconds,
            "target_search_tokens_per_s": t.rows_per_s,
            **split,
            "bytes_per_token": m.disk["bytes_per_token"],
            "bytes_per_token_by_file": {f: round(b / n, 2) for f, b in m.disk["files"].items()},
            "target_bytes_per_token": t.bytes_per_token,
            "distinct_tokens_per_row_mean": t.mean_support,
            "distinct_tokens_per_row_percentiles": t.support_percentiles,
            "kl_truncation_mean": t.kl_truncation_mean,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"plain body forward:        {body_tps:8.1f} tok/s  (no LM head, no hook)")
    print(
        f"build (keys work):         {keys_tps:8.1f} tok/s  = {figures['build_to_body_ratio']:.3f} x the body forward "
        f"(target >= 0.9; timed window by window, interleaved)"
    )
    print(f"  without the early stop:  {figures['no_stop_to_body_ratio']:8.3f} x the body forward")
    print(f"  end to end, keys step of a real build: {build_tps:.1f} tok/s (body alone right after: {body_after:.1f}; "
          f"not interleaved, so noisier)")
    print(f"index ({figures['index_type']}):              {figures['index_s']:8.2f} s")
    print(f"target search:             {t['rows_per_s']:8.1f} tok/s  (k={args.k}; per 1000 positions: "
          f"search {split['search_s_per_1k']:.3f} s, aggregation {split['aggregate_s_per_1k']:.3f} s)")
    print(f"disk:                      {figures['bytes_per_token']:8.1f} bytes/token  "
          + ", ".join(f"{f} {b:.0f}" for f, b in figures["bytes_per_token_by_file"].items()))
    pct = ", ".join(f"{q} {v:g}" for q, v in t["support_percentiles"].items())
    print(f"distinct tokens per row:   mean {t['mean_support']:.1f}; {pct}")
    print(f"whole build wall time:     {wall:8.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
