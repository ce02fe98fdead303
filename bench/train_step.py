"""Training-step throughput: sparse KL+CE against plain CE and against dense target rows.

Three variants run on the same model and the same batch, each in its own subprocess so that its
peak memory is its own:

- ``ce``: plain next-token cross-entropy with ``F.cross_entropy`` (the floor);
- ``sparse``: memdec's loss, α·KL + (1−α)·CE, gathered at the CSR support (``train.sparse_kl_ce_loss``);
- ``dense``: the same loss with a dense vocabulary-sized target row built per batch and
  ``F.kl_div`` over it, as the paper's public code does.

It prints tokens/s of a whole optimizer step, the ratios, the time of the loss part alone
(target construction + loss forward + backward into the logits), and peak memory.

    .venv/bin/python bench/train_step.py                     # default model, 4-block decoder, CPU
    .venv/bin/python bench/train_step.py --init-layers 30    # the full-copy decoder
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def synthetic_targets(n_positions: int, vocab: int, support: int, seed: int = 0):
    """CSR kNN targets with ``support`` distinct tokens per row (a k=1024 row has ~50-300)."""
    from memdec.targets import KnnTargets

    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, support, replace=False) for _ in range(n_positions)]).astype(np.int32)
    probs = rng.dirichlet(np.full(support, 0.3), n_positions).astype(np.float16)
    offsets = np.arange(0, (n_positions + 1) * support, support, dtype=np.int64)
    return KnnTargets(
        offsets=offsets, token_ids=ids.reshape(-1), probs=probs.reshape(-1), k=0, temperature=1.0, top_m=None
    )


def dense_kl_ce_loss(logits, labels, target_rows, target_ids, target_probs, alpha):
    """Reference: scatter the targets into a dense [P, V] row, then F.kl_div."""
    dense = torch.zeros_like(logits, dtype=torch.float32)
    dense.index_put_((target_rows, target_ids), target_probs.float(), accumulate=True)
    log_q = F.log_softmax(logits.float(), dim=-1)
    kl = F.kl_div(log_q, dense, reduction="batchmean")
    ce = F.nll_loss(log_q, labels)
    return alpha * kl + (1 - alpha) * ce, kl, ce


def plain_ce_loss(logits, labels, target_rows, target_ids, target_probs, alpha):
    """What plain LM training computes: F.cross_entropy."""
    ce = F.cross_entropy(logits.float(), labels)
    return ce, ce.detach() * 0, ce.detach()


def build_model(args):
    from memdec.models import load_model, shortened_copy

    if args.random:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**json.loads(args.random))
        return AutoModelForCausalLM.from_config(cfg)
    model, _ = load_model(args.model)
    if args.init_layers < model.config.num_hidden_layers:
        model = shortened_copy(model, args.init_layers)
    return model


def run_variant(args) -> dict:
    from memdec.train import collate, sparse_kl_ce_loss

    torch.manual_seed(0)
    device = args.device
    model = build_model(args).to(device).train()
    vocab = model.config.vocab_size
    n_pos = args.batch_size * args.block_size
    tokens = np.random.default_rng(0).integers(0, vocab, n_pos + 1).astype(np.int32)
    targets = synthetic_targets(n_pos, vocab, args.support)
    starts = np.arange(args.batch_size, dtype=np.int64) * args.block_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = {"sparse": sparse_kl_ce_loss, "dense": dense_kl_ce_loss, "ce": plain_ce_loss}[args.variant]
    alpha = 0.0 if args.variant == "ce" else 0.5
    step_times, loss_times = [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate(tokens, targets, starts, args.block_size, alpha > 0).items()}
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=batch["input_ids"]).logits
        flat = logits.reshape(-1, vocab)
        # the loss part alone, measured on a detached copy so it does not disturb the step
        probe = flat.detach().requires_grad_()
        sync()
        t1 = time.perf_counter()
        args_ = (
            probe,
            batch["labels"].reshape(-1),
            batch.get("target_rows"),
            batch.get("target_ids"),
            batch.get("target_probs"),
            alpha,
        )
        loss_fn(*args_)[0].backward()
        sync()
        t2 = time.perf_counter()
        loss = loss_fn(
            flat,
            batch["labels"].reshape(-1),
            batch.get("target_rows"),
            batch.get("target_ids"),
            batch.get("target_probs"),
            alpha,
        )[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if i >= args.warmup:
            step_times.append((t3 - t0) - (t2 - t1))  # the step without the probe
            loss_times.append(t2 - t1)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"variant": args.variant, "tokens_per_s": n_pos / float(np.median(step_times)),
            "loss_ms": 1000 * float(np.median(loss_times)), "peak_bytes": int(peak)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--init-layers", type=int, default=4)
    p.add_argument("--random", default=None, help="JSON config kwargs for a random-initialised model instead")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--support", type=int, default=200, help="distinct tokens per kNN target row")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", choices=["ce", "sparse", "dense"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("ce", "sparse", "dense"):
        cmd = [sys.executable, __file__, "--variant", variant] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    ce, sparse, dense = results["ce"], results["sparse"], results["dense"]
    print(f"model {args.model} ({args.init_layers} blocks), batch {args.batch_size}x{args.block_size}, "
          f"{args.support} target tokens/row, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'variant':<8} {'tok/s':>9} {'loss ms':>9} {'peak MiB':>9}")
    for r in (ce, sparse, dense):
        print(f"{r['variant']:<8} {r['tokens_per_s']:>9.1f} {r['loss_ms']:>9.1f} {r['peak_bytes'] / 2**20:>9.0f}")
    print(
        f"sparse KL+CE / plain CE step throughput: {sparse['tokens_per_s'] / ce['tokens_per_s']:.3f}  (target >= 0.9)"
    )
    print(f"sparse / dense-target step throughput:   {sparse['tokens_per_s'] / dense['tokens_per_s']:.2f}x")
    print(
        f"sparse / dense-target loss time:         {dense['loss_ms'] / sparse['loss_ms']:.2f}x faster  (target >= 5x)"
    )
    print(f"peak memory sparse / dense:              {sparse['peak_bytes'] / dense['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
