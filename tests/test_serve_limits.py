"""`memdec serve`'s limits and authentication (issue 24, items 4-6), against a real server.

One server subprocess on 127.0.0.1 serves a tiny base model with its key from `MEMDEC_API_KEY`,
`--max-batch 2` and `--max-request-rows 6` (the body limit is the default, 1 MiB). Requests go to
127.0.0.1 only, each loop is bounded, and /health is asked after every hostile request.
"""

import json
import os
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from memdec.cli import main  # noqa: E402
from memdec.serve import DEFAULT_MAX_BODY_BYTES, ServeConfig, check_config  # noqa: E402
from memdec.testing import save_tiny_model, tiny_tokenizer  # noqa: E402
from test_serve import ERROR_KEYS, PROMPTS, Server, greedy  # noqa: E402

KEY = "sk-memdec-test-6b1f0c2e9a"
WRONG = "sk-memdec-wrong-51d7e3"
MAX_BATCH, MAX_ROWS = 2, 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model on disk, and the same model and tokenizer in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("serve-limits")
    base_dir = save_tiny_model(root / "tiny-base", "llama", tiny_tokenizer(), seed=0, initializer_range=0.2)
    return {"root": root, "dir": base_dir, "model": AutoModelForCausalLM.from_pretrained(base_dir).eval(),
            "tok": AutoTokenizer.from_pretrained(base_dir)}


