"""The kNN-LM baseline: real retrieval at inference (Khandelwal et al., 2020).

At every position the base model's key (the input of its last block's FFN, the same hook the
datastore used) searches the datastore's faiss index for k neighbours; their values, weighted by
softmax(−d/T), give p_kNN, and p = (1−λ)·p_base + λ·p_kNN.

- ``KnnRetriever``: the index and the values of a datastore, checked against the base model's
  tokenizer.
- ``knn_pass``: one scoring pass that yields the base model's per-token NLL *and* every
  position's neighbours, so T and λ can be swept afterwards at no extra forward cost.
- ``KnnLMLogitsProcessor``: kNN-LM inside ``generate()`` (greedy and sampling).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

from .checks import check_lambda, check_temperature
from .store import DEFAULT_K, FFNInputCapture, forward_ffn_inputs, open_datastore
from .errors import DatastoreError, MemdecError
from .index import search
from .models import check_base_identity, check_tokenizer, loaded_folder
from .scoring import causal_lm_logits, mix_logprobs, score_tokens, target_logprobs
from .targets import knn_distribution, knn_target_logprob, lookup_values


class KnnRetriever:
    """Search a datastore's index at inference.

    ``neighbours(queries)`` takes float [P, d] and returns (squared L2 distances float32 [P, k],
    neighbour values int32 [P, k], -1 where an approximate index left a slot empty).
    """

    def __init__(self, datastore: str, k: int = DEFAULT_K, nprobe: int | None = None, tokenizer=None):
        self.store = open_datastore(datastore)
        manifest = self.store.manifest
        if tokenizer is not None:
            check_tokenizer(tokenizer, manifest.tokenizer_hash, f"datastore {datastore}", made_with=manifest.model)
        if k > self.store.n_keys:
            raise DatastoreError(f"k={k} neighbours asked of a datastore with {self.store.n_keys} keys")
        self.k = k
        self.index = self.store.load_index(nprobe)
        self.values = np.ascontiguousarray(self.store.values)
        self.model = manifest.model
        self.layer = manifest.layer
        self.key_model = manifest.steps.keys.key_model  # {spec, hash}, or None: the base's keys
        self.bases_checked: set[str] = set()  # model folders check_base found to be the datastore's base

    def check_base(self, model) -> None:
        """DatastoreError unless ``model`` (loaded) is the base whose weights built this datastore, where both
        are known (``models.check_base_identity``); each model's folder is read once per retriever."""
        folder = loaded_folder(model)
        if folder is None or folder in self.bases_checked:
            return
        check_base_identity(self.store.manifest.model_hash, folder, f"datastore {self.store.path}", "built from",
                            DatastoreError)
        self.bases_checked.add(folder)

    def neighbours(self, queries: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = (
            queries.detach().float().cpu().numpy()
            if isinstance(queries, torch.Tensor)
            else np.asarray(queries, np.float32)
        )
        dists, ids = search(self.index, q, self.k)
        return dists, lookup_values(ids, self.values)


def check_same_base(retriever: KnnRetriever, model, capture_name: str, key_model_given: bool = False) -> None:
    """The keys at inference must come from the layer the datastore used, of the model that made
    its keys: a datastore keyed by another model (``--key-model``) needs that model beside the base
    (``knn_pass(key_model=...)``); ``key_model_given`` says it is ``model`` here. A datastore of the
    base's own keys must be used with the very base it was built from (``models.check_base_identity``
    on the manifest's ``model_hash``: its keys are that model's hidden states)."""
    if retriever.key_model and not key_model_given:
        raise DatastoreError(
            f"the datastore's keys come from the key model {retriever.key_model['spec']}, not from the base "
            f"{retriever.model}; kNN-LM here needs base keys (memdec eval --knn takes either)")
    if capture_name != retriever.layer:
        raise DatastoreError(
            f"the datastore's keys come from {retriever.layer} of {retriever.model}, "
            f"but this base model's hook is at {capture_name}: build the datastore with this base model"
        )
    dim = retriever.store.dim
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    if hidden is not None and hidden != dim:
        raise DatastoreError(
            f"the datastore's keys have dimension {dim}, this base model's {hidden}: another model built it"
        )
    if not retriever.key_model:
        retriever.check_base(model)


@dataclass
class KnnPass:
    """What one scoring pass over a token stream found.

    nll_base: float32 [N] base model NLL; dists: float32 [N, k]; values: int32 [N, k];
    targets: int64 [N] the next tokens; seconds_base / seconds_search: the time of each part.
    """

    nll_base: np.ndarray
    dists: np.ndarray
    values: np.ndarray
    targets: np.ndarray
    seconds_base: float
    seconds_search: float

    def knn_nll(self, temperature: float) -> np.ndarray:
        """-log p_kNN(target) of every position at temperature T: float64 [N] (inf where absent)."""
        return -knn_target_logprob(self.dists, self.values, self.targets, temperature).astype(np.float64)


def knn_pass(model, retriever: KnnRetriever, tokens: np.ndarray, block_size: int, stride: int,
             batch_size: int = 1, device: str = "cpu", desc: str = "base + kNN", progress: bool = True,
             prefix: int | None = None, key_model=None) -> KnnPass:
    """Score the base model over ``tokens`` [N+1] and search the neighbours of every position's key.

    The keys come from ``model`` itself, or, for a datastore built with ``--key-model``, from
    ``key_model`` (that model, loaded): it reads the same windows, up to its last FFN only.
    """
    found_d: list[np.ndarray] = []
    found_v: list[np.ndarray] = []
    search_s = 0.0
    keyed = model if key_model is None else key_model
    with FFNInputCapture(keyed, stop=key_model is not None) as capture:
        check_same_base(retriever, keyed, capture.name, key_model_given=key_model is not None)

        @torch.inference_mode()
        def scorer(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            nonlocal search_s
            n = targets.shape[1]
            lp = target_logprobs(causal_lm_logits(model, input_ids, n), targets)
            hidden = capture.last if key_model is None else forward_ffn_inputs(key_model, input_ids, capture)
            keys = hidden[:, -n:].reshape(-1, hidden.shape[-1])
            t0 = time.perf_counter()
            d, v = retriever.neighbours(keys)
            search_s += time.perf_counter() - t0
            found_d.append(d.reshape(len(targets), n, -1))
            found_v.append(v.reshape(len(targets), n, -1))
            return lp

        nll, seconds = score_tokens(
            scorer, tokens, block_size, stride, batch_size, device, desc=desc, progress=progress, prefix=prefix
        )
    # windows are scored in order of position, each batch's rows in order: concatenate back
    dists = np.concatenate([d.reshape(-1, d.shape[-1]) for d in found_d])
    values = np.concatenate([v.reshape(-1, v.shape[-1]) for v in found_v])
    assert len(dists) == len(nll), (len(dists), len(nll))
    return KnnPass(nll, dists, values, np.asarray(tokens[1:], dtype=np.int64), seconds - search_s, search_s)


def knn_lm_scorer(model, retriever: KnnRetriever, lmbda: float, temperature: float):
    """A scorer (see ``evaluate``) for base + kNN-LM at a fixed λ and T: retrieval at every position.

    Hooks the model for as long as the returned scorer lives; call ``scorer.close()`` to unhook.
    """
    capture = FFNInputCapture(model).__enter__()
    check_same_base(retriever, model, capture.name)

    @torch.inference_mode()
    def scorer(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = targets.shape[1]
        lp_base = target_logprobs(causal_lm_logits(model, input_ids, n), targets)
        dists, values = retriever.neighbours(capture.last[:, -n:].reshape(-1, capture.last.shape[-1]))
        lp_knn = knn_target_logprob(dists, values, targets.reshape(-1).cpu().numpy(), temperature)
        lp_knn = torch.from_numpy(lp_knn).to(lp_base.device).view_as(lp_base)
        return mix_logprobs(lp_base, lp_knn, lmbda)

    scorer.close = lambda: capture.__exit__(None, None, None)
    return scorer


def temperature_grid(dists: np.ndarray, n: int = 9) -> list[float]:
    """Candidate temperatures spanning the distance scale: from sharp (T ≈ d_1/20) to diffuse
    (T ≈ (d_k − d_1)/2), log-spaced, using the median first and last neighbour distances."""
    finite = np.where(np.isfinite(dists), dists, np.nan)
    d1, dk = float(np.nanmedian(finite[:, 0])), float(np.nanmedian(finite[:, -1]))
    lo, hi = max(d1 / 20, 1e-3), max((dk - d1) / 2, d1 / 10, 2e-3)
    return [float(x) for x in np.geomspace(lo, hi, n)]


def choose_temperature_and_lambda(valid: KnnPass, lambdas, temperatures) -> tuple[float, float, float]:
    """(T, λ, valid ppl) minimising the mixture's perplexity on the validation pass."""
    best = (math.inf, None, None)
    base_lp = -valid.nll_base.astype(np.float64)
    for t in temperatures:
        knn_lp = -valid.knn_nll(t)
        for lam in lambdas:
            if lam == 0.0:
                continue
            nll = -float(np.mean(mix_logprobs(base_lp, knn_lp, lam)))
            if nll < best[0]:
                best = (nll, t, lam)
    return best[1], best[2], math.exp(best[0])


# --------------------------------------------------------------------------------------------
# Generation


def knn_mix_rows(
    logp: torch.Tensor, dists: np.ndarray, values: np.ndarray, lmbda: float, temperature: float
) -> torch.Tensor:
    """log((1-λ)·p_base + λ·p_kNN) of full rows: logp [P, V], neighbours [P, k] -> [P, V]."""
    if lmbda == 0.0:
        return logp
    offsets, token_ids, probs = knn_distribution(dists, values, temperature)
    rows = torch.from_numpy(np.repeat(np.arange(len(logp)), np.diff(offsets))).to(logp.device)
    ids = torch.from_numpy(token_ids.astype(np.int64)).to(logp.device)
    p = torch.from_numpy(probs).to(logp.device, torch.float32)
    if lmbda == 1.0:
        out = torch.full_like(logp, -math.inf)
        out[rows, ids] = p.log()
        return out
    out = logp + math.log1p(-lmbda)
    out[rows, ids] = torch.logaddexp(out[rows, ids], p.log() + math.log(lmbda))
    return out


class KnnLMLogitsProcessor(LogitsProcessor):
    """kNN-LM in ``generate()``: greedy decoding and sampling.

        with KnnLMLogitsProcessor(base, retriever, lmbda=0.2, temperature=2.0) as proc:
            out = base.generate(**enc, logits_processor=[proc])

    While open, a hook on the base model's last FFN records each step's key; the processor
    searches the newest position's key and returns log((1−λ)·softmax(scores) + λ·p_kNN), [B, V].
    p_kNN is applied on its sparse support only. Beam search works too, since the key comes
    from the very forward that produced the scores.
    """

    def __init__(self, model, retriever: KnnRetriever, lmbda: float, temperature: float):
        self.retriever = retriever
        self.lmbda = check_lambda(lmbda)
        self.temperature = check_temperature(temperature, "the kNN temperature")
        self.capture = FFNInputCapture(model)
        check_same_base(retriever, model, self.capture.name)

    def __enter__(self) -> "KnnLMLogitsProcessor":
        self.capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.capture.__exit__(*exc)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.capture.last is None:
            raise MemdecError("KnnLMLogitsProcessor must be used inside its `with` block")
        keys = self.capture.last[:, -1]  # [B, d], the position whose next token is chosen now
        logp = torch.log_softmax(scores.float(), dim=-1)
        if self.lmbda == 0.0:
            return logp
        dists, values = self.retriever.neighbours(keys)
        return knn_mix_rows(logp, dists, values, self.lmbda, self.temperature)
