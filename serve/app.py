"""The decision endpoint: a FastAPI app over ``DecisionService``, deployed with Ray Serve.

Run it (the Serve config file is the single source of settings for every way of running)::

    pipemedic serve                                  # embedded Ray, 127.0.0.1:8000
    serve run configs/serve.yaml                     # the Ray way, same settings
    serve deploy configs/serve.yaml                  # onto a running cluster (ray start --head)

Import path of the application: ``serve.app:build_app`` (it takes the ``args`` of
``configs/serve.yaml``, see ``serve.settings.ServiceSettings``). Endpoints: ``POST /v1/decide``,
``POST /v1/decide/batch``, ``POST /v1/feedback``, ``GET /v1/policy``, ``GET /healthz``,
``GET /metrics``; the OpenAPI document is at ``/openapi.json``.

``create_api`` builds the same FastAPI app for Ray Serve and for plain uvicorn (the benchmark's
baseline), so both answer identically.
"""

from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import schemas
from serve.decider import DecisionError, DecisionService
from serve.metrics import ServiceMetrics
from serve.settings import PIPELINE_HEADER, ServiceSettings, guardrails, service_settings

log = logging.getLogger(__name__)

_ERRORS = {
    400: {"model": schemas.ErrorBody, "description": "The body is not readable as JSON text."},
    401: {"model": schemas.ErrorBody, "description": "Missing or wrong bearer token."},
    413: {"model": schemas.ErrorBody, "description": "Request body over the configured size."},
    422: {"model": schemas.ErrorBody, "description": "Invalid request; `fields` names what."},
}

# Module level: endpoint annotations are resolved against this module's globals.
BearerCredentials = Annotated[
    HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
]
RoutedAs = Annotated[
    str | None,
    Header(
        alias=PIPELINE_HEADER,
        description="Routing key. With the HAProxy ingress it picks the replica that keeps "
        "the state of the pipelines in the request, so send each pipeline under one key every "
        "time (DecisionClient: its pipeline_id for single decisions), and feedback under the "
        "key of its decision.",
    ),
]
#: Response header naming the replica that answered (one process: ``local``).
REPLICA_HEADER = "X-Pipemedic-Replica"


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is answered 413 before anything parses it.

    The body is read here (streamed or with Content-Length) and handed on whole, so a client
    that lies about Content-Length is caught too.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, send):
        response = JSONResponse(
            {"error": f"request body is larger than {self.max_bytes} bytes", "fields": []},
            status_code=413,
        )
        await response({"type": "http"}, None, send)


