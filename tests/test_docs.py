"""README.md and docs/: every fenced block runs (here, or in the test its marker names) or says why it cannot; the
site builds with `mkdocs build --strict`; the configuration reference equals a fresh generation; the documented
Ray cluster commands run as written."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import clean_env, in_process
from tests.helpers.docs import Block, blocks_in, doc_pages, page_blocks
from tests.helpers.gallery import check_example_render
from tests.helpers.places import REPO

BIN = str(Path(sys.executable).parent)  # the virtualenv's kandinsky-render, ray, mkdocs, ruff
BLOCKS = [block for page in doc_pages() for block in page_blocks(page)]
RUN_CONTEXTS = {"repo": {"bash"}, "scratch": {"bash", "python"}}


def example_cache(tmp_path: Path, tiny_models: str) -> str:
    """A ``KANDINSKY_RENDER_CACHE`` for a page's commands, its ``tiny-models/`` a copy of the session's (the same
    seed and MoVQ scale as ``--example`` builds, so the example reuses them instead of building its own: 5.6
    CPU-seconds each; building them is README's first command's test, `tests/test_cli.py`)."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_models, cache / "tiny-models")
    return str(cache)


def shell_env(**extra: str) -> dict[str, str]:
    env = clean_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        HF_HUB_OFFLINE="1", NO_MKDOCS_2_WARNING="1", **extra
    )  # nothing a documented command runs here may download
    return env


def run_bash(block: Block, cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    shown = done.stdout + done.stderr
    assert done.returncode == 0, f"{block.where} exited {done.returncode}:\n{block.code}\n{shown[-4000:]}"
    return done.stdout


def test_every_block_is_run_or_says_why_not() -> None:
    problems = []
    for block in BLOCKS:
        if block.marker is None:
            problems.append(f"{block.where}: no <!-- run: ... -->, <!-- run-by: ... --> or <!-- not-run: ... -->")
        elif block.marker == "not-run" and not block.value:
            problems.append(f"{block.where}: not-run without a reason")
        elif block.marker == "run" and block.language not in RUN_CONTEXTS.get(block.value, set()):
            problems.append(f"{block.where}: run: {block.value!r} cannot run a {block.language or 'plain'} block")
        elif block.marker == "run-by":
            match = re.match(r"(tests/[\w/]+\.py)::(\w+)", block.value)
            test_file = REPO / match.group(1) if match else None
            if not test_file or not test_file.is_file():
                problems.append(f"{block.where}: run-by names no test file: {block.value!r}")
            elif f"def {match.group(2)}(" not in test_file.read_text():
                problems.append(f"{block.where}: {match.group(1)} has no test {match.group(2)}")
            elif block.page not in test_file.read_text():
                problems.append(f"{block.where}: {match.group(1)} never reads {block.page}")
    assert not problems, "\n".join(problems)
    assert sum(block.marker in ("run", "run-by") for block in BLOCKS) >= 10  # the parser found the marked blocks


def test_the_readme_stays_a_quick_start() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "python -m pytest" in readme and readme.count("python -m pytest") == 1  # the test command, once
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert not re.search(r"\bissue \d+|load average", readme)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker == "run" and b.value == "repo"], ids=Block.where.fget)
def test_repo_blocks_run_as_written(block: Block) -> None:
    run_bash(block, REPO, shell_env(), timeout=120)


@pytest.mark.parametrize("page", sorted({b.page for b in BLOCKS if b.marker == "run" and b.value == "scratch"}))
def test_scratch_blocks_run_as_written(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_models: str
) -> None:
    """A page's scratch blocks in order, in one folder: python in this process, bash with `bash -euo pipefail`."""
    monkeypatch.chdir(tmp_path)
    cache = example_cache(tmp_path, tiny_models)
    env = shell_env(KANDINSKY_RENDER_CACHE=cache)
    printed = []
    for block in [b for b in page_blocks(page) if b.marker == "run" and b.value == "scratch"]:
        if block.language == "python":
            exec(compile(block.code, block.where, "exec"), {"__name__": "__doc_block__"})
        else:
            printed.append(run_bash(block, tmp_path, env))
    if page == "README.md":  # the own-prompts recipe: 3 rows, 4 images, a webdataset output, status on it
        import pandas as pd

        manifest = pd.read_parquet(tmp_path / "my-manifest" / "day-1.parquet")
        assert str(manifest["seed"].dtype) == "Int64" and manifest["seed"].isna().sum() == 1
        assert (tmp_path / "my-renders" / "_SUCCESS").is_file() and list(
            (tmp_path / "my-renders" / "data").glob("*.tar")
        )
        assert "images: 4 (ok 4, error 0)" in printed[-1]
        # "Add rows as new files in the folder and run the same command again": only the new row renders.
        pd.DataFrame({"id": ["owl"], "prompt": ["an owl"], "height": [64], "width": [64]}).to_parquet(
            tmp_path / "my-manifest" / "day-2.parquet"
        )
        # The block's render command again, in this process with the local runner (what renders is the job's call).
        block = next(b for b in page_blocks(page) if b.marker == "run" and b.language == "bash")
        command = next(
            c for c in block.code.replace("\\\n", " ").splitlines() if c.startswith("kandinsky-render render")
        )
        monkeypatch.setenv("KANDINSKY_RENDER_CACHE", cache)
        again = in_process(capsys, *shlex.split(command)[1:], "--runner", "local")
        assert again.code == 0 and "rendered 1 image(s)" in again.out, again.out + again.err[-2000:]
        assert "images: 5 (ok 5, error 0)" in in_process(capsys, "status", "./my-renders").out


