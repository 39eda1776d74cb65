"""Settings of the decision service and the Serve config file that carries them.

``configs/serve.yaml`` is a Ray Serve config file (the format ``serve run``/``serve deploy`` and
KubeRay's RayService ``serveConfigV2`` read). The service's own settings are the application's
``args``; guardrail settings may also be changed while serving through the deployment's
``user_config`` (``reconfigure``). ``load_serve_config`` reads the file once for the embedded
launcher, the benchmark and the tests, so every way of running uses the same settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from envs.config_files import read_mapping, validated
from envs.errors import ConfigError

# Relative to the working folder, like every config path of the CLI: an installed copy of the
# package (the container image) has no configs/ next to its modules.
DEFAULT_SERVE_CONFIG = Path("configs/serve.yaml")
TOKEN_ENV = "PIPEMEDIC_API_TOKEN"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DESTRUCTIVE_ACTIONS = ("restart_stage", "rollback_model", "replay_from_backup")
#: The header that names the pipeline a request is about: with the HAProxy ingress every request
#: carrying it goes to the same replica, where that pipeline's state (history, cooldowns, the
#: decisions feedback refers to) lives. ``serve.client.DecisionClient`` sends it (README,
#: "Serving": a pipeline always travels under one key).
PIPELINE_HEADER = "X-Pipeline-Id"
#: How HTTP reaches the replicas. Ray Serve reads these variables when its processes start, so
#: they belong in the environment of ``ray start`` / ``serve run`` (``pipemedic serve --ingress``
#: sets them for its embedded Ray; the RayService sets them on every pod, ``serving.ingress``).
#: ``proxy``: Serve's Python proxy (the default). ``direct``: each replica also answers HTTP on
#: a port of its own (30000 up; clients must find the ports). ``haproxy``: Ray Serve runs
#: HAProxy as the ingress on the configured port, forwarding straight to the replicas' own
#: ports and choosing the replica by a hash of ``PIPELINE_HEADER`` (round robin without it),
#: with HAProxy's request metrics off: by default HAProxy logs every request to a socket that
#: a separate Python process of Serve parses into Serve's HTTP metrics; with this off the
#: replica records those metrics itself, which was faster at c=1 on a 2-core machine (README,
#: "Serving latency").
#: The variable that turns each non-default ingress on, most specific first.
INGRESS_SWITCH = {
    "haproxy": "RAY_SERVE_ENABLE_HA_PROXY",
    "direct": "RAY_SERVE_ENABLE_DIRECT_INGRESS",
}
INGRESS_ENV: dict[str, dict[str, str]] = {
    "proxy": {},
    "direct": {INGRESS_SWITCH["direct"]: "1"},
    "haproxy": {
        INGRESS_SWITCH["haproxy"]: "1",
        "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": f"hdr({PIPELINE_HEADER.lower()})",
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    },
}


class Guardrails(BaseModel):
    """When to act alone, when to ask a human, and how often to act at all.

    These are the settings ``reconfigure(user_config)`` may change while serving.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_mode: Literal["shadow", "autonomous"] = Field(
        "shadow", description="Mode when a request does not ask for one; shadow only recommends."
    )
    escalate_below: float = Field(
        0.4, ge=0, le=1, description="Escalate to a human when confidence is under this."
    )
    destructive_min_confidence: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(DESTRUCTIVE_ACTIONS, 0.8),
        description="Per destructive action, the confidence it needs to run without a human.",
    )
    cooldown_s: float = Field(
        120.0, ge=0, description="After an autonomous action, hold further actions this long."
    )
    max_actions_per_hour: int = Field(
        6, ge=1, description="Autonomous actions one pipeline may take in any 60 minutes."
    )


class ServiceSettings(BaseModel):
    """Everything the decision service needs; the Serve application's ``args``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["hierarchical", "flat"] = Field(
        "hierarchical", description="Which promoted policy to serve from the checkpoints table."
    )
    store_uri: str | None = Field(
        None, description="Store root; PIPEMEDIC_STORE_URI or ./store when omitted."
    )
    guardrails: Guardrails = Guardrails()
    listen_host: str = Field(
        "127.0.0.1", description="The HTTP host; beyond loopback a bearer token is required."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Larger request bodies get 413 before they are parsed."
    )
    policy_poll_s: float = Field(
        5.0, gt=0, description="How often to look for a newly promoted policy version."
    )
    feedback_flush_s: float = Field(
        5.0, gt=0, description="How often feedback rows are appended to the experience table."
    )
    decision_log_size: int = Field(
        100_000, ge=1, description="Decisions remembered for feedback (oldest forgotten first)."
    )
    max_pipelines: int = Field(
        10_000, ge=1, description="Pipelines whose history is kept (least recently seen dropped)."
    )

    @property
    def beyond_loopback(self) -> bool:
        return self.listen_host not in LOOPBACK_HOSTS

    def api_token(self) -> str | None:
        """The bearer token from the environment; refusing to serve openly without one."""
        token = os.environ.get(TOKEN_ENV) or None
        if token is None and self.beyond_loopback:
            raise ConfigError(
                f"the service listens on {self.listen_host!r}, beyond loopback, so decide and "
                f"feedback need a bearer token: set {TOKEN_ENV}"
            )
        return token


def service_settings(raw: dict[str, Any] | None, *, where: str = "serve config") -> ServiceSettings:
    return validated(ServiceSettings, raw or {}, where=where)


def guardrails(raw: dict[str, Any] | None, *, where: str = "user_config") -> Guardrails:
    return validated(Guardrails, raw or {}, where=where)


def load_serve_config(path: str | Path | None = None) -> dict[str, Any]:
    """The Serve config file as a dict, with the decision application's settings checked."""
    path = Path(path or DEFAULT_SERVE_CONFIG)
    config = read_mapping(path, what="the Serve config")
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected exactly one application, found {len(apps)}")
    service_settings(apps[0].get("args"), where=f"{path}: applications[0].args")
    host = (config.get("http_options") or {}).get("host", "127.0.0.1")
    listen = (apps[0].get("args") or {}).get("listen_host", "127.0.0.1")
    if host != listen:
        raise ConfigError(
            f"{path}: http_options.host is {host!r} but applications[0].args.listen_host is "
            f"{listen!r}; they must agree (the token rule depends on it)"
        )
    return config


def with_host_port(config: dict[str, Any], *, host: str, port: int) -> dict[str, Any]:
    """A copy of a Serve config listening on ``host:port`` (both places that name the host)."""
    app = {**config["applications"][0]}
    app["args"] = {**(app.get("args") or {}), "listen_host": host}
    http = {**(config.get("http_options") or {}), "host": host, "port": port}
    return {**config, "http_options": http, "applications": [app]}
