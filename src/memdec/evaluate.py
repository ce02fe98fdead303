"""``memdec eval``: perplexity of every system over the same tokens, with the same sliding windows.

Rows: the base model; base + kNN-LM (``--knn``, real retrieval); base + memory decoder
(``--memdec``); the baselines (``--baseline``: ce-decoder mixed like a memory decoder, dapt and
lora alone). ``run_eval_report`` runs three steps: ``load_inputs`` (models, checkpoints and token
streams, all checked before any scoring), ``score_systems`` (each system's per-token NLL on the
test, validation and general streams) and ``build_rows`` (λ chosen on validation, the rows and
their budget columns). Each mixture's per-token log-probs are computed once; mixing at any λ is
then an elementwise operation (``memdec.scoring``). A NaN per-token score (or an infinite one from a
model; a kNN distribution may give a token none) stops the evaluation with one line naming the system
and the corpus, and so does a row whose perplexity is not finite: no row, curve or report holds one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .baselines import check_baseline, load_baseline, method_names
from .checkpoint import apply_run, read_router_json
from .checks import check_device, check_lambda, check_positive_int, check_temperature, check_writable_path
from .data import check_corpus, load_token_stream
from .store import DEFAULT_KNN_TEMP, read_manifest, recorded_k
from .errors import MemdecError
from .files import atomic_write
from .joint import MemoryDecoderModel, attach_router
from .knnlm import KnnRetriever, choose_temperature_and_lambda, knn_pass, temperature_grid
from .knowledge import memory_token_stream, recurring_positions
from .models import (DEFAULT_MODEL, bos_prefix, check_block_size, check_same_tokenizer, load_model, model_fingerprint,
                     resolve_device, tokenizer_fingerprint)
from .options import help_of, option
from .scoring import (LAMBDA_GRID, Scorer, base_scorer, check_finite_scores, lambda_curve, mean_ppl, mix_nll,
                      score_tokens)
from .eval_results import (PPL, EvalReport, ResultRow, check_eval_json, format_table, make_row,  # noqa: F401
                           read_eval_json, write_report_json)  # noqa: F401 - the eval JSON contract, re-exported


@dataclass
class EvalConfig:
    model: str | None = option("model spec: alias (smollm2-135m), local HF folder, .gguf file, or hub id", None,
                               note=f"{DEFAULT_MODEL}; not with --run, which gives its own")  # checkpoint.apply_run
    corpus: str = option("corpus spec: austen:train|valid|test, a text/JSONL file, a folder or a glob", "austen:test")
    block_size: int = option("window length in tokens", 1024)
    stride: int | None = option("new tokens scored per window; the rest is context (default: block size / 2)", None)
    max_tokens: int | None = option("score only the first N tokens of the corpus", None)
    batch_size: int = option("windows per forward pass", 1)
    device: str = option("auto, cpu or cuda", "auto")
    text_field: str = option("JSONL / dataset field that holds the text", "text")
    json: str | None = option("write the results to this JSON file", None)
    memdec: str | None = option("memory decoder checkpoint: adds the base+MemDec row", None)
    lmbda: float | None = option("mixing weight λ in [0, 1] (default: the checkpoint's recommended λ)", None,
                                 flag="--lambda")
    sweep: bool = option("choose λ on --valid over 0, 0.05, ..., 1, then report it on --corpus", False)
    valid: str | None = option("validation corpus spec for --sweep", None)
    valid_max_tokens: int | None = option("score only the first N tokens of --valid (default: --max-tokens)", None)
    plot: str | None = option("write a PNG of perplexity against λ for each mixed system", None)
    knn: str | None = option("datastore folder: adds the base+kNN-LM row (real retrieval at every position)", None)
    knn_k: int | None = option("neighbours retrieved per position by kNN-LM (default: the datastore's k)", None)
    knn_temp: float | None = option("kNN-LM temperature (default: chosen on --valid with --sweep)", None)
    run: str | None = option("a `memdec adapt` run folder, in place of --model, --memdec and --knn (and --baseline, "
                             "unless given); giving one of those three beside it is refused", None)
    baseline: list[str] | None = option("a `memdec baseline` folder: adds its row (dapt, lora alone; ce-decoder mixed "
                                        "like memdec)", None, action="append")
    general: str | None = option("general-text corpus (e.g. general:test): every row also gets its perplexity there, "
                                 "at its λ", None)
    general_max_tokens: int | None = option("score only the first N tokens of --general (default: --max-tokens)", None)
    recurring: str | None = option("a datastore folder (or corpus): also report perplexity on the names and numbers of "
                                   "--corpus that recur in it (memdec.knowledge)", None)
    router: str | None = option("a `memdec router` folder: adds the memdec+router row, the decoder mixed at the "
                                "router's λ_t per position (same tokens; on --general too); needs --memdec or --run",
                                None)


EVAL_HELP = help_of(EvalConfig)  # each option's help, by field name (declared once, on EvalConfig)


# --- the settings -----------------------------------------------------------------------------


def check_config(cfg: EvalConfig) -> None:
    """Every flag of ``memdec eval`` checked, one clear line each, before any model loads."""
    check_positive_int(cfg.block_size, "--block-size")
    if cfg.stride is not None and not (isinstance(cfg.stride, int) and 1 <= cfg.stride <= cfg.block_size):
        raise MemdecError(f"--stride {cfg.stride} must lie between 1 and --block-size {cfg.block_size}")
    check_positive_int(cfg.batch_size, "--batch-size")
    for flag, value in (("--max-tokens", cfg.max_tokens), ("--valid-max-tokens", cfg.valid_max_tokens),
                        ("--general-max-tokens", cfg.general_max_tokens)):
        if value is not None and value < 2:
            raise MemdecError(f"{flag} must be at least 2, got {value}")
    if cfg.knn_k is not None:
        check_positive_int(cfg.knn_k, "--knn-k")
    if cfg.knn_temp is not None:
        check_temperature(cfg.knn_temp, "--knn-temp")
    check_device(cfg.device)
    for flag, path in (("--json", cfg.json), ("--plot", cfg.plot)):
        if path is not None:
            check_writable_path(path, flag)  # before any model loads, not after the whole evaluation
    if cfg.recurring is not None and not Path(cfg.recurring).expanduser().exists() and ":" not in cfg.recurring:
        raise MemdecError(f"--recurring {cfg.recurring}: no such datastore folder or corpus")
    _check_mixing_flags(cfg)
    for flag, spec in (("--corpus", cfg.corpus), ("--valid", cfg.valid), ("--general", cfg.general)):
        if spec is not None:  # a missing file, a device or a FIFO: one line before any model loads
            check_corpus(spec, flag, cfg.text_field)


def _check_mixing_flags(cfg: EvalConfig) -> None:
    mixes = cfg.memdec is not None or cfg.knn is not None or bool(cfg.baseline)
    if cfg.lmbda is not None:
        check_lambda(cfg.lmbda, "--lambda")
        if cfg.sweep:
            raise MemdecError("give --lambda or --sweep, not both")
    if not mixes and (cfg.lmbda is not None or cfg.sweep or cfg.valid or cfg.plot):
        raise MemdecError("--lambda, --sweep, --valid and --plot need a system to mix in: --memdec CKPT, "
                          "--knn DATASTORE or --baseline DIR")
    if cfg.router is not None:
        if cfg.memdec is None:
            raise MemdecError("--router mixes a memory decoder at λ_t: give --memdec CKPT (or --run RUN) beside it")
        read_router_json(cfg.router)  # its record, before any model loads; its weights once they have
    if cfg.knn is None and (cfg.knn_k is not None or cfg.knn_temp is not None):
        raise MemdecError("--knn-k and --knn-temp need --knn DATASTORE")
    if cfg.sweep and not cfg.valid:
        raise MemdecError("--sweep chooses λ on a validation corpus: give --valid CORPUS (never the test corpus)")
    if cfg.valid and not cfg.sweep:
        raise MemdecError("--valid is only used by --sweep")


def prepare_config(cfg: EvalConfig) -> EvalConfig:
    """The run folder applied, every flag checked, and the defaults that depend on others filled in."""
    cfg = apply_run(cfg)
    check_config(cfg)
    if cfg.stride is None:
        cfg = dataclasses.replace(cfg, stride=max(cfg.block_size // 2, 1))
    if cfg.knn is not None and cfg.knn_k is None:
        cfg = dataclasses.replace(cfg, knn_k=recorded_k(cfg.knn))
    return cfg


# --- load -------------------------------------------------------------------------------------


@dataclass
class EvalInputs:
    """Everything ``score_systems`` needs, loaded and checked: the base model, the memory decoder
    (a MemoryDecoderModel around the base, or None), the baseline folders in row order, and the
    token streams (``test``; ``valid`` with --sweep; ``general`` with --general)."""

    model: object
    tokenizer: object
    device: str
    prefix: int | None  # the token put in front of every window (models.bos_prefix)
    joint: MemoryDecoderModel | None
    baselines: list[str]
    streams: dict[str, np.ndarray | None]


def load_inputs(cfg: EvalConfig) -> EvalInputs:
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device)
    check_block_size(model, cfg.block_size, cfg.model, cfg.stride)
    joint = MemoryDecoderModel.from_pretrained(model, cfg.memdec, tokenizer=tokenizer) if cfg.memdec else None
    baselines = _check_baselines(cfg, tokenizer)

    def stream(spec: str | None, max_tokens: int | None) -> np.ndarray | None:
        return None if spec is None else load_token_stream(spec, tokenizer, max_tokens, cfg.text_field)

    pick = lambda given: given if given is not None else cfg.max_tokens  # noqa: E731
    streams = {"test": stream(cfg.corpus, cfg.max_tokens),
               "valid": stream(cfg.valid, pick(cfg.valid_max_tokens)) if cfg.sweep else None,
               "general": stream(cfg.general, pick(cfg.general_max_tokens))}
    return EvalInputs(model, tokenizer, device, bos_prefix(tokenizer), joint, baselines, streams)


def _check_baselines(cfg: EvalConfig, tokenizer) -> list[str]:
    """The --baseline folders in row order, each checked (format, tokenizer, base model) before any scoring."""
    by_method: dict[str, str] = {}
    for path in cfg.baseline or []:
        method = check_baseline(path, cfg.model, tokenizer)["method"]
        if method in by_method:
            raise MemdecError(f"two --baseline folders of method {method} ({by_method[method]}, {path}); "
                              f"give one per method")
        by_method[method] = path
    return [by_method[m] for m in method_names() if m in by_method]


# --- score ------------------------------------------------------------------------------------


@dataclass
class Mixture:
    """A system that mixes the base model with a second distribution, scored token by token.

    ``nll[stream]`` [N] is -log p_other(token) on each stream (None where not scored),
    ``seconds`` the time on the test stream: of the second model alone (the mixture's speed then also
    counts the base model's), or of both models where ``includes_base`` (a decoder on the base's
    shared trunk, scored in one pass with it).
    """

    system: str  # "memdec" | "knn-lm" | "ce-decoder"
    model: str
    nll: dict[str, np.ndarray | None]
    seconds: float
    default_lambda: float | None = None
    extra: dict = field(default_factory=dict)  # more keys for the row, e.g. the kNN temperature
    # The second distribution gives probability 0 to what it did not retrieve (kNN-LM): alone (λ = 1) it has
    # an infinite perplexity on any text with a token it missed, so a sweep never picks λ = 1 for it.
    sparse_support: bool = False
    includes_base: bool = False

    def joint_seconds(self, seconds_base: float) -> float:
        """Seconds of the mixture (base and second model) on the test stream."""
        return self.seconds if self.includes_base else seconds_base + self.seconds


@dataclass
class Standalone:
    """A system scored on its own, in place of the base model (dapt, lora)."""

    system: str
    model: str
    nll: dict[str, np.ndarray | None]
    seconds: float
    extra: dict = field(default_factory=dict)


@dataclass
class Scored:
    """Per-token NLLs of every system: ``base[stream]``, the mixtures' and the standalone systems'."""

    base: dict[str, np.ndarray | None]
    seconds_base: float
    mixtures: list[Mixture] = field(default_factory=list)
    alone: list[Standalone] = field(default_factory=list)


def score_systems(cfg: EvalConfig, inputs: EvalInputs) -> Scored:
    """Score the base model and each system asked for on the same windows of every stream."""
    if cfg.knn is not None:  # the base pass also records every position's neighbours
        scored = _score_base_with_knn(cfg, inputs)
    else:
        base, seconds = _score_each(cfg, inputs, base_scorer(inputs.model), "base")
        scored = Scored(base, seconds)
    if inputs.joint is not None:
        scored.mixtures.append(_score_memdec(cfg, inputs, "memdec", cfg.memdec, inputs.joint))
    if cfg.router is not None:
        scored.alone.append(_score_router(cfg, inputs))
    for path in inputs.baselines:
        loaded = load_baseline(path, cfg.model, inputs.model, inputs.tokenizer)
        if not loaded.alone:  # mixed with the base like a memory decoder (ce-decoder)
            scored.mixtures.append(_score_memdec(cfg, inputs, loaded.row_label, path, loaded.model, loaded.budget()))
        else:
            nll, seconds = _score_each(cfg, inputs, base_scorer(loaded.model), loaded.row_label,
                                       streams=("test", "general"))
            scored.alone.append(Standalone(loaded.row_label, path, nll, seconds, extra=loaded.budget()))
        del loaded
    return scored


def _score_each(cfg, inputs: EvalInputs, scorer, desc: str, streams=("test", "valid", "general")):
    """({stream: nll or None}, seconds on the test stream) of one scorer."""
    nll, seconds = {}, 0.0
    for name in ("test", "valid", "general"):
        tokens = inputs.streams[name] if name in streams else None
        if tokens is None:
            nll[name] = None
            continue
        label = desc if name == "test" else f"{desc} ({name})"
        scores, took = score_tokens(scorer, tokens, cfg.block_size, cfg.stride, cfg.batch_size, inputs.device,
                                    desc=label, prefix=inputs.prefix)
        nll[name] = check_finite_scores(scores, _scored(cfg, desc, name))
        seconds = took if name == "test" else seconds
    return nll, seconds


STREAM_FLAGS = {"test": "--corpus", "valid": "--valid", "general": "--general"}


def _scored(cfg: EvalConfig, system: str, stream: str) -> str:
    """``system`` on one stream, for a message: "memdec on --valid austen:valid"."""
    spec = {"test": cfg.corpus, "valid": cfg.valid, "general": cfg.general}[stream]
    return f"{system} on {STREAM_FLAGS[stream]} {spec}"


def _score_base_with_knn(cfg: EvalConfig, inputs: EvalInputs) -> Scored:
    """One pass per stream gives the base NLL and every position's neighbours; T is chosen on valid."""
    retriever = KnnRetriever(cfg.knn, k=cfg.knn_k, tokenizer=inputs.tokenizer)
    key_model = _load_key_model(retriever, inputs)
    passes = {name: None if tokens is None else
              knn_pass(inputs.model, retriever, tokens, cfg.block_size, cfg.stride, cfg.batch_size, inputs.device,
                       desc="base + kNN" + ("" if name == "test" else f" ({name})"), prefix=inputs.prefix,
                       key_model=key_model)
              for name, tokens in inputs.streams.items()}
    for name, p in passes.items():
        if p is not None:
            check_finite_scores(p.nll_base, _scored(cfg, "base", name))
    if cfg.knn_temp is not None:
        temp = cfg.knn_temp
    elif passes["valid"] is not None:
        temp, _, _ = choose_temperature_and_lambda(passes["valid"], LAMBDA_GRID[:-1],  # λ < 1: see sparse_support
                                                   temperature_grid(passes["valid"].dists))
        if temp is None:  # every (temperature, λ) gave NaN
            raise MemdecError(f"{_scored(cfg, 'knn-lm', 'valid')}: no temperature gives a finite perplexity (the "
                              f"neighbours' distances are not finite); no perplexity is reported")
    else:
        temp = float(retriever.store.manifest.steps.targets.temperature or DEFAULT_KNN_TEMP)
    test = passes["test"]
    extra = {"knn_temperature": round(temp, 4), "k": cfg.knn_k, "trainable_parameters": 0,
             "train_seconds": _datastore_seconds(cfg.knn, ("keys", "index"))}  # its "training" is the datastore
    knn_nll = {n: None if p is None else check_finite_scores(p.knn_nll(temp), _scored(cfg, "knn-lm", n), inf_ok=True)
               for n, p in passes.items()}  # a target no neighbour holds: inf, the mixture stays finite for λ < 1
    knn = Mixture("knn-lm", cfg.knn, knn_nll, test.seconds_search, 0.25, extra, sparse_support=True)
    base = {n: None if p is None else p.nll_base for n, p in passes.items()}
    return Scored(base, test.seconds_base, [knn])


