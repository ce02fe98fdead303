"""Issue 33's ablation: which parameters carry a memory decoder's gain where the vocabulary shifts.

    PYTHONPATH=src .venv/bin/python bench/lora_ablation.py --datastore runs/spread/hpo/copy/datastore \
        --valid runs/domains/hpo/valid.jsonl --test runs/domains/hpo/test.jsonl --out runs/ablation/hpo

Every variant trains on the same datastore's tokens, in the same windows and order, with the same schedule as
``memdec adapt --preset quick``'s α = 0 candidate (the one chosen on both shapes there): 1 epoch of windows of
512 tokens, 4 a step, warm-up 2, validation every 3 steps on the first 2,048 tokens of ``--valid`` (the best
checkpoint and its λ), then ``memdec eval --sweep`` on 4,096 tokens of ``--test`` (windows of 1,024, stride 512;
λ chosen on ``--valid``): the spread's numbers for the same shape. ``--variants`` picks some (default: all):

- ``copy``: the full copy, every weight trained (lr 2e-4);
- ``blocks``: ``fork:L`` (L: all the base's blocks, 30 in SmolLM2-135M): every block and the final norm trained,
  the embeddings and the (tied) head the base's, frozen;
- ``lora:16``, ``lora:64``: LoRA on q, k, v, o, gate, up and down of every block, the adapters at 2e-3 (10 x the
  copy's lr: round three's scale for LoRA decoders, whatever ``memdec.decoders.LR_SCALE`` is now);
- ``lora:16-lr/3``, ``lora:16-lr*3``: the same at a third and three times that lr (6e-3: today's 30 x);
- ``lora:16-attn``, ``lora:16-mlp``: adapters on the attention (q, k, v, o) or the MLP (gate, up, down) only;
- ``lora:16+embed``: ``lora:16`` with the (tied) embedding matrix and head trained too, at the copy's lr (the
  adapters at their 10 x); ``lora:16+embed-1x``: the same with the adapters at the copy's lr too;
- ``embed``: the embedding matrix and head alone (the blocks the base's, frozen), at the copy's lr;
- ``lora:16-x4``: ``lora:16`` for four epochs (four times the budget: the only variant that is not equal).

The two variants with trainable embeddings are shapes of this script only (registered in its process, not in
memdec). One JSON per variant in ``OUT/NAME/result.json``; a variant with one is skipped, a training run resumes.
The table (stdout and ``OUT/table.md``) gives per variant the trainable parameters, the bytes of its own tensors
(fp32), valid and test perplexity at the λ chosen on valid, the gap to ``copy``'s test perplexity (``--copy-ppl``
where the copy ran elsewhere) and the general text's perplexity (``--general``) at that λ.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from memdec.checks import check_own_folder, mark_own_folder
from memdec.decoders import LoraShape, register
from memdec.decoders.fork import _hash_tensors, blocks_and_norm
from memdec.evaluate import EvalConfig, run_eval_report
import memdec.train.trainer as trainer_module
from memdec.errors import MemdecError
from memdec.files import atomic_write_json, atomic_write_text, read_json_object
from memdec.models import load_config
from memdec.tables import render_table
from memdec.train import Recipe, TrainConfig, check_decoder_shape, lr_at, train
from memdec.train import make_optimizer as memdec_make_optimizer

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EMBEDDINGS = "model.embed_tokens.weight"
LR = 2e-4  # the quick preset's lr of a full copy


class LoraEmbedShape(LoraShape):
    """``lora:R`` whose embedding matrix (tied to the head) is its own and trains too, saved with the adapters.
    The adapters train at ``lr_scale`` x --lr (10, round three's scale for LoRA decoders), the embeddings at
    ``embed_lr_scale`` x --lr (the copy's 1: ``make_optimizer`` below gives them their own group).
    ``train_adapters=False``: the embeddings alone (the adapters stay B = 0, frozen)."""

    name = "lora-embed"
    lr_scale = 10.0
    embed_lr_scale = 1.0
    train_adapters = True

    def build(self, base):
        decoder = super().build(base)
        own = copy.deepcopy(base.get_input_embeddings())  # a new module: the base's stays untouched
        decoder.model.embed_tokens = own
        head = torch.nn.Linear(own.weight.shape[1], own.weight.shape[0], bias=False)
        head.weight = own.weight  # tied, as in the base
        decoder.lm_head = head
        for name, param in decoder.named_parameters():
            param.requires_grad_(name == EMBEDDINGS or (self.train_adapters and ".lora_" in name))
        return decoder

    def own_tensors(self, decoder) -> dict[str, torch.Tensor]:
        return {**super().own_tensors(decoder), EMBEDDINGS: decoder.get_input_embeddings().weight}

    def hash_trunk(self, model) -> str:
        """The whole base but its embeddings and head (the decoder's own): a base and the decoder hash alike."""
        blocks_and_norm(model)
        return _hash_tensors((k.replace(".base_layer.", "."), v) for k, v in model.state_dict().items()
                             if ".lora_" not in k and k not in (EMBEDDINGS, "lm_head.weight"))


class EmbedOnlyShape(LoraEmbedShape):
    name = "embed-only"
    lr_scale = 1.0
    train_adapters = False


for shape_class in (LoraEmbedShape, EmbedOnlyShape):
    register(shape_class)


def make_optimizer(model, cfg: TrainConfig, lr_scale: float, total_steps: int):
    """memdec's AdamW and schedule, but where the decoder's shape is a ``LoraEmbedShape``, its embedding matrix in a
    group of its own at ``embed_lr_scale`` x --lr (the same schedule: LambdaLR scales every group alike)."""
    shape = ShapeRecipe.current
    if not isinstance(shape, LoraEmbedShape) or shape.embed_lr_scale == shape.lr_scale:
        return memdec_make_optimizer(model, cfg, lr_scale, total_steps)
    embeddings = model.get_input_embeddings().weight
    others = [p for p in model.parameters() if p.requires_grad and p is not embeddings]  # the LoRA matrices
    optimizer = torch.optim.AdamW([{"params": others, "lr": cfg.lr * lr_scale, "weight_decay": cfg.weight_decay},
                                   {"params": [embeddings], "lr": cfg.lr * shape.embed_lr_scale,
                                    "weight_decay": cfg.weight_decay}], betas=(0.9, 0.95), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total_steps, cfg.warmup, cfg.min_lr_ratio))
    return optimizer, schedule


trainer_module.make_optimizer = make_optimizer  # the Trainer's, in this process only


class ShapeRecipe(Recipe):
    """memdec's recipe with the decoder shape given (``--decoder`` names only the registered specs)."""

    current = None  # the shape being trained (make_optimizer reads it)

    def __init__(self, shape):
        self.shape = ShapeRecipe.current = shape

    def decoder_shape(self, cfg, data):
        return self.shape


def variants(model: str) -> dict[str, tuple]:
    """name -> (shape or None for the copy, peak lr of the weights it trains (the adapters' where it has
    some), epochs). A shape's own scale divides the peak lr into --lr: the variants do not move with
    ``memdec.decoders.LR_SCALE``."""
    lora16 = check_decoder_shape("lora:16", model)
    n_blocks = load_config(model).num_hidden_layers
    all_at_copy_lr = LoraEmbedShape(16)
    all_at_copy_lr.lr_scale = 1.0  # adapters and embeddings at the copy's lr
    adapters = 10 * LR  # round three's LoRA step: 10 x the copy's
    return {
        "copy": (None, LR, 1.0),
        "blocks": (check_decoder_shape(f"fork:{n_blocks}", model), LR, 1.0),
        "lora:16": (lora16, adapters, 1.0),
        "lora:64": (check_decoder_shape("lora:64", model), adapters, 1.0),
        "lora:16-lr/3": (lora16, adapters / 3, 1.0),
        "lora:16-lr*3": (lora16, adapters * 3, 1.0),
        "lora:16-attn": (LoraShape(16, targets=ATTENTION), adapters, 1.0),
        "lora:16-mlp": (LoraShape(16, targets=MLP), adapters, 1.0),
        "lora:16+embed": (LoraEmbedShape(16), adapters, 1.0),
        "lora:16+embed-1x": (all_at_copy_lr, LR, 1.0),
        "embed": (EmbedOnlyShape(16), LR, 1.0),
        "lora:16-x4": (lora16, adapters, 4.0),
    }


def run_variant(name: str, shape, peak: float, epochs: float, args, folder: Path) -> dict:
    lr = peak / (1.0 if shape is None else shape.lr_scale)  # --lr: the shape multiplies it by its scale
    cfg = TrainConfig(datastore=args.datastore, out=str(folder / "ckpt"), alpha=0.0, epochs=epochs, lr=lr,
                      warmup=2, batch_size=4, block_size=args.block_size, valid=args.valid, valid_max_tokens=2048,
                      eval_every=3, save_every=3, decoder="copy" if shape is None else shape.spec, device=args.device)
    start = time.perf_counter()
    ShapeRecipe.current = shape
    ckpt = train(cfg, recipe=None if shape is None else ShapeRecipe(shape))
    seconds = time.perf_counter() - start
    info = read_json_object(ckpt / "memdec.json", "a checkpoint")
    report = run_eval_report(EvalConfig(model=args.model, corpus=args.test, block_size=2 * args.block_size,
                                        stride=args.block_size, max_tokens=args.test_tokens, memdec=str(ckpt),
                                        sweep=True, valid=args.valid, valid_max_tokens=2048,
                                        general=args.general or None, general_max_tokens=args.test_tokens,
                                        device=args.device))
    rows = {row.system: row for row in report.rows}
    own = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    return {"variant": name, "spec": "copy" if shape is None else shape.spec, "lr": lr, "peak_lr": peak,
            "epochs": epochs,
            "trainable_parameters": info["trainable_parameters"], "weights_bytes": own,
            "lambda": rows["memdec"].lmbda, "valid_ppl": rows["memdec"].extra.get("valid_ppl"),
            "test_ppl": rows["memdec"].ppl, "base_test_ppl": rows["base"].ppl,
            "general_ppl": rows["memdec"].extra.get("general_ppl"),
            "base_general_ppl": rows["base"].extra.get("general_ppl"),
            "train_seconds": round(seconds, 1)}


def peak_lr(shape, peak: float) -> str:
    """The variant's peak learning rate(s): the trained weights', and the embeddings' where they have their own."""
    text = f"{peak:g}"
    if isinstance(shape, LoraEmbedShape) and shape.train_adapters and shape.embed_lr_scale != shape.lr_scale:
        text += f" (embeddings {peak / shape.lr_scale * shape.embed_lr_scale:g})"
    return text


def table(results: list[dict], known: dict[str, tuple], copy_ppl: float | None = None) -> str:
    """The Markdown table; the gap to ``copy``'s test ppl (the variant's, else ``copy_ppl``, measured elsewhere)."""
    copy_ppl = next((r["test_ppl"] for r in results if r["variant"] == "copy"), copy_ppl)
    ppl = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    gap = lambda r: "ref" if r["variant"] == "copy" else "—" if copy_ppl is None else \
        f"{(r['test_ppl'] / copy_ppl - 1) * 100:+.1f}%"  # noqa: E731
    rows = [[r["variant"], peak_lr(known[r["variant"]][0], r["peak_lr"]), f"{r['epochs']:g}",
             f"{r['trainable_parameters'] / 1e6:.1f}M", f"{r['weights_bytes'] / 2**20:.1f} MiB", f"{r['lambda']:g}",
             ppl(r["valid_ppl"]), ppl(r["test_ppl"]), gap(r), ppl(r.get("general_ppl"))] for r in results]
    header = ["variant", "peak lr", "epochs", "trainable", "weights on disk", "λ", "valid ppl", "test ppl",
              "gap to copy", "general ppl"]
    return "\n".join(render_table(header, rows))


def main() -> None:
    p = argparse.ArgumentParser(prog="lora_ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", required=True, help="a datastore folder (its tokens are the training text)")
    p.add_argument("--valid", required=True, help="validation corpus: the best checkpoint and λ")
    p.add_argument("--test", required=True, help="test corpus")
    p.add_argument("--out", required=True, help="the runs' folder (memdec's: marked)")
    p.add_argument("--model", default="smollm2-135m", help="the datastore's base model (default: smollm2-135m)")
    p.add_argument("--variants", nargs="+", help="variants to run (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--general", default="general:test", help="general text, at each variant's λ ('' for none; "
                   "default: general:test)")
    p.add_argument("--copy-ppl", type=float, help="the copy's test ppl measured elsewhere: the gap column's reference")
    p.add_argument("--test-tokens", type=int, default=4096, help="test tokens scored (default: 4096)")
    p.add_argument("--block-size", type=int, default=512, help="training windows (default: 512; eval's: twice it)")
    args = p.parse_args()
    out = Path(args.out)
    try:
        check_own_folder(out, "bench")
        known = variants(args.model)
    except MemdecError as exc:
        p.error(str(exc))
    names = args.variants or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}: one of {', '.join(known)}")
    mark_own_folder(out, "bench")
    results = []
    for name in names:
        folder = out / name.replace(":", "-").replace("/", "-div-").replace("*", "-times-")
        result_file = folder / "result.json"
        if not result_file.exists():
            folder.mkdir(parents=True, exist_ok=True)
            print(f"== {name}", flush=True)
            atomic_write_json(result_file, run_variant(name, *known[name], args, folder))
        results.append(json.loads(result_file.read_text()))
        atomic_write_text(out / "table.md", table(results, known, args.copy_ppl) + "\n")
        print(table(results, known, args.copy_ppl), flush=True)


if __name__ == "__main__":
    main()
