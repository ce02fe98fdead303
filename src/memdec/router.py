"""A learned token router: λ_t per position between a frozen base model and a frozen memory decoder.

    log p(y | x_<t) = logaddexp( log(1 − λ_t) + log p_base(y),  log λ_t + log p_mem(y) )

- ``RouterFeatures``: what the router sees at each position: both models' final hidden states
  [..., d_base] and [..., d_mem] (the inputs of their LM heads: after the final norm; for a fork
  decoder, after its own norm) and ``SCALARS``, five numbers from the two next-token distributions
  (each model's entropy and max log-prob, KL(p_mem ‖ p_base)). One row is
  ``d_base + d_mem + len(SCALARS)`` float32 numbers.
- ``TokenRouter``: LayerNorm of each hidden state, the scalars standardised by their training
  statistics, then Linear(d_base + d_mem + s, hidden) → GELU → Linear(hidden, 1) → sigmoid. Its last
  layer starts at zero with the bias at logit(fixed λ): an untrained router IS the fixed-λ mixture.
- ``ConstantRouter(λ)``: λ_t = λ everywhere, exactly today's fixed-λ mixing (the equivalence tests,
  a fallback).
- ``fit_router``: AdamW on precomputed features with both models frozen. Loss: the mixture's mean NLL
  (in log space) + γ · mean(λ_t on general-text rows); early stopping on a held-out tail of the
  domain and the general rows; deterministic for a seed.
- ``save_router`` / ``load_router``: ``router.safetensors`` + ``router.json`` (the format is
  ``memdec.checkpoint``'s; weights through safetensors only). Router kinds are registered by name
  (``ROUTERS``, a ``memdec.registry.Registry``; ``register_router``), each with its own record
  (``Router.record``, ``check_record``, ``from_record``) and weights (``save_weights``): a new kind
  is one class here and its test.

Many domains (``DomainRouter``): several decoders over one base. A linear (or small MLP) classifier
over {none, d1..dn} reads the base's final hidden states of a prompt, mean-pooled over its tokens
(``pooled_states``: only the base runs), and picks one decoder per request, or none (the base alone):
a request costs one decoder, never all of them. ``fit_domain_router`` trains it (cross-entropy,
AdamW, early stopping on held-out windows); ``save_domain_router`` / ``load_domain_router``:
``domains.safetensors`` + ``domains.json``.

Routers give *log-weights* (``log_weights``: log(1 − λ_t), log λ_t), computed with ``logsigmoid``
so that the mixture is exact at any λ_t; ``mix_routed`` mixes with them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .checkpoint import (DOMAIN_ROUTER_JSON, DOMAIN_ROUTER_WEIGHTS, NO_DOMAIN, ROUTER_JSON, ROUTER_KINDS,
                         ROUTER_WEIGHTS, load_safetensors, read_domain_router_json, read_router_json,
                         write_domain_router_json, write_router_json)
from .checks import (UNIT, check_field, check_lambda, check_non_negative, check_positive, check_positive_int,
                     check_seed, check_unit_interval)
from .errors import MemdecError
from .files import atomic_write
from .loss import chunk_rows
from .registry import Registry

SCALARS = ("base_entropy", "mem_entropy", "base_max_logprob", "mem_max_logprob", "kl_mem_base")
FEATURE_BUDGET_BYTES = 256 * 2**20  # the fp32 [rows, V] temporaries of one chunk of scalar features
STD_FLOOR = 1e-6  # the least standard deviation a fit standardises by (``set_scalar_stats``, ``set_stats``)


# --------------------------------------------------------------------------------------------
# Features


def distribution_scalars(lp_base: torch.Tensor, lp_mem: torch.Tensor) -> torch.Tensor:
    """``SCALARS`` [..., 5] float32 from two full rows of log-probs [..., V]."""
    lp_base, lp_mem = lp_base.float(), lp_mem.float()
    p_base, p_mem = lp_base.exp(), lp_mem.exp()
    ent_base = -(p_base * lp_base.clamp_min(-1e30)).sum(-1)  # 0·(−inf) is 0, not NaN
    ent_mem = -(p_mem * lp_mem.clamp_min(-1e30)).sum(-1)
    kl = (p_mem * (lp_mem.clamp_min(-1e30) - lp_base.clamp_min(-1e30))).sum(-1)
    return torch.stack([ent_base, ent_mem, lp_base.amax(-1), lp_mem.amax(-1), kl], dim=-1)


def scalars_from_logits(base_logits: torch.Tensor, mem_logits: torch.Tensor,
                        budget: int = FEATURE_BUDGET_BYTES) -> torch.Tensor:
    """``SCALARS`` [..., 5] from two models' logits [..., V] (the decoder's already divided by its
    temperature), over chunks of rows whose fp32 temporaries fit ``budget`` bytes."""
    vocab = base_logits.shape[-1]
    flat_b, flat_m = base_logits.reshape(-1, vocab), mem_logits.reshape(-1, vocab)
    rows = max(1, chunk_rows(vocab, budget) // 4)  # about four [rows, V] fp32 temporaries at once
    out = torch.empty(flat_b.shape[0], len(SCALARS), dtype=torch.float32, device=base_logits.device)
    for s in range(0, flat_b.shape[0], rows):
        out[s : s + rows] = distribution_scalars(F.log_softmax(flat_b[s : s + rows].float(), -1),
                                                 F.log_softmax(flat_m[s : s + rows].float(), -1))
    return out.reshape(*base_logits.shape[:-1], len(SCALARS))


@dataclass(frozen=True)
class RouterFeatures:
    """The features of a router: both models' final hidden sizes and the scalar names, in order.

    ``build(h_base, h_mem, scalars)`` gives the rows [..., width]: h_base, h_mem, scalars, float32.
    """

    d_base: int
    d_mem: int
    scalars: tuple[str, ...] = SCALARS

    @property
    def width(self) -> int:
        return self.d_base + self.d_mem + len(self.scalars)

    def build(self, h_base: torch.Tensor, h_mem: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """Feature rows [..., width] from the hidden states [..., d_base], [..., d_mem] and scalars [..., s]."""
        if h_base.shape[-1] != self.d_base or h_mem.shape[-1] != self.d_mem:
            raise MemdecError(
                f"the router was trained on hidden sizes {self.d_base} (base) and {self.d_mem} (decoder); "
                f"these models have {h_base.shape[-1]} and {h_mem.shape[-1]}"
            )
        return torch.cat([h_base.float(), h_mem.float(), scalars.float()], dim=-1)

    def from_logits(self, h_base, h_mem, base_logits, mem_logits) -> torch.Tensor:
        """Feature rows from hidden states and both models' logits [..., V] (the decoder's tempered)."""
        return self.build(h_base, h_mem, scalars_from_logits(base_logits, mem_logits))

    def from_logprobs(self, h_base, h_mem, lp_base, lp_mem) -> torch.Tensor:
        """Feature rows from hidden states and both models' full log-probs [..., V]."""
        return self.build(h_base, h_mem, distribution_scalars(lp_base, lp_mem))


