"""Recall@k of approximate indexes against exact search, on a datastore's own keys.

Each query is a key of the datastore (a sample of ``--queries`` positions, seeded); its k nearest
other keys (its own entry dropped by id, as the targets step does) under exact search (an
``IndexFlatL2`` over the fp16 keys) are compared with those each approximate datastore's index
returns at the nprobe its targets step used. recall@k = |approx ∩ exact| / k, averaged.

    python bench/index_recall.py --exact /tmp/store18/ds --approx /tmp/store18/ds-ivfpq /tmp/store18/ds-disk

The approximate datastores must hold the same keys (built from the same corpus and model).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from memdec.store import open_datastore
from memdec.index import build_index, search
from memdec.targets import drop_self


def neighbours(index, queries: np.ndarray, query_ids: np.ndarray, k: int, nprobe: int | None):
    """ids int64 [Q, k] of each query's k nearest other keys, and the queries/s of the search."""
    t0 = time.perf_counter()
    dists, ids = search(index, queries, k + 1, nprobe=nprobe)
    seconds = time.perf_counter() - t0
    return drop_self(dists, ids, query_ids)[1], len(queries) / seconds


def recall(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |approx[:, :k] ∩ exact[:, :k]| / k over the rows."""
    return float(np.mean([len(np.intersect1d(a[:k], e[:k])) / k for a, e in zip(approx, exact)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exact", required=True, help="a datastore with its keys")
    ap.add_argument("--approx", nargs="+", required=True, help="datastores with approximate indexes")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 1024])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    store = open_datastore(args.exact)
    kmax = max(args.k)
    rng = np.random.default_rng(args.seed)
    query_ids = np.sort(rng.choice(store.n_keys, size=args.queries, replace=False))
    queries = np.asarray(store.keys[query_ids], dtype=np.float32)
    exact, exact_qps = neighbours(build_index(store.keys, "flat"), queries, query_ids, kmax, None)
    print(json.dumps({"datastore": args.exact, "index": "flat", "q_per_s": round(exact_qps, 1)}))
    for path in args.approx:
        other = open_datastore(path)
        index = other.load_index()
        nprobe = other.manifest.steps.targets.nprobe
        found, qps = neighbours(index, queries, query_ids, kmax, nprobe)
        row = {"datastore": path, "index": other.manifest.steps.index.type,
               "params": other.manifest.steps.index.params, "nprobe": nprobe, "q_per_s": round(qps, 1)}
        row.update({f"recall@{k}": round(recall(found, exact, k), 4) for k in args.k})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
