"""Search throughput of a built datastore, as the targets step searches: blocks of 64 queries,
k+1 neighbours, on ``--threads`` faiss threads (default 1: the figure per CPU process).

Prints queries/s of the search alone, and rows/s of whole target rows (search, the query's own
entry dropped, sparse distributions), over the first ``--queries`` keys.

usage: .venv/bin/python bench/search.py DATASTORE [--k 1024] [--queries 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from memdec.datastore import SEARCH_BLOCK, DatastoreConfig, blockwise, numpy_batch_targets

from memdec.store import DEFAULT_K, open_datastore
from memdec.index import search, set_num_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datastore")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    ds = open_datastore(args.datastore)
    set_num_threads(args.threads)
    index = ds.load_index()
    queries = np.asarray(ds.keys[: args.queries], dtype=np.float32)
    t0 = time.perf_counter()
    for b in range(0, len(queries), SEARCH_BLOCK):
        search(index, queries[b : b + SEARCH_BLOCK], args.k + 1)
    qps = len(queries) / (time.perf_counter() - t0)
    print(f"search, N={ds.n_keys}, k+1={args.k + 1}, {args.threads} thread(s): {qps:.0f} queries/s")
    cfg = DatastoreConfig(model="-", corpus="-", out="-", k=args.k, knn_temp=1.0)
    rows = blockwise(numpy_batch_targets(index, ds.keys, np.asarray(ds.values), None, cfg))
    t0 = time.perf_counter()
    rows(0, len(queries))
    print(f"target rows (search, self dropped, distributions): {len(queries) / (time.perf_counter() - t0):.0f} rows/s")


if __name__ == "__main__":
    main()
