"""Start the decision endpoint on Ray Serve from a Serve config file (``pipemedic serve``).

``serve run configs/serve.yaml`` and this launcher read the same file; the launcher only uses
public Ray Serve API: it validates the file with Serve's own schema, starts Serve with the
file's ``http_options`` and deploys ``build_app(args)`` with the file's deployment options.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray import serve
from ray.serve.schema import ServeDeploySchema

from envs.errors import ConfigError
from serve.app import DecisionDeployment
from serve.settings import INGRESS_SWITCH, service_settings

log = logging.getLogger(__name__)


def validated(config: dict[str, Any]) -> ServeDeploySchema:
    """The Serve config checked by Ray's own schema (what ``serve deploy`` would accept)."""
    try:
        return ServeDeploySchema.model_validate(config)
    except Exception as exc:  # pydantic's error names the key
        raise ConfigError(f"invalid Serve config: {exc}") from exc


def application(config: dict[str, Any]) -> tuple[serve.Application, str, str]:
    """The decision application with the config's deployment options applied; its name and
    route prefix."""
    schema = validated(config)
    app = schema.applications[0]
    args = service_settings(app.args, where="applications[0].args").model_dump()
    deployment = DecisionDeployment
    for d in app.deployments:
        if d.name != "DecisionService":
            raise ConfigError(f"unknown deployment {d.name!r}; the application has DecisionService")
        deployment = deployment.options(**d.model_dump(exclude_unset=True, exclude={"name"}))
    return deployment.bind(args), app.name, app.route_prefix or "/"


def start(config: dict[str, Any], *, blocking: bool = False) -> str:
    """Start Serve (joining the running Ray, or starting a local one) and deploy; returns the
    base URL. With ``blocking`` it serves until interrupted."""
    schema = validated(config)
    if not ray.is_initialized():
        from cluster.ray_runtime import ensure_ray

        ensure_ray()
    http = schema.http_options.model_dump(exclude_unset=True)
    serve.start(proxy_location=schema.proxy_location, http_options=http)
    app, name, prefix = application(config)
    serve.run(app, name=name, route_prefix=prefix, blocking=False)
    url = f"http://{schema.http_options.host}:{schema.http_options.port}"
    log.info("decision endpoint at %s (ingress: %s)", url, ingress_in_use())
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


def ingress_in_use() -> str:
    """The ingress this process's environment switches on (``INGRESS_SWITCH``; HAProxy wins,
    as it implies direct ingress), for the log; ``proxy`` when neither is on."""
    on = [name for name, var in INGRESS_SWITCH.items() if os.environ.get(var) == "1"]
    return on[0] if on else "proxy"


def direct_ingress_urls(app_name: str, *, host: str) -> list[str]:
    """With direct ingress on, the replicas' own HTTP addresses (ports are handed out by the
    controller from 30000 up and change when a replica is replaced, so look them up). Replicas
    bind ``http_options.host``; the controller reports the node's IP, so ``host`` replaces it."""
    client = serve.context._get_global_client()  # no public API lists replica ports yet
    groups = ray.get(client._controller.get_target_groups.remote(app_name))
    return [
        f"http://{host}:{t.port}"
        for g in groups
        if str(g.protocol).upper().endswith("HTTP")
        for t in g.targets
    ]