# --------------------------------------------------------------------------------------------
# Routers


class Router(nn.Module):
    """λ_t from feature rows. ``needs_features``: whether ``log_weights`` reads them (a constant does not).

    A kind that can be saved sets ``kind`` (``router.json``'s ``kind``), implements ``record`` and
    ``from_record`` (and ``save_weights``, ``check_record`` where it has weights or fields of its own) and
    is registered with ``register_router``."""

    needs_features = True
    kind: ClassVar[str] = ""

    def record(self) -> dict:
        """The fields of ``router.json`` that describe the network (``kind`` among them)."""
        raise MemdecError(f"cannot save a {type(self).__name__}: only a registered router kind "
                          f"({', '.join(ROUTERS)}) has a format")

    def save_weights(self, folder: Path) -> None:
        """Write the network's tensors into ``folder`` (atomic); a kind without weights writes nothing."""

    @classmethod
    def check_record(cls, info: dict, file: Path) -> None:
        """One MemdecError line naming ``file`` and the field where a field of this kind's own is bad
        (``memdec.checkpoint.read_router_json`` calls it after the fields every router has)."""

    @classmethod
    def from_record(cls, info: dict, folder: Path) -> "Router":
        """The router described by the checked ``router.json`` ``info`` of ``folder`` (its weights read from there)."""
        raise NotImplementedError

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        """The gate's logit z [...] (λ_t = sigmoid(z)) from feature rows [..., width]."""
        raise NotImplementedError

    def log_weights(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log(1 − λ_t), log λ_t), each float32 [...], from feature rows [..., width]."""
        z = self.logit(features).float()
        return F.logsigmoid(-z), F.logsigmoid(z)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """λ_t in (0, 1), float32 [...]."""
        return torch.sigmoid(self.logit(features).float())


ROUTERS: Registry[type[Router]] = Registry("router kind", name_of=lambda cls: cls.kind)


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make a router kind known to ``load_router`` by its ``kind``, and its record's check
    (``check_record``) to ``memdec.checkpoint.read_router_json``."""
    ROUTERS.register(cls)
    ROUTER_KINDS.register(cls.check_record, name=cls.kind)
    return cls


