import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import memdec.datastore.keys as keys_mod  # the keys step: where window_keys is called
from memdec.cli import main
from memdec.data import load_token_stream, sliding_windows
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.store import FFNInputCapture, find_ffn_input_module, open_datastore, open_targets, read_manifest
from memdec.errors import DatastoreError
from memdec.testing import tiny_tokenizer

ARTEFACTS = ["tokens.npy", "keys.npy", "values.npy", "index.faiss",
             "targets/offsets.npy", "targets/token_ids.npy", "targets/probs.npy"]


def config(model_dir, out, **kw) -> DatastoreConfig:
    base = dict(model=str(model_dir), corpus="austen:valid", out=str(out), k=8, max_tokens=600,
                block_size=64, stride=32, search_batch=128, progress=False)
    base.update(kw)
    return DatastoreConfig(**base)


def read_bytes(path):
    return {name: (path / name).read_bytes() for name in ARTEFACTS}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("ds") / "store"
    return build_datastore(config(tiny_llama_dir, out))


# --- the hook ------------------------------------------------------------------------------


def _tiny(arch: str) -> nn.Module:
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    cfgs = {
        "llama": tf.LlamaConfig(**small, num_key_value_heads=2),
        "qwen2": tf.Qwen2Config(**small, num_key_value_heads=2),
        "mistral": tf.MistralConfig(**small, num_key_value_heads=2),
        "gemma": tf.GemmaConfig(**small, num_key_value_heads=2, head_dim=8),
        "gpt_neox": tf.GPTNeoXConfig(**small),
        "gpt2": tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4),
    }
    return AutoModelForCausalLM.from_config(cfgs[arch]).eval()


@pytest.mark.parametrize("arch,name", [
    ("llama", "model.layers.2.mlp"), ("qwen2", "model.layers.2.mlp"), ("mistral", "model.layers.2.mlp"),
    ("gemma", "model.layers.2.mlp"), ("gpt_neox", "gpt_neox.layers.2.mlp"), ("gpt2", "transformer.h.2.mlp"),
])
def test_ffn_module_discovery(arch, name):
    model = _tiny(arch)
    found, module = find_ffn_input_module(model)
    assert found == name and module is model.get_submodule(name)
    ids = torch.randint(0, 64, (2, 5))
    with FFNInputCapture(model) as cap:  # stop=False: a normal forward, captured on the way
        out = model(ids)
    assert out.logits.shape == (2, 5, 64) and cap.last.shape == (2, 5, 32)


def test_unknown_architecture_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(DatastoreError, match="cannot place the kNN hook in Odd"):
        find_ffn_input_module(Odd())


# --- keys and values ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keys_equal_hooked_full_forward(tmp_path, request, tokenizer, arch):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    mlp = model.model.layers[-1].mlp if arch == "llama" else model.transformer.h[-1].mlp
    seen = []
    mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    tokens = load_token_stream("austen:valid", tokenizer, max_tokens=200)
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]

    # one window over the whole stream: keys are the plain full forward's hooked states
    ds = open_datastore(
        build_datastore(config(model_dir, tmp_path / "full", max_tokens=200, block_size=256, stride=128))
    )
    with torch.no_grad():
        model(ids)
    assert ds.keys.shape == (199, model.config.hidden_size) and ds.keys.dtype == np.float16
    np.testing.assert_allclose(
        ds.keys.astype(np.float32), seen[-1][0, :199].half().float().numpy(), rtol=1e-3, atol=1e-3
    )
    np.testing.assert_array_equal(ds.values, tokens[1:])
    np.testing.assert_array_equal(ds.tokens, tokens)
    assert ds.manifest.layer == ("model.layers.1.mlp" if arch == "llama" else "transformer.h.1.mlp")

    # short windows, batched: each key is the hooked state of a forward over exactly its own window
    ds = open_datastore(build_datastore(config(model_dir, tmp_path / "win", max_tokens=200, block_size=48,
                                               stride=16, batch_size=3)))
    for start, end, score_start in sliding_windows(len(tokens), 48, 16):
        with torch.no_grad():
            model(ids[:, start:end])
        ref = seen[-1][0, score_start - start :].half().float().numpy()
        np.testing.assert_allclose(ds.keys[score_start:end].astype(np.float32), ref, rtol=1e-3, atol=1e-3)


