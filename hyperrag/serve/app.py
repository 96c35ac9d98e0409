"""The FastAPI app: routes, error replies, limits and metrics around a :class:`Service`.

Routes are ``async``: each hands its work to the service's batcher and awaits it, so the
bounded batcher queue, not a thread pool, decides how many requests wait (beyond it: 429).
"""
from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hyperrag.kv.urls import StoreError
from hyperrag.rag.pipeline import QuestionError
from hyperrag.serve import schemas
from hyperrag.serve.limits import BearerToken, BodyLimit
from hyperrag.serve.metrics import CONTENT_TYPE, Metrics
from hyperrag.serve.service import NoReader, Service, probability
from hyperrag.workbench.batcher import Busy, Job

RETRY_AFTER_S = 1  # a full queue drains in about one batch: a second on CPU for a 20-document request
ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank", "/v1/answer", "/health", "/metrics")
HEALTH_PROBE = "hyperrag health probe"  # looked up, never stored: a round trip to the store


class ClientError(ValueError):
    """A request the service understood but will not do (422 with this message)."""


def _ms(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1000, 3) for k, v in seconds.items()}


class _Measured:
    """Counts every reply by route and status and times it (401 and 413 included), and names the
    replica that answered in an ``X-HyperRAG-Replica`` header (host:pid; load balancing is visible)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, replica: str):
        self.app = app
        self.metrics = metrics
        self.replica = (b"x-hyperrag-replica", replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, t0 = 500, time.perf_counter()

        async def tracking(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), self.replica]}
            await send(msg)

        try:
            await self.app(scope, receive, tracking)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def _validation_message(err: RequestValidationError) -> str:
    """Pydantic's errors as one line a person can act on: where, then what."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "malformed request: " + "; ".join(dict.fromkeys(parts))


def create_app(service: Service, token: str = "") -> FastAPI:
    """The service's ASGI app (``token``: the bearer token every route but /health and /docs needs)."""
    s = service.settings
    app = FastAPI(title="HyperRAG", description="Decoder reranking with per-document KV reuse: the Cohere / Jina / "
                  "vLLM / TEI rerank APIs and an answer API; document KV found in the store by content.")
    _add_error_replies(app)
    _add_rerank_routes(app, service)
    _add_answer_route(app, service)
    _add_status_routes(app, service)
    # Outermost last: every reply is measured, then the token is checked, then the body's size.
    app.add_middleware(BodyLimit, max_bytes=int(s.serve_max_body_mb * 2**20))
    if token:
        app.add_middleware(BearerToken, token=token)
    app.add_middleware(_Measured, metrics=service.metrics, replica=service.replica)
    return app


def _add_error_replies(app: FastAPI) -> None:
    """Every refusal as ``{"error": message}`` with its status: 422 for what the client can fix,
    501 without a reader, 429 (with Retry-After) when the batcher's queue is full."""

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(err)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 400:  # FastAPI could not decode the body at all (not UTF-8, say)
            return JSONResponse({"error": "malformed request: the body is not JSON in UTF-8"}, status_code=422)
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(ClientError)
    @app.exception_handler(QuestionError)
    @app.exception_handler(NoReader)
    async def refused(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=501 if isinstance(err, NoReader) else 422)

    @app.exception_handler(Busy)
    async def busy(_: Request, err: Busy) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})


def _checked(service: Service, texts: list[str]) -> list[str]:
    """The request's documents, refused (422) beyond ``serve_max_documents`` and counted."""
    s = service.settings
    if len(texts) > s.serve_max_documents:
        raise ClientError(f"{len(texts)} documents sent; at most {s.serve_max_documents} per request "
                          "(setting serve_max_documents): split them into several requests")
    service.metrics.documents.observe(len(texts))
    return texts


async def _done(job: Job) -> tuple[object, dict[str, float]]:
    """A batcher job's result, awaited without holding a thread, and how long it queued."""
    result = await asyncio.wrap_future(job.future)
    return result, {"queue": job.queue_s}


async def _ranked(service: Service, query: str, texts: list[str]) -> tuple[schemas.RerankMeta, object]:
    """The documents ranked for ``query``, with the ``meta`` every rerank API reports."""
    t0 = time.perf_counter()
    ranking, timings = await _done(service.rerank(query, _checked(service, texts)))
    timings |= {**ranking.timings, "total": time.perf_counter() - t0}
    meta = schemas.RerankMeta(kv_reused=ranking.kv_reused, kv_computed=ranking.kv_computed,
                              truncated=ranking.truncated, timings_ms=_ms(timings), warnings=ranking.warnings)
    return meta, ranking


