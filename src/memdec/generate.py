"""``memdec generate``: continue prompts with a base model and a memory decoder, base beside joint.

Greedy decoding, sampling and beam search all go through ``MemoryDecoderModel.generate``; with
``--processor`` the base model's own ``generate()`` mixes the decoder in through
``MemoryDecoderLogitsProcessor`` (greedy and sampling only).
"""

from __future__ import annotations

import textwrap
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import apply_run, read_router_json
from .checks import (GREEDY_BELOW, check_context, check_device, check_lambda, check_positive_int, check_seed,
                     check_temperature, check_text)
from .errors import MemdecError
from .joint import MemoryDecoderLogitsProcessor, MemoryDecoderModel, attach_router
from .models import DEFAULT_MODEL, load_model, max_context, resolve_device
from .options import help_of, option

MAX_BEAMS = 64  # --num-beams: wider beams hold num_beams copies of the cache and score num_beams x vocabulary per step


@dataclass
class GenerateConfig:
    prompt: list[str] = option("one or more prompts (batched, left-padded)")
    memdec: str | None = option("memory decoder checkpoint folder (HF model + memdec.json)", None)
    run: str | None = option("a `memdec adapt` run folder, in place of --model and --memdec (giving either beside it "
                             "is refused)", None)
    model: str | None = option("base model spec", None, note=f"{DEFAULT_MODEL}; not with --run, which gives its own")
    lmbda: float | None = option("mixing weight λ in [0, 1]; default: the checkpoint's recommended λ", None,
                                 flag="--lambda")
    compare: bool = option("also generate with the base model alone and print both", False)
    max_new_tokens: int = option("tokens to generate", 64)
    do_sample: bool = option("sample instead of greedy / beam search", False)
    temperature: float | None = option(f"sampling temperature (below {GREEDY_BELOW:g}: greedy, as vLLM does)", None)
    top_k: int | None = option("sampling: keep the k most likely tokens", None)
    top_p: float | None = option("sampling: nucleus mass", None)
    num_beams: int = option(f"beam search width, at most {MAX_BEAMS} (not with --processor)", 1)
    seed: int = option("random seed; base and joint use the same one", 0)
    processor: bool = option("mix through MemoryDecoderLogitsProcessor in the base model's generate()", False)
    device: str = option("auto, cpu or cuda", "auto")
    router: str | None = option("a `memdec router` folder: mix at the router's λ_t per position in place of λ (not "
                                "with --lambda)", None)


GENERATE_HELP = help_of(GenerateConfig)  # each option's help, by field name (declared once, on GenerateConfig)


def check_generate_config(cfg: GenerateConfig) -> None:
    """Every flag of ``memdec generate`` checked, one clear line each, before any model loads."""
    if not cfg.prompt or any(not p.strip() for p in cfg.prompt):
        raise MemdecError("--prompt must be non-empty text (an empty prompt gives the model nothing to continue)")
    for prompt in cfg.prompt:
        check_text(prompt, "--prompt")
    check_positive_int(cfg.max_new_tokens, "--max-new-tokens")
    check_positive_int(cfg.num_beams, "--num-beams", MAX_BEAMS)
    check_seed(cfg.seed)
    if cfg.lmbda is not None:
        check_lambda(cfg.lmbda, "--lambda")
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    given = [k for k, v in sampling.items() if v is not None]
    if given and not cfg.do_sample:
        raise MemdecError(f"--{'/--'.join(k.replace('_', '-') for k in given)} only apply with --do-sample")
    if cfg.temperature is not None:
        check_temperature(cfg.temperature, "--temperature")
    if cfg.top_k is not None:
        check_positive_int(cfg.top_k, "--top-k")
    if cfg.top_p is not None and not 0.0 < cfg.top_p <= 1.0:
        raise MemdecError(f"--top-p must lie in (0, 1], got {cfg.top_p}")
    if cfg.processor and cfg.num_beams > 1:
        raise MemdecError("--num-beams does not work with --processor: the logits processor cannot follow beam "
                          "reordering; drop --processor to use MemoryDecoderModel, which supports beam search")
    check_device(cfg.device)
    if cfg.router is not None:
        if cfg.lmbda is not None:
            raise MemdecError("--router gives λ_t per position: not with --lambda")
        read_router_json(cfg.router)


