"""Mode ``plan``: driver time and peak memory of planning against previous results, each size in a fresh process."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.benchmarks.common import REPO, Mode, machine, peak_rss_mb, prompt, subprocess_env
from schemas.results import RESULTS_SCHEMA


def write_plan_fixture(root: Path, *, num_rows: int, part_rows: int = 1000) -> None:
    """A ``num_rows`` manifest plus ``num_rows`` ok results, half of them for rows of this manifest.

    Like a scheduled run: yesterday's output holds results for ids ``num_rows/2 .. 3*num_rows/2``,
    today's manifest asks for ids ``0 .. num_rows``. Results parts hold ``part_rows`` rows each
    (the job's default flush), so reading them back costs what it does in a real output.
    """
    root.mkdir(parents=True, exist_ok=True)
    index = np.arange(num_rows)
    manifest = pa.table(
        {
            "id": pa.array([f"m-{i:09d}" for i in range(num_rows)]),
            "prompt": pa.array([f"{prompt(i)}, take {i % 997}" for i in range(num_rows)]),
            "negative_prompt": pa.array([("blurry" if i % 10 == 0 else None) for i in range(num_rows)], pa.string()),
            "height": pa.array(np.where(index % 10 == 3, 768, 512)),
            "width": pa.array(np.where(index % 10 == 3, 768, 512)),
            "seed": pa.array([None if i % 2 else i for i in range(num_rows)], pa.int64()),
        }
    )
    pq.write_table(manifest, root / "manifest.parquet")
    results = root / "out" / "results"
    results.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    first = num_rows // 2
    for part, start in enumerate(range(0, num_rows, part_rows)):
        ids = [f"m-{i:09d}" for i in range(first + start, first + min(start + part_rows, num_rows))]
        n = len(ids)
        columns = {f.name: pa.nulls(n, f.type) for f in RESULTS_SCHEMA}
        columns.update(
            id=pa.array(ids),
            image_index=pa.array(np.zeros(n, np.int32)),
            status=pa.array(["ok"] * n),
            uri=pa.array([f"file:///previous/images/{i}.png" for i in ids]),
            run_id=pa.array(["previous"] * n),
            finished_at=pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        )
        table = pa.table(columns, schema=RESULTS_SCHEMA)
        pq.write_table(table, results / f"part-previous-{part:06d}.parquet", compression="zstd")


def plan_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a fresh process: read previous results and plan, exactly as `jobs.execution.job.run_job` starts."""
    import pyarrow.compute as pc

    from actors.storage import Storage
    from jobs.output.results import final_results, read_results
    from jobs.planning.plan import make_plan
    from schemas.config import JobConfig
    from schemas.manifest import SUPPORTED_MODES
    from schemas.results import STATUS_OK

    baseline = peak_rss_mb()
    root = Path(args.dir)
    started = time.perf_counter()
    config = JobConfig(manifest=str(root / "manifest.parquet"), output=str(root / "out"))
    columns = ["id", "image_index", "status", "finished_at"]
    previous = final_results(read_results(Storage(config.output), columns=columns))
    done = previous.filter(pc.equal(previous.column("status"), STATUS_OK))
    plan = make_plan(config, done=done, supported_modes=SUPPORTED_MODES)
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_imports_mb": round(baseline, 1),
        "num_rows": plan.num_rows,
        "num_done": plan.num_done,
        "num_to_render": plan.num_to_render,
        "num_batches": len(plan.batches),
    }


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``plan``: time and peak driver memory of planning, each size in a fresh process."""
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    runs = []
    for num_rows in args.rows:
        root = work_dir / f"plan-{num_rows}"
        write_plan_fixture(root, num_rows=num_rows)
        command = [sys.executable, "-m", "jobs.cli", "benchmark", "plan-worker", "--dir", str(root)]
        proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"plan worker failed:\n{proc.stderr[-3000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"{num_rows:>9,} rows vs {num_rows:,} previous results: {run['seconds']:.2f} s, peak RSS "
            f"{run['peak_rss_mb']:.0f} MB (after imports {run['rss_after_imports_mb']:.0f} MB), "
            f"{run['num_to_render']:,} to render in {run['num_batches']:,} batches",
            flush=True,
        )
    result: dict[str, Any] = {"mode": "plan", "machine": machine(), **runs[-1], "runs": runs}
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        result["rows_growth"] = round(large["num_rows"] / small["num_rows"], 2)
        result["peak_rss_growth"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 2)
        print(f"rows x{result['rows_growth']:g} -> peak RSS x{result['peak_rss_growth']:g}")
    return result


def add_arguments(plan: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark plan``."""
    plan.add_argument(
        "--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="manifest sizes (each vs as many results)"
    )
    plan.add_argument("--work-dir", help="where fixtures go (default: a new temp dir)")


def add_worker_arguments(worker: argparse.ArgumentParser) -> None:
    """Flags of the hidden ``benchmark plan-worker`` (the fresh process ``plan`` measures)."""
    worker.add_argument("--dir", required=True)


MODES = (
    Mode(name="plan", help="driver time and peak memory of planning", add_arguments=add_arguments, run=run_plan),
    Mode(name="plan-worker", help=None, add_arguments=add_worker_arguments, run=plan_worker),
)
