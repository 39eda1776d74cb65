"""KubeRay manifests rendered from ``configs/cluster.yaml``, and checked before anyone applies them.

    pipemedic cluster render --profile dev --out deploy/dev

renders four objects:

- a **RayJob** for training: entry point ``python -m cluster.train --config configs/train.yaml
  --env-runners N``, a cluster with an autoscaling worker group sized for N env runners, torn
  down ``ttl_seconds_after_finished`` after the job ends;
- a **RayService** for the decision endpoint: ``serveConfigV2`` is ``configs/serve.yaml`` itself
  (``serve_config_for_cluster``: the same object ``pipemedic serve --host 0.0.0.0`` runs), head
  ports include one named ``serve``, upgrades of the cluster spec go through a new cluster
  (``upgradeStrategy: NewCluster``, zero downtime);
- a **PodMonitor** (Prometheus operator) scraping Ray's metrics port on every pod and the
  service's ``/metrics`` on the ``serve`` port.

Every pod gets ``PIPEMEDIC_STORE_URI`` and the object-store credentials from the Secret named in
the config (``envFrom``), and serving pods the bearer token from its own Secret; nothing secret
is ever rendered. ``validate`` checks a manifest against the KubeRay v1 CRD schemas with the API
server's defaults applied and unknown fields rejected, plus the rules the schemas do not carry.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from envs.config_files import load_model
from envs.errors import ConfigError
from serve.settings import INGRESS_ENV, load_serve_config, with_host_port

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLUSTER_CONFIG = Path("configs/cluster.yaml")  # relative to the working folder
CRDS_ENV = "PIPEMEDIC_KUBERAY_CRDS"
_CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# KubeRay appends suffixes to the names of the objects it creates, hence shorter limits.
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47, "PodMonitor": 253}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SERVE_PORT = 8000
METRICS_PORT = 8080
LABELS = {"app.kubernetes.io/name": "pipeline-medic", "app.kubernetes.io/part-of": "pipemedic"}


class ManifestError(ConfigError):
    """A rendered (or hand-written) manifest breaks a rule; the message names the object and path."""


# ---------------------------------------------------------------------- config
class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PodResources(_Strict):
    cpu: str = Field(pattern=r"^\d+(\.\d+)?m?$", description='CPU request and limit ("2", "500m").')
    memory: str = Field(pattern=r"^\d+(Ki|Mi|Gi|Ti)?$", description="Memory request and limit.")

    @property
    def cpus(self) -> float:
        return float(self.cpu[:-1]) / 1000 if self.cpu.endswith("m") else float(self.cpu)


class WorkerGroup(PodResources):
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroup:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class TrainingProfile(_Strict):
    head: PodResources
    workers: WorkerGroup
    env_runners: int = Field(ge=0, description="Env runners, one CPU each, on the workers.")
    ttl_seconds_after_finished: int = Field(3600, ge=0)

    @model_validator(mode="after")
    def _fits(self) -> TrainingProfile:
        capacity = self.workers.cpus * self.workers.max_replicas
        if self.env_runners > capacity:
            raise ValueError(
                f"env_runners {self.env_runners} need {self.env_runners} CPUs but the workers "
                f"offer at most {capacity:g} ({self.workers.max_replicas} x {self.workers.cpu})"
            )
        return self


class ServingProfile(_Strict):
    head: PodResources
    workers: WorkerGroup
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description="Serve's Python proxy, or Ray Serve's HAProxy ingress (faster; keeps each "
        "pipeline on one replica by its X-Pipeline-Id header, so num_replicas may exceed 1)",
    )


class Profile(_Strict):
    training: TrainingProfile
    serving: ServingProfile


class ClusterConfig(_Strict):
    name: str = Field(pattern=DNS_1035.pattern, max_length=30)
    namespace: str = Field(pattern=DNS_1035.pattern)
    image: str = Field(min_length=1)
    ray_version: str
    store_uri: str = Field(min_length=1)
    store_credentials_secret: str = Field(pattern=DNS_1035.pattern)
    api_token_secret: str = Field(pattern=DNS_1035.pattern)
    train_config: str = "configs/train.yaml"
    serve_config: str = "configs/serve.yaml"
    profiles: dict[str, Profile]


def load_cluster_config(path: str | Path | None = None) -> ClusterConfig:
    return load_model(path or DEFAULT_CLUSTER_CONFIG, ClusterConfig, what="the cluster config")


# ---------------------------------------------------------------------- rendering
def serve_config_for_cluster(cfg: ClusterConfig) -> dict[str, Any]:
    """The Serve config the RayService runs: ``configs/serve.yaml`` listening on all of the
    pod's addresses (the bearer token then becomes mandatory; it comes from a Secret)."""
    return with_host_port(load_serve_config(cfg.serve_config), host="0.0.0.0", port=SERVE_PORT)


