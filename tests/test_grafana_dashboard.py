"""The Grafana dashboard: well formed, and every metric it queries is one the code exports."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from cluster.train_metrics import EXPORTED_NAMES, METRIC_NAMES, RAY_PREFIX, TrainingMetrics
from serve.metrics import ServiceMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "pipemedic.json"

# A metric name in PromQL: ray_ is part of it (training gauges), so a query without it fails.
METRIC_IN_QUERY = re.compile(r"\b(?:ray_)?pipemedic_[a-z0-9_]+\b")

# The series a Prometheus scrape holds for each family type in the exposition: a counter's
# family already ends in _total; a histogram is queried through these suffixes, never bare.
SERIES_OF_TYPE = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queried_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows only group them), nested rows included."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    return rows + queried_panels(dashboard)


def queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target and of every query template variable."""
    exprs = [t["expr"] for p in queried_panels(dashboard) for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def serve_series() -> set[str]:
    """The series names a scrape of the decision service can hold, from its TYPE lines (they
    are rendered before anything is observed, so a fresh ServiceMetrics lists every family)."""
    text = ServiceMetrics().render().decode()
    families = re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE)
    return {name + suffix for name, kind in families for suffix in SERIES_OF_TYPE[kind]}


def known_series() -> set[str]:
    return serve_series() | set(EXPORTED_NAMES)


def unknown_metrics(dashboard: dict[str, Any]) -> set[str]:
    known = known_series()
    return {m for expr in queries(dashboard) for m in METRIC_IN_QUERY.findall(expr)} - known


def test_dashboard_is_a_grafana_model_with_a_prometheus_datasource_variable():
    dashboard = load_dashboard()
    assert (dashboard["uid"], dashboard["title"], dashboard["schemaVersion"]) == (
        "pipemedic",
        "Pipeline Medic",
        39,
    )
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    for panel in queried_panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Decisions", "Training"]


def test_every_panel_has_a_unique_id_and_every_data_panel_a_query():
    dashboard = load_dashboard()
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), sorted(ids)
    for panel in queried_panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_queried_metric_is_one_the_code_exports():
    assert unknown_metrics(load_dashboard()) == set()


def test_the_dashboard_shows_every_training_gauge_and_serve_family():
    used = {m for expr in queries(load_dashboard()) for m in METRIC_IN_QUERY.findall(expr)}
    assert set(EXPORTED_NAMES) <= used
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in serve_series()}
    assert {re.sub(r"_(bucket|sum|count)$", "", name) for name in used} >= families


@pytest.mark.parametrize(
    ("right", "wrong"),
    [
        ("pipemedic_serve_decisions_total", "pipemedic_serve_decision_total"),  # misspelt
        ("pipemedic_serve_decisions_total", "pipemedic_serve_decisions"),  # counter sans _total
        (
            "pipemedic_serve_decision_latency_seconds_bucket",
            "pipemedic_serve_decision_latency_seconds",  # a histogram is not one series
        ),
        ("ray_pipemedic_train_validation_score", "pipemedic_train_validation_score"),  # no ray_
    ],
)
def test_a_query_of_a_metric_nobody_exports_is_caught(right, wrong):
    dashboard = load_dashboard()
    broken = copy.deepcopy(dashboard)
    replaced = 0
    for panel in queried_panels(broken):
        for target in panel["targets"]:
            if re.search(rf"\b{right}\b", target["expr"]):
                target["expr"] = re.sub(rf"\b{right}\b", wrong, target["expr"])
                replaced += 1
    assert replaced, f"the dashboard no longer queries {right}"
    assert unknown_metrics(broken) == {wrong}


def test_training_gauge_names_are_ones_ray_exports_rather_than_discards():
    # Ray warns, and drops the metric, when it cannot export a name (TrainingMetrics would
    # swallow the warning turned into an error, so it is recorded instead).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainingMetrics(kind="flat", run_id="test")
    assert [str(w.message) for w in caught] == []
    assert tuple(RAY_PREFIX + name for name in METRIC_NAMES) == EXPORTED_NAMES


def test_a_bad_training_figure_is_logged_not_raised(caplog):
    metrics = TrainingMetrics(kind="flat", run_id="test")
    metrics.record({"iteration": 3, "return_per_pipeline": {"flat": -1.5}})
    assert not caplog.records
    metrics.record({"iteration": "three"})
    assert "training goes on" in caplog.text
