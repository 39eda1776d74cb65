"""The evaluation harness on a real local Ray, and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.evaluate import evaluate, write_report
from envs.errors import PipemedicError
from envs.metrics import METRIC_KEYS
from envs.scenario import load_scenario

LIBRARY = Path(__file__).parent.parent / "configs" / "scenarios"


def test_report_has_the_design_shape_and_ranks_the_baselines(ray_session, tmp_path):
    scenarios = [
        load_scenario(LIBRARY / "memory-leak.yaml"),
        load_scenario(LIBRARY / "bad-model-deploy.yaml"),
    ]
    seen = []
    report = evaluate(
        ["runbook", "oncall", "oracle"],
        scenarios,
        episodes=3,
        seed=0,
        on_progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[-1] == (6, 6)
    assert report["episodes"] == 3 and report["seed"] == 0
    assert report["scenarios"] == ["memory-leak", "bad-model-deploy"]
    for policy in ("runbook", "oncall", "oracle"):
        assert set(METRIC_KEYS) <= set(report["policies"][policy]["overall"])
        assert set(report["policies"][policy]["per_scenario"]) == {
            "memory-leak",
            "bad-model-deploy",
        }
    assert report["ranking_by_mttr"] == ["oracle", "runbook", "oncall"]
    # Each scenario injects one fault, so per fault type is per scenario here.
    oracle = report["policies"]["oracle"]
    assert set(oracle["per_fault"]) == {"memory_leak", "bad_model_deploy"}
    for fault, scenario in (
        ("memory_leak", "memory-leak"),
        ("bad_model_deploy", "bad-model-deploy"),
    ):
        assert oracle["per_fault"][fault]["mttr_s"] == oracle["per_scenario"][scenario]["mttr_s"]
        assert oracle["per_fault"][fault]["incidents"] == 3
    json_path, png_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == report
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_pairs_policies_on_the_same_episodes(ray_session):
    scenarios = [load_scenario(LIBRARY / "memory-leak.yaml")]
    report = evaluate(
        ["runbook", "oracle"], scenarios, episodes=3, seed=0, compare=[("oracle", "runbook")]
    )
    paired = report["paired"]["oracle vs runbook"]["mttr_s"]
    policies = report["policies"]
    gap = policies["oracle"]["overall"]["mttr_s"] - policies["runbook"]["overall"]["mttr_s"]
    assert paired["difference"] == pytest.approx(gap)
    # The oracle restarts a leak at onset, the runbook only once memory crosses its alarm.
    assert paired["ci95_high"] < 0


def test_evaluation_is_reproducible(ray_session):
    scenarios = [load_scenario(LIBRARY / "random-mix.yaml")]
    a = evaluate(["runbook"], scenarios, episodes=2, seed=3)
    b = evaluate(["runbook"], scenarios, episodes=2, seed=3)
    assert a == b


def test_cli_evaluate_writes_report_for_a_single_scenario_file(ray_session, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--policy",
            "oracle,oncall",
            "--scenarios",
            str(LIBRARY / "late-data.yaml"),
            "--episodes",
            "2",
            "--out",
            str(tmp_path),
            "--per-fault",
            "--compare",
            "oracle:oncall",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Paired differences" in result.output and "oracle vs oncall" in result.output
    assert "Ranking by MTTR (best first): oracle < oncall" in result.output
    assert "Per fault type" in result.output
    late = json.loads((tmp_path / "report.json").read_text())["policies"]["oracle"]["per_fault"]
    assert list(late) == ["late_data"]
    assert (
        f"{late['late_data']['mttr_s']:.0f} ({late['late_data']['ttfca_s']:.0f})" in result.output
    )
    assert (tmp_path / "report.json").exists() and (tmp_path / "report.png").exists()


def test_cli_bad_scenario_is_one_clear_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfaults:\n  - {type: gremlins, stage: ingest, at: 1, severity: 0.5}\n")
    result = CliRunner().invoke(
        app, ["evaluate", "--scenarios", str(bad), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "unknown fault type 'gremlins'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_unknown_policy_is_rejected_before_any_work(tmp_path):
    result = CliRunner().invoke(
        app, ["evaluate", "--policy", "runbook,magic", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "unknown policy 'magic'" in result.output


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ("oracle", "--compare 'oracle': expected A:B"),
        ("oracle:flat", "--compare oracle:flat must name two different policies of --policy"),
    ],
)
def test_cli_bad_compare_is_one_clear_line_and_exit_2(tmp_path, compare, message):
    result = CliRunner().invoke(
        app,
        ["evaluate", "--policy", "runbook,oracle", "--compare", compare, "--out", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "report.json").exists()


def test_hierarchical_is_compared_with_flat_and_runbook_by_default():
    from cluster.cli import default_pairs

    assert default_pairs(["runbook", "hierarchical", "flat", "oracle"]) == [
        ("hierarchical", "flat"),
        ("hierarchical", "runbook"),
    ]
    assert default_pairs(["hierarchical", "oracle"]) == []
    assert default_pairs(["flat", "runbook"]) == []


def test_compare_pairs_may_name_stored_versions():
    from cluster.cli import _pair

    assert _pair("hierarchical:flat") == ("hierarchical", "flat")
    assert _pair("hierarchical:v12:flat") == ("hierarchical:v12", "flat")
    assert _pair("hierarchical:hierarchical:v3") == ("hierarchical", "hierarchical:v3")
    assert _pair(" flat:v2 : runbook ") == ("flat:v2", "runbook")
    with pytest.raises(PipemedicError, match="expected A:B"):
        _pair("hierarchical")
    with pytest.raises(PipemedicError, match="expected A:B"):
        _pair("hierarchical:flat:runbook")
