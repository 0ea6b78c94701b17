"""Modes ``plan`` and ``startup``: the driver's time and peak memory to stream a manifest's shards (a dry run over
synthetic manifests of 1 M to 100 M rows) and to start a rerun over an output of 10 M finished images, each in a
fresh process."""

from __future__ import annotations

import argparse
import functools
import json
import shutil
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

ROW_GROUP_ROWS = 100_000
PROMPTS = pa.array([prompt(i) for i in range(720)])


def write_manifests(root: Path, *, num_rows: int, num_files: int) -> None:
    """``num_rows`` text2img rows in ``num_files`` Parquet files of ``ROW_GROUP_ROWS``-row groups, written a
    row group at a time: distinct ids, 720 prompts, 10% with a negative prompt, 10% at 768x768, half unseeded."""
    root.mkdir(parents=True, exist_ok=True)
    per_file = -(-num_rows // num_files)
    for number in range(num_files):
        first, last = number * per_file, min(num_rows, (number + 1) * per_file)
        if first >= last:
            break
        with pq.ParquetWriter(root / f"part-{number:05d}.parquet", _schema()) as writer:
            for start in range(first, last, ROW_GROUP_ROWS):
                writer.write_table(_rows(start, min(last, start + ROW_GROUP_ROWS)))


def _schema() -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("negative_prompt", pa.string()),
            ("height", pa.int64()),
            ("width", pa.int64()),
            ("seed", pa.int64()),
        ]
    )


def _rows(start: int, stop: int) -> pa.Table:
    index = np.arange(start, stop)
    ids = pa.array(np.char.add("m-", np.char.zfill(index.astype(str), 10)))
    side = np.where(index % 10 == 3, 768, 512)
    return pa.table(
        {
            "id": ids,
            "prompt": PROMPTS.take(pa.array(index % 720)),
            "negative_prompt": pa.array(np.where(index % 10 == 0, "blurry", None), pa.string()),
            "height": side,
            "width": side,
            "seed": pa.array(index, mask=index % 2 == 1),
        },
        schema=_schema(),
    )


def plan_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a fresh process: a dry run over the fixture (every shard read, validated and planned)."""
    from jobs.planning.availability import ModelUnavailableError
    from jobs.planning.dry_run import dry_run
    from schemas.config import JobConfig

    baseline = peak_rss_mb()
    root = Path(args.dir)
    started = time.perf_counter()
    try:
        text = dry_run(JobConfig(manifest=str(root / "manifests"), output=str(root / "out"), batch_size=16))
    except ModelUnavailableError as exc:  # no models here: the plan is what is measured
        text = exc.report
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_imports_mb": round(baseline, 1),
        "summary": text.splitlines()[1:3],
    }


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``plan``: dry runs over 1 M, 10 M and 100 M rows (default), each in a fresh process."""
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    runs = []
    for num_rows in args.rows:
        root = work_dir / f"plan-{num_rows}"
        started = time.perf_counter()
        _fixture(
            root / "manifests",
            functools.partial(write_manifests, root / "manifests", num_rows=num_rows, num_files=args.files),
        )
        written = time.perf_counter() - started
        run = {"num_rows": num_rows, "num_files": args.files, "fixture_seconds": round(written, 1)}
        run |= _worker(["plan-worker", "--dir", str(root)])
        runs.append(run)
        print(
            f"{num_rows:>11,} rows in {args.files} files: dry run {run['seconds']:.1f} s, peak RSS "
            f"{run['peak_rss_mb']:.0f} MB (after imports {run['rss_after_imports_mb']:.0f} MB); "
            f"{run['summary'][0]}",
            flush=True,
        )
    result: dict[str, Any] = {"mode": "plan", "machine": machine(), **runs[-1], "runs": runs}
    if len(runs) >= 2:
        result["rows_growth"] = round(runs[-1]["num_rows"] / runs[0]["num_rows"], 2)
        result["peak_rss_growth"] = round(runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)
        print(f"rows x{result['rows_growth']:g} -> peak RSS x{result['peak_rss_growth']:g}")
    return result


def _fixture(path: Path, write: Any) -> None:
    """Run ``write`` unless a complete fixture is at ``path`` already (a ``.complete`` file, written last)."""
    done = path / ".complete"
    if done.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    write()
    done.touch()


