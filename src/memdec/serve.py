"""``memdec serve``: an OpenAI-compatible HTTP server for a base model and its memory decoders.

One base model is loaded once; each memory decoder (``--memdec NAME=CKPT``, repeatable) becomes a
``MemoryDecoderModel`` over that same base. ``GET /v1/models`` lists the base alone and each
decoder; a request's ``model`` picks which one answers, and its ``lambda`` (a memdec extension)
overrides λ for that request (0 gives the base model exactly).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
``GET /v1/models``, ``GET /health``. ``stream: true`` sends server-sent events in OpenAI's chunk
format, ending with ``data: [DONE]``. Every error has OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.

Concurrency: a handler validates and tokenizes its request, then queues a Job (429 when
``--max-queue`` jobs already wait). One worker thread takes the oldest job together with every
waiting job that can share its ``generate()`` call (same model, λ and sampling settings), up to
``--max-batch`` rows, and runs them as one left-padded batch; a job with more rows runs over
several batches. A per-step hook (a stopping criterion) streams each row's new text, stops rows one
by one (EOS, stop strings, their own ``max_tokens``, a client that left) and answers each job as
soon as its rows are done.

Routing (docs/router.md, "Many domains"): with ``--router ROUTER_DIR`` (a domain router,
``memdec router --domains``) a model named ``auto`` is served beside the named ones: the worker routes
each ``auto`` request from its prompt (the base's pooled final hidden states, ``memdec.router.pooled_states``)
to one decoder, or none (the base alone), and that one answers it; the response's extra field
``memdec_domain`` says which. A checkpoint folder that holds a token router (``router.json``) mixes at
its λ_t per position unless ``--lambda`` is given; a request's ``lambda`` mixes that request at the
fixed λ instead.

Limits: a body over ``--max-body-bytes`` gets 413 before it is read whole, a request of more than
``--max-request-rows`` rows (prompts × n) a 400 before it is tokenized, JSON nested deeper than
``MAX_JSON_DEPTH`` a 400. With ``--api-key`` (or ``MEMDEC_API_KEY``) every ``/v1/*`` request needs
``Authorization: Bearer KEY`` (401 otherwise); ``/health`` stays open. A host other than loopback
needs a key or ``--allow-unauthenticated``.
"""

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import threading
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .checkpoint import (MEMDEC_JSON, NO_DOMAIN, check_checkpoint_tokenizer, decoder_fingerprint, read_domain_router_json,
                         read_memdec_json)
from .checks import GREEDY_BELOW, check_context, check_device, check_lambda, check_model_name, check_text
from .errors import MemdecError
from .files import JSONTooDeep, parse_json, read_json_object
from .joint import MemoryDecoderModel
from .models import (DEFAULT_MODEL, check_base_identity, load_model, load_tokenizer, max_context, resolve_device,
                     resolve_model_spec, tokenizer_fingerprint)
from .router import DomainRouter, load_domain_router, pooled_states

GRACEFUL_SHUTDOWN_S = 10  # in-flight requests get this long to finish on SIGINT/SIGTERM, then are cancelled
BATCH_WINDOW_S = 0.005  # the worker waits this long for compatible requests to join a batch that has room
MAX_N = 16  # choices per prompt
MAX_STOPS = 16
MAX_JSON_DEPTH = 32  # containers inside containers in a request body (an OpenAI request needs about 5)
DEFAULT_MAX_REQUEST_ROWS = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20
API_KEY_ENV = "MEMDEC_API_KEY"
AUTO = "auto"  # the model id of the domain router's choice (--router)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ServeConfig:
    run: str | None = None
    model: str | None = None
    memdec: list[str] = field(default_factory=list, metadata={"action": "append"})
    lmbda: float | None = field(default=None, metadata={"flag": "--lambda"})
    router: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    max_tokens: int = 256
    max_request_rows: int = DEFAULT_MAX_REQUEST_ROWS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_key: str | None = None
    allow_unauthenticated: bool = False
    device: str = "auto"


