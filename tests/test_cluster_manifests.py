"""KubeRay manifests: rendered objects pass the v1 CRD schemas (defaults applied, unknown fields
rejected) and the rules the schemas do not carry; broken ones fail; one Serve config everywhere."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from cluster.manifests import (
    ManifestError,
    load_cluster_config,
    render,
    serve_config_for_cluster,
    to_yaml,
    validate,
)
from envs.errors import ConfigError
from serve.launch import application
from serve.settings import load_serve_config, with_host_port


@pytest.fixture(scope="module")
def config():
    return load_cluster_config()


@pytest.fixture(scope="module")
def dev(config):
    return {m["kind"]: m for m in render(config, "dev")}


@pytest.mark.parametrize("profile", ["dev", "prod"])
def test_every_rendered_object_validates(config, profile):
    manifests = render(config, profile)
    assert [m["kind"] for m in manifests] == ["RayJob", "RayService", "PodMonitor"]
    for m in manifests:
        validate(m)


def test_the_rayservice_runs_the_same_serve_config_as_local_runs(dev):
    embedded = yaml.safe_load(dev["RayService"]["spec"]["serveConfigV2"])
    # The object `pipemedic serve --host 0.0.0.0` (and serve deploy of that file) runs.
    local = with_host_port(load_serve_config(), host="0.0.0.0", port=8000)
    assert embedded == local
    # Only where it listens differs from configs/serve.yaml as committed.
    committed = load_serve_config()
    assert embedded["applications"][0]["deployments"] == committed["applications"][0]["deployments"]
    assert {k: v for k, v in embedded["applications"][0]["args"].items() if k != "listen_host"} == {
        k: v for k, v in committed["applications"][0]["args"].items() if k != "listen_host"
    }
    # And it builds the same Serve application the local launcher deploys.
    _, name, prefix = application(embedded)
    assert (name, prefix) == ("pipemedic", "/")


def test_the_rayjob_trains_with_the_profiles_env_runners_and_cleans_up(config, dev):
    job = dev["RayJob"]["spec"]
    assert job["entrypoint"] == (
        f"python -m cluster.train --config configs/train.yaml --env-runners "
        f"{config.profiles['dev'].training.env_runners}"
    )
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] == 600
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (0, 2)
    assert job["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    # The entry point really takes that option.
    help_text = subprocess.run(
        [sys.executable, "-m", "cluster.train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--env-runners" in help_text


def test_secrets_are_referenced_by_name_never_rendered(config, dev):
    text = yaml.safe_dump(list(dev.values()))
    head = dev["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    token = next(e for e in container["env"] if e["name"] == "PIPEMEDIC_API_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == config.api_token_secret
    assert container["envFrom"] == [{"secretRef": {"name": config.store_credentials_secret}}]
    assert "AWS_SECRET_ACCESS_KEY" not in text
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["serve"] == 8000 and ports["metrics"] == 8080


def test_the_podmonitor_scrapes_ports_the_pods_name(dev):
    endpoints = {e["port"] for e in dev["PodMonitor"]["spec"]["podMetricsEndpoints"]}
    named = set()
    for kind in ("RayJob", "RayService"):
        spec = dev[kind]["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]
        for pod in pods:
            assert (
                dev["PodMonitor"]["spec"]["selector"]["matchLabels"].items()
                <= pod["metadata"]["labels"].items()
            )
            named |= {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoints <= named


def _broken(dev, kind, change):
    m = copy.deepcopy(dev[kind])
    change(m)
    return m


def _cluster(m):
    return m["spec"].get("rayClusterSpec") or m["spec"]["rayClusterConfig"]


BROKEN = {
    "misspelt top field": (
        "RayJob",
        lambda m: m["spec"].__setitem__("entryPoint", m["spec"].pop("entrypoint")),
        "'entryPoint' was unexpected",
    ),
    "misspelt container field": (
        "RayService",
        lambda m: _cluster(m)["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
            "imagePullPolicyy", "Always"
        ),
        "imagePullPolicyy",
    ),
    "rayStartParams number": (
        "RayJob",
        lambda m: _cluster(m)["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
        "is not of type 'string'",
    ),
    "worker group without a name": (
        "RayJob",
        lambda m: _cluster(m)["workerGroupSpecs"][0].pop("groupName"),
        "'groupName' is a required property",
    ),
    "name too long": (
        "RayService",
        lambda m: m["metadata"].__setitem__("name", "p" * 48),
        "at most 47 characters",
    ),
    "name not DNS-1035": (
        "RayJob",
        lambda m: m["metadata"].__setitem__("name", "Pipemedic_Train"),
        "DNS-1035",
    ),
    "bad serve config": (
        "RayService",
        lambda m: m["spec"].__setitem__(
            "serveConfigV2",
            m["spec"]["serveConfigV2"].replace("num_replicas: 1", "num_replicas: -3"),
        ),
        "serveConfigV2",
    ),
    "podmonitor without port": (
        "PodMonitor",
        lambda m: m["spec"]["podMetricsEndpoints"][0].pop("port"),
        "named port",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_manifest_fails_validation(dev, case):
    kind, change, message = BROKEN[case]
    with pytest.raises(ManifestError, match=message):
        validate(_broken(dev, kind, change))


def test_defaults_are_applied_before_validating(dev):
    # minReplicas/maxReplicas are required by the schema but defaulted by the API server.
    m = _broken(
        dev,
        "RayJob",
        lambda m: [
            _cluster(m)["workerGroupSpecs"][0].pop(k) for k in ("minReplicas", "maxReplicas")
        ],
    )
    validate(m)


def test_a_profile_that_cannot_fit_its_env_runners_is_refused(tmp_path):
    with open("configs/cluster.yaml") as f:
        raw = yaml.safe_load(f)
    raw["profiles"]["dev"]["training"]["env_runners"] = 5
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match="env_runners 5 need 5 CPUs but the workers offer at most 4"
    ):
        load_cluster_config(path)
    with pytest.raises(ConfigError, match="unknown profile 'staging'"):
        render(load_cluster_config(), "staging")


def test_the_embedded_serve_config_listens_beyond_loopback_so_the_token_is_required(config):
    cfg = serve_config_for_cluster(config)
    assert cfg["http_options"]["host"] == cfg["applications"][0]["args"]["listen_host"] == "0.0.0.0"


def test_the_haproxy_ingress_sets_serves_variables_on_every_serving_pod_only(config):
    from serve.settings import INGRESS_ENV

    profile = config.profiles["dev"]
    serving = profile.serving.model_copy(update={"ingress": "haproxy"})
    cfg = config.model_copy(
        update={"profiles": {"dev": profile.model_copy(update={"serving": serving})}}
    )
    manifests = {m["kind"]: m for m in render(cfg, "dev")}
    for m in manifests.values():
        validate(m)

    def ray_env(cluster_spec):
        pods = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
        return [
            {e["name"]: e.get("value") for e in p["template"]["spec"]["containers"][0]["env"]}
            for p in pods
        ]

    for env in ray_env(manifests["RayService"]["spec"]["rayClusterConfig"]):
        assert INGRESS_ENV["haproxy"].items() <= env.items()
    for env in ray_env(manifests["RayJob"]["spec"]["rayClusterSpec"]):
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in env
    # The committed profiles keep Serve's proxy: no ingress variables rendered.
    for m in render(config, "dev"):
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in to_yaml(m)
