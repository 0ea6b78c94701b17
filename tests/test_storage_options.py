"""Storage options from the environment, conveniences and pairs; credentials never printed."""

from __future__ import annotations

import json
import logging

import pytest

from jobs.options import storage as so
from schemas.config import JobConfig


def test_sources_merge_in_order_key_by_key() -> None:
    environ = {so.ENV_VAR: json.dumps({"key": "env-key", "secret": "env-secret", "client_kwargs": {"verify": False}})}
    options = so.resolve(
        environ=environ,
        pairs=["secret=flag-secret", 'config_kwargs={"retries": {"max_attempts": 9}}'],
        uris=["s3://bucket/manifests/", "/local/out"],
        endpoint_url="http://127.0.0.1:9000",
        region="eu-west-1",
    )
    assert options == {
        "key": "env-key",
        "secret": "flag-secret",
        "client_kwargs": {"verify": False, "endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 9}},
    }


def test_conveniences_are_spelled_for_each_store() -> None:
    assert so.convenience_options(uris=["s3://b/x"], anon=True, profile="prod") == {"anon": True, "profile": "prod"}
    assert so.convenience_options(uris=["gs://b/x"], endpoint_url="http://127.0.0.1:4443", anon=True) == {
        "endpoint_url": "http://127.0.0.1:4443",
        "token": "anon",
    }
    assert so.convenience_options(uris=["/a", "file:///b"]) == {}


@pytest.mark.parametrize(
    ("uris", "kwargs", "message"),
    [
        (["gs://b/x"], {"region": "eu"}, "s3:// only"),
        (["s3://b/x", "gs://c/y"], {"anon": True}, "several stores"),
        (
            ["/local/m", "/local/o", "kandinsky-community/kandinsky-2-2-prior"],
            {"endpoint_url": "http://x"},
            "no object",
        ),
        (["az://c/x"], {"anon": True}, "use --storage-option"),
    ],
)
def test_conveniences_refuse_what_does_not_apply(uris: list[str], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        so.convenience_options(uris=uris, **kwargs)


def test_conveniences_apply_to_models_on_an_object_store() -> None:
    from jobs.options.config_file import parse_args
    from jobs.options.flags import build_parser
    from jobs.options.job_config import config_from_args

    argv = ["--manifest", "/local/m", "--output", "/local/o", "--models", "s3://weights/k22"]
    args = parse_args(build_parser(), [*argv, "--storage-endpoint-url", "http://127.0.0.1:9"])
    config = config_from_args(args, environ={})
    assert config.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}


def test_bad_inputs_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValueError) as error:
        so.parse_pairs(["s3cr3t-value-without-equals"])
    assert "s3cr3t" not in str(error.value) and "#1" in str(error.value)
    with pytest.raises(ValueError) as error:
        so.options_from_env({so.ENV_VAR: '{"secret": "s3cr3t-value"'})
    assert "s3cr3t" not in str(error.value) and so.ENV_VAR in str(error.value)
    with pytest.raises(ValueError, match="JSON object"):
        so.options_from_env({so.ENV_VAR: '["a"]'})


def test_secrets_are_found_at_any_depth_and_redacted() -> None:
    options = {
        "key": "AKIAEXAMPLEKEY",
        "secret": "wJalrEXAMPLESECRET",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": "SESSIONTOKEN123"},
        "profile": "prod",
        "anon": False,
    }
    secrets = so.secret_values(options)
    assert set(secrets) == {"AKIAEXAMPLEKEY", "wJalrEXAMPLESECRET", "SESSIONTOKEN123"}
    text = "failed with key=AKIAEXAMPLEKEY secret wJalrEXAMPLESECRET at http://127.0.0.1:9000"
    assert so.redact(text, secrets) == "failed with key=<redacted> secret <redacted> at http://127.0.0.1:9000"
    environ = {"AWS_SECRET_ACCESS_KEY": "wJalrEXAMPLESECRET", "HOME": "/root", "RAY_AUTH_TOKEN": "abcdefgh12345"}
    assert set(so.secret_env_values(environ)) == {"wJalrEXAMPLESECRET", "abcdefgh12345"}


def test_log_records_are_redacted_messages_args_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    redactor = so.RedactingFilter(["wJalrEXAMPLESECRET"])
    log = logging.getLogger("test.redaction")
    caplog.handler.addFilter(redactor)
    try:
        with caplog.at_level(logging.INFO, logger="test.redaction"):
            log.info("opening with %s", "wJalrEXAMPLESECRET")
            try:
                raise RuntimeError("denied for wJalrEXAMPLESECRET")
            except RuntimeError:
                log.exception("upload failed")
    finally:
        caplog.handler.removeFilter(redactor)
    assert "wJalrEXAMPLESECRET" not in caplog.text
    assert "opening with <redacted>" in caplog.text and "denied for <redacted>" in caplog.text


def test_job_config_records_option_names_never_values() -> None:
    config = JobConfig(manifest="s3://b/m", output="s3://b/o", storage_options={"secret": "wJalrEXAMPLESECRET"})
    assert "wJalrEXAMPLESECRET" not in json.dumps(config.to_dict())
    assert config.to_dict()["storage_options"] == {"secret": "<redacted>"}