def _load_key_model(retriever: KnnRetriever, inputs: EvalInputs):
    """The model that made the datastore's keys when it is not the base (``--key-model``), loaded
    and checked to hold the very weights recorded (tokenizer first); None for base keys."""
    recorded = retriever.key_model
    if not recorded:
        return None
    spec = recorded["spec"]
    check_same_tokenizer(spec, tokenizer_fingerprint(inputs.tokenizer), f"the key model {spec}")
    if model_fingerprint(spec) != recorded["hash"]:
        raise MemdecError(f"the key model {spec} changed since the datastore {retriever.store.path} was built "
                          f"(hash {recorded['hash']}); rebuild the datastore with memdec datastore --key-model {spec}")
    key_model, _ = load_model(spec, device=inputs.device)
    return key_model


def _score_memdec(cfg, inputs: EvalInputs, system: str, path: str, joint: MemoryDecoderModel, budget=None) -> Mixture:
    """A memory decoder (``MemoryDecoderModel``) scored alone on every stream, to be mixed with the base.
    A decoder on the base's shared trunk is scored by the joint pass (``shared_memdec_scorer``): its
    log-probs are the decoder's own, and its time is the mixture's, the trunk run once."""
    scorer = shared_memdec_scorer(joint) if joint.shares_trunk else joint.memdec_scorer()
    nll, seconds = _score_each(cfg, inputs, scorer, system)
    info = joint.memdec_info
    extra = {"trainable_parameters": info.get("trainable_parameters", info.get("n_parameters")),
             "train_seconds": info.get("train_seconds"), **(budget or {})}
    if system == "memdec":
        extra["corpus_hash"] = info.get("corpus_hash")
        if info.get("datastore"):  # the decoder's prerequisite: keys, index and kNN targets
            try:
                extra["datastore_seconds"] = _datastore_seconds(info["datastore"], ("keys", "index", "targets"))
            except MemdecError:  # the datastore has moved: the row just lacks the number
                pass
    return Mixture(system, path, nll, seconds, joint.lmbda, extra, includes_base=joint.shares_trunk)


