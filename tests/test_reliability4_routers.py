"""Issue 36, routers and the files beside them: a router's standardisation statistics checked at load (item 6),
the base a domain router or a datastore was made from (item 8), JSON nested too deeply (item 12), a rerun after
a router's write was killed (item 13), domain names checked like served names (item 16), and the held-out
windows of `router --domains` (item 18)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from memdec.checkpoint import (DOMAIN_ROUTER_JSON, DOMAIN_ROUTER_WEIGHTS, ROUTER_JSON, ROUTER_WEIGHTS,
                               read_domain_router_json, read_memdec_json, read_router_json)
from memdec.checks import OWN_MARKER
from memdec.cli import main
from memdec.data import iter_corpus
from memdec.errors import MemdecError
from memdec.files import read_jsonl
from memdec.knnlm import KnnLMLogitsProcessor, KnnRetriever
from memdec.models import tokenizer_fingerprint
from memdec.router import RouterFeatures, TokenRouter, load_domain_router, load_router, save_router
from memdec.routing import DomainRouterConfig, class_windows
from memdec.serve import ServeConfig, check_config, load_models
from memdec.store import MANIFEST, read_manifest
from memdec.testing import save_tiny_model
from test_reliability3_cli import one_line_error

ROUTER_INFO = {"base_model": "tiny", "tokenizer_hash": "t", "decoder_fingerprint": "d"}


def checkpoint(folder: Path, tokenizer, seed: int) -> Path:
    """A tiny memory decoder checkpoint: an HF folder and its memdec.json."""
    save_tiny_model(folder, "llama", tokenizer, seed=seed)
    (folder / "memdec.json").write_text(json.dumps({"format": "memdec", "version": 1, "base_model": "tiny",
                                                    "tokenizer_hash": tokenizer_fingerprint(tokenizer), "lambda": 0.3}))
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {name: checkpoint(root / name, tokenizer, seed) for seed, name in enumerate(("austen", "code"), start=1)}


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tokenizer) -> Path:
    """A base of the same tokenizer and sizes as ``tiny_llama_dir``, with other weights."""
    return save_tiny_model(tmp_path_factory.mktemp("other-base"), "llama", tokenizer, seed=5)


def domain_args(base: Path, ckpts: dict[str, Path], out: Path) -> list[str]:
    return ["router", "--domains", "--model", str(base), "--memdec", f"austen={ckpts['austen']}",
            "--memdec", f"code={ckpts['code']}", "--domain-corpus", "austen=austen:valid",
            "--domain-corpus", "code=stdlib:valid", "--windows", "16", "--window-tokens", "32", "--max-tokens", "3000",
            "--epochs", "5", "--device", "cpu", "--out", str(out)]


@pytest.fixture(scope="module")
def domains(tmp_path_factory, tiny_llama_dir, ckpts) -> Path:
    """A domain router over two tiny decoders, fitted on the tiny base by `memdec router --domains`."""
    out = tmp_path_factory.mktemp("domains") / "router"
    assert main(domain_args(tiny_llama_dir, ckpts, out)) == 0
    return out


def token_args(base: Path, ckpt: Path, out: Path) -> list[str]:
    return ["router", "--model", str(base), "--memdec", str(ckpt), "--domain-corpus", "austen:train",
            "--domain-skip-tokens", "0", "--tokens", "300", "--general-tokens", "300", "--valid", "austen:valid",
            "--valid-tokens", "200", "--block-size", "64", "--hidden", "8", "--epochs", "2", "--device", "cpu",
            "--out", str(out)]


def rewrite_tensor(file: Path, name: str, value: float) -> None:
    tensors = load_file(str(file))
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(file), metadata={"format": "pt"})


# -- item 6: a router's standardisation statistics, checked at load ----------------------------------------


@pytest.mark.parametrize("value", [0.0, -1.0, 1e-30])
def test_a_token_router_whose_std_is_zeroed_is_refused_at_load(tmp_path, value):
    folder = save_router(TokenRouter(RouterFeatures(16, 16), hidden=4), tmp_path / "r", ROUTER_INFO)
    rewrite_tensor(folder / ROUTER_WEIGHTS, "scalar_std", value)
    with pytest.raises(MemdecError, match="scalar_std holds a standard deviation") as err:
        load_router(folder)
    assert str(folder / ROUTER_WEIGHTS) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value", [0.0, -2.0])
def test_a_domain_router_whose_std_is_zeroed_is_refused_at_load(domains, tmp_path, value):
    folder = Path(shutil.copytree(domains, tmp_path / "d"))
    rewrite_tensor(folder / DOMAIN_ROUTER_WEIGHTS, "std", value)
    with pytest.raises(MemdecError, match="std holds a standard deviation") as err:
        load_domain_router(folder)
    assert "\n" not in str(err.value)


def test_router_records_of_absurd_sizes_are_one_line_and_allocate_nothing(domains, tmp_path):
    folder = save_router(TokenRouter(RouterFeatures(16, 16), hidden=4), tmp_path / "r", ROUTER_INFO)
    record = json.loads((folder / ROUTER_JSON).read_text())
    (folder / ROUTER_JSON).write_text(json.dumps({**record, "hidden": 10**12}))
    with pytest.raises(MemdecError, match="router.json describes shape"):
        load_router(folder)
    folder = Path(shutil.copytree(domains, tmp_path / "d"))
    record = json.loads((folder / DOMAIN_ROUTER_JSON).read_text())
    (folder / DOMAIN_ROUTER_JSON).write_text(json.dumps({**record, "d_base": 10**12}))
    with pytest.raises(MemdecError, match="domains.json describes shape"):
        load_domain_router(folder)


# -- item 8: a domain router or a datastore is used with the base it was made from ---------------------------


def test_serve_refuses_a_domain_router_fitted_on_another_base(domains, other_base, tiny_llama_dir):
    assert read_domain_router_json(domains)["base_fingerprint"]
    plan = check_config(ServeConfig(model=str(other_base), router=str(domains), device="cpu"))
    with pytest.raises(MemdecError, match="trained for another base model") as err:
        load_models(plan)
    assert "--router" in str(err.value) and "\n" not in str(err.value)
    models = load_models(check_config(ServeConfig(model=str(tiny_llama_dir), router=str(domains), device="cpu")))
    assert "auto" in models.ids  # its own base serves it


def test_eval_refuses_a_datastore_built_from_another_base(store, other_base, tiny_llama_dir, capsys):
    args = ["--knn", str(store), "--corpus", "austen:test", "--max-tokens", "200", "--block-size", "64",
            "--device", "cpu"]
    line = one_line_error(capsys, ["eval", "--model", str(other_base), *args])
    assert "built from another base model" in line and str(store) in line
    assert read_manifest(store).model_hash  # what `memdec datastore` recorded of its base
    assert main(["eval", "--model", str(tiny_llama_dir), *args]) == 0


def test_knn_generation_refuses_a_datastore_built_from_another_base(store, other_base, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    retriever = KnnRetriever(str(store), k=4)
    with pytest.raises(MemdecError, match="built from another base model"):
        KnnLMLogitsProcessor(AutoModelForCausalLM.from_pretrained(other_base), retriever, 0.25, 1.0)
    KnnLMLogitsProcessor(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), retriever, 0.25, 1.0)


# -- item 12: JSON nested too deeply is one line, in every file memdec reads ---------------------------------


def nested(depth: int) -> str:
    return '{"format": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [100, 60_000])
def test_metadata_nested_too_deeply_is_one_line(tmp_path, depth):
    text = nested(depth)
    for name, read in ((ROUTER_JSON, read_router_json), (DOMAIN_ROUTER_JSON, read_domain_router_json),
                       ("memdec.json", read_memdec_json), (MANIFEST, read_manifest)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text(text)
        with pytest.raises(MemdecError, match="nested more than") as err:
            read(folder)
        assert str(folder / name) in str(err.value) and "\n" not in str(err.value)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n' + text + "\n")
    with pytest.raises(MemdecError, match="line 2 is not JSON"):
        read_jsonl(log)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n' + text.replace('"format"', '"text"') + "\n")
    with pytest.raises(MemdecError, match="corpus.jsonl:2: not valid JSON"):
        list(iter_corpus(str(corpus)))


def test_a_deeply_nested_checkpoint_or_datastore_is_one_line_on_the_command_line(tmp_path, capsys, tiny_llama_dir):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "memdec.json").write_text(nested(60_000))
    line = one_line_error(capsys, ["generate", "--model", str(tiny_llama_dir), "--memdec", str(ckpt),
                                   "--prompt", "x", "--device", "cpu"])
    assert "nested more than" in line
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / MANIFEST).write_text(nested(60_000))
    line = one_line_error(capsys, ["eval", "--model", str(tiny_llama_dir), "--knn", str(ds), "--corpus",
                                   "austen:test", "--max-tokens", "100", "--device", "cpu"])
    assert "nested more than" in line


# -- item 13: a router's write killed, then the identical command ---------------------------------------------


def temp_name(name: str) -> str:
    """The temporary file memdec writes ``name`` into before the rename (``files.temp_path``)."""
    return f".{name}.tmp"


def killed_while_writing(out: Path, leftovers: dict[str, bytes]) -> None:
    """The folder as a SIGKILL leaves it: the new folder memdec made, with only what it had written."""
    out.mkdir()
    for name, data in leftovers.items():
        (out / name).write_bytes(data)


def some_weights(tmp_path: Path) -> bytes:
    folder = save_router(TokenRouter(RouterFeatures(16, 16), hidden=4), tmp_path / "w", ROUTER_INFO)
    return (folder / ROUTER_WEIGHTS).read_bytes()


@pytest.mark.parametrize("state", ["during the weights", "before router.json", "during router.json"])
def test_a_token_router_killed_while_writing_reruns(tmp_path, tiny_llama_dir, ckpts, state, capsys):
    weights = some_weights(tmp_path)
    leftovers = {"during the weights": {temp_name(ROUTER_WEIGHTS): weights[: len(weights) // 2]},
                 "before router.json": {ROUTER_WEIGHTS: weights},
                 "during router.json": {ROUTER_WEIGHTS: weights, temp_name(ROUTER_JSON): b'{"form'}}[state]
    out = tmp_path / "router"
    killed_while_writing(out, leftovers)
    assert main(token_args(tiny_llama_dir, ckpts["austen"], out)) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [OWN_MARKER, ROUTER_JSON, ROUTER_WEIGHTS]  # the leftovers are gone
    load_router(out)


def test_a_domain_router_killed_while_writing_its_weights_reruns(tmp_path, tiny_llama_dir, ckpts, capsys):
    out = tmp_path / "domains"
    killed_while_writing(out, {temp_name(DOMAIN_ROUTER_WEIGHTS): b"\x08\x00\x00\x00\x00\x00\x00\x00{"})
    assert main(domain_args(tiny_llama_dir, ckpts, out)) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [OWN_MARKER, DOMAIN_ROUTER_JSON, DOMAIN_ROUTER_WEIGHTS]
    load_domain_router(out)


def test_a_users_folder_with_a_leftover_is_still_refused(tmp_path, tiny_llama_dir, ckpts, capsys):
    out = tmp_path / "mine"
    killed_while_writing(out, {temp_name(DOMAIN_ROUTER_WEIGHTS): b"x", "notes.txt": b"keep"})
    assert "memdec did not create" in one_line_error(capsys, domain_args(tiny_llama_dir, ckpts, out))
    assert sorted(p.name for p in out.iterdir()) == [temp_name(DOMAIN_ROUTER_WEIGHTS), "notes.txt"]


# -- item 16: domain names are checked like served names ---------------------------------------------------------


@pytest.mark.parametrize("name", ["", "bad name", "../../x", "x/y", ".hidden", "ok\n"])
def test_domain_names_in_domains_json_are_checked_like_memdec_names(domains, tmp_path, tiny_llama_dir, name):
    folder = Path(shutil.copytree(domains, tmp_path / "d"))
    record = json.loads((folder / DOMAIN_ROUTER_JSON).read_text())
    record["domains"][0]["name"] = name
    record["classes"][1] = name
    (folder / DOMAIN_ROUTER_JSON).write_text(json.dumps(record))
    with pytest.raises(MemdecError, match="must be letters, digits") as err:
        read_domain_router_json(folder)
    assert "\n" not in str(err.value).replace(repr(name), "")
    with pytest.raises(MemdecError, match="must be letters, digits"):
        check_config(ServeConfig(router=str(folder), model=str(tiny_llama_dir)))


@pytest.mark.parametrize("name", ["bad name", "a\tb", ".x"])
def test_router_domains_takes_only_names_serve_can_serve(tmp_path, tiny_llama_dir, ckpts, capsys, name):
    args = domain_args(tiny_llama_dir, ckpts, tmp_path / "r")
    args[args.index(f"austen={ckpts['austen']}")] = f"{name}={ckpts['austen']}"
    args[args.index("austen=austen:valid")] = f"{name}=austen:valid"
    assert "must be letters, digits" in one_line_error(capsys, args)
    assert not (tmp_path / "r").exists()


# -- item 18: `router --domains` holds out a tenth of its windows, as its help says ------------------------------


@pytest.mark.parametrize("windows, held", [(16, 1), (5, 1), (50, 5)])
def test_router_domains_holds_out_a_tenth_of_its_windows(windows, held):
    stream = np.arange(4000, dtype=np.int32)
    cfg = DomainRouterConfig(memdec=[], domain_corpus=[], out="x", windows=windows, window_tokens=32)
    train, held_out = class_windows(stream, cfg, np.random.default_rng(0), "austen")
    assert (len(train), len(held_out)) == (windows, held)
    help_text = next(f for f in dataclasses.fields(DomainRouterConfig) if f.name == "windows").metadata["help"]
    assert "a tenth as many held out" in help_text


def test_the_domain_router_record_counts_a_tenth_held_out(domains):
    stats = read_domain_router_json(domains)["train_stats"]
    assert (stats["train_windows"], stats["held_windows"]) == (3 * 16, 3 * 1)
