import json

from memdec.cli import main


def test_eval_cli_writes_json(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_llama_dir), "--corpus", "austen:valid", "--max-tokens", "300",
               "--block-size", "128", "--stride", "64", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["tokens"] == 299 and report["corpus"] == "austen:valid"
    (row,) = report["results"]
    assert row["system"] == "base" and row["ppl"] > 1 and set(row) >= {"model", "nll", "ppl", "tokens_per_s", "lambda"}
    assert "base" in capsys.readouterr().out


def test_cli_errors_are_one_line(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    cases = [
        (["--model", "nope-model"], "unknown model spec"),
        (["--corpus", str(tmp_path / "missing.txt")], "no such file"),
        (["--corpus", str(bad)], "byte offset 3"),
    ]
    for extra, needle in cases:
        args = [
            "eval",
            "--model",
            str(tiny_llama_dir),
            "--corpus",
            "austen:valid",
            "--max-tokens",
            "50",
            "--block-size",
            "64",
        ]
        rc = main(args + extra)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if "error" in line]) == 1
    rc = main(["eval", "--model", str(tiny_llama_dir), "--corpus", "austen:valid", "--block-size", "100000"])
    assert rc == 2 and "larger than the model's context of 256" in capsys.readouterr().err
