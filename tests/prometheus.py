"""A throwaway Prometheus server (Debian's ``prometheus`` package) for the serving tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from serve.bench import free_port


class PrometheusServer:
    """Scrapes ``target`` (host:port, path /metrics) every second; stopped on exit."""

    def __init__(self, folder: Path, *, target: str):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(
                "prometheus is not installed; `make test` installs it (Debian package "
                "prometheus), or run: apt-get install -y --no-install-recommends prometheus"
            )
        self.folder, self.binary, self.target = Path(folder), binary, target
        self.url = f"http://127.0.0.1:{free_port()}"

    def __enter__(self) -> PrometheusServer:
        config = self.folder / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: pipemedic\n"
            f"    static_configs:\n      - targets: ['{self.target}']\n"
        )
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ]
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not become ready (exit {self.process.poll()})")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.load(r)

    def targets_up(self) -> bool:
        targets = self._get("/api/v1/targets")["data"]["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    def query(self, promql: str) -> list:
        return self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))["data"][
            "result"
        ]
