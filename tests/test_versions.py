"""Pinned installs: constraints.txt, the tested versions, the patched diffusers methods, the pinned depth model."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from schemas.config import JobConfig
from schemas.models import HUB_MODELS, HUB_REVISIONS, ModelPaths
from schemas.versions import TESTED_VERSIONS, version_mismatches
from tests.helpers.places import REPO
from tests.helpers.rows import write_manifest


def constraints() -> dict[str, str]:
    """constraints.txt as canonical package name -> pinned version."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;+]+)", line)
            assert match, f"constraints.txt: {line!r} is not an exact name==version pin"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_constraints_pin_exact_public_versions_without_the_project() -> None:
    pins = constraints()
    assert "kandinsky-render" not in pins
    assert pins["torch"] == "2.13.0"  # no +cpu: the same line takes the CUDA build
    assert len(pins) > 50  # the whole tested environment, not only the direct dependencies


def test_tested_versions_agree_with_constraints() -> None:
    pins = constraints()
    differ = {
        package: (tested, pins.get(canonicalize_name(package)))
        for package, tested in TESTED_VERSIONS.items()
        if pins.get(canonicalize_name(package)) != tested
    }
    assert not differ, f"package: (schemas/versions.py TESTED_VERSIONS, constraints.txt) differ: {differ}"


def test_pinned_versions_satisfy_the_declared_ranges() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = constraints()
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for text in declared:
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))  # every extra too: cluster/Dockerfile installs gcs
        assert pinned is not None, f"constraints.txt pins no version of {requirement.name}"
        assert requirement.specifier.contains(pinned), f"pyproject.toml {text!r} excludes the tested {pinned}"


def test_install_commands_use_the_constraints() -> None:
    readme = (REPO / "README.md").read_text()
    command = "pip install torch==2.13.0 && pip install -c constraints.txt -e '.[test]' && kandinsky-render render"
    assert command in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0\n" in ci and "pip install -c constraints.txt -e '.[test]'\n" in ci
    assert "constraints.txt" in (REPO / "cluster" / "Dockerfile").read_text()


def test_mismatches_name_each_differing_package() -> None:
    installed: dict[str, str | None] = dict(TESTED_VERSIONS)
    installed["torch"] = "2.13.0+cu128"  # a local label is the same release
    assert version_mismatches(installed) == []
    installed.update(diffusers="0.43.0", pillow=None)
    lines = version_mismatches(installed)
    assert len(lines) == 2
    assert lines[0].startswith("diffusers 0.43.0 is installed") and "diffusers==0.42.1" in lines[0]
    assert lines[1].startswith("pillow is not installed")


def test_actors_log_each_mismatch_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import actors.common
    import schemas.versions

    monkeypatch.setattr(actors.common, "version_mismatches", lambda: ["torch 9.0 is installed but ..."])
    monkeypatch.setattr(schemas.versions, "_reported", set())
    with caplog.at_level(logging.WARNING, logger="kandinsky_render.actors.common"):
        assert actors.common.warn_untested_versions("prior") == ["torch 9.0 is installed but ..."]
        assert actors.common.warn_untested_versions("decoder") == ["torch 9.0 is installed but ..."]
    assert [m for m in caplog.messages if "torch 9.0" in m] == [
        f"prior actor on {actors.common.worker_name()}: torch 9.0 is installed but ..."
    ]


