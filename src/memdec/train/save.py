"""Writing a checkpoint: the best one in ``CKPT/`` itself, and the trainer steps.

Every file is written into a temporary folder and moved into place by an atomic rename
(``save_files``), so no file of a checkpoint is ever half-written. ``CheckpointWriter`` removes
the best checkpoint's metadata files before its weights change and writes them last, so ``CKPT/``
is a loadable checkpoint exactly when it holds one; a router kept beside the weights
(``WEIGHTS_DEPENDENTS``) was made for the old ones and goes with them. A trainer step is staged
whole, every process's RNG file included, and committed by one rename (``state.TrainerState``).
Nothing non-finite is ever saved (``check_finite_weights``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import DOMAIN_ROUTER_JSON, DOMAIN_ROUTER_WEIGHTS, ROUTER_JSON, ROUTER_WEIGHTS
from ..decoders import DecoderShape
from ..errors import MemdecError
from ..files import atomic_write_json, atomic_write_stream, os_errors_named
from .config import SAVE_DTYPES
from .recipe import Recipe
from .state import OWN_STEP_WEIGHTS, TrainerState, rng_state_json

# what other commands keep beside a checkpoint's weights, made for those weights: stale once they change
# (each record before its weights, as their writers commit them in the other order)
WEIGHTS_DEPENDENTS = (ROUTER_JSON, ROUTER_WEIGHTS, DOMAIN_ROUTER_JSON, DOMAIN_ROUTER_WEIGHTS)
SAVE_PREFIX = ".save."  # ``save_files``' staging folders inside a checkpoint folder


def save_model_folder(model, tokenizer, folder: Path) -> None:
    """Save an HF model folder: written whole into a temporary folder, then moved in file by file.

    Each file's move is an atomic rename, so no file of ``folder`` is ever half-written.
    """
    save_files(folder, lambda tmp: write_model_files(model, tokenizer, tmp))


def save_files(folder: Path, write) -> None:
    """``write(tmp)`` writes files into a temporary folder inside ``folder``; each is then moved into
    ``folder`` by an atomic rename, so no file of ``folder`` is ever half-written."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=SAVE_PREFIX, dir=folder))
    try:
        write(tmp)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    except OSError as exc:  # name the file the user will look for, not its temporary twin
        if exc.filename is not None and Path(exc.filename).parent == tmp:
            exc.filename = str(folder / Path(exc.filename).name)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_model_files(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of the model (with ``use_cache`` on, as users load it) and its tokenizer."""
    model.config.use_cache = True
    with os_errors_named(folder / "model.safetensors"):  # the weights: a full disk is an OSError naming them
        model.save_pretrained(folder)
    model.config.use_cache = False
    tokenizer.save_pretrained(folder)


@contextmanager
def cast_for_saving(model, names: set[str] | None, dtype: torch.dtype):
    """Within the block, ``model``'s parameters named in ``names`` (all with None) hold ``dtype``
    copies; afterwards the very tensors they held before, so training goes on unchanged."""
    params = [p for n, p in model.named_parameters() if (names is None or n in names) and p.dtype != dtype]
    kept = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in zip(params, kept):
            p.data = data


def check_finite_weights(model, what: str) -> None:
    """MemdecError unless every parameter of ``model`` is finite: nothing non-finite is ever saved."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise MemdecError(f"{what}: non-finite weights in {len(bad)} tensors ({bad[0]}, ...); nothing was saved. "
                          f"Lower --lr or --max-grad-norm, or check the datastore's targets")


