"""Perplexity of every system over the same tokens, with the same sliding windows.

A *scorer* is any callable ``scorer(input_ids, targets) -> logprobs`` where ``input_ids`` is a
LongTensor [B, L], ``targets`` a LongTensor [B, n] holding the next tokens of the last ``n``
input positions, and ``logprobs`` a float tensor [B, n] of log p(target). The harness feeds the
same windows to every scorer, so their rows compare token for token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import check_lambda, check_positive_int, check_temperature
from .data import sliding_windows
from .errors import MemdecError
from .files import atomic_write_text

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without materialising the log-softmax.

    logits: [..., V]; targets: [...] long. Returns float32 [...].
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def causal_lm_logits(model, input_ids: torch.Tensor, n_keep: int, **kwargs) -> torch.Tensor:
    """Logits [B, n_keep, V] of the last ``n_keep`` positions only: the LM head skips the rest."""
    try:
        out = model(input_ids=input_ids, logits_to_keep=n_keep, use_cache=False, **kwargs)
    except TypeError:  # a model class without logits_to_keep
        out = model(input_ids=input_ids, use_cache=False, **kwargs)
    return out.logits[:, -n_keep:]


def base_scorer(model) -> Scorer:
    """Scorer for a plain causal LM."""

    @torch.inference_mode()
    def score(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return target_logprobs(causal_lm_logits(model, input_ids, targets.shape[1]), targets)

    return score


def _batches(windows: np.ndarray, batch_size: int):
    """Group consecutive windows of equal shape (length, scored count) into batches."""
    batch: list[np.ndarray] = []
    for w in windows:
        shape = (w[1] - w[0], w[1] - w[2])
        if batch and (len(batch) == batch_size or (batch[0][1] - batch[0][0], batch[0][1] - batch[0][2]) != shape):
            yield np.stack(batch)
            batch = []
        batch.append(w)
    if batch:
        yield np.stack(batch)


def score_tokens(
    scorer: Scorer,
    tokens: np.ndarray,
    block_size: int,
    stride: int,
    batch_size: int = 1,
    device: str = "cpu",
    desc: str = "scoring",
    progress: bool = True,
) -> tuple[np.ndarray, float]:
    """Negative log-likelihood of every position of a token stream.

    tokens: int array [N]. Returns (nll float32 [N-1], seconds), where nll[p] = -log p(tokens[p+1]).
    """
    windows = sliding_windows(len(tokens), block_size, stride)
    nll = np.empty(len(tokens) - 1, dtype=np.float32)
    stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    t0 = time.perf_counter()
    with tqdm(total=len(nll), desc=desc, unit="tok", disable=not progress, leave=False) as bar:
        for batch in _batches(windows, batch_size):
            start, end, score_start = batch[:, 0], batch[:, 1], batch[:, 2]
            n_keep = int(end[0] - score_start[0])
            length = int(end[0] - start[0])
            idx = torch.as_tensor(start)[:, None] + torch.arange(length + 1)[None, :]
            chunk = stream[idx]  # [B, L+1]
            input_ids = chunk[:, :-1].to(device)
            targets = chunk[:, -n_keep:].to(device)
            logprobs = scorer(input_ids, targets).float().cpu().numpy()
            for row, s in enumerate(score_start):
                nll[s : s + n_keep] = -logprobs[row]
            bar.update(n_keep * len(batch))
    return nll, time.perf_counter() - t0


@dataclass
class ResultRow:
    """One system's score on one corpus; the JSON contract of ``memdec eval``."""

    system: str  # "base" | "knn-lm" | "memdec" | baselines
    model: str
    nll: float
    ppl: float
    tokens_per_s: float
    extra: dict = field(default_factory=dict)
    lambda_: float | None = None

    def to_json(self) -> dict:
        row = {
            "system": self.system,
            "model": self.model,
            "lambda": self.lambda_,
            "nll": round(self.nll, 6),
            "ppl": round(self.ppl, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }
        row.update(self.extra)
        return row


def make_row(system: str, model: str, nll: np.ndarray, seconds: float, lmbda: float | None = None, **extra) -> ResultRow:
    mean = float(np.mean(nll, dtype=np.float64))
    return ResultRow(system, model, mean, math.exp(mean), len(nll) / max(seconds, 1e-9), extra, lmbda)


def write_report_json(path: str | os.PathLike, corpus: str, n_tokens: int, rows: list[ResultRow], **extra) -> None:
    """Write the eval JSON atomically: {"tokens", "corpus", "results": [...]}."""
    payload = {"tokens": n_tokens, "corpus": corpus, **extra, "results": [r.to_json() for r in rows]}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: list[ResultRow], n_tokens: int, corpus: str, general: str | None = None) -> str:
    """The rows as a terminal table; the general-corpus column when any row has ``general_ppl``."""
    with_general = any("general_ppl" in r.extra for r in rows)
    with_recurring = any("recurring_ppl" in r.extra for r in rows)
    lines = [f"{n_tokens} tokens of {corpus}" + (f"; general: {general}" if general and with_general else ""),
             f"{'system':<12} {'lambda':>7} {'nll':>8} {'ppl':>10}" + (f" {'general ppl':>11}" if with_general else "")
             + (f" {'recurring':>10}" if with_recurring else "")
             + f" {'tok/s':>9} {'x base':>7} {'trainable':>11} {'train s':>8}  model"]
    for r in rows:
        lam = "-" if r.lambda_ is None else f"{r.lambda_:.2f}"
        gen = f" {_fmt(r.extra.get('general_ppl'), '.3f'):>11}" if with_general else ""
        gen += f" {_fmt(r.extra.get('recurring_ppl'), '.3f'):>10}" if with_recurring else ""
        lines.append(f"{r.system:<12} {lam:>7} {r.nll:>8.4f} {r.ppl:>10.3f}{gen} {r.tokens_per_s:>9.1f} "
                     f"{_fmt(r.extra.get('inference_ratio'), '.2f'):>7} {_fmt(r.extra.get('trainable_parameters'), ','):>11} "
                     f"{_fmt(r.extra.get('train_seconds'), '.1f'):>8}  {r.model}")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    corpus: str = "austen:test"
    block_size: int = 1024
    stride: int | None = None  # default: block_size // 2
    max_tokens: int | None = None
    batch_size: int = 1
    device: str = "auto"
    text_field: str = "text"
    json: str | None = None
    memdec: str | None = None  # a memory decoder checkpoint: adds the "memdec" row
    lmbda: float | None = field(default=None, metadata={"flag": "--lambda"})  # else the checkpoint's, or --sweep
    sweep: bool = False  # choose λ on --valid over LAMBDA_GRID, report on --corpus
    valid: str | None = None
    valid_max_tokens: int | None = None  # default: --max-tokens
    plot: str | None = None  # PNG of perplexity against λ
    knn: str | None = None  # a datastore: adds the "knn-lm" row (real retrieval at inference)
    knn_k: int | None = None  # default: the k of the datastore's targets
    knn_temp: float | None = None  # default: chosen with --sweep, else the datastore's target temperature
    run: str | None = None  # a `memdec adapt` run folder: gives --model, --memdec and --knn
    baseline: list[str] | None = field(default=None, metadata={"action": "append"})  # `memdec baseline` folders
    general: str | None = None  # a general-text corpus: every row gains its perplexity there (forgetting)
    general_max_tokens: int | None = None  # default: --max-tokens
    recurring: str | None = None  # a datastore (or corpus): report ppl on the names and numbers it shares with --corpus


