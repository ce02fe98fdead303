"""Responses out: the body of a finished job (``final_body``), the server-sent events of a streamed one
(``stream_job``: OpenAI's chunks, then ``data: [DONE]``), the wait for a non-streamed one (``wait_job``),
and ``GET /v1/models`` (``models_body``). A client that leaves cancels its job.
"""

import asyncio
import json

from ..checkpoint import NO_DOMAIN
from .config import AUTO
from .models import Models
from .scheduler import Job, Scheduler


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


def models_body(models: Models) -> dict:
    data = [{"id": models.base_id, "object": "model", "created": models.created, "owned_by": "memdec",
             "memdec": {"base": models.base_id, "lambda": 0.0, "checkpoint": None}}]
    data += [{"id": name, "object": "model", "created": models.created, "owned_by": "memdec",
              "memdec": {"base": models.base_id, "lambda": models.default_lambda[name],
                         "checkpoint": models.ckpts[name], "token_router": models.token_routers[name] is not None}}
             for name in models.joints]
    if models.domain_router is not None:
        data.append({"id": AUTO, "object": "model", "created": models.created, "owned_by": "memdec",
                     "memdec": {"base": models.base_id, "router": models.router_dir,
                                "domains": [c for c in models.domain_router.classes if c != NO_DOMAIN]}})
    return {"object": "list", "data": data}
