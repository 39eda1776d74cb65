"""Scenario files: the library in configs/ and the errors a bad file gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from envs.catalogue import FAULT_DOMAIN, FAULT_TYPES
from envs.errors import ScenarioError
from envs.scenario import draw_fault_schedule, load_scenario, load_scenarios

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


def test_unknown_fault_type_names_file_key_and_allowed_values(tmp_path):
    path = write(
        tmp_path, "name: x\nfaults:\n  - {type: gremlins, stage: ingest, at: 3, severity: 0.5}\n"
    )
    with pytest.raises(
        ScenarioError,
        match=r"bad\.yaml: faults\.0: unknown fault type 'gremlins'; allowed: schema_drift",
    ):
        load_scenario(path)


def test_unknown_key_lists_the_keys_allowed_there(tmp_path):
    path = write(tmp_path, "name: x\nload: {base_rps: 10, pattren: flat}\n")
    with pytest.raises(
        ScenarioError,
        match=r"bad\.yaml: load: unknown key 'pattren'; allowed keys: base_rps, pattern, bursts",
    ):
        load_scenario(path)


def test_fault_on_a_stage_it_cannot_hit_is_rejected(tmp_path):
    path = write(
        tmp_path,
        "name: x\nfaults:\n  - {type: concept_drift, stage: ingest, at: 3, severity: 0.5}\n",
    )
    with pytest.raises(
        ScenarioError,
        match=r"faults\.0: fault 'concept_drift' cannot target stage 'ingest'; allowed: model",
    ):
        load_scenario(path)


def test_fault_on_a_stage_missing_from_the_topology_is_rejected(tmp_path):
    path = write(
        tmp_path,
        "name: x\ntopology: [ingest, load]\nfaults:\n  - {type: null_spike, stage: transform, at: 3, severity: 0.5}\n",
    )
    with pytest.raises(
        ScenarioError, match=r"faults\.0\.stage: 'transform' is not in the topology"
    ):
        load_scenario(path)


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
