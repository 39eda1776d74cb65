"""Apply, watch and delete the rendered manifests with the ``kubernetes`` Python client.

    pipemedic cluster apply --profile dev --dry-run     # server-side dry run: the API server
                                                        # validates, nothing is stored
    pipemedic cluster apply --profile dev --wait        # apply, then wait for the RayService
    pipemedic cluster status --profile dev
    pipemedic cluster delete --profile dev

Objects are applied with server-side apply (field manager ``pipemedic``), so re-applying an
edited config updates in place; a RayService cluster change then rolls out on a new cluster
before traffic moves (``upgradeStrategy: NewCluster``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from envs.errors import PipemedicError

FIELD_MANAGER = "pipemedic"
PLURALS = {
    "RayJob": ("ray.io", "v1", "rayjobs"),
    "RayService": ("ray.io", "v1", "rayservices"),
    "RayCluster": ("ray.io", "v1", "rayclusters"),
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors"),
}
# RayJob.status.jobDeploymentStatus values after which nothing more happens.
JOB_DONE = frozenset({"Complete"})
JOB_FAILED = frozenset({"Failed", "ValidationFailed"})


class DeployError(PipemedicError):
    """The cluster refused an object, or it did not become ready; the message says which and why."""


@dataclass(frozen=True)
class ObjectStatus:
    kind: str
    name: str
    state: str  # a short word: Ready, Running, Complete, Failed, Pending, Missing
    detail: str

    @property
    def done(self) -> bool:
        return self.state in ("Ready", "Complete")

    @property
    def failed(self) -> bool:
        return self.state == "Failed"


def custom_objects_api():
    """A ``CustomObjectsApi`` for the current kube context (or in-cluster credentials)."""
    from kubernetes import client, config

    try:
        config.load_kube_config()
    except config.ConfigException:
        try:
            config.load_incluster_config()
        except config.ConfigException as exc:
            raise DeployError(
                "no Kubernetes credentials: set KUBECONFIG or a kube context (kubectl config "
                "use-context ...), or run inside a cluster"
            ) from exc
    return client.CustomObjectsApi()


def _coords(manifest: dict) -> tuple[str, str, str, str, str]:
    group, version, plural = PLURALS[manifest["kind"]]
    meta = manifest["metadata"]
    return group, version, meta["namespace"], plural, meta["name"]


def _api_error(exc: Exception, what: str) -> DeployError:
    body = getattr(exc, "body", None) or str(exc)
    status = getattr(exc, "status", None)
    hint = ""
    if status == 404:
        hint = " (is the KubeRay operator installed, and for PodMonitor the Prometheus operator?)"
    elif status in (401, 403):
        hint = " (check your credentials and RBAC for this namespace)"
    return DeployError(f"{what}: API server answered {status}: {body}{hint}")


def apply(api, manifests: list[dict], *, dry_run: bool = False) -> list[str]:
    """Server-side apply each object (``dry_run``: validated by the API server, not stored)."""
    done = []
    for m in manifests:
        group, version, namespace, plural, name = _coords(m)
        kwargs: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True}
        if dry_run:
            kwargs["dry_run"] = "All"
        try:
            api.patch_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                name,
                m,
                _content_type="application/apply-patch+yaml",
                **kwargs,
            )
        except Exception as exc:
            raise _api_error(exc, f"applying {m['kind']}/{name}") from exc
        done.append(f"{m['kind']}/{name}" + (" (dry run)" if dry_run else ""))
    return done


def delete(api, manifests: list[dict]) -> list[str]:
    gone = []
    for m in manifests:
        group, version, namespace, plural, name = _coords(m)
        try:
            api.delete_namespaced_custom_object(group, version, namespace, plural, name)
            gone.append(f"{m['kind']}/{name}")
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                gone.append(f"{m['kind']}/{name} (was not there)")
                continue
            raise _api_error(exc, f"deleting {m['kind']}/{name}") from exc
    return gone


def status(api, manifest: dict) -> ObjectStatus:
    """Where one object stands, from its ``status`` as KubeRay writes it."""
    group, version, namespace, plural, name = _coords(manifest)
    kind = manifest["kind"]
    try:
        obj = api.get_namespaced_custom_object(group, version, namespace, plural, name)
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return ObjectStatus(kind, name, "Missing", "not created yet")
        raise _api_error(exc, f"reading {kind}/{name}") from exc
    st = obj.get("status") or {}
    if kind == "RayJob":
        deployment = st.get("jobDeploymentStatus", "")
        detail = f"job {st.get('jobStatus', '?')}, deployment {deployment or '?'}"
        if st.get("message"):
            detail += f": {st['message']}"
        if deployment in JOB_DONE and st.get("jobStatus") == "SUCCEEDED":
            return ObjectStatus(kind, name, "Complete", detail)
        if deployment in JOB_FAILED or st.get("jobStatus") in ("FAILED", "STOPPED"):
            return ObjectStatus(kind, name, "Failed", detail)
        return ObjectStatus(kind, name, "Running" if deployment else "Pending", detail)
    if kind == "RayService":
        conditions = {c.get("type"): c for c in st.get("conditions") or []}
        ready = conditions.get("Ready", {})
        detail = ready.get("message") or ready.get("reason") or "no Ready condition yet"
        if ready.get("status") == "True":
            return ObjectStatus(kind, name, "Ready", detail)
        apps = (st.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
        broken = {
            a: s.get("message", "")
            for a, s in apps.items()
            if s.get("status") in ("DEPLOY_FAILED", "UNHEALTHY")
        }
        if broken:
            return ObjectStatus(kind, name, "Failed", f"applications failing: {broken}")
        return ObjectStatus(kind, name, "Pending", detail)
    return ObjectStatus(kind, name, "Ready", "exists")


def wait(
    api,
    manifest: dict,
    *,
    timeout_s: float,
    poll_s: float = 5.0,
    on_change=None,
    clock=time.monotonic,
    sleep=time.sleep,
) -> ObjectStatus:
    """Poll until the object is done (RayJob Complete, RayService Ready); a failure or the
    timeout raises DeployError with the last status KubeRay reported."""
    deadline = clock() + timeout_s
    last = None
    while True:
        now = status(api, manifest)
        if on_change is not None and now != last:
            on_change(now)
        last = now
        if now.done:
            return now
        if now.failed:
            raise DeployError(f"{now.kind}/{now.name} failed: {now.detail}")
        if clock() >= deadline:
            raise DeployError(
                f"{now.kind}/{now.name} not ready after {timeout_s:.0f} s (state {now.state}: "
                f"{now.detail}); see kubectl describe {now.kind.lower()} {now.name} -n "
                f"{manifest['metadata']['namespace']}"
            )
        sleep(poll_s)
