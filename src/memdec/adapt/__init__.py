"""The main job: one command from a corpus to an adapted model, with a report.

    memdec adapt --model M --corpus TRAIN --valid V --test T --out RUN [--preset quick|full]

Stages, each cached in ``RUN/`` and resumable:

1. ``datastore``: keys, index and kNN targets of the training corpus (``RUN/datastore``);
2. ``train``: the memory decoder, λ chosen on the validation split (``RUN/memdec``);
   with ``--baselines``, then ``ce-decoder``, ``dapt`` and ``lora``: the baselines of
   ``memdec.baselines``, each trained on the same tokens with the same budget
   (``RUN/baselines/METHOD``);
3. ``eval``: base, base + kNN-LM and base + memory decoder (and the baselines) on the test split,
   λ of each chosen on the validation split, every row also scored on a general-text corpus
   (``--general``, default ``general:test``) to show forgetting (``RUN/eval.json``, ``RUN/lambda.png``);
   then ``tasks`` (``--task-items`` > 0): a factual-recall task from the test text and a general-ability task
   from ``--general`` (``memdec.tasks``, ``RUN/tasks/``), every system of the eval stage scored on them through
   lm-evaluation-harness at its chosen λ: accuracy, items and a 95% Wilson interval (``RUN/tasks.json``);
   then ``router`` (``--router auto``, the default): a token router (``memdec.routing``) fitted on
   training text the decoder did not train on (after the datastore's tokens) and ``general:train``,
   compared with the chosen λ on --valid and kept (copied into ``RUN/memdec``, where it loads by
   default) only if it wins there; then the eval table gains its ``memdec+router`` row on the test
   and general text, and ``RUN/router/lambda_t.json`` holds λ_t along a test passage (the report's plot);
4. ``samples``: continuations of a few test-set prompts, base beside joint (``RUN/samples.json``);

then ``RUN/report.md`` and ``RUN/report.json``. ``RUN/stages.json`` records each stage's settings;
a rerun skips stages whose settings are unchanged and redoes, saying why, those that changed. A rerun
with another --model, --corpus, --text-field, --valid, --test or --general (``RUN_IDENTITY``) is
another run: refused before anything loads, unless --overwrite replaces the run.

The package, one concern a module (each imports only those listed after it):

    run.py        adapt(): every stage in order; a done stage's unusable output redone
    stages/       one module per stage group: train (datastore and train), baselines, eval, router,
                  tasks, samples
    job.py        AdaptRun: one call as the stages see it
    identity.py   what a run is (RUN_IDENTITY, the corpora's text hashes), check_inputs, --overwrite
    inputs.py     stage_inputs: what each stage's fingerprint covers
    stagebook.py  RUN/stages.json and StageBook, which owns the caching
    presets.py    PRESETS, Settings, resolve_settings, check_config
    options.py    option(), each stage's input dataclass, AdaptConfig
"""

from .identity import (CORPUS_FLAGS, CORPUS_HASHES, RUN_ENTRIES, RUN_IDENTITY, check_inputs, check_run_identity,
                       clear_run, identity_changes, is_stage_record)
from .inputs import HELDOUT_TOKENS_PER_ITEM, stage_inputs, task_heldout_tokens
from .job import AdaptRun
from .options import (DEFAULT_DECODER, LORA_LR_SCALE, LORA_R, ROUTER_GENERAL, ROUTER_MODES, TRANSFER_BUDGET,
                      AdaptConfig, BaselineInputs, CallOptions, DatastoreInputs, EvalInputs, RouterInputs, RunInputs,
                      SampleInputs, TaskInputs, TrainInputs, TransferInputs, check_fields, full_model_decoder, option,
                      stage_fields)
from .presets import OPTION_STAGE, PRESETS, STAGES, Preset, Settings, check_config, resolve_settings
from .run import STAGE_OUTPUTS, adapt, redo_unusable_outputs
from .stagebook import ADAPT_STAGES, FINGERPRINT, STAGE_STATUSES, SUMMARY_FIELDS, StageBook, say, stage_entry_problem
from .stagebook import _fingerprint as _fingerprint  # tests/test_logic.py pins the fingerprints with it
from .stages.baselines import baseline_stage, reuse_candidate
from .stages.eval import eval_stage
from .stages.router import add_router_row, drop_router, fit_and_judge_router, router_stage, write_router_lambdas
from .stages.samples import generate_samples, sample_prompts, samples_stage
from .stages.tasks import lm_eval_available, score_tasks, task_systems, tasks_stage, write_tasks
from .stages.train import (PRUNED, datastore_stage, keeps_candidates, prune_candidates, teacher_candidates,
                           train_candidates, train_config, train_phase_one, train_phase_two, train_stage)

__all__ = [
    "ADAPT_STAGES", "AdaptConfig", "AdaptRun", "BaselineInputs", "CORPUS_FLAGS", "CORPUS_HASHES", "CallOptions",
    "DEFAULT_DECODER", "DatastoreInputs", "EvalInputs", "FINGERPRINT", "HELDOUT_TOKENS_PER_ITEM", "LORA_LR_SCALE",
    "LORA_R", "OPTION_STAGE", "PRESETS", "PRUNED", "Preset", "ROUTER_GENERAL", "ROUTER_MODES", "RUN_ENTRIES",
    "RUN_IDENTITY", "RouterInputs", "RunInputs", "STAGES", "STAGE_OUTPUTS", "STAGE_STATUSES", "SUMMARY_FIELDS",
    "SampleInputs", "Settings", "StageBook", "TRANSFER_BUDGET", "TaskInputs", "TrainInputs", "TransferInputs",
    "adapt", "add_router_row", "baseline_stage", "check_config", "check_fields", "check_inputs",
    "check_run_identity", "clear_run", "datastore_stage", "drop_router", "eval_stage", "fit_and_judge_router",
    "full_model_decoder", "generate_samples", "identity_changes", "is_stage_record", "keeps_candidates",
    "lm_eval_available", "option", "prune_candidates", "redo_unusable_outputs", "resolve_settings",
    "reuse_candidate", "router_stage", "sample_prompts", "samples_stage", "say", "score_tasks",
    "stage_entry_problem", "stage_fields", "stage_inputs", "task_heldout_tokens", "task_systems", "tasks_stage",
    "teacher_candidates", "train_candidates", "train_config", "train_phase_one", "train_phase_two", "train_stage",
    "write_router_lambdas", "write_tasks",
]
