"""The registry of baseline methods: ``Method`` (what a method answers), ``BaselineRecipe`` (the
``train.Recipe`` every method shares) and ``LoadedBaseline``.

A method is one object of a ``Method`` subclass, registered by name (``register``, into ``METHODS``: a
``memdec.registry.Registry``) when its module is imported; ``memdec.baselines`` imports every module of
its package (``registry.discover``), so adding a method is one new module (and its test). A method with
flags of its own declares them as a dataclass (``Method.options``, e.g. ``lora.LoraOptions``), which
``BaselineConfig`` (``config.py``) lists among its bases. ``memdec baseline``, ``eval --baseline``, the
lm-eval model and ``memdec adapt`` only ever ask the registered method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import BASELINE_JSON, MEMDEC_JSON, write_baseline_json
from ..data import load_token_stream, token_stream_hash
from ..decoders import FULL_COPY, is_full_copy
from ..errors import MemdecError
from ..models import load_tokenizer, tokenizer_fingerprint
from ..options import since_first
from ..registry import Registry
from ..train import CorpusRecord, Recipe, TrainingData


@dataclass(frozen=True)
class Option:
    """A setting of ``memdec baseline``: a field of ``BaselineConfig`` and its flag (``lora_r`` is
    ``--lora-r``); a method's own are the fields of its ``options`` dataclass (``Method.extra_options``)."""

    name: str
    type: Any
    default: Any
    help: str


class Method:
    """One baseline method. Subclass it, set ``name`` and ``description``, and override ``load``
    (and ``recipe`` where the model is not a full copy of the base trained whole).

    - ``name``: the ``--method`` value, ``baseline.json``'s ``method`` and the adapt stage's name
      (``RUN/baselines/NAME``);
    - ``description``: its words in ``--method``'s help and in the adapt stage's line;
    - ``row_label``: the ``system`` of its row in ``memdec eval`` (default: ``name``);
    - ``order``: rows (and adapt's stages) go by ascending order, then name;
    - ``alone``: scored on its own in place of the base (its best checkpoint is the one best alone,
      ``lambda`` is null); else mixed with the base like a memory decoder (best mixed at the best λ,
      with a ``memdec.json`` beside ``baseline.json``, so it loads as a memory decoder);
    - ``takes_init``: ``--init`` / ``--init-layers`` choose its initialisation (else refused);
    - ``reuses_alpha0_decoder``: its training is exactly ``memdec train`` with α=0, so ``memdec
      adapt`` may reuse the α=0 teacher candidate rather than train it again;
    - ``options``: its own settings, a dataclass (``kw_only``, each field's help in ``metadata["help"]``)
      that ``BaselineConfig`` lists among its bases, so that readers and type checkers see its fields;
      ``extra_options`` lists them as ``Option``s.
    """

    name: str = ""
    description: str = ""
    row_label: str = ""
    order: int = 100
    alone: bool = True
    takes_init: bool = False
    reuses_alpha0_decoder: bool = False
    options: type | None = None

    @property
    def extra_options(self) -> tuple[Option, ...]:
        """The fields of ``options`` (none without), each an ``Option``."""
        if self.options is None:
            return ()
        return tuple(Option(f.name, f.type, f.default, f.metadata.get("help", ""))
                     for f in dataclasses.fields(self.options))

    def __init__(self) -> None:
        self.row_label = self.row_label or self.name

    def check(self, cfg) -> None:
        """Reject a bad value of the method's own options with one clear line (MemdecError)."""

    def recipe(self, cfg) -> Recipe:
        """The ``train.Recipe`` that trains it: by default a full copy of the base (or of ``--init``)."""
        return BaselineRecipe(self)

    def check_folder(self, path: Path) -> None:
        """More checks of a baseline folder of this method, after its ``baseline.json`` (MemdecError)."""

    def load(self, path: Path, base_spec: str, base_model, tokenizer):
        """The model to score from the folder ``path``, on ``base_model``'s device and dtype: a causal
        LM when ``alone``, else a ``joint.MemoryDecoderModel`` around ``base_model``."""
        raise NotImplementedError

    def adapt_inputs(self, s) -> dict:
        """What its ``memdec adapt`` stage depends on beyond the memory decoder's budget, from adapt's
        settings ``s`` (joins the stage's fingerprint)."""
        if not self.takes_init:
            return {}
        # --decoder came after the first version: the one rule (memdec.options.since_first) leaves the copy out
        return since_first({"init": s.init, "init_layers": s.init_layers, "decoder": s.decoder},
                           {"decoder": FULL_COPY})

    def adapt_options(self, s) -> dict:
        """``BaselineConfig`` fields its adapt stage sets over the memory decoder's ``TrainConfig``."""
        return {} if self.takes_init else {"init": None, "init_layers": None, "decoder": FULL_COPY}

    def adapt_what(self, s) -> str:
        """Its adapt stage's line."""
        return f"baseline: {self.description}, same tokens and budget"