def check_fits_context(n_prompt: int, max_new_tokens: int, model) -> None:
    """One line unless the (longest, padded) prompt and ``--max-new-tokens`` fit the model's context:
    the check ``memdec serve`` makes per request, here before anything is generated."""
    def refuse(message: str, part: str) -> MemdecError:
        flag = "--prompt" if part == "prompt" else f"--max-new-tokens {max_new_tokens}"
        return MemdecError(f"{flag}: {message}")

    check_context(n_prompt, max_new_tokens, max_context(model), refuse)


def generate_kwargs(cfg: GenerateConfig, tokenizer) -> dict:
    """The ``generate()`` arguments of a (checked) GenerateConfig."""
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "num_beams": cfg.num_beams,
                          "pad_token_id": tokenizer.pad_token_id}
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    kw.update({k: v for k, v in sampling.items() if v is not None})
    if cfg.do_sample and cfg.temperature is not None and cfg.temperature < GREEDY_BELOW:
        kw = {k: v for k, v in kw.items() if k not in sampling} | {"do_sample": False}  # logits / 1e-45 are infinite
    return kw


def run_generate(cfg: GenerateConfig) -> list[dict]:
    """Generate a continuation of each prompt. Returns [{"prompt", "joint", "base" (with --compare), "lambda"}]."""
    cfg = apply_run(cfg)
    if cfg.memdec is None:
        raise MemdecError("give a memory decoder: --memdec CKPT or --run RUN")
    check_generate_config(cfg)
    device = resolve_device(cfg.device)
    base, tokenizer = load_model(cfg.model, device=device)
    tokenizer.padding_side = "left"
    enc = tokenizer(list(cfg.prompt), return_tensors="pt", padding=True).to(device)
    n_prompt = enc["input_ids"].shape[1]
    check_fits_context(n_prompt, cfg.max_new_tokens, base)  # before the decoder loads
    joint = MemoryDecoderModel.from_pretrained(base, cfg.memdec, cfg.lmbda, tokenizer=tokenizer)
    if cfg.router is not None:
        joint.router = attach_router(joint, cfg.router, cfg.memdec)
    kw = generate_kwargs(cfg, tokenizer)

    def decode(ids: torch.Tensor) -> list[str]:
        return tokenizer.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(cfg.seed)
        if cfg.processor:
            with MemoryDecoderLogitsProcessor(joint.memdec, joint.lmbda, enc["attention_mask"], joint.temperature,
                                              router=joint.router, base=base) as proc:
                out_joint = base.generate(**enc, **kw, logits_processor=[proc])
        else:
            out_joint = joint.generate(**enc, **kw)
        out_base = None
        if cfg.compare:
            torch.manual_seed(cfg.seed)
            out_base = base.generate(**enc, **kw)
    joint_text = decode(out_joint)
    base_text = decode(out_base) if out_base is not None else [None] * len(joint_text)
    return [{"prompt": p, "lambda": joint.lmbda, "router": cfg.router if joint.router is not None else None,
             "base": b, "joint": j}
            for p, b, j in zip(cfg.prompt, base_text, joint_text)]


def format_generations(results: list[dict], width: int = 100) -> str:
    """Prompt, then the base and joint continuations side by side (stacked when narrow)."""
    blocks = []
    for r in results:
        lines = [f"prompt: {r['prompt']}"]
        joint_title = f"base + memdec (λ={r['lambda']:.2f})" if r.get("router") is None else \
            f"base + memdec (λ_t: router {r['router']})"
        if r["base"] is None:
            lines += [f"── {joint_title} ──", textwrap.fill(r["joint"], width) or "(empty)"]
        elif width < 60:
            lines += ["── base ──", textwrap.fill(r["base"], width) or "(empty)",
                      f"── {joint_title} ──", textwrap.fill(r["joint"], width) or "(empty)"]
        else:
            col = (width - 3) // 2
            left = textwrap.wrap(r["base"], col) or ["(empty)"]
            right = textwrap.wrap(r["joint"], col) or ["(empty)"]
            lines.append(f"{'base':<{col}} │ {joint_title}")
            lines.append(f"{'─' * col}─┼─{'─' * col}")
            for i in range(max(len(left), len(right))):
                a = left[i] if i < len(left) else ""
                b = right[i] if i < len(right) else ""
                lines.append(f"{a:<{col}} │ {b}".rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
