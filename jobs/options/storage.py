"""fsspec storage options from the environment, a config file and flags; secrets kept out of logs and errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.text import first_line

ENV_VAR = "KANDINSKY_RENDER_STORAGE_OPTIONS"
# Option names whose values are credentials (s3fs: key, secret, token; gcsfs: token; adlfs:
# account_key, sas_token, client_secret...). Values under them are never printed.
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session", "signature", "sas")
_NOT_SECRET = frozenset({"endpoint_url", "region_name", "profile", "anon", "use_ssl", "requester_pays"})
_S3 = frozenset({"s3", "s3a"})
_GCS = frozenset({"gs", "gcs"})
_LOCAL = frozenset({"", "file", "local"})


def parse_pairs(pairs: Iterable[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` (``--storage-option``) -> options; VALUE is parsed as JSON when it can be.

    Raises ValueError without echoing the argument, which may hold a credential.
    """
    options: dict[str, Any] = {}
    for number, pair in enumerate(pairs, start=1):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option #{number} is not KEY=VALUE (its value is not shown: it may be secret)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def options_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Options from ``$KANDINSKY_RENDER_STORAGE_OPTIONS`` (a JSON object); {} when unset."""
    text = environ.get(ENV_VAR, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"${ENV_VAR} is not valid JSON (error at character {exc.pos})") from None
    if not isinstance(options, dict):
        raise ValueError(f"${ENV_VAR} must be a JSON object, got a {type(options).__name__}")
    return options


def protocol_of(uri: str) -> str:
    """The fsspec protocol of ``uri`` (``""`` for a plain local path)."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


def convenience_options(
    *,
    uris: Iterable[str],
    endpoint_url: str | None = None,
    region: str | None = None,
    anon: bool = False,
    profile: str | None = None,
) -> dict[str, Any]:
    """Options of the ``--storage-*`` conveniences, spelled for the object store that ``uris`` use.

    s3:// (s3fs): ``client_kwargs.endpoint_url``, ``client_kwargs.region_name``, ``anon``,
    ``profile``. gs:// (gcsfs): ``endpoint_url``, ``token="anon"``. Raises ValueError when a
    convenience does not apply to the store (or the URIs name two different stores).
    """
    wanted = {
        name: value
        for name, value in (("endpoint_url", endpoint_url), ("region", region), ("anon", anon), ("profile", profile))
        if value
    }
    if not wanted:
        return {}
    remote = sorted({protocol_of(uri) for uri in uris} - _LOCAL)
    flags = ", ".join(f"--storage-{name.replace('_', '-')}" for name in wanted)
    if len(remote) != 1:
        where = "no object store URI" if not remote else f"several stores ({', '.join(remote)})"
        raise ValueError(f"{flags}: the manifest, output and models name {where}; use --storage-option instead")
    protocol = remote[0]
    if protocol in _S3:
        client_kwargs = {}
        if endpoint_url:
            client_kwargs["endpoint_url"] = endpoint_url
        if region:
            client_kwargs["region_name"] = region
        options: dict[str, Any] = {"client_kwargs": client_kwargs} if client_kwargs else {}
        if anon:
            options["anon"] = True
        if profile:
            options["profile"] = profile
        return options
    if protocol in _GCS:
        if region or profile:
            raise ValueError("--storage-region and --storage-profile apply to s3:// only (gcsfs has no such option)")
        options = {"endpoint_url": endpoint_url} if endpoint_url else {}
        if anon:
            options["token"] = "anon"
        return options
    raise ValueError(f"{flags} apply to s3:// and gs://; for {protocol}:// use --storage-option")


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; nested mappings (e.g. ``client_kwargs``) merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = dict(value) if isinstance(value, Mapping) else value
    return merged


def resolve(
    *,
    environ: Mapping[str, str],
    pairs: Iterable[str] = (),
    uris: Iterable[str] = (),
    endpoint_url: str | None = None,
    region: str | None = None,
    anon: bool = False,
    profile: str | None = None,
) -> dict[str, Any]:
    """The job's storage options: ``$KANDINSKY_RENDER_STORAGE_OPTIONS``, then the ``--storage-*``
    conveniences, then ``--storage-option`` pairs (each later source wins, key by key)."""
    conveniences = convenience_options(uris=uris, endpoint_url=endpoint_url, region=region, anon=anon, profile=profile)
    return merge(options_from_env(environ), conveniences, parse_pairs(pairs))


def check_options(uris: Iterable[str], options: Mapping[str, Any]) -> None:
    """Open the filesystem of each URI with ``options`` (for s3:// also its client: s3fs makes no request for
    that), so that options the store's library refuses stop the job before any work, as bad input.

    Raises ValueError naming the URI, the option names and the library's complaint (never a value).
    """
    from actors.storage import open_fs

    for uri in dict.fromkeys(uris):
        try:
            fs, _ = open_fs(uri, dict(options))
            if protocol_of(uri) in _S3:
                fs.connect()
        except Exception as exc:  # noqa: BLE001 - no request was made: whatever failed is the configuration
            names = ", ".join(sorted(options)) or "none"
            raise ValueError(
                f"cannot open {uri} with the storage options given (names: {names}; values are not shown): "
                f"{type(exc).__name__}: {first_line(exc)}. See --storage-option and ${ENV_VAR}"
            ) from None


def secret_values(options: Mapping[str, Any]) -> list[str]:
    """String values stored under credential-like names, at any depth (longest first)."""
    found: set[str] = set()

    def walk(value: Any, name: str) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, str(key).lower())
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, name)
        elif isinstance(value, str) and len(value) >= 4 and name not in _NOT_SECRET:
            if any(word in name for word in _SECRET_WORDS):
                found.add(value)

    walk(options, "")
    return sorted(found, key=len, reverse=True)


def secret_env_values(environ: Mapping[str, str]) -> list[str]:
    """Values of credential-like environment variables (AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN, ...)."""
    words = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
    return [value for name, value in environ.items() if len(value) >= 8 and any(w in name.upper() for w in words)]


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``<redacted>``."""
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


class RedactingFilter(logging.Filter):
    """Logging filter that removes secret values from messages and tracebacks before any handler sees them."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


def install_redaction(secrets: Iterable[str]) -> RedactingFilter:
    """Attach a `RedactingFilter` for ``secrets`` to every handler of the root logger."""
    redactor = RedactingFilter(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
    return redactor
