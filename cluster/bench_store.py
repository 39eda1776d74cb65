"""Delta store benchmarks: ``pipemedic bench store``.

* **Experience append rate**: real transitions (the ``oracle`` driving the training environment,
  recorded once into memory: master rows carry 230 observation floats, specialists 110-160, plus
  the next observation and the action mask) appended in batches of ``batch_rows`` through
  ``ExperienceWriter.write_batch`` (the idempotency check, the Parquet write and the Delta commit
  all timed). Reported: the median rate over ``repeats`` batches for one writer encoding
  ``FILES_PER_PARTITION`` files at once (the default), the same with one file, the same appends
  through delta-rs's own writer (with the settings the table used before, and with delta-rs's
  defaults), and the aggregate rate of ``processes`` writers appending at once (each its own
  process, all batches started together; rate = all rows / wall time until the last one
  finished).
* **Warm start from experience** (``bench_warm_start``): training time saved by pre-training
  from the experience table. In one process and one temporary store: record the warm-start
  teacher's episodes (``warm_start.teacher``, as many simulated steps as the live warm start
  uses) into the experience table (timed: a one-off cost any later run reuses); train the
  *reference* and note its best validation score and the wall time it first reached it; then
  train with the warm start read from the table (``warm_start.source: experience``) and
  ``stop.validation_score`` set to that score, and note when it got there (or that it did not).
  The reference is ``cold`` by default: PPO from scratch, no warm start, with a learning rate
  for learning from scratch (``cold_lr``), and the table is then the only pre-training (one
  round, nothing simulated). ``dagger``: the live DAgger warm start, of which the table
  replaces the first round.
* **Promoted checkpoint load**: ``LearnedPolicy.from_store`` for a promoted ``hierarchical``
  version among ``versions`` stored ones: finding the promoted version in the promotions log,
  reading its rows, checking the SHA-256 of each agent and building the networks. Median of
  ``repeats`` loads in this process, and the first load in a fresh process (imports excluded).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def realistic_transitions(rows: int, *, seed: int = 0) -> pa.Table:
    """``rows`` transitions recorded from the oracle in the training environment (repeated
    to size if fewer were recorded), as the Arrow batch the writer appends."""
    from agents.ppo_config import load_train_config
    from agents.warm_start import record_episodes

    class Collect:
        def __init__(self):
            self.tables = []

        def add(self, t):
            self.tables.append(t.to_arrow(run_id="bench", source="sim"))

        def flush(self):
            pass

    collector = Collect()
    env = load_train_config("configs/train.yaml").env_config()
    record_episodes(env, "oracle", collector, steps=min(rows, 60_000), seed=seed, pipelines=64)
    table = pa.concat_tables(collector.tables)
    reps = -(-rows // table.num_rows)
    return pa.concat_tables([table] * reps).slice(0, rows).combine_chunks()


_WRITER = """
import json, sys, time
import pyarrow as pa, pyarrow.ipc as ipc
from checkpoints.experience import ExperienceWriter
uri, data_file, wid, batches, start_at = sys.argv[1:6]
data = ipc.open_file(data_file).read_all()
w = ExperienceWriter(run_id="bench", source="sim", uri=uri, writer_id=wid)
time.sleep(max(0.0, float(start_at) - time.time()))
t0 = time.time()
for b in range(int(batches)):
    w.write_batch(data, batch=b)
