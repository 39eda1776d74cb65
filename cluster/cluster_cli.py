"""``pipemedic cluster``: render KubeRay manifests from configs/cluster.yaml, apply and watch them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster.cli_output import console, fail
from envs.errors import PipemedicError

cluster_app = typer.Typer(
    no_args_is_help=True, help="KubeRay: RayJob (training), RayService (serving)."
)

Profile = Annotated[str, typer.Option(help="Profile of configs/cluster.yaml (dev or prod).")]
ConfigPath = Annotated[Path, typer.Option("--config", help="Cluster config.")]


def _rendered(config: Path, profile: str) -> list[dict]:
    from cluster.manifests import load_cluster_config, render, validate

    manifests = render(load_cluster_config(config), profile)
    for m in manifests:
        validate(m)
    return manifests


@cluster_app.command("render")
def render_cmd(
    profile: Profile = "dev",
    out: Annotated[Path, typer.Option(help="Folder for the YAML files.")] = Path("deploy"),
    config: ConfigPath = Path("configs/cluster.yaml"),
) -> None:
    """Write the RayJob, RayService and PodMonitor of a profile, each checked against the KubeRay
    CRD schemas first (a broken object is reported, nothing is written)."""
    from cluster.manifests import write

    try:
        paths = write(_rendered(config, profile), out / profile)
    except PipemedicError as exc:
        fail(exc)
    for p in paths:
        console.print(f"wrote {p}")


@cluster_app.command("apply")
def apply_cmd(
    profile: Profile = "dev",
    config: ConfigPath = Path("configs/cluster.yaml"),
    dry_run: Annotated[
        bool, typer.Option(help="Server-side dry run: validated, not stored.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Wait until the RayService is Ready.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 900,
    training: Annotated[bool, typer.Option(help="Also submit the training RayJob.")] = True,
) -> None:
    """Server-side apply of the profile's objects (the Secrets they name must exist)."""
    from cluster import kube

    try:
        manifests = _rendered(config, profile)
        if not training:
            manifests = [m for m in manifests if m["kind"] != "RayJob"]
        api = kube.custom_objects_api()
        for line in kube.apply(api, manifests, dry_run=dry_run):
            console.print(f"applied {line}")
        if wait and not dry_run:
            service = next(m for m in manifests if m["kind"] == "RayService")
            s = kube.wait(
                api,
                service,
                timeout_s=timeout,
                on_change=lambda s: console.print(f"  {s.kind}/{s.name}: {s.state} ({s.detail})"),
            )
            console.print(f"{s.kind}/{s.name} is ready")
    except PipemedicError as exc:
        fail(exc)


@cluster_app.command("status")
def status_cmd(profile: Profile = "dev", config: ConfigPath = Path("configs/cluster.yaml")) -> None:
    """Where each object of the profile stands."""
    from cluster import kube

    try:
        api = kube.custom_objects_api()
        for m in _rendered(config, profile):
            s = kube.status(api, m)
            console.print(f"{s.kind}/{s.name}: {s.state} ({s.detail})")
    except PipemedicError as exc:
        fail(exc)


@cluster_app.command("delete")
def delete_cmd(profile: Profile = "dev", config: ConfigPath = Path("configs/cluster.yaml")) -> None:
    """Delete the profile's objects (KubeRay then removes their Ray clusters)."""
    from cluster import kube

    try:
        for line in kube.delete(kube.custom_objects_api(), _rendered(config, profile)):
            console.print(f"deleted {line}")
    except PipemedicError as exc:
        fail(exc)