class CheckpointWriter:
    """Writes one run's checkpoints into ``out``: the best one (``replace_weights``, then the recipe's
    metadata) and the resumable trainer steps (``save_step``), for every process of ``accelerator``.

    ``shape``: the decoder's shape; ``own_only``: its steps and checkpoints hold its own tensors only (a
    shape other than copy). ``on_save(event, step)`` runs at each point of a step's save (``rng``,
    ``weights``, ``optimizer``, ``state``, ``renamed``: tests interrupt there).
    """

    def __init__(self, out: Path, recipe: Recipe, shape: DecoderShape, own_only: bool, save_dtype: str,
                 tokenizer, state: TrainerState, accelerator, on_save=None):
        self.out, self.recipe, self.shape, self.own_only = out, recipe, shape, own_only
        self.dtype, self.tokenizer, self.state = SAVE_DTYPES[save_dtype], tokenizer, state
        self.accelerator, self.rank, self.on_save = accelerator, accelerator.process_index, on_save

    def _event(self, name: str, step: int) -> None:
        if self.on_save is not None:
            self.on_save(name, step)

    def replace_weights(self, model, what: str) -> dict:
        """The main process's best checkpoint in ``out``: its metadata files (and what was made for the
        old weights) go first, then the weights; the caller writes the metadata last. Returns
        ``memdec.json``'s ``decoder`` record (``{}`` for a copy). ``what`` names it in errors."""
        check_finite_weights(model, what)
        for name in (*self.recipe.meta_files, *WEIGHTS_DEPENDENTS):  # a router made for the old weights goes too
            (self.out / name).unlink(missing_ok=True)
        return self._save_decoder(model)

    def _save_decoder(self, model) -> dict:
        """The decoder's files in ``out`` (weights in ``--save-dtype``), returned as ``memdec.json``'s
        ``decoder`` record where the shape is not copy (a copy is today's full model folder)."""
        if not self.own_only:
            with cast_for_saving(model, None, self.dtype):
                save_model_folder(model, self.tokenizer, self.out)
            return {}
        record = {}

        def write(tmp: Path) -> None:
            with cast_for_saving(model, set(self.shape.own_tensors(model)), self.dtype):
                record.update(self.shape.save(model, tmp))
            self.tokenizer.save_pretrained(tmp)

        save_files(self.out, write)
        return {"decoder": record}

    def save_step(self, step: int, model, optimizer, scheduler, state_record) -> bool:
        """Stage every process's share of ``step``, then commit it with one rename (``TrainerState``).
        ``state_record()``: the fields of its ``state.json``, asked for when it is written. Returns
        whether this process committed it (the main process)."""
        acc, main = self.accelerator, self.accelerator.is_main_process
        if main:
            check_finite_weights(model, f"{self.state.dir} (step {step})")
            self.state.begin(step)
        acc.wait_for_everyone()
        stage = self.state.staging(step)
        atomic_write_json(stage / f"rng-{self.rank}.json", {"step": step, "rng": rng_state_json()})
        self._event("rng", step)
        acc.wait_for_everyone()
        if main:
            try:
                self._write_stage(stage, step, model, optimizer, scheduler, state_record)
            except OSError:  # a full disk: the staged step goes, the previous complete one stays
                shutil.rmtree(stage, ignore_errors=True)
                raise
            final = self.state.promote(step)
            self._event("renamed", step)
            self.state.clean(keep=final)
        acc.wait_for_everyone()
        return main

    def _write_stage(self, stage: Path, step: int, model, optimizer, scheduler, state_record) -> None:
        """The main process's share of a step: weights, optimizer and scheduler, then ``state.json``."""
        if self.own_only:  # the shape's own tensors, float32: the rest is the base's
            tensors = {k: v.detach().contiguous() for k, v in self.shape.own_tensors(model).items()}
            with os_errors_named(stage / OWN_STEP_WEIGHTS):
                save_file(tensors, str(stage / OWN_STEP_WEIGHTS), metadata={"format": "pt"})
        else:
            write_model_files(model, self.tokenizer, stage)
        self._event("weights", step)
        payload = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        atomic_write_stream(stage / "optimizer.pt", lambda f: torch.save(payload, f))
        self._event("optimizer", step)
        atomic_write_json(stage / "state.json", {"step": step, **state_record()})
        self._event("state", step)
