"""The typed manifest record (memdec.store): an exact JSON round trip, one line per bad field, old versions."""

from __future__ import annotations

import json
import shutil

import pytest

from memdec.errors import DatastoreError
from memdec.files import atomic_write_json
from memdec.store import (DEFAULT_K, MANIFEST, IndexStep, Manifest, TargetsStep, open_datastore, read_manifest,
                          recorded_k, write_manifest)


def test_a_built_manifest_round_trips_byte_for_byte(store, tmp_path):
    raw = (store / MANIFEST).read_bytes()
    record = Manifest.from_json(json.loads(raw), store / MANIFEST)
    assert record.to_json() == json.loads(raw) and list(record.to_json()) == list(json.loads(raw))
    write_manifest(tmp_path, record)
    assert (tmp_path / MANIFEST).read_bytes() == raw  # same keys, same order, same bytes
    assert record.steps.targets.k == 16 and record.steps.index.status == "done" and record.n_keys == 599


def test_unknown_keys_and_nulls_are_kept_in_place(store, tmp_path):
    raw = json.loads((store / MANIFEST).read_text())
    raw["steps"]["index"] = {"status": "done", "type": "ivfpq-disk", "params": {"kind": "ivfpq-disk"},
                             "ivfdata_bytes": 7, "bytes": 9, "future_field": [1]}
    raw["steps"]["targets"]["top_m"] = None
    atomic_write_json(tmp_path / MANIFEST, raw)
    record = read_manifest(tmp_path)
    assert record.steps.index.get_extra("ivfdata_bytes") == 7 and record.steps.targets.top_m is None
    (tmp_path / "again").mkdir()
    write_manifest(tmp_path / "again", record)
    assert (tmp_path / "again" / MANIFEST).read_bytes() == (tmp_path / MANIFEST).read_bytes()


def test_a_new_record_writes_fields_in_the_order_they_are_set():
    step = TargetsStep(status="running")
    step.update(k=8, temperature=1.0, top_m=None, nprobe=None)
    step.shards = [[0, 64]]
    step.drop("shards")
    step.status = "done"
    assert list(step.to_json().items()) == [("status", "done"), ("k", 8), ("temperature", 1.0), ("top_m", None),
                                            ("nprobe", None)]
    assert IndexStep().to_json() == {"status": "pending"}
    fresh = Manifest(model="m", tokenizer_hash="t", corpus="c", corpus_hash="h", text_field="text", n_keys=3,
                     block_size=4, stride=2)
    assert list(fresh.to_json()) == ["version", "model", "tokenizer_hash", "corpus", "corpus_hash", "text_field",
                                     "n_keys", "block_size", "stride", "max_tokens", "layer", "dim", "distance",
                                     "key_dtype", "steps"]


@pytest.mark.parametrize("field, value, needle", [
    ("n_keys", "599", 'field "n_keys" must be a whole number >= 1, got "599"'),
    ("steps.targets.k", True, 'field "steps.targets.k" must be a whole number >= 1, got true'),
    ("steps.keys.chunks_done", -1, 'field "steps.keys.chunks_done" must be a whole number >= 0'),
    ("steps.index.bytes", "big", 'field "steps.index.bytes" must be a whole number >= 0'),
    ("steps.targets.kl_sum", "x", 'field "steps.targets.kl_sum" must be a number'),
    ("steps.targets.shards", {}, 'field "steps.targets.shards" must be a JSON list'),
    ("steps.index", [], 'field "steps.index" must be a JSON object'),
])
def test_a_wrong_type_is_one_line_naming_the_field(store, tmp_path, field, value, needle):
    raw = json.loads((store / MANIFEST).read_text())
    *parents, name = field.split(".")
    obj = raw
    for part in parents:
        obj = obj[part]
    obj[name] = value
    atomic_write_json(tmp_path / MANIFEST, raw)
    with pytest.raises(DatastoreError) as info:
        read_manifest(tmp_path)
    line = str(info.value)
    assert needle in line and str(tmp_path / MANIFEST) in line and "\n" not in line
    assert "rebuild it with: memdec datastore --model" in line and "--out NEW" in line


@pytest.mark.parametrize("change", ["version 2", "no dim", "no steps"])
def test_an_old_or_incomplete_manifest_says_how_to_rebuild(store, tmp_path, change):
    raw = json.loads((store / MANIFEST).read_text())
    if change == "version 2":
        raw["version"] = 2
    else:
        del raw[change.split()[1]]
    shutil.copytree(store, tmp_path / "ds")
    atomic_write_json(tmp_path / "ds" / MANIFEST, raw)
    with pytest.raises(DatastoreError) as info:
        open_datastore(tmp_path / "ds")
    line = str(info.value)
    assert "\n" not in line and line.endswith(f"rebuild it with: memdec datastore --model {raw['model']} "
                                              f"--corpus austen:valid --out NEW")
    assert ("not a version-1 memdec manifest (version 2)" if change == "version 2" else "lacks field") in line


def test_recorded_k_falls_back_to_the_default(store, tmp_path):
    assert recorded_k(store) == 16
    raw = json.loads((store / MANIFEST).read_text())
    raw["steps"]["targets"] = {"status": "pending"}
    atomic_write_json(tmp_path / MANIFEST, raw)
    assert recorded_k(tmp_path) == DEFAULT_K == 1024
