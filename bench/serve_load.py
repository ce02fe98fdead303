"""Load test of ``memdec serve``: concurrent streaming clients against a server on 127.0.0.1.

For each server setup (base alone; base + one memory decoder; base + two decoders with the
requests split between them), batched (``--max-batch 8``) and with ``--max-batch 1``, the script
starts the server, runs N concurrent clients (8, then 32) that each send M streaming completion
requests (greedy, ``--max-tokens`` new tokens), and stops the server. It reports requests/s,
generated tokens/s, p50/p95/p99 latency, p50/p95 time to first token, errors by status, and the
server's peak RSS (VmHWM). An overload run (``--max-queue 8``, 32 clients) must answer only 429s
beyond its queue. Memory: the two-decoder server against one process per domain (twice the
one-decoder server's RSS).

The decoders are 4-block shortened copies of the base (first blocks; spread blocks), saved as
memdec checkpoints under ``--work``; their weights do not matter for speed.

    python bench/serve_load.py                       # default model smollm2-135m, CPU, ~10 min on 2 cores
    python bench/serve_load.py --clients 8 --requests 2 --setups base --json out.json

Clients and server share the machine: on a small CPU the clients' own work is part of the numbers.
The ``load`` column is the machine's 1-minute load average at the end of each run.
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, that",
    "Elizabeth walked on with her sister, and",
    "The village of Longbourn was only one mile from Meryton;",
    "Miss Bingley's civility to Jane",
    "In vain have I struggled. It will not do. My feelings will not be repressed.",
    "Of all the men she had ever seen, he was",
    "They were in Derbyshire at last, and the first sight of Pemberley",
]
SETUPS = ("base", "one", "two")


def make_decoders(model: str, work: Path) -> list[Path]:
    """Two memdec checkpoints from the base model (4 blocks: the first ones; spread out)."""
    out = [work / "dec-first", work / "dec-spread"]
    if all((p / "memdec.json").is_file() for p in out):
        return out
    from memdec.joint import MemoryDecoderModel
    from memdec.models import load_model
    from memdec.train import shortened_copy

    base, tok = load_model(model)
    for path, selection in zip(out, ("first", "spread")):
        MemoryDecoderModel(base, shortened_copy(base, 4, selection), lmbda=0.3).save_pretrained(path, tokenizer=tok)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> dict:
    """Current and peak resident memory of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[key].split()[0]) / 1024 for k, key in (("rss", "VmRSS"), ("peak", "VmHWM"))}