SERVE_HELP = {
    "run": "a `memdec adapt` run folder: its base model and memory decoder (served under the run's name)",
    "model": f"base model spec (default: the run's, else {DEFAULT_MODEL})",
    "memdec": "memory decoder to serve, NAME=CKPT or CKPT (named after its folder)",
    "lmbda": "mixing weight λ in [0, 1] for every decoder (default: each checkpoint's recommended λ); "
             "requests may override it with their `lambda` field; given, a checkpoint's token router is not used",
    "router": f"a domain router folder (`memdec router --domains`): serve a model named `{AUTO}` that answers each "
              f"request with the decoder its prompt is routed to (or the base alone); the router's decoders are "
              f"served under their names unless --memdec gives them",
    "host": "address to listen on",
    "port": "TCP port",
    "max_batch": "most rows (prompts × n) in one generate() call; 1 turns batching off",
    "max_queue": "most requests waiting for the model; beyond it the server answers 429",
    "max_tokens": "tokens generated when a request gives no max_tokens (capped by the context)",
    "max_request_rows": "most rows (prompts × n) in one request, else 400; a request of more than --max-batch rows "
                        "runs over several batches",
    "max_body_bytes": "largest request body in bytes, else 413 (checked before the body is read whole)",
    "api_key": f"key every /v1/* request must send as `Authorization: Bearer KEY`, else 401; /health stays open "
               f"(default: ${API_KEY_ENV}, else no key; the variable keeps the key off the command line)",
    "allow_unauthenticated": "serve a --host other than loopback (127.0.0.0/8, ::1, localhost) without a key",
    "device": "auto, cpu or cuda",
}


@dataclass
class Plan:
    """What to load, once every argument has been checked."""

    base_spec: str
    base_id: str
    decoders: list[tuple[str, str, dict]]  # (name, checkpoint folder, memdec.json)
    lmbda: float | None
    device: str
    api_key: str | None = None
    router: str | None = None  # a domain router folder
    router_info: dict | None = None  # its domains.json


def run_settings(run: str | Path) -> tuple[str, str]:
    """(base model spec, memory decoder folder) of a finished ``memdec adapt`` run folder."""
    run = Path(run).expanduser()
    settings, ckpt = run / "settings.json", run / "memdec"
    if not settings.is_file() or not (ckpt / MEMDEC_JSON).is_file():
        raise MemdecError(f"{run}: not a finished memdec adapt run (no settings.json or memdec/{MEMDEC_JSON})")
    model = read_json_object(settings, "settings.json").get("model")
    if not isinstance(model, str) or not model:
        raise MemdecError(f"{settings}: no base model recorded (key 'model')")
    return model, str(ckpt)


