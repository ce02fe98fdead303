"""What ``train`` trains (``Recipe``) and what it trains on (``TrainingData``, a typed record).

A recipe trains on a token stream and a typed record of where the stream came from: the
datastore's ``store.Manifest``, or, for a baseline trained on a corpus without a datastore, a
``CorpusRecord`` holding the manifest fields it has. The record names the base model and its
tokenizer, and its JSON's hash (``data_hash``) joins the run's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch

from ..checkpoint import MEMDEC_JSON, load_safetensors, write_memdec_json
from ..decoders import DecoderShape
from ..errors import MemdecError, one_line
from ..models import check_same_tokenizer, check_tokenizer, load_model, model_fingerprint, shortened_copy
from ..store import Manifest, open_datastore
from .config import TrainConfig, check_decoder_shape


@dataclass(frozen=True)
class CorpusRecord:
    """What a run trains on when there is no datastore (a baseline's ``--model M --corpus C``): the
    fields of a datastore manifest that a tokenized corpus has. ``to_json`` gives them in this order."""

    model: str  # the base model spec
    tokenizer_hash: str  # models.tokenizer_fingerprint of its tokenizer
    corpus: str
    corpus_hash: str  # data.token_stream_hash of the tokens
    max_tokens: int | None
    text_field: str | None
    n_keys: int  # positions: tokens with a successor

    def to_json(self) -> dict:
        """The record as a JSON object, key for key (its hash is the run's data hash)."""
        return asdict(self)


TrainingData: TypeAlias = Manifest | CorpusRecord  # what a recipe trains on: a datastore's manifest, or a corpus'


def data_hash(data: TrainingData) -> str:
    """The hash of what a run trains on (``datastore_manifest_hash`` in ``memdec.json``): 16 hex digits."""
    return hashlib.sha256(json.dumps(data.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def knn_teacher(data: TrainingData) -> tuple[int | None, float | None]:
    """(k, temperature) of the kNN targets the run trains on; (None, None) for a corpus or unbuilt targets."""
    if isinstance(data, CorpusRecord):
        return None, None
    return data.steps.targets.k, data.steps.targets.temperature


def init_memory_decoder(cfg: TrainConfig, data: TrainingData, device: str):
    """Build the decoder to train; its tokenizer must equal the training data's. Returns (model, tokenizer)."""
    if cfg.init is not None and cfg.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")
    spec = cfg.init or data.model  # an --init was checked before any weights loaded (Recipe.init_hash)
    model, tokenizer = load_model(spec, device="cpu", dtype=torch.float32)
    check_tokenizer(tokenizer, data.tokenizer_hash, f"--init {spec}: the training data", made_with=data.model)
    if cfg.init_layers is not None:
        model = shortened_copy(model, cfg.init_layers, cfg.layer_selection)
    model.config.use_cache = False
    return model.to(device).train(), tokenizer


class Recipe:
    """What ``train`` trains, and how it saves and reloads it: by default, the memory decoder.

    ``memdec.baselines`` subclasses it (full fine-tuning, LoRA, the α=0 decoder); the loop, the
    schedule, validation, checkpoints and resume are shared, so every recipe sees the same
    windows in the same order under the same budget.

    name: the system's name in logs. meta_file: the JSON file that commits a checkpoint (meta_files:
    all of its metadata files).
    select: the validation score that picks the best checkpoint: ``best_ppl`` (mixed with the
    base at the best λ) or ``valid_ppl_memdec`` (the trained model alone).
    """

    name = "memdec"
    meta_file = MEMDEC_JSON
    meta_files: tuple[str, ...] = (MEMDEC_JSON,)  # every metadata file a checkpoint of this recipe holds
    select = "best_ppl"

    def data(self, cfg: TrainConfig) -> tuple[np.ndarray, TrainingData]:
        """The training token stream, int32 [N+1], and the record naming its base model and tokenizer
        (the datastore's manifest)."""
        store = open_datastore(cfg.datastore)
        return np.asarray(store.tokens), store.manifest

    def run_options(self, cfg: TrainConfig) -> dict:
        """The recipe's own options beyond ``cfg`` (a transfer's source and new rows), by the name
        ``memdec.json``'s ``train_config`` records them under: they join the run's fingerprint and that
        record, over ``cfg``'s fields of the same name. None for ``memdec train``."""
        return {}

    def init_model(self, cfg: TrainConfig, data: TrainingData):
        """(model, tokenizer): the model to train, fp32 on CPU, in train mode."""
        return init_memory_decoder(cfg, data, "cpu")

    def init_hash(self, cfg: TrainConfig, data: TrainingData) -> str | None:
        """``model_fingerprint`` of ``--init`` (None without it), its tokenizer checked first: one
        clear line, before any weights load, if it does not share the training data's. The hash
        joins the run's fingerprint, so a resume starts from the same weights."""
        spec = cfg.init
        if spec is None:
            return None
        check_same_tokenizer(spec, data.tokenizer_hash, f"--init {spec}: the training data", made_with=data.model)
        return model_fingerprint(spec)

    def decoder_shape(self, cfg: TrainConfig, data: TrainingData) -> DecoderShape:
        """The shape of the decoder to train (``--decoder``), checked against the base model's config
        before any weights load (``check_decoder_shape``)."""
        return check_decoder_shape(cfg.decoder, data.model, cfg.init, cfg.init_layers)

    def load_weights(self, model, folder: Path) -> None:
        """Load into ``model`` the weights that a save wrote to ``folder`` (to resume)."""
        sd = load_safetensors(folder / "model.safetensors")
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # a tensor of another shape
            raise MemdecError(f"{folder / 'model.safetensors'}: the saved weights do not fit the model "
                              f"({one_line(exc)})") from None
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise MemdecError(f"{folder}: the saved weights do not fit the model ({missing[:3]} {unexpected[:3]})")
        model.tie_weights()

    def write_meta(self, folder: Path, info: dict) -> None:
        """Write the checkpoint's metadata; written last, it commits the checkpoint."""
        write_memdec_json(folder, info)
