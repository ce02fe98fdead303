"""``Trainer``: one resumable training run (plan, resume, step, validate, save), and ``train``.

The loop, the schedule, validation, checkpoints and resume are shared by every ``Recipe``, so each
sees the same windows in the same order under the same budget. A non-finite loss or gradient stops
the run before the update, and no non-finite weight is saved.
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from ..checks import mark_own_folder
from ..errors import MemdecError
from ..files import read_json_object, remove_interrupted_writes
from ..models import bos_prefix, resolve_device, vocab_rows
from ..store import open_datastore
from .config import TrainConfig, check_config
from .log import RunLog
from .plan import RunPlan, run_fingerprint
from .recipe import Recipe, data_hash, knn_teacher
from .resume import RunFolder, check_out_folder, load_resumed, load_step_weights
from .save import SAVE_PREFIX, CheckpointWriter
from .state import TrainerState
from .step import DecoderLoss, load_teacher_base, make_optimizer
from .validate import Validator
from .windows import collate, micro_batch_starts


class Trainer:
    """One training run, resumable: ``Trainer(cfg, recipe).run()`` returns the checkpoint folder.

    Plan (``RunPlan``: windows, steps), resume (``RunFolder``: the newest complete step of ``CKPT/trainer_state``),
    step (micro-batches, a finite-loss check, clipping, the update; the loss: ``DecoderLoss``), validate
    (``Validator``) and save (``CheckpointWriter``: the best checkpoint in ``CKPT/``, the resumable state in
    ``TrainerState``). ``on_step(step, record)`` runs after every optimizer step; ``on_save(event, step)`` at each
    point of a save (``rng``, ``weights``, ``optimizer``, ``state``, ``renamed``: tests interrupt there).
    """

    def __init__(self, cfg: TrainConfig, recipe: Recipe | None = None, on_step=None, on_save=None):
        check_config(cfg)
        self.cfg, self.recipe, self.on_step, self.on_save = cfg, recipe or Recipe(), on_step, on_save
        self.out = Path(cfg.out).expanduser()
        check_out_folder(self.out, self.recipe, cfg.datastore)
        self.state = TrainerState(self.out)
        self.tokens, self.data = self.recipe.data(cfg)  # int32 [N+1]; a Manifest or a CorpusRecord
        self.shape = self.recipe.decoder_shape(cfg, self.data)  # checked before any weights load
        self.own_only = not self.shape.full_model  # steps and checkpoints hold the own tensors only
        self.targets = open_datastore(cfg.datastore).load_targets() if cfg.alpha > 0 else None
        self.manifest_hash = data_hash(self.data)
        self.init_hash = self.recipe.init_hash(cfg, self.data)
        own = self.recipe.run_options(cfg)  # a recipe's own options (a transfer's source): in both below
        self.options = {**asdict(cfg), **own}  # memdec.json's train_config
        self.fingerprint = run_fingerprint(cfg, self.manifest_hash, self.init_hash, self.shape.lr_scale, own)
        self.device = resolve_device(cfg.device)
        self.cpu = not self.device.startswith("cuda")
        self.accelerator = Accelerator(cpu=self.cpu, mixed_precision="no" if self.cpu else "bf16",
                                       gradient_accumulation_steps=1)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        plan = RunPlan.of(cfg, len(self.tokens) - 1, self.world)
        self.block, self.starts, self.windows_per_step = plan.block, plan.starts, plan.windows_per_step
        self.total_steps = plan.total_steps
        self.previous = RunFolder(self.out, self.state, self.recipe, self.fingerprint, self.total_steps, cfg.resume,
                                  cfg.patience, self.rank).previous()

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> Path:
        """Train (or take up) the run; returns the checkpoint folder."""
        if self.accelerator.is_main_process:  # saves killed mid-way (SIGKILL) left these; --out is memdec's
            remove_interrupted_writes(self.out, SAVE_PREFIX)
        if self.previous is not None and self.previous["folder"] is None:  # a finished run of an older memdec
            return self.out
        set_seed(self.cfg.seed)
        self._build_model()
        start_step, self.best = 0, None
        if self.previous:
            load_resumed(self.previous, self.optimizer, self.scheduler, self.state.dir)
            start_step, self.best = self.previous["step"], self.previous.get("best")
        self.saved_step = start_step
        self.seconds_before = float(self.previous.get("seconds", 0.0)) if self.previous else 0.0
        self.teacher_base = load_teacher_base(self.cfg, self.data.model, str(self.accelerator.device))
        self.loss = DecoderLoss(self.cfg, self.accelerator, self.model, self.unwrapped, self.teacher_base,
                                self.tokens[:16], self.prefix)
        self.validator = None
        if self.cfg.valid and self.accelerator.is_main_process:
            self.validator = Validator(self.cfg, self.data.model, self.tokenizer, self.accelerator.device.type)
        self.info = self._info()
        self._open_log(start_step)
        self._loop(start_step)
        return self.out

    def _build_model(self) -> None:
        """The model to train (the recipe's; built into its shape), its resumed weights, the optimizer and
        schedule, prepared by the accelerator; the checkpoint writer for its tokenizer."""
        model, self.tokenizer = self.recipe.init_model(self.cfg, self.data)
        if self.own_only:  # the base itself: the shape shares what it shares and copies the rest
            model = self.shape.build(model)
            model.config.use_cache = False
            model.train()
        self.prefix = bos_prefix(self.tokenizer)
        if self.targets is not None:
            self.targets.check_vocab(vocab_rows(model), self.cfg.datastore)
        if self.previous:
            load_step_weights(model, self.previous["folder"], self.recipe, self.shape, self.own_only, self.state.dir)
        optimizer, scheduler = make_optimizer(model, self.cfg, self.shape.lr_scale, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.writer = CheckpointWriter(self.out, self.recipe, self.shape, self.own_only, self.cfg.save_dtype,
                                       self.tokenizer, self.state, self.accelerator, self.on_save)

    def _info(self) -> dict:
        """What ``memdec.json`` (or the recipe's metadata) says of the run, before its scores."""
        cfg, data, model = self.cfg, self.data, self.unwrapped
        k, knn_temperature = knn_teacher(data)
        made = f"first {cfg.init_layers} blocks" if cfg.init_layers else \
            "full copy" if self.shape.full_model else self.shape.spec
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "base_model": data.model, "tokenizer_hash": data.tokenizer_hash,
            "datastore": str(Path(cfg.datastore).resolve()) if cfg.datastore else None,
            "datastore_manifest_hash": self.manifest_hash,
            "corpus": data.corpus, "corpus_hash": data.corpus_hash,
            "k": k, "knn_temperature": knn_temperature,
            "alpha": cfg.alpha, "teacher_base_weight": cfg.teacher_base_weight,
            "init": self.options["init"] or f"{data.model} ({made})",
            **({"init_hash": self.init_hash} if self.init_hash else {}),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "world_size": self.world, "run_fingerprint": self.fingerprint,
        }

    def train_seconds(self) -> float:
        """Wall time of the loop (validation and saves included), over every call that resumed it."""
        return self.seconds_before + time.perf_counter() - self.t_start

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self, start_step: int) -> None:
        acc = self.accelerator
        bar = tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step",
                   disable=not acc.is_main_process)
        self.t_start, tokens_done = time.perf_counter(), 0
        self.model.train()
        stopped = None
        for step in range(start_step, self.total_steps):
            if self._patience_spent(step):  # a resumed run that had already stopped early
                stopped = step
                break
            record = self._step(step)
            tokens_done += self.windows_per_step * self.block
            record["tokens_per_s"] = tokens_done / (time.perf_counter() - self.t_start)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}", ce=f"{record['ce']:.3f}",
                            lr=f"{record['lr']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if self._after_step(step + 1, record, bar):
                stopped = step + 1
            if self.on_step is not None:
                self.on_step(step + 1, record)
            if stopped is not None:
                break
        bar.close()
        self._finish(start_step, stopped)

    def _after_step(self, step: int, record: dict, bar) -> bool:
        """Validate, log and save after optimizer step ``step`` as the settings say; True where the run
        stops early there (``--patience``)."""
        cfg, acc = self.cfg, self.accelerator
        done, stopped = step == self.total_steps, False
        if self.validator is not None and (step % cfg.eval_every == 0 or done):
            self._validate(step, record, bar)
            if not done and self._patience_spent(step):
                done, stopped = True, True
                record["stopped_early"] = True
                bar.write(f"step {step}: no better checkpoint in {cfg.patience} validations "
                          f"(best: step {self.best['step']}): stopping early")
        if step % cfg.log_every == 0 or "best_ppl" in record or done:
            self.log.write(record)
        if step % cfg.save_every == 0 or done:
            acc.wait_for_everyone()
            if self.validator is None and acc.is_main_process:
                self._save_best(record)
            self._save_state(step)
        return stopped

    def _finish(self, start_step: int, stopped: int | None) -> None:
        """The whole loop's time (not the best step's) in the metadata; ``trainer_state/`` dropped unless
        ``--keep-trainer-state`` (recorded first: a rerun of this very run then knows it is done)."""
        cfg, acc = self.cfg, self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process and start_step < self.total_steps:
            meta = read_json_object(self.out / self.recipe.meta_file, self.recipe.meta_file)
            extra = {"stopped_early_at": stopped} if stopped is not None else {}
            if not cfg.keep_trainer_state:
                extra["dropped_trainer_state_at"] = self.saved_step
            self.recipe.write_meta(self.out, {**meta, "train_seconds": round(self.train_seconds(), 1), **extra})
            if not cfg.keep_trainer_state:
                shutil.rmtree(self.state.dir)
        acc.wait_for_everyone()

    def _patience_spent(self, step: int) -> bool:
        """Early stopping: ``--patience`` validations since the best one (a function of the step and
        the best step alone, so a resumed run stops where the straight one did)."""
        cfg = self.cfg
        if cfg.patience is None or self.validator is None or self.best is None:
            return False
        return step - self.best["step"] >= cfg.patience * cfg.eval_every

    def _step(self, step: int) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; MemdecError (before the update) if
        the loss or the gradient norm is not finite on any process."""
        cfg, acc, n_micro = self.cfg, self.accelerator, self.cfg.grad_accum
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
        for micro in range(n_micro):
            starts = micro_batch_starts(self.starts, cfg.seed, step * n_micro + micro, cfg.batch_size, self.rank,
                                        self.world)
            batch = collate(self.tokens, self.targets, starts, self.block, cfg.alpha > 0)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = micro == n_micro - 1
            with acc.no_sync(self.model) if (not sync and self.world > 1) else nullcontext():
                loss, kl, ce = self.loss(batch)
                acc.backward(loss / n_micro)
            for key, value in (("loss", loss), ("kl", kl), ("ce", ce)):
                sums[key] += value.item() / n_micro
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        bad = torch.tensor(float(not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm))), device=acc.device)
        if self.world > 1:
            bad = acc.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise MemdecError(
                f"step {step + 1}: the loss ({sums['loss']:.4g}) or the gradient norm ({grad_norm:.4g}) is not "
                f"finite; stopped before the update. The last good checkpoint is step {self.saved_step} in "
                f"{self.state.dir}. Lower --lr, or check the datastore's targets")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step + 1, **sums, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}

    def _validate(self, step: int, record: dict, bar) -> None:
        scores = self.validator(self.unwrapped)
        record.update(scores)
        select = self.recipe.select
        if self.best is None or scores[select] < self.best[select]:
            self.best = {"step": step, **scores}
            self._save_best(record)
        bar.write(f"step {step}: valid ppl base {scores['valid_ppl_base']:.2f}, {self.recipe.name} "
                  f"{scores['valid_ppl_memdec']:.2f}, joint {scores['best_ppl']:.2f} "
                  f"at lambda {scores['best_lambda']:g}")

    # -- saving and the log ------------------------------------------------------------------

    def _save_best(self, record: dict) -> None:
        """The best checkpoint, in ``CKPT/`` itself: its metadata files go first and come back last,
        so the folder is a loadable checkpoint exactly when they are there."""
        if not self.accelerator.is_main_process:
            return
        decoder = self.writer.replace_weights(self.unwrapped, f"{self.out} (step {record['step']})")
        self.recipe.write_meta(self.out, {**self.info, **decoder, "lambda": record.get("best_lambda", 0.5),
                                          "train_seconds": round(self.train_seconds(), 1),
                                          "train_stats": record, "train_config": self.options})

    def _save_state(self, step: int) -> None:
        """The resumable step ``step`` in ``trainer_state/`` (``CheckpointWriter.save_step``)."""
        def state_record() -> dict:
            return {"total_steps": self.total_steps, "run_fingerprint": self.fingerprint, "recipe": self.recipe.name,
                    "best": self.best, "seconds": round(self.train_seconds(), 3)}

        if self.writer.save_step(step, self.unwrapped, self.optimizer, self.scheduler, state_record):
            self.saved_step = step

    def _open_log(self, start_step: int) -> None:
        """``log.jsonl`` of this run (``RunLog``), once the folder is marked as memdec's and this run's."""
        main = self.accelerator.is_main_process
        if main:
            mark_own_folder(self.out, "checkpoint")  # first: the marker says the folder is memdec's
            self.state.dir.mkdir(parents=True, exist_ok=True)  # from here on the folder is this run's
        self.log = RunLog(self.out, main)
        self.log.open(start_step)


def train(cfg: TrainConfig, on_step=None, recipe: Recipe | None = None, on_save=None) -> Path:
    """Train a memory decoder (or what ``recipe`` says); returns the checkpoint folder.

    Resumes from the newest complete step in ``CKPT/trainer_state``. ``on_step(step, record)``
    is called after every optimizer step, ``on_save(event, step)`` inside each save (tests).
    """
    return Trainer(cfg, recipe, on_step=on_step, on_save=on_save).run()
