"""lm-evaluation-harness: memdec as an lm-eval model, and two tasks built from text.

- ``MemdecLM`` (registered as ``memdec`` by ``register()``): any system of memdec's table behind
  lm-eval's ``LM`` interface. ``model_args``: ``base=SPEC`` and at most one of ``memdec=CKPT``
  (with ``lmbda``, default the checkpoint's; or ``router=DIR``, a token router: λ_t per position, as
  ``eval --router``'s ``memdec+router`` row; a router in the checkpoint folder is used by default
  unless ``lmbda`` is given), ``knn=DATASTORE`` (with ``lmbda`` default 0.25,
  ``knn_k``, ``knn_temp``) or ``baseline=DIR`` (dapt, lora, ce-decoder); none of them: the base
  alone. Log-likelihoods are the system's log-probabilities of the continuation tokens, tokenized
  as lm-eval's ``hf`` model does (context + continuation encoded whole, then split); generation
  is greedy through the system's own ``generate`` (``MemoryDecoderModel.generate`` for memdec).
- ``write_facts_task``: factual recall from the user's own text (names and numbers of the
  held-out text that also occur in the training text, ``memdec.knowledge``), multiple choice.
- ``write_general_task``: general ability on text outside the domain: a LAMBADA-style last-word
  task (greedy exact match and log-likelihood) and a multiple-choice cloze on the same passages.

Each writer leaves DIR/NAME.jsonl and an lm-eval task config DIR/NAME.yaml (``dataset_path:
json``, the JSONL file by absolute path), so ``memdec lm-eval --include_path DIR --tasks NAME``
runs offline. ``lm_eval`` is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .baselines import load_baseline
from .checkpoint import read_router_json
from .checks import (check_device, check_lambda, check_own_folder, check_plain_name, check_positive_int,
                     check_seed, check_temperature, holds_record, mark_own_folder)
from .data import read_corpus, load_token_stream
from .store import DEFAULT_K, DEFAULT_KNN_TEMP, FFNInputCapture, read_manifest
from .errors import MemdecError, one_line
from .files import atomic_write_text
from .joint import MemoryDecoderModel
from .knnlm import KnnLMLogitsProcessor, KnnRetriever, check_same_base, knn_mix_rows
from .knowledge import memory_token_stream, token_classes, word_spans
from .models import DEFAULT_MODEL, load_model, load_tokenizer, max_context, resolve_device
from .options import help_of, option
from .scoring import causal_lm_logits

# --------------------------------------------------------------------------------------------
# Systems: full log-probability rows and generation, one per row of memdec's table


@dataclass
class System:
    """One scored system. ``rows(input_ids [B, L], batch [M], position [M])`` -> log-probs float32
    [M, V] of the token after ``input_ids[batch[m], position[m]]`` (right padding past a row's end is
    harmless: attention is causal); ``generator``: the causal LM whose ``generate`` continues
    prompts; ``processors``: logits processors that ``generate`` needs (kNN-LM), made fresh per call."""

    name: str
    rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    generator: Any
    processors: Callable[[], list] = list
    close: Callable[[], None] = lambda: None


def _kept(input_ids: torch.Tensor, position: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(n_keep, index): the last ``n_keep`` positions cover every wanted one, at ``index`` among them."""
    keep = input_ids.shape[1] - int(position.min())
    return keep, position - (input_ids.shape[1] - keep)


