import json

import numpy as np
import pytest

from memdec.data import (
    BUILTIN_CORPORA,
    Document,
    iter_corpus,
    iter_token_pieces,
    load_token_stream,
    read_corpus,
    sliding_windows,
    stream_tokens_to_file,
    token_stream_hash,
    tokenize_documents,
)
from memdec.errors import CorpusError


@pytest.mark.parametrize(
    "n_tokens,block,stride", [(2, 8, 4), (10, 8, 4), (100, 16, 5), (1000, 64, 64), (64, 64, 1), (65, 64, 32)]
)
def test_windows_score_every_position_exactly_once(n_tokens, block, stride):
    w = sliding_windows(n_tokens, block, stride)
    covered = np.zeros(n_tokens - 1, dtype=int)
    for start, end, score_start in w:
        assert 0 <= start <= score_start < end <= n_tokens - 1
        assert end - start <= block
        covered[score_start:end] += 1
        # every scored position sees block-stride tokens of context, or all it can
        assert score_start - start >= min(block - stride, score_start)
    assert (covered == 1).all()


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError):
        sliding_windows(100, 8, 16)


def test_builtin_corpus_splits():
    train = read_corpus("austen:train")
    assert [d.source.split("/")[-1] for d in train] == BUILTIN_CORPORA["austen:train"]
    test = read_corpus("austen:test")
    assert test[0].text.lstrip().startswith("Persuasion") or "Elliot" in test[0].text[:2000]


def test_within_split_is_the_held_out_tail_of_each_training_novel():
    """austen:train + austen:within rebuild each training novel exactly, cut between paragraphs."""
    import lzma
    from importlib import resources

    train, within = read_corpus("austen:train"), read_corpus("austen:within")
    assert len(train) == len(within) == 4
    for head, tail in zip(train, within):
        stem = head.source.split("/")[-1].split("[")[0]
        full = lzma.decompress(
            (resources.files("memdec") / "corpora" / "austen" / f"{stem}.txt.xz").read_bytes()
        ).decode()
        assert head.text + tail.text == full
        assert head.text.endswith("\n\n") and 0.05 < len(tail.text) / len(full) < 0.15


