"""OpenAI requests in: the body read within ``--max-body-bytes`` and parsed (``read_body``,
``parse_json_object``), each field checked (``get_int``, ``get_number``, ``get_text``, ``get_stop``, ...),
the model and λ picked, the prompts tokenized within the context: ``parse_completion`` and ``parse_chat``
give a ``GenRequest``. Every refusal is an ``ApiError``, OpenAI's error shape.
"""

from dataclasses import dataclass, field

from ..checks import GREEDY_BELOW, check_context, check_lambda, check_text
from ..errors import MemdecError
from ..files import JSONTooDeep, parse_json
from .config import AUTO
from .models import Models

MAX_N = 16  # choices per prompt
MAX_STOPS = 16
MAX_JSON_DEPTH = 32  # containers inside containers in a request body (an OpenAI request needs about 5)


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")


@dataclass
class GenRequest:
    """A validated, tokenized completion or chat request."""

    kind: str  # "completion" or "chat"
    model: str  # the id the client asked for
    target: str  # the id that generates: the base when λ = 0
    lmbda: float | None
    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn: a temperature below ``GREEDY_BELOW`` (0 included) is greedy."""
        return self.temperature >= GREEDY_BELOW

    def batch_key(self):
        """Requests with equal keys may share one generate() call."""
        if self.sampling and self.seed is not None:
            return object()  # a seeded sample must not depend on its neighbours: it runs alone
        mode = ("sample", self.temperature, self.top_p) if self.sampling else ("greedy",)
        return (self.target, self.lmbda, *mode)


_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "lambda",
           "user"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
# OpenAI fields memdec serve does not implement: a 400 unless the value asks for nothing (0, false, null, {}, []).
OPENAI_FIELDS = {"best_of", "echo", "suffix", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
                 "top_logprobs", "tools", "tool_choice", "functions", "function_call", "response_format",
                 "parallel_tool_calls", "service_tier", "store", "metadata", "modalities", "audio", "prediction",
                 "reasoning_effort", "web_search_options", "top_k", "repetition_penalty"}


def _neutral(value) -> bool:
    return value is None or value is False or value == {} or value == [] or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def check_fields(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in OPENAI_FIELDS:
            if _neutral(value):
                continue
            raise ApiError(400, f"`{key}` is not supported by memdec serve", param=key, code="unsupported_parameter")
        raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")


def _get(body: dict, name: str, default=None):
    value = body.get(name)
    return default if value is None else value


def get_int(body: dict, name: str, default, lo: int, hi: int | None = None):
    value = _get(body, name, default)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo}"
        raise ApiError(400, f"`{name}` must be an integer {bounds}, got {value!r}", param=name, code="invalid_value")
    return value


def get_number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = _get(body, name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (lo < value if lo_open else lo <= value) \
        and value <= hi
    if not ok:
        raise ApiError(400, f"`{name}` must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}",
                       param=name, code="invalid_value")
    return float(value)


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = _get(body, name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"`{name}` must be true or false, got {value!r}", param=name, code="invalid_value")
    return value


def get_text(text: str, param: str) -> str:
    """A request's string that a tokenizer can read, or a 400 naming ``param`` (a lone surrogate is not text)."""
    try:
        return check_text(text, f"`{param}`")
    except MemdecError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None


def get_stop(body: dict) -> list[str]:
    stop = _get(body, "stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"`stop` must be a non-empty string or a list of at most {MAX_STOPS} of them",
                       param="stop", code="invalid_value")
    return [get_text(s, "stop") for s in stop]


def pick_model(body: dict, models: Models) -> tuple[str, str, float | None]:
    """(requested id, id that generates, λ) from ``model`` and ``lambda``; λ None: the decoder's default (its
    token router, else its λ). ``auto``: the worker routes the request (target ``auto``)."""
    name = _get(body, "model", next(iter(models.joints), models.base_id))  # default: the first decoder
    if not isinstance(name, str) or name not in models.ids:
        raise ApiError(404, f"The model `{name}` does not exist; this server has: {', '.join(models.ids)}",
                       param="model", code="model_not_found")
    lam = body.get("lambda")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
        raise ApiError(400, f"`lambda` must be a number in [0, 1], got {lam!r}", param="lambda", code="invalid_value")
    if name == models.base_id:
        if lam is not None and lam != 0:
            raise ApiError(400, f"`lambda` applies to a memory decoder; `{name}` is the base model alone "
                                f"(pick one of {', '.join(models.joints) or 'none'})", param="lambda",
                           code="invalid_value")
        return name, name, None
    if name == AUTO:
        if lam is not None:
            raise ApiError(400, f"`lambda` applies to a named memory decoder; `{AUTO}` answers with the routed "
                                f"decoder's own", param="lambda", code="invalid_value")
        return name, name, None
    try:
        lam = None if lam is None else check_lambda(lam)
    except MemdecError as exc:
        raise ApiError(400, f"`lambda`: {exc}", param="lambda", code="invalid_value") from None
    return name, (models.base_id if lam == 0 else name), lam