def model_id(spec: str) -> str:
    """The name a model spec is served under: a path's folder or file name, else the spec itself."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return spec


def parse_memdec_spec(spec: str) -> tuple[str, str]:
    """``NAME=CKPT`` or ``CKPT`` -> (name, checkpoint); a bare CKPT is named after its folder
    (the run's folder for ``RUN/memdec``)."""
    name, sep, ckpt = spec.partition("=")
    if not sep or Path(spec).expanduser().exists():
        ckpt = spec
        path = Path(ckpt).expanduser().resolve()
        name = path.parent.name if path.name == "memdec" else path.name
    check_model_name(name, f"--memdec {spec!r}: the name")
    if not ckpt:
        raise MemdecError(f"--memdec {spec!r}: give a checkpoint folder after '='")
    return name, ckpt


def _check_numbers(cfg: ServeConfig) -> None:
    if not 1 <= cfg.port <= 65535:
        raise MemdecError(f"--port must lie in [1, 65535], got {cfg.port}")
    for flag, value in (("--max-batch", cfg.max_batch), ("--max-queue", cfg.max_queue), ("--max-tokens", cfg.max_tokens),
                        ("--max-request-rows", cfg.max_request_rows), ("--max-body-bytes", cfg.max_body_bytes)):
        if value < 1:
            raise MemdecError(f"{flag} must be at least 1, got {value}")
    if not cfg.host:
        raise MemdecError("--host must not be empty")
    check_device(cfg.device)


def api_key(cfg: ServeConfig) -> str | None:
    """The key requests must send: ``--api-key``, else ``$MEMDEC_API_KEY`` (unset or empty: none)."""
    return cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (a bracketed [::1] too)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def check_access(cfg: ServeConfig) -> str | None:
    """The API key, checked (never shown); a host other than loopback needs one or --allow-unauthenticated."""
    key = api_key(cfg)
    source = "--api-key" if cfg.api_key is not None else API_KEY_ENV
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise MemdecError(f"{source} must be non-empty printable ASCII without spaces (clients send it as "
                          f"`Authorization: Bearer KEY`)")
    if key is None and not cfg.allow_unauthenticated and not is_loopback(cfg.host):
        raise MemdecError(f"--host {cfg.host} is not a loopback address: give --api-key (or {API_KEY_ENV}) so that "
                          f"requests must authenticate, or --allow-unauthenticated to serve anyone who can reach it")
    return key


def check_config(cfg: ServeConfig) -> Plan:
    """Check every argument (and every checkpoint's memdec.json) before anything is loaded."""
    _check_numbers(cfg)
    key = check_access(cfg)
    lmbda = None if cfg.lmbda is None else check_lambda(cfg.lmbda, what="--lambda")
    specs = list(cfg.memdec or [])
    model = cfg.model
    if cfg.run is not None:
        if model is not None:
            raise MemdecError("give --run or --model, not both: the run names its base model")
        model, ckpt = run_settings(cfg.run)
        specs.insert(0, f"{Path(cfg.run).expanduser().resolve().name}={ckpt}")
    model = model or DEFAULT_MODEL
    resolve_model_spec(model)
    base_id = model_id(model)
    decoders, seen = [], {base_id}
    for spec in specs:
        name, ckpt = parse_memdec_spec(spec)
        if name in seen:
            raise MemdecError(f"--memdec {spec!r}: the name {name!r} is taken; give another with NAME=CKPT")
        seen.add(name)
        decoders.append((name, ckpt, read_memdec_json(ckpt)))
    router_info = None if cfg.router is None else check_router_domains(cfg.router, decoders, seen)
    return Plan(model, base_id, decoders, lmbda, cfg.device, key, cfg.router, router_info)


def check_router_domains(folder: str, decoders: list[tuple[str, str, dict]], seen: set[str]) -> dict:
    """The domain router's ``domains.json``; each of its domains is served: the --memdec of that name (whose
    weights must be the ones it was trained for), else the checkpoint it records (appended to ``decoders``)."""
    info = read_domain_router_json(folder)
    given = {name: ckpt for name, ckpt, _ in decoders}
    if AUTO in seen:
        raise MemdecError(f"--router: the name {AUTO!r} is the routed model; give the decoder named {AUTO!r} another name")
    for domain in info["domains"]:
        name, ckpt = domain["name"], given.get(domain["name"], domain["checkpoint"])
        if name == AUTO:
            raise MemdecError(f"--router {folder}: its domain {AUTO!r} would hide the routed model {AUTO!r}")
        if name not in given:
            if name in seen:
                raise MemdecError(f"--router {folder}: its domain {name!r} has the base model's name")
            decoders.append((name, ckpt, read_memdec_json(ckpt)))
            seen.add(name)
        if decoder_fingerprint(ckpt) != domain["decoder_fingerprint"]:
            raise MemdecError(f"--router {folder}: domain {name!r} was trained for other decoder weights than {ckpt}'s "
                              f"(decoder_fingerprint {domain['decoder_fingerprint']}); retrain it with "
                              f"`memdec router --domains`")
    return info


def check_port(host: str, port: int) -> None:
    """MemdecError unless ``host:port`` can be listened on (checked before the models load)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MemdecError(f"--host {host!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise MemdecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------
# The models: one base, one MemoryDecoderModel per decoder over it


class Models:
    """The served models. ``ids``: the base's id, then each decoder's name."""

    def __init__(self, base, tokenizer, base_id: str, joints: dict[str, MemoryDecoderModel], ckpts: dict[str, str],
                 domain_router: DomainRouter | None = None, router_dir: str | None = None):
        self.base, self.tokenizer, self.base_id = base, tokenizer, base_id
        self.joints, self.ckpts = joints, ckpts
        self.default_lambda = {name: joint.lmbda for name, joint in joints.items()}
        self.token_routers = {name: joint.router for name, joint in joints.items()}  # None: the fixed λ
        self.domain_router, self.router_dir = domain_router, router_dir
        self.context = max_context(base)
        eos = base.generation_config.eos_token_id if base.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.created = int(time.time())

    @property
    def ids(self) -> list[str]:
        return [self.base_id, *self.joints, *([AUTO] if self.domain_router is not None else [])]

    @property
    def device(self):
        return self.base.device

    def runner(self, target: str, lmbda: float | None):
        """The model that generates for ``target`` (an id): a decoder at ``lmbda``, or (None) at its own
        default, its token router where its folder holds one, else its λ."""
        if target == self.base_id:
            return self.base
        joint = self.joints[target]
        joint.lmbda = self.default_lambda[target] if lmbda is None else lmbda
        joint.router = self.token_routers[target] if lmbda is None else None
        return joint

    def route(self, prompts: list[list[int]]) -> str:
        """The id that answers a request of these prompts: a decoder's name, or the base's for "none". Each
        prompt is pooled alone (no padding), the request goes where the mean probability is highest."""
        pooled = torch.cat([pooled_states(self.base, torch.tensor([p], device=self.device)) for p in prompts])
        name = self.domain_router.route_request(pooled.to(self.domain_router.mean.device))
        return self.base_id if name == NO_DOMAIN else name

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_models(plan: Plan) -> Models:
    """Load the base once and pair it with each decoder; tokenizer hashes are checked first."""
    tokenizer = load_tokenizer(plan.base_spec)
    for name, ckpt, info in plan.decoders:
        check_checkpoint_tokenizer(tokenizer, info, f"memory decoder {name} ({ckpt})")
    if plan.router is not None and plan.router_info["tokenizer_hash"] != tokenizer_fingerprint(tokenizer):
        raise MemdecError(f"--router {plan.router}: trained with another tokenizer than the base model's")
    if plan.router is not None:
        check_base_identity(plan.router_info.get("base_fingerprint"), plan.base_spec, f"--router {plan.router}")
    base, tokenizer = load_model(plan.base_spec, device=resolve_device(plan.device))
    joints = {name: MemoryDecoderModel.from_pretrained(base, ckpt, plan.lmbda, tokenizer=tokenizer)
              for name, ckpt, _ in plan.decoders}
    router = None
    if plan.router is not None:
        router = load_router_for(base, plan.router, plan.router_info)
    models = Models(base, tokenizer, plan.base_id, joints, {name: ckpt for name, ckpt, _ in plan.decoders}, router,
                    plan.router)
    warm_up(models)
    return models


def load_router_for(base, folder: str, info: dict) -> DomainRouter:
    """The domain router of ``folder``, checked against the base's hidden size, on its device (its tokenizer
    is checked by ``load_models`` before any model loads)."""
    d_base = base.config.get_text_config().hidden_size
    if d_base != info["d_base"]:
        raise MemdecError(f"--router {folder}: trained on a base of hidden size {info['d_base']}; this base has {d_base}")
    router, _ = load_domain_router(folder, device=base.device)
    return router


def warm_up(models: Models) -> None:
    """One short greedy generate() per model, so that the first request does not pay for first-call set-up."""
    ids, mask = left_pad([models.tokenizer("Hello")["input_ids"] or [models.pad_id]], models.pad_id, models.device)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (models.base, *models.joints.values()):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                           pad_token_id=models.pad_id)


# --------------------------------------------------------------------------------------------
# Errors


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


# --------------------------------------------------------------------------------------------
# Requests


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
                                f"(pick one of {', '.join(models.joints) or 'none'})", param="lambda", code="invalid_value")
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
        kind=kind, model=model, target=target, lmbda=None if target == models.base_id else lam, prompts=prompts, max_tokens=budgets,
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


# --------------------------------------------------------------------------------------------
# Jobs and the queue


@dataclass
class Row:
    """One sequence of a batch: one prompt, one of its n choices."""

    index: int
    prompt: list[int]
    max_tokens: int
    ids: list[int] = field(default_factory=list)  # generated, EOS included
    text: str = ""
    finish: str | None = None  # "stop", "length", or "cancelled"
    logprobs: list[tuple[str, float, dict, int]] = field(default_factory=list)  # (token, logprob, top, text offset)
    sent: int = 0  # characters streamed
    lp_sent: int = 0
    finish_sent: bool = False


class Job:
    """A request on its way through the queue and the worker. Events to the handler:
    ("delta", updates), ("done", updates) or ("error", ApiError)."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req, self.loop = req, loop
        self.rows = [Row(p * req.n + j, ids, budget) for p, (ids, budget) in enumerate(zip(req.prompts, req.max_tokens))
                     for j in range(req.n)]
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.key = req.batch_key()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.next_row = 0  # rows handed to the worker so far: a job of more than --max-batch rows runs in parts
        self.domain: str | None = None  # an ``auto`` job: the id that answered it, once routed

    @property
    def rows_left(self) -> int:
        return len(self.rows) - self.next_row

    def emit(self, event: tuple) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