def _env(
    cfg: ClusterConfig, *, token: bool, ray_env: dict[str, str]
) -> tuple[list[dict], list[dict]]:
    env = [{"name": "PIPEMEDIC_STORE_URI", "value": cfg.store_uri}]
    env += [{"name": k, "value": v} for k, v in ray_env.items()]
    if token:
        env.append(
            {
                "name": "PIPEMEDIC_API_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {"name": cfg.api_token_secret, "key": "PIPEMEDIC_API_TOKEN"}
                },
            }
        )
    return env, [{"secretRef": {"name": cfg.store_credentials_secret}}]


def _pod(
    cfg: ClusterConfig,
    container: str,
    res: PodResources,
    ports: list[dict],
    *,
    token: bool,
    ray_env: dict[str, str],
) -> dict:
    env, env_from = _env(cfg, token=token, ray_env=ray_env)
    amounts = {"cpu": res.cpu, "memory": res.memory}
    return {
        "metadata": {"labels": dict(LABELS)},
        "spec": {
            "containers": [
                {
                    "name": container,
                    "image": cfg.image,
                    "imagePullPolicy": "IfNotPresent",
                    "env": env,
                    "envFrom": env_from,
                    "ports": ports,
                    "resources": {"requests": dict(amounts), "limits": dict(amounts)},
                }
            ]
        },
    }


def _head_ports(*, serve: bool) -> list[dict]:
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": METRICS_PORT, "name": "metrics"},
    ]
    if serve:
        ports.append({"containerPort": SERVE_PORT, "name": "serve"})
    return ports


def _ray_cluster_spec(
    cfg: ClusterConfig,
    head: PodResources,
    workers: WorkerGroup,
    *,
    group: str,
    serve: bool,
    head_cpus: str,
    ray_env: dict[str, str] | None = None,
) -> dict:
    """``ray_env``: variables every Ray process of the cluster reads when it starts (Serve's
    ingress settings), on head and workers alike."""
    ray_env = ray_env or {}
    return {
        "rayVersion": cfg.ray_version,
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            # Strings only: KubeRay passes them to `ray start` as flags.
            "rayStartParams": {
                "num-cpus": head_cpus,
                "dashboard-host": "0.0.0.0",
                "metrics-export-port": str(METRICS_PORT),
            },
            "template": _pod(
                cfg, "ray-head", head, _head_ports(serve=serve), token=serve, ray_env=ray_env
            ),
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": workers.min_replicas,
                "minReplicas": workers.min_replicas,
                "maxReplicas": workers.max_replicas,
                "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
                "template": _pod(
                    cfg,
                    "ray-worker",
                    workers,
                    [{"containerPort": METRICS_PORT, "name": "metrics"}],
                    token=serve,
                    ray_env=ray_env,
                ),
            }
        ],
    }


def _metadata(cfg: ClusterConfig, name: str, component: str) -> dict:
    return {
        "name": name,
        "namespace": cfg.namespace,
        "labels": {**LABELS, "app.kubernetes.io/component": component},
    }


def render(cfg: ClusterConfig, profile: str) -> list[dict[str, Any]]:
    """The RayJob, RayService and PodMonitor of ``profile``."""
    if profile not in cfg.profiles:
        raise ConfigError(
            f"unknown profile {profile!r}; configs/cluster.yaml has {sorted(cfg.profiles)}"
        )
    p = cfg.profiles[profile]
    t = p.training
    entrypoint = (
        f"python -m cluster.train --config {cfg.train_config} --env-runners {t.env_runners}"
    )
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(cfg, f"{cfg.name}-train", "training"),
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": t.ttl_seconds_after_finished,
            "submissionMode": "K8sJobMode",
            # The head takes no Ray work: env runners land on the autoscaled workers.
            "rayClusterSpec": _ray_cluster_spec(
                cfg, t.head, t.workers, group="env-runners", serve=False, head_cpus="0"
            ),
        },
    }
    s = p.serving
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(cfg, f"{cfg.name}-serve", "serving"),
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(serve_config_for_cluster(cfg), sort_keys=False),
            "rayClusterConfig": _ray_cluster_spec(
                cfg,
                s.head,
                s.workers,
                group="serve-workers",
                serve=True,
                head_cpus=str(s.head.cpus).removesuffix(".0"),
                ray_env=INGRESS_ENV[s.ingress],
            ),
        },
    }
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(cfg, cfg.name, "monitoring"),
        "spec": {
            "selector": {"matchLabels": dict(LABELS)},
            "namespaceSelector": {"matchNames": [cfg.namespace]},
            "podMetricsEndpoints": [
                {"port": "metrics", "path": "/metrics", "interval": "15s"},
                {"port": "serve", "path": "/metrics", "interval": "15s"},
            ],
        },
    }
    return [job, service, monitor]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the embedded Serve config) as readable ``|`` blocks."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def to_yaml(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False)


