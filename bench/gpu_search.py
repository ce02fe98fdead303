"""Exact kNN search throughput on one GPU at 2M–50M keys (d=576, k=1025), for docs/scale.md.

The computation of ``memdec.index.TorchFlatIndex.search_torch`` (|q|² − 2q·k + |k|², then
``torch.topk`` per chunk of queries, the distances of a chunk capped at 2 GiB), written with torch
alone so that it runs on a machine with nothing but torch: fp32 keys with full-precision matmuls (what
memdec does), and fp16 keys (half the memory; the matmul in fp16). Random keys: the time does not
depend on their values. The queries are 4,096 of the keys.

    python3 bench/gpu_search.py
"""

import json
import time

import torch

torch.set_float32_matmul_precision("highest")
D, K, Q, CHUNK = 576, 1025, 4096, 1 << 22
SIZES = (
    (2_000_000, torch.float32),
    (10_000_000, torch.float32),
    (10_000_000, torch.float16),
    (50_000_000, torch.float16),
)


def main() -> None:
    g = torch.Generator("cuda").manual_seed(0)
    for n, dtype in SIZES:
        keys = torch.empty(n, D, dtype=dtype, device="cuda")
        for i in range(0, n, CHUNK):
            keys[i : i + CHUNK] = torch.randn(min(CHUNK, n - i), D, generator=g, device="cuda").to(dtype)
        sq = torch.cat([keys[i : i + CHUNK].float().pow(2).sum(1) for i in range(0, n, CHUNK)])
        q = keys[:Q].clone()
        rows = max(1, 2**31 // (4 * n))

        def run(queries):
            out_d, out_i = [], []
            for i in range(0, len(queries), rows):
                x = queries[i : i + rows]
                dist = (x @ keys.T).float().mul_(-2).add_(x.float().pow(2).sum(1, keepdim=True)).add_(sq)
                a, b = torch.topk(dist, K, dim=1, largest=False)
                out_d.append(a)
                out_i.append(b)
            return torch.cat(out_d), torch.cat(out_i)

        run(q[:rows])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(q)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        print(json.dumps(dict(n=n, dtype=str(dtype), q_per_s=round(Q / seconds, 1), rows_per_chunk=rows,
                              gpu_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1))), flush=True)
        del keys, sq
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