class Scheduler:
    """The bounded queue of waiting jobs, and the batches the worker takes from it (thread-safe)."""

    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self.closed = False
        self.stats = {"requests": 0, "rejected": 0, "cancelled": 0, "batches": 0, "largest_batch": 0, "running": 0}

    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                self.stats["rejected"] += 1
                raise ApiError(429, f"The server is busy: {self.max_queue} requests are waiting. Retry shortly.",
                               "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.stats["requests"] += 1
            self._pending.append(job)
            self._cond.notify_all()

    def drop(self, job: Job) -> None:
        """Count a job whose client left, and forget its waiting rows, freeing its place in the queue
        (its running rows stop at the next token)."""
        with self._cond:
            self.stats["cancelled"] += 1
            with contextlib.suppress(ValueError):
                self._pending.remove(job)

    def _compatible_rows(self, key) -> int:
        return sum(j.rows_left for j in self._pending if j.key == key)

    def next_batch(self, window: float = BATCH_WINDOW_S) -> list[tuple[Job, list[Row]]] | None:
        """Rows of the oldest job and of the waiting jobs that may share its generate() call; None once closed."""
        with self._cond:
            while not self._pending and not self.closed:
                self._cond.wait()
            if self.closed:
                return None
            key, deadline = self._pending[0].key, time.monotonic() + window
            while self.max_batch > 1 and self._compatible_rows(key) < self.max_batch and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)  # let requests that arrive together join
            if self.closed or not self._pending:
                return None if self.closed else []
            return self._take()

    def _take(self) -> list[tuple[Job, list[Row]]]:
        """Up to --max-batch rows: the oldest job's next rows, then those of waiting jobs with its batch key, in
        order. A job whose rows are not all taken keeps its place in the queue (the oldest runs on next)."""
        key, room, batch = self._pending[0].key, self.max_batch, []
        for job in list(self._pending):
            if room == 0:
                break
            if job.key != key:
                continue
            rows = job.rows[job.next_row: job.next_row + room]
            job.next_row += len(rows)
            room -= len(rows)
            batch.append((job, rows))
            if job.rows_left == 0:
                self._pending.remove(job)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self.max_batch - room)
        return batch

    def close(self) -> list[Job]:
        """Refuse new jobs; return the waiting ones."""
        with self._cond:
            self.closed = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        return left


