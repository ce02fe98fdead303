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

The package, one concern a file; each imports only from the files above it in this list
(pyproject.toml's contract "memdec.serve's files"):

- ``config.py``: ``ServeConfig``, ``SERVE_HELP``, ``check_config`` -> ``Plan``; access (API key, hosts, port)
- ``models.py``: ``Models`` (the base, its decoders, the domain router of ``auto``), ``load_models``, ``left_pad``
- ``requests.py``: ``ApiError``; the body read and parsed, each field checked: ``parse_completion``, ``parse_chat``
- ``scheduler.py``: ``Row``, ``Job``, ``Scheduler`` (the bounded queue and its batches)
- ``engine.py``: ``Engine`` (the worker thread, one ``generate()`` per batch), ``StepHook`` (each token);
  beside it ``responses.py``: the response bodies, server-sent events, a handler's wait for its job
- ``app.py``: ``create_app`` (FastAPI routes, error handlers, ``require_key``), ``serve`` (run the server)
"""

from .app import (GRACEFUL_SHUTDOWN_S, add_error_handlers, add_unknown_route, banner, create_app, require_key, serve,
                  v1_router)
from .config import (API_KEY_ENV, AUTO, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_REQUEST_ROWS, SERVE_HELP, Plan, ServeConfig,
                     api_key, check_access, check_config, check_port, check_router_domains, is_loopback, model_id,
                     parse_memdec_spec, run_settings)
from .engine import Engine, LogprobRecorder, StepHook, batch_seed, safe_end, stream_update
from .models import Models, left_pad, load_models, load_router_for, warm_up
from .requests import (CHAT_FIELDS, COMPLETION_FIELDS, MAX_JSON_DEPTH, MAX_N, MAX_STOPS, OPENAI_FIELDS, ApiError,
                       GenRequest, body_too_large, chat_messages, check_fields, check_rows, error_type, get_bool,
                       get_int, get_number, get_stop, get_text, parse_chat, parse_common, parse_completion,
                       parse_json_object, pick_model, read_body, token_budget)
from .responses import (cancel, chunk, chunk_choice, domain_field, final_body, logprobs_block, models_body, stream_job,
                        usage, wait_job)
from .scheduler import BATCH_WINDOW_S, Job, Row, Scheduler

__all__ = [
    "API_KEY_ENV", "AUTO", "ApiError", "BATCH_WINDOW_S", "CHAT_FIELDS", "COMPLETION_FIELDS", "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_REQUEST_ROWS", "Engine", "GRACEFUL_SHUTDOWN_S", "GenRequest", "Job", "LogprobRecorder",
    "MAX_JSON_DEPTH", "MAX_N", "MAX_STOPS", "Models", "OPENAI_FIELDS", "Plan", "Row", "SERVE_HELP", "Scheduler",
    "ServeConfig", "StepHook", "add_error_handlers", "add_unknown_route", "api_key", "banner", "batch_seed",
    "body_too_large", "cancel", "chat_messages", "check_access", "check_config", "check_fields", "check_port",
    "check_router_domains", "check_rows", "chunk", "chunk_choice", "create_app", "domain_field", "error_type",
    "final_body", "get_bool", "get_int", "get_number", "get_stop", "get_text", "is_loopback", "left_pad", "load_models",
    "load_router_for", "logprobs_block", "model_id", "models_body", "parse_chat", "parse_common", "parse_completion",
    "parse_json_object", "parse_memdec_spec", "pick_model", "read_body", "require_key", "run_settings", "safe_end",
    "serve", "stream_job", "stream_update", "token_budget", "usage", "v1_router", "wait_job", "warm_up",
]
