"""The deploy helper against a stand-in for the Kubernetes API (no API server runs here): what it
sends, and how it reads KubeRay's status and reports failures."""

from __future__ import annotations

import pytest

from cluster import kube
from cluster.manifests import load_cluster_config, render


class ApiException(Exception):
    def __init__(self, status: int, body: str = ""):
        super().__init__(body)
        self.status, self.body = status, body


class FakeCustomObjects:
    """Records calls; answers ``get`` from a queue of objects (or exceptions) per name."""

    def __init__(self, answers=None, fail_patch: Exception | None = None):
        self.patched, self.deleted = [], []
        self.answers = answers or {}
        self.fail_patch = fail_patch

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kw):
        if self.fail_patch:
            raise self.fail_patch
        self.patched.append((group, version, namespace, plural, name, body, kw))

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append((plural, name))
        if name == "pipemedic":
            raise ApiException(404, "not found")

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        queue = self.answers[name]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture(scope="module")
def manifests():
    return {m["kind"]: m for m in render(load_cluster_config(), "dev")}


def test_apply_is_a_server_side_apply_and_dry_run_stores_nothing(manifests):
    api = FakeCustomObjects()
    done = kube.apply(api, list(manifests.values()), dry_run=True)
    assert done[0] == "RayJob/pipemedic-train (dry run)"
    group, version, ns, plural, name, body, kw = api.patched[1]
    assert (group, version, ns, plural, name) == (
        "ray.io",
        "v1",
        "pipemedic",
        "rayservices",
        "pipemedic-serve",
    )
    assert body is manifests["RayService"]
    assert kw == {
        "_content_type": "application/apply-patch+yaml",
        "field_manager": "pipemedic",
        "force": True,
        "dry_run": "All",
    }
    assert api.patched[2][3] == "podmonitors"


def test_a_refused_apply_names_the_object_and_the_likely_cause(manifests):
    api = FakeCustomObjects(
        fail_patch=ApiException(404, "the server could not find the requested resource")
    )
    with pytest.raises(
        kube.DeployError,
        match=r"applying RayJob/pipemedic-train: API server answered 404.*KubeRay operator installed",
    ):
        kube.apply(api, [manifests["RayJob"]])


def test_waiting_for_a_rayservice_follows_its_ready_condition(manifests):
    pending = {
        "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Initializing"}]}
    }
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True", "message": "serving"}]}}
    api = FakeCustomObjects({"pipemedic-serve": [ApiException(404), pending, pending, ready]})
    seen = []
    s = kube.wait(
        api, manifests["RayService"], timeout_s=60, on_change=seen.append, sleep=lambda s: None
    )
    assert s.state == "Ready"
    assert [x.state for x in seen] == ["Missing", "Pending", "Ready"]


def test_a_failed_rayjob_stops_the_wait_with_kuberays_message(manifests):
    failed = {
        "status": {
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "message": "entrypoint exited 2",
        }
    }
    api = FakeCustomObjects({"pipemedic-train": [failed]})
    with pytest.raises(
        kube.DeployError,
        match="RayJob/pipemedic-train failed: job FAILED, deployment Failed: entrypoint exited 2",
    ):
        kube.wait(api, manifests["RayJob"], timeout_s=60, sleep=lambda s: None)


def test_a_failing_serve_application_is_reported(manifests):
    broken = {
        "status": {
            "conditions": [{"type": "Ready", "status": "False"}],
            "activeServiceStatus": {
                "applicationStatuses": {
                    "pipemedic": {"status": "DEPLOY_FAILED", "message": "no promoted policy"}
                }
            },
        }
    }
    api = FakeCustomObjects({"pipemedic-serve": [broken]})
    with pytest.raises(kube.DeployError, match="no promoted policy"):
        kube.wait(api, manifests["RayService"], timeout_s=60, sleep=lambda s: None)


def test_the_wait_times_out_with_the_last_status(manifests):
    pending = {"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}
    api = FakeCustomObjects({"pipemedic-train": [pending]})
    ticks = iter(range(0, 1000, 10))
    with pytest.raises(
        kube.DeployError, match=r"not ready after 30 s \(state Running: job RUNNING"
    ):
        kube.wait(
            api, manifests["RayJob"], timeout_s=30, clock=lambda: next(ticks), sleep=lambda s: None
        )


def test_delete_tolerates_objects_already_gone(manifests):
    api = FakeCustomObjects()
    gone = kube.delete(api, list(manifests.values()))
    assert gone[-1] == "PodMonitor/pipemedic (was not there)"
    assert [d[0] for d in api.deleted] == ["rayjobs", "rayservices", "podmonitors"]