# --------------------------------------------------------------------------------------------
# Generation: one worker thread, one generate() call per batch


def safe_end(text: str, stops: list[str]) -> int:
    """How much of a growing text can be streamed: not a trailing partial character, nor a
    suffix that could begin a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return min(end, len(text) - hold)


class LogprobRecorder(LogitsProcessor):
    """A logits processor (placed before the sampling warpers) that keeps the step's log-probs."""

    def __init__(self, active: bool):
        self.active = active
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.active:
            self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class StepHook(StoppingCriteria):
    """A stopping criterion that generate() calls after each new token: it appends each row's token,
    stops rows one by one, and streams text or answers jobs as their rows finish."""

    def __init__(self, batch: list[tuple[Job, list[Row]]], models: Models):
        self.jobs, self.models = [job for job, _ in batch], models
        self.pairs = [(row, job) for job, rows in batch for row in rows]
        self.recorder = LogprobRecorder(any(job.req.logprobs is not None for job in self.jobs))

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, -1].tolist()
        lp = self.recorder.last
        for i, (row, job) in enumerate(self.pairs):
            if row.finish is not None:
                continue
            if job.cancelled:
                row.finish = "cancelled"
                continue
            want = job.req.logprobs
            self.push(row, new[i], job.req.stop, None if want is None or lp is None else (lp[i], want))
        for job in self.jobs:
            self.report(job)
        return torch.tensor([row.finish is not None for row, _ in self.pairs], dtype=torch.bool,
                            device=input_ids.device)

    def push(self, row: Row, token: int, stops: list[str], logprobs) -> None:
        row.ids.append(token)
        if token in self.models.eos_ids:
            row.finish = "stop"
            return
        before = len(row.text)
        text = self.models.decode(row.ids)
        if logprobs is not None:
            row.logprobs.append(self.logprob_entry(token, before, *logprobs))
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            text, row.finish = text[: min(cuts)], "stop"
        row.text = text
        if row.finish is None and len(row.ids) >= row.max_tokens:
            row.finish = "length"

    def logprob_entry(self, token: int, offset: int, lp: torch.Tensor, k: int) -> tuple[str, float, dict, int]:
        top = {}
        if k > 0:
            values, ids = lp.topk(k)
            for v, t in zip(values.tolist(), ids.tolist()):
                top.setdefault(self.models.decode([t]), v)
        return self.models.decode([token]), float(lp[token]), top, offset

    def report(self, job: Job) -> None:
        if job.done:
            return
        all_done = job.done = all(row.finish is not None for row in job.rows)  # set before the handler hears it
        if job.req.stream:
            updates = [u for row in job.rows if (u := stream_update(row, job.req.stop)) is not None]
            if updates or all_done:
                job.emit(("done" if all_done else "delta", updates))
        elif all_done:
            job.emit(("done", []))

    def finish(self) -> None:
        """After generate() returns: rows it ended without our say-so ran out of tokens."""
        for row, _ in self.pairs:
            if row.finish is None:
                row.finish = "length"
        for job in self.jobs:
            self.report(job)