def unregister_router(kind: str) -> None:
    """Forget the router kind ``kind`` and its record's check (a test's own kind, once the test is done)."""
    ROUTERS.unregister(kind)
    ROUTER_KINDS.unregister(kind)


@register_router
class ConstantRouter(Router):
    """λ_t = λ at every position: the fixed-λ mixture, bit for bit (its log-weights are the constants
    ``memdec.scoring.mix_logprobs`` adds, log1p(−λ) and log λ, which a float32 add rounds alike)."""

    needs_features = False
    kind = "constant"

    def __init__(self, lmbda: float):
        super().__init__()
        self.lmbda = check_lambda(lmbda)

    def log_weights(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Constants of the shape of ``features`` (any tensor [...], only its shape and device are read)."""
        lam = self.lmbda
        lo = math.log1p(-lam) if lam < 1 else -math.inf
        hi = math.log(lam) if lam > 0 else -math.inf
        return (torch.full(features.shape, lo, dtype=torch.float32, device=features.device),
                torch.full(features.shape, hi, dtype=torch.float32, device=features.device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.full(features.shape, self.lmbda, dtype=torch.float32, device=features.device)

    def extra_repr(self) -> str:
        return f"lmbda={self.lmbda}"

    def record(self) -> dict:
        return {"kind": self.kind, "lambda": self.lmbda, "d_base": 1, "d_mem": 1, "hidden": 1, "scalars": []}

    @classmethod
    def check_record(cls, info: dict, file: Path) -> None:
        """Its ``lambda``: the constant."""
        check_field(info, "lambda", file, UNIT)

    @classmethod
    def from_record(cls, info: dict, folder: Path) -> "ConstantRouter":
        return cls(info["lambda"])


@register_router
class TokenRouter(Router):
    """A small MLP gate: LayerNorm(h_base), LayerNorm(h_mem), standardised scalars → Linear → GELU →
    Linear → logit. ``init_lambda``: the λ it starts at (its last layer is zero, its bias logit(λ))."""

    kind = "mlp"

    def __init__(self, spec: RouterFeatures, hidden: int = 64, init_lambda: float = 0.5):
        super().__init__()
        self.spec = spec
        self.hidden = hidden
        self.norm_base = nn.LayerNorm(spec.d_base)
        self.norm_mem = nn.LayerNorm(spec.d_mem)
        self.register_buffer("scalar_mean", torch.zeros(len(spec.scalars)))
        self.register_buffer("scalar_std", torch.ones(len(spec.scalars)))
        self.inner = nn.Linear(spec.width, hidden)
        self.out = nn.Linear(hidden, 1)
        lam = min(max(float(init_lambda), 1e-3), 1 - 1e-3)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, math.log(lam / (1 - lam)))

    def set_scalar_stats(self, scalars: torch.Tensor) -> None:
        """Standardise the scalar features by the mean and std of ``scalars`` [N, s] (the training rows)."""
        self.scalar_mean.copy_(scalars.float().mean(0))
        self.scalar_std.copy_(scalars.float().std(0).clamp_min(STD_FLOOR))

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        d_b, d_m = self.spec.d_base, self.spec.d_mem
        if features.shape[-1] != self.spec.width:
            raise MemdecError(f"the router takes {self.spec.width} features per position, got {features.shape[-1]}")
        x = features.to(self.inner.weight.dtype)
        scalars = (x[..., d_b + d_m :] - self.scalar_mean) / self.scalar_std
        x = torch.cat([self.norm_base(x[..., :d_b]), self.norm_mem(x[..., d_b : d_b + d_m]), scalars], dim=-1)
        return self.out(F.gelu(self.inner(x))).squeeze(-1)

    def record(self) -> dict:
        return {"kind": self.kind, "d_base": self.spec.d_base, "d_mem": self.spec.d_mem, "hidden": self.hidden,
                "scalars": list(self.spec.scalars)}

    def save_weights(self, folder: Path) -> None:
        """``router.safetensors`` (atomic): every tensor of the state dict, float32."""
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / ROUTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))

    @classmethod
    def from_record(cls, info: dict, folder: Path) -> "TokenRouter":
        """The gate of ``info``'s sizes, its tensors from ``router.safetensors`` (``load_weights``); the scalar
        features it names must be those this memdec computes (``SCALARS``)."""
        if tuple(info["scalars"]) != SCALARS:
            raise MemdecError(f'{folder / ROUTER_JSON}: field "scalars" names {info["scalars"]}; this memdec computes '
                              f'{list(SCALARS)}')
        return load_weights(lambda: cls(RouterFeatures(info["d_base"], info["d_mem"]), info["hidden"]),
                            folder / ROUTER_WEIGHTS, ROUTER_JSON, ("scalar_std",))


def router_log_weights(router: Router, shape_of: torch.Tensor, states, scalars) -> tuple[torch.Tensor, torch.Tensor]:
    """``router``'s (log(1 − λ_t), log λ_t), each shaped like ``shape_of`` [...]. Only a router that reads
    features calls ``states()`` (the base's and the decoder's final hidden states [..., d]) and ``scalars()``
    (the scalar features [..., s])."""
    if not router.needs_features:
        return router.log_weights(shape_of)
    h_base, h_mem = states()
    rows = RouterFeatures(h_base.shape[-1], h_mem.shape[-1]).build(h_base, h_mem, scalars())
    return router.log_weights(rows.to(_device_of(router, rows)))


def _device_of(router: Router, default: torch.Tensor) -> torch.device:
    """The device of a router's parameters (``default``'s for one without any)."""
    param = next(router.parameters(), None)
    return default.device if param is None else param.device


def mix_routed(
    lp_base: torch.Tensor, lp_mem: torch.Tensor, log_1m: torch.Tensor, log_lam: torch.Tensor
) -> torch.Tensor:
    """log((1 − λ_t)·p_base + λ_t·p_mem) from log-probs [..., n] or [..., V] and the router's log-weights
    (broadcast: [..., n] for targets, [..., 1] for full rows). A weight of −inf leaves the other side exact."""
    return torch.logaddexp(lp_base + log_1m, lp_mem + log_lam)


# --------------------------------------------------------------------------------------------
# Fitting


@dataclass
class RouterFitConfig:
    """How ``fit_router`` trains a ``TokenRouter`` on precomputed features."""

    hidden: int = 64
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 1024
    general_weight: float = 0.1  # γ: the weight of mean(λ_t) on general-text rows
    holdout: float = 0.1  # the last fraction of the domain rows and of the general rows: early stopping
    patience: int = 3  # epochs without a better held-out loss before stopping
    init_lambda: float = 0.5  # where the router starts: the checkpoint's fixed λ
    seed: int = 0

    def check(self) -> None:
        """One MemdecError line per bad field, named as its flag."""
        check_positive_int(self.hidden, "--hidden")
        check_positive_int(self.epochs, "--epochs")
        check_positive(self.lr, "--lr")
        check_non_negative(self.weight_decay, "--weight-decay")
        check_positive_int(self.batch_size, "--batch-size")
        check_non_negative(self.general_weight, "--general-weight")
        if not 0.0 < check_unit_interval(self.holdout, "--holdout") < 1.0:
            raise MemdecError(f"--holdout must lie strictly between 0 and 1, got {self.holdout}")
        check_positive_int(self.patience, "--patience")
        check_lambda(self.init_lambda, "the initial λ")
        check_seed(self.seed)


def router_loss(router: Router, features: torch.Tensor, lp_base: torch.Tensor, lp_mem: torch.Tensor,
                is_general: torch.Tensor, general_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mixture NLL): −mean log((1 − λ_t)p_base + λ_t p_mem) + γ · mean(λ_t on general rows)."""
    log_1m, log_lam = router.log_weights(features)
    nll = -mix_routed(lp_base, lp_mem, log_1m, log_lam).mean()
    loss = nll
    if general_weight > 0 and bool(is_general.any()):
        loss = loss + general_weight * log_lam.exp()[is_general].mean()
    return loss, nll


