"""``--config job.yaml`` holds any flag, flags override it, and ``--help`` documents every option's default."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.options.config_file import flag_defaults, parse_args
from jobs.render import build_parser, config_from_args
from tests.conftest import REPO, write_manifest


def parse(argv: list[str], environ: dict[str, str] | None = None):
    return config_from_args(parse_args(build_parser(), argv), environ=environ or {})


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_every_kind_of_flag_from_a_file_and_flags_win(tmp_path: Path) -> None:
    config_file = write_yaml(
        tmp_path / "job.yaml",
        {
            "manifest": "s3://bucket/manifests/",
            "output": "s3://bucket/out",
            "models": "/models",
            "num-decoder-actors": 3,  # dashes
            "prior_gpus": 0.5,  # underscores
            "decoder-gpus": "1",  # a string where a number is expected, as YAML users write it
            "dtype": "float16",
            "batch-size": 8,
            "retry-errors": True,
            "height": 768,
            "max-side": 1024,
            "storage-region": "eu-west-1",
            "storage_options": {"key": "AKIAFILE", "client_kwargs": {"verify": False}},
            "decoder-node-label": ["kandinsky-render/stage=decoder"],
            "prior-accelerator-type": "L4",
        },
    )
    config = parse(["--config", config_file, "--batch-size", "2", "--storage-option", "key=AKIAFLAG"])
    assert (config.manifest, config.output, config.models.prior) == (
        "s3://bucket/manifests/",
        "s3://bucket/out",
        "/models/prior",
    )
    assert config.decoder.num_actors == 3 and config.prior.num_gpus == 0.5 and config.decoder.num_gpus == 1.0
    assert config.dtype == "float16" and config.retry_errors is True
    assert config.defaults.height == 768 and config.limits.max_side == 1024
    assert config.batch_size == 2  # the flag overrides the file
    assert config.storage_options == {
        "key": "AKIAFLAG",  # flag pair after file pairs: it wins key by key
        "client_kwargs": {"verify": False, "region_name": "eu-west-1"},
    }
    assert config.stage_placement == {
        "prior": {"accelerator_type": "L4", "label_selector": {}},
        "decoder": {"accelerator_type": None, "label_selector": {"kandinsky-render/stage": "decoder"}},
    }


def test_without_a_file_flags_and_defaults_are_unchanged() -> None:
    config = parse(["--manifest", "m.parquet", "--output", "out"])
    assert config.batch_size == 4 and config.decoder.num_actors is None and config.storage_options == {}
    assert config.stage_placement == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"num-decoder-actor": 3}, "unknown option 'num-decoder-actor'"),
        ({"batch-size": "many"}, "batch-size: expected an integer"),
        ({"batch-size": 2.5}, "batch-size: expected an integer"),
        ({"retry-errors": "yes"}, "retry-errors: expected true or false"),
        ({"dtype": "float8"}, "dtype: 'float8' is not one of"),
        ({"manifest": ["a", "b"]}, "manifest: expected a single value"),
    ],
)
def test_bad_config_values_name_the_file_and_key(tmp_path: Path, content: dict, message: str) -> None:
    path = write_yaml(tmp_path / "bad.yaml", content)
    with pytest.raises(ValueError, match="bad.yaml") as error:
        flag_defaults(build_parser(), yaml.safe_load(Path(path).read_text()), source=path)
    assert message in str(error.value)


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_args(build_parser(), ["--config", str(tmp_path / "list.yaml")])
    with pytest.raises(ValueError, match="no such file"):
        parse_args(build_parser(), ["--config", str(tmp_path / "missing.yaml")])


def test_help_documents_every_option_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option, so each default sits next to its flag
    parser = build_parser()
    text = " ".join(parser.format_help().split("options:", 1)[1].split())  # the option list, not the usage
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        assert flag in text, flag
        assert action.help, f"{flag} has no help"
        if action.default not in (None, False, []):
            segment = text[text.index(flag) :]
            segment = segment[: segment.index(" --", 1) if " --" in segment[1:] else len(segment)]
            assert "(default" in segment, f"{flag}: default {action.default!r} not documented: {segment}"


def test_cli_config_file_with_dry_run(tmp_path: Path) -> None:
    """A user's view: `render --config job.yaml --dry-run`, then the same with a flag on top."""
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "p", "height": 64} for i in range(5)])
    config_file = write_yaml(
        tmp_path / "job.yaml", {"manifest": manifest, "output": str(tmp_path / "out"), "batch-size": 2}
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = [sys.executable, "-m", "jobs.render", "--config", config_file, "--dry-run"]
    first = subprocess.run(run, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "model calls per stage (decoder batch size 2, prior batch size 2): prior 3, decoder 3" in first.stdout
    second = subprocess.run([*run, "--batch-size", "5"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert "model calls per stage (decoder batch size 5, prior batch size 5): prior 1, decoder 1" in second.stdout

    bad = write_yaml(tmp_path / "bad.yaml", {"batch-sise": 2})
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.render", "--config", bad], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert refused.returncode == 2 and "unknown option 'batch-sise'" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_storage_options_mapping_in_file_keeps_json_types(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "job.yaml",
        {"manifest": "s3://b/m/", "output": "s3://b/o", "storage-option": {"use_ssl": False, "default_block_size": 5}},
    )
    config = parse(["--config", path], environ={"KANDINSKY_RENDER_STORAGE_OPTIONS": json.dumps({"anon": True})})
    assert config.storage_options == {"anon": True, "use_ssl": False, "default_block_size": 5}
