"""Reliability round four (issues 32 and 36): training never replaces another run and leaves no stale or
half-written file behind; eval never reports a non-finite score; corpora are read in bounded pieces; the
transfer command says what it needs. Tiny fixtures from conftest (a 2-block Llama, a 600-token datastore)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from memdec.cli import main
from memdec.errors import MemdecError
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model
from memdec.train import TrainConfig, train
from test_reliability3_cli import one_line_error  # the one `memdec: error:` line of a refused command


def config(store, out, **kw) -> TrainConfig:
    base = dict(datastore=str(store), out=str(out), max_steps=2, batch_size=2, block_size=32, lr=1e-3, warmup=1,
                save_every=1, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file directly in ``folder``, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    """A finished fork:1 run (its trainer state dropped), copied fresh by each test that changes it."""
    return train(config(store, tmp_path_factory.mktemp("finished") / "run", decoder="fork:1"))


def fresh_copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


# --- issue 36 item 2: --no-resume never replaces another run; what the old weights had goes with them --------


def test_no_resume_refuses_a_finished_checkpoint_of_another_run(finished, store, tmp_path, capsys):
    run = fresh_copy(finished, tmp_path / "run")
    before = digest(run)
    for extra in (["--seed", "3"], ["--decoder", "copy"], ["--lr", "5e-4"]):
        argv = ["train", "--datastore", str(store), "--out", str(run), "--decoder", "fork:1", "--max-steps", "2",
                "--batch-size", "2", "--block-size", "32", "--lr", "1e-3", "--warmup", "1", "--save-every", "1",
                *extra, "--no-resume"]
        err = one_line_error(capsys, argv)
        assert "holds a checkpoint of another run" in err and "--no-resume starts over the same run only" in err
    assert digest(run) == before  # decoder.safetensors and memdec.json untouched


def test_no_resume_refuses_another_method_finished_in_the_folder(finished, store, tmp_path):
    """A memdec.json beside another method's baseline.json is another run, whatever the fingerprint says."""
    run = fresh_copy(finished, tmp_path / "run")
    (run / "baseline.json").write_text(json.dumps({"format": "memdec-baseline", "version": 1}))
    with pytest.raises(MemdecError, match="another run"):
        train(config(store, run, decoder="fork:1", resume=False))


def test_no_resume_starts_the_same_run_over_and_drops_a_router_made_for_the_old_weights(
        finished, store, tmp_path, tiny_llama_dir, tokenizer):
    run = fresh_copy(finished, tmp_path / "run")
    (run / "router.json").write_text(json.dumps({"format": "memdec-router", "version": 1, "kind": "constant"}))
    save_file({"w": torch.zeros(1)}, str(run / "router.safetensors"))
    (run / "domains.json").write_text("{}")
    with pytest.raises(MemdecError):  # the stale router makes the checkpoint unloadable today
        MemoryDecoderModel.from_pretrained(str(tiny_llama_dir), str(run), tokenizer=tokenizer)
    out = train(config(store, run, decoder="fork:1", resume=False))
    left = {p.name for p in out.iterdir()}
    assert not left & {"router.json", "router.safetensors", "domains.json"}, left
    assert json.loads((out / "memdec.json").read_text())["run_fingerprint"]
    base, _ = load_model(str(tiny_llama_dir))
    MemoryDecoderModel.from_pretrained(base, str(out), tokenizer=tokenizer)  # loads again


# --- issue 36 item 14: what a killed save left is removed when the run is taken up again -----------------------


def killed_save_leftovers(run: Path) -> None:
    """What SIGKILL inside ``save_files`` and ``atomic_write`` leaves: a staging folder, a temporary file."""
    staged = run / ".save.k1ll3d"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"\0" * 4096)
    (run / ".memdec.json.tmp").write_text("{")