def _plain_logp(model, input_ids: torch.Tensor, batch: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    keep, index = _kept(input_ids, position)
    return F.log_softmax(causal_lm_logits(model, input_ids, keep)[batch, index].float(), dim=-1)


def _plain_system(name: str, model) -> System:
    @torch.inference_mode()
    def rows(input_ids: torch.Tensor, batch: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return _plain_logp(model, input_ids, batch, position)

    return System(name, rows, model)


def _joint_system(name: str, joint: MemoryDecoderModel) -> System:
    @torch.inference_mode()
    def rows(input_ids: torch.Tensor, batch: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        keep, index = _kept(input_ids, position)
        return joint(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits[batch, index].float()

    return System(name, rows, joint)


def _knn_system(model, tokenizer, datastore: str, lmbda: float, k: int | None, temperature: float | None) -> System:
    targets_step = read_manifest(datastore).steps.targets
    k = int(k or targets_step.k or DEFAULT_K)
    temperature = check_temperature(float(temperature or targets_step.temperature or DEFAULT_KNN_TEMP), "knn_temp")
    retriever = KnnRetriever(datastore, k=k, tokenizer=tokenizer)
    capture = FFNInputCapture(model).__enter__()
    check_same_base(retriever, model, capture.name)

    @torch.inference_mode()
    def rows(input_ids: torch.Tensor, batch: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        logp = _plain_logp(model, input_ids, batch, position)
        dists, values = retriever.neighbours(capture.last[batch, position])  # only the wanted positions
        return knn_mix_rows(logp, dists, values, lmbda, temperature)

    return System("knn-lm", rows, model, lambda: [KnnLMLogitsProcessor(model, retriever, lmbda, temperature)],
                  lambda: capture.__exit__(None, None, None))


def load_system(base: str, memdec: str | None = None, knn: str | None = None, baseline: str | None = None,
                lmbda: float | None = None, knn_k: int | None = None, knn_temp: float | None = None,
                device: str = "auto", router: str | None = None) -> tuple[System, Any]:
    """(System, tokenizer) for base alone, base+memdec (at λ, or at a token router's λ_t), base+kNN-LM or a
    baseline folder."""
    given = [name for name, v in (("memdec", memdec), ("knn", knn), ("baseline", baseline)) if v]
    if len(given) > 1:
        raise MemdecError(f"give at most one of memdec=, knn=, baseline= (got {', '.join(given)})")
    if router and not memdec:
        raise MemdecError("router= routes between the base and a memory decoder: give memdec=CKPT with it")
    if router and lmbda is not None:
        raise MemdecError("give router= (λ_t per position) or lmbda= (one fixed λ), not both")
    if router:
        read_router_json(router)
    if lmbda is not None:
        check_lambda(float(lmbda), "lmbda")
    if knn_k is not None:
        check_positive_int(int(knn_k), "knn_k")
    check_device(device, "device")
    model, tokenizer = load_model(base, device=resolve_device(device))
    if memdec:
        joint = MemoryDecoderModel.from_pretrained(model, memdec, lmbda, tokenizer=tokenizer, router=router or None)
        return _joint_system("memdec+router" if joint.router is not None else "memdec", joint), tokenizer
    if knn:
        return _knn_system(model, tokenizer, knn, 0.25 if lmbda is None else float(lmbda), knn_k, knn_temp), tokenizer
    if baseline:
        loaded = load_baseline(baseline, base, model, tokenizer)
        if not loaded.alone:  # a MemoryDecoderModel: mixed with the base at its λ (or lmbda)
            if lmbda is not None:
                loaded.model.lmbda = float(lmbda)
            return _joint_system(loaded.row_label, loaded.model), tokenizer
        return _plain_system(loaded.row_label, loaded.model), tokenizer
    return _plain_system("base", model), tokenizer


# --------------------------------------------------------------------------------------------
# The lm-eval model

_REGISTERED = False


def register() -> None:
    """Register ``MemdecLM`` with lm-eval as ``memdec`` (once; imports lm_eval)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from lm_eval.api.registry import register_model
    except ImportError:
        raise MemdecError("lm-eval is not installed: pip install 'memdec[eval]' (or lm-eval>=0.4)") from None
    register_model("memdec")(memdec_lm_class())
    _REGISTERED = True


_LM_CLASS = None


def memdec_lm_class():
    """The ``MemdecLM`` class (a subclass of lm-eval's TemplateLM, built on first use)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        from lm_eval.api.model import TemplateLM

        _LM_CLASS = type("MemdecLM", (_MemdecLMMixin, TemplateLM), {"__module__": __name__})
    return _LM_CLASS


DEFAULT_BATCH_SIZE = 16  # log-likelihood requests per forward


def batch_size_arg(value: Any) -> int:
    """lm-eval's ``batch_size``: an integer, or ``auto``/``auto:N`` (taken as ``DEFAULT_BATCH_SIZE``)."""
    text = str(value if value is not None else DEFAULT_BATCH_SIZE).strip()
    if text.startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(text)
    except ValueError:
        raise MemdecError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    return check_positive_int(size, "batch_size")


class _MemdecLMMixin:
    """lm-eval's LM interface over a ``System`` (see ``memdec_lm_class``)."""

    def __init__(self, base: str = DEFAULT_MODEL, memdec: str | None = None, knn: str | None = None,
                 baseline: str | None = None, lmbda: float | None = None, knn_k: int | None = None,
                 knn_temp: float | None = None, device: str = "auto", max_length: int | None = None,
                 max_gen_toks: int = 256, batch_size: Any = DEFAULT_BATCH_SIZE, router: str | None = None,
                 **ignored):
        super().__init__()
        self.batch_size = batch_size_arg(batch_size)  # before the model loads
        device = "auto" if device in (None, "") else str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        self.system, self.tokenizer = load_system(str(base), memdec, knn, baseline, lmbda, knn_k, knn_temp, device,
                                                  router)
        model = self.system.generator
        self._device = next(model.parameters()).device
        self._max_length = int(max_length or max_context(model) or 2048)
        self.max_gen_toks = int(max_gen_toks)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else self.eot_token_id)

    # -- tokenization, as lm-eval's hf model -------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    # -- scoring ----------------------------------------------------------------------------

    def _request(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[list[int], list[int]]:
        """(input tokens, continuation) as lm-eval's hf model: the pair cut to ``max_length`` + 1 tokens
        from the left, the last token dropped; the continuation's tokens are the last inputs' targets."""
        return (context_enc + continuation_enc)[-(self.max_length + 1):][:-1], continuation_enc

    def _score_batch(self, rows: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, is_greedy) of each continuation of each (input tokens, continuations): one
        forward, right padding. A row's continuations are the targets of its last inputs (of different
        requests whose inputs are the same: e.g. one-token choices after one context)."""
        lengths = torch.tensor([len(ids) for ids, _ in rows])
        n = torch.tensor([max(len(c) for c in conts) for _, conts in rows])  # positions scored per row
        input_ids = torch.full((len(rows), int(lengths.max())), self._pad_id, dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        batch = torch.repeat_interleave(torch.arange(len(rows)), n)  # [M]: the row of each scored position
        first = torch.cumsum(n, 0) - n  # [B]: each row's first entry among the M
        position = (
            torch.repeat_interleave(lengths - n, n) + torch.arange(int(n.sum())) - torch.repeat_interleave(first, n)
        )
        logp = self.system.rows(input_ids.to(self._device), batch.to(self._device), position.to(self._device))  # [M, V]
        # every continuation token: its entry among the M (the row's last len(c) entries) and its id
        conts = [(r, c) for r, (_, cs) in enumerate(rows) for c in cs]
        entry = torch.tensor([int(first[r] + n[r]) - len(c) + j for r, c in conts for j in range(len(c))])
        target = torch.tensor([t for _, c in conts for t in c], dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(len(conts)), torch.tensor([len(c) for _, c in conts]))
        entry, target, owner = entry.to(logp.device), target.to(logp.device), owner.to(logp.device)
        picked = logp[entry, target].double()
        total = torch.zeros(len(conts), dtype=torch.float64, device=logp.device).index_add_(0, owner, picked)
        missed = torch.zeros(len(conts), device=logp.device).index_add_(
            0, owner, (logp.argmax(-1)[entry] != target).float()
        )
        results = iter([(float(t), bool(m == 0)) for t, m in zip(total.tolist(), missed.tolist())])
        return [[next(results) for _ in cs] for _, cs in rows]

    def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        ids, cont = self._request(context_enc, continuation_enc)
        return self._score_batch([(ids, [cont])])[0][0]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Requests with the same input tokens share one row (one-token choices after one context, the
        same request of two tasks); ``batch_size`` rows per forward, longest first (similar lengths pad
        little); results in the order of ``requests``."""
        prepared = [self._request(ctx, cont) for _, ctx, cont in requests]
        same_input: dict[tuple[int, ...], list[int]] = {}
        for i, (ids, _) in enumerate(prepared):
            same_input.setdefault(tuple(ids), []).append(i)
        inputs = sorted(same_input, key=len, reverse=True)
        out: list[tuple[float, bool] | None] = [None] * len(prepared)
        with tqdm(total=len(prepared), desc=f"{self.system.name}: loglikelihood", disable=disable_tqdm,
                  leave=False) as bar:
            for start in range(0, len(inputs), self.batch_size):
                chunk = [same_input[ids] for ids in inputs[start:start + self.batch_size]]
                scored = self._score_batch([(prepared[idx[0]][0], [prepared[i][1] for i in idx]) for idx in chunk])
                for idx, results in zip(chunk, scored):
                    for i, result in zip(idx, results):
                        out[i] = result
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                    bar.update(len(idx))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        results = []
        for (string,) in [r.args for r in requests]:
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    # -- generation -------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tokenizer.decode(self.eot_token_id)
            if eos_text not in until:
                until.append(eos_text)
            max_new = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
            text = self._generate(context, max_new)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    @torch.inference_mode()
    def _generate(self, context: str, max_new_tokens: int) -> str:
        ids = self.tok_encode(context)[-max(1, self.max_length - max_new_tokens):]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        processors = self.system.processors()
        kw = {"logits_processor": processors} if processors else {}
        try:
            for p in processors:
                p.__enter__()
            gen = self.system.generator.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                                 pad_token_id=self.tokenizer.pad_token_id, **kw)
        finally:
            for p in processors:
                p.__exit__(None, None, None)
        return self.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's own command line (``lm-eval ARGS...``) with the ``memdec`` model registered."""
    register()
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        setup_logging()
        parser = HarnessCLI()
        parser.execute(parser.parse_args())
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ValueError as exc:  # lm-eval's word for a bad argument (e.g. "Tasks not found: ..."): one line
        raise MemdecError(f"lm-eval: {one_line(exc)}") from None
    finally:
        sys.argv = saved
    return 0


# --------------------------------------------------------------------------------------------
# Task files


def _yaml(config: dict, indent: int = 0) -> str:
    """A small YAML writer: nested dicts and lists of scalars/dicts; scalars as JSON (valid YAML)."""
    pad = " " * indent
    lines = []
    for key, value in config.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:\n{_yaml(value, indent + 2)}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}:")
            for item in value:
                body = _yaml(item, indent + 4).lstrip() if isinstance(item, dict) else json.dumps(item)
                lines.append(f"{pad}  - {body}")
        else:
            lines.append(f"{pad}{key}: {json.dumps(value)}")
    return "\n".join(lines)


ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}


def task_config(name: str, data_file: Path, output_type: str, **fields) -> dict:
    """An lm-eval task config that reads a local JSONL file (by absolute path) as its test split."""
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
            "test_split": "test", "output_type": output_type, **fields,
            "metadata": {"version": 1.0, "writer": "memdec.tasks"}}


TASKS_MARKER = "memdec_tasks.json"  # what marked a folder of task files as memdec's before folder markers


def write_task(out: str | Path, name: str, items: list[dict], configs: dict[str, dict]) -> list[Path]:
    """DIR/NAME.jsonl (the items) and one DIR/TASK.yaml per config; returns the YAML paths. The folder
    is marked as memdec's (``checks.mark_own_folder``) before any task file is written."""
    check_plain_name(name, "--name")
    out = mark_own_folder(Path(out), "tasks")
    atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    for task, config in configs.items():
        atomic_write_text(out / f"{task}.yaml", _yaml(config) + "\n")
    return [out / f"{task}.yaml" for task in configs]


def _mc_config(name: str, data_file: Path) -> dict:
    return task_config(name, data_file, "multiple_choice", doc_to_text="context", doc_to_choice="choices",
                       doc_to_target="label", target_delimiter="", metric_list=[ACC])


def _with_choices(
    rng: np.random.Generator, answer: str, pool: list[str], n_choices: int
) -> tuple[list[str], int] | None:
    """``n_choices`` options (the answer at a random place), or None when the pool is too small."""
    others = [w for w in pool if w != answer]
    if len(others) < n_choices - 1:
        return None
    picked = [others[i] for i in rng.choice(len(others), n_choices - 1, replace=False)]
    label = int(rng.integers(n_choices))
    return picked[:label] + [answer] + picked[label:], label


def _split_trailing_space(context: str, answer: str) -> tuple[str, str, str]:
    """(context without trailing space, leading space of the answer, the bare answer word)."""
    stripped = context.rstrip()
    lead = context[len(stripped):] + answer[: len(answer) - len(answer.lstrip())]
    return stripped, lead, answer.strip()


def _word_pool(tokens: np.ndarray, tokenizer, classes) -> tuple[set[bytes], dict[str, list[str]]]:
    """Keys (token bytes) of the names and numbers of a stream, and per kind its distinct words, most
    frequent first (words seen at least twice, or all when fewer than 20 are)."""
    starts, ends = word_spans(tokens, classes)
    keys, counts = set(), {"name": Counter(), "number": Counter()}
    stream = np.ascontiguousarray(tokens, dtype="<i4")
    for s, e in zip(starts, ends):
        keys.add(stream[s:e].tobytes())
        kind = "number" if classes.digit[stream[s]] else "name"
        counts[kind][tokenizer.decode(stream[s:e].tolist()).strip()] += 1
    pools = {}
    for kind, c in counts.items():
        words = [w for w, n in c.most_common() if w and n >= 2]
        pools[kind] = words if len(words) >= 20 else [w for w, _ in c.most_common() if w]
    return keys, pools


def _fact_candidates(held: np.ndarray, tokenizer, classes, known: set[bytes], context_tokens: int) -> list[dict]:
    """One candidate per recurring name or number of the held-out stream, deduplicated."""
    eos = tokenizer.eos_token_id
    stream = np.ascontiguousarray(held, dtype="<i4")
    seen, found = set(), []
    for s, e in zip(*word_spans(held, classes)):
        if stream[s:e].tobytes() not in known:
            continue
        ctx = stream[max(0, s - context_tokens):s]
        cut = np.flatnonzero(ctx == eos)
        ctx = ctx[cut[-1] + 1:] if len(cut) else ctx
        if len(ctx) < min(8, context_tokens):
            continue
        context, lead, word = _split_trailing_space(tokenizer.decode(ctx.tolist(), skip_special_tokens=True),
                                                    tokenizer.decode(stream[s:e].tolist()))
        if not context or (context, word) in seen:
            continue
        seen.add((context, word))
        found.append({"context": context, "lead": lead, "word": word, "position": int(s),
                      "context_start": int(s - len(ctx)), "kind": "number" if classes.digit[stream[s]] else "name"})
    return found


def write_facts_task(
    corpus: str,
    heldout: str,
    out: str | Path,
    tokenizer,
    n_items: int = 200,
    seed: int = 0,
    context_tokens: int = 64,
    n_choices: int = 4,
    max_tokens: int | None = None,
    heldout_max_tokens: int | None = None,
    name: str = "memdec_facts",
    text_field: str = "text",
) -> Path:
    """A multiple-choice factual-recall task: DIR/NAME.jsonl + DIR/NAME.yaml; returns the YAML path.

    corpus: the training text (a corpus spec or a datastore folder); heldout: the held-out text.
    Each item: ``context`` (up to ``context_tokens`` tokens before a name or number of the held-out
    text that also occurs in the training text, within one document), ``choices`` (the true
    continuation and ``n_choices - 1`` other names or numbers of the same kind from the training
    text, each with the answer's leading space), ``label``, ``answer``, ``kind``, ``source`` and
    ``position`` (the answer's first token in the held-out token stream). Deduplicated on
    (context, answer), at most ``n_items`` kept (a seeded sample, in stream order). ``text_field``:
    the JSONL / dataset field that holds the text, in both corpora.
    """
    check_positive_int(n_items, "--n-items")
    check_positive_int(context_tokens, "--context-tokens")
    if n_choices < 2:
        raise MemdecError(f"--n-choices must be at least 2, got {n_choices}")
    classes = token_classes(tokenizer)
    known, pools = _word_pool(memory_token_stream(corpus, tokenizer, max_tokens, text_field), tokenizer, classes)
    held = load_token_stream(heldout, tokenizer, heldout_max_tokens, text_field)
    rng = np.random.default_rng(seed)
    items = []
    for cand in _fact_candidates(held, tokenizer, classes, known, context_tokens):
        options = _with_choices(rng, cand["word"], pools[cand["kind"]], n_choices)
        if options is not None:
            choices = [cand["lead"] + w for w in options[0]]
            items.append({"context": cand["context"], "choices": choices, "label": options[1],
                          "answer": choices[options[1]], "kind": cand["kind"], "source": heldout,
                          "position": cand["position"], "context_start": cand["context_start"]})
    if not items:
        raise MemdecError(f"no name or number of {heldout} also occurs in {corpus}: no factual-recall item to write")
    keep = np.sort(rng.choice(len(items), min(n_items, len(items)), replace=False))
    items = [{"id": i, **items[j]} for i, j in enumerate(keep)]
    return write_task(out, name, items, {name: _mc_config(name, Path(out) / f"{name}.jsonl")})[0]


_SENTENCE = re.compile(r"[^.!?]*[.!?]")
_WORD = re.compile(r"\s([a-z]{4,})[.!?]$")


def _passages(text: str, context_words: int) -> list[tuple[str, str]]:
    """(context, last word) for each sentence of ``text`` that ends in a plain word of 4+ letters;
    the context is the text before that word, cut to about ``context_words`` words."""
    found = []
    for m in _SENTENCE.finditer(text):
        end = _WORD.search(m.group())
        if end is None:
            continue
        stop = m.start() + end.start(1)
        context = " ".join(text[:stop].split()[-context_words:])
        if len(context.split()) >= min(10, context_words):
            found.append((context, end.group(1)))
    return found


def write_general_task(corpus: str = "general:test", out: str | Path = "tasks", n_items: int = 200, seed: int = 0,
                       context_words: int = 60, n_choices: int = 4, name: str = "memdec_general",
                       text_field: str = "text") -> list[Path]:
    """General-ability tasks from text outside the domain; returns the two YAML paths.

    NAME_lambada: predict the last word of a passage (``output_type: loglikelihood``; ``acc`` is
    the greedy exact match of the whole word, ``perplexity`` from its log-likelihood).
    NAME_cloze: the same passages as multiple choice, the distractors other words of 4+ letters of
    the corpus. Items: ``context``, ``target`` (" word"), ``choices``, ``label``, ``source``, ``doc``.
    ``text_field``: the JSONL / dataset field that holds the text.
    """
    check_positive_int(n_items, "--n-items")
    check_positive_int(context_words, "--context-words")
    if n_choices < 2:
        raise MemdecError(f"--n-choices must be at least 2, got {n_choices}")
    docs = read_corpus(corpus, text_field)
    passages = [(d.source, c, w) for d in docs for c, w in _passages(d.text, context_words)]
    if not passages:
        raise MemdecError(f"{corpus}: no sentence ends in a word of 4+ letters: no passage to write")
    vocab = sorted({w for _, _, w in passages})
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(passages), min(n_items, len(passages)), replace=False))
    items = []
    for i, j in enumerate(keep):
        source, context, word = passages[j]
        options = _with_choices(rng, word, vocab, n_choices) or ([word], 0)
        items.append({"id": i, "context": context, "target": " " + word, "choices": [" " + w for w in options[0]],
                      "label": options[1], "source": source})
    data = Path(out) / f"{name}.jsonl"
    lambada = task_config(f"{name}_lambada", data, "loglikelihood", doc_to_text="context", doc_to_target="target",
                          target_delimiter="", metric_list=[
                              {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}, ACC])
    return write_task(
        out, name, items, {f"{name}_lambada": lambada, f"{name}_cloze": _mc_config(f"{name}_cloze", data)}
    )


