"""Hostile paths and names: a FIFO or a device where a file is read or replaced, a row id that forges a summary line,
a models path that writes HTML into the dataset card. Each is refused (exit 2, naming the path and what it is) or
shown escaped; none hangs, and nothing that is not a regular file is ever replaced.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.job import run_job
from jobs.reporting.card import card
from schemas.pinned import PixelSettings
from schemas.shards import FORMAT_PARQUET
from tests.helpers.cli import in_process
from tests.helpers.rows import config_for, rows_of, write_manifest

HOSTILE_SOURCE = "/tmp/x|<img src=x onerror=alert(9)>|"
FORGED_ID = "bad\x1b]52;c;SGVsbG8=\x07\x1b[31mRED\r\nFAKE LINE"


class Hung(BaseException):
    """Raised into a read that blocked (a BaseException, so that no ``except Exception`` or OSError turns it into an
    ordinary error message)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """`Hung` when the block runs longer than ``seconds``: an ``open`` blocked on a FIFO is interrupted by it."""

    def expire(signum: int, frame: object) -> None:
        raise Hung(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render(capsys: pytest.CaptureFixture, *argv: str, within: float = 60) -> tuple[int, str, str]:
    """``kandinsky-render render ARGV`` in this process, locally, failing the test if it blocks ``within`` seconds."""
    with deadline(within):
        outcome = in_process(capsys, "render", "--runner", "local", "--progress", "off", *argv)
    return outcome.code, outcome.out, outcome.err


def fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


# ---------------------------------------------------------------------------------------------- reads of FIFOs


def test_a_fifo_as_config_file_is_refused_not_waited_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = fifo(tmp_path / "job.yaml")
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    code, _, err = render(capsys, "--config", config, "--manifest", manifest, "--output", str(tmp_path / "out"))
    assert code == 2 and f"--config {config}: is a FIFO, not a regular file" in err, err
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_calibration_file_is_refused_not_waited_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    calibration = fifo(tmp_path / "calibration.yaml")
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    argv = ("--calibration", calibration, "--dry-run", "--manifest", manifest, "--output", str(tmp_path / "out"))
    code, _, err = render(capsys, *argv)
    assert code == 2 and f"calibration file {calibration}: is a FIFO, not a regular file" in err, err


def test_a_hostile_calibration_file_is_refused_quickly(tmp_path: Path) -> None:
    from jobs.planning.calibration import load_calibration

    bomb = tmp_path / "bomb.yaml"
    levels = [f"l{i}: &l{i} [{', '.join(['*a' if i == 0 else f'*l{i - 1}'] * 9)}]\n" for i in range(9)]
    bomb.write_text('a: &a ["x", "x"]\n' + "".join(levels))  # 2 * 9 ** 9 items if every alias were expanded
    with pytest.raises(ValueError, match="not valid YAML"):
        load_calibration(str(bomb))
    (tmp_path / "deep.yaml").write_text("[" * 20000)
    with pytest.raises(ValueError, match="not valid YAML"):
        load_calibration(str(tmp_path / "deep.yaml"))


@pytest.mark.parametrize("named", ["folder", "file", "glob"])
def test_a_fifo_among_manifest_files_is_refused_not_waited_on(
    named: str, tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "manifest"
    folder.mkdir()
    write_manifest(folder / "a.parquet", rows_of(1))
    pipe = fifo(folder / "x.parquet")
    manifest = {"folder": str(folder), "file": pipe, "glob": f"{folder}/*.parquet"}[named]
    code, _, err = render(capsys, "--manifest", manifest, "--output", str(tmp_path / "out"), "--models", tiny_models)
    assert code == 2 and f"{pipe}: is a FIFO, not a regular file" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- status --parquet replacing


def special_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """What ``--parquet`` must never replace: name -> (path, what the refusal calls it). A symlink to a regular
    file included (replacing it would drop the link); a character device where this process may make one."""
    kept = tmp_path / "kept.txt"
    kept.write_text("not a results file")
    found = {"fifo": (Path(fifo(tmp_path / "pipe.parquet")), "a FIFO")}
    (tmp_path / "link.parquet").symlink_to(kept)
    (tmp_path / "dangling.parquet").symlink_to(tmp_path / "nowhere")
    found["link"] = (tmp_path / "link.parquet", "a symbolic link")
    found["dangling"] = (tmp_path / "dangling.parquet", "a symbolic link")
    with contextlib.suppress(OSError):  # a device of its own (as /dev/null is 1,3), never /dev/null itself
        os.mknod(tmp_path / "device.parquet", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        found["device"] = (tmp_path / "device.parquet", "a character device")
    return found


@pytest.fixture(scope="module")
def finished_output(tmp_path_factory: pytest.TempPathFactory, tiny_models: str) -> str:
    """An output of one rendered image (what ``status --parquet`` would write out)."""
    folder = tmp_path_factory.mktemp("finished")
    manifest = write_manifest(folder / "m.parquet", rows_of(1))
    config = config_for(manifest, str(folder / "out"), tiny_models, runner="local")
    run_job(config)
    return str(folder / "out")


def test_status_parquet_never_replaces_what_is_not_a_regular_file(
    finished_output: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    found = special_files(tmp_path)
    assert {"fifo", "link", "dangling"} <= set(found)
    for name, (path, kind) in found.items():
        before = os.lstat(path)
        with deadline(60):
            outcome = in_process(capsys, "status", finished_output, "--parquet", str(path))
        assert outcome.code == 2, (name, outcome)
        assert f"--parquet {path}: is {kind}, not a regular file" in outcome.err, (name, outcome.err)
        after = os.lstat(path)
        assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev), name
    assert (tmp_path / "kept.txt").read_text() == "not a results file"
    assert not (tmp_path / "nowhere").exists()
    written = tmp_path / "final.parquet"  # what it may replace: a regular file (or nothing)
    written.write_text("an older view")
    outcome = in_process(capsys, "status", finished_output, "--parquet", str(written))
    assert outcome.code == 0 and len(pq.read_table(written)) == 1, outcome


def test_status_parquet_refuses_a_device_without_making_one(
    finished_output: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no device can be made: the refusal, with ``lstat`` answering as for ``/dev/full``."""
    from jobs.reporting import status

    target = tmp_path / "full.parquet"
    target.write_text("a stand-in")
    real = os.lstat
    device = os.stat_result((stat.S_IFCHR | 0o666, *real(target)[1:]))

    def lstat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        return device if str(path) == str(target) else real(path, *args, **kwargs)

    monkeypatch.setattr(status.os, "lstat", lstat)
    outcome = in_process(capsys, "status", finished_output, "--parquet", str(target))
    assert outcome.code == 2 and f"--parquet {target}: is a character device, not a regular file" in outcome.err
    assert target.read_text() == "a stand-in"


# ----------------------------------------------------------------------------------- ids in the run's summary


def test_a_newline_in_a_row_id_cannot_forge_a_summary_line(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    rows = [{**rows_of(1)[0], "id": FORGED_ID, "height": 7}]  # refused (unsupported_size), named in the summary
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    code, out, err = render(capsys, "--manifest", manifest, "--output", str(tmp_path / "out"), "--models", tiny_models,
                            within=300)  # fmt: skip
    assert code in (0, 3), err  # 3: above --max-error-fraction (the only row failed)
    named = [line for line in out.splitlines() if "first failed (" in line]
    assert len(named) == 1, out
    assert named[0].endswith("RED\\x0d\\x0aFAKE LINE #0"), named[0]
    assert not any(line.startswith("FAKE LINE") for line in out.splitlines()), out
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out), out  # no control character but the summary's newlines


# ---------------------------------------------------------------------------------------- the dataset card


def hostile_card() -> str:
    """A card whose checkpoint source, content id, name and pinned changes hold ``|`` and HTML."""
    pixels = PixelSettings(
        models={"models_dir": HOSTILE_SOURCE},
        checkpoints={
            "prior": {"source": f"{HOSTILE_SOURCE}/prior", "content": "abc|<b>x</b>"},
            "decoder|<i>": {"source": "plain/decoder", "content": "0123"},
        },
        dtype="float32",
        defaults={"height": 512},
        seed=1,
        mixed=[{"run_id": "r|<u>", "changes": [f"checkpoint prior: {HOSTILE_SOURCE} @ a (pinned) vs b @ c"]}],
    )
    return card(FORMAT_PARQUET, None, manifest=f"{HOSTILE_SOURCE}/m.parquet", pixels=pixels)


UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")


def test_a_pipe_in_a_models_path_stays_in_its_table_cell() -> None:
    text = hostile_card()
    table = text[text.index("| checkpoint | source | content id |") :].split("\n\n")[0].splitlines()
    assert len(table) == 4, table  # header, rule, two checkpoints
    for row in table:
        assert len(UNESCAPED_PIPE.findall(row)) == 4, row  # | a | b | c |: three cells, never more
    outside_code = CODE_SPAN.sub("", text.replace("\\|", ""))
    for tag in ("<img", "<b>", "<i>", "<u>"):
        assert tag not in outside_code, (tag, outside_code)


def test_the_card_renders_no_html_from_a_models_path() -> None:
    """The card as a GitHub-flavoured Markdown renderer shows it: the hostile tags only as text."""
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(hostile_card())
    assert "<img" not in html and "<b>" not in html and "<u>" not in html, html
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
    assert [len(re.findall(r"<t[dh]", row)) for row in rows] == [3, 3, 3], rows
    assert "&lt;img src=x onerror=alert(9)&gt;" in html