class BaselineRecipe(Recipe):
    """``train``'s recipe for one baseline method: the training tokens (a datastore's or a corpus'),
    which validation score picks the best checkpoint, and ``baseline.json``."""

    meta_file = BASELINE_JSON

    def __init__(self, method: Method):
        self.method = method
        self.name = method.name
        self.meta_files = (BASELINE_JSON,) if method.alone else (BASELINE_JSON, MEMDEC_JSON)
        self.select = "valid_ppl_memdec" if method.alone else "best_ppl"

    def data(self, cfg) -> tuple[np.ndarray, TrainingData]:
        """A ``BaselineConfig``'s tokens, int32 [N+1], and their record: its datastore's (the manifest), or
        its corpus tokenized as ``memdec datastore`` does (a ``CorpusRecord``)."""
        if cfg.datastore is not None:
            tokens, manifest = super().data(cfg)
            if cfg.model is not None and cfg.model != manifest.model:
                raise MemdecError(f"--model {cfg.model} differs from the datastore's base model {manifest.model}")
            return tokens, manifest

        tokenizer = load_tokenizer(cfg.model)
        tokens = load_token_stream(cfg.corpus, tokenizer, cfg.max_tokens, cfg.text_field)
        record = CorpusRecord(model=cfg.model, tokenizer_hash=tokenizer_fingerprint(tokenizer), corpus=cfg.corpus,
                              corpus_hash=token_stream_hash(tokens), max_tokens=cfg.max_tokens,
                              text_field=cfg.text_field, n_keys=len(tokens) - 1)
        return tokens, record

    def decoder_shape(self, cfg, data: TrainingData):
        """A method initialised like a memory decoder (``takes_init``: ce-decoder) takes any ``--decoder``
        shape; the others train the base model itself."""
        if not self.method.takes_init and not is_full_copy(cfg.decoder):
            raise MemdecError(
                f"--decoder {cfg.decoder}: {self.name} trains the base model itself; --decoder applies to "
                f"{', '.join(m.name for m in methods() if m.takes_init)}"
            )
        return super().decoder_shape(cfg, data)

    def write_meta(self, folder: Path, info: dict) -> None:
        write_baseline_json(folder, info, self.name, mixed=not self.method.alone)


@dataclass
class LoadedBaseline:
    """A baseline ready to score: ``model`` (``Method.load``'s) and its method's ``row_label`` and
    ``alone``."""

    method: str
    path: str
    info: dict
    model: Any
    alone: bool = True
    row_label: str = ""
    extra: dict = field(default_factory=dict)  # budget columns for the row

    def budget(self) -> dict:
        return {"trainable_parameters": self.info.get("trainable_parameters"),
                "train_seconds": self.info.get("train_seconds"), "corpus_hash": self.info.get("corpus_hash")}


# --- the registry -------------------------------------------------------------------------------

METHODS: Registry[Method] = Registry("baseline method", unknown="unknown --method '{name}' (choose from: {names})",
                                     order=lambda m: (m.order, m.name))
_CONFIG: list[type] = []  # BaselineConfig, once built: a later method's options must be among its bases


def register(method: Method) -> Method:
    """Add ``method`` to ``METHODS`` (ValueError if its name is taken, or if it brings options that
    ``BaselineConfig`` does not hold: add its ``options`` class to ``BaselineConfig``'s bases)."""
    if not method.name:
        raise ValueError(f"{type(method).__name__}: a method needs a name")
    if method.name in METHODS:
        raise ValueError(f"baseline method {method.name!r} is registered already")
    if method.options is not None and _CONFIG and not issubclass(_CONFIG[0], method.options):
        raise ValueError(
            f"baseline method {method.name!r} brings options ({', '.join(o.name for o in method.extra_options)}) "
            f"that BaselineConfig does not hold: add {method.options.__name__} to its bases "
            f"(memdec/baselines/config.py)"
        )
    return METHODS.register(method)


def unregister(name: str) -> None:
    """Remove a registered method (tests register their own)."""
    METHODS.unregister(name)


def fix_options(config: type) -> None:
    """Called once with ``BaselineConfig``: every registered method's options must be among its bases
    (TypeError naming the method otherwise), and so must every later method's (``register``)."""
    missing = [m for m in methods() if m.options is not None and not issubclass(config, m.options)]
    if missing:
        raise TypeError(f"BaselineConfig lacks the options of {', '.join(m.name for m in missing)}: add "
                        f"{', '.join(m.options.__name__ for m in missing)} to its bases (memdec/baselines/config.py)")
    _CONFIG[:] = [config]


def methods() -> list[Method]:
    """Every registered method, in row order."""
    return METHODS.values()


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in row order."""
    return METHODS.names()


def get_method(name: str) -> Method:
    """The registered method called ``name``; MemdecError naming the choices if there is none."""
    return METHODS.get(name)


def method_of_row(label: str) -> Method | None:
    """The method whose rows are labelled ``label`` in ``memdec eval`` (None for base, memdec, knn-lm)."""
    return next((m for m in methods() if m.row_label == label), None)
