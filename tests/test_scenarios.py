"""Scenario files: the library in configs/ and the errors a bad file gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from envs.catalogue import FAULT_DOMAIN, FAULT_TYPES
from envs.errors import ScenarioError
from envs.scenario import (
    Scenario,
    draw_bursts,
    draw_fault_schedule,
    load_scenario,
    load_scenarios,
)

LIBRARY = Path(__file__).parent.parent / "configs" / "scenarios"


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_library_covers_every_fault_type_and_has_concurrent_cross_domain_scenarios():
    scenarios = load_scenarios(LIBRARY)
    assert len(scenarios) >= 14
    scheduled = {f.type for s in scenarios for f in s.faults}
    assert scheduled == set(FAULT_TYPES)
    concurrent = [
        s
        for s in scenarios
        if 2 <= len(s.faults) <= 3 and len({FAULT_DOMAIN[f.type] for f in s.faults}) >= 2
    ]
    assert len(concurrent) >= 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "name: x\nfaults:\n  - {type: gremlins, stage: ingest, at: 3, severity: 0.5}\n",
            r"bad\.yaml: faults\.0: unknown fault type 'gremlins'; allowed: schema_drift",
            id="unknown-fault-type",
        ),
        pytest.param(
            "name: x\nload: {base_rps: 10, pattren: flat}\n",
            r"bad\.yaml: load: unknown key 'pattren'; allowed keys: base_rps, pattern, bursts",
            id="unknown-key",
        ),
        pytest.param(
            "name: x\nfaults:\n  - {type: concept_drift, stage: ingest, at: 3, severity: 0.5}\n",
            r"faults\.0: fault 'concept_drift' cannot target stage 'ingest'; allowed: model",
            id="stage-the-fault-cannot-hit",
        ),
        pytest.param(
            "name: x\ntopology: [ingest, load]\n"
            "faults:\n  - {type: null_spike, stage: transform, at: 3, severity: 0.5}\n",
            r"faults\.0\.stage: 'transform' is not in the topology",
            id="stage-missing-from-topology",
        ),
        pytest.param(
            "name: x\nrandom_bursts: {rate_per_hour: 2, factor: [2.5, 1.5]}\n",
            r"bad\.yaml: random_bursts: .*factor: need 0 < lo <= hi, got \[2\.5, 1\.5\]",
            id="burst-range-reversed",
        ),
        pytest.param(
            "name: x\ntopology: [load, ingest]\n",
            r"topology: stages must be listed once each, in pipeline order",
            id="topology-out-of-order",
        ),
    ],
)
def test_bad_scenario_names_file_key_and_allowed_values(tmp_path, text, message):
    with pytest.raises(ScenarioError, match=message):
        load_scenario(write(tmp_path, text))


def test_wrong_value_type_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(
        ScenarioError, match=r"bad\.yaml: duration_steps: Input should be a valid integer"
    ):
        load_scenario(write(tmp_path, "name: x\nduration_steps: lots\n"))
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(write(tmp_path, "name: [x\n"))
    with pytest.raises(ScenarioError, match="no such scenario file or folder"):
        load_scenarios(tmp_path / "missing")


def test_duplicate_names_in_a_folder_are_rejected(tmp_path):
    write(tmp_path, "name: same\n", "a.yaml")
    write(tmp_path, "name: same\n", "b.yaml")
    with pytest.raises(ScenarioError, match="repeated: \\['same'\\]"):
        load_scenarios(tmp_path)


def test_random_faults_are_poisson_and_respect_stages_and_seed(tmp_path):
    scenario = load_scenario(LIBRARY / "random-mix.yaml")
    counts = [len(draw_fault_schedule(scenario, np.random.default_rng(s))) for s in range(400)]
    # 3 per hour over one hour: mean 3.
    assert np.mean(counts) == pytest.approx(3.0, abs=0.3)
    a = draw_fault_schedule(scenario, np.random.default_rng(7))
    b = draw_fault_schedule(scenario, np.random.default_rng(7))
    assert np.array_equal(a.types, b.types) and np.array_equal(a.onsets, b.onsets)
    assert np.all(np.diff(a.onsets) >= 0)


def test_random_bursts_are_poisson_in_range_and_leave_the_faults_as_they_were():
    base = {"name": "r", "duration_steps": 360, "random_faults": {"rate_per_hour": 6}}
    plain = Scenario.model_validate(base)
    bursty = Scenario.model_validate(
        {
            **base,
            "load": {"bursts": [{"at": 5, "factor": 3.0, "duration": 2}]},
            "random_bursts": {"rate_per_hour": 4, "factor": [1.2, 1.4], "duration_steps": [3, 5]},
        }
    )
    counts = []
    for seed in range(300):
        rng_plain, rng_bursty = np.random.default_rng(seed), np.random.default_rng(seed)
        faults = draw_fault_schedule(plain, rng_plain)
        assert draw_bursts(plain, rng_plain) == ()
        same = draw_fault_schedule(bursty, rng_bursty)
        assert np.array_equal(faults.onsets, same.onsets)
        assert np.array_equal(faults.types, same.types)
        bursts = draw_bursts(bursty, rng_bursty)
        # The scheduled burst comes first, then the random ones.
        assert bursts[0].at == 5 and bursts[0].factor == 3.0
        counts.append(len(bursts) - 1)
        assert all(1.2 <= b.factor <= 1.4 and 3 <= b.duration <= 5 for b in bursts[1:])
        assert all(0 <= b.at < 360 for b in bursts)
    # 4 per hour over one hour: mean 4.
    assert np.mean(counts) == pytest.approx(4.0, abs=0.4)


def test_random_mix_draws_the_same_faults_as_before_random_bursts_existed():
    # Pinned from the code before random bursts (commit b6d13a1): held-out episodes, and so the
    # reported figures, must not move because the simulator can now draw bursts.
    schedule = draw_fault_schedule(
        load_scenario(LIBRARY / "random-mix.yaml"), np.random.default_rng(0)
    )
    assert [FAULT_TYPES[t] for t in schedule.types] == ["data_drift", "corrupt_batch"]
    assert schedule.onsets.tolist() == [56, 196]


def test_scenarios_check_lists_scheduled_and_random_bursts(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    write(
        tmp_path,
        "name: busy\nload: {bursts: [{at: 60, factor: 2.0, duration: 30}]}\n"
        "random_bursts: {rate_per_hour: 3}\n",
        "busy.yaml",
    )
    result = CliRunner().invoke(app, ["scenarios", "check", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "busy" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == ["busy", "360", "-", "0", "2x@60+30", "3"]