def stream_update(row: Row, stops: list[str]) -> tuple[int, str, list, str | None] | None:
    """(choice index, new text, new logprob entries, finish reason or None), or None if nothing is new."""
    end = len(row.text) if row.finish is not None else max(row.sent, safe_end(row.text, stops))
    delta = row.text[row.sent:end]
    entries = [e for e in row.logprobs[row.lp_sent:] if e[3] < end]
    finish = row.finish if row.finish is not None and not row.finish_sent else None
    if not delta and not entries and finish is None:
        return None
    row.sent, row.lp_sent = end, row.lp_sent + len(entries)
    row.finish_sent = row.finish_sent or finish is not None
    return row.index, delta, entries, finish


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class Engine:
    """The worker thread: takes batches from the scheduler and runs generate() on them."""

    def __init__(self, models: Models, scheduler: Scheduler):
        self.models, self.scheduler = models, scheduler
        self.current: list[Job] = []
        self.thread = threading.Thread(target=self._loop, name="memdec-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail the waiting jobs, cancel the running ones, and wait for the worker to end."""
        for job in self.scheduler.close():
            job.done = True  # answered: not a cancellation
            job.emit(("error", ApiError(503, "the server is shutting down", "server_error", code="shutting_down")))
        for job in list(self.current):
            job.cancelled = True
        self.thread.join(timeout)

    def _loop(self) -> None:
        while (batch := self.scheduler.next_batch()) is not None:
            batch = [(job, rows) for job, rows in batch if not job.cancelled]
            if not batch:
                continue
            self.current = [job for job, _ in batch]
            self.scheduler.stats["running"] = sum(len(rows) for _, rows in batch)
            try:
                self.run(batch)
            except Exception as exc:  # noqa: BLE001 - one failed batch must not stop the server
                for job in self.current:
                    if not job.done:
                        job.done = True
                        job.emit(("error", ApiError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                                    "server_error")))
            finally:
                self.current = []
                self.scheduler.stats["running"] = 0

    def run(self, batch: list[tuple[Job, list[Row]]]) -> None:
        """One generate() call for the rows of ``batch`` (jobs that share one batch key, and their rows); an
        ``auto`` batch is routed job by job first, then runs one call per chosen model."""
        req = batch[0][0].req
        if req.target != AUTO:
            return self.generate(batch, req.target, req.lmbda)
        groups: dict[str, list[tuple[Job, list[Row]]]] = {}
        for job, rows in batch:
            if job.domain is None:  # a job of more than --max-batch rows keeps its first batch's choice
                with torch.inference_mode():
                    job.domain = self.models.route(job.req.prompts)
            groups.setdefault(job.domain, []).append((job, rows))
        for target, part in groups.items():
            self.generate(part, target, None)

    def generate(self, batch: list[tuple[Job, list[Row]]], target: str, lmbda: float | None) -> None:
        """One generate() call of ``target`` at ``lmbda`` for the rows of ``batch``."""
        req = batch[0][0].req
        hook = StepHook(batch, self.models)
        rows = [row for row, _ in hook.pairs]
        ids, mask = left_pad([row.prompt for row in rows], self.models.pad_id, self.models.device)
        kw: dict[str, Any] = {"do_sample": False}
        if req.sampling:
            kw = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p, "top_k": 0}
            if req.seed is not None:  # a seeded job runs alone
                torch.manual_seed(batch_seed(req.seed, rows[0].index))
        model = self.models.runner(target, lmbda)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in rows),
                           pad_token_id=self.models.pad_id, logits_processor=LogitsProcessorList([hook.recorder]),
                           stopping_criteria=StoppingCriteriaList([hook]), **kw)
        hook.finish()