def holdout_mask(is_general: torch.Tensor, fraction: float) -> torch.Tensor:
    """Held-out rows: the last ``fraction`` of the domain rows and of the general rows, by position
    (contiguous text, so that no held-out row sits beside a training row's window)."""
    held = torch.zeros_like(is_general)
    for group in (~is_general, is_general):
        rows = torch.nonzero(group).squeeze(-1)
        n = int(round(len(rows) * fraction))
        if n:
            held[rows[-n:]] = True
    return held


@torch.no_grad()
def evaluate_router(router: Router, features, lp_base, lp_mem, is_general, general_weight: float,
                    batch_size: int = 8192) -> dict:
    """Loss, mixture NLL and mean λ_t (overall, on domain rows, on general rows) over the given rows."""
    lam = torch.cat([router(features[s : s + batch_size]) for s in range(0, len(features), batch_size)])
    log_1m, log_lam = torch.log1p(-lam), torch.log(lam)
    nll_rows = -mix_routed(lp_base, lp_mem, log_1m, log_lam)
    out = {"nll": float(nll_rows.mean()), "mean_lambda": float(lam.mean())}
    for name, rows in (("domain", ~is_general), ("general", is_general)):
        if bool(rows.any()):
            out[f"{name}_nll"] = float(nll_rows[rows].mean())
            out[f"{name}_mean_lambda"] = float(lam[rows].mean())
    out["loss"] = out["nll"] + (general_weight * out.get("general_mean_lambda", 0.0) if bool(is_general.any()) else 0.0)
    return out


