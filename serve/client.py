"""A small Python client of the decision endpoint, with retries.

    from serve.client import DecisionClient

    medic = DecisionClient("http://127.0.0.1:8000", token=os.environ.get("PIPEMEDIC_API_TOKEN"))
    decision = medic.decide({"pipeline_id": "orders-etl", "stages": {"transform": {"cpu": 0.97}}})
    if decision["mode"] == "autonomous" and decision["action"] != "observe":
        ...  # carry it out, then:
    medic.feedback(decision["decision_id"], "resolved")

Decide, batch and feedback calls carry a routing key in the ``X-Pipeline-Id`` header, so that
behind the HAProxy ingress with several replicas a pipeline always reaches the replica that
keeps its state: ``decide`` uses the snapshot's ``pipeline_id`` unless given ``routing_key``;
``decide_batch`` sends a header only when given ``routing_key`` (keep it the same for the same
pipelines; without one, batches are spread over replicas, which is fine with one replica);
``feedback`` reuses the key its decision was made under, remembered for the client's last
10,000 decisions. A pipeline must always travel under the same key.

Connection failures, timeouts and 408/500/502/503/504 (an overloaded or restarting service) are
retried with exponential backoff and jitter; 4xx answers are the caller's mistake and raise at
once (``DecisionRequestError`` carries the fields the service named). A timed-out request may
still have been served: a retried feedback can then answer 404 (already recorded).
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from typing import Any

import requests

from serve.settings import PIPELINE_HEADER

# 408: the proxy gave up waiting; 502/503/504: overloaded or restarting; 500: also retried,
# because a replica dying mid-request is transient (a real bug then costs the retry budget).
_RETRY_STATUS = frozenset({408, 500, 502, 503, 504})


class DecisionRequestError(Exception):
    """The service refused the request (4xx) or kept failing after every retry."""

    def __init__(self, status: int | None, body: Any):
        self.status, self.body = status, body
        super().__init__(f"decision service answered {status}: {body}")


class DecisionClient:
    """Calls ``/v1/decide``, ``/v1/decide/batch``, ``/v1/feedback`` and ``/v1/policy``."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ):
        self.url = url.rstrip("/")
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        #: Attempts that failed and were retried (connection errors, 502/503/504).
        self.failed_attempts = 0
        #: decision id -> the routing header it was decided under, for feedback.
        self._routed: OrderedDict[str, str] = OrderedDict()

    def decide(self, snapshot: dict[str, Any], *, routing_key: str | None = None) -> dict[str, Any]:
        key = routing_key or str(snapshot.get("pipeline_id", ""))
        decision = self._call("POST", "/v1/decide", snapshot, routing_key=key)
        self._remember(decision, key)
        return decision

    def decide_batch(
        self, snapshots: list[dict[str, Any]], *, routing_key: str | None = None
    ) -> list[dict[str, Any]]:
        body = {"requests": snapshots}
        decisions = self._call("POST", "/v1/decide/batch", body, routing_key=routing_key)
        for d in decisions["decisions"]:
            self._remember(d, routing_key)
        return decisions["decisions"]

    def feedback(
        self,
        decision_id: str,
        outcome: str,
        *,
        executed: bool = True,
        telemetry_after: dict[str, Any] | None = None,
        routing_key: str | None = None,
    ) -> dict[str, Any]:
        """Report what happened; ``routing_key`` defaults to the one the decision was made
        under, if this client made it."""
        body = {"decision_id": decision_id, "outcome": outcome, "executed": executed}
        if telemetry_after is not None:
            body["telemetry_after"] = telemetry_after
        key = routing_key or self._routed.get(decision_id)
        return self._call("POST", "/v1/feedback", body, routing_key=key)

    def policy(self) -> dict[str, Any]:
        return self._call("GET", "/v1/policy")

    def _remember(self, decision: dict[str, Any], key: str | None) -> None:
        if key:
            self._routed[decision["decision_id"]] = key
            while len(self._routed) > 10_000:
                self._routed.popitem(last=False)

    def _call(self, method: str, path: str, body: Any = None, *, routing_key: str | None = None):
        headers = {PIPELINE_HEADER: routing_key} if routing_key else None
        last: tuple[int | None, Any] = (None, None)
        for attempt in range(self.retries + 1):
            try:
                r = self.session.request(
                    method, self.url + path, json=body, headers=headers, timeout=self.timeout_s
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = (None, str(exc))
            else:
                if r.status_code < 400:
                    return r.json()
                if r.status_code not in _RETRY_STATUS:
                    raise DecisionRequestError(r.status_code, _body(r))
                last = (r.status_code, _body(r))
            if attempt < self.retries:
                self.failed_attempts += 1
                cap = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                time.sleep(random.uniform(0, cap))  # full jitter: clients do not retry in step
        raise DecisionRequestError(*last)


def _body(r: requests.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text
