"""Reliability round four: seeds, beam widths and texts that no command can use are one line before any work
(issue 36 items 9 and 10; issue 32 item 3, the command-line side; the server's side is in test_serve_limits.py)."""

from __future__ import annotations

import pytest

from memdec.checks import GREEDY_BELOW, SEED_MAX, check_seed, check_text, shown
from memdec.errors import MemdecError
from memdec.generate import MAX_BEAMS, GenerateConfig, generate_kwargs
from memdec.testing import tiny_tokenizer
from test_reliability3_cli import ckpt, one_line_error  # noqa: F401 - ckpt is a fixture

HUGE = "9" * 23  # over 2**64
VAST = 10**4999  # 5,000 digits: over the 4,300 that Python prints


@pytest.mark.parametrize("value", [-1, 2**32, int(HUGE), VAST, True, 1.5, "3"],
                         ids=["-1", "2**32", "23 digits", "5000 digits", "true", "1.5", "a string"])
def test_a_seed_is_a_whole_number_numpy_and_torch_both_take(value):
    with pytest.raises(MemdecError, match=rf"^--seed must be a whole number from 0 to {SEED_MAX}, got ") as err:
        check_seed(value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200
    assert check_seed(0) == 0 and check_seed(SEED_MAX) == SEED_MAX


def test_an_integer_too_long_to_print_is_shown_by_its_size():
    assert shown(VAST) == "an integer of about 5000 digits"
    assert shown(12) == "12"


def seed_argvs(tiny_llama_dir, store, ckpt, tmp_path, seed: str) -> dict[str, list[str]]:
    model = ["--model", str(tiny_llama_dir)]
    return {
        "train": [
            "train",
            "--datastore",
            str(store),
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
            "--seed",
            seed,
            "--device",
            "cpu",
        ],
        "generate": ["generate", *model, "--memdec", str(ckpt), "--prompt", "Anne", "--seed", seed, "--device", "cpu"],
        "router": [
            "router",
            *model,
            "--memdec",
            str(ckpt),
            "--domain-corpus",
            "austen:train",
            "--valid",
            "austen:valid",
            "--out",
            str(tmp_path / "router"),
            "--seed",
            seed,
            "--device",
            "cpu",
        ],
        "router --domains": [
            "router",
            "--domains",
            *model,
            "--memdec",
            f"a={ckpt}",
            "--domain-corpus",
            "a=austen:train",
            "--out",
            str(tmp_path / "domains"),
            "--seed",
            seed,
            "--device",
            "cpu",
        ],
        "tasks": ["tasks", "general", "--out", str(tmp_path / "tasks"), "--seed", seed],
    }


@pytest.mark.parametrize("command", ["train", "generate", "router", "router --domains", "tasks"])
@pytest.mark.parametrize("seed", ["-1", HUGE])
def test_a_bad_seed_is_one_line_before_any_work(command, seed, tiny_llama_dir, store, ckpt, tmp_path, capsys):
    argv = seed_argvs(tiny_llama_dir, store, ckpt, tmp_path, seed)[command]
    line = one_line_error(capsys, argv)
    assert "--seed must be a whole number from 0 to 4294967295" in line, line
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_num_beams_is_bounded_before_any_model_loads(capsys):
    line = one_line_error(capsys, ["generate", "--model", "/no/such/model", "--memdec", "/no/such/ckpt", "--prompt",
                                   "Anne", "--num-beams", "100000"])
    assert f"--num-beams must be at most {MAX_BEAMS}, got 100000" in line, line


@pytest.mark.parametrize("prompt", ["\udcff", "Anne \ud800 walked"])
def test_a_prompt_that_is_not_text_is_one_line(prompt, capsys):
    """A command line byte that is not UTF-8 reaches Python as a lone surrogate; the tokenizer would raise a
    TypeError."""
    line = one_line_error(capsys, ["generate", "--model", "/no/such/model", "--memdec", "/no/such/ckpt", "--prompt",
                                   prompt])
    assert "--prompt holds" in line and "a lone surrogate, not text" in line, line
    with pytest.raises(MemdecError):
        check_text(prompt, "--prompt")
    assert check_text("Anne walked, é 漢字 🙂", "--prompt") == "Anne walked, é 漢字 🙂"


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 5e-324, GREEDY_BELOW / 2])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
    cfg = GenerateConfig(prompt=["Anne"], memdec="ck", do_sample=True, temperature=temperature, top_k=5)
    kw = generate_kwargs(cfg, tiny_tokenizer())
    assert kw["do_sample"] is False and "temperature" not in kw and "top_k" not in kw
    sampled = generate_kwargs(GenerateConfig(prompt=["Anne"], memdec="ck", do_sample=True, temperature=GREEDY_BELOW),
                              tiny_tokenizer())
    assert sampled["do_sample"] is True and sampled["temperature"] == GREEDY_BELOW


def test_greedy_below_a_tiny_temperature_gives_the_greedy_tokens(tiny_llama_dir, ckpt, capsys):
    """Through the whole command: --do-sample at 1e-45 prints what greedy decoding prints."""
    from memdec.cli import main

    common = ["generate", "--model", str(tiny_llama_dir), "--memdec", str(ckpt), "--prompt", "Anne walked",
              "--max-new-tokens", "6", "--device", "cpu"]
    assert main(common) == 0
    greedy = capsys.readouterr().out
    assert main([*common, "--do-sample", "--temperature", "1e-45"]) == 0
    assert capsys.readouterr().out == greedy
