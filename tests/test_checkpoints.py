"""The checkpoints table: exact round trips, hash checks, promotion, rollback, time travel."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import DeltaTable, write_deltalake

from agents.inference import AGENTS_OF_KIND, LearnedPolicy, agent_sizes, manifest_for, weights_of
from agents.networks import PolicyValueNet
from checkpoints.policies import CheckpointStore, sha256_hex
from envs.catalogue import DEFAULT_TOPOLOGY
from envs.errors import CheckpointError
from envs.observation import ObservationEncoder
from envs.params import SimParams


def make_nets(seed: int, kind: str = "hierarchical") -> dict[str, PolicyValueNet]:
    torch.manual_seed(seed)
    return {a: PolicyValueNet(*agent_sizes(a), [16, 16]) for a in AGENTS_OF_KIND[kind]}


def publish(store: CheckpointStore, nets, iteration: int, run_id: str = "run-a") -> int:
    return store.publish(
        "hierarchical",
        weights_of(nets),
        run_id=run_id,
        iteration=iteration,
        pipeline_steps=1000 * iteration,
        manifest=manifest_for("hierarchical", nets, {"run_id": run_id}),
        eval_metrics={"validation_score": 10.0 - iteration},
        config={"seed": 0},
    )


def tamper(store: CheckpointStore, version: int, agent: str = "infra") -> None:
    """Flip one byte of a stored weights blob, keeping the recorded hash (as an attacker or a
    damaged disk would), by rewriting that row."""
    table = DeltaTable(store.checkpoints_uri)
    predicate = f"kind = 'hierarchical' AND version = {version} AND agent = '{agent}'"
    row = table.to_pyarrow_table(filters=[("version", "=", version), ("agent", "=", agent)])
    weights = bytearray(row.column("weights")[0].as_py())
    weights[-1] ^= 0xFF
    row = row.set_column(
        row.schema.get_field_index("weights"), "weights", pa.array([bytes(weights)], pa.binary())
    )
    table.delete(predicate)
    write_deltalake(store.checkpoints_uri, row, mode="append")


def test_weights_round_trip_bit_for_bit(tmp_path):
    store = CheckpointStore(str(tmp_path))
    nets = make_nets(0)
    version = publish(store, nets, iteration=1)
    loaded = store.load("hierarchical", version)
    assert loaded.weights == weights_of(nets)  # the exact bytes
    for agent, blob in loaded.weights.items():
        assert sha256_hex(blob) == sha256_hex(weights_of({agent: nets[agent]})[agent])
    store.promote("hierarchical", version)
    policy = LearnedPolicy.from_store("hierarchical", root=str(tmp_path))
    for agent, net in nets.items():
        for key, tensor in net.state_dict().items():
            assert torch.equal(policy.nets[agent].state_dict()[key], tensor), (agent, key)
    assert policy.version == "hierarchical:v1"
    assert loaded.eval_metrics == {"validation_score": 9.0} and loaded.iteration == 1


def test_versions_count_up_and_republishing_an_iteration_is_a_no_op(tmp_path):
    store = CheckpointStore(str(tmp_path))
    assert publish(store, make_nets(0), 1) == 1
    assert publish(store, make_nets(1), 2) == 2
    # A resumed run publishes iteration 2 again: it gets the version already stored.
    assert publish(store, make_nets(2), 2) == 2
    assert publish(store, make_nets(3), 2, run_id="run-b") == 3
    listed = store.list_versions("hierarchical")
    assert [(v["version"], v["iteration"], v["run_id"]) for v in listed] == [
        (1, 1, "run-a"),
        (2, 2, "run-a"),
        (3, 2, "run-b"),
    ]
    assert all(len(v["agents"]) == 4 for v in listed)


def test_a_tampered_row_is_refused_and_the_previous_promoted_version_is_served(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path))
    good, bad = make_nets(0), make_nets(1)
    publish(store, good, 1)
    publish(store, bad, 2)
    store.promote("hierarchical", 1)
    store.promote("hierarchical", 2)
    tamper(store, 2)
    with pytest.raises(CheckpointError, match=r"hierarchical:v2 agent infra: weights SHA-256"):
        store.load("hierarchical", 2)
    with caplog.at_level("ERROR"):
        served = store.load_promoted("hierarchical")
    assert served.version == 1 and served.weights == weights_of(good)
    assert [v for v, _ in served.refused] == [2]
    assert "refusing hierarchical:v2" in caplog.text
    # The decision path serves v1 too, and a tampered version cannot be promoted again.
    assert LearnedPolicy.from_store("hierarchical", root=str(tmp_path)).version == (
        "hierarchical:v1"
    )
    with pytest.raises(CheckpointError, match="does not match"):
        store.promote("hierarchical", 2)
    # Asked for by number, a version is that version or an error, never another one.
    chosen = LearnedPolicy.from_store("hierarchical", root=str(tmp_path), version=1)
    assert chosen.version == "hierarchical:v1"
    with pytest.raises(CheckpointError, match="does not match"):
        LearnedPolicy.from_store("hierarchical", root=str(tmp_path), version=2)


def test_when_every_promoted_version_is_tampered_loading_fails_clearly(tmp_path):
    store = CheckpointStore(str(tmp_path))
    publish(store, make_nets(0), 1)
    store.promote("hierarchical", 1)
    tamper(store, 1, agent="master")
    with pytest.raises(CheckpointError, match="every promoted version of hierarchical was refused"):
        store.load_promoted("hierarchical")


def test_promote_rollback_and_what_was_promoted_at_a_time(tmp_path):
    store = CheckpointStore(str(tmp_path))
    for i in (1, 2, 3):
        publish(store, make_nets(i), i)
    assert store.promoted_version("hierarchical") is None
    store.promote("hierarchical", 1)
    time.sleep(1.1)  # Delta commit times have millisecond resolution; keep the moments apart
    between_1_and_2 = datetime.now(UTC)
    time.sleep(1.1)
    store.promote("hierarchical", 3)
    assert store.promoted_version("hierarchical") == 3
    assert store.rollback("hierarchical") == 1  # back to the one before
    assert store.promoted_version("hierarchical") == 1
    assert store.rollback("hierarchical", to=2) == 2
    # Time travel: the promotions log as it stood then.
    assert store.promoted_version("hierarchical", at=between_1_and_2) == 1
    assert store.promoted_version("hierarchical", at=datetime(2000, 1, 1, tzinfo=UTC)) is None
    history = store.promotion_history("hierarchical")
    assert [(h["version"], h["action"]) for h in history] == [
        (2, "rollback"),
        (1, "rollback"),
        (3, "promote"),
        (1, "promote"),
    ]
    listed = {v["version"]: v["promoted"] for v in store.list_versions("hierarchical")}
    assert listed == {1: False, 2: True, 3: False}


def test_missing_versions_and_empty_stores_give_clear_errors(tmp_path):
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoints table"):
        store.load("hierarchical", 1)
    publish(store, make_nets(0), 1)
    with pytest.raises(CheckpointError, match="no version 9 of kind 'hierarchical'"):
        store.promote("hierarchical", 9)
    with pytest.raises(CheckpointError, match="nothing of kind 'flat' was ever promoted"):
        store.rollback("flat")
    store.promote("hierarchical", 1)
    with pytest.raises(CheckpointError, match="only version ever promoted"):
        store.rollback("hierarchical")


def test_the_promoted_checkpoint_decides_like_the_networks_it_came_from(tmp_path):
    store = CheckpointStore(str(tmp_path))
    nets = make_nets(5)
    store.promote("hierarchical", publish(store, nets, 1))
    from_store = LearnedPolicy.from_store("hierarchical", root=str(tmp_path))
    direct = LearnedPolicy(manifest_for("hierarchical", nets, {}), nets)
    params = SimParams()
    enc = ObservationEncoder(DEFAULT_TOPOLOGY, params, n=16)
    from envs.simulator import PipelineSim
    from tests.conftest import single_fault_scenario

    sim = PipelineSim(single_fault_scenario("memory_leak", at=1), params, n=16)
    enc.update(sim.reset(list(range(16))))
    a, b = from_store.decide(enc), direct.decide(enc)
    assert np.array_equal(a.action, b.action) and np.array_equal(a.stage, b.stage)
    assert np.array_equal(a.master_probs, b.master_probs)


def test_store_commands_work_and_name_mistakes_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cluster.cli import app

    monkeypatch.setenv("PIPEMEDIC_STORE_URI", str(tmp_path))
    cli = CliRunner()
    missing = cli.invoke(app, ["experience", "stats"])
    assert missing.exit_code == 2 and "no experience table" in missing.output
    store = CheckpointStore()
    publish(store, make_nets(0), 1)
    publish(store, make_nets(1), 2)
    assert cli.invoke(app, ["checkpoints", "promote", "hierarchical", "1"]).exit_code == 0
    assert cli.invoke(app, ["checkpoints", "promote", "hierarchical", "2"]).exit_code == 0
    listed = cli.invoke(app, ["checkpoints", "list"])
    assert listed.exit_code == 0 and "hierarchical" in listed.output
    shown = cli.invoke(app, ["checkpoints", "show", "hierarchical", "2"])
    assert shown.exit_code == 0 and '"hash_check": "ok"' in shown.output
    back = cli.invoke(app, ["checkpoints", "rollback", "hierarchical"])
    assert back.exit_code == 0 and "rolled back hierarchical to v1" in back.output
    assert store.promoted_version("hierarchical") == 1
    wrong = cli.invoke(app, ["checkpoints", "promote", "hierarchical", "9"])
    assert wrong.exit_code == 2 and "no version 9" in wrong.output
    assert "Traceback" not in wrong.output
