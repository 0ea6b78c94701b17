"""``--config job.yaml`` holds any flag, flags override it, and ``--help`` documents every option's default."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import yaml

from jobs.options.config_file import flag_defaults, parse_args
from jobs.options.flags import OPTIONS, build_parser, option_at, option_table
from jobs.options.job_config import config_from_args, instantiate, values_of
from schemas.config import JobConfig
from schemas.resources import StageResources
from tests.helpers.cli import clean_env, command
from tests.helpers.docs import doc_pages, page_blocks
from tests.helpers.places import REPO
from tests.helpers.rows import write_manifest


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
    assert config.decoder.num_actors == "3" and config.prior.num_gpus == 0.5 and config.decoder.num_gpus == 1.0
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


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--num-prior-actors", "0"], "--num-prior-actors"), (["--batch-size", "0"], "--batch-size"),
     (["--depth-cpus", "-1"], "--depth-cpus"), (["--lease-ttl", "0"], "--lease-ttl")],
)  # fmt: skip
def test_out_of_range_values_name_their_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ValueError, match=f"^{flag}: "):
        parse(["--manifest", "m", "--output", "o", *argv])


def test_without_a_file_flags_and_defaults_are_unchanged() -> None:
    config = parse(["--manifest", "m.parquet", "--output", "out"])
    assert config.batch_size is None and config.decoder.num_actors is None and config.storage_options == {}
    assert config.stage_placement == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"num-decoder-actor": 3}, "unknown option 'num-decoder-actor'; did you mean 'num-decoder-actors'?"),
        ({"no-such-thing": 3}, "unknown option 'no-such-thing'; kandinsky-render render --help lists every option"),
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
        flag_defaults(yaml.safe_load(Path(path).read_text()), source=path)
    assert message in str(error.value)


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_args(build_parser(), ["--config", str(tmp_path / "list.yaml")])
    with pytest.raises(ValueError, match="no such file"):
        parse_args(build_parser(), ["--config", str(tmp_path / "missing.yaml")])


def help_entries(help_text: str) -> dict[str, str]:
    """Flag -> its --help entry (invocation and help text, whitespace collapsed)."""
    entries: dict[str, str] = {}
    flag = None
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):  # an entry starts two spaces in; its continuation lines further in
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line.startswith("   ") and flag:
            entries[flag] += line
        else:
            flag = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_help_documents_every_option_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option, so each default sits next to its flag
    text = build_parser().format_help()
    usage = text.split("options:", 1)[0]
    negations = {f"--no-{option.key}" for option in OPTIONS if option.negatable}
    # The parser has exactly the table's flags (and --version, which sets nothing): no option is declared elsewhere.
    assert set(re.findall(r"--[a-z0-9-]+", usage)) == {option.flag for option in OPTIONS} | negations | {"--version"}
    entries = help_entries(text)
    for option in OPTIONS:
        entry = entries[option.flag]
        assert option.help and len(entry) > len(option.flag) + 2, f"{option.flag} has no help"
        if option.default not in (None, False, ()):
            assert option.default_text is not None, f"{option.flag}: default {option.default!r} not documented"
        if option.default_text is not None:
            assert entry.endswith(f"(default: {option.default_text})"), f"{option.flag}: {entry}"


def test_flag_defaults_are_the_dataclass_defaults() -> None:
    """No flag or file key carries a default of its own: unset options give JobConfig's defaults."""
    assert parse(["--manifest", "m", "--output", "o"]) == JobConfig(manifest="m", output="o", given=())


def test_a_file_of_every_default_changes_nothing(tmp_path: Path) -> None:
    """Each option's shown default, read back from a config file, is its default (every kind of value)."""
    content = {option.key: option.default for option in OPTIONS if option.in_file and option.default is not None}
    content = {key: list(value) if isinstance(value, tuple) else value for key, value in content.items()}
    config_file = write_yaml(tmp_path / "job.yaml", {**content, "manifest": "m", "output": "o"})
    parsed = parse(["--config", config_file])
    assert replace(parsed, given=None) == JobConfig(manifest="m", output="o")
    assert {"seed", "dtype", "defaults.width"} <= set(parsed.given)  # a file's values pin an output as flags do


@dataclass(frozen=True, kw_only=True)
class FutureConfig:
    """Fields another engineer may add: a stage with its own resources, a plain option, a default-on switch."""

    score: StageResources = field(default_factory=lambda: StageResources(num_actors=2))
    shard_rows: int = field(default=100_000, metadata={"help": "rows per shard", "group": "execution"})
    save_embeddings: bool = field(default=True, metadata={"help": "write the image embeddings"})


def test_new_fields_get_flags_file_keys_and_help_from_their_metadata(tmp_path: Path) -> None:
    options = option_table(FutureConfig)
    assert [option.flag for option in options] == [
        "--num-score-actors",
        "--score-gpus",
        "--score-cpus",
        "--shard-rows",
        "--save-embeddings",
    ]
    assert option_at(FutureConfig, "score", "num_actors", options=options).default == "2"  # normalized: N or MIN:MAX
    parser = build_parser(options=options)
    assert "CPUs per score actor (on CPU also its torch threads) (default: chosen for the machine" in " ".join(
        parser.format_help().split()
    )
    args = parser.parse_args(["--score-gpus", "0.5", "--no-save-embeddings"])
    assert instantiate(FutureConfig, values_of(FutureConfig, args, options=options)) == FutureConfig(
        score=StageResources(num_actors=2, num_gpus=0.5), save_embeddings=False
    )
    parser.set_defaults(**flag_defaults({"num_score_actors": 3, "shard-rows": "10"}, source="f.yaml", options=options))
    args = parser.parse_args([])
    assert values_of(FutureConfig, args, options=options) == {
        "score": {"num_actors": "3", "num_gpus": None, "num_cpus": None},
        "shard_rows": 10,
        "save_embeddings": True,
    }