def test_manifest_and_csr_rows(built, tokenizer):
    m = read_manifest(built)
    assert m.version == 1 and m.n_keys == 599 and m.dim == 64 and m.layer == "model.layers.1.mlp"
    assert {s: getattr(m.steps, s).status for s in ("keys", "index", "targets")} == dict.fromkeys(
        ("keys", "index", "targets"), "done"
    )
    from memdec.index import choose_params

    assert m.steps.index.type == choose_params(599, 64).kind == ("torch" if torch.cuda.is_available() else "flat")
    from memdec.models import tokenizer_fingerprint

    assert m.tokenizer_hash == tokenizer_fingerprint(tokenizer)
    t = open_targets(built)
    assert len(t) == 599 and t.offsets[0] == 0 and t.probs.dtype == np.float16
    sums = np.add.reduceat(t.probs.astype(np.float64), t.offsets[:-1])
    np.testing.assert_allclose(sums, 1.0, atol=2e-3)  # fp16 rounding
    support = np.diff(t.offsets)
    assert support.min() >= 1 and support.max() <= 8
    assert m.steps.targets.mean_support == pytest.approx(support.mean(), abs=1e-3)
    offs, ids, probs = t.gather([5, 2, 5])
    for j, p in enumerate([5, 2, 5]):
        row_ids, row_probs = t.row(p)
        np.testing.assert_array_equal(ids[offs[j] : offs[j + 1]], row_ids)
        np.testing.assert_array_equal(probs[offs[j] : offs[j + 1]], row_probs)


def test_resume_after_interruption_is_byte_identical(tmp_path, tiny_llama_dir, built, monkeypatch):
    out = tmp_path / "resumed"
    cfg = config(tiny_llama_dir, out)

    class Stop(Exception):
        pass

    def interrupt_at(step, chunk):
        def hook(s, c):
            if (s, c) == (step, chunk):
                raise Stop
        return hook

    with pytest.raises(Stop):
        build_datastore(cfg, on_chunk=interrupt_at("keys", 4))
    keys_step = read_manifest(out).steps.keys
    assert keys_step.status == "running" and keys_step.chunks_done == 5

    calls = []
    real = keys_mod.window_keys
    monkeypatch.setattr(keys_mod, "window_keys", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with pytest.raises(Stop):
        build_datastore(cfg, on_chunk=interrupt_at("targets", 2))
    assert len(calls) == keys_step.chunks_total - 5  # nothing computed twice
    assert read_manifest(out).steps.targets.rows_done == 3 * 128

    build_datastore(cfg)
    assert len(calls) == keys_step.chunks_total - 5  # keys were done: no forward at all
    assert read_bytes(out) == read_bytes(built)


def test_changed_k_redoes_only_targets_and_changed_index_redoes_index(tmp_path, tiny_llama_dir, built):
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    mtimes = {f: (out / f).stat().st_mtime_ns for f in ARTEFACTS}
    build_datastore(config(tiny_llama_dir, out, k=4, top_m=2))
    after = {f: (out / f).stat().st_mtime_ns for f in ARTEFACTS}
    assert all(after[f] == mtimes[f] for f in ["tokens.npy", "keys.npy", "values.npy", "index.faiss"])
    t = open_targets(out)
    assert t.k == 4 and t.top_m == 2 and np.diff(t.offsets).max() <= 2
    assert read_manifest(out).steps.targets.kl_truncation_mean > 0

    build_datastore(config(tiny_llama_dir, out, k=4, top_m=2, index="ivfpq", nlist=4))
    m = read_manifest(out)
    assert m.steps.index.type == "ivfpq" and m.steps.targets.status == "done"
    assert (out / "keys.npy").stat().st_mtime_ns == mtimes["keys.npy"]


# --- bad input ---------------------------------------------------------------------------------


def test_other_model_tokenizer_or_corpus_is_refused(tmp_path, tiny_llama_dir, tiny_gpt2_dir, built):
    before = read_bytes(built)
    with pytest.raises(DatastoreError, match="model:.*choose another --out"):
        build_datastore(config(tiny_gpt2_dir, built))
    with pytest.raises(DatastoreError, match=r"corpus_hash.*corpus: .austen:valid. \(max_tokens 600\)"):
        build_datastore(config(tiny_llama_dir, built, max_tokens=500))
    with pytest.raises(DatastoreError, match="block_size"):
        build_datastore(config(tiny_llama_dir, built, block_size=128))
    # same model spec, another tokenizer
    moved = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, moved)
    cfg = config(moved, tmp_path / "tok")
    build_datastore(dataclasses.replace(cfg, k=2, max_tokens=100))
    tiny_tokenizer(vocab_size=300).save_pretrained(moved)
    with pytest.raises(DatastoreError, match="tokenizer_hash"):
        build_datastore(dataclasses.replace(cfg, k=2, max_tokens=100))
    assert read_bytes(built) == before