def shared_memdec_scorer(joint: MemoryDecoderModel) -> Scorer:
    """The decoder's log-probs of the targets from one joint pass (``target_logprobs_pair``): on a
    shared trunk, the base's forward, then the decoder's own blocks; the decoder alone, as a scorer."""

    def score(input_ids, targets):
        return joint.target_logprobs_pair(input_ids, targets)[1]

    return score


ROUTER_ROW = "memdec+router"


def _score_router(cfg, inputs: EvalInputs) -> Standalone:
    """The memory decoder mixed at the router's λ_t (``memdec router``), on the test and general streams:
    a row of its own, its perplexity that of the mixture (the λ column is empty: λ varies per position)."""
    joint, info = inputs.joint, inputs.joint.memdec_info
    router = attach_router(joint, cfg.router, cfg.memdec)
    previous, joint.router = joint.router, router
    try:
        nll, seconds = _score_each(cfg, inputs, joint.routed_scorer(), ROUTER_ROW, streams=("test", "general"))
    finally:
        joint.router = previous
    recorded = read_router_json(cfg.router)
    n_router = sum(p.numel() for p in router.parameters())
    decoder = info.get("trainable_parameters", info.get("n_parameters"))
    extra = {"router_parameters": n_router, "trainable_parameters": None if decoder is None else decoder + n_router,
             "router_valid_ppl": (recorded.get("valid") or {}).get("router_ppl"),
             "fixed_valid_ppl": (recorded.get("valid") or {}).get("fixed_ppl")}
    return Standalone(ROUTER_ROW, cfg.router, nll, seconds, extra=extra)


