"""The FastAPI app and running it: ``create_app`` (the ``/v1`` routes behind ``require_key``, ``/health``,
OpenAI-shaped error handlers, the worker thread's lifespan) and ``serve`` (check, load, listen until SIGINT or
SIGTERM). fastapi, starlette and uvicorn are imported inside the functions that use them (optional extras).
"""

import asyncio
import contextlib
import json
import secrets
import signal

from .config import AUTO, ServeConfig, api_key, check_config, check_port
from .engine import Engine
from .models import Models, load_models
from .requests import ApiError, GenRequest, error_type, parse_chat, parse_completion, read_body
from .responses import final_body, models_body, stream_job, wait_job
from .scheduler import Job, Scheduler

GRACEFUL_SHUTDOWN_S = 10  # in-flight requests get this long to finish on SIGINT/SIGTERM, then are cancelled


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
