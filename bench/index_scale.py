"""Index and target-search throughput at sizes past the demo, for docs/scale.md.

On synthetic keys (Gaussian blobs, d=576 as SmolLM2-135M's FFN input; timings only, the recall of
real keys is ``bench/index_recall.py``'s), it measures:

- ``ivfpq-disk`` (``memdec.index.build_ondisk_index``): training on the sample, adding the keys
  shard by shard, merging into on-disk lists; then search queries/s at k=1025 with the nprobe the
  targets step would use (``auto_nprobe``), the lists memory-mapped;
- ``torch`` exact search (``TorchFlatIndex``) on the GPU where there is one: queries/s at k=1025,
  and the rows/s of ``knn_distribution_torch`` turning those neighbours into target rows.

    python bench/index_scale.py --n 2000000 --nlist 1024 --out scale.json   # the device run
    python bench/index_scale.py --n 20000 --torch-n 20000 --out /tmp/s.json  # a CPU smoke check

Output: one JSON object (``--out``) with every figure and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memdec.index import (
    TorchFlatIndex,
    auto_nprobe,
    build_ondisk_index,
    choose_params,
    load_index,
    search,
    set_num_threads,
)
from memdec.targets import knn_distribution_torch


def blobs(n: int, d: int, seed: int, chunk: int = 1 << 20) -> np.ndarray:
    """float16 [n, d]: 4096 Gaussian clusters, drawn chunk by chunk with torch (on the GPU where
    there is one: 10M keys in seconds), never fp32 whole."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    centres = torch.randn(4096, d, generator=gen, device=device)
    out = np.empty((n, d), dtype=np.float16)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        pick = torch.randint(0, 4096, (j - i,), generator=gen, device=device)
        noise = torch.randn(j - i, d, generator=gen, device=device)
        out[i:j] = (centres[pick] + 0.5 * noise).half().cpu().numpy()
    return out


def time_it(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def ondisk(keys: np.ndarray, queries: np.ndarray, k: int, folder: Path, nlist: int | None) -> dict:
    """Build ivfpq-disk over ``keys`` in ``folder``, then search ``queries``."""
    n, d = keys.shape
    params = choose_params(n, d, "ivfpq-disk", nlist=nlist)
    _, build_s = time_it(lambda: build_ondisk_index(keys, folder / "index.faiss", params, shard_keys=1 << 20))
    index = load_index(folder / "index.faiss")
    nprobe = auto_nprobe(index, k)
    search(index, queries[:64], k, nprobe=nprobe)  # warm the page cache's first lists
    _, search_s = time_it(lambda: search(index, queries, k, nprobe=nprobe))
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    return {"params": params.to_json(), "nprobe": nprobe, "build_s": round(build_s, 2),
            "build_keys_per_s": round(n / build_s), "search_q_per_s": round(len(queries) / search_s, 1),
            "bytes_per_key": round(sum(files.values()) / n, 2), "files": files}


def torch_exact(keys: np.ndarray, queries: np.ndarray, k: int) -> dict:
    """TorchFlatIndex search and target rows on the GPU (or the CPU where there is none)."""
    index, upload_s = time_it(lambda: TorchFlatIndex(keys))
    q = torch.from_numpy(queries.astype(np.float32)).to(index.device)
    values = torch.randint(0, 49152, (len(keys),), device=index.device)
    index.search_torch(q[:256], k)  # warm-up
    sync = torch.cuda.synchronize if index.device.type == "cuda" else (lambda: None)
    sync()
    (dists, ids), search_s = time_it(lambda: (index.search_torch(q, k), sync())[0])
    _, rows_s = time_it(lambda: knn_distribution_torch(dists[:, 1:], values[ids[:, 1:]], 1.0))
    return {"device": str(index.device), "upload_s": round(upload_s, 2), "search_q_per_s": round(len(q) / search_s, 1),
            "targets_rows_per_s": round(len(q) / rows_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2_000_000, help="keys for the ivfpq-disk index")
    ap.add_argument(
        "--torch-n", type=int, nargs="*", default=[2_000_000, 10_000_000], help="keys for exact torch search"
    )
    ap.add_argument("--nlist", type=int, default=None, help="ivfpq-disk lists (default: memdec's choice, ~4·√N)")
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--k", type=int, default=1025, help="neighbours per query (k+1: the position itself)")
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    threads = set_num_threads()
    report = {"machine": platform.node(), "cpus": os.cpu_count(), "faiss_threads": threads,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "d": args.d, "k": args.k}
    keys = blobs(args.n, args.d, seed=0)
    queries = keys[:: max(1, args.n // args.queries)][: args.queries]
    folder = Path(tempfile.mkdtemp(prefix="ivfdisk-"))
    try:
        report["ivfpq_disk"] = {"n": args.n, **ondisk(keys, queries, args.k, folder, args.nlist)}
    finally:
        shutil.rmtree(folder)
    print(json.dumps(report["ivfpq_disk"]), flush=True)
    report["torch"] = []
    for n in args.torch_n:
        big = keys if n == args.n else blobs(n, args.d, seed=1)
        row = {"n": n, **torch_exact(big, queries, args.k)}
        report["torch"].append(row)
        print(json.dumps(row), flush=True)
        del big
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
