"""What planning needs to know about the checkpoints, read from their configs without loading any weights."""

from __future__ import annotations

import functools
import json
import posixpath
from collections.abc import Iterator, Mapping
from typing import Any

from schemas.config import JobConfig
from schemas.loggers import logger_for
from schemas.models import is_hub_id, movq_scale
from schemas.modes import MODES

logger = logger_for(__name__)

# The MoVQ of every public Kandinsky 2.2 decoder checkpoint downsamples by 8.
PUBLIC_MOVQ_SCALE = 8
_MOVQ_CONFIG = "movq/config.json"


@functools.lru_cache(maxsize=32)
def _read_config(path: str, name: str, options_json: str) -> dict[str, Any]:
    """The JSON file ``name`` of the checkpoint at ``path`` (a folder, fsspec URI or hub id)."""
    if is_hub_id(path):
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(path, name), encoding="utf-8") as handle:
            return json.load(handle)
    from actors.retry import retry
    from actors.storage import open_fs

    uri = posixpath.join(path.rstrip("/"), name)
    fs, local = open_fs(uri, json.loads(options_json))
    return json.loads(retry(lambda: fs.cat_file(local), what=f"read {uri}"))


# The public prior's image embeddings have 1280 values (CLIP ViT-bigG/14).
PUBLIC_EMBEDDING_DIM = 1280
_PRIOR_CONFIG = "prior/config.json"


def embedding_dim(path: str, *, storage_options: dict[str, Any] | None = None) -> int:
    """Values in one image embedding of the prior checkpoint at ``path`` (its prior transformer's ``embedding_dim``).

    When the config cannot be read, the public checkpoint's 1280 is assumed with a warning (a wrong
    guess only refuses rows; the prior actor checks the real size when it loads).
    """
    try:
        options = json.dumps(storage_options or {}, sort_keys=True, default=str)
        return int(_read_config(path, _PRIOR_CONFIG, options)["embedding_dim"])
    except Exception as exc:  # noqa: BLE001 - any failure to read means: fall back and say so
        logger.warning("could not read %s of %s (%s); assuming %d", _PRIOR_CONFIG, path, exc, PUBLIC_EMBEDDING_DIM)
        return PUBLIC_EMBEDDING_DIM


def checkpoint_movq_scale(path: str, *, storage_options: dict[str, Any] | None = None) -> int:
    """The spatial downsampling factor of the MoVQ of the decoder checkpoint at ``path`` (a folder or hub id).

    Read from ``movq/config.json`` (``2 ** (len(block_out_channels) - 1)``, as the pipelines compute
    it). When the config cannot be read (e.g. no hub access), the public checkpoints' 8 is assumed
    with a warning; the decoder actors check the real value when they load and refuse to start if
    it differs, so a wrong guess cannot produce wrong images.
    """
    try:
        config = _read_config(path, _MOVQ_CONFIG, json.dumps(storage_options or {}, sort_keys=True, default=str))
        return movq_scale(config["block_out_channels"])
    except Exception as exc:  # noqa: BLE001 - any failure to read means: fall back and say so
        logger.warning(
            "could not read %s of %s (%s: %s); assuming MoVQ scale %d for size checks",
            _MOVQ_CONFIG,
            path,
            type(exc).__name__,
            exc,
            PUBLIC_MOVQ_SCALE,
        )
        return PUBLIC_MOVQ_SCALE


class CheckpointScales(Mapping[str, int]):
    """Decoder checkpoint name -> MoVQ scale of ``config``'s checkpoints, each read the first time it is asked for.

    So a plan reads only the configs of the checkpoints its rows use.
    """

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self._names = sorted({mode.checkpoint for mode in MODES.values()})
        self._scales: dict[str, int] = {}

    def exclude(self, names: set[str]) -> None:
        """Leave out checkpoints that cannot be loaded: no row uses them, so sizes are not checked for them."""
        self._names = [name for name in self._names if name not in names]

    def __getitem__(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._scales:
            path = self.config.models.for_checkpoint(name)
            self._scales[name] = checkpoint_movq_scale(path, storage_options=self.config.storage_options)
        return self._scales[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def read(self) -> dict[str, int]:
        """The scales read so far (what the plan checked sizes with)."""
        return dict(self._scales)

    @functools.cached_property
    def _embedding_dim(self) -> int:
        return embedding_dim(self.config.models.prior, storage_options=self.config.storage_options)

    def embedding_dim(self) -> int:
        """The prior checkpoint's embedding size (read once, the first time a row gives embeddings)."""
        return self._embedding_dim