def test_configuration_reference_equals_a_fresh_generation() -> None:
    from jobs.options.flags import OPTIONS
    from jobs.options.reference import PAGE, generate

    assert PAGE.read_text() == generate(), "docs/configuration.md is stale: run python -m jobs.options.reference"
    for option in OPTIONS:
        assert f"`{option.flag}`" in PAGE.read_text(), option.flag


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def pages(nav: list) -> set[str]:
        found = set()
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            found |= pages(value) if isinstance(value, list) else {value}
        return found

    assert pages(config["nav"]) == {path.name for path in (REPO / "docs").glob("*.md")}  # every page in the nav
    done = subprocess.run(
        [f"{BIN}/mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    performance = (tmp_path / "site" / "performance" / "index.html").read_text()
    assert "Float16 drift" in performance  # BENCHMARKS.md included


def ports_of(command: str) -> dict[str, int]:
    return {flag: int(port) for flag, port in re.findall(r"(--[a-z-]*port)\s+(\d+)", command)}


def port_in_use(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return True
    return False


@pytest.mark.cluster
@pytest.mark.slow
def test_the_documented_ray_cluster_commands_run_as_written(tmp_path: Path, tiny_models: str) -> None:
    """docs/deploy.md's script: a head of its own (`ray start --block` in the background), `ray job submit` of the
    example (watched: progress, summary, gallery path; the gallery opens), the head stopped by SIGTERM to its pid.
    Only the output and log paths move into tmp_path."""
    (block,) = [b for b in page_blocks("docs/deploy.md") if "ray start --head" in b.code]
    ports = ports_of(block.code)
    assert {"--port", "--dashboard-port", "--ray-client-server-port"} <= set(ports)
    inside = {flag: port for flag, port in ports.items() if 10002 <= port <= 19999}
    assert not inside, f"ports inside Ray's worker port range 10002-19999: {inside}"
    busy = {flag: port for flag, port in ports.items() if port_in_use(port)}
    if busy:
        pytest.fail(f"the documented head needs these ports, in use on this machine now: {busy}; free them and rerun")
    output = tmp_path / "kandinsky-example"
    code = block.code.replace("/tmp/kandinsky-example", str(output))
    code = code.replace("/tmp/ray-kandinsky-head.log", str(tmp_path / "head.log"))
    env = shell_env(KANDINSKY_RENDER_CACHE=example_cache(tmp_path, tiny_models), RAY_USAGE_STATS_ENABLED="0")
    script = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the head and what it started, nothing else
    )
    try:
        shown, _ = script.communicate(timeout=540)
    finally:
        if script.poll() is None:
            script.send_signal(signal.SIGTERM)  # its EXIT trap stops the head
            script.wait(timeout=60)
        deadline = time.monotonic() + 60  # the head stops its own processes on SIGTERM: wait for them
        while time.monotonic() < deadline:
            try:
                os.killpg(script.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
        else:
            os.killpg(script.pid, signal.SIGKILL)  # only the group this test started
        shutil.rmtree("/tmp/ray-kandinsky", ignore_errors=True)
    head_log = (tmp_path / "head.log").read_text() if (tmp_path / "head.log").exists() else ""
    assert script.returncode == 0, f"{block.where} exited {script.returncode}:\n{shown[-4000:]}\n{head_log[-2000:]}"
    assert "succeeded" in shown and (output / "_SUCCESS").is_file()
    check_example_render(output, shown, tmp_path, cluster_gpus=2.0)  # and the gallery opens


def test_ci_installs_and_tests_as_the_readme_says() -> None:
    """`.ci/run` (what CI runs on a clean clone) runs README's test command and installs with README's lines."""
    install, suite = blocks_in("README.md", "The two commands", "bash")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert suite.strip().removeprefix(". .venv/bin/activate && ") in ci
    steps = [step.strip() for step in install.split("&&")]
    for step in steps[1:-1]:  # the venv, torch and the project (its activation and render aside)
        if step.startswith("pip install"):
            assert step in ci, step