def _datastore_seconds(path: str, steps: tuple[str, ...]) -> float | None:
    """Seconds the datastore's build ``steps`` took, from its manifest (None if not recorded)."""
    recorded = read_manifest(path).steps
    seconds = [getattr(recorded, step).seconds for step in steps]
    return None if any(x is None for x in seconds) else round(float(sum(seconds)), 1)


# --- rows -------------------------------------------------------------------------------------


def build_rows(cfg: EvalConfig, inputs: EvalInputs, scored: Scored) -> EvalReport:
    """The report's rows (base, mixtures at their λ, standalone systems) with their budget columns,
    the recurring-token column with --recurring, and the λ curves with --sweep or --plot."""
    base = scored.base
    rows = [make_row("base", cfg.model, base["test"], scored.seconds_base, trainable_parameters=0, train_seconds=0.0)]
    row_nll, curves, extra = [base["test"]], {}, {}
    for mix in scored.mixtures:
        row, nll, curve = _mixture_row(cfg, mix, base, scored.seconds_base)
        rows.append(row)
        row_nll.append(nll)
        if curve is not None:
            curves[mix.system] = curve
    for sa in scored.alone:
        rows.append(_standalone_row(sa, base))
        row_nll.append(sa.nll["test"])
    if base["valid"] is not None:
        rows[0].extra["valid_ppl"] = _finite_or_none(mean_ppl(base["valid"]))
    if base["general"] is not None:
        rows[0].extra["general_ppl"] = _finite_or_none(mean_ppl(base["general"]))
        extra["general"] = {"corpus": cfg.general, "tokens": len(base["general"])}
    for row in rows:  # the budget columns, the same for every row
        row.extra["tokens"] = len(base["test"])
        row.extra.setdefault("trainable_parameters", None)
        row.extra.setdefault("train_seconds", None)
        ratio = rows[0].tokens_per_s / row.tokens_per_s if row.tokens_per_s > 0 else None
        row.extra["inference_ratio"] = None if ratio is None else round(ratio, 3)
    if cfg.recurring:
        extra["recurring"] = _recurring_column(cfg, inputs, rows, row_nll)
    if curves:
        extra["sweep"] = {"grid": list(LAMBDA_GRID), "valid_corpus": cfg.valid, "systems": curves}
    return EvalReport(rows, len(base["test"]), extra)