def batch_seed(seed: int, first_row: int) -> int:
    """The torch seed of a seeded request's batch that starts at row ``first_row``: the request's seed for its
    first batch; for a later one (more rows than --max-batch) a hash of both, so that no batch repeats another."""
    if first_row == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_row}".encode()).digest()[:8], "little")


# --------------------------------------------------------------------------------------------
# Responses


def logprobs_block(entries: list) -> dict:
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}


def usage(job: Job) -> dict:
    prompt = sum(len(p) for p in job.req.prompts)
    completion = sum(len(row.ids) for row in job.rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def final_body(job: Job) -> dict:
    """The non-streaming answer of a finished job."""
    req = job.req
    if req.kind == "chat":
        choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": r.finish} for r in job.rows]
        obj = "chat.completion"
    else:
        choices = [{"index": r.index, "text": r.text, "finish_reason": r.finish,
                    "logprobs": logprobs_block(r.logprobs) if req.logprobs is not None else None} for r in job.rows]
        obj = "text_completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": req.model, "choices": choices,
            "usage": usage(job), **domain_field(job)}


def domain_field(job: Job) -> dict:
    """``{"memdec_domain": the id that answered}`` for a routed (``auto``) job once routed, else {}."""
    return {"memdec_domain": job.domain} if job.domain is not None else {}


def chunk(job: Job, choices: list[dict], **extra) -> str:
    obj = "chat.completion.chunk" if job.req.kind == "chat" else "text_completion"
    payload = {"id": job.id, "object": obj, "created": job.created, "model": job.req.model, "choices": choices,
               **domain_field(job), **extra}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def chunk_choice(job: Job, update: tuple) -> dict:
    index, text, entries, finish = update
    if job.req.kind == "chat":
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
    lp = logprobs_block(entries) if job.req.logprobs is not None else None
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}


async def stream_job(job: Job, scheduler: Scheduler):
    """Server-sent events of a queued job; a client that leaves cancels the job."""
    try:
        if job.req.kind == "chat":
            yield chunk(job, [{"index": r.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None} for r in job.rows])
        while True:
            kind, payload = await job.events.get()
            if kind == "error":
                yield f"data: {json.dumps(payload.body())}\n\n"
                break
            for update in payload:
                yield chunk(job, [chunk_choice(job, update)])
            if kind == "done":
                if job.req.include_usage:
                    yield chunk(job, [], usage=usage(job))
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel(job, scheduler)


def cancel(job: Job, scheduler: Scheduler) -> None:
    if not job.done:
        job.cancelled = True
        scheduler.drop(job)


async def wait_job(job: Job, request, scheduler: Scheduler) -> bool:
    """Wait for a non-streaming job; False if the client left first (the job is then cancelled)."""
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return False
                continue
            if kind == "error":
                raise payload
            if kind == "done":
                return True
    finally:
        cancel(job, scheduler)


# --------------------------------------------------------------------------------------------
# The app


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


def models_body(models: Models) -> dict:
    data = [{"id": models.base_id, "object": "model", "created": models.created, "owned_by": "memdec",
             "memdec": {"base": models.base_id, "lambda": 0.0, "checkpoint": None}}]
    data += [{"id": name, "object": "model", "created": models.created, "owned_by": "memdec",
              "memdec": {"base": models.base_id, "lambda": models.default_lambda[name], "checkpoint": models.ckpts[name],
                         "token_router": models.token_routers[name] is not None}}
             for name in models.joints]
    if models.domain_router is not None:
        data.append({"id": AUTO, "object": "model", "created": models.created, "owned_by": "memdec",
                     "memdec": {"base": models.base_id, "router": models.router_dir,
                                "domains": [c for c in models.domain_router.classes if c != NO_DOMAIN]}})
    return {"object": "list", "data": data}


