"""Every metadata file memdec reads, fed wrong types, missing keys and garbage bytes: one line, never a traceback.

The artefacts (a datastore, a trained memory decoder with its trainer state and log, dapt and lora
baselines, an adapt run folder) are built once; each case corrupts one file of a copy and runs the
command that reads it through ``memdec.cli.main``: exit code 2 and a single ``memdec: error:`` line
naming the file (and the field). The untouched copies run through the same commands with exit code 0.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from memdec.baselines import BaselineConfig, train_baseline
from memdec.cli import main

MISSING = object()  # a field deleted from its file

TRAIN = ["--max-steps", "2", "--batch-size", "2", "--block-size", "32", "--lr", "1e-3", "--warmup", "1",
         "--save-every", "1", "--log-every", "1", "--seed", "0", "--device", "cpu",
         "--keep-trainer-state"]  # the "resume" cases corrupt the finished run's trainer state
EVAL = ["--corpus", "austen:test", "--max-tokens", "64", "--block-size", "32", "--device", "cpu"]
STEP = "trainer_state/step-00000002"


@pytest.fixture(scope="module")
def built(store, tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Every artefact whose files the cases corrupt, built once with tiny models."""
    root = tmp_path_factory.mktemp("metadata")
    assert main(["train", "--datastore", str(store), "--out", str(root / "memdec"), *TRAIN]) == 0
    budget = dict(datastore=str(store), max_steps=1, batch_size=2, block_size=32, save_every=1, seed=0, device="cpu")
    for method in ("dapt", "lora"):
        train_baseline(BaselineConfig(method=method, out=str(root / method), **budget))
    run = root / "run"  # what `memdec adapt` leaves for `eval --run`
    shutil.copytree(root / "memdec", run / "memdec", ignore=shutil.ignore_patterns("trainer_state", "log.jsonl"))
    shutil.copytree(store, run / "datastore")
    settings = {"model": str(tiny_llama_dir), "corpus": "austen:train", "valid": "austen:valid", "test": "austen:test",
                "test_tokens": 64, "k": 16}
    (run / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return {"datastore": store, "memdec": root / "memdec", "dapt": root / "dapt", "lora": root / "lora", "run": run,
            "resume": root / "memdec", "tiny": tiny_llama_dir}


def command(target: str, folder: Path, built: dict, tmp_path: Path) -> list[str]:
    """The command that reads ``folder`` (a corrupted copy of the artefact ``target``)."""
    model = ["--model", str(built["tiny"])]
    return {
        "datastore": ["train", "--datastore", str(folder), "--out", str(tmp_path / "out"), *TRAIN],
        "memdec": ["eval", *model, *EVAL, "--memdec", str(folder)],
        "dapt": ["eval", *model, *EVAL, "--baseline", str(folder)],
        "lora": ["eval", *model, *EVAL, "--baseline", str(folder)],
        "run": ["eval", "--run", str(folder), *EVAL],
        "resume": ["train", "--datastore", str(built["datastore"]), "--out", str(folder), *TRAIN],
    }[target]


# --- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    target: str  # which artefact (a key of ``built``)
    file: str  # the file corrupted, relative to the artefact's folder
    edit: Callable[[bytes], bytes]
    needle: str  # the error line holds it (besides the file's name)
    id: str


def set_field(dotted: str, value) -> Callable[[bytes], bytes]:
    """An edit of a JSON file: its field ``dotted`` set to ``value`` (MISSING: deleted)."""

    def edit(data: bytes) -> bytes:
        record = json.loads(data)
        *parents, last = dotted.split(".")
        node = record
        for part in parents:
            node = node[part]
        if value is MISSING:
            del node[last]
        else:
            node[last] = value
        return json.dumps(record).encode()

    return edit


GARBAGE = {
    "random-bytes": lambda data: random.Random(0).randbytes(300),
    "not-utf8": lambda data: b'{"note": "\xff\xfe caf\xe9"}',
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "json-array": lambda data: b"[1, 2, 3]\n",
    "json-string": lambda data: b'"abc"\n',
}

TEXT_BAD = (1, None, ["x"])
COUNT_BAD = ("x", True, 0, -1, 1.5, None)
UNIT_BAD = ("0.5", True, 2, -0.1)
POSITIVE_BAD = ("hot", True, 0, -1)

# file -> {field: [bad values; MISSING deletes it; a (value, needle) pair says what the line holds]}
FIELDS: dict[tuple[str, str], dict[str, tuple]] = {
    ("datastore", "manifest.json"): {
        "version": ("1", True, (2, "not a version-1 memdec manifest"), MISSING),
        "model": TEXT_BAD + (MISSING,),
        "tokenizer_hash": (None, 7, MISSING),
        "corpus": (1, MISSING),
        "corpus_hash": ([], MISSING),
        "n_keys": COUNT_BAD + (MISSING,),
        "block_size": ("64", 0, MISSING),
        "stride": (None, True, MISSING),
        "layer": (5, MISSING),
        "dim": ("abc", True, 0, None, MISSING),
        "max_tokens": ("600", -5),
        "prefix_token": ("x",),
        "steps": ([], "done", MISSING),
        "steps.keys": ("done", MISSING),
        "steps.keys.status": ("finished", 1, MISSING),
        "steps.keys.dropped": ("yes",),
        "steps.index.type": (1, MISSING),
        "steps.index.params": ("flat", MISSING),
        "steps.targets.status": (True, MISSING),
        "steps.targets.k": ("sixteen", True, 0, MISSING),
        "steps.targets.temperature": POSITIVE_BAD + (MISSING,),
        "steps.targets.nnz": ("x", -1, MISSING),
        "steps.targets.top_m": ("all", 0),
        "steps.targets.nprobe": ("x",),
        "steps.targets.prob_dtype": ("float64", 16),
    },
    ("memdec", "memdec.json"): {
        "format": (1, ("other", "unsupported checkpoint format"), MISSING),
        "version": ("1", True, (2, "unsupported checkpoint format"), MISSING),
        "base_model": TEXT_BAD + (MISSING,),
        "tokenizer_hash": (None, 7, MISSING),
        "lambda": UNIT_BAD + (None, MISSING),
        "temperature": POSITIVE_BAD,
        "alpha": UNIT_BAD,
        "teacher_base_weight": UNIT_BAD,
        "k": ("16", True, 0),
        "knn_temperature": POSITIVE_BAD,
        "datastore": (1,),
        "datastore_manifest_hash": (1,),
        "corpus_hash": ([],),
        "n_parameters": ("x", -1, True),
        "trainable_parameters": (1.5,),
        "train_seconds": ("x", -1),
        "train_stats": ("x", []),
        "train_config": ([],),
        "lambda_source": (1,),
    },
    ("dapt", "baseline.json"): {
        "format": tuple((value, "not a memdec baseline") for value in (1, "memdec", MISSING)),
        "version": ("1", True, (2, "not a memdec baseline"), MISSING),
        "method": ("sft", 1, MISSING),
        "base_model": TEXT_BAD + (MISSING,),
        "tokenizer_hash": (None, MISSING),
        "lambda": UNIT_BAD,
        "corpus_hash": (1,),
        "trainable_parameters": ("x", True),
        "train_seconds": (-1,),
        "train_stats": ("x",),
    },
    ("run", "settings.json"): {
        "model": TEXT_BAD + (MISSING,),
        "valid": (1, MISSING),
        "test": ([], None, MISSING),
        "test_tokens": ("x", 0, True, MISSING),
    },
    ("resume", f"{STEP}/state.json"): {
        "step": ("2", True, 0, None, (3, 'field "step" is 3'), MISSING),
        "total_steps": ("x", 0, MISSING),
        "run_fingerprint": (1, None, MISSING),
        "recipe": (1,),
        "seconds": ("x", -1),
        "best": (
            "x",
            ({"step": "two"}, 'field "best.step"'),
            ({"step": 1, "best_ppl": "low"}, 'field "best.best_ppl"'),
        ),
    },
    ("resume", f"{STEP}/rng-0.json"): {
        "step": ("2", True, None, (3, "from step 3"), MISSING),
        "rng": ("x", [], MISSING),
        "rng.torch": ("x", MISSING, ([1, 2, 3], 'field "rng"'), (["a"], 'field "rng"')),
        "rng.numpy": ({}, MISSING, (["MT19937", [1], 0, 0, 0.0], 'field "rng"'), ([1, 2], 'field "rng"')),
        "rng.python": (1, MISSING, ([3, [1, 2], None], 'field "rng"')),
        "rng.cuda": ("x",),
    },
}


def field_cases() -> list[Case]:
    cases = []
    for (target, file), fields in FIELDS.items():
        for name, values in fields.items():
            for value in values:
                value, needle = value if isinstance(value, tuple) else (value, f'field "{name}"')
                label = "missing" if value is MISSING else json.dumps(value)
                cases.append(Case(target, file, set_field(name, value), needle, f"{target}/{file}:{name}={label}"))
    return cases


def garbage_cases() -> list[Case]:
    files = [(target, file) for target, file in FIELDS] + [("lora", "baseline.json")]
    return [Case(target, file, edit, "", f"{target}/{file}:{name}")
            for target, file in files for name, edit in GARBAGE.items()]


def log_line(text: bytes) -> Callable[[bytes], bytes]:
    """An edit of ``log.jsonl``: ``text`` put between its first and second lines."""
    return lambda data: data.split(b"\n", 1)[0] + b"\n" + text + b"\n" + data.split(b"\n", 1)[1]


LOG_CASES = [
    Case("resume", "log.jsonl", edit, needle, f"resume/log.jsonl:{name}") for name, edit, needle in [
        ("random-bytes", GARBAGE["random-bytes"], "not UTF-8"),
        ("not-utf8", log_line(b'{"step": 1, "note": "caf\xe9"}'), "line 2 is not UTF-8"),
        ("text-line", log_line(b"my own notes"), "line 2 is not JSON"),
        ("array-line", log_line(b"[1, 2]"), "line 2 must hold a JSON object"),
        ("step=x", log_line(b'{"step": "x"}'), 'field "step"'),
        ("step=true", log_line(b'{"step": true}'), 'field "step"'),
    ]
]


WEIGHT_GARBAGE = {k: GARBAGE[k] for k in ("random-bytes", "truncated", "empty")} | {
    "json": lambda data: b'{"weights": []}'}
WEIGHT_CASES = [Case(target, file, edit, file.rsplit("/", 1)[-1], f"{target}/{file}:{name}")
                for target, file in (("resume", f"{STEP}/model.safetensors"), ("memdec", "model.safetensors"),
                                     ("dapt", "model.safetensors"), ("lora", "adapter_model.safetensors"))
                for name, edit in WEIGHT_GARBAGE.items()]

CASES = field_cases() + garbage_cases() + LOG_CASES + WEIGHT_CASES


def corrupted_copy(built: dict, case: Case, tmp_path: Path) -> Path:
    copy = tmp_path / case.target
    shutil.copytree(built[case.target], copy)
    path = copy / case.file
    path.write_bytes(case.edit(path.read_bytes()))
    return copy


def one_error_line(capsys) -> str:
    """The single line the command wrote to stderr, ``memdec: error: ...``, besides progress bars (eval
    scores the base model before it loads a baseline's weights)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("memdec: error: "), lines
    return lines[0]


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_corrupt_metadata_file_is_one_line(built, tmp_path, capsys, case):
    copy = corrupted_copy(built, case, tmp_path)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(command(case.target, copy, built, tmp_path)) == 2
    line = one_error_line(capsys)
    assert Path(case.file).name in line and case.needle in line, line
    if case.target != "resume":  # a reader changes nothing (a resume rewrites the log only once it is read)
        assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("target", ["datastore", "memdec", "dapt", "lora", "run", "resume"])
def test_the_untouched_artefacts_pass(built, tmp_path, capsys, target):
    copy = tmp_path / target
    shutil.copytree(built[target], copy)
    assert main(command(target, copy, built, tmp_path)) == 0, capsys.readouterr().err[-2000:]


def test_a_log_cut_short_is_cut_back_not_refused(built, tmp_path, capsys):
    copy = tmp_path / "resume"
    shutil.copytree(built["resume"], copy)
    complete = (copy / "log.jsonl").read_text()
    (copy / "log.jsonl").write_text(complete + '{"step": 3, "lo')  # a write interrupted mid-line
    assert main(command("resume", copy, built, tmp_path)) == 0, capsys.readouterr().err[-2000:]
    assert (copy / "log.jsonl").read_text() == complete


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_a_pickled_lora_adapter_is_never_loaded(built, tmp_path, capsys):
    copy = tmp_path / "lora"
    shutil.copytree(built["lora"], copy)
    (copy / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran-code"
    (copy / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    assert main(command("lora", copy, built, tmp_path)) == 2
    line = one_error_line(capsys)
    assert "adapter_model.bin" in line and "safetensors" in line, line
    assert not marker.exists()