@pytest.fixture(scope="module")
def server(base):
    """The key comes from the environment (the flag's fallback), so it is on no command line."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMDEC_API_KEY", KEY)
        srv = Server(["--model", str(base["dir"]), "--max-batch", str(MAX_BATCH), "--max-request-rows",
                      str(MAX_ROWS), "--max-tokens", "8"], base["root"] / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()
    assert KEY not in srv.log.read_text()


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path: str, body, headers: dict | None = None, timeout: float = 30) -> "httpx.Response":
    """POST ``body`` (bytes/str as is, else JSON) with the right key unless ``headers`` says otherwise."""
    headers = AUTH if headers is None else headers
    kw = {"content": body} if isinstance(body, (bytes, str)) else {"json": body}
    return httpx.post(server.url + path, headers={"content-type": "application/json", **headers}, timeout=timeout, **kw)


def assert_error(r, status: int, code: str | None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["message"] and (err["code"], err["param"]) == (code, param)
    return err


def assert_alive(server) -> None:
    r = httpx.get(server.url + "/health", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def client(server, key: str = KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=60))


# --------------------------------------------------------------------------------------------
# Authentication


@pytest.mark.parametrize("headers", [{}, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}])
def test_v1_needs_the_key(server, headers):
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/v1/nothing")):
        r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x", "max_tokens": 1})
        err = assert_error(r, 401, "invalid_api_key")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        assert KEY not in r.text and WRONG not in r.text


def test_the_key_opens_v1_and_health_is_open(server, base):
    assert_alive(server)  # no key
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny-base"]
    ids = base["tok"](PROMPTS[0])["input_ids"]
    r = c.completions.create(model="tiny-base", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy(base["model"], base["tok"], ids, 6)
    with pytest.raises(openai.AuthenticationError):
        client(server, WRONG).models.list()
    assert_error(post(server, "/v1/nothing", {}), 404, None)  # with the key, an unknown path is a 404


def test_the_key_is_never_printed(server):
    post(server, "/v1/completions", {"prompt": "x"}, headers={"Authorization": f"Bearer {WRONG}"})
    log = server.log.read_text()
    assert "memdec serve: http://127.0.0.1" in log and "API key required" in log
    assert KEY not in log and WRONG not in log


# --------------------------------------------------------------------------------------------
# Body size, rows per request, nesting


def test_an_oversized_body_is_413_and_the_server_lives(server):
    huge = json.dumps({"prompt": ["x"] * 1_000_000})  # 6 MB: once 24 GB of RSS and a killed server
    t0 = time.monotonic()
    err = assert_error(post(server, "/v1/completions", huge), 413, "request_too_large")
    assert str(DEFAULT_MAX_BODY_BYTES) in err["message"] and time.monotonic() - t0 < 20
    assert_alive(server)

    def chunks():  # no Content-Length: the server counts while it reads
        for _ in range(96):
            yield b" " * 65536

    r = httpx.post(server.url + "/v1/completions", headers=AUTH, content=chunks(), timeout=30)
    assert_error(r, 413, "request_too_large")
    assert_alive(server)


def read_http_reply(sock: socket.socket) -> tuple[str, str]:
    """(status line, body) of one HTTP/1.1 reply read from ``sock``: the headers may come in one
    segment and the body in another, so read until the body's Content-Length has arrived."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(body)} of {length} body bytes"
        body += chunk
    return lines[0], body[:length].decode()


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    """A Content-Length over the limit gets its 413 at once: the server does not wait for the body."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10**12}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head.encode())
        status, body = read_http_reply(s)
    assert status.startswith("HTTP/1.1 413"), status
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert_alive(server)


@pytest.mark.parametrize("body, param", [
    ({"prompt": ["x"] * 200_000}, "prompt"),  # under the byte limit, but 200,000 rows
    ({"prompt": ["a", "b", "c", "d"], "n": 2}, "n"),  # 8 rows > 6
    ({"prompt": ["x"] * (MAX_ROWS + 1)}, "prompt"),
])
def test_too_many_rows_is_400(server, body, param):
    t0 = time.monotonic()
    err = assert_error(post(server, "/v1/completions", body), 400, "too_many_rows", param)
    assert f"at most {MAX_ROWS}" in err["message"] and time.monotonic() - t0 < 20
    assert_alive(server)


def test_chat_rows_are_capped_too(server):
    body = {"messages": [{"role": "user", "content": "x"}], "n": MAX_ROWS + 1}
    assert_error(post(server, "/v1/chat/completions", body), 400, "too_many_rows", "n")


@pytest.mark.parametrize("raw", [
    '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"prompt": "x", "user": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}",
    "[" * 100_000 + "]" * 100_000,
    '{"prompt": "x", "user": ' + "[" * 200 + "]" * 200 + "}",  # parses, but deeper than the server takes
])
def test_deep_nesting_is_400(server, raw):
    err = assert_error(post(server, "/v1/completions", raw), 400, "invalid_json")
    assert "nested" in err["message"]
    assert_alive(server)


# --------------------------------------------------------------------------------------------
# A request larger than --max-batch runs in several batches


def test_rows_beyond_max_batch_are_split_and_equal_one_at_a_time(server, base):
    c, tok = client(server), base["tok"]
    prompts = PROMPTS[:3]
    expect = [greedy(base["model"], tok, tok(p)["input_ids"], 7) for p in prompts]
    singles = [
        c.completions.create(model="tiny-base", prompt=p, max_tokens=7, temperature=0).choices[0].text for p in prompts
    ]
    assert singles == expect
    before = httpx.get(server.url + "/health").json()
    r = c.completions.create(model="tiny-base", prompt=prompts, n=2, max_tokens=7, temperature=0)  # 6 rows, max-batch 2
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [t for t in expect for _ in range(2)]
    health = httpx.get(server.url + "/health").json()
    assert health["largest_batch"] <= MAX_BATCH and health["batches"] - before["batches"] >= 3

    texts = [""] * 6
    for chunk in c.completions.create(model="tiny-base", prompt=prompts, n=2, max_tokens=7, temperature=0, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert texts == [t for t in expect for _ in range(2)]


def test_a_split_seeded_request_repeats_and_its_batches_differ(server):
    c = client(server)
    kw = {"model": "tiny-base", "prompt": PROMPTS[2], "n": 4, "max_tokens": 8, "temperature": 1.0, "seed": 11}
    first = [ch.text for ch in c.completions.create(**kw).choices]
    assert first == [ch.text for ch in c.completions.create(**kw).choices]
    assert first[:2] != first[2:]  # the second batch is not the first one's seed replayed


# --------------------------------------------------------------------------------------------
# Arguments, checked before anything loads


def test_a_public_host_needs_a_key(base, capsys, monkeypatch):
    monkeypatch.delenv("MEMDEC_API_KEY", raising=False)
    model = str(base["dir"])
    for host in ("0.0.0.0", "192.168.1.7", "::", "example.com"):
        assert main(["serve", "--model", model, "--host", host]) == 2
        err = capsys.readouterr().err
        assert err.startswith("memdec: error: --host") and "--api-key" in err and len(err.splitlines()) == 1
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost"):
        check_config(ServeConfig(model=model, host=host))
    check_config(ServeConfig(model=model, host="0.0.0.0", allow_unauthenticated=True))
    assert check_config(ServeConfig(model=model, host="0.0.0.0", api_key=KEY)).api_key == KEY
    monkeypatch.setenv("MEMDEC_API_KEY", KEY)
    assert check_config(ServeConfig(model=model, host="0.0.0.0")).api_key == KEY
    assert check_config(ServeConfig(model=model, api_key=WRONG)).api_key == WRONG  # the flag wins
    monkeypatch.setenv("MEMDEC_API_KEY", "")
    assert check_config(ServeConfig(model=model)).api_key is None


@pytest.mark.parametrize("args, message", [
    (["--max-request-rows", "0"], "--max-request-rows"),
    (["--max-body-bytes", "0"], "--max-body-bytes"),
    (["--api-key", ""], "--api-key"),
    (["--api-key", "has a space " + KEY], "--api-key"),
])
def test_bad_limit_and_key_arguments(args, message, capsys):
    assert main(["serve", "--model", "/no/such/model", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memdec: error: {message}") and KEY not in err and len(err.splitlines()) == 1


def test_the_server_is_alive_at_the_end(server):
    assert server.proc.poll() is None
    assert_alive(server)
    assert os.environ.get("MEMDEC_API_KEY") != KEY  # the key was set for the server's process only


def test_an_integer_of_too_many_digits_is_400(server):
    """Python refuses to parse integers over 4300 digits (a ValueError, once a 500; then a 400 that told the
    client to call ``sys.set_int_max_str_digits()``)."""
    err = assert_error(post(server, "/v1/completions", '{"prompt": "x", "seed": ' + "7" * 5000 + "}"), 400,
                       "invalid_json")
    assert "an integer of 5000 digits (at most 4300)" in err["message"] and "sys." not in err["message"], err
    assert_alive(server)


LONE = "\\ud800"  # a JSON escape of a lone UTF-16 surrogate: valid JSON, not text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"prompt": "Anne LONE walked", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["Anne", "LONE"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "Anne", "stop": ["LONE"], "max_tokens": 2}', "stop"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "LONE"}], "max_tokens": 2}', "messages[0]"),
])
def test_a_lone_surrogate_is_400_naming_the_field(server, path, body, param):
    """Once a 500 (the tokenizer's TypeError)."""
    r = post(server, path, body.replace("LONE", LONE))
    if param == "messages[0]" and r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template":
        pytest.skip("the tiny tokenizer has no chat template")
    err = assert_error(r, 400, "invalid_value", param)
    assert "lone surrogate" in err["message"] and "\\ud800" in err["message"], err
    assert_alive(server)


def test_a_model_name_with_a_lone_surrogate_is_404_in_ascii_json(server):
    """The error message quotes the name: its body is ASCII JSON, so it still encodes."""
    r = post(server, "/v1/completions", '{"prompt": "x", "model": "LONE"}'.replace("LONE", LONE))
    assert_error(r, 404, "model_not_found", "model")
    assert_alive(server)


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 5e-324])
def test_a_tiny_temperature_is_greedy(server, base, temperature):
    """Once a 500 (``probability tensor contains either inf, nan or element < 0``), for the base model too."""
    prompt = PROMPTS[0]
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": temperature})
    assert r.status_code == 200, r.text
    zero = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0})
    assert r.json()["choices"][0]["text"] == zero.json()["choices"][0]["text"]
    assert_alive(server)
