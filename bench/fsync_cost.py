"""What ``fsync`` costs a checkpoint save: ``files.atomic_write`` of a safetensors file of random
weights, with its fsyncs (the temporary file before the rename, the folder after) and without.

A ~135M-parameter model (SmolLM2-135M's size) in bf16 is the default (the weights file of one
training checkpoint step of a bf16 model). The two modes alternate, save by save, with fsync first:
each save replaces the last one's file, whose unwritten pages the kernel then drops, so neither
mode pays for the other's. Without fsync a save ends once the bytes are in the page cache; with it,
once they are on the disk.

Prints the median seconds of each mode, MB/s, and the ratio with / without.

usage: .venv/bin/python bench/fsync_cost.py [--params 135e6] [--dtype bfloat16] [--repeats 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from memdec.files import atomic_write


@contextlib.contextmanager
def fsync_off():
    """``os.fsync`` as a no-op: atomic_write's code path, less the flushes to the disk."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def random_weights(n_params: int, dtype: torch.dtype, n_tensors: int = 30) -> dict[str, torch.Tensor]:
    """``n_params`` random values in ``n_tensors`` tensors of equal size (a model's state dict, roughly)."""
    g = torch.Generator().manual_seed(0)
    per = n_params // n_tensors
    return {f"layer.{i}.weight": torch.randn(per, generator=g).to(dtype) for i in range(n_tensors)}


def timed_save(path: Path, weights: dict[str, torch.Tensor], fsync: bool) -> float:
    with contextlib.nullcontext() if fsync else fsync_off():
        t0 = time.perf_counter()
        atomic_write(path, lambda p: save_file(weights, str(p)))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=135e6, help="parameters in the saved dict")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=2, help="saves per mode")
    ap.add_argument("--dir", default=None, help="where to save (default: a temporary folder)")
    args = ap.parse_args()
    weights = random_weights(int(args.params), getattr(torch, args.dtype))
    size = sum(t.numel() * t.element_size() for t in weights.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model.safetensors"
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for fsync in (True, False):
                times[fsync].append(timed_save(path, weights, fsync))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{int(args.params):,} {args.dtype} parameters, {size / 1e6:.0f} MB per save, {args.repeats} saves per mode "
          f"(median), in {args.dir or tempfile.gettempdir()}")
    print(f"without fsync: {off:.3f} s ({size / 1e6 / off:.0f} MB/s)")
    print(f"with fsync:    {on:.3f} s ({size / 1e6 / on:.0f} MB/s)")
    print(f"ratio with / without: {on / off:.2f}x (+{on - off:.3f} s per save)")


if __name__ == "__main__":
    main()
