"""``memdec router``: train a token router (``memdec.router``) between a base model and its memory decoder.

Both models are frozen. The job scores three token streams with the joint model once, keeping for
every position its feature row (both final hidden states and five distribution scalars) and each
model's log-prob of the next token:

- domain text the decoder did not train on: ``--domain-corpus`` after its first
  ``--domain-skip-tokens`` tokens (default: the decoder's datastore tokens where its ``memdec.json``
  names that corpus), ``--tokens`` of it;
- general text (``--general``, default ``general:train``), ``--general-tokens`` of it, whose rows
  carry the γ term that keeps λ_t low outside the domain;
- ``--valid`` (``--valid-tokens``): never fitted on; the base, the checkpoint's fixed λ and the
  router are reported there, and written into ``router.json`` with the router.

``memdec router --domains`` (``DomainRouterConfig``, ``train_domain_router``) trains a domain router
instead: several decoders over one base (``--memdec NAME=CKPT`` and ``--domain-corpus NAME=SPEC``,
repeated) and ``--general`` as the "none" class (the base alone). Only the base runs: random windows of
each corpus, their final hidden states mean-pooled, a classifier over {none, d1..dn}
(``memdec.router.DomainRouter``). Each domain's checkpoint folder and ``decoder_fingerprint`` are
recorded in ``domains.json``; the last 10% of each corpus's tokens give the held-out windows whose
accuracy per class is reported.

Memory: N rows × (d_base + d_mem + 5) float32, e.g. 64k rows of SmolLM2-135M (d = 576) are 296 MB;
``RouterConfig.feature_bytes`` says it, and the job prints it before scoring.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (CHECKPOINT_FORMAT, DOMAIN_ROUTER_FORMAT, DOMAIN_ROUTER_JSON, DOMAIN_ROUTER_UNFINISHED,
                         MEMDEC_JSON, NO_DOMAIN, ROUTER_FORMAT, ROUTER_JSON, ROUTER_UNFINISHED,
                         check_checkpoint_tokenizer, decoder_fingerprint, read_memdec_json)
from .checks import (check_device, check_model_name, check_non_negative, check_own_folder, check_positive_int,
                     holds_record, mark_own_folder)
from .data import check_corpus, load_token_stream
from .errors import MemdecError
from .joint import MemoryDecoderModel
from .models import (DEFAULT_MODEL, base_fingerprint, bos_prefix, check_block_size, load_model, resolve_device,
                     tokenizer_fingerprint)
from .options import option
from .router import (SCALARS, DomainFitConfig, RouterFeatures, RouterFitConfig, evaluate_router, fit_config_record,
                     fit_domain_router, fit_router, pooled_states, save_domain_router, save_router)
from .scoring import score_tokens
from .store import read_manifest


@dataclass
class RouterConfig:
    memdec: str = option("memory decoder checkpoint folder (HF model or fork blocks + memdec.json)")
    domain_corpus: str = option("domain corpus spec; its first --domain-skip-tokens tokens are skipped (the decoder "
                                "trained on them)")
    valid: str = option("validation corpus spec: never fitted on; base, fixed λ and router are reported there and "
                        "recorded in router.json")
    out: str = option("router folder (router.safetensors + router.json): new, empty, a router's or a memory decoder "
                      "checkpoint (which then uses it by default)")
    model: str = option("base model spec", DEFAULT_MODEL)
    general: str = option("general-text corpus spec, never the domain's: its rows keep λ_t low", "general:train")
    domain_skip_tokens: int | None = option("skip this many tokens of --domain-corpus (default: the decoder's "
                                            "datastore tokens when its memdec.json names this corpus, else 0)", None)
    tokens: int = option("domain tokens to fit on (after the skip)", 32768)
    general_tokens: int | None = option("general tokens to fit on (default: --tokens)", None)
    valid_tokens: int = option("tokens of --valid to report on", 8192)
    general_weight: float = option("γ: weight of mean λ_t on general rows in the loss", 0.1)
    hidden: int = option("width of the router's hidden layer", 64)
    epochs: int = option("passes over the fitting rows (early stopping may end sooner)", 20)
    lr: float = option("AdamW learning rate", 1e-3)
    weight_decay: float = option("AdamW weight decay", 0.01)
    fit_batch: int = option("rows per optimizer step", 1024)
    holdout: float = option("last fraction of the domain and general rows held out for early stopping", 0.1)
    patience: int = option("epochs without a better held-out loss before stopping", 3)
    block_size: int = option("window length in tokens", 512)
    stride: int | None = option("new tokens per window (default: block size / 2)", None)
    batch_size: int = option("windows per forward pass", 1)
    seed: int = option("random seed of the fit", 0)
    device: str = option("auto, cpu or cuda", "auto")
    text_field: str = option("JSONL / dataset field that holds the text", "text")

    def fit_config(self, init_lambda: float) -> RouterFitConfig:
        return RouterFitConfig(hidden=self.hidden, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                               batch_size=self.fit_batch, general_weight=self.general_weight, holdout=self.holdout,
                               patience=self.patience, init_lambda=init_lambda, seed=self.seed)


def feature_bytes(rows: int, d_base: int, d_mem: int) -> int:
    """Bytes of the float32 feature rows kept in memory while the router is fitted."""
    return rows * (d_base + d_mem + len(SCALARS)) * 4


def check_router_config(cfg: RouterConfig) -> RouterConfig:
    """Every flag checked, one line each, before any model loads; the defaults that depend on others
    filled in (``stride``, ``general_tokens``, ``domain_skip_tokens``). Returns the resolved config."""
    for flag, value in (("--tokens", cfg.tokens), ("--valid-tokens", cfg.valid_tokens), ("--hidden", cfg.hidden),
                        ("--epochs", cfg.epochs), ("--fit-batch", cfg.fit_batch), ("--patience", cfg.patience),
                        ("--block-size", cfg.block_size), ("--batch-size", cfg.batch_size)):
        check_positive_int(value, flag)
    if cfg.general_tokens is not None:
        check_positive_int(cfg.general_tokens, "--general-tokens")
    if cfg.domain_skip_tokens is not None and (
        isinstance(cfg.domain_skip_tokens, bool)
        or not isinstance(cfg.domain_skip_tokens, int)
        or cfg.domain_skip_tokens < 0
    ):
        raise MemdecError(f"--domain-skip-tokens must be a whole number >= 0, got {cfg.domain_skip_tokens}")
    if cfg.stride is not None and not (isinstance(cfg.stride, int) and 1 <= cfg.stride <= cfg.block_size):
        raise MemdecError(f"--stride {cfg.stride} must lie between 1 and --block-size {cfg.block_size}")
    check_non_negative(cfg.general_weight, "--general-weight")
    check_device(cfg.device)
    cfg.fit_config(0.5).check()
    for flag, spec in (("--domain-corpus", cfg.domain_corpus), ("--general", cfg.general), ("--valid", cfg.valid)):
        check_corpus(spec, flag)
    if cfg.general == cfg.domain_corpus:
        raise MemdecError(f"--general {cfg.general} is the domain corpus: general text must be other text")
    info = read_memdec_json(cfg.memdec)
    check_own_folder(cfg.out, "router", "checkpoint", legacy=is_unmarked_router_folder, partial=ROUTER_UNFINISHED)
    skip = cfg.domain_skip_tokens if cfg.domain_skip_tokens is not None else default_skip(info, cfg)
    return dataclasses.replace(cfg, stride=cfg.stride or max(cfg.block_size // 2, 1),
                               general_tokens=cfg.general_tokens or cfg.tokens, domain_skip_tokens=skip)


def is_unmarked_router_folder(out: Path) -> bool:
    """Whether ``out`` is a router or checkpoint folder memdec made before folder markers: its
    ``router.json`` or ``memdec.json`` is of memdec's format."""
    return holds_record(out / ROUTER_JSON, format=ROUTER_FORMAT) or holds_record(out / MEMDEC_JSON,
                                                                              format=CHECKPOINT_FORMAT)


