"""bench/lora_ablation.py end to end on a tiny Llama: each variant trains and is scored on the same test tokens; the
embeddings variants train the decoder's own embedding matrix and head (tied), leave the base's untouched and reload
from their checkpoint; the attention-only adapters sit on q, k, v and o only; a rerun skips finished variants."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("bench_lora_ablation", BENCH / "lora_ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # registers its two shapes, in this process
    yield module
    sys.modules.pop(spec.name, None)
    from memdec.checkpoint import DECODER_RECORDS
    from memdec.decoders import SHAPES
    import memdec.train.trainer as trainer_module
    from memdec.train import make_optimizer

    for name in ("lora-embed", "embed-only"):
        SHAPES.unregister(name)
        DECODER_RECORDS.unregister(name)
    trainer_module.make_optimizer = make_optimizer


def test_embeddings_shape_owns_its_embeddings(ablation, tiny_llama_dir):
    from memdec.models import load_model

    base, _ = load_model(str(tiny_llama_dir))
    before = base.get_input_embeddings().weight.detach().clone()
    decoder = ablation.LoraEmbedShape(4).build(base)
    emb = decoder.get_input_embeddings().weight
    assert emb is not base.get_input_embeddings().weight and decoder.lm_head.weight is emb  # own, tied
    trainable = {n for n, p in decoder.named_parameters() if p.requires_grad}
    assert ablation.EMBEDDINGS in trainable and all(".lora_" in n for n in trainable - {ablation.EMBEDDINGS})
    with torch.no_grad():
        emb.add_(1.0)
    assert torch.equal(base.get_input_embeddings().weight, before)
    assert ablation.LoraEmbedShape(4).hash_trunk(decoder) == ablation.LoraEmbedShape(4).hash_trunk(base)
    only = {n for n, p in ablation.EmbedOnlyShape(4).build(base).named_parameters() if p.requires_grad}
    assert only == {ablation.EMBEDDINGS}
    attention = ablation.variants(str(tiny_llama_dir))["lora:16-attn"][0].build(base)
    adapted = {n.split(".")[-4] for n, p in attention.named_parameters() if p.requires_grad}
    assert adapted == set(ablation.ATTENTION)
    cfg = ablation.TrainConfig(datastore="-", out="-", lr=1e-3, warmup=0)
    ablation.ShapeRecipe(ablation.LoraEmbedShape(4))
    optimizer, _ = ablation.make_optimizer(decoder, cfg, ablation.LoraEmbedShape.lr_scale, 10)
    adapters = sum(decoder.get_parameter(n).numel() for n in trainable - {ablation.EMBEDDINGS})
    groups = [(g["initial_lr"], sum(p.numel() for p in g["params"])) for g in optimizer.param_groups]
    assert groups == [(1e-2, adapters), (1e-3, emb.numel())]  # the adapters at 10 x, the embeddings at the copy's lr


def test_ablation_end_to_end(ablation, tiny_llama_dir, store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ablation"
    argv = ["lora_ablation", "--datastore", str(store), "--valid", "austen:test", "--test", "austen:test",
            "--out", str(out), "--model", str(tiny_llama_dir), "--device", "cpu", "--block-size", "32",
            "--test-tokens", "256", "--general", "austen:valid", "--variants", "copy", "lora:16+embed"]
    monkeypatch.setattr(sys, "argv", argv)
    ablation.main()
    results = {r: json.loads((out / d / "result.json").read_text())
               for r, d in [("copy", "copy"), ("lora:16+embed", "lora-16+embed")]}
    base = {r["base_test_ppl"] for r in results.values()}
    assert len(base) == 1  # the same test tokens for every variant
    assert all(r["general_ppl"] > 0 for r in results.values())
    assert results["lora:16+embed"]["trainable_parameters"] < results["copy"]["trainable_parameters"]
    memdec = json.loads((out / "lora-16+embed" / "ckpt" / "memdec.json").read_text())
    assert memdec["decoder"]["shape"] == "lora-embed"
    table = (out / "table.md").read_text()
    assert "| lora:16+embed |" in table and "ref" in table
    capsys.readouterr()
    ablation.main()  # every variant is finished: skipped, the same table
    assert (out / "table.md").read_text() == table
