"""``lora``: LoRA adapters (peft) on the frozen base model, scored on their own (merged into a copy
of the base, so they add nothing to inference time). Its folder is a peft adapter folder whose
weights are ``adapter_model.safetensors``: a pickled ``adapter_model.bin`` is never read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import load_safetensors
from ..checks import check_positive_int, check_unit_interval
from ..errors import MemdecError, one_line
from ..models import load_model
from ..options import check_options, option
from ..train import TrainingData, init_memory_decoder
from .base import BaselineRecipe, Method, register

LORA_ADAPTER = "adapter_model.safetensors"


def add_lora(model, cfg):
    """Wrap ``model`` with trainable LoRA adapters (peft) of ``cfg``'s ``lora_*`` options, B
    initialised to zero: a PeftModel.

    Only the adapters require gradients. With B = 0 the wrapped model computes exactly the base
    model's logits.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MemdecError("--method lora needs the peft package: pip install peft") from None
    targets = list(cfg.lora_targets) if cfg.lora_targets else "all-linear"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if type(m).__name__ in ("Linear", "Conv1D") and "lm_head" not in name})
        raise MemdecError(f"--lora-targets {' '.join(targets) if isinstance(targets, list) else targets}: "
                          f"{str(exc).splitlines()[0]} (this model's linear layers: {', '.join(linear)})") from None


LORA_R = 8  # the baseline's LoRA rank: `memdec baseline --lora-r` and `memdec adapt --lora-r` (declared once, below)
LORA_ALPHA = 16.0  # its scaling numerator: the adapters' update is scaled by LORA_ALPHA / LORA_R = 2
LR_SCALE = 5.0
"""``memdec adapt --baselines`` trains the LoRA baseline at ``LR_SCALE`` x ``--lr`` (``--lora-lr`` overrides it);
a LoRA *decoder* trains at ``memdec.decoders.lora.LR_SCALE`` = 30 x ``--lr``. One reason for both: LoRA's few,
zero-started parameters want a larger step than full fine-tuning, and with Adam each adapter entry moves by
about lr per step, so the adapted weight W + (alpha / r)·B·A moves by about (alpha / r)·lr. The baseline's
adapters are scaled by LORA_ALPHA / LORA_R = 2 (peft's alpha 16 on rank 8), a decoder's by 1 (memdec writes
alpha = rank), so at the defaults the baseline's weights move 10 x a full copy's step and a decoder's 30 x. The
decoder's scale was measured (10 x on Austen in round three, 30 x on five domains in round four: docs/domains.md);
this 5 x came with the baselines (commit bc9cad9) and was not tuned on its own: the baseline may be stronger at a
larger step. A baseline of another --lora-r or --lora-alpha keeps 5 x (its weights then move at another
multiple)."""


@dataclass(kw_only=True)
class LoraOptions:
    """``--method lora``'s own flags: fields of ``BaselineConfig`` (one of its bases), each declared once."""

    lora_r: int = option("LoRA rank", LORA_R, check=check_positive_int)
    lora_alpha: float = option("LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)", LORA_ALPHA)
    lora_dropout: float = option("dropout on the LoRA branch's input", 0.0)
    lora_targets: list[str] | None = option("module names to adapt, e.g. q_proj v_proj (default: every linear layer "
                                            "of the blocks)", None)


class LoraRecipe(BaselineRecipe):
    """A full copy of the base wrapped with adapters; only the adapters are trained and saved."""

    def init_model(self, cfg, data: TrainingData):
        model, tokenizer = init_memory_decoder(cfg, data, "cpu")
        model = add_lora(model, cfg)
        model.train()
        return model, tokenizer

    def load_weights(self, model, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_safetensors(folder / LORA_ADAPTER))
        if result.unexpected_keys:
            raise MemdecError(f"{folder}: the saved adapters do not fit the model ({result.unexpected_keys[:3]})")


class Lora(Method):
    name = "lora"
    description = "LoRA adapters (peft) on the frozen base model"
    order = 30
    options = LoraOptions

    def check(self, cfg) -> None:
        check_options(cfg, of=LoraOptions)
        if check_unit_interval(cfg.lora_dropout, "--lora-dropout") == 1.0:
            raise MemdecError("--lora-dropout 1 drops every input of the adapters: give a value in [0, 1)")

    def recipe(self, cfg) -> LoraRecipe:
        return LoraRecipe(self)

    def check_folder(self, path: Path) -> None:
        """Its adapter must be safetensors: an ``adapter_model.bin`` is a pickle, never loaded."""
        if not (path / LORA_ADAPTER).is_file():
            pickled = (path / "adapter_model.bin").exists()
            found = " (adapter_model.bin is a pickle: memdec loads safetensors only)" if pickled else ""
            raise MemdecError(f"{path}: a lora baseline needs its adapter in {LORA_ADAPTER}{found}")

    def load(self, path: Path, base_spec: str, base_model, tokenizer):
        """The adapters merged into a fresh copy of the base, as one would deploy them."""
        from peft import PeftModel

        copy, _ = load_model(base_spec, device=str(base_model.device), dtype=base_model.dtype)
        try:
            adapted = PeftModel.from_pretrained(copy, str(path))
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign adapter raises many kinds
            raise MemdecError(f"{path / LORA_ADAPTER}: cannot load the lora adapter ({one_line(exc)})") from None
        return adapted.merge_and_unload().eval()

    def adapt_inputs(self, s) -> dict:
        return {"lr": s.lora_lr, "lora_r": s.lora_r}

    def adapt_options(self, s) -> dict:
        return {**super().adapt_options(s), "lr": s.lora_lr, "lora_r": s.lora_r}

    def adapt_what(self, s) -> str:
        return f"{super().adapt_what(s)}, lr {s.lora_lr:g}, r {s.lora_r}"


register(Lora())