def write(manifests: list[dict], out: Path) -> list[Path]:
    """One YAML file per object, named KIND-NAME.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in manifests:
        path = out / f"{m['kind'].lower()}-{m['metadata']['name']}.yaml"
        path.write_text(to_yaml(m))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- validation
def crds_dir() -> Path:
    """Where the KubeRay CRDs are: ``PIPEMEDIC_KUBERAY_CRDS``, else ``../shared/kuberay/crds``
    next to the repository (or under /work)."""
    candidates = [
        os.environ.get(CRDS_ENV),
        REPO.parent / "shared/kuberay/crds",
        Path("/work/shared/kuberay/crds"),
    ]
    for c in candidates:
        if c and Path(c, _CRD_FILES["RayJob"]).exists():
            return Path(c)
    raise ConfigError(
        f"KubeRay CRDs not found; set {CRDS_ENV} to the folder holding {_CRD_FILES['RayJob']}"
    )


@functools.cache
def crd_schema(kind: str) -> dict:
    """The ``v1`` openAPIV3Schema of a KubeRay kind (selected by name, not position)."""
    with open(crds_dir() / _CRD_FILES[kind]) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(
        v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1"
    )


def _strict(schema: dict) -> dict:
    """A copy in which every object with declared properties rejects undeclared ones (what
    ``kubectl --validate=strict`` does; the CRDs leave it open and the API server drops them)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


def with_defaults(instance: Any, schema: dict) -> Any:
    """The instance with the schema's defaults filled in and nulls dropped, as the API server
    does before validating."""
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        out = {k: v for k, v in instance.items() if v is not None}
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        for key, value in out.items():
            if key in props:
                out[key] = with_defaults(value, props[key])
        return out
    if isinstance(instance, list) and "items" in schema:
        return [with_defaults(v, schema["items"]) for v in instance]
    return instance


def validate(manifest: dict) -> None:
    """Raise ManifestError naming the object and the path of the first broken rule."""
    import jsonschema

    kind = manifest.get("kind")
    name = (manifest.get("metadata") or {}).get("name", "")
    where = f"{kind}/{name}"
    if kind not in NAME_LIMITS:
        raise ManifestError(f"{where}: unexpected kind {kind!r}")
    if not DNS_1035.match(name) or len(name) > NAME_LIMITS[kind]:
        raise ManifestError(
            f"{where}: metadata.name must be a DNS-1035 label of at most {NAME_LIMITS[kind]} characters "
            f"(KubeRay appends suffixes); got {len(name)} characters"
        )
    if kind == "PodMonitor":
        _validate_pod_monitor(manifest, where)
        return
    schema = crd_schema(kind)
    instance = with_defaults(manifest, schema)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft4Validator(_strict_schema(kind)).iter_errors(instance)
    )
    if error is not None:
        path = ".".join(str(p) for p in error.absolute_path) or "(top)"
        raise ManifestError(f"{where}: {path}: {error.message}")
    if kind == "RayService":
        from serve.launch import validated

        try:
            validated(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
        except ConfigError as exc:
            raise ManifestError(f"{where}: spec.serveConfigV2: {exc}") from exc
    for path, params in _ray_start_params(manifest):
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        if bad:
            raise ManifestError(
                f"{where}: {path}: rayStartParams values must be strings, got {bad}"
            )


@functools.cache
def _strict_schema(kind: str) -> dict:
    return _strict(crd_schema(kind))


def _ray_start_params(manifest: dict) -> list[tuple[str, dict]]:
    spec = manifest.get("spec", {})
    cluster_key = "rayClusterSpec" if manifest["kind"] == "RayJob" else "rayClusterConfig"
    cluster = spec.get(cluster_key, spec if manifest["kind"] == "RayCluster" else {})
    found = []
    if "headGroupSpec" in cluster:
        found.append(
            (
                f"spec.{cluster_key}.headGroupSpec.rayStartParams",
                cluster["headGroupSpec"].get("rayStartParams", {}),
            )
        )
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        found.append(
            (
                f"spec.{cluster_key}.workerGroupSpecs.{i}.rayStartParams",
                group.get("rayStartParams", {}),
            )
        )
    return found


def _validate_pod_monitor(m: dict, where: str) -> None:
    # No CRD for the Prometheus operator here: check the fields this project relies on.
    if m.get("apiVersion") != "monitoring.coreos.com/v1":
        raise ManifestError(f"{where}: apiVersion must be monitoring.coreos.com/v1")
    spec = m.get("spec") or {}
    if not (spec.get("selector") or {}).get("matchLabels"):
        raise ManifestError(f"{where}: spec.selector.matchLabels is required")
    endpoints = spec.get("podMetricsEndpoints") or []
    if not endpoints or any(not e.get("port") for e in endpoints):
        raise ManifestError(f"{where}: spec.podMetricsEndpoints need a named port each")