def _worker(command: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "benchmark", *command],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark {command[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_finished_output(root: Path, *, num_rows: int, num_files: int, shard_rows: int) -> None:
    """An output where every shard of the fixture's manifests is done: markers as the job writes them (with
    gallery samples), one results and one data file per shard (placeholders: a rerun never reads them)."""
    from actors.scores import empty_scores
    from actors.storage import Storage
    from jobs.planning.ids import files_digest
    from jobs.planning.manifests import cut_shards, list_manifest_paths, read_footer, with_content_digest
    from jobs.planning.output_index import OutputIndex
    from jobs.publishing.log import CompletionLog
    from jobs.publishing.markers import new_marker, write_settings
    from schemas.keys import sample_rank
    from schemas.shards import DatasetSettings, data_key, results_key
    from schemas.summary import Counts, PartSummary

    storage = Storage(str(root / "out"))
    listed = list_manifest_paths(str(root / "manifests"))
    files = [with_content_digest(read_footer(uri, rel), known=None) for uri, rel in listed]
    settings = DatasetSettings(
        manifest=str(root / "manifests"),
        output_format="webdataset",
        shard_rows=shard_rows,
        ids_checked=files_digest(files),
    )
    write_settings(storage, settings)
    log = CompletionLog(storage, OutputIndex(output_format="webdataset"), run_id="previous")
    for file in files:
        for shard in cut_shards(file, shard_rows=shard_rows):
            ids = [f"m-{shard.start + k:010d}" for k in range(60)]
            sample = [
                {
                    "id": row_id,
                    "image_index": 0,
                    "status": "ok",
                    "error": None,
                    "error_kind": None,
                    "seed": k,
                    "width": 512,
                    "height": 512,
                    "mode": "text2img",
                    "prompt": prompt(k),
                    "rank": sample_rank(row_id, 0),
                    "uri": f"data/{shard.name}.tar",
                    "member": f"k{k}.png",
                    "results": results_key(shard.name),
                }
                for k, row_id in enumerate(ids)
            ]
            counts = Counts.from_dict(
                {
                    "num_images": shard.num_rows,
                    "by_status": {"ok": shard.num_rows},
                    "by_mode": {"text2img": {"ok": shard.num_rows}},
                    "errors_by_kind": {},
                }
            )
            summary = PartSummary(
                part=shard.name,
                shard=shard.name,
                run_id="previous",
                results=results_key(shard.name),
                data=data_key(shard.name, "webdataset"),
                counts=counts,
                busy_seconds={"prior": 1.0, "decoder": 50.0},
                ok_busy_seconds={"prior": 1.0, "decoder": 50.0, "images": shard.num_rows},
                scores=empty_scores(),
                sample=tuple(sample),
            )
            storage.write_bytes(results_key(shard.name), b"")
            storage.write_bytes(summary.data, b"")
            log.publish(new_marker(shard, summary, output_format="webdataset"))
    log.compact()


def startup_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a fresh process: what a rerun does before its runner starts (lease, plan, orphans, scan, settings)."""
    from actors.storage import Storage
    from jobs.planning.run_plan import plan_run
    from jobs.publishing.lease import Lease
    from jobs.publishing.markers import write_settings
    from jobs.publishing.orphans import delete_orphans
    from schemas.config import JobConfig

    root = Path(args.dir)
    config = JobConfig(manifest=str(root / "manifests"), output=str(root / "out"), output_format="webdataset")
    started = time.perf_counter()
    storage = Storage(config.output)
    with Lease(storage, run_id="startup-benchmark"):
        plan = plan_run(config, storage)
        deleted = delete_orphans(storage, plan.index)
        scan = plan.scan()
        write_settings(storage, plan.settings)
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "num_shards": plan.num_shards,
        "num_pending": len(plan.pending),
        "num_images_final": plan.index.totals.num_images,
        "orphans_deleted": len(deleted),
        "ids_checked": plan.ids_checked,
        "to_render": scan.num_images,
    }


def run_startup(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``startup``: start-up of a rerun over an output holding ``--rows`` finished images."""
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    root = work_dir / f"startup-{args.rows}"

    def write() -> None:
        write_manifests(root / "manifests", num_rows=args.rows, num_files=args.files)
        write_finished_output(root, num_rows=args.rows, num_files=args.files, shard_rows=args.shard_rows)

    _fixture(root, write)
    runs = [_worker(["startup-worker", "--dir", str(root)]) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    seconds = ", ".join(f"{run['seconds']:.2f}" for run in runs)
    print(
        f"rerun over {best['num_images_final']:,} finished images in {best['num_shards']:,} shards: start-up "
        f"{seconds} s, peak RSS {best['peak_rss_mb']:.0f} MB, {best['num_pending']} shard(s) to render",
        flush=True,
    )
    return {"mode": "startup", "machine": machine(), **best, "runs": runs}


def add_arguments(plan: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark plan``."""
    plan.add_argument(
        "--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000], help="manifest sizes"
    )
    plan.add_argument("--files", type=int, default=20, help="manifest files per size")
    plan.add_argument("--work-dir", help="where fixtures go (default: a new temp dir; reused when given)")


def add_startup_arguments(startup: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark startup``."""
    startup.add_argument("--rows", type=int, default=10_000_000, help="finished images in the output (1 per row)")
    startup.add_argument("--files", type=int, default=20, help="manifest files")
    startup.add_argument("--shard-rows", type=int, default=1000, help="rows per shard of the finished output")
    startup.add_argument("--repeats", type=int, default=3, help="fresh-process start-ups measured")
    startup.add_argument("--work-dir", help="where fixtures go (default: a new temp dir; reused when given)")


def add_worker_arguments(worker: argparse.ArgumentParser) -> None:
    """Flags of the hidden worker modes (the fresh processes ``plan`` and ``startup`` measure)."""
    worker.add_argument("--dir", required=True)


MODES = (
    Mode(name="plan", help="driver peak memory and time of a dry run over 1 M to 100 M rows",
         add_arguments=add_arguments, run=run_plan),
    Mode(name="startup", help="start-up of a rerun over an output of 10 M finished images",
         add_arguments=add_startup_arguments, run=run_startup),
    Mode(name="plan-worker", help=None, add_arguments=add_worker_arguments, run=plan_worker),
    Mode(name="startup-worker", help=None, add_arguments=add_worker_arguments, run=startup_worker),
)  # fmt: skip