def check_block_size(model, block_size: int, spec: str, stride: int | None = None) -> None:
    from .errors import MemdecError
    from .models import max_context

    if stride is not None and not 1 <= stride <= block_size:
        raise MemdecError(f"--stride {stride} must lie between 1 and --block-size {block_size}")
    ctx = max_context(model)
    if ctx is not None and block_size > ctx:
        raise MemdecError(f"{spec}: --block-size {block_size} is larger than the model's context of {ctx} tokens")


LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1


@dataclass
class EvalReport:
    """What one ``memdec eval`` run found: the rows, plus the λ curves when a mixture was scored."""

    rows: list[ResultRow]
    n_tokens: int
    extra: dict = field(default_factory=dict)  # top-level JSON keys beside "results"


@dataclass
class Mixture:
    """A system that mixes the base model with a second distribution, scored token by token.

    ``nll`` [N] is -log p_other(token) on the test tokens, ``seconds`` the time to compute it
    (the mixture's speed also counts the base model's forward); ``nll_valid`` the same on --valid.
    """

    system: str  # "memdec" | "knn-lm"
    model: str
    nll: np.ndarray
    seconds: float
    default_lambda: float | None = None
    nll_valid: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # more keys for the row, e.g. the kNN temperature
    nll_general: np.ndarray | None = None  # -log p_other on the --general tokens