def test_the_driver_and_its_local_stages_warn_once_per_process(
    tmp_path: Path, tiny_models: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`--runner local`: the driver and the model stages share one process, and each mismatch is one line in it
    (before: the driver's line, then the first stage's)."""
    import schemas.versions
    from jobs.job import run_job

    monkeypatch.setitem(TESTED_VERSIONS, "numpy", "0.0.1")
    monkeypatch.setattr(schemas.versions, "_reported", set())
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a fox", "height": 32, "width": 32}])
    config = JobConfig(
        manifest=manifest, output=str(tmp_path / "o"), runner="local", models=ModelPaths.resolve(models_dir=tiny_models)
    )
    with caplog.at_level(logging.WARNING, logger="kandinsky_render"):
        summary = run_job(config)
    assert summary.stats["num_rendered"] == 1
    assert len([m for m in caplog.messages if "tested with numpy==0.0.1" in m]) == 1, caplog.messages


def test_run_job_warns_about_untested_versions_and_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import jobs.job
    import schemas.versions
    from jobs.job import run_job

    monkeypatch.setattr(jobs.job, "version_mismatches", lambda: ["diffusers 0.43.0 is installed but ..."])
    monkeypatch.setattr(schemas.versions, "_reported", set())
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "no-prompt", "prompt": None}])
    config = JobConfig(manifest=manifest, output=str(tmp_path / "o"), runner="local", models=ModelPaths())
    with caplog.at_level(logging.WARNING, logger="kandinsky_render.jobs.job"):
        summary = run_job(config)  # its one row is refused: no model loads
    assert summary.stats["num_refused"] == 1 and summary.stats["num_rendered"] == 0
    assert "untested package version: diffusers 0.43.0 is installed but ..." in caplog.messages
    assert summary.stats["versions"]["mismatches"] == version_mismatches()


# diffusers 0.42.1 methods that actors/accel.py replaces (cache_prior_encodings, PromptEncodings, share_prior_caches)
PATCHED_SIGNATURES = {
    "_encode_prompt": [
        ("self", inspect.Parameter.empty),
        ("prompt", inspect.Parameter.empty),
        ("device", inspect.Parameter.empty),
        ("num_images_per_prompt", inspect.Parameter.empty),
        ("do_classifier_free_guidance", inspect.Parameter.empty),
        ("negative_prompt", None),
    ],
    "get_zero_embed": [("self", inspect.Parameter.empty), ("batch_size", 1), ("device", None)],
}


@pytest.mark.parametrize("pipeline", ["KandinskyV22PriorPipeline", "KandinskyV22PriorEmb2EmbPipeline"])
@pytest.mark.parametrize("method", sorted(PATCHED_SIGNATURES))
def test_patched_diffusers_methods_keep_their_signature(pipeline: str, method: str) -> None:
    import diffusers

    function = getattr(getattr(diffusers, pipeline), method, None)
    assert function is not None, f"diffusers {diffusers.__version__} has no {pipeline}.{method}: update actors/accel.py"
    signature = inspect.signature(function)
    found = [(p.name, p.default) for p in signature.parameters.values()]
    kinds = {p.kind for p in signature.parameters.values()}
    assert found == PATCHED_SIGNATURES[method] and kinds == {inspect.Parameter.POSITIONAL_OR_KEYWORD}, (
        f"diffusers {diffusers.__version__} changed {pipeline}.{method} to {method}{signature}: "
        "actors/accel.py (cache_prior_encodings, PromptEncodings, share_prior_caches) replaces it and must be updated"
    )


def test_default_depth_model_is_transformers_default_at_its_pinned_revision() -> None:
    from transformers.pipelines import SUPPORTED_TASKS

    # diffusers' ControlNet docs call pipeline("depth-estimation"): this is the model and revision it loads.
    assert SUPPORTED_TASKS["depth-estimation"]["default"]["model"] == (HUB_MODELS["depth"], HUB_REVISIONS["depth"])


def test_depth_revision_applies_to_the_default_hub_model_only(tmp_path: Path) -> None:
    assert ModelPaths().depth_hub_revision() == ModelPaths.resolve().depth_hub_revision() == "bc15f29"
    assert ModelPaths.resolve(depth="Intel/dpt-hybrid-midas").depth_hub_revision() is None  # another repository
    assert ModelPaths.resolve(depth="org/depth", depth_revision="abc1234").depth_hub_revision() == "abc1234"
    assert ModelPaths.resolve(models_dir=str(tmp_path)).depth_revision is None
    for folder in (str(tmp_path), "./depth", "s3://bucket/models/depth"):
        assert ModelPaths(depth=folder).depth_hub_revision() is None, folder


def test_depth_stage_gets_the_revision(tmp_path: Path) -> None:
    from jobs.execution.chain import build_chain

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "cn", "prompt": "a robot"}])
    for models, revision in ((ModelPaths(), "bc15f29"), (ModelPaths.resolve(models_dir=str(tmp_path)), None)):
        config = JobConfig(manifest=manifest, output=str(tmp_path / "o"), models=models, layout="one-process")
        stages, _ = build_chain(config, modes=["controlnet"], needs_depth=True, movq_scales={}, output_format="files",
                                run_id="r", cluster_gpus=0)  # fmt: skip
        depth = stages[0]
        assert (depth.name, depth.kwargs["model"], depth.kwargs["revision"]) == ("depth", models.depth, revision)
