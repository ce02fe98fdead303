"""What a fork:K decoder saves: joint scoring time over the base's, and decoder bytes on disk.

A SmolLM2-135M-shaped Llama with RANDOM weights (30 blocks, hidden 576, 9 heads, 3 KV heads,
intermediate 1536, vocabulary 49,152, tied head; nothing is downloaded), fp32 on CPU. For K in
{L/4, L/2, L}, a fork:K decoder (its own blocks perturbed, so that it is not the base) is mixed
with the base on the shared trunk; ``copy`` is today's full, separate decoder (two full forwards).
Each row: the median over ``--repeats`` of (joint scoring time ÷ the base alone's, timed right
before it) on one ``--tokens``-token window, after one warm-up of each, so that a load that drifts
over the run moves both; and the decoder's bytes on disk (fork: ``decoder.safetensors``
as written; copy: the bytes of its tensors, each storage once, as a model.safetensors holds them).

    python bench/fork_cost.py                # 2 threads, 512 tokens, 3 repeats: ~1.5 minutes on 2 idle cores

CPU timings on a shared machine are noisy; the ratios matter, not the seconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memdec.decoders import OWN_WEIGHTS, ForkShape, trunk_hash
from memdec.joint import MemoryDecoderModel
from memdec.scoring import base_scorer

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True, rope_theta=100000.0)


def seconds(score, ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Wall time of one ``score(ids, targets)``."""
    with torch.inference_mode():
        start = time.perf_counter()
        score(ids, targets)
        return time.perf_counter() - start


def median_ratio(score, base_score, ids: torch.Tensor, targets: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median of time(score) ÷ time(base_score) over ``repeats`` pairs, median base seconds), after a warm-up."""
    seconds(score, ids, targets)
    pairs = [(seconds(base_score, ids, targets), seconds(score, ids, targets)) for _ in range(repeats)]
    return statistics.median(j / b for b, j in pairs), statistics.median(b for b, _ in pairs)


def tensor_bytes(model) -> int:
    """Bytes of a model's state dict, each storage once (what a full model folder holds)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def perturbed_fork(base, blocks: int):
    decoder = ForkShape(blocks).build(base)
    with torch.no_grad():
        for param in ForkShape(blocks).own_tensors(decoder).values():
            param.add_(torch.randn_like(param) * 0.01)
    return decoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--tokens", type=int, default=512, help="window length (default: 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per row (default: 3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).float().eval()
    n_layers = base.config.num_hidden_layers
    ids = torch.randint(0, base.config.vocab_size, (1, args.tokens))
    targets = torch.randint(0, base.config.vocab_size, (1, args.tokens))

    start = time.perf_counter()
    trunk_hash(base, n_layers // 2)
    print(f"trunk_hash of fork:{n_layers // 2} ({tensor_bytes(base) / 2**20:.0f} MiB model): "
          f"{time.perf_counter() - start:.2f} s")

    base_score = base_scorer(base)
    seconds(base_score, ids, targets)  # warm-up
    print(f"{args.tokens}-token window, {args.threads} threads, median of {args.repeats} (noisy: a shared CPU)")
    print(f"{'decoder':>10} {'joint/base':>10} {'1+K/L':>6} {'base ms':>8} {'decoder MB':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for blocks in (n_layers // 4, n_layers // 2, n_layers):
            fork = perturbed_fork(base, blocks)
            joint = MemoryDecoderModel(base, fork, lmbda=0.3)
            assert joint.shares_trunk
            ratio, t_base = median_ratio(joint.scorer(), base_score, ids, targets, args.repeats)
            ForkShape(blocks).save(fork, tmp)
            size = (Path(tmp) / OWN_WEIGHTS).stat().st_size
            print(f"{'fork:' + str(blocks):>10} {ratio:>10.2f} {1 + blocks / n_layers:>6.2f} {t_base * 1000:>8.0f} "
                  f"{size / 1e6:>11.1f}", flush=True)
            del joint, fork
        copy_decoder = copy.deepcopy(base)
        joint = MemoryDecoderModel(base, copy_decoder, lmbda=0.3)
        ratio, t_base = median_ratio(joint.scorer(), base_score, ids, targets, args.repeats)
        print(
            f"{'copy':>10} {ratio:>10.2f} {2.0:>6.2f} {t_base * 1000:>8.0f} {tensor_bytes(copy_decoder) / 1e6:>11.1f}"
        )


if __name__ == "__main__":
    main()