def test_truncated_or_corrupt_keys_are_reported(tmp_path, tiny_llama_dir, built):
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    keys = out / "keys.npy"
    data = keys.read_bytes()
    keys.write_bytes(data[:-100])
    with pytest.raises(DatastoreError, match="keys.*truncated or corrupt"):
        open_datastore(out)
    with pytest.raises(DatastoreError, match="keys.*truncated or corrupt"):
        build_datastore(config(tiny_llama_dir, out, k=4))
    keys.write_bytes(b"garbage" + data[7:])
    with pytest.raises(DatastoreError, match="not a readable .npy"):
        open_datastore(out)
    (out / "index.faiss").write_bytes(b"x")
    keys.write_bytes(data)
    with pytest.raises(DatastoreError, match="index.faiss.*truncated or corrupt"):
        build_datastore(config(tiny_llama_dir, out))
    (out / "manifest.json").write_text("{")
    with pytest.raises(DatastoreError, match="corrupt"):
        open_datastore(out)


def test_bad_options_fail_before_writing(tmp_path, tiny_llama_dir):
    with pytest.raises(DatastoreError, match="unknown index type 'hnsw'"):
        build_datastore(config(tiny_llama_dir, tmp_path / "a", index="hnsw"))
    with pytest.raises(DatastoreError, match="--k 599 must be smaller than the number of keys N=599"):
        build_datastore(config(tiny_llama_dir, tmp_path / "b", k=599))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(DatastoreError, match="not a memdec datastore"):
        build_datastore(config(tiny_llama_dir, tmp_path / "c"))
    with pytest.raises(DatastoreError, match="not a datastore"):
        open_datastore(tmp_path / "c")