def test_fields_without_option_metadata_are_refused() -> None:
    @dataclass(frozen=True, kw_only=True)
    class NoHelp:
        output_format: str = "png"

    @dataclass(frozen=True, kw_only=True)
    class Typo:
        output_format: str = field(default="png", metadata={"help": "image format", "choice": ("png",)})

    with pytest.raises(TypeError, match="NoHelp.output_format: give the field metadata 'help'"):
        option_table(NoHelp)
    with pytest.raises(TypeError, match=r"Typo.output_format: unknown option metadata \['choice'\]"):
        option_table(Typo)


def documented_defaults() -> list[tuple[str, str]]:
    """(flag, default as written) for every row of the docs' tables that give a render option's default
    (docs/configuration.md is generated from the options, so it is left out).

    Tables with a ``flag`` and a ``default`` column, and the manifest column table, whose defaults are
    those of the flag of the same name (``--height`` for ``height``; only `RenderDefaults` fields).
    """
    rows: list[tuple[str, str]] = []
    table: list[list[str]] = []
    column_defaults = {option.dest: option.flag for option in OPTIONS if option.path[:1] == ("defaults",)}
    pages = [page for page in doc_pages() if page.name != "configuration.md"]
    for line in [line for page in pages for line in [*page.read_text().splitlines(), ""]]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if table and "default" in table[0]:
            header, default = table[0], table[0].index("default")
            for cells in table[2:]:
                value = cells[default].strip("`")
                if "flag" in header:
                    rows.append((re.search(r"`(--[a-z0-9-]+)`", cells[header.index("flag")]).group(1), value))
                elif "column" in header:
                    names = re.findall(r"`([a-z_]+)`", cells[header.index("column")])
                    rows += [(column_defaults[name], value) for name in names if name in column_defaults]
        table = []
    return rows


def test_documented_default_tables_match_the_options() -> None:
    by_flag = {option.flag: option for option in OPTIONS}
    rows = documented_defaults()
    assert {"--max-side", "--allowed-protocols", "--height", "--prior-strength"} <= {flag for flag, _ in rows}
    for flag, written in rows:
        option = by_flag[flag]
        assert option.parse(written) == option.default, f"the docs say {flag} defaults to {written!r}"


def test_cli_config_file_with_dry_run(tmp_path: Path, tiny_models: str) -> None:
    """A user's view: `render --config job.yaml --dry-run`, then the same with a flag on top."""
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "p", "height": 64} for i in range(5)])
    # The models a run needs must be there for a dry run too (it checks them, tests/test_model_sources.py).
    values = {"manifest": manifest, "output": str(tmp_path / "out"), "batch-size": 2, "models": tiny_models}
    config_file = write_yaml(tmp_path / "job.yaml", values)
    env = clean_env()
    run = [*command(module="jobs.render"), "--config", config_file, "--dry-run"]
    first = subprocess.run(run, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    # on CPU a prior call serves two decoder batches: 5 rows -> decoder batches 2+2+1, prior calls 4+1
    assert "model calls per stage (decoder batch size 2, prior batch size 4): prior 2, decoder 3" in first.stdout
    second = subprocess.run([*run, "--batch-size", "5"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert "model calls per stage (decoder batch size 5, prior batch size 10): prior 1, decoder 1" in second.stdout

    bad = write_yaml(tmp_path / "bad.yaml", {"batch-sise": 2})
    refused = subprocess.run(
        [*command(module="jobs.render"), "--config", bad], cwd=REPO, capture_output=True, text=True, env=env
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


def test_docs_config_file_example_is_valid() -> None:
    (text,) = [block.code for block in page_blocks("docs/config-file.md") if block.language == "yaml"]
    example = yaml.safe_load(text)
    defaults = flag_defaults(example, source="docs/config-file.md")
    assert defaults["storage_option"] == ["use_ssl=true"] and defaults["allowed_protocols"] == ("file", "s3")


def test_config_file_errors_never_show_a_credential(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A YAML syntax error (PyYAML quotes the offending line) and a bad value next to a secret: exit 2, the place
    of the error named, no credential printed."""
    import signal

    from jobs.render import main

    secret, sas = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "sv=2022-11-02&sig=AbCdEf0123456789%3D"
    broken = tmp_path / "broken.yaml"
    broken.write_text(f'manifest: s3://b/m/\nstorage-option: {{secret: "{secret}", sas_token: "{sas}"\noutput: o\n')
    typo = write_yaml(tmp_path / "typo.yaml", {"storage-option": {"secret": secret}, "num-decoder-actors": secret})
    handler = signal.getsignal(signal.SIGTERM)
    for path, where in ((str(broken), "not valid YAML at line "), (typo, "num-decoder-actors: expected N or MIN:MAX")):
        assert main(["--config", path]) == 2
        err = capsys.readouterr().err
        assert where in err, err
        assert secret[:12] not in err and sas[:12] not in err, err  # PyYAML shows a line's first 75 characters
    assert signal.getsignal(signal.SIGTERM) is handler  # the entry point put its own back