def create_api(
    service: DecisionService,
    *,
    metrics: ServiceMetrics,
    token: str | None,
    replica: str = "local",
) -> FastAPI:
    """The HTTP API over one ``DecisionService``; ``replica`` names it in every decide and
    feedback answer (``REPLICA_HEADER``)."""
    answered_by = {REPLICA_HEADER: replica}
    api = FastAPI(
        title="Pipeline Medic decision API",
        version="1",
        description="Decisions for broken data and ML pipelines (DESIGN.md, Decision API).",
    )
    api.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes)
    metrics.set_policy(service.policy.version)

    async def authorised(cred: BearerCredentials) -> None:
        if token is None:
            return
        if cred is None or not secrets.compare_digest(cred.credentials.encode(), token.encode()):
            raise DecisionError(401, "missing or wrong bearer token (Authorization: Bearer ...)")

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Built by hand: FastAPI's default echoes the input back, and an input holding NaN
        # cannot be written as JSON (a 500 instead of the 422 the client needs).
        fields = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
            for e in exc.errors()
        ]
        return JSONResponse({"error": "invalid request", "fields": fields}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths, wrong methods, unreadable bodies: the same error shape as the rest.
        return JSONResponse(
            {"error": str(exc.detail), "fields": []},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @api.exception_handler(DecisionError)
    async def _refused(request: Request, exc: DecisionError) -> JSONResponse:
        fields = [{"field": exc.field, "message": str(exc)}] if exc.field else []
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            {"error": str(exc), "fields": fields}, status_code=exc.status, headers=headers
        )

    def decide_counted(endpoint: str, requests: list[schemas.DecideRequest]):
        """Decide, and record the latency (once per request) and each decision's labels."""
        start = time.perf_counter()
        decisions = service.decide_many(requests)
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        for d in decisions:
            metrics.observe_decision(d)
        return decisions

    @api.post(
        "/v1/decide",
        response_model=schemas.Decision,
        responses=_ERRORS,
        dependencies=[Depends(authorised)],
    )
    async def decide(request: schemas.DecideRequest, routed_as: RoutedAs = None) -> Response:
        # routed_as (the routing header) only steers HAProxy; the routes declare it so that the
        # OpenAPI document shows it.
        return _json(decide_counted("decide", [request])[0], answered_by)

    @api.post(
        "/v1/decide/batch",
        response_model=schemas.DecideBatchResponse,
        responses=_ERRORS,
        dependencies=[Depends(authorised)],
    )
    async def decide_batch(
        batch: schemas.DecideBatchRequest, routed_as: RoutedAs = None
    ) -> Response:
        decisions = decide_counted("decide_batch", batch.requests)
        return _json(schemas.DecideBatchResponse(decisions=decisions), answered_by)

    @api.post(
        "/v1/feedback",
        response_model=schemas.FeedbackResponse,
        responses={**_ERRORS, 404: {"model": schemas.ErrorBody, "description": "Unknown id."}},
        dependencies=[Depends(authorised)],
    )
    async def feedback(fb: schemas.FeedbackRequest, routed_as: RoutedAs = None) -> Response:
        answer = service.feedback(fb)
        metrics.feedback.labels(fb.outcome).inc()
        return _json(answer, answered_by)

    @api.get("/v1/policy", response_model=schemas.PolicyInfo)
    async def policy() -> schemas.PolicyInfo:
        return service.policy_info()

    @api.get("/healthz", response_model=schemas.Health)
    async def healthz() -> schemas.Health:
        return schemas.Health(status="ok", policy_version=service.policy.version)

    @api.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        metrics.set_policy(service.policy.version)
        return Response(metrics.render(), media_type=metrics.content_type)

    return api


def _json(answer: BaseModel, headers: dict[str, str] | None = None) -> Response:
    """The answer as JSON, serialised once by pydantic. Returning the model instead would make
    FastAPI validate it again against ``response_model`` before serialising it (the
    ``response_model`` stays on the route for the OpenAPI document)."""
    return Response(answer.model_dump_json(), media_type="application/json", headers=headers)


class Maintenance:
    """A daemon thread that picks up newly promoted policies and flushes feedback rows."""

    def __init__(self, service: DecisionService, metrics: ServiceMetrics):
        self.service, self.metrics = service, metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipemedic-maintenance", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        s = self.service.settings
        next_poll = next_flush = time.monotonic()
        while not self._stop.wait(min(s.policy_poll_s, s.feedback_flush_s, 1.0)):
            now = time.monotonic()
            try:
                if now >= next_poll:
                    next_poll = now + s.policy_poll_s
                    if self.service.reload_if_promoted():
                        self.metrics.set_policy(self.service.policy.version)
                if now >= next_flush:
                    next_flush = now + s.feedback_flush_s
                    self.service.flush_feedback()
            except Exception:  # keep serving; the next round tries again
                log.exception("maintenance round failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.service.flush_feedback()


def freeze_startup_heap() -> None:
    """Move everything allocated so far (torch, Ray, the policy: a large heap) out of the
    garbage collector's reach. Otherwise each full collection walks it all while a request
    waits: measured with wrk at one connection on plain uvicorn, p99 104-196 ms before,
    2.8-14.6 ms after (median 7.2) (see the README, "Serving latency")."""
    gc.collect()
    gc.freeze()


def create_plain_app(settings: ServiceSettings) -> FastAPI:
    """The same API without Ray Serve (for ``uvicorn``; the benchmark's baseline)."""
    service = DecisionService(settings)
    metrics = ServiceMetrics()
    api = create_api(service, metrics=metrics, token=settings.api_token())
    api.state.maintenance = Maintenance(service, metrics)
    freeze_startup_heap()
    return api


@serve.deployment(name="DecisionService")
@serve.ingress()
class DecisionDeployment:
    """One replica: loads the promoted policy in ``__init__``, answers over FastAPI."""

    def __init__(self, args: dict[str, Any] | None = None):
        self.settings = service_settings(args)
        self.token = self.settings.api_token()
        self.service = DecisionService(self.settings)
        self.metrics = ServiceMetrics()
        self.maintenance = Maintenance(self.service, self.metrics)
        # No freeze_startup_heap() here: in a Serve replica it made latency worse in both A/B
        # runs of `pipemedic bench serve` (README, "Serving latency"); not understood yet.

    def __serve_build_asgi_app__(self) -> FastAPI:
        replica = serve.get_replica_context().replica_id.unique_id
        return create_api(self.service, metrics=self.metrics, token=self.token, replica=replica)

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Hot guardrail settings: ``user_config`` fields override the app's guardrails."""
        base = self.settings.guardrails.model_dump()
        self.service.set_guardrails(guardrails({**base, **(user_config or {})}))

    def check_health(self) -> None:
        """Fails (and Serve replaces the replica) when the policy cannot actually decide."""
        self.service.self_test()

    def __del__(self) -> None:
        maintenance = getattr(self, "maintenance", None)
        if maintenance is not None:
            maintenance.stop()


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy`` (``serve.app:build_app``)."""
    service_settings(args)  # fail at deploy time, not in every replica, on bad settings
    return DecisionDeployment.bind(args or {})