def _mixture_row(cfg: EvalConfig, mix: Mixture, base: dict, seconds_base: float):
    """(row, per-token test NLL at the chosen λ, λ curve or None) of one mixture."""
    _same_tokens(mix.system, "test", mix.nll["test"], base["test"])
    extra = {"alone_ppl": _finite_or_none(mean_ppl(mix.nll["test"])), **mix.extra}
    valid_curve = None
    if cfg.sweep:
        valid_curve = lambda_curve(base["valid"], mix.nll["valid"])
        choices = valid_curve[:-1] if mix.sparse_support else valid_curve  # LAMBDA_GRID ends at 1
        lmbda = LAMBDA_GRID[int(np.argmin(choices))]
        extra.update(lambda_source="sweep", valid_ppl=_finite_or_none(float(valid_curve.min())))
    elif cfg.lmbda is not None:
        lmbda, extra["lambda_source"] = cfg.lmbda, "cli"
    else:
        lmbda, extra["lambda_source"] = mix.default_lambda, "checkpoint"
    if mix.nll["general"] is not None:
        _same_tokens(mix.system, "general", mix.nll["general"], base["general"])
        extra["general_ppl"] = _finite_or_none(mean_ppl(mix_nll(base["general"], mix.nll["general"], lmbda)))
    nll = mix_nll(base["test"], mix.nll["test"], lmbda).astype(np.float32)
    curve = None
    if cfg.sweep or cfg.plot:
        curve = {"lambda": lmbda, "test_ppl": [_finite_or_none(x) for x in lambda_curve(base["test"], mix.nll["test"])],
                 "valid_ppl": None if valid_curve is None else [_finite_or_none(x) for x in valid_curve]}
    return make_row(mix.system, mix.model, nll, mix.joint_seconds(seconds_base), lmbda, **extra), nll, curve


