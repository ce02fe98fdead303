"""Issue 34: ``memdec.train`` is a package of one concern a file, and what a recipe trains on is a typed record.

The names of the old ``train.py`` stay importable from ``memdec.train``; a datastore run trains on the
store's ``Manifest``, a corpus-only baseline on a ``CorpusRecord``; both hash as the JSON they stand for,
so every run keeps its fingerprint; ``targets.load_targets`` takes the typed fields of a manifest.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import memdec.train
from memdec.baselines import BaselineConfig, get_method
from memdec.data import load_token_stream, token_stream_hash
from memdec.errors import DatastoreError
from memdec.models import load_tokenizer, tokenizer_fingerprint
from memdec.store import Manifest, open_datastore, open_targets, read_manifest
from memdec.targets import load_targets
from memdec.train import CorpusRecord, Recipe, Trainer, TrainConfig, data_hash, knn_teacher

PACKAGE = Path(memdec.train.__file__).parent

# every public name of train.py before it became a package (and the two that bench scripts import through it)
OLD_NAMES = """TrainConfig CHECKPOINT_META_FILES WEIGHTS_DEPENDENTS SAVE_PREFIX SAVE_DTYPES OWN_STEP_WEIGHTS TRAIN_HELP
window_starts collate epoch_order micro_batch_starts lr_at init_memory_decoder save_model_folder save_files
write_model_files run_fingerprint cast_for_saving check_finite_weights TrainerState read_state_json read_rng_json
rng_state_json restore_rng_state set_rng_state_json Recipe Validator check_config check_decoder_shape planned_steps
check_out_folder is_unmarked_checkpoint Trainer train shortened_copy sparse_kl_ce_loss""".split()


def json_hash(obj: dict) -> str:
    """The hash the trainer took of the manifest dict before the typed record."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def test_every_name_of_the_old_module_is_importable_from_the_package():
    missing = [name for name in OLD_NAMES if not hasattr(memdec.train, name)]
    assert missing == []
    assert set(memdec.train.__all__) >= set(OLD_NAMES)


def test_no_file_is_over_700_lines_no_class_over_250_no_function_over_60():
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert len(source.splitlines()) <= 700, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 250, f"{path.name}: {node.name}"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name}"


def test_a_datastore_run_trains_on_the_typed_manifest_and_hashes_its_json(store, tmp_path):
    tokens, data = Recipe().data(TrainConfig(datastore=str(store), out=str(tmp_path / "out")))
    assert isinstance(data, Manifest)
    assert np.array_equal(tokens, np.load(store / "tokens.npy"))
    on_disk = json.loads((store / "manifest.json").read_text())
    assert data_hash(data) == json_hash(on_disk)
    assert knn_teacher(data) == (16, on_disk["steps"]["targets"]["temperature"])
    trainer = Trainer(TrainConfig(datastore=str(store), out=str(tmp_path / "out"), max_steps=1, block_size=32))
    assert trainer.manifest_hash == json_hash(on_disk) and trainer.data.model == on_disk["model"]


def test_a_corpus_baseline_trains_on_a_corpus_record_with_the_old_dict_s_hash(tiny_llama_dir, tmp_path):
    cfg = BaselineConfig(method="dapt", out=str(tmp_path / "b"), model=str(tiny_llama_dir), corpus="austen:valid",
                         max_tokens=300, max_steps=1, block_size=32)
    tokens, data = get_method("dapt").recipe(cfg).data(cfg)
    assert isinstance(data, CorpusRecord)
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    want = load_token_stream("austen:valid", tokenizer, 300)
    assert np.array_equal(tokens, want)
    # the manifest-shaped dict BaselineRecipe.data built before: the same keys, in the same order
    old = {"model": str(tiny_llama_dir), "tokenizer_hash": tokenizer_fingerprint(tokenizer), "corpus": "austen:valid",
           "corpus_hash": token_stream_hash(want), "max_tokens": 300, "text_field": "text", "n_keys": len(want) - 1}
    assert list(data.to_json().items()) == list(old.items())
    assert data_hash(data) == json_hash(old)
    assert knn_teacher(data) == (None, None)


def test_load_targets_takes_the_typed_fields_of_a_manifest(store):
    manifest = read_manifest(store)
    step = manifest.steps.targets
    fields = dict(n_keys=manifest.n_keys, status=step.status, nnz=step.nnz, k=step.k, temperature=step.temperature,
                  top_m=step.top_m, prob_dtype=step.prob_dtype)
    got, want = load_targets(store, **fields), open_targets(store)
    assert (got.k, got.temperature, got.top_m, got.prob_dtype) == (16, step.temperature, step.top_m, "float16")
    assert np.array_equal(got.offsets, want.offsets) and np.array_equal(got.token_ids, want.token_ids)
    assert np.array_equal(got.probs, want.probs) and len(got) == manifest.n_keys
    assert np.array_equal(open_datastore(store).load_targets().offsets, want.offsets)
    with pytest.raises(DatastoreError, match=r"not built \(status: running\)"):
        load_targets(store, **{**fields, "status": "running"})
    with pytest.raises(DatastoreError, match="prob_dtype 'float64' is not one of"):
        load_targets(store, **{**fields, "prob_dtype": "float64"})
