"""The output is a safe place: nothing outside it touched, nothing inside lost, no secret published or printed.

Each test is a careless or hostile use that once lost data, leaked a credential or crashed; renders run
in-process with the local runner (the CLI's own entry point where its exit status and output are the point).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.storage import Storage, UnsafeObjectError
from jobs.job import run_job
from jobs.render import main as render_main
from jobs.reporting.status import main as status_main
from jobs.reporting.status import read_final, summary
from schemas.shards import DATASET_FILE, Marker
from tests.helpers.http_files import serving
from tests.helpers.rows import MARKERS, assert_exactly_one_ok, config_for, raw_results, rows_of, write_manifest


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) -> its bytes."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            found[str(path.relative_to(folder))] = path.read_bytes() if not path.is_symlink() else b"<link>"
    return found


def rendered(tmp_path: Path, tiny_models: str, *, n: int = 2, **kwargs: object) -> tuple[str, str]:
    """(manifest, output) of a finished output of ``n`` one-row shards, rendered in-process."""
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(n))
    output = str(tmp_path / "out")
    run_job(config_for(manifest, output, tiny_models, runner="local", shard_rows=1, **kwargs))
    return manifest, output


def render_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``kandinsky-render render ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = render_main(["--runner", "local", "--progress", "off", *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def status_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = status_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_overwrite_deletes_nothing_until_every_check_passes_and_only_the_jobs_own_files(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    manifest, output = rendered(tmp_path, tiny_models)
    (Path(output) / "results" / "paper.tex").write_text("mine")  # the user's file, beside the job's
    before = snapshot(Path(output))
    code, _, err = render_cli(capsys, "--output", output, "--overwrite")
    assert code == 2 and "--manifest is required" in err and snapshot(Path(output)) == before
    code, _, err = render_cli(
        capsys, "--output", output, "--manifest", manifest, "--overwrite", "--models", str(tmp_path / "nope")
    )
    assert code == 2 and "cannot be loaded" in err and snapshot(Path(output)) == before
    code, _, _ = render_cli(
        capsys, "--output", output, "--manifest", manifest, "--overwrite", "--models", tiny_models, "--shard-rows", "2"
    )
    after = snapshot(Path(output))
    assert code == 0 and after["results/paper.tex"] == b"mine"
    assert len([key for key in after if key.startswith("shards/")]) == 1  # one shard of 2 rows: the old ones went
    assert_exactly_one_ok(raw_results(output), {("r0", 0), ("r1", 0)})


def test_a_folder_that_is_not_an_output_is_refused_and_nothing_in_it_changes(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(2))
    project = tmp_path / "project"
    for name, text in {"data/raw/important.csv": "a,b", "results/paper.tex": "tex", "README.md": "mine"}.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    before = snapshot(project)
    args = ["--output", str(project), "--manifest", manifest, "--models", tiny_models]
    code, _, err = render_cli(capsys, *args)
    assert code == 2 and "is not empty and is not a kandinsky-render output" in err and "README.md" in err
    code, _, _ = render_cli(capsys, *args, "--overwrite")
    assert code == 2 and snapshot(project) == before
    code, _, err = render_cli(capsys, *args, "--allow-other-files")  # README.md is a name the job writes
    assert code == 2 and "README.md" in err and snapshot(project) == before
    (project / "README.md").unlink()
    assert render_cli(capsys, *args, "--allow-other-files")[0] == 0
    assert render_cli(capsys, *args, "--overwrite", "--shard-rows", "1")[0] == 0  # an output of ours now
    after = snapshot(project)
    assert after["data/raw/important.csv"] == b"a,b" and after["results/paper.tex"] == b"tex"
    assert_exactly_one_ok(raw_results(str(project)), {("r0", 0), ("r1", 0)})


def test_a_bucket_that_is_not_an_output_is_refused(tmp_path: Path, tiny_models: str, s3_options: dict) -> None:
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    fs = s3fs.S3FileSystem(**options)
    fs.pipe_file(f"{bucket}/data/warehouse/sales-2026.parquet", b"PAR1 sales")
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    config = config_for(manifest, f"s3://{bucket}", tiny_models, runner="local", storage_options=options)
    with pytest.raises(ValueError, match="holds data"):
        run_job(config)
    assert fs.cat_file(f"{bucket}/data/warehouse/sales-2026.parquet") == b"PAR1 sales"
    assert run_job(dataclasses.replace(config, allow_other_files=True)).stats["num_rendered"] == 1
    run_job(dataclasses.replace(config, overwrite=True))
    assert fs.cat_file(f"{bucket}/data/warehouse/sales-2026.parquet") == b"PAR1 sales"


def test_links_out_of_the_output_and_overlaps_with_the_models_are_refused(tmp_path: Path, tiny_models: str) -> None:
    manifest, output = rendered(tmp_path, tiny_models, n=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    os.symlink(elsewhere, Path(output) / "data")
    config = config_for(manifest, output, tiny_models, runner="local", overwrite=True)
    with pytest.raises(ValueError, match="leads outside the folder"):
        run_job(config)
    assert (elsewhere / "keep.txt").read_text() == "keep"
    with pytest.raises(UnsafeObjectError):
        Storage(output).delete_keys(["data/keep.txt"])
    for key in ("../m.parquet", "/etc/passwd", "a//b", "a/./b"):
        with pytest.raises(UnsafeObjectError):
            Storage(output).read_bytes(key)
    for where in (tiny_models, f"{tiny_models}/prior/unet", str(Path(tiny_models).parent)):
        with pytest.raises(ValueError, match="overlap"):
            run_job(config_for(manifest, where, tiny_models, runner="local", allow_other_files=True))
    assert (Path(tiny_models) / "prior" / "model_index.json").exists()
    # Links deeper down (a part file, a part's folder) are found before anything is deleted.
    os.unlink(Path(output) / "data")
    files = config_for(manifest, str(tmp_path / "files"), tiny_models, runner="local")
    run_job(dataclasses.replace(files, output_format="files"))
    part = next((tmp_path / "files" / "images").iterdir())
    for link, target in (
        (part / "linked.png", elsewhere / "keep.txt"),
        (tmp_path / "files" / "images" / "x", elsewhere),
    ):
        os.symlink(target, link)
        before = snapshot(tmp_path / "files")
        with pytest.raises(ValueError, match="leads outside the folder"):
            run_job(dataclasses.replace(files, output_format="files", overwrite=True))
        assert snapshot(tmp_path / "files") == before and (elsewhere / "keep.txt").read_text() == "keep"
        os.unlink(link)
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_job(config_for(manifest, str(not_a_folder), tiny_models, runner="local"))
    with pytest.raises(ValueError, match="no such manifest"):  # a refused first run leaves no folder behind
        run_job(config_for(str(tmp_path / "none.parquet"), str(tmp_path / "new-out"), tiny_models, runner="local"))
    assert not (tmp_path / "new-out").exists()


def test_a_done_shard_whose_part_is_gone_is_reported_and_rendered_again(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    manifest, output = rendered(tmp_path, tiny_models, n=3, output_format="webdataset")
    markers = sorted(Path(output).glob(MARKERS))
    first, second = (Marker.from_json(path.read_bytes()) for path in markers[:2])
    Path(output, first.parts[0].data).unlink()  # the tar of one shard, the results of another
    Path(output, second.parts[0].results).unlink()
    found = summary(output)
    assert found["num_shards_damaged"] == 2 and found["num_images"] == 1
    assert "is missing" in found["damaged"][first.shard]
    code, out, err = status_cli(capsys, output, "--all")
    assert code == 0 and out.count("\tok\t") == 1 and err.count("left out") == 2
    again = run_job(config_for(manifest, output, tiny_models, runner="local", retry_errors=True))
    assert again.stats["num_rendered"] == 2 and summary(output)["num_shards_damaged"] == 0
    final = read_final(output).to_pylist()
    assert sorted((row["id"], row["status"]) for row in final) == [("r0", "ok"), ("r1", "ok"), ("r2", "ok")]
    assert_exactly_one_ok(raw_results(output), {("r0", 0), ("r1", 0), ("r2", 0)})


def test_a_renamed_or_edited_manifest_file_is_refused_naming_it(tmp_path: Path, tiny_models: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    table = pa.Table.from_pylist([{**row, "prompt": "aaaa"} for row in rows_of(2)])
    pq.write_table(table, folder / "day-1.parquet", write_statistics=False, compression="none")
    config = config_for(str(folder), str(tmp_path / "out"), tiny_models, runner="local")
    run_job(config)
    os.rename(folder / "day-1.parquet", folder / "day-one.parquet")
    with pytest.raises(ValueError, match="day-one.parquet holds the same bytes as day-1.parquet"):
        run_job(config)
    os.rename(folder / "day-one.parquet", folder / "day-1.parquet")
    edited = pa.Table.from_pylist([{**row, "prompt": "bbbb", "seed": row["seed"] + 5} for row in rows_of(2)])
    size = (folder / "day-1.parquet").stat().st_size
    pq.write_table(edited, folder / "day-1.parquet", write_statistics=False, compression="none")
    assert (folder / "day-1.parquet").stat().st_size == size  # same size, same footer: only the bytes tell
    with pytest.raises(ValueError, match="changed since its shards were rendered .*content"):
        run_job(config)
    # Renamed and edited: new bytes under a new name, the rendered ids again (the output would hold them twice).
    os.rename(folder / "day-1.parquet", folder / "day-one.parquet")
    with pytest.raises(ValueError, match="row 0: id 'r0' was rendered into this output from day-1.parquet"):
        run_job(config)
    assert_exactly_one_ok(raw_results(config.output), {("r0", 0), ("r1", 0)})


def test_status_parquet_replaces_its_file_whole_or_not_at_all(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    _, output = rendered(tmp_path, tiny_models, n=1)
    target = tmp_path / "final.parquet"
    target.write_bytes(b"precious")
    code, _, err = status_cli(capsys, str(tmp_path / "not-an-output"), "--parquet", str(target))
    assert code == 2 and target.read_bytes() == b"precious"
    code, _, err = status_cli(capsys, output, "--parquet", f"{output}/results/x.parquet")
    assert code == 2 and "inside the output" in err
    assert status_cli(capsys, output, "--parquet", str(target))[0] == 0
    assert pq.read_table(target).num_rows == 1


def test_credentials_in_a_manifest_uri_are_never_written_or_printed(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    write_manifest(served / "a.parquet", rows_of(2))
    output = tmp_path / "out"
    with serving(str(served)) as host:
        uri = f"http://alice:pw-s3cr3t@{host}/a.parquet?X-Amz-Signature=SIG0123456789#frag-9876"
        code, out, err = render_cli(capsys, "--manifest", uri, "--output", str(output), "--models", tiny_models)
        assert code == 0, err
        code, status_out, status_err = status_cli(capsys, str(output), "--all", "--json")
    for secret in ("pw-s3cr3t", "alice", "SIG0123456789", "frag-9876"):
        for key, data in snapshot(output).items():
            assert secret not in key and secret.encode() not in data, (secret, key)
        assert secret not in out + err + status_out + status_err, secret
    pinned = json.loads((output / DATASET_FILE).read_text())["manifest"]
    assert pinned == f"http://{host}/a.parquet"


def test_status_prints_no_file_it_should_not_read_and_no_terminal_escape(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [{**rows_of(1)[0], "id": "evil\x1b]52;c;aGk=\x07\x1b[2J"}])
    output = tmp_path / "out"
    code, out, err = render_cli(capsys, "--manifest", manifest, "--output", str(output), "--models", tiny_models)
    assert code == 0 and "\x1b" not in out + err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaked-secret-value-123")
    (output / "_SUCCESS").unlink()
    os.symlink("/proc/self/environ", output / "_SUCCESS")
    (output / "_LEASE.json").write_text(json.dumps({"run_id": "x\x1b[31mred", "host": "h\x07", "extra": "\x1b]52;c;"}))
    for argv in ((), ("--all",), ("--errors",), ("--json",)):
        code, out, err = status_cli(capsys, str(output), *argv)
        assert (
            code == 0 and "leaked-secret-value-123" not in out + err and "\x1b" not in out + err and "\x07" not in out
        )
    assert "\\x1b" in status_cli(capsys, str(output))[1]  # shown escaped


def test_markers_cannot_make_status_read_outside_the_output(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    """A marker edited to name a file elsewhere is not one of the job's when read back (``status --verify`` reads
    every marker), and listings never follow it: the completion log names a shard's parts by the shard's name."""
    _, output = rendered(tmp_path, tiny_models, n=1)
    secret = tmp_path / "secret"
    secret.mkdir()
    (marker_path,) = Path(output).glob(MARKERS)
    raw = json.loads(marker_path.read_text())
    table = pq.read_table(Path(output, raw["parts"][0]["results"]))
    pq.write_table(
        table.set_column(table.schema.get_field_index("id"), "id", pa.array(["planted-row"])), secret / "other.parquet"
    )
    for planted in ("../secret/other.parquet", str(secret / "other.parquet"), "results"):
        raw["parts"][0]["results"] = planted
        marker_path.write_text(json.dumps(raw))
        assert summary(output, verify=True)["num_images"] == 0  # the marker is not one of the job's: not done
        code, out, _ = status_cli(capsys, output, "--all")
        assert code == 0 and "planted-row" not in out and out.count("\tok\t") == 1  # the checkpoint's own part


def test_markers_cannot_make_status_read_another_bucket(tmp_path: Path, tiny_models: str, s3_options: dict) -> None:
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    output = f"s3://{bucket}/out"
    run_job(config_for(manifest, output, tiny_models, runner="local", storage_options=options))
    fs = s3fs.S3FileSystem(**options)
    (key,) = fs.glob(f"{bucket}/out/{MARKERS}")
    raw = json.loads(fs.cat_file(key))
    raw["parts"][0]["results"] = f"/{bucket}/victim/private/other.parquet"
    fs.pipe_file(key, json.dumps(raw).encode())
    assert summary(output, storage_options=options, verify=True)["num_images"] == 0


def test_corrupt_state_is_a_clear_error_or_skipped_never_a_crash_or_a_hang(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    _, output = rendered(tmp_path, tiny_models, n=2)
    out = Path(output)
    markers = sorted(out.glob(MARKERS))
    markers[0].write_text("[" * 100_000)
    assert summary(output, verify=True)["num_shards_done"] == 1
    raw = json.loads(markers[1].read_text())
    raw["parts"][0]["results_size"] = None  # as markers of earlier versions: no size to compare
    markers[1].write_text(json.dumps(raw))
    results = out / raw["parts"][0]["results"]
    pq.write_table(pa.table({"id": pa.array([1]), "status": pa.array([2.5])}), results)  # wrong column types
    code, _, err = status_cli(capsys, output, "--all")
    assert code == 0 and "not the results the job wrote" in err
    os.mkfifo(out / "shards" / "x.json")
    os.mkfifo(out / "shards" / f"{raw['shard'][:-1]}9.json")
    done = threading.Event()
    thread = threading.Thread(target=lambda: (summary(output), done.set()), daemon=True)
    thread.start()
    thread.join(60)
    assert done.is_set(), "status hung on a FIFO"
    for text in ("[]", json.dumps({"manifest": "m", "output_format": "files", "shard_rows": 1, "evil": 1})):
        (out / DATASET_FILE).write_text(text)
        code, _, err = status_cli(capsys, output)
        assert code == 2 and DATASET_FILE in err and "Traceback" not in err
    assert status_cli(capsys, "/etc/passwd")[0] == 2


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--num-writer-actors", "0:"),
        ("--lease-ttl", "nan"),
        ("--lease-ttl", "inf"),
        ("--progress-every", "0"),
        ("--connect-wait", "nan"),
        ("--decoder-cpus", "nan"),
        ("--idle-timeout", "-1"),
        ("--stage-wait", "nan"),
        ("--call-timeout", "-5"),
        ("--guidance-scale", "nan"),
        ("--guidance-scale", "-1"),
        ("--plan-for", "99999999xH100"),
    ],
)
def test_every_number_flag_is_checked_before_anything_starts(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    output = tmp_path / "out"
    code, _, err = render_cli(capsys, "--manifest", manifest, "--output", str(output), f"{flag}={value}")
    assert code == 2 and flag in err, err
    assert not output.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\nc: [" + "*b, " * 12 + "]\n", "aliases"),
        ("seed: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested"),
        ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("seed: 1\n" + "#" * (2 << 20) + "\n", "larger than"),
    ],
)  # fmt: skip
def test_hostile_config_files_are_refused_quickly(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "job.yaml").write_text(text)
    code, _, err = render_cli(capsys, "--config", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "out"))
    assert code == 2 and message in err


def test_config_words_stay_words_and_object_store_options_spare_plain_urls(
    tmp_path: Path, tiny_models: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from jobs.options.config_file import parse_args
    from jobs.options.flags import build_parser

    (tmp_path / "job.yaml").write_text("progress: off\nlog-level: debug\n")
    args = parse_args(build_parser(), ["--config", str(tmp_path / "job.yaml"), "--output", "o"])
    assert (args.progress, args.log_level) == ("off", "DEBUG")
    served = tmp_path / "served"
    served.mkdir()
    write_manifest(served / "a.parquet", rows_of(2))
    monkeypatch.setenv(
        "KANDINSKY_RENDER_STORAGE_OPTIONS", json.dumps({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    )
    with serving(str(served)) as host:
        manifest = f"http://{host}/a.parquet"
        code, out, err = render_cli(
            capsys, "--manifest", manifest, "--output", "o", "--models", tiny_models, "--dry-run"
        )
    assert code == 0, err
    assert "2 row" in out


def test_the_card_shows_a_hostile_manifest_path_as_text(tmp_path: Path, tiny_models: str) -> None:
    folder = tmp_path / "a`b\n---\n<img src=x onerror=alert(1)>"
    folder.mkdir()
    manifest = write_manifest(folder / "m.parquet", rows_of(1))
    output = tmp_path / "out"
    run_job(config_for(manifest, str(output), tiny_models, runner="local"))
    body = (output / "README.md").read_text().split("---\n", 2)[2]
    line = next(line for line in body.splitlines() if "Rendered from the manifest" in line)
    assert "<img" in line and "\\x0a---\\x0a" in line and "``" in line  # one line, inside a code span
    assert "---" not in [line.strip() for line in body.splitlines()]
