"""Memory of `memdec serve` with 0 / 1 / 4 / 8 fork domains (and one copy domain, for contrast).

Each fork decoder is built from the base (``parse_shape(SPEC).build``), its own blocks perturbed at
random (its weights do not matter for memory), and saved to a temporary folder with
``MemoryDecoderModel.save_pretrained``. For each count a real server is started (``python -m
memdec.cli serve --memdec d0=... ``), answers one greedy completion of the last domain, and its
``VmRSS`` (and peak ``VmHWM``) is read from ``/proc/PID/status``; then it is stopped (SIGTERM).

    PYTHONPATH=src .venv/bin/python bench/serve_memory.py                   # smollm2-135m, fork:8, CPU
    PYTHONPATH=src .venv/bin/python bench/serve_memory.py --decoder fork:15 --counts 0 1 4 8 --copy
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from memdec.decoders import parse_shape
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model


def save_decoders(base, tokenizer, spec: str, n: int, folder: Path) -> list[Path]:
    """``n`` decoders of shape ``spec`` built from ``base``, each perturbed with its own seed, saved under
    ``folder``."""
    shape, paths = parse_shape(spec), []
    for i in range(n):
        decoder = shape.build(base)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in decoder.parameters():
                if param.requires_grad:  # the decoder's own tensors (a fork's trunk is frozen)
                    param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.01)
        path = folder / f"{spec.replace(':', '')}-{i}"
        MemoryDecoderModel(base, decoder, lmbda=0.3).save_pretrained(path, tokenizer=tokenizer)
        paths.append(path)
        del decoder
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def measure(model: str, decoders: dict[str, Path], log: Path, timeout: float = 600.0) -> dict:
    """Start a server with ``decoders`` (name -> checkpoint), send one request, read its memory, stop it."""
    port = free_port()
    args = [sys.executable, "-m", "memdec.cli", "serve", "--model", model, "--port", str(port), "--device", "cpu"]
    for name, path in decoders.items():
        args += ["--memdec", f"{name}={path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"the server did not start within {timeout:.0f} s:\n{log.read_text()}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        started = time.monotonic() - t0
        target = list(decoders)[-1] if decoders else json.loads(
            urllib.request.urlopen(f"{url}/v1/models", timeout=10).read())["data"][0]["id"]
        body = json.dumps({"model": target, "prompt": "It is a truth universally", "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        text = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["text"]
        mem = status_kb(proc.pid)
        return {"domains": len(decoders), "rss_mb": mem["VmRSS"] / 1024, "peak_mb": mem["VmHWM"] / 1024,
                "start_s": started, "answer": text}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--decoder", default="fork:8", help="the shape of every domain's decoder")
    p.add_argument("--counts", type=int, nargs="+", default=[0, 1, 4, 8], help="numbers of domains served")
    p.add_argument("--copy", action="store_true", help="also one domain with a copy decoder, for contrast")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    parse_shape(args.decoder)

    base, tokenizer = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve-memory-") as tmp:
        tmp = Path(tmp)
        paths = save_decoders(base, tokenizer, args.decoder, max(args.counts), tmp)
        copies = save_decoders(base, tokenizer, "copy", 1, tmp) if args.copy else []
        del base
        runs = [(f"{n} x {args.decoder}" if n else "base alone", {f"d{i}": paths[i] for i in range(n)})
                for n in args.counts]
        runs += [("1 x copy", {"c0": c}) for c in copies]
        print(f"{args.model}, CPU, fp32; VmRSS after one request (8 new tokens)")
        print(
            f"{'served':<14} {'RSS MB':>8} {'+ base':>8} {'per domain':>10} {'peak MB':>8} {'start s':>8}", flush=True
        )
        base_rss = None
        for label, decoders in runs:
            row = {"served": label, **measure(args.model, decoders, tmp / "server.log")}
            base_rss = row["rss_mb"] if not decoders else base_rss
            extra = None if base_rss is None or not decoders else row["rss_mb"] - base_rss
            row["over_base_mb"] = extra
            per = "-" if extra is None else f"{extra / len(decoders):.1f}"
            print(f"{label:<14} {row['rss_mb']:>8.1f} {'-' if extra is None else format(extra, '.1f'):>8} "
                  f"{per:>10} {row['peak_mb']:>8.1f} {row['start_s']:>8.1f}", flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