def test_cli(tmp_path, tiny_llama_dir, capsys):
    args = ["datastore", "--model", str(tiny_llama_dir), "--corpus", "austen:valid", "--max-tokens", "300",
            "--block-size", "64", "--stride", "32", "--k", "4", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "x"), "--index", "hnsw"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown index type 'hnsw'" in err
    assert main(args + ["--out", str(tmp_path / "ok"), "--top-m", "2"]) == 0
    out = capsys.readouterr().out
    assert "299 keys" in out and "distinct tokens per row" in out
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["steps"]["targets"]["top_m"] == 2
    assert (
        main(args + ["--out", str(tmp_path / "ok"), "--top-m", "2", "--target-dtype", "uint8", "--no-keep-keys"]) == 0
    )
    out = capsys.readouterr().out
    assert "probs=uint8" in out and "keys.npy deleted" in out and not (tmp_path / "ok" / "keys.npy").exists()
    assert main(args + ["--out", str(tmp_path / "t"), "--index", "torch", "--no-keep-keys"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-keep-keys: a torch index searches keys.npy itself" in err


# --- keys from another model of the same tokenizer (--key-model) ------------------------------


def test_key_model_base_itself_is_the_default_and_another_changes_only_keys(
    tmp_path, tiny_llama_dir, built, tokenizer, capsys
):
    """--key-model = the base gives the default build byte for byte; another model of the same
    tokenizer changes the keys (and so index and targets) but never the tokens, values or windows.
    Going back to the base rebuilds the keys, says why, and gives the default's bytes again."""
    from memdec.testing import save_tiny_model

    same = build_datastore(config(tiny_llama_dir, tmp_path / "same", key_model=str(tiny_llama_dir)))
    assert read_bytes(same) == read_bytes(built)
    assert not read_manifest(same).steps.keys.has("key_model")

    other_model = save_tiny_model(tmp_path / "adapted", "llama", tokenizer, seed=7)
    other = build_datastore(config(tiny_llama_dir, tmp_path / "other", key_model=str(other_model)))
    a, b = open_datastore(built), open_datastore(other)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.values, b.values)
    assert a.keys.shape == b.keys.shape and not np.array_equal(a.keys, b.keys)
    recorded = read_manifest(other).steps.keys.key_model
    assert recorded["spec"] == str(other_model) and len(recorded["hash"]) == 16
    # the keys are the other model's FFN inputs over the base's windows
    other_lm = AutoModelForCausalLM.from_pretrained(other_model).eval()
    with FFNInputCapture(other_lm) as cap:
        other_lm(input_ids=torch.tensor(np.array(a.tokens[:64]), dtype=torch.long)[None])
    np.testing.assert_allclose(b.keys[:64].astype(np.float32), cap.last[0].numpy(), rtol=1e-2, atol=1e-3)

    capsys.readouterr()
    back = build_datastore(config(tiny_llama_dir, tmp_path / "other", progress=True))
    assert "rebuilding the keys" in capsys.readouterr().err
    assert read_bytes(back) == read_bytes(built)


def test_key_model_with_another_tokenizer_is_refused_before_loading(tmp_path, tiny_llama_dir):
    """One clear line, and no weights read: the key model's weights file here is garbage."""
    from memdec.errors import TokenizerMismatchError
    from memdec.testing import save_tiny_model

    foreign = save_tiny_model(tmp_path / "foreign", "llama", tiny_tokenizer(vocab_size=300))
    (foreign / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(TokenizerMismatchError, match="--key-model .* another tokenizer"):
        build_datastore(config(tiny_llama_dir, tmp_path / "x", key_model=str(foreign)))
    assert not (tmp_path / "x").exists()


def test_knn_lm_with_adapted_keys_queries_the_key_model(tmp_path, tiny_llama_dir, tokenizer):
    """kNN-LM over a datastore keyed by another model takes its queries from that model: on the
    datastore's own text and windows every position finds itself at distance ~0. Without the key
    model the retriever refuses, rather than search with the base's keys."""
    from memdec.knnlm import KnnRetriever, knn_pass
    from memdec.testing import save_tiny_model

    adapted = save_tiny_model(tmp_path / "adapted", "llama", tokenizer, seed=3)
    store = build_datastore(config(tiny_llama_dir, tmp_path / "ds", key_model=str(adapted)))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    key_model = AutoModelForCausalLM.from_pretrained(adapted).eval()
    retriever = KnnRetriever(str(store), k=4, tokenizer=tokenizer)
    tokens = open_datastore(store).tokens
    found = knn_pass(base, retriever, tokens, 64, 32, progress=False, key_model=key_model)
    scale = float(np.median(found.dists[:, 1]))
    assert float(np.max(found.dists[:, 0])) < 1e-3 * scale
    with pytest.raises(DatastoreError, match="key model"):
        knn_pass(base, retriever, tokens, 64, 32, progress=False)


# --- saving disk: 8-bit targets, on-disk index, dropped keys ----------------------------------


def test_uint8_targets_are_the_float16_rows_coded(tmp_path, tiny_llama_dir, built):
    from memdec.targets import decode_log_u8

    out = tmp_path / "u8"
    shutil.copytree(built, out)
    build_datastore(config(tiny_llama_dir, out, target_dtype="uint8"))
    step = read_manifest(out).steps.targets
    assert step.prob_dtype == "uint8" and (out / "index.faiss").read_bytes() == (built / "index.faiss").read_bytes()
    t16, t8 = open_targets(built), open_targets(out)
    assert t8.prob_dtype == "uint8" and t8.probs.dtype == np.uint8
    # each uint8 row holds the float16 row's tokens but those past code 255 (p < e^-16 p_max)
    rows16 = np.repeat(np.arange(len(t16)), np.diff(t16.offsets))
    rows8 = np.repeat(np.arange(len(t8)), np.diff(t8.offsets))
    cell16, cell8 = rows16 * 10**6 + t16.token_ids, rows8 * 10**6 + t8.token_ids
    assert np.isin(cell8, cell16).all()
    p16 = t16.probs.astype(np.float64)
    row_max = np.maximum.reduceat(p16, t16.offsets[:-1])[rows16]
    dropped = ~np.isin(cell16, cell8)
    assert (p16[dropped] < row_max[dropped] * np.exp(-15)).all()
    precise = ~dropped & (p16 > 2**-14)  # float16 normal numbers; subnormals are too coarse to compare
    assert (p16[precise] > row_max[precise] * np.exp(-16.1)).all()
    # the decoded rows: the float16 rows renormalised over what was kept, within a code step where
    # float16 itself is precise (normal numbers)
    o, _, p = t8.gather(np.arange(len(t8)))
    np.testing.assert_allclose(p, decode_log_u8(t8.offsets, t8.probs), rtol=1e-6)
    kept16 = p16[~dropped] / np.bincount(rows16[~dropped], weights=p16[~dropped])[rows8]
    normal = p16[~dropped] > 2**-14
    np.testing.assert_allclose(p[normal], kept16[normal], rtol=2 * (np.exp(1 / 32) - 1) + 2e-3)
    assert step.bytes_per_token < read_manifest(built).steps.targets.bytes_per_token
    build_datastore(config(tiny_llama_dir, out, target_dtype="uint8"))  # a rerun keeps them
    assert read_manifest(out).steps.targets == step
    with pytest.raises(DatastoreError, match="--target-dtype must be one of float16, uint8"):
        build_datastore(config(tiny_llama_dir, out, target_dtype="int4"))


def test_ondisk_index_datastore_and_dropped_keys(tmp_path, tiny_llama_dir, built):
    out = tmp_path / "disk"
    shutil.copytree(built, out)
    cfg = config(tiny_llama_dir, out, index="ivfpq-disk", nlist=4, pq_m=16, keep_keys=False)
    build_datastore(cfg)
    m = read_manifest(out)
    assert m.steps.index.type == "ivfpq-disk" and m.steps.keys.dropped is True
    assert not (out / "keys.npy").exists() and "keys.npy" not in m.disk["files"]
    assert m.disk["files"]["index.ivfdata"] == m.steps.index.get_extra("ivfdata_bytes")
    store = open_datastore(out)
    assert store.keys is None and store.load_index().ntotal == 599
    assert len(open_targets(out)) == 599
    build_datastore(cfg)  # nothing to redo: fine without the keys
    with pytest.raises(DatastoreError, match="cannot rebuild the kNN targets: keys.npy was deleted"):
        build_datastore(dataclasses.replace(cfg, k=4))
    with pytest.raises(DatastoreError, match="cannot rebuild the index: keys.npy was deleted"):
        build_datastore(dataclasses.replace(cfg, index="flat"))
    (out / "index.ivfdata").unlink()
    with pytest.raises(
        DatastoreError, match="cannot rebuild the index"
    ):  # its lists gone: only the keys could redo them
        build_datastore(cfg)
    with pytest.raises(DatastoreError, match="--no-keep-keys: a torch index searches keys.npy itself"):
        build_datastore(config(tiny_llama_dir, tmp_path / "t", index="torch", keep_keys=False))
    assert not (tmp_path / "t").exists()