def test_readers_text_jsonl_folder_glob(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("First document.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "Second."}) + "\n\n" + json.dumps({"body": "Third."}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert [d.text for d in read_corpus(str(tmp_path / "a.txt"))] == ["First document."]
    assert [d.text for d in read_corpus(str(tmp_path / "b.jsonl"), "body")] == ["Second.", "Third."]
    assert [d.text for d in read_corpus(str(tmp_path), "body")] == ["First document.", "Second.", "Third."]
    assert [d.text for d in read_corpus(str(tmp_path / "*.txt"))] == ["First document."]
    docs = read_corpus(str(tmp_path), "body")
    tokens = tokenize_documents(tokenizer, docs)
    eos = tokenizer.eos_token_id
    assert (tokens == eos).sum() == 2  # between documents, not after the last
    pieces = np.split(tokens, np.flatnonzero(tokens == eos))
    assert tokenizer.decode(pieces[0]) == "First document."
    assert tokens.dtype == np.int32


@pytest.mark.parametrize(
    "content,needle",
    [(b"", "empty"), (b"   \n\n", "empty"), (b"caf\xc3\xa9 ok \xff\xfe bad", "byte offset 9")],
)
def test_bad_corpus_gets_clear_error(tmp_path, content, needle):
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    with pytest.raises(CorpusError, match=needle) as err:
        read_corpus(str(p))
    assert str(p) in str(err.value)


def test_missing_and_unknown_corpora(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(CorpusError, match="unknown built-in corpus"):
        read_corpus("austen:nope")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: no field 'text'"):
        read_corpus(str(tmp_path / "bad.jsonl"))


def test_max_tokens_and_hash(tokenizer):
    a = load_token_stream("austen:valid", tokenizer, max_tokens=500)
    b = load_token_stream("austen:valid", tokenizer, max_tokens=500)
    assert len(a) == 500 and token_stream_hash(a) == token_stream_hash(b)
    assert token_stream_hash(a) != token_stream_hash(a[:499])


# --- streaming: a corpus larger than memory -------------------------------------------------


class Text(str):
    """A str that can be watched (weakref.finalize): the test counts the texts still alive."""


def test_streamed_tokens_hold_one_batch_of_text(tokenizer):
    """A generated corpus tokenized through a generator: the stream equals the one tokenized from a
    list, and when the tokenizer runs no more than a batch of texts (plus the one the reader holds)
    is alive: the texts are read lazily and dropped once tokenized."""
    import weakref

    paragraphs = read_corpus("austen:valid")[0].text.split("\n\n")
    alive, most = [0], [0]

    def gone():
        alive[0] -= 1

    def documents():
        for i, p in enumerate(paragraphs * 3):
            text = Text(p)
            weakref.finalize(text, gone)
            alive[0] += 1
            yield Document(f"gen:{i}", text)

    class Watching:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, texts, **kw):
            most[0] = max(most[0], alive[0])
            return tokenizer(texts, **kw)

    streamed = np.concatenate(list(iter_token_pieces(Watching(), documents(), batch_size=16)))
    assert 1 < most[0] <= 16 + 1 and alive[0] == 0
    assert len(paragraphs) * 3 > 100 * 16  # many batches went through
    assert np.array_equal(streamed, tokenize_documents(tokenizer, [Document("x", p) for p in paragraphs * 3]))


def test_stream_to_file_equals_the_stream_in_memory(tokenizer, tmp_path):
    docs = [{"text": p} for p in read_corpus("austen:valid")[0].text.split("\n\n") if p.strip()]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = str(tmp_path / "c.jsonl")
    for max_tokens in (None, 3, 5000):
        on_disk = stream_tokens_to_file(spec, tokenizer, tmp_path / "t.npy", max_tokens)
        assert isinstance(on_disk, np.memmap) and on_disk.dtype == np.int32
        assert np.array_equal(on_disk, load_token_stream(spec, tokenizer, max_tokens))
        assert token_stream_hash(on_disk) == token_stream_hash(np.array(on_disk))
    assert np.array_equal(on_disk[:5000], tokenize_documents(tokenizer, read_corpus(spec))[:5000])


def test_jsonl_is_read_line_by_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\nnot json\n')
    docs = iter_corpus(str(tmp_path / "c.jsonl"))
    assert [next(docs).text, next(docs).text] == ["one", "two"]  # read before the bad line is reached
    with pytest.raises(CorpusError, match="c.jsonl:4: not valid JSON"):
        next(docs)
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xff"}\n')
    with pytest.raises(CorpusError, match="invalid byte 0xff at byte offset 28"):
        read_corpus(str(tmp_path / "d.jsonl"))
# --- the Python standard library as a code domain ----------------------------------------------


def test_stdlib_splits_are_disjoint_by_module_and_cover_the_library():
    from pathlib import PurePosixPath

    from memdec.data import STDLIB_SPLITS, stdlib_files, stdlib_split, stdlib_unit

    files = {split: stdlib_files(split) for split in STDLIB_SPLITS}
    units = {split: {stdlib_unit(f) for f in fs} for split, fs in files.items()}
    assert all(files.values()) and all(fs == sorted(fs) for fs in files.values())
    assert not (units["train"] & units["valid"] or units["train"] & units["test"] or units["valid"] & units["test"])
    every = sorted(f for fs in files.values() for f in fs)
    assert len(every) == len(set(every))  # each file in one split
    sizes = {s: len(u) for s, u in units.items()}
    assert sizes["train"] > 5 * (sizes["valid"] + sizes["test"])  # about 90 / 5 / 5 of the units
    # the split is a pure function of the module's name: pinned, so every machine agrees
    assert [stdlib_split(u) for u in ("json", "email", "asyncio", "test.test_os", "aifc")] == \
        ["train", "train", "train", "train", "valid"]
    assert stdlib_unit(PurePosixPath("test/test_asyncio/test_events.py")) == "test.test_asyncio"
    assert stdlib_unit(PurePosixPath("email/mime/text.py")) == "email"
    notest = stdlib_files("train", with_tests=False)
    assert set(notest) < set(files["train"]) and not [f for f in notest if "test" in f.parts[:-1]]


def test_stdlib_corpus_is_deterministic_and_recorded(tokenizer):
    from memdec.data import corpus_source, stdlib_split, stdlib_unit

    docs = read_corpus("stdlib:valid")
    assert docs == read_corpus("stdlib:valid")
    from pathlib import PurePosixPath

    assert {stdlib_split(stdlib_unit(PurePosixPath(d.source))) for d in docs} == {"valid"}
    a = load_token_stream("stdlib:valid", tokenizer, max_tokens=3000)
    assert token_stream_hash(a) == token_stream_hash(load_token_stream("stdlib:valid", tokenizer, max_tokens=3000))
    source = corpus_source("stdlib:valid")
    assert source == corpus_source("stdlib:valid") and source["files"] == len(docs) and len(source["sha256"]) == 16
    assert corpus_source("austen:valid") is None
    with pytest.raises(CorpusError, match="stdlib:train"):
        read_corpus("stdlib:dev")