def add_error_handlers(app) -> None:
    """Every error as OpenAI's body, in ASCII JSON: a message that quotes a client's lone surrogate still encodes."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    class AsciiJSONResponse(JSONResponse):
        def render(self, content) -> bytes:
            return json.dumps(content, separators=(",", ":")).encode("ascii")

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return AsciiJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        err = ApiError(exc.status_code, str(exc.detail), error_type(exc.status_code))
        return AsciiJSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return AsciiJSONResponse(err.body(), status_code=500)


def require_key(key: str):
    """A FastAPI dependency: a 401 unless the request sends ``Authorization: Bearer <key>``. Neither key is
    ever shown."""
    from fastapi import Depends
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    bearer = HTTPBearer(auto_error=False)
    expected = key.encode()

    async def check_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(401, "Missing or incorrect API key: send the server's key as `Authorization: Bearer KEY`",
                           error_type(401), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check_key


def v1_router(key: str | None):
    """The router of the ``/v1`` paths, behind the key when there is one."""
    from fastapi import APIRouter, Depends

    return APIRouter(prefix="/v1", dependencies=[Depends(require_key(key))] if key else [])


def add_unknown_route(router) -> None:
    """Last in ``router``: every other ``/v1/*`` path, answered 404 (405 for a known path) after the router's
    key check, so that no ``/v1`` answer comes without the key."""
    known = {route.path for route in router.routes}

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                      include_in_schema=False)
    async def unknown(path: str):
        if f"{router.prefix}/{path}" in known:
            raise ApiError(405, "Method Not Allowed")
        raise ApiError(404, "Not Found")


def create_app(models: Models, cfg: ServeConfig):
    """The FastAPI app: routes, error handlers, and the worker thread's lifespan."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    scheduler = Scheduler(cfg.max_batch, cfg.max_queue)
    engine = Engine(models, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        print("memdec serve: shutting down", flush=True)
        engine.stop()

    app = FastAPI(title="memdec serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.engine, app.state.models = scheduler, engine, models
    add_error_handlers(app)

    async def respond(request: Request, req: GenRequest):
        job = Job(req, asyncio.get_running_loop())
        scheduler.submit(job)
        if req.stream:
            return StreamingResponse(stream_job(job, scheduler), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if not await wait_job(job, request, scheduler):
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(final_body(job))

    v1 = v1_router(api_key(cfg))

    @v1.post("/completions")
    async def completions(request: Request):
        body = await read_body(request, cfg.max_body_bytes)
        return await respond(request, parse_completion(body, models, cfg.max_tokens, cfg.max_request_rows))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, cfg.max_body_bytes)
        return await respond(request, parse_chat(body, models, cfg.max_tokens, cfg.max_request_rows))

    @v1.get("/models")
    async def list_models():
        return models_body(models)

    add_unknown_route(v1)
    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": models.ids, "waiting": scheduler.waiting(), "max_queue": scheduler.max_queue,
                "max_batch": scheduler.max_batch, **scheduler.stats}

    return app


# --------------------------------------------------------------------------------------------
# Running it


def banner(models: Models, cfg: ServeConfig) -> str:
    url = f"http://{cfg.host}:{cfg.port}/v1"
    width = max(len(i) for i in models.ids)
    lines = [f"memdec serve: {url}  (OpenAI-compatible; GET /health, /v1/models)",
             f"  {models.base_id:<{width}}  base model alone (λ = 0), context {models.context or '?'} tokens"]
    lines += [f"  {name:<{width}}  base {models.base_id} + memory decoder {models.ckpts[name]}, "
              + ("token router (λ_t per position)" if models.token_routers[name] is not None else
                 f"λ = {models.default_lambda[name]:.2f}") for name in models.joints]
    if models.domain_router is not None:
        lines.append(f"  {AUTO:<{width}}  each request routed by {models.router_dir} to one of "
                     f"{', '.join(models.domain_router.classes[1:])} or the base alone")
    lines.append(f"  device {models.device}; up to {cfg.max_batch} rows per batch, {cfg.max_queue} requests queued, "
                 f"{cfg.max_request_rows} rows and {cfg.max_body_bytes} bytes per request; Ctrl-C stops")
    lines.append("  API key required on /v1 (Authorization: Bearer); /health is open" if api_key(cfg) else
                 f"  no API key: anyone who can reach {cfg.host} may use it")
    return "\n".join(lines)


def serve(cfg: ServeConfig) -> None:
    """Check the arguments, load the models, and serve until SIGINT or SIGTERM."""
    import uvicorn

    plan = check_config(cfg)
    check_port(cfg.host, cfg.port)
    models = load_models(plan)
    app = create_app(models, cfg)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # as uvicorn's, but a server stopped by a signal exits normally
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    print(banner(models, cfg), flush=True)
    Server(config).run()
    print("memdec serve: stopped", flush=True)
