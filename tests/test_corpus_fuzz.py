"""Fuzzing the corpus readers: whatever bytes a file holds, reading it gives documents or one
CorpusError, never another exception (hypothesis)."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memdec.data import read_corpus
from memdec.errors import CorpusError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

texts = st.one_of(
    st.binary(max_size=2000),  # random bytes: mostly not UTF-8
    st.text(max_size=2000).map(lambda t: t.encode("utf-8")),  # any Unicode, surrogates excluded by encode
    st.text(max_size=200).map(lambda t: t.encode("utf-16")),  # another encoding, with a BOM
    st.sampled_from([b"", b"\n\n  \t\n", b"\xef\xbb\xbfhello", b"a" * 300_000, ("\u00e9" * 50_000).encode()]),
)


def read_or_refuse(spec: str, text_field: str = "text") -> None:
    try:
        docs = read_corpus(spec, text_field)
    except CorpusError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
        return
    assert docs and all(isinstance(d.text, str) and d.text.strip() for d in docs)


@SETTINGS
@given(data=texts, suffix=st.sampled_from([".txt", ".md", ".jsonl", ".json", ".bin"]))
def test_any_file_reads_or_fails_in_one_line(tmp_path, data, suffix):
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(data)
    read_or_refuse(str(path))


jsonl_lines = st.lists(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["text", "body", ""]), st.one_of(st.text(max_size=50), st.integers(), st.none()), max_size=3
        ),
        st.lists(st.integers(), max_size=3),
        st.text(max_size=30),
    ),
    max_size=8,
)


@SETTINGS
@given(records=jsonl_lines, field=st.sampled_from(["text", "body"]), broken=st.booleans())
def test_jsonl_records_read_or_fail_in_one_line(tmp_path, records, field, broken):
    lines = [json.dumps(r) for r in records] + (["{not json"] if broken else [])
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines))
    read_or_refuse(str(path), field)


@SETTINGS
@given(files=st.lists(st.tuples(st.sampled_from(["a.txt", "b.md", "sub/c.jsonl", "d.bin"]), texts), max_size=4))
def test_folders_and_globs_read_or_fail_in_one_line(tmp_path, files):
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    for name, data in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    read_or_refuse(str(root))
    read_or_refuse(str(root / "**" / "*.txt"))