class Server:
    """A server on 127.0.0.1 at a free port: ``memdec serve ARGS``, or ``command + ["--port", PORT] + args``."""

    def __init__(self, args: list[str], log: Path, command: list[str] | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log = open(log, "w")
        command = command or [sys.executable, "-m", "memdec.cli", "serve"]
        self.proc = subprocess.Popen([*command, "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1, trust_env=False).status_code == 200:
                    self.idle = rss_mib(self.proc.pid)
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit("the server did not start in 300 s")

    def stop(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(timeout=60)
        self.log.close()
        return rc


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "latency": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if "error" in event:
                return {"status": "stream-error", "latency": time.perf_counter() - t0}
    return {"status": 200, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int, limit_s: float) -> dict:
    """``clients`` concurrent clients, each sending ``requests`` requests one after another."""
    results: list[dict] = []
    deadline = time.perf_counter() + limit_s

    async def client_loop(c: int, client: httpx.AsyncClient):
        for i in range(requests):
            if time.perf_counter() > deadline:
                return
            k = c * requests + i
            try:
                results.append(await one_request(client, url, models[k % len(models)], PROMPTS[k % len(PROMPTS)],
                                                 max_tokens))
            except httpx.HTTPError as exc:
                results.append({"status": type(exc).__name__, "latency": 0.0})

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=limit_s, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency"] for r in ok]) * 1000
    ttft = np.array([r["ttft"] for r in ok if r.get("ttft") is not None]) * 1000
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else None

    return {"requests": len(results), "ok": len(ok), "errors": errors, "wall_s": wall,
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95)}


def server_args(setup: str, model: str, decoders: list[Path]) -> tuple[list[str], list[str]]:
    """(serve arguments, the model ids requests go to) of a setup."""
    args = ["--model", model]
    if setup == "base":
        return args, [model]
    if setup == "one":
        return args + ["--memdec", f"d1={decoders[0]}"], ["d1"]
    return args + ["--memdec", f"d1={decoders[0]}", "--memdec", f"d2={decoders[1]}"], ["d1", "d2"]


def run_setup(setup: str, batch: int, args, decoders: list[Path], queue: int | None = None,
              clients: list[int] | None = None) -> list[dict]:
    serve_args, models = server_args(setup, args.model, decoders)
    serve_args += ["--max-batch", str(batch), "--max-queue", str(queue or args.max_queue)]
    name = f"{setup}-b{batch}" + (f"-q{queue}" if queue else "")
    server = Server(serve_args, args.work / f"{name}.log")
    rows = []
    try:
        for n in clients or args.clients:
            requests = max(1, args.total // n) if args.requests is None else args.requests
            print(f"  {name}: {n} clients x {requests} requests ...", flush=True)
            result = asyncio.run(load(server.url, models, n, requests, args.max_tokens, args.limit))
            rows.append({"setup": setup, "max_batch": batch, "max_queue": queue or args.max_queue, "clients": n,
                         **result, "idle_rss_mib": server.idle["rss"], "peak_rss_mib": rss_mib(server.proc.pid)["peak"],
                         "load_1min": os.getloadavg()[0]})
            print("   ", json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                  flush=True)
    finally:
        rc = server.stop()
        print(f"  {name}: server stopped, exit status {rc}", flush=True)
    return rows


LABELS = {"base": "base alone", "one": "base + 1 decoder", "two": "base + 2 decoders (split)"}


def fmt(v, digits=0):
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict]) -> str:
    out = ["| setup | max-batch | clients | requests | req/s | gen tok/s | p50 ms | p95 ms | p99 ms | TTFT p50 ms "
           "| TTFT p95 ms | errors | peak RSS MiB | load |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        errors = ", ".join(f"{v}× {k}" for k, v in r["errors"].items()) or "0"
        setup = LABELS[r["setup"]] + (f", --max-queue {r['max_queue']}" if r["max_queue"] != 64 else "")
        out.append(
            f"| {setup} | {r['max_batch']} | {r['clients']} | {r['requests']} | {fmt(r['req_per_s'], 2)} "
            f"| {fmt(r['tok_per_s'], 1)} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} "
            f"| {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p95_ms'])} | {errors} | {fmt(r['peak_rss_mib'])} | "
            f"{r['load_1min']:.1f} |"
        )
    return "\n".join(out)


def memory_table(rows: list[dict]) -> str:
    """The two-decoder server against one process per domain (two one-decoder servers)."""
    def worst(setup, key):
        vals = [r[key] for r in rows if r["setup"] == setup and r["max_queue"] == 64]
        return max(vals) if vals else None

    one_idle, one_peak = worst("one", "idle_rss_mib"), worst("one", "peak_rss_mib")
    two_idle, two_peak = worst("two", "idle_rss_mib"), worst("two", "peak_rss_mib")
    base_idle, base_peak = worst("base", "idle_rss_mib"), worst("base", "peak_rss_mib")
    if None in (one_idle, two_idle):
        return ""
    lines = ["| serving two domains | RSS after load, MiB | peak RSS under load, MiB |", "|---|---:|---:|",
             f"| base alone (reference) | {fmt(base_idle)} | {fmt(base_peak)} |",
             f"| one server, base + 2 decoders | {fmt(two_idle)} | {fmt(two_peak)} |",
             f"| one process per domain: 2 × (base + 1 decoder) | {fmt(2 * one_idle)} | {fmt(2 * one_peak)} |",
             f"| saved by one server | {fmt(2 * one_idle - two_idle)} ({(1 - two_idle / (2 * one_idle)) * 100:.0f}%) "
             f"| {fmt(2 * one_peak - two_peak)} ({(1 - two_peak / (2 * one_peak)) * 100:.0f}%) |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    p.add_argument("--total", type=int, default=32, help="requests per run, split over the clients (M = total / N)")
    p.add_argument("--requests", type=int, default=None, help="M, requests per client (overrides --total)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--overload-queue", type=int, default=8, help="--max-queue of the overload run (0: skip it)")
    p.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    p.add_argument("--batches", type=int, nargs="+", default=[8, 1], help="--max-batch values")
    p.add_argument("--limit", type=float, default=150.0, help="seconds per run at most")
    p.add_argument("--work", type=Path, default=Path("/tmp/memdec-serve-bench"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    decoders = make_decoders(args.model, args.work) if set(args.setups) - {"base"} else []
    rows = []
    for setup in args.setups:
        for batch in args.batches:
            rows += run_setup(setup, batch, args, decoders)
    if args.overload_queue:
        setup = "one" if "one" in args.setups else args.setups[0]
        rows += run_setup(
            setup, max(args.batches), args, decoders, queue=args.overload_queue, clients=[max(args.clients)]
        )
    print(
        f"\n{args.model}, max_tokens {args.max_tokens}, greedy, streaming; "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; {time.perf_counter() - t0:.0f} s in all\n"
    )
    print(table(rows))
    print()
    print(memory_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