def default_skip(info: dict, cfg: RouterConfig) -> int:
    """The tokens of ``--domain-corpus`` the decoder trained on: its datastore's token count when its
    ``memdec.json`` names this corpus (0 when it names another); one line asking for
    ``--domain-skip-tokens`` when it names this corpus but its datastore is gone."""
    corpus = info.get("corpus")
    if corpus is not None and corpus != cfg.domain_corpus:
        return 0
    datastore = info.get("datastore")
    if datastore and Path(datastore).is_dir():
        manifest = read_manifest(datastore)
        if manifest.corpus == cfg.domain_corpus:
            return manifest.n_keys + 1  # its token stream: positions plus the last token
        return 0
    if corpus is None:
        return 0
    raise MemdecError(f"{cfg.memdec}/memdec.json: the decoder trained on {corpus} but its datastore {datastore} is "
                      f"gone; give --domain-skip-tokens N (the tokens it trained on) so that the router fits on others")


@dataclass
class Rows:
    """Feature rows [N, width], each model's next-token log-prob [N], of one token stream."""

    features: torch.Tensor
    lp_base: torch.Tensor
    lp_mem: torch.Tensor

    def __len__(self) -> int:
        return len(self.lp_base)


def collect_rows(joint: MemoryDecoderModel, tokens: np.ndarray, cfg: RouterConfig, device: str, prefix: int | None,
                 desc: str) -> Rows:
    """Score ``tokens`` once over the eval windows (``score_tokens``), keeping every position's row."""
    feats, lp_base, lp_mem = [], [], []

    def scorer(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, lp_b, lp_m, _ = joint.router_rows(input_ids, targets)
        feats.append(rows.reshape(-1, rows.shape[-1]).float().cpu())
        lp_base.append(lp_b.reshape(-1).float().cpu())
        lp_mem.append(lp_m.reshape(-1).float().cpu())
        return lp_m

    nll, _ = score_tokens(scorer, tokens, cfg.block_size, cfg.stride, cfg.batch_size, device, desc=desc, prefix=prefix)
    out = Rows(torch.cat(feats), torch.cat(lp_base), torch.cat(lp_mem))
    if not np.array_equal(-out.lp_mem.numpy(), nll):  # the rows are in position order
        raise AssertionError(f"{desc}: the router's rows are not in position order")
    return out


def domain_tokens(cfg: RouterConfig, tokenizer) -> np.ndarray:
    """``--tokens`` tokens of ``--domain-corpus`` after the first ``--domain-skip-tokens``."""
    skip = cfg.domain_skip_tokens
    stream = load_token_stream(cfg.domain_corpus, tokenizer, skip + cfg.tokens, cfg.text_field)[skip:]
    if len(stream) < 2:
        raise MemdecError(f"--domain-corpus {cfg.domain_corpus}: nothing is left after --domain-skip-tokens {skip} "
                          f"(the decoder trained on those); give a larger corpus or a smaller skip")
    return stream


def valid_report(rows: Rows, router, lmbda: float, corpus: str) -> dict:
    """Perplexity on the validation rows of the base, the fixed λ and the router; the router's mean λ_t."""
    nll_base = -rows.lp_base.double()
    fixed = -torch.logaddexp(rows.lp_base.double() + (math.log1p(-lmbda) if lmbda < 1 else -math.inf),
                             rows.lp_mem.double() + (math.log(lmbda) if lmbda > 0 else -math.inf))
    routed = evaluate_router(
        router, rows.features, rows.lp_base, rows.lp_mem, torch.zeros(len(rows), dtype=torch.bool), 0.0
    )
    return {"corpus": corpus, "tokens": len(rows), "base_ppl": round(math.exp(float(nll_base.mean())), 4),
            "fixed_lambda": lmbda, "fixed_ppl": round(math.exp(float(fixed.mean())), 4),
            "router_ppl": round(math.exp(routed["nll"]), 4), "router_mean_lambda": round(routed["mean_lambda"], 4)}


def train_router(cfg: RouterConfig, log=print) -> dict:
    """Fit and save a router; returns the ``router.json`` written. Everything is checked first."""
    cfg = check_router_config(cfg)
    device = resolve_device(cfg.device)
    base, tokenizer = load_model(cfg.model, device=device)
    check_block_size(base, cfg.block_size, cfg.model, cfg.stride)
    joint = MemoryDecoderModel.from_pretrained(base, cfg.memdec, tokenizer=tokenizer, auto_router=False)
    streams = {"domain": domain_tokens(cfg, tokenizer),
               "general": load_token_stream(cfg.general, tokenizer, cfg.general_tokens, cfg.text_field),
               "valid": load_token_stream(cfg.valid, tokenizer, cfg.valid_tokens, cfg.text_field)}
    d_base = base.config.get_text_config().hidden_size
    d_mem = joint.memdec.config.get_text_config().hidden_size
    n_rows = sum(len(s) - 1 for s in streams.values())
    log(f"router rows: {n_rows} positions x {d_base + d_mem + len(SCALARS)} features = "
        f"{feature_bytes(n_rows, d_base, d_mem) / 2**20:.1f} MiB (float32)")
    t0 = time.perf_counter()
    rows = {name: collect_rows(joint, tokens, cfg, device, bos_prefix(tokenizer), f"router rows ({name})")
            for name, tokens in streams.items()}
    seconds_rows = time.perf_counter() - t0
    spec = RouterFeatures(d_base, d_mem)
    fit_rows = [rows["domain"], rows["general"]]
    is_general = torch.cat([torch.zeros(len(rows["domain"]), dtype=torch.bool),
                            torch.ones(len(rows["general"]), dtype=torch.bool)])
    t1 = time.perf_counter()
    router, stats = fit_router(torch.cat([r.features for r in fit_rows]), torch.cat([r.lp_base for r in fit_rows]),
                               torch.cat([r.lp_mem for r in fit_rows]), is_general, cfg.fit_config(joint.lmbda), spec)
    stats.update(rows_seconds=round(seconds_rows, 1), fit_seconds=round(time.perf_counter() - t1, 1),
                 domain_skip_tokens=cfg.domain_skip_tokens, domain_rows=len(rows["domain"]))
    valid = valid_report(rows["valid"], router, joint.lmbda, cfg.valid)
    info = {"base_model": cfg.model, "base_fingerprint": base_fingerprint(cfg.model),
            "tokenizer_hash": tokenizer_fingerprint(tokenizer), "decoder": str(Path(cfg.memdec).expanduser().resolve()),
            "decoder_fingerprint": decoder_fingerprint(cfg.memdec), "fixed_lambda": joint.lmbda,
            "temperature": joint.temperature,
            "train_config": {**fit_config_record(cfg.fit_config(joint.lmbda)), **_corpora(cfg)},
            "train_stats": stats, "valid": valid}
    mark_own_folder(cfg.out, "checkpoint" if holds_record(Path(cfg.out) / MEMDEC_JSON, format=CHECKPOINT_FORMAT)
                    else "router")  # first; a checkpoint folder keeps its kind
    save_router(router, cfg.out, info)
    return {**info, "out": str(cfg.out)}


def _corpora(cfg: RouterConfig) -> dict:
    return {"domain_corpus": cfg.domain_corpus, "domain_skip_tokens": cfg.domain_skip_tokens, "tokens": cfg.tokens,
            "general": cfg.general, "general_tokens": cfg.general_tokens, "valid": cfg.valid,
            "valid_tokens": cfg.valid_tokens, "block_size": cfg.block_size, "stride": cfg.stride}


def format_router_summary(info: dict) -> str:
    """What ``memdec router`` prints: the validation perplexities and where the router went."""
    v, s = info["valid"], info["train_stats"]
    verdict = "beats" if v["router_ppl"] < v["fixed_ppl"] else "does NOT beat"
    held = s["held_best"]
    lines = [
        f"router fitted on {s['domain_rows']} domain + {s['general_rows']} general positions "
        f"(held out {s['held_rows']}; best epoch {s['best_epoch']}; mean λ_t held-out domain "
        f"{held.get('domain_mean_lambda', float('nan')):.3f}, general "
        f"{held.get('general_mean_lambda', float('nan')):.3f})",
        f"{v['tokens']} positions of {v['corpus']}: base ppl {v['base_ppl']:.3f}, fixed λ={v['fixed_lambda']:.2f} "
        f"{v['fixed_ppl']:.3f}, router {v['router_ppl']:.3f} (mean λ_t {v['router_mean_lambda']:.3f}): the router "
        f"{verdict} the fixed λ",
        f"router: {info['out']}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Many domains: ``memdec router --domains``

HELD_FRACTION = 0.1  # the last tenth of each corpus's tokens: the held-out windows


@dataclass
class DomainRouterConfig:
    memdec: list[str] = option("a domain's memory decoder, NAME=CKPT", action="append")
    domain_corpus: list[str] = option("a domain's text, NAME=SPEC (one per --memdec NAME)", action="append")
    out: str = option("domain router folder (domains.safetensors + domains.json): new, empty or a domain router's")
    model: str = option("base model spec", DEFAULT_MODEL)
    general: str = option("text no decoder should answer: the 'none' class (the base alone)", "general:train")
    windows: int = option("training windows per class (and a tenth as many held out, at least 1)", 256)
    window_tokens: int = option("longest window in tokens (lengths are drawn from a quarter of it up to it, as prompts "
                                "vary)", 64)
    max_tokens: int = option("tokens read of each corpus (the last tenth: held out)", 65536)
    hidden: int = option("0: a linear classifier; else the MLP's hidden width", 0)
    epochs: int = option("full-batch passes (early stopping may end sooner)", 300)
    lr: float = option("AdamW learning rate", 1e-2)
    weight_decay: float = option("AdamW weight decay", 1e-3)
    patience: int = option("epochs without a better held-out loss before stopping", 30)
    batch_size: int = option("windows per forward pass of the base", 16)
    seed: int = option("random seed (windows and fit)", 0)
    device: str = option("auto, cpu or cuda", "auto")
    text_field: str = option("JSONL / dataset field that holds the text", "text")

    def fit_config(self) -> DomainFitConfig:
        return DomainFitConfig(hidden=self.hidden, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                               patience=self.patience, seed=self.seed)


def parse_named(spec: str, flag: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (name, value); one line for a missing name or value, or a name that is not plain."""
    name, sep, value = str(spec).partition("=")
    if not sep or not name or not value:
        raise MemdecError(f"{flag} {spec!r}: give NAME=VALUE")
    check_model_name(name, f"{flag} {spec!r}: the name")
    if name == NO_DOMAIN:
        raise MemdecError(f"{flag} {spec!r}: the name {NO_DOMAIN!r} is the base alone; give the domain another name")
    return name, value


def check_domain_config(cfg: DomainRouterConfig) -> tuple[dict[str, str], dict[str, str], dict[str, dict]]:
    """Every flag, every corpus and every ``memdec.json`` checked before any model loads. Returns
    ({name: checkpoint}, {name: corpus spec}, {name: memdec.json}), in the order of ``--memdec``."""
    for flag, value in (("--windows", cfg.windows), ("--window-tokens", cfg.window_tokens),
                        ("--max-tokens", cfg.max_tokens), ("--batch-size", cfg.batch_size)):
        check_positive_int(value, flag)
    if cfg.window_tokens < 4:
        raise MemdecError(f"--window-tokens must be at least 4, got {cfg.window_tokens}")
    check_device(cfg.device)
    cfg.fit_config().check()
    ckpts = dict(parse_named(s, "--memdec") for s in cfg.memdec or [])
    corpora = dict(parse_named(s, "--domain-corpus") for s in cfg.domain_corpus or [])
    if len(ckpts) != len(cfg.memdec or []) or len(corpora) != len(cfg.domain_corpus or []):
        raise MemdecError("each domain name may be given once in --memdec and once in --domain-corpus")
    if not ckpts:
        raise MemdecError("give at least one domain: --memdec NAME=CKPT with --domain-corpus NAME=SPEC")
    if set(ckpts) != set(corpora):
        missing = sorted(set(ckpts) ^ set(corpora))
        raise MemdecError(f"every domain needs both --memdec NAME=CKPT and --domain-corpus NAME=SPEC; {missing[0]!r} "
                          f"has only one")
    for name, spec in corpora.items():
        check_corpus(spec, f"--domain-corpus {name}")
        if spec == cfg.general:
            raise MemdecError(f"--general {cfg.general} is domain {name}'s corpus: general text must be other text")
    check_corpus(cfg.general, "--general")
    infos = {name: read_memdec_json(ckpt) for name, ckpt in ckpts.items()}
    check_own_folder(cfg.out, "domain-router", partial=DOMAIN_ROUTER_UNFINISHED,
                     legacy=lambda out: holds_record(out / DOMAIN_ROUTER_JSON, format=DOMAIN_ROUTER_FORMAT))
    return ckpts, {name: corpora[name] for name in ckpts}, infos


def random_windows(tokens: np.ndarray, n: int, longest: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` windows of ``tokens`` at random starts, of random lengths in [longest // 4, longest]."""
    longest = min(longest, len(tokens))
    shortest = max(2, min(longest, longest // 4))
    out = []
    for _ in range(n):
        length = int(rng.integers(shortest, longest + 1))
        start = int(rng.integers(0, len(tokens) - length + 1))
        out.append(tokens[start : start + length])
    return out


def pooled_windows(base, windows: list[np.ndarray], batch_size: int, device, prefix: int | None) -> torch.Tensor:
    """``pooled_states`` of each window [N, d] (right-padded batches; ``prefix`` in front of each when the
    tokenizer puts BOS before every text), float32 on the CPU."""
    out = []
    for s in range(0, len(windows), batch_size):
        part = [([prefix] if prefix is not None else []) + w.tolist() for w in windows[s : s + batch_size]]
        width = max(len(w) for w in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for i, w in enumerate(part):
            ids[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        out.append(pooled_states(base, ids.to(device), mask.to(device)).cpu())
    return torch.cat(out)


def class_windows(stream: np.ndarray, cfg: DomainRouterConfig, rng: np.random.Generator, what: str):
    """(training windows, held-out windows) of one class's token stream: the held-out ones from its last tenth."""
    cut = int(len(stream) * (1 - HELD_FRACTION))
    if cut < 8 or len(stream) - cut < 8:
        raise MemdecError(f"{what}: {len(stream)} tokens are too few for training and held-out windows; "
                          f"give a larger corpus or --max-tokens")
    held_n = max(1, cfg.windows // 10)
    return (random_windows(stream[:cut], cfg.windows, cfg.window_tokens, rng),
            random_windows(stream[cut:], held_n, cfg.window_tokens, rng))


def train_domain_router(cfg: DomainRouterConfig, log=print) -> dict:
    """Fit and save a domain router; returns the ``domains.json`` written (with ``out``). Everything is
    checked first; only the base model runs."""
    ckpts, corpora, infos = check_domain_config(cfg)
    device = resolve_device(cfg.device)
    base, tokenizer = load_model(cfg.model, device=device)
    for name, ckpt in ckpts.items():
        check_checkpoint_tokenizer(tokenizer, infos[name], f"memory decoder {name} ({ckpt})")
    classes = [NO_DOMAIN, *ckpts]
    specs = {NO_DOMAIN: cfg.general, **corpora}
    rng = np.random.default_rng(cfg.seed)
    train_x, train_y, held_x, held_y = [], [], [], []
    t0 = time.perf_counter()
    for label, name in enumerate(classes):
        stream = load_token_stream(specs[name], tokenizer, cfg.max_tokens, cfg.text_field)
        train_w, held_w = class_windows(stream, cfg, rng, f"{name} ({specs[name]})")
        for windows, xs, ys in ((train_w, train_x, train_y), (held_w, held_x, held_y)):
            xs.append(pooled_windows(base, windows, cfg.batch_size, device, bos_prefix(tokenizer)))
            ys.append(torch.full((len(windows),), label, dtype=torch.long))
        log(f"domain router: {name} ({specs[name]}): {len(train_w)} + {len(held_w)} held-out windows")
    seconds_rows = time.perf_counter() - t0
    router, stats = fit_domain_router((torch.cat(train_x), torch.cat(train_y)), (torch.cat(held_x), torch.cat(held_y)),
                                      classes, cfg.fit_config())
    stats["rows_seconds"] = round(seconds_rows, 1)
    info = {"base_model": cfg.model, "base_fingerprint": base_fingerprint(cfg.model),
            "tokenizer_hash": tokenizer_fingerprint(tokenizer),
            "domains": [{"name": name, "checkpoint": str(Path(ckpt).expanduser().resolve()),
                         "decoder_fingerprint": decoder_fingerprint(ckpt), "corpus": corpora[name]}
                        for name, ckpt in ckpts.items()],
            "train_config": {**dataclasses.asdict(cfg.fit_config()), "general": cfg.general, "windows": cfg.windows,
                             "window_tokens": cfg.window_tokens, "max_tokens": cfg.max_tokens,
                             "held_fraction": HELD_FRACTION},
            "train_stats": stats, "valid": stats["held"]}
    mark_own_folder(cfg.out, "domain-router")
    save_domain_router(router, cfg.out, info)
    return {**info, "classes": classes, "out": str(cfg.out)}


def format_domain_summary(info: dict) -> str:
    """What ``memdec router --domains`` prints: held-out accuracy per class."""
    held = info["valid"]
    per = ", ".join(f"{name} {v['accuracy']:.3f} ({v['n']})" for name, v in held["per_class"].items())
    return "\n".join([f"domain router over {', '.join(info['classes'])}: held-out accuracy {held['accuracy']:.3f} "
                      f"(per class: {per}; best epoch {info['train_stats']['best_epoch']})",
                      f"domain router: {info['out']}"])
