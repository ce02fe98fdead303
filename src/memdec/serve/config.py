"""``memdec serve``'s command line and its checks, before anything loads: ``ServeConfig`` and ``SERVE_HELP``,
``check_config`` (every argument, every checkpoint's ``memdec.json``, the domain router's ``domains.json``)
giving the ``Plan`` of what to load; access: the API key (``--api-key`` or ``$MEMDEC_API_KEY``), loopback
hosts, the port. ``AUTO`` is the model id of the domain router's choice.
"""

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import MEMDEC_JSON, decoder_fingerprint, read_domain_router_json, read_memdec_json
from ..checks import check_device, check_lambda, check_model_name
from ..errors import MemdecError
from ..files import read_json_object
from ..models import DEFAULT_MODEL, resolve_model_spec
from ..options import help_of, option

DEFAULT_MAX_REQUEST_ROWS = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20
API_KEY_ENV = "MEMDEC_API_KEY"
AUTO = "auto"  # the model id of the domain router's choice (--router)


@dataclass
class ServeConfig:
    run: str | None = option("a `memdec adapt` run folder: its base model and memory decoder (served under the run's "
                             "name)", None)
    model: str | None = option("base model spec", None, note=f"the run's, else {DEFAULT_MODEL}")
    memdec: list[str] = option("memory decoder to serve, NAME=CKPT or CKPT (named after its folder)",
                               default_factory=list, action="append")
    lmbda: float | None = option("mixing weight λ in [0, 1] for every decoder (default: each checkpoint's recommended "
                                 "λ); requests may override it with their `lambda` field; given, a checkpoint's token "
                                 "router is not used", None, flag="--lambda")
    router: str | None = option(f"a domain router folder (`memdec router --domains`): serve a model named `{AUTO}` "
                                f"that answers each request with the decoder its prompt is routed to (or the base "
                                f"alone); the router's decoders are served under their names unless --memdec gives "
                                f"them", None)
    host: str = option("address to listen on", "127.0.0.1")
    port: int = option("TCP port", 8000)
    max_batch: int = option("most rows (prompts × n) in one generate() call; 1 turns batching off", 8)
    max_queue: int = option("most requests waiting for the model; beyond it the server answers 429", 64)
    max_tokens: int = option("tokens generated when a request gives no max_tokens (capped by the context)", 256)
    max_request_rows: int = option("most rows (prompts × n) in one request, else 400; a request of more than "
                                   "--max-batch rows runs over several batches", DEFAULT_MAX_REQUEST_ROWS)
    max_body_bytes: int = option("largest request body in bytes, else 413 (checked before the body is read whole)",
                                 DEFAULT_MAX_BODY_BYTES)
    api_key: str | None = option("key every /v1/* request must send as `Authorization: Bearer KEY`, else 401; /health "
                                 "stays open", None,
                                 note=f"${API_KEY_ENV}, else no key; the variable keeps the key off the command line")
    allow_unauthenticated: bool = option("serve a --host other than loopback (127.0.0.0/8, ::1, localhost) without a "
                                         "key", False)
    device: str = option("auto, cpu or cuda", "auto")


SERVE_HELP = help_of(ServeConfig)  # each option's help, by field name (declared once, on ServeConfig)


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
    for flag, value in (("--max-batch", cfg.max_batch), ("--max-queue", cfg.max_queue),
                        ("--max-tokens", cfg.max_tokens), ("--max-request-rows", cfg.max_request_rows),
                        ("--max-body-bytes", cfg.max_body_bytes)):
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
        raise MemdecError(f"--router: the name {AUTO!r} is the routed model; give the decoder named {AUTO!r} "
                          f"another name")
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
