"""The served models: one base loaded once, one ``MemoryDecoderModel`` per decoder over it, and the domain
router of ``auto`` (``Models``, ``load_models``); ``left_pad``: prompts as one left-padded batch.
"""

import time
import warnings

import torch

from ..checkpoint import NO_DOMAIN, check_checkpoint_tokenizer
from ..errors import MemdecError
from ..joint import MemoryDecoderModel
from ..models import (check_base_identity, load_model, load_tokenizer, max_context, resolve_device,
                      tokenizer_fingerprint)
from ..router import DomainRouter, load_domain_router, pooled_states
from .config import AUTO, Plan


class Models:
    """The served models. ``ids``: the base's id, then each decoder's name."""

    def __init__(self, base, tokenizer, base_id: str, joints: dict[str, MemoryDecoderModel], ckpts: dict[str, str],
                 domain_router: DomainRouter | None = None, router_dir: str | None = None):
        self.base, self.tokenizer, self.base_id = base, tokenizer, base_id
        self.joints, self.ckpts = joints, ckpts
        self.default_lambda = {name: joint.lmbda for name, joint in joints.items()}
        self.token_routers = {name: joint.router for name, joint in joints.items()}  # None: the fixed λ
        self.domain_router, self.router_dir = domain_router, router_dir
        self.context = max_context(base)
        eos = base.generation_config.eos_token_id if base.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.created = int(time.time())

    @property
    def ids(self) -> list[str]:
        return [self.base_id, *self.joints, *([AUTO] if self.domain_router is not None else [])]

    @property
    def device(self):
        return self.base.device

    def runner(self, target: str, lmbda: float | None):
        """The model that generates for ``target`` (an id): a decoder at ``lmbda``, or (None) at its own
        default, its token router where its folder holds one, else its λ."""
        if target == self.base_id:
            return self.base
        joint = self.joints[target]
        joint.lmbda = self.default_lambda[target] if lmbda is None else lmbda
        joint.router = self.token_routers[target] if lmbda is None else None
        return joint

    def route(self, prompts: list[list[int]]) -> str:
        """The id that answers a request of these prompts: a decoder's name, or the base's for "none". Each
        prompt is pooled alone (no padding), the request goes where the mean probability is highest."""
        pooled = torch.cat([pooled_states(self.base, torch.tensor([p], device=self.device)) for p in prompts])
        name = self.domain_router.route_request(pooled.to(self.domain_router.mean.device))
        return self.base_id if name == NO_DOMAIN else name

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_models(plan: Plan) -> Models:
    """Load the base once and pair it with each decoder; tokenizer hashes are checked first."""
    tokenizer = load_tokenizer(plan.base_spec)
    for name, ckpt, info in plan.decoders:
        check_checkpoint_tokenizer(tokenizer, info, f"memory decoder {name} ({ckpt})")
    if plan.router is not None and plan.router_info["tokenizer_hash"] != tokenizer_fingerprint(tokenizer):
        raise MemdecError(f"--router {plan.router}: trained with another tokenizer than the base model's")
    if plan.router is not None:
        check_base_identity(plan.router_info.get("base_fingerprint"), plan.base_spec, f"--router {plan.router}")
    base, tokenizer = load_model(plan.base_spec, device=resolve_device(plan.device))
    joints = {name: MemoryDecoderModel.from_pretrained(base, ckpt, plan.lmbda, tokenizer=tokenizer)
              for name, ckpt, _ in plan.decoders}
    router = None
    if plan.router is not None:
        router = load_router_for(base, plan.router, plan.router_info)
    models = Models(base, tokenizer, plan.base_id, joints, {name: ckpt for name, ckpt, _ in plan.decoders}, router,
                    plan.router)
    warm_up(models)
    return models


def load_router_for(base, folder: str, info: dict) -> DomainRouter:
    """The domain router of ``folder``, checked against the base's hidden size, on its device (its tokenizer
    is checked by ``load_models`` before any model loads)."""
    d_base = base.config.get_text_config().hidden_size
    if d_base != info["d_base"]:
        raise MemdecError(f"--router {folder}: trained on a base of hidden size {info['d_base']}; "
                          f"this base has {d_base}")
    router, _ = load_domain_router(folder, device=base.device)
    return router


def warm_up(models: Models) -> None:
    """One short greedy generate() per model, so that the first request does not pay for first-call set-up."""
    ids, mask = left_pad([models.tokenizer("Hello")["input_ids"] or [models.pad_id]], models.pad_id, models.device)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (models.base, *models.joints.values()):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                           pad_token_id=models.pad_id)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)
