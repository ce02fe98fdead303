"""`memdec serve`: a real server in a subprocess, a real client (the official `openai` package).

One server holds a tiny base, an adapt-run folder's decoder (`--run`) and a second decoder
(`--memdec b=CKPT`); a second server with `--max-batch 1 --max-queue 1` is filled up for 429s.
Greedy answers are compared with `generate()` of the same models in this process.
"""

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from memdec.cli import main  # noqa: E402
from memdec.joint import MemoryDecoderModel  # noqa: E402
from memdec.testing import save_tiny_model, tiny_model, tiny_tokenizer  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["It is a truth universally", "Mr. Darcy said", "The", "She had a lively, playful disposition, which",
           "Elizabeth", "In vain have I struggled. It will not do."]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Models on disk: a base folder with a chat template, an adapt run, and a second decoder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("serve")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    peaked = {"initializer_range": 0.2}  # the default init gives near-uniform models that repeat one token
    base_dir = save_tiny_model(root / "tiny-base", "llama", tok, seed=0, **peaked)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    run = root / "run-a"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"model": str(base_dir)}))
    MemoryDecoderModel(base, tiny_model("llama", tok, seed=1, **peaked), lmbda=0.5).save_pretrained(
        run / "memdec", tokenizer=tok
    )
    MemoryDecoderModel(base, tiny_model("llama", tok, seed=2, **peaked), lmbda=0.3).save_pretrained(
        root / "dec-b", tokenizer=tok
    )
    tok = AutoTokenizer.from_pretrained(base_dir)
    joint_a = MemoryDecoderModel.from_pretrained(base, run / "memdec", tokenizer=tok)
    joint_b = MemoryDecoderModel.from_pretrained(base, root / "dec-b", tokenizer=tok)
    return {"root": root, "base_dir": base_dir, "run": run, "dec_b": root / "dec-b", "tok": tok, "base": base,
            "run-a": joint_a, "b": joint_b}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m memdec.cli serve ...` in a subprocess, stopped with SIGTERM."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "memdec.cli", "serve", "--port", str(self.port), *args],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not answer /health in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             http_client=httpx.Client(trust_env=False, timeout=60))

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()


@pytest.fixture(scope="module")
def server(served):
    srv = Server(["--run", str(served["run"]), "--memdec", f"b={served['dec_b']}", "--max-batch", "4",
                  "--max-queue", "16", "--max-tokens", "16"], served["root"] / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()
    assert "memdec serve: stopped" in srv.log.read_text()


@pytest.fixture(scope="module")
def small_server(served):
    srv = Server(["--model", str(served["base_dir"]), "--max-batch", "1", "--max-queue", "1"],
                 served["root"] / "small.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def greedy(model, tok, ids: list[int], n: int) -> str:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def chat_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# Listing and exact outputs


def test_models_and_health(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["tiny-base", "run-a", "b"]
    health = server.health()
    assert health["status"] == "ok" and health["max_batch"] == 4 and health["max_queue"] == 16
    log = server.log.read_text()
    assert f"http://127.0.0.1:{server.port}/v1" in log and "λ = 0.50" in log and "λ = 0.30" in log


def test_greedy_completions_equal_generate(server, served):
    client, tok = server.client(), served["tok"]
    prompt = PROMPTS[0]
    ids = tok(prompt)["input_ids"]
    base_text = greedy(served["base"], tok, ids, 12)
    for model, extra in (("tiny-base", {}), ("run-a", {"lambda": 0}), ("b", {"lambda": 0.0})):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
        assert r.choices[0].text == base_text, model
    r = client.completions.create(model="run-a", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == greedy(served["run-a"], tok, ids, 12)
    assert r.usage.prompt_tokens == len(ids) and r.model == "run-a" and r.object == "text_completion"
    joint_b = served["b"]
    joint_b.lmbda = 0.8
    r = client.completions.create(model="b", prompt=prompt, max_tokens=12, temperature=0, extra_body={"lambda": 0.8})
    assert r.choices[0].text == greedy(joint_b, tok, ids, 12)
    assert greedy(joint_b, tok, ids, 12) != base_text  # the decoder changes the answer


def test_streaming_completion(server, served):
    client = server.client()
    full = client.completions.create(model="run-a", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="run-a", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "The", "max_tokens": 3, "stream": True,
                                                                     "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] >= 1


def test_chat_equals_generate(server, served):
    client, tok = server.client(), served["tok"]
    messages = [{"role": "system", "content": "You are Jane."}, {"role": "user", "content": "Who is Mr. Darcy?"}]
    expect = greedy(served["run-a"], tok, chat_ids(tok, messages), 12)
    r = client.chat.completions.create(model="run-a", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expect and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="run-a", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expect
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model="tiny-base", messages=messages, max_completion_tokens=12, temperature=0)
    assert r.choices[0].message.content == greedy(served["base"], tok, chat_ids(tok, messages), 12)


def test_batched_equals_one_at_a_time(server, served):
    client, tok = server.client(), served["tok"]
    lengths = [12, 5, 9, 16, 7, 11]
    expect = [greedy(served["run-a"], tok, tok(p)["input_ids"], n) for p, n in zip(PROMPTS, lengths)]
    before = server.health()["batches"]

    def ask(i):
        r = client.completions.create(model="run-a", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
        return r.choices[0].text

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(ask, range(len(PROMPTS))))
    assert got == expect
    health = server.health()
    assert health["largest_batch"] > 1 and health["batches"] - before < len(PROMPTS)


def test_stop_n_seed_logprobs(server, served):
    client, tok = server.client(), served["tok"]
    text = greedy(served["run-a"], tok, tok(PROMPTS[0])["input_ids"], 16)
    stop = text[4:6]
    r = client.completions.create(model="run-a", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"
    kw = {"model": "b", "prompt": [PROMPTS[2], PROMPTS[4]], "max_tokens": 8, "temperature": 0.9, "n": 2, "seed": 7}
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    r = client.completions.create(model="run-a", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(top) <= 2 and max(top.values()) >= chosen - 1e-5 for top, chosen in zip(lp.top_logprobs,
                                                                                          lp.token_logprobs))


# --------------------------------------------------------------------------------------------
# Errors


LONG = "word " * 300
ERRORS = [  # (path, body (str: raw), status, param, code)
    ("/v1/completions", "{not json", 400, None, "invalid_json"),
    ("/v1/completions", "[1, 2]", 400, None, "invalid_json"),
    ("/v1/completions", {"prompt": "x", "foo": 1}, 400, "foo", "unknown_parameter"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "model": "run-a", "lambda": 1.5}, 400, "lambda", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "model": "run-a", "lambda": "0.5"}, 400, "lambda", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "model": "tiny-base", "lambda": 0.5}, 400, "lambda", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "run-a"}, 400, "prompt", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs",
     "unsupported_parameter"),
    ("/v1/nothing", {}, 404, None, None),
]


@pytest.mark.parametrize("path, body, status, param, code", ERRORS)
def test_error_shape(server, path, body, status, param, code):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(server.url + path, headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["message"] and err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)


def test_neutral_openai_fields_are_accepted(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "presence_penalty": 0,
                                                         "logit_bias": {}, "echo": False})
    assert r.status_code == 200, r.text


def test_openai_client_raises_on_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="lambda"):
        client.completions.create(model="run-a", prompt="x", extra_body={"lambda": -1})


def test_queue_full_429_and_disconnect(small_server):
    busy = {"prompt": "The", "max_tokens": 200, "temperature": 2.0, "n": 16}  # 16 rows x 200 steps

    def post(body):
        return httpx.post(small_server.url + "/v1/completions", json=body, timeout=60)

    with cf.ThreadPoolExecutor(6) as pool:
        first = pool.submit(post, busy)
        time.sleep(0.3)  # let it start
        rest = [pool.submit(post, {"prompt": "x", "max_tokens": 2}) for _ in range(5)]
        codes = [f.result().status_code for f in rest]
        assert first.result().status_code == 200
    assert codes.count(429) >= 3 and set(codes) <= {200, 429}, codes
    r = next(f.result() for f in rest if f.result().status_code == 429)
    assert r.headers["retry-after"] == "1"
    assert set(r.json()["error"]) == ERROR_KEYS and r.json()["error"]["type"] == "rate_limit_error"

    before = small_server.health()["cancelled"]
    with httpx.stream("POST", small_server.url + "/v1/completions", json={**busy, "stream": True}) as stream:
        next(stream.iter_lines())  # the first event, then hang up
    deadline = time.monotonic() + 10
    while small_server.health()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert small_server.health()["cancelled"] == before + 1
    assert post({"prompt": "x", "max_tokens": 2}).status_code == 200


# --------------------------------------------------------------------------------------------
# Arguments are checked before anything loads


@pytest.mark.parametrize("args, message", [
    (["--lambda", "2"], "--lambda"),
    (["--max-batch", "0"], "--max-batch"),
    (["--port", "70000"], "--port"),
    (["--memdec", "/no/such/ckpt"], "no such memory decoder"),
    (["--run", "/no/such/run"], "not a finished memdec adapt run"),
    (["--device", "tpu"], "--device"),
])
def test_bad_arguments(args, message, capsys):
    assert main(["serve", *args]) == 2
    assert message in capsys.readouterr().err


def test_argument_conflicts(served, capsys):
    run, base = str(served["run"]), str(served["base_dir"])
    assert main(["serve", "--run", run, "--model", base]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["serve", "--model", base, "--memdec", f"x={served['dec_b']}", "--memdec", f"x={served['dec_b']}"]) == 2
    assert "taken" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--model", base, "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err