@dataclass
class Standalone:
    """A system scored on its own, in place of the base model (dapt, lora): ``nll`` [N] on the
    test tokens in ``seconds``, ``nll_general`` on the --general tokens."""

    system: str
    model: str
    nll: np.ndarray
    seconds: float
    nll_general: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def mix_nll(nll_base: np.ndarray, nll_other: np.ndarray, lmbda: float) -> np.ndarray:
    """Per-token NLL of the mixture, from the two per-token NLLs [N] (float64)."""
    return -mix_logprobs(-np.asarray(nll_base, np.float64), -np.asarray(nll_other, np.float64), lmbda)


def lambda_curve(nll_base: np.ndarray, nll_other: np.ndarray, grid=LAMBDA_GRID) -> np.ndarray:
    """Perplexity of the mixture at each λ of ``grid``: float64 [len(grid)]."""
    return np.array([math.exp(float(np.mean(mix_nll(nll_base, nll_other, lam)))) for lam in grid])


def run_eval(cfg: EvalConfig) -> tuple[list[ResultRow], int]:
    """Score every system on a corpus. Returns (rows, number of scored tokens)."""
    report = run_eval_report(cfg)
    return report.rows, report.n_tokens


def _check_eval_flags(cfg: EvalConfig) -> None:
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
    for flag, path in (("--json", cfg.json), ("--plot", cfg.plot)):
        if path is not None and Path(path).is_dir():
            raise MemdecError(f"{flag} {path} is a folder; give a file name")
    if cfg.recurring is not None and not Path(cfg.recurring).expanduser().exists() and ":" not in cfg.recurring:
        raise MemdecError(f"--recurring {cfg.recurring}: no such datastore folder or corpus")
    mixes = cfg.memdec is not None or cfg.knn is not None or bool(cfg.baseline)
    if cfg.lmbda is not None:
        check_lambda(cfg.lmbda, "--lambda")
        if cfg.sweep:
            raise MemdecError("give --lambda or --sweep, not both")
    if not mixes and (cfg.lmbda is not None or cfg.sweep or cfg.valid or cfg.plot):
        raise MemdecError("--lambda, --sweep, --valid and --plot need a system to mix in: --memdec CKPT, --knn DATASTORE "
                          "or --baseline DIR")
    if cfg.knn is None and (cfg.knn_k is not None or cfg.knn_temp is not None):
        raise MemdecError("--knn-k and --knn-temp need --knn DATASTORE")
    if cfg.sweep and not cfg.valid:
        raise MemdecError("--sweep chooses λ on a validation corpus: give --valid CORPUS (never the test corpus)")
    if cfg.valid and not cfg.sweep:
        raise MemdecError("--valid is only used by --sweep")


def _finite_or_none(x: float, digits: int = 4) -> float | None:
    """JSON has no infinity: a perplexity of inf (a target the kNN never saw, at λ=1) becomes null."""
    return round(float(x), digits) if math.isfinite(x) else None


def _mean_ppl(nll: np.ndarray) -> float:
    return math.exp(float(np.mean(nll, dtype=np.float64)))


def _same_tokens(system: str, what: str, nll: np.ndarray, reference: np.ndarray) -> None:
    """Every system is scored on exactly the base model's positions; a mismatch is a harness bug."""
    if len(nll) != len(reference):
        raise AssertionError(f"{system} scored {len(nll)} {what} tokens, the base model {len(reference)}")