def _add_rerank_routes(app: FastAPI, service: Service) -> None:
    """The rerank APIs: Cohere / Jina / vLLM (/v1/rerank, /v2/rerank) and TEI (/rerank)."""

    @app.post("/v1/rerank", response_model=schemas.RerankResponse, response_model_exclude_none=True)
    @app.post("/v2/rerank", response_model=schemas.RerankResponse, response_model_exclude_none=True,
              include_in_schema=False)
    async def rerank(body: schemas.RerankRequest) -> schemas.RerankResponse:
        """Cohere v1/v2, Jina and vLLM rerank: documents best first, ``relevance_score`` =
        P(yes) of the reranker, ``meta`` = how many documents' KV were reused or computed."""
        texts = body.texts()
        meta, ranking = await _ranked(service, body.query, texts)
        results = [schemas.RerankResult(index=i, relevance_score=probability(ranking.scores[i]),
                                        document=schemas.Document(text=texts[i]) if body.return_documents else None)
                   for i in ranking.order[: body.top_n]]
        return schemas.RerankResponse(model=service.model_name, results=results, meta=meta)

    @app.post("/rerank", response_model=list[schemas.TEIResult], response_model_exclude_none=True)
    async def rerank_tei(body: schemas.TEIRequest, response: Response) -> list[schemas.TEIResult]:
        """Text Embeddings Inference rerank: ``[{index, score, text?}]`` best first; ``score`` is
        P(yes), or logit(yes) - logit(no) with ``raw_scores``. KV reuse in the X-KV-* headers."""
        meta, ranking = await _ranked(service, body.query, body.texts)
        response.headers["X-KV-Reused"], response.headers["X-KV-Computed"] = str(meta.kv_reused), str(meta.kv_computed)
        return [schemas.TEIResult(index=i, score=ranking.scores[i] if body.raw_scores else probability(ranking.scores[i]),
                                  text=body.texts[i] if body.return_text else None) for i in ranking.order]


def _add_answer_route(app: FastAPI, service: Service) -> None:
    """The answer API (/v1/answer): over the sent documents, or over the service's corpus."""

    @app.post("/v1/answer", response_model=schemas.AnswerResponse, response_model_exclude_none=True)
    async def answer(body: schemas.AnswerRequest) -> dict:
        """Read the answer from the sent documents (ranked, then the top_n read from their KV), or
        without documents from the service's corpus (retrieve -> rerank -> read)."""
        t0 = time.perf_counter()
        texts = body.texts()
        if texts is None:
            result, timings = await _done(service.answer_corpus(body.query, body.top_n))
            reply = service.corpus_reply(result)
            timings |= {k: v for k, v in result.timings.items() if k != "total"}
        else:
            (ranking, reading), timings = await _done(service.answer_texts(body.query, _checked(service, texts), body.top_n))
            timings |= ranking.timings
            reply = {"answer": reading.answer,
                     "source": {"index": reading.doc, "start": reading.start, "end": reading.end} if reading.doc >= 0 else None,
                     "ranking": [{"index": i, "score": ranking.scores[i]} for i in ranking.order],
                     "meta": {"kv_reused": ranking.kv_reused, "kv_computed": ranking.kv_computed,
                              "truncated": ranking.truncated},
                     "warnings": ranking.warnings + reading.warnings, **service.reading_extras(reading)}
        timings["total"] = time.perf_counter() - t0
        return {**reply, "timings_ms": _ms(timings)}


def _add_status_routes(app: FastAPI, service: Service) -> None:
    """What operators poll: /health (liveness and the store's answer) and /metrics (Prometheus)."""

    @app.get("/health")
    async def health() -> dict:
        """Liveness, and whether the KV store answers a lookup now."""
        store = service.engine.store
        try:
            await asyncio.to_thread(store.contains, HEALTH_PROBE)
            answers, why = True, ""
        except StoreError as err:
            answers, why = False, str(err)
        return {"status": "ok", "model": service.model_name, "replica": service.replica,
                "kv_identity": service.engine.reranker.kv_identity,
                "store": {"url": store.display_url, "codec": store.codec.spec, "answers": answers,
                          **({"error": why} if why else {})},
                "corpus_docs": len(service.engine.corpus.docs), "queue_depth": service.batcher.depth}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text: requests, latency, batch sizes, KV reuse and store traffic, queue depth."""
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)