def token_budget(n_prompt: int, requested: int | None, default: int, context: int | None, param: str) -> int:
    """max_tokens for one prompt, or a context_length_exceeded error."""
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", param=param, code="invalid_value")
    check_context(n_prompt, requested, context, lambda message, part: ApiError(
        400, message, param=param if part == "prompt" else "max_tokens", code="context_length_exceeded"))
    if context is None:
        return requested or default
    return requested or min(default, context - n_prompt)


def parse_common(body: dict, models: Models, kind: str, prompts: list[list[int]], param: str, default_max: int,
                 max_tokens: int | None) -> GenRequest:
    model, target, lam = pick_model(body, models)
    stream = get_bool(body, "stream", False)
    options = _get(body, "stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"} or (options and not stream):
        raise ApiError(400, "`stream_options` takes {\"include_usage\": bool}, with stream: true",
                       param="stream_options", code="invalid_value")
    budgets = [token_budget(len(p), max_tokens, default_max, models.context, param) for p in prompts]
    return GenRequest(
        kind=kind, model=model, target=target, lmbda=None if target == models.base_id else lam, prompts=prompts,
        max_tokens=budgets,
        n=get_int(body, "n", 1, 1, MAX_N), temperature=get_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=get_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), stop=get_stop(body),
        seed=get_int(body, "seed", None, -(2**63), 2**64 - 1), stream=stream,
        include_usage=get_bool(options, "include_usage", False),
    )


def check_rows(n_prompts: int, n: int, max_rows: int) -> None:
    """A 400 (before anything is tokenized) for a request of more than ``max_rows`` rows (prompts × n)."""
    if n_prompts * n > max_rows:
        raise ApiError(400, f"This request asks for {n_prompts * n} completions ({n_prompts} prompt(s) × n = {n}); "
                            f"this server takes at most {max_rows} per request: split it",
                       param="prompt" if n_prompts > max_rows else "n", code="too_many_rows")


def parse_completion(body: dict, models: Models, default_max: int, max_rows: int) -> GenRequest:
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt
    bad = "`prompt` must be a string or a non-empty list of strings (token-id prompts are not supported)"
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, bad, param="prompt", code="invalid_value")
    check_rows(len(texts), get_int(body, "n", 1, 1, MAX_N), max_rows)
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, bad, param="prompt", code="invalid_value")
    prompts = [models.tokenizer(get_text(t, "prompt"))["input_ids"] for t in texts]
    req = parse_common(body, models, "completion", prompts, "prompt", default_max, get_int(body, "max_tokens", None, 1))
    req.logprobs = get_int(body, "logprobs", None, 0, 5)
    return req


def chat_messages(body: dict) -> list[dict]:
    """``messages`` as [{"role", "content": str}], or a 400."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must have a role (system, user or assistant) and text content",
                           param=f"messages[{i}]", code="invalid_value")
        out.append({"role": "system" if role == "developer" else role, "content": get_text(content, f"messages[{i}]")})
    return out


def parse_chat(body: dict, models: Models, default_max: int, max_rows: int) -> GenRequest:
    check_fields(body, CHAT_FIELDS)
    messages = chat_messages(body)
    check_rows(1, get_int(body, "n", 1, 1, MAX_N), max_rows)
    tok = models.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages",
                       code="no_chat_template")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template's own error message is the clearest
        raise ApiError(400, f"the chat template failed on these messages: {exc}", param="messages") from None
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    limit = get_int(body, "max_completion_tokens", None, 1)
    limit = get_int(body, "max_tokens", None, 1) if limit is None else limit
    return parse_common(body, models, "chat", [prompt], "messages", default_max, limit)


async def read_body(request, limit: int) -> dict:
    """The JSON object of a request body of at most ``limit`` bytes: a 413 as soon as its Content-Length, or
    the bytes read so far of a chunked body, pass the limit (the rest is never held)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise body_too_large(limit)
    return parse_json_object(bytes(raw))


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than this server takes ({limit} bytes, --max-body-bytes)",
                    code="request_too_large")


def parse_json_object(raw: bytes) -> dict:
    """A request body's JSON object, or a 400: malformed, not an object, or nested too deeply."""
    too_deep = ApiError(400, f"The request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                        code="invalid_json")
    try:
        body = parse_json(raw, MAX_JSON_DEPTH)
    except JSONTooDeep:
        raise too_deep from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    return body