def _datastore_seconds(path: str, steps: tuple[str, ...]) -> float | None:
    """Seconds the datastore's build ``steps`` took, from its manifest (None if not recorded)."""
    from .datastore import read_manifest

    recorded = read_manifest(path).get("steps", {})
    seconds = [recorded.get(step, {}).get("seconds") for step in steps]
    return None if any(x is None for x in seconds) else round(float(sum(seconds)), 1)


def run_eval_report(cfg: EvalConfig) -> EvalReport:
    """Score the base model, and each system asked for, on the same windows of ``cfg.corpus``.

    Each mixture's per-token log-probs are computed once; mixing at any λ is then a cheap
    elementwise operation, so --sweep scores every λ of LAMBDA_GRID on --valid, keeps the best,
    and reports that λ on the test corpus. Systems scored alone (dapt, lora baselines) see the
    same windows. With --general, every row also gets its perplexity on that corpus, at its λ.

    Rows: base, knn-lm, memdec, then baselines in ``baselines.METHODS`` order. Each row states
    ``tokens`` (equal for every row), ``trainable_parameters``, ``train_seconds`` (where known) and
    ``inference_ratio`` (base tokens/s ÷ its tokens/s).
    """
    from .data import load_token_stream
    from .models import load_model, resolve_device

    if cfg.run is not None:
        from .adapt import apply_run

        cfg = apply_run(cfg)
    _check_eval_flags(cfg)
    if cfg.stride is None:
        cfg = dataclasses.replace(cfg, stride=max(cfg.block_size // 2, 1))
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device)
    check_block_size(model, cfg.block_size, cfg.model, cfg.stride)
    joint = None
    if cfg.memdec is not None:  # load (and check) before any scoring
        from .joint import MemoryDecoderModel

        joint = MemoryDecoderModel.from_pretrained(model, cfg.memdec, tokenizer=tokenizer)
    baseline_infos = _check_baselines(cfg, tokenizer)
    tokens = load_token_stream(cfg.corpus, tokenizer, cfg.max_tokens, cfg.text_field)
    valid_tokens = cfg.valid_max_tokens if cfg.valid_max_tokens is not None else cfg.max_tokens
    valid = load_token_stream(cfg.valid, tokenizer, valid_tokens, cfg.text_field) if cfg.sweep else None
    general_tokens = cfg.general_max_tokens if cfg.general_max_tokens is not None else cfg.max_tokens
    general = load_token_stream(cfg.general, tokenizer, general_tokens, cfg.text_field) if cfg.general else None

    def score(scorer: Scorer, toks: np.ndarray | None, desc: str) -> tuple[np.ndarray | None, float]:
        if toks is None:
            return None, 0.0
        return score_tokens(scorer, toks, cfg.block_size, cfg.stride, cfg.batch_size, device, desc=desc)

    mixtures: list[Mixture] = []
    alone: list[Standalone] = []
    base_budget = {"trainable_parameters": 0, "train_seconds": 0.0}
    if cfg.knn is not None:  # the base pass also records every position's neighbours
        from .knnlm import KnnRetriever, choose_temperature_and_lambda, knn_pass, temperature_grid

        if cfg.knn_k is None:
            from .datastore import read_manifest

            cfg = dataclasses.replace(cfg, knn_k=int(read_manifest(cfg.knn)["steps"]["targets"].get("k") or 1024))
        retriever = KnnRetriever(cfg.knn, k=cfg.knn_k, tokenizer=tokenizer)

        def kpass(toks: np.ndarray, desc: str):
            return knn_pass(model, retriever, toks, cfg.block_size, cfg.stride, cfg.batch_size, device, desc=desc)

        test_pass = kpass(tokens, "base + kNN")
        nll_base, seconds_base = test_pass.nll_base, test_pass.seconds_base
        valid_pass = kpass(valid, "base + kNN (valid)") if valid is not None else None
        nll_base_valid = valid_pass.nll_base if valid_pass is not None else None
        general_pass = kpass(general, "base + kNN (general)") if general is not None else None
        nll_base_general = general_pass.nll_base if general_pass is not None else None
        if cfg.knn_temp is not None:
            temp = cfg.knn_temp
        elif valid_pass is not None:
            temp, _, _ = choose_temperature_and_lambda(valid_pass, LAMBDA_GRID, temperature_grid(valid_pass.dists))
        else:
            temp = float(retriever.store.manifest["steps"]["targets"].get("temperature") or 1.0)
        mixtures.append(Mixture("knn-lm", cfg.knn, test_pass.knn_nll(temp), test_pass.seconds_search, 0.25,
                                valid_pass.knn_nll(temp) if valid_pass is not None else None,
                                extra={"knn_temperature": round(temp, 4), "k": cfg.knn_k, "trainable_parameters": 0,
                                       # its "training" is the datastore: keys and index
                                       "train_seconds": _datastore_seconds(cfg.knn, ("keys", "index"))},
                                nll_general=general_pass.knn_nll(temp) if general_pass is not None else None))
    else:
        nll_base, seconds_base = score(base_scorer(model), tokens, "base")
        nll_base_valid = score(base_scorer(model), valid, "base (valid)")[0]
        nll_base_general = score(base_scorer(model), general, "base (general)")[0]
    rows = [make_row("base", cfg.model, nll_base, seconds_base, **base_budget)]
    row_nll = [nll_base]  # each row's per-token nll on the test corpus, for the recurring-token subset

    def add_mixture(system: str, path: str, jm) -> None:
        """Score a memory decoder (``MemoryDecoderModel`` ``jm``) on every stream, as a mixture."""
        nll, seconds = score(jm.memdec_scorer(), tokens, system)
        info = jm.memdec_info
        extra = {"trainable_parameters": info.get("trainable_parameters", info.get("n_parameters")),
                 "train_seconds": info.get("train_seconds")}
        mixtures.append(Mixture(system, path, nll, seconds, jm.lmbda, score(jm.memdec_scorer(), valid, f"{system} (valid)")[0],
                                extra=extra, nll_general=score(jm.memdec_scorer(), general, f"{system} (general)")[0]))

    if joint is not None:
        add_mixture("memdec", cfg.memdec, joint)
        mixtures[-1].extra["corpus_hash"] = joint.memdec_info.get("corpus_hash")
        if joint.memdec_info.get("datastore"):  # the decoder's prerequisite: keys, index and kNN targets
            from .errors import MemdecError

            try:
                mixtures[-1].extra["datastore_seconds"] = _datastore_seconds(joint.memdec_info["datastore"], ("keys", "index", "targets"))
            except MemdecError:  # the datastore has moved: the row just lacks the number
                pass
    for path in baseline_infos:
        from .baselines import load_baseline

        loaded = load_baseline(path, cfg.model, model, tokenizer)
        if loaded.method == "ce-decoder":
            add_mixture("ce-decoder", path, loaded.model)
            mixtures[-1].extra.update(loaded.budget())
        else:
            nll, seconds = score(base_scorer(loaded.model), tokens, loaded.method)
            alone.append(Standalone(loaded.method, path, nll, seconds, score(base_scorer(loaded.model), general,
                                                                             f"{loaded.method} (general)")[0],
                                    extra=loaded.budget()))
        del loaded

    extra: dict = {}
    curves: dict = {}
    for mix in mixtures:
        _same_tokens(mix.system, "test", mix.nll, nll_base)
        row_extra = {"alone_ppl": _finite_or_none(_mean_ppl(mix.nll)), **mix.extra}
        if cfg.sweep:
            valid_curve = lambda_curve(nll_base_valid, mix.nll_valid)
            lmbda = LAMBDA_GRID[int(np.argmin(valid_curve))]
            row_extra.update(lambda_source="sweep", valid_ppl=round(float(valid_curve.min()), 4))
        elif cfg.lmbda is not None:
            lmbda, valid_curve = cfg.lmbda, None
            row_extra["lambda_source"] = "cli"
        else:
            lmbda, valid_curve = mix.default_lambda, None
            row_extra["lambda_source"] = "checkpoint"
        if mix.nll_general is not None:
            _same_tokens(mix.system, "general", mix.nll_general, nll_base_general)
            row_extra["general_ppl"] = _finite_or_none(_mean_ppl(mix_nll(nll_base_general, mix.nll_general, lmbda)))
        row_nll.append(mix_nll(nll_base, mix.nll, lmbda).astype(np.float32))
        rows.append(make_row(mix.system, mix.model, row_nll[-1], seconds_base + mix.seconds, lmbda, **row_extra))
        if cfg.sweep or cfg.plot:
            curves[mix.system] = {
                "lambda": lmbda,
                "test_ppl": [_finite_or_none(x) for x in lambda_curve(nll_base, mix.nll)],
                "valid_ppl": None if valid_curve is None else [_finite_or_none(x) for x in valid_curve],
            }
    for sa in alone:
        _same_tokens(sa.system, "test", sa.nll, nll_base)
        row_extra = dict(sa.extra)
        if sa.nll_general is not None:
            _same_tokens(sa.system, "general", sa.nll_general, nll_base_general)
            row_extra["general_ppl"] = _finite_or_none(_mean_ppl(sa.nll_general))
        row_nll.append(sa.nll)
        rows.append(make_row(sa.system, sa.model, sa.nll, sa.seconds, None, **row_extra))
    if nll_base_valid is not None:
        rows[0].extra["valid_ppl"] = round(_mean_ppl(nll_base_valid), 4)
    if nll_base_general is not None:
        rows[0].extra["general_ppl"] = round(_mean_ppl(nll_base_general), 4)
        extra["general"] = {"corpus": cfg.general, "tokens": len(nll_base_general)}
    for row in rows:  # the budget columns, the same for every row
        row.extra["tokens"] = len(nll_base)
        row.extra.setdefault("trainable_parameters", None)
        row.extra.setdefault("train_seconds", None)
        row.extra["inference_ratio"] = round(rows[0].tokens_per_s / row.tokens_per_s, 3) if row.tokens_per_s > 0 else None
    if cfg.recurring:
        from .knowledge import memory_token_stream, recurring_positions

        mask = recurring_positions(tokens, memory_token_stream(cfg.recurring, tokenizer), tokenizer)
        extra["recurring"] = {"memory": cfg.recurring, "tokens": int(mask.sum())}
        for row, nll in zip(rows, row_nll):
            row.extra["recurring_ppl"] = _finite_or_none(_mean_ppl(nll[mask])) if mask.any() else None
    if curves:
        extra["sweep"] = {"grid": list(LAMBDA_GRID), "valid_corpus": cfg.valid, "systems": curves}
    if cfg.plot:
        plot_lambda_curves(cfg.plot, curves, LAMBDA_GRID, test_corpus=cfg.corpus, valid_corpus=cfg.valid)
    return EvalReport(rows, len(nll_base), extra)


def _check_baselines(cfg: EvalConfig, tokenizer) -> list[str]:
    """The --baseline folders in row order, each checked (format, tokenizer, base model) before any scoring."""
    from .baselines import METHODS, check_baseline
    from .errors import MemdecError

    by_method: dict[str, str] = {}
    for path in cfg.baseline or []:
        method = check_baseline(path, cfg.model, tokenizer)["method"]
        if method in by_method:
            raise MemdecError(f"two --baseline folders of method {method} ({by_method[method]}, {path}); give one per method")
        by_method[method] = path
    return [by_method[m] for m in METHODS if m in by_method]


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
    import matplotlib

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
    values = [v for c in curves.values() for key in ("test_ppl", "valid_ppl") for v in (c.get(key) or []) if v is not None]
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def mix_logprobs(logp_base, logp_mem, lmbda: float):
    """log((1-λ)·p_base + λ·p_mem) from log-probabilities, elementwise (numpy or torch).

    Works on target log-probs [..., ] as well as on full rows [..., V]; λ=0 returns logp_base
    exactly and λ=1 returns logp_mem exactly.
    """
    if not 0.0 <= lmbda <= 1.0:
        from .errors import MemdecError

        raise MemdecError(f"lambda must lie in [0, 1], got {lmbda}")
    if lmbda == 0.0:
        return logp_base
    if lmbda == 1.0:
        return logp_mem
    if isinstance(logp_base, torch.Tensor):
        return torch.logaddexp(logp_base + math.log1p(-lmbda), logp_mem + math.log(lmbda))
    return np.logaddexp(logp_base + math.log1p(-lmbda), logp_mem + math.log(lmbda))
