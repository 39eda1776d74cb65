"""Starting (or joining) Ray: the one place outside serving that calls ``ray.init``.

With ``RAY_ADDRESS`` set (as ``ray job submit`` does) the job joins that cluster; otherwise it
starts an embedded local Ray sized to this machine.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray(*, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when it is already running here."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        # Workers read where the store is from the environment, as the driver does.
        env_vars = {k: v for k, v in os.environ.items() if k.startswith("PIPEMEDIC_")}
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": env_vars} if env_vars else None,
        )
