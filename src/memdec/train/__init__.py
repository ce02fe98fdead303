"""Train the memory decoder: sparse KL to the kNN targets plus next-token cross-entropy.

    loss = α · KL(p_kNN ‖ p_mem) + (1 − α) · CE(next token)

The kNN targets are CSR rows (see ``targets``); the KL is computed over each row's stored
support only, by gathering the decoder's log-probabilities at the stored token ids, so no
vocabulary-sized target row is ever built. Training windows are non-overlapping slices of the
datastore's token stream, aligned position for position with the CSR rows.

Output folder ``--out CKPT``:

- ``CKPT/`` itself is the best checkpoint by validation score (or the last, without ``--valid``):
  a Hugging Face model folder that ``AutoModelForCausalLM.from_pretrained`` loads, plus
  ``memdec.json``;
- ``CKPT/trainer_state/step-NNNNNNNN/``: the last saved step with optimizer, scheduler and RNG
  state, for resume; each step is staged whole and committed by one rename (``TrainerState``);
- ``CKPT/log.jsonl``: one line per logged step and per validation.

Every file is written through a temporary file and renamed into place. The best checkpoint's
``memdec.json`` is removed before its weights change and written last, so ``CKPT/`` is a loadable
checkpoint exactly when it holds one; a router kept beside the weights (``router.json``...) was made
for the old ones and goes with them. A folder that memdec did not create is refused as ``--out``, and
so is a checkpoint of another run (``--no-resume`` starts the same run over, nothing else); what a save
killed mid-way left (``.save.*/``, ``.NAME.tmp``) is removed when the run is taken up again. A
non-finite loss or gradient stops the run before the update, and no non-finite weight is saved.

The package, one concern a file, each importing only the files below it (``pyproject.toml``'s
``memdec.train`` layers contract):

- ``trainer.py``: ``Trainer`` (the loop: plan, resume, step, validate, save) and ``train``;
- ``resume.py``: ``--out`` as one run's folder (``check_out_folder``, ``RunFolder``: what to take up);
  ``save.py``: ``CheckpointWriter`` (the best checkpoint, the trainer steps); ``step.py``: the optimizer,
  the teacher base and ``DecoderLoss``; ``validate.py``: ``Validator``; ``log.py``: ``RunLog``;
- ``recipe.py``: ``Recipe`` (what is trained) and what it trains on, a typed record: the datastore's
  ``store.Manifest`` or a ``CorpusRecord`` (``TrainingData``); ``plan.py``: ``RunPlan``,
  ``planned_steps``, ``run_fingerprint``; ``state.py``: ``TrainerState``, the RNG and optimizer files;
- ``windows.py``: the windows, their order and batches, the lr schedule; ``config.py``: ``TrainConfig``,
  ``TRAIN_HELP``, ``check_config``, ``check_decoder_shape``, ``SAVE_DTYPES``.
"""

from ..loss import sparse_kl_ce_loss
from ..models import shortened_copy
from .config import SAVE_DTYPES, TRAIN_HELP, TrainConfig, check_config, check_decoder_shape
from .log import RunLog
from .plan import RunPlan, planned_steps, run_fingerprint
from .recipe import CorpusRecord, Recipe, TrainingData, data_hash, init_memory_decoder, knn_teacher
from .resume import (CHECKPOINT_META_FILES, RunFolder, check_out_folder, is_unmarked_checkpoint, load_resumed,
                     load_step_weights)
from .save import (SAVE_PREFIX, WEIGHTS_DEPENDENTS, CheckpointWriter, cast_for_saving, check_finite_weights,
                   save_files, save_model_folder, write_model_files)
from .state import (OWN_STEP_WEIGHTS, TrainerState, load_optimizer_state, read_rng_json, read_state_json,
                    restore_rng_state, rng_state_json, set_rng_state_json)
from .step import DecoderLoss, load_teacher_base, make_optimizer
from .trainer import Trainer, train
from .validate import Validator
from .windows import collate, epoch_order, lr_at, micro_batch_starts, window_starts

__all__ = [
    "CHECKPOINT_META_FILES", "OWN_STEP_WEIGHTS", "SAVE_DTYPES", "SAVE_PREFIX", "TRAIN_HELP", "WEIGHTS_DEPENDENTS",
    "CheckpointWriter", "CorpusRecord", "DecoderLoss", "Recipe", "RunFolder", "RunLog", "RunPlan", "TrainConfig",
    "Trainer", "TrainerState", "TrainingData", "Validator", "cast_for_saving", "check_config", "check_decoder_shape",
    "check_finite_weights", "check_out_folder", "collate", "data_hash", "epoch_order", "init_memory_decoder",
    "is_unmarked_checkpoint", "knn_teacher", "load_optimizer_state", "load_resumed", "load_step_weights",
    "load_teacher_base", "lr_at", "make_optimizer", "micro_batch_starts", "planned_steps", "read_rng_json",
    "read_state_json", "restore_rng_state", "rng_state_json", "run_fingerprint", "save_files", "save_model_folder",
    "set_rng_state_json", "shortened_copy", "sparse_kl_ce_loss", "train", "window_starts", "write_model_files",
]