def _standalone_row(sa: Standalone, base: dict) -> ResultRow:
    _same_tokens(sa.system, "test", sa.nll["test"], base["test"])
    extra = dict(sa.extra)
    if sa.nll["general"] is not None:
        _same_tokens(sa.system, "general", sa.nll["general"], base["general"])
        extra["general_ppl"] = _finite_or_none(mean_ppl(sa.nll["general"]))
    return make_row(sa.system, sa.model, sa.nll["test"], sa.seconds, None, **extra)


def _recurring_column(cfg: EvalConfig, inputs: EvalInputs, rows: list[ResultRow], row_nll: list[np.ndarray]) -> dict:
    """Each row's perplexity on the test tokens of names and numbers that recur in ``cfg.recurring``."""
    memory = memory_token_stream(cfg.recurring, inputs.tokenizer)
    mask = recurring_positions(inputs.streams["test"], memory, inputs.tokenizer)
    for row, nll in zip(rows, row_nll):
        row.extra["recurring_ppl"] = _finite_or_none(mean_ppl(nll[mask])) if mask.any() else None
    return {"memory": cfg.recurring, "tokens": int(mask.sum())}


# --- the whole evaluation ---------------------------------------------------------------------


def run_eval_report(cfg: EvalConfig) -> EvalReport:
    """Score the base model, and each system asked for, on the same windows of ``cfg.corpus``.

    --sweep scores every λ of LAMBDA_GRID on --valid, keeps the best, and reports that λ on the
    test corpus. With --general, every row also gets its perplexity there, at its λ. Rows: base,
    knn-lm, memdec, then baselines (mixed ones first) in the registry's row order; each states
    ``tokens`` (equal for every row), ``trainable_parameters``, ``train_seconds`` (where known) and
    ``inference_ratio`` (base tokens/s ÷ its tokens/s).
    """
    cfg = prepare_config(cfg)
    inputs = load_inputs(cfg)
    report = build_rows(cfg, inputs, score_systems(cfg, inputs))
    if cfg.plot:
        plot_lambda_curves(cfg.plot, report.extra["sweep"]["systems"], LAMBDA_GRID, test_corpus=cfg.corpus,
                           valid_corpus=cfg.valid)
    return report