def fit_router(features: torch.Tensor, lp_base: torch.Tensor, lp_mem: torch.Tensor, is_general: torch.Tensor,
               cfg: RouterFitConfig, spec: RouterFeatures) -> tuple[TokenRouter, dict]:
    """Train a ``TokenRouter`` on precomputed rows, both models frozen (their outputs are inputs here).

    features [N, width] float32; lp_base, lp_mem [N]: each model's log-prob of the next token;
    is_general [N] bool. AdamW over shuffled mini-batches (``torch.Generator`` seeded by ``cfg.seed``:
    the same inputs give the same router); after each epoch the held-out loss (``holdout_mask``)
    decides the best state, kept and returned, and early stopping. Returns (router, stats): the
    held-out numbers of the untrained (fixed-λ) and the best router, and one line per epoch."""
    cfg.check()
    n = features.shape[0]
    if not (features.ndim == 2 and features.shape[1] == spec.width and lp_base.shape == lp_mem.shape == (n,)
            and is_general.shape == (n,)):
        raise MemdecError(f"fit_router: features must be [N, {spec.width}] with lp_base, lp_mem, is_general [N]")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    is_general = is_general.bool()
    held = holdout_mask(is_general, cfg.holdout)
    train_rows = torch.nonzero(~held).squeeze(-1)
    if len(train_rows) == 0 or not bool(held.any()):
        raise MemdecError(f"fit_router: {n} rows are too few to hold out {cfg.holdout:.0%} of them")
    router = TokenRouter(spec, cfg.hidden, cfg.init_lambda)
    router.set_scalar_stats(features[train_rows, spec.d_base + spec.d_mem :])
    opt = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    held_args = (features[held], lp_base[held], lp_mem[held], is_general[held], cfg.general_weight)
    router.eval()
    start = evaluate_router(router, *held_args)
    best, best_state, epochs, since = start, copy.deepcopy(router.state_dict()), [], 0
    for epoch in range(1, cfg.epochs + 1):
        router.train()
        order = train_rows[torch.randperm(len(train_rows), generator=gen)]
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s : s + cfg.batch_size]
            loss, _ = router_loss(router, features[rows], lp_base[rows], lp_mem[rows], is_general[rows],
                                  cfg.general_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
        router.eval()
        held_now = evaluate_router(router, *held_args)
        epochs.append({"epoch": epoch, "train_loss": total / len(order), "held_loss": held_now["loss"],
                       "held_nll": held_now["nll"], "held_mean_lambda": held_now["mean_lambda"]})
        if held_now["loss"] < best["loss"]:
            best, best_state, since = held_now, copy.deepcopy(router.state_dict()), 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    router.load_state_dict(best_state)
    router.eval()
    stats = {"rows": n, "train_rows": len(train_rows), "held_rows": int(held.sum()),
             "general_rows": int(is_general.sum()), "held_fixed": start, "held_best": best,
             "best_epoch": max([e["epoch"] for e in epochs if e["held_loss"] == best["loss"]], default=0),
             "epochs": epochs}
    return router, stats


# --------------------------------------------------------------------------------------------
# Saving and loading


def router_record(router: Router) -> dict:
    """The fields of ``router.json`` that describe the network (``memdec.checkpoint`` owns the format)."""
    return router.record()


def save_router(router: Router, folder: str | Path, info: dict) -> Path:
    """``router.safetensors`` (atomic, for a kind with weights) then ``router.json`` (``info`` plus the
    network's record), last: it commits the router. ``info``: base_model, tokenizer_hash,
    decoder_fingerprint and the stats."""
    folder = Path(folder)
    record = router.record()  # before any file: a router of no registered kind is one line
    folder.mkdir(parents=True, exist_ok=True)
    router.save_weights(folder)
    write_router_json(folder, {**info, **record})
    return folder


def load_router(folder: str | Path, device=None) -> tuple[Router, dict]:
    """(router, its ``router.json``) from a router folder, in eval mode; safetensors only. One
    MemdecError line naming the file for a bad record, missing or foreign weights."""
    folder = Path(folder).expanduser()
    info = read_router_json(folder)
    router = ROUTERS.get(info["kind"]).from_record(info, folder)
    if device is not None:
        router.to(device)
    return router.eval(), info


def load_weights(build: Callable[[], nn.Module], file: Path, record: str, stds: tuple[str, ...]) -> nn.Module:
    """The network ``build()`` makes (as the JSON file ``record`` describes it), its tensors from ``file``: the
    one check of a router's weights, at load. Each tensor must be there, of the record's shape, finite, and
    each of ``stds`` (standardisation statistics) at least ``STD_FLOOR``; one MemdecError line naming the
    file and the tensor otherwise. The network is built on the meta device first, so that a record of
    absurd sizes allocates nothing: it gets the file's tensors."""
    if not file.is_file():
        raise MemdecError(f"{file}: missing; the network {record} describes keeps its weights there")
    with torch.device("meta"):
        module = build()
    tensors = load_safetensors(file)
    expected = module.state_dict()
    for name, t in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != tuple(t.shape):
            got = "missing" if name not in tensors else f"shape {tuple(tensors[name].shape)}"
            raise MemdecError(f"{file}: {name} is {got}; {record} describes shape {tuple(t.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise MemdecError(f"{file}: holds {extra[0]}, not a tensor of the network {record} describes")
    tensors = {name: t.float() for name, t in tensors.items()}
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise MemdecError(f"{file}: {name} holds non-finite weights")
        if name in stds and not bool((t >= STD_FLOOR).all()):
            raise MemdecError(f"{file}: {name} holds a standard deviation of {float(t.min()):g}; a router standardises "
                              f"by values >= {STD_FLOOR:g} (a zero would divide by zero)")
    module.load_state_dict(tensors, assign=True)
    return module


def fit_config_record(cfg: RouterFitConfig) -> dict:
    """The fit settings as JSON (``router.json`` ``train_config``)."""
    return asdict(cfg)


# --------------------------------------------------------------------------------------------
# Many domains: one decoder (or none) per request


@torch.inference_mode()
def pooled_states(base, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The base's final hidden states (its backbone's ``last_hidden_state``: after the final norm, the LM
    head's input) averaged over each row's real tokens: [B, d] float32. No logits, no hooks: safe beside
    another thread's ``generate`` on the same model."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = base.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state.float()
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class DomainRouter(nn.Module):
    """A classifier of pooled base states [B, d_base] over ``classes`` ("none", then each domain): the
    states standardised by their training mean and std (``set_stats``: what tells domains apart is a small
    part of a pooled state, most of which every text shares), LayerNorm, then Linear (``hidden`` 0) or
    Linear → GELU → Linear (``hidden`` > 0) → logits [B, K]."""

    def __init__(self, d_base: int, classes: list[str] | tuple[str, ...], hidden: int = 0):
        super().__init__()
        if len(classes) < 2 or classes[0] != NO_DOMAIN or len(set(classes)) != len(classes):
            raise MemdecError(
                f'a domain router\'s classes are "{NO_DOMAIN}" then each domain once, got {list(classes)}'
            )
        self.d_base, self.classes, self.hidden = d_base, tuple(classes), hidden
        self.register_buffer("mean", torch.zeros(d_base))
        self.register_buffer("std", torch.ones(d_base))
        self.norm = nn.LayerNorm(d_base)
        k = len(classes)
        self.net = nn.Linear(d_base, k) if hidden == 0 else nn.Sequential(nn.Linear(d_base, hidden), nn.GELU(),
                                                                           nn.Linear(hidden, k))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K] from pooled states [B, d_base]."""
        if pooled.shape[-1] != self.d_base:
            raise MemdecError(f"the domain router reads hidden size {self.d_base}; this base has {pooled.shape[-1]}")
        return self.net(self.norm((pooled.to(self.mean.dtype) - self.mean) / self.std))

    def set_stats(self, pooled: torch.Tensor) -> None:
        """Standardise the inputs by the mean and std of ``pooled`` [N, d_base] (the training windows)."""
        self.mean.copy_(pooled.float().mean(0))
        self.std.copy_(pooled.float().std(0).clamp_min(STD_FLOOR))

    @torch.inference_mode()
    def route(self, pooled: torch.Tensor) -> list[str]:
        """The class of each row: "none" or a domain's name."""
        return [self.classes[i] for i in self(pooled).argmax(-1).tolist()]

    @torch.inference_mode()
    def route_request(self, pooled: torch.Tensor) -> str:
        """One class for a request of several prompts [B, d_base]: the most probable on average."""
        return self.classes[int(self(pooled).softmax(-1).mean(0).argmax())]


@dataclass
class DomainFitConfig:
    """How ``fit_domain_router`` trains a ``DomainRouter`` on pooled states."""

    hidden: int = 0
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    patience: int = 30
    seed: int = 0

    def check(self) -> None:
        """One MemdecError line per bad field, named as its flag."""
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 0:
            raise MemdecError(f"--hidden must be a whole number >= 0 (0: a linear classifier), got {self.hidden!r}")
        check_positive_int(self.epochs, "--epochs")
        check_positive(self.lr, "--lr")
        check_non_negative(self.weight_decay, "--weight-decay")
        check_positive_int(self.patience, "--patience")
        check_seed(self.seed)


@torch.no_grad()
def domain_accuracy(router: DomainRouter, pooled: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy overall and per class (``{"accuracy", "per_class": {name: {"n", "accuracy"}}}``)."""
    router.eval()
    hits = router(pooled).argmax(-1) == labels
    per = {name: {"n": int((labels == k).sum()), "accuracy": float(hits[labels == k].float().mean())}
           for k, name in enumerate(router.classes) if bool((labels == k).any())}
    return {"accuracy": float(hits.float().mean()) if len(hits) else float("nan"), "per_class": per}


def fit_domain_router(train: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor],
                      classes: list[str], cfg: DomainFitConfig) -> tuple[DomainRouter, dict]:
    """Train a ``DomainRouter`` on (pooled [N, d], labels [N]) with full-batch AdamW and cross-entropy,
    each class weighted alike; the epoch with the lowest held-out loss is kept (early stopping after
    ``patience`` epochs without a better one). Deterministic for a seed. Returns (router, stats)."""
    cfg.check()
    (x, y), (hx, hy) = train, held
    if len(x) == 0 or len(hx) == 0:
        raise MemdecError("fit_domain_router: no training or held-out windows")
    torch.manual_seed(cfg.seed)
    router = DomainRouter(x.shape[1], classes, cfg.hidden)
    router.set_stats(x)
    counts = torch.bincount(y, minlength=len(classes)).float()
    weight = (counts.sum() / (len(classes) * counts.clamp_min(1.0)))
    opt = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, best_epoch, since = math.inf, copy.deepcopy(router.state_dict()), 0, 0
    for epoch in range(1, cfg.epochs + 1):
        router.train()
        loss = F.cross_entropy(router(x), y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        router.eval()
        with torch.no_grad():
            held_loss = float(F.cross_entropy(router(hx), hy, weight=weight))
        if held_loss < best:
            best, best_state, best_epoch, since = held_loss, copy.deepcopy(router.state_dict()), epoch, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    router.load_state_dict(best_state)
    router.eval()
    stats = {"train_windows": len(x), "held_windows": len(hx), "best_epoch": best_epoch, "held_loss": best,
             "train": domain_accuracy(router, x, y), "held": domain_accuracy(router, hx, hy)}
    return router, stats


def save_domain_router(router: DomainRouter, folder: str | Path, info: dict) -> Path:
    """``domains.safetensors`` (atomic) then ``domains.json`` (``info`` plus the network's shape), last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in router.state_dict().items()}
    atomic_write(folder / DOMAIN_ROUTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_domain_router_json(folder, {**info, "d_base": router.d_base, "hidden": router.hidden,
                                      "classes": list(router.classes)})
    return folder


def load_domain_router(folder: str | Path, device=None) -> tuple[DomainRouter, dict]:
    """(router, its ``domains.json``) from a domain router folder, in eval mode; safetensors only. One
    MemdecError line naming the file for a bad record, missing or foreign weights."""
    folder = Path(folder).expanduser()
    info = read_domain_router_json(folder)
    router = load_weights(lambda: DomainRouter(info["d_base"], info["classes"], info["hidden"]),
                          folder / DOMAIN_ROUTER_WEIGHTS, DOMAIN_ROUTER_JSON, ("std",))
    if device is not None:
        router.to(device)
    return router.eval(), info