def test_a_resumed_run_removes_what_a_killed_save_left(store, tmp_path, interrupt_at):
    run = tmp_path / "run"
    with pytest.raises(interrupt_at.error):
        train(config(store, run, max_steps=3), on_step=interrupt_at(2))
    killed_save_leftovers(run)
    (run / "notes.txt").write_text("mine")  # not memdec's temporary name: kept
    out = train(config(store, run, max_steps=3))
    assert not list(out.glob(".save.*")) and not list(out.glob(".*.tmp"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "memdec.json").is_file()


def test_a_finished_run_asked_again_removes_what_a_killed_save_left(finished, store, tmp_path):
    run = fresh_copy(finished, tmp_path / "run")
    killed_save_leftovers(run)
    before = digest(run)
    train(config(store, run, decoder="fork:1"))  # done already: nothing retrained
    assert not list(run.glob(".save.*")) and not list(run.glob(".*.tmp"))
    assert digest(run) == {k: v for k, v in before.items() if k != ".memdec.json.tmp"}


# --- issue 36 item 15: transfer's --decoder has no default, and only a copy decoder transfers --------------------


def test_transfer_help_names_decoder_required_not_a_default(capsys):
    with pytest.raises(SystemExit):
        main(["transfer", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    decoder = help_text[help_text.index("--decoder DECODER the source"):]
    decoder = decoder[: decoder.index("--", 3)]
    assert "(required)" in decoder and "default" not in decoder, decoder


def test_transfer_without_decoder_is_refused_by_name(store, tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["transfer", "--model", str(tiny_llama_dir), "--datastore", str(store), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "required: --decoder" in err and "copy" not in err, err
    assert not (tmp_path / "t").exists()


def test_transfer_of_a_fork_says_only_copy_decoders_transfer(finished, store, tiny_llama_dir, tmp_path, capsys):
    err = one_line_error(capsys, ["transfer", "--decoder", str(finished), "--model", str(tiny_llama_dir),
                                  "--datastore", str(store), "--out", str(tmp_path / "t"), "--max-steps", "1"])
    assert "a fork memory decoder" in err and "only a copy decoder" in err and "no model config" not in err, err
    assert not (tmp_path / "t").exists()


# --- issue 36 item 5: a non-finite score stops eval with one line naming the system; nothing lands in eval.json --


@pytest.fixture(scope="module")
def nan_decoder(tmp_path_factory, tokenizer) -> Path:
    """A copy decoder whose outputs are NaN (its final norm's weights are)."""
    from safetensors.torch import load_file

    from memdec.models import tokenizer_fingerprint
    from memdec.testing import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("nan-decoder"), "llama", tokenizer, seed=1)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "memdec.json").write_text(json.dumps({
        "format": "memdec", "version": 1, "base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "lambda": 0.3}))
    return folder


def test_eval_sweep_of_a_nan_decoder_is_one_line_and_writes_nothing(nan_decoder, tiny_llama_dir, tmp_path, capsys):
    report = tmp_path / "eval.json"
    err = one_line_error(capsys, ["eval", "--model", str(tiny_llama_dir), "--memdec", str(nan_decoder), "--sweep",
                                  "--valid", "austen:valid", "--corpus", "austen:test", "--max-tokens", "200",
                                  "--block-size", "64", "--json", str(report)])
    assert "nan" in err.lower() or "finite" in err, err
    assert not report.exists()


def eval_inputs(tokenizer, corpus: str = "austen:test", valid: str = "austen:valid"):
    """``EvalInputs`` over real token streams of the tiny tokenizer, no model needed by the scorers below."""
    from memdec.data import load_token_stream
    from memdec.evaluate import EvalConfig, EvalInputs, prepare_config

    cfg = prepare_config(EvalConfig(model="tiny", corpus=corpus, valid=valid, sweep=True, memdec="ckpt",
                                    max_tokens=120, block_size=32))
    streams = {"test": load_token_stream(corpus, tokenizer, 120), "valid": load_token_stream(valid, tokenizer, 120),
               "general": None}
    return cfg, EvalInputs(None, tokenizer, "cpu", None, None, [], streams)


def test_every_scored_stream_must_be_finite_and_names_the_system(tokenizer):
    from memdec.data import sliding_windows, window_batches
    from memdec.evaluate import _score_each

    cfg, inputs = eval_inputs(tokenizer)
    test_batches = len(window_batches(sliding_windows(len(inputs.streams["test"]), 32, 16), 1))
    calls = []

    def nan_on_valid(input_ids, targets):  # a scorer finite on the test text, NaN on the validation text
        calls.append(1)
        return torch.full(targets.shape, -2.0 if len(calls) <= test_batches else float("nan"))

    with pytest.raises(MemdecError, match=r"^memdec on --valid austen:valid: 119 of 119 per-token scores are NaN"):
        _score_each(cfg, inputs, nan_on_valid, "memdec")
    with pytest.raises(MemdecError, match=r"^dapt on --corpus austen:test: 119 of 119 .* are infinite"):
        _score_each(cfg, inputs, lambda i, t: torch.full(t.shape, -float("inf")), "dapt")


def test_rows_and_the_report_hold_finite_numbers_only(tokenizer):
    from memdec.evaluate import EvalReport, Mixture, Scored, build_rows, make_row

    cfg, inputs = eval_inputs(tokenizer)
    n = len(inputs.streams["test"]) - 1
    base = {"test": np.full(n, 3.0), "valid": np.full(len(inputs.streams["valid"]) - 1, 3.0), "general": None}
    knn = {"test": np.r_[np.full(n - 1, 1.0), np.inf], "valid": np.r_[np.full(len(base["valid"]) - 1, 1.0), np.inf],
           "general": None}  # one target no neighbour holds: infinite alone, finite mixed at λ < 1
    report = build_rows(cfg, inputs, Scored(base, 1.0, [Mixture("knn-lm", "ds", knn, 1.0, 0.25, {})]))
    row = report.rows[1]
    assert row.lmbda < 1 and math.isfinite(row.ppl) and row.extra["alone_ppl"] is None
    json.dumps(report.to_json("austen:test"), allow_nan=False)
    with pytest.raises(MemdecError, match=r"^knn-lm at λ=1: the perplexity on the test corpus is not finite"):
        make_row("knn-lm", "ds", knn["test"], 1.0, 1.0)
    with pytest.raises(MemdecError, match=r"^dapt: the perplexity .* not finite \(mean NLL 1000\)"):
        make_row("dapt", "x", np.full(4, 1000.0), 1.0)  # finite scores whose perplexity overflows a float
    bad = EvalReport([make_row("base", "m", base["test"], 1.0, train_seconds=float("inf"))], n)
    with pytest.raises(MemdecError, match=r"non-finite number at results\[0\]\.train_seconds \(inf\)"):
        bad.to_json("austen:test")


def test_eval_knn_at_lambda_one_that_misses_a_target_is_one_line_and_writes_nothing(store, tiny_llama_dir,
                                                                                    tmp_path, capsys):
    report = tmp_path / "eval.json"
    err = one_line_error(capsys, ["eval", "--model", str(tiny_llama_dir), "--knn", str(store), "--lambda", "1",
                                  "--corpus", "austen:test", "--max-tokens", "200", "--block-size", "64",
                                  "--json", str(report)])
    assert "knn-lm at λ=1: the perplexity on the test corpus is not finite" in err, err
    assert not report.exists()


def test_a_knn_lm_sweep_never_picks_lambda_one():
    """kNN-LM alone gives probability 0 to what it did not retrieve: a valid stream it covers (λ = 1 best there)
    once chose λ = 1, and a test token it missed then made the row infinite (adapt's eval stage stopped)."""
    from memdec.evaluate import EvalConfig, Mixture, _mixture_row

    base = {"valid": np.full(8, 3.0), "test": np.full(8, 3.0), "general": None}
    knn = {"valid": np.full(8, 0.1), "test": np.array([0.1] * 7 + [np.inf]), "general": None}
    cfg = EvalConfig(sweep=True, valid="austen:valid")
    row, nll, curve = _mixture_row(cfg, Mixture("knn-lm", "ds", knn, 1.0, 0.25, sparse_support=True), base, 1.0)
    assert row.lmbda == 0.95 and np.isfinite(nll).all() and curve["valid_ppl"][-1] < curve["valid_ppl"][-2]
    decoder = Mixture("memdec", "ck", {**knn, "test": np.full(8, 0.1)}, 1.0, 0.5)
    assert _mixture_row(cfg, decoder, base, 1.0)[0].lmbda == 1.0  # a decoder's softmax covers every token


# --- issue 32 item 4: corpora are read in bounded pieces, whatever their line structure -----------------------


def test_eval_refuses_a_device_in_one_line_before_any_model_loads(capsys):
    err = one_line_error(capsys, ["eval", "--model", "no-such-model-is-loaded", "--corpus", "/dev/zero",
                                  "--max-tokens", "64"])
    assert err.startswith("memdec: error: --corpus: /dev/zero: not a regular file or folder"), err


def test_a_fifo_is_refused_before_anything_reads_it(tmp_path, capsys):
    import os

    from memdec.data import iter_corpus

    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    with pytest.raises(MemdecError, match="not a regular file or folder"):
        iter_corpus(str(fifo))  # opening it would block until a writer came
    with pytest.raises(MemdecError, match="not a regular file or folder"):
        iter_corpus("/dev/zero")
    err = one_line_error(capsys, ["eval", "--model", "no-such-model", "--memdec", "no-such-ckpt", "--sweep",
                                  "--valid", str(fifo), "--max-tokens", "64"])
    assert f"--valid: {fifo}: not a regular file" in err, err


def test_a_huge_single_line_file_is_read_only_as_far_as_max_tokens_needs(tokenizer, tmp_path):
    import tracemalloc

    from memdec.data import load_token_stream

    big = tmp_path / "one-line.txt"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # 64 MiB of NUL characters, no newline, no space
    tracemalloc.start()
    try:
        tokens = load_token_stream(str(big), tokenizer, max_tokens=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(tokens) == 64 and peak < 16 << 20, peak  # a piece or two, never the whole file


def austen_one_line(n_chars: int) -> str:
    """Real prose on one line (newlines made spaces), ``n_chars`` long."""
    from memdec.data import read_corpus

    text = " ".join(read_corpus("austen:test")[0].text.split())
    return (text * (n_chars // len(text) + 1))[:n_chars]


def test_a_long_document_read_in_pieces_keeps_its_tokens(tokenizer, tmp_path):
    """At the real bound (1 MiB): a 2.5 MB one-line file is read in three pieces, its tokens those of
    the whole text; so is its text as one JSONL record (its line is read whole, the text cut)."""
    from memdec.data import PIECE_CHARS, iter_corpus, load_token_stream

    text = austen_one_line(2_500_000)
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    whole = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    pieces = list(iter_corpus(str(tmp_path / "big.txt")))
    assert len(pieces) == 3 and [p.continues for p in pieces] == [False, True, True]
    assert max(len(p.text) for p in pieces) <= PIECE_CHARS and "".join(p.text for p in pieces) == text
    assert all(p.text.startswith(" ") for p in pieces[1:])  # cut before a space between two words
    for spec in ("big.txt", "big.jsonl"):
        assert np.array_equal(load_token_stream(str(tmp_path / spec), tokenizer), whole), spec


def test_every_way_to_name_a_corpus_reads_long_documents_in_pieces_with_the_same_tokens(tokenizer, tmp_path,
                                                                                        monkeypatch):
    """Small bounds (many cuts): a file, a JSONL file, a folder and a glob give the tokens of the whole
    documents, EOS between documents and none between the pieces of one."""
    import memdec.data as data

    monkeypatch.setattr(data, "PIECE_CHARS", 700)
    monkeypatch.setattr(data, "CUT_WINDOW", 200)
    monkeypatch.setattr(data, "READ_BYTES", 500)
    docs = [austen_one_line(5_000), "Short one.", austen_one_line(3_333).replace(" ", "\n", 40) + " é" * 400]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    eos = tokenizer.eos_token_id
    expected = np.concatenate([np.asarray(([eos] if i else []) + tokenizer(d, add_special_tokens=False)["input_ids"])
                               for i, d in enumerate(docs)])
    for spec in (str(folder), str(folder / "*.txt"), str(tmp_path / "c.jsonl")):
        got = data.load_token_stream(spec, tokenizer)
        assert np.array_equal(got, expected), spec
        assert np.array_equal(data.load_token_stream(spec, tokenizer, max_tokens=1500), expected[:1500]), spec
    assert data.load_token_stream(str(folder / "0.txt"), tokenizer).tolist() == \
        tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    assert len(list(data.iter_corpus(str(folder)))) > 12  # every document over 700 characters came in pieces


def test_a_jsonl_line_longer_than_the_bound_is_one_line(tmp_path, monkeypatch):
    import memdec.data as data

    monkeypatch.setattr(data, "JSONL_MAX_LINE", 1000)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "x" * 2000}) + "\n")
    docs = data.iter_corpus(str(tmp_path / "c.jsonl"))
    assert next(docs).text == "ok"
    with pytest.raises(MemdecError, match=r"c.jsonl:2: a line longer than 0 MiB; a JSONL record is read whole"):
        next(docs)


def test_invalid_utf8_is_named_by_its_offset_across_read_chunks(tmp_path, monkeypatch):
    import memdec.data as data

    monkeypatch.setattr(data, "READ_BYTES", 7)
    (tmp_path / "a.txt").write_bytes("abcdé".encode() + b"fgh\xffij")  # 0xff at byte 9: the second chunk
    (tmp_path / "b.txt").write_bytes(b"abcdef\xe2\x82")  # a character cut short at the end
    with pytest.raises(MemdecError, match=r"invalid byte 0xff at byte offset 9\)"):
        data.read_corpus(str(tmp_path / "a.txt"))
    with pytest.raises(MemdecError, match=r"invalid byte 0xe2 at byte offset 6\)"):
        data.read_corpus(str(tmp_path / "b.txt"))