# --------------------------------------------------------------------------------------------
# memdec tasks facts|general


@dataclass
class TasksConfig:
    kind: str = field(metadata={"positional": True})  # facts or general
    out: str = option("folder for the task files (NAME.jsonl and the lm-eval YAML configs): new, empty or one memdec "
                      "tasks wrote")
    corpus: str | None = option("facts: the training text (corpus spec or datastore folder); general: general-text "
                                "corpus (default general:test)", None)
    heldout: str | None = option("facts: the held-out text whose names and numbers become questions", None)
    model: str = option("facts: model spec whose tokenizer finds names and numbers", DEFAULT_MODEL)
    n_items: int = option("at most this many items (a seeded sample)", 200)
    seed: int = option("random seed: the sample, the distractors and the answer's place", 0)
    context_tokens: int = option("facts: tokens of context before each answer", 64)
    context_words: int = option("general: words of context before each last word", 60)
    n_choices: int = option("options per multiple-choice item", 4)
    max_tokens: int | None = option("facts: read only the first N tokens of --corpus", None)
    heldout_max_tokens: int | None = option("facts: read only the first N tokens of --heldout", None)
    name: str | None = option("task name (default memdec_facts / memdec_general)", None)
    text_field: str = option("JSONL / dataset field that holds the text (--corpus and --heldout)", "text")