print(json.dumps({"start": t0, "end": time.time(), "rows": data.num_rows * int(batches)}))
"""


# delta-rs writer settings the experience table used before ``append_files`` (kept to compare):
# plain encoding and no statistics on the list columns, no compression, 8 MB pages.
_PLAIN_LISTS = {
    f"{c}.list.element": {"dictionary_enabled": False, "statistics_enabled": "NONE"}
    for c in ("observation", "next_observation", "action_mask")
}


def bench_append(
    *, batch_rows: int = 50_000, repeats: int = 5, processes: int = 2
) -> dict[str, float]:
    from deltalake import ColumnProperties, WriterProperties

    from checkpoints.experience import FILES_PER_PARTITION, PARTITION_BY, ExperienceWriter
    from checkpoints.storage import append_batch

    DELTA_RS_TUNED = WriterProperties(
        compression="UNCOMPRESSED",
        data_page_size_limit=8 << 20,
        write_batch_size=8192,
        default_column_properties=ColumnProperties(dictionary_enabled=False),
        column_properties={k: ColumnProperties(**v) for k, v in _PLAIN_LISTS.items()},
    )

    data = realistic_transitions(batch_rows)
    with tempfile.TemporaryDirectory(prefix="pipemedic-bench-") as tmp:
        uri = str(Path(tmp) / "experience")
        rates: dict[int, list[float]] = {}
        # Files encoded at once per partition: the default, and one (pyarrow on one core).
        for files in (FILES_PER_PARTITION, 1):
            writer = ExperienceWriter(
                run_id="bench",
                source="sim",
                uri=f"{uri}-{files}",
                writer_id="bench-1",
                files_per_partition=files,
            )
            writer.write_batch(data, batch=0)  # warm-up: table creation, first files
            rates[files] = []
            for b in range(1, repeats + 1):
                t0 = time.perf_counter()
                writer.write_batch(data, batch=b)
                rates[files].append(batch_rows / (time.perf_counter() - t0))
        # The same appends through delta-rs's own writer (one core per partition), with the
        # settings the experience table used before and with delta-rs's defaults.
        delta_rs = {}
        for label, properties in (("tuned", DELTA_RS_TUNED), ("defaults", None)):
            other = str(Path(tmp) / f"experience-delta-rs-{label}")
            delta_rs[label] = []
            for b in range(repeats + 1):
                t0 = time.perf_counter()
                append_batch(
                    other,
                    data,
                    writer_id="d",
                    batch=b,
                    partition_by=PARTITION_BY,
                    writer_properties=properties,
                )
                if b:  # batch 0 creates the table: a warm-up
                    delta_rs[label].append(batch_rows / (time.perf_counter() - t0))
        # Several writer processes at once.
        data_file = Path(tmp) / "batch.arrow"
        with pa.OSFile(str(data_file), "wb") as sink, pa.ipc.new_file(sink, data.schema) as w:
            w.write_table(data)
        script = Path(tmp) / "writer.py"
        script.write_text(_WRITER)
        start_at = time.time() + 8  # after every process has imported and read the batch
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    uri,
                    str(data_file),
                    f"p{i}",
                    str(repeats),
                    str(start_at),
                ],
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            for i in range(processes)
        ]
        results = [
            json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs
        ]
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        total = sum(r["rows"] for r in results)
        bytes_per_row = data.nbytes / data.num_rows
    return {
        "batch_rows": batch_rows,
        "bytes_per_row_in_memory": round(bytes_per_row),
        "one_writer_median_rows_per_s": statistics.median(rates[FILES_PER_PARTITION]),
        "one_writer_min_rows_per_s": min(rates[FILES_PER_PARTITION]),
        "one_writer_max_rows_per_s": max(rates[FILES_PER_PARTITION]),
        "one_file_median_rows_per_s": statistics.median(rates[1]),
        "files_per_partition": FILES_PER_PARTITION,
        "delta_rs_tuned_median_rows_per_s": statistics.median(delta_rs["tuned"]),
        "delta_rs_defaults_median_rows_per_s": statistics.median(delta_rs["defaults"]),
        "processes": processes,
        "parallel_rows_per_s": total / wall,
    }


_LOAD = """
import json, sys, time
from agents.inference import LearnedPolicy
t0 = time.perf_counter()
LearnedPolicy.from_store("hierarchical", root=sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def bench_checkpoint_load(*, versions: int = 20, repeats: int = 7) -> dict[str, float]:
    import torch

    from agents.inference import (
        AGENTS_OF_KIND,
        LearnedPolicy,
        agent_sizes,
        manifest_for,
        weights_of,
    )
    from agents.networks import PolicyValueNet
    from checkpoints.policies import CheckpointStore

    with tempfile.TemporaryDirectory(prefix="pipemedic-bench-") as root:
        store = CheckpointStore(root)
        for v in range(1, versions + 1):
            torch.manual_seed(v)
            nets = {
                a: PolicyValueNet(*agent_sizes(a), [128, 128])
                for a in AGENTS_OF_KIND["hierarchical"]
            }
            store.publish(
                "hierarchical",
                weights_of(nets),
                run_id="bench",
                iteration=v,
                pipeline_steps=v * 1000,
                manifest=manifest_for("hierarchical", nets, {}),
            )
            if v % 5 == 0:
                store.promote("hierarchical", v)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            LearnedPolicy.from_store("hierarchical", root=root)
            times.append(time.perf_counter() - t0)
        out = subprocess.run(
            [sys.executable, "-c", _LOAD, root],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        fresh = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        weights_bytes = sum(len(b) for b in weights_of(nets).values())
    return {
        "versions": versions,
        "weights_bytes": weights_bytes,
        "median_s": statistics.median(times),
        "max_s": max(times),
        "fresh_process_s": fresh,
    }


def bench_warm_start(
    config: str,
    *,
    kind: str = "hierarchical",
    reference: str = "cold",
    cold_lr: float = 3e-4,
    record_steps: int | None = None,
    seed: int | None = None,
):
    """See the module docstring; returns both runs' figures. ``record_steps`` defaults to the
    warm start's own budget of simulated steps."""
    import os
    import uuid

    from agents.ppo_config import load_train_config
    from agents.warm_start import record_episodes
    from checkpoints.experience import ExperienceWriter
    from cluster.train import read_metrics, train

    if reference not in ("cold", "dagger"):
        raise ValueError(f"reference must be cold or dagger, got {reference!r}")
    store = tempfile.mkdtemp(prefix="pipemedic-bench-warm-")
    os.environ["PIPEMEDIC_STORE_URI"] = store  # before Ray starts: runners write there too
    cfg = load_train_config(config, kind=kind, seed=seed)
    ws = cfg.warm_start
    record_steps = record_steps or ws.pipeline_steps
    t0 = time.perf_counter()
    with ExperienceWriter(run_id=f"bench-record-{uuid.uuid4().hex[:6]}", source="sim") as w:
        record_episodes(cfg.env_config(), ws.teacher, w, steps=record_steps, seed=cfg.seed + 500)
    record_s = time.perf_counter() - t0

    def run(name: str, run_cfg) -> dict:
        out = Path(store) / "runs" / name
        summary = train(run_cfg, out, fresh=True, promote=False)
        rows = read_metrics(out / "metrics.jsonl")
        return {"summary": summary, "rows": rows}

    if reference == "cold":  # PPO from scratch, with a learning rate for learning from scratch
        reference_cfg = cfg.model_copy(
            update={
                "warm_start": ws.model_copy(update={"enabled": False}),
                "ppo": cfg.ppo.model_copy(update={"lr": cold_lr}),
            }
        )
        # Pre-training only from the table: the teacher's recorded episodes, nothing live.
        experience_ws = ws.model_copy(
            update={"source": "experience", "rounds": 1, "experience_policies": (ws.teacher,)}
        )
    else:  # live DAgger; the table replaces its first round (the teacher's own episodes)
        reference_cfg = cfg
        experience_ws = ws.model_copy(
            update={"source": "experience", "experience_policies": (ws.teacher,)}
        )
    ref = run(reference, reference_cfg)
    target = ref["summary"]["best_score"]
    experience_cfg = cfg.model_copy(
        update={
            "warm_start": experience_ws,
            "stop": cfg.stop.model_copy(update={"validation_score": target}),
        }
    )
    experience = run("experience", experience_cfg)

    def figures(r: dict) -> dict:
        s, rows = r["summary"], r["rows"]
        started = s["started_at"]
        reviews = [x for x in rows if "validation_score" in x]
        hit = next((x for x in reviews if x["validation_score"] <= target), None)
        # Validation scores move a lot between runs of the same config, so also report when
        # each run first came within 25%, 50% and 100% of the reference run's best.
        within = {}
        for factor in (1.25, 1.5, 2.0):
            first = next((x for x in reviews if x["validation_score"] <= factor * target), None)
            within[f"x{factor:g}"] = None if first is None else first["time"] - started
        warm = next((x for x in rows if x.get("warm_start")), None)
        best = min(reviews, key=lambda x: x["validation_score"])
        return {
            "warm_start_s": None if warm is None else warm["time"] - started,
            "reached_target_s": None if hit is None else hit["time"] - started,
            "reached_at_pipeline_steps": None if hit is None else hit["pipeline_steps"],
            "total_s": rows[-1]["time"] - started,
            "reached_within_s": within,
            "best_validation": best["validation_score"],
            "best_held_out": best.get("eval", {}),
        }

    return {
        "reference": reference,
        "teacher": ws.teacher,
        "cold_lr": cold_lr if reference == "cold" else None,
        "target_validation_score": target,
        "record_s": record_s,
        "record_steps": record_steps,
        reference: figures(ref),
        "experience": figures(experience),
    }