# --- helpers ---------------------------------------------------------------------------------


def _curve(values) -> np.ndarray:
    """A stored λ curve as floats, null (infinite perplexity) as inf."""
    return np.array([np.inf if v is None else v for v in values], dtype=np.float64)


def format_sweep(extra: dict) -> str:
    """One line per mixture: the λ chosen (or used) and the perplexity curve's minimum on each corpus."""
    sweep = extra.get("sweep")
    if not sweep:
        return ""
    lines = []
    for system, c in sweep["systems"].items():
        parts = [f"{system}: λ={c['lambda']:.2f}"]
        if c.get("valid_ppl") is not None:
            parts.append(f"chosen on {sweep['valid_corpus']} (valid ppl {np.min(_curve(c['valid_ppl'])):.3f})")
        test = _curve(c["test_ppl"])
        best = int(np.argmin(test))
        parts.append(f"test-oracle λ={sweep['grid'][best]:.2f} (ppl {test[best]:.3f}, not used)")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def plot_lambda_curves(path: str | os.PathLike, curves: dict, grid, test_corpus: str, valid_corpus: str | None) -> None:
    """A PNG of perplexity against λ: one colour per system, solid on test, dashed on valid."""
    import matplotlib  # optional and heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (system, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(grid, _curve(c["test_ppl"]), "-o", ms=3, color=color, label=f"{system}, test ({test_corpus})")
        if c.get("valid_ppl") is not None:
            ax.plot(grid, _curve(c["valid_ppl"]), "--", color=color, label=f"{system}, valid ({valid_corpus})")
        ax.axvline(c["lambda"], color=color, lw=0.8, alpha=0.6)
    # λ near 1 can be orders of magnitude worse (an untrained decoder alone): keep the useful range
    values = [v for c in curves.values() for key in ("test_ppl", "valid_ppl") for v in (c.get(key) or [])
              if v is not None]
    base_ppl = max(c["test_ppl"][0] for c in curves.values())
    top = 2.5 * base_ppl
    if max(values) > top:
        ax.set_ylim(0.95 * min(values), top)
        ax.text(0.99, 0.98, "clipped above", transform=ax.transAxes, ha="right", va="top", fontsize=7, alpha=0.7)
    ax.axhline(base_ppl, color="gray", ls=":", lw=1, label="base model (test)")
    ax.set_xlabel("λ (weight of the second system)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity against λ (λ=0: base model alone)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # the temporary name has no .png suffix
    finally:
        plt.close(fig)


def _finite_or_none(x: float, digits: int = 4) -> float | None:
    """JSON has no infinity: a perplexity of inf (a target the kNN never saw, at λ=1) becomes null."""
    return round(float(x), digits) if math.isfinite(x) else None


def _same_tokens(system: str, what: str, nll: np.ndarray, reference: np.ndarray) -> None:
    """Every system is scored on exactly the base model's positions; a mismatch is a harness bug."""
    if len(nll) != len(reference):
        raise AssertionError(f"{system} scored {len(nll)} {what} tokens, the base model {len(reference)}")