TASKS_HELP = help_of(TasksConfig)  # each option's help, by field name (declared once, on TasksConfig)


def run_tasks(cfg: TasksConfig) -> list[Path]:
    """Write the task files of ``memdec tasks``; returns the YAML paths. ``--out`` must be new, empty or
    a folder of task files memdec wrote (its marker, or ``TASKS_MARKER`` before markers): checked, with
    ``--name``, before any work."""
    check_positive_int(cfg.n_items, "--n-items")
    check_seed(cfg.seed)
    if cfg.kind not in ("facts", "general"):
        raise MemdecError(f"unknown task kind {cfg.kind!r}: facts or general")
    name = check_plain_name(f"memdec_{cfg.kind}" if cfg.name is None else cfg.name, "--name")
    check_own_folder(cfg.out, "tasks", legacy=lambda out: holds_record(out / TASKS_MARKER, writer="memdec.tasks"))
    if cfg.kind == "general":
        return write_general_task(cfg.corpus or "general:test", cfg.out, cfg.n_items, cfg.seed, cfg.context_words,
                                  cfg.n_choices, name, cfg.text_field)
    if not cfg.corpus or not cfg.heldout:
        raise MemdecError("memdec tasks facts needs --corpus TRAIN and --heldout TEST")
    check_positive_int(cfg.context_tokens, "--context-tokens")
    read_corpus(cfg.heldout, cfg.text_field)  # a missing file or field is one line before the tokenizer loads
    return [write_facts_task(cfg.corpus, cfg.heldout, cfg.out, load_tokenizer(cfg.model), cfg.n_items, cfg.seed,
                             cfg.context_tokens, cfg.n_choices, cfg.max_tokens, cfg.heldout_max_tokens,
                             name, cfg.text_field)]
