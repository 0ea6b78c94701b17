"""Connecting the driver to Ray: join the cluster the user named, or start a private local Ray."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def connect_ray(address: str | None) -> bool:
    """Connect to Ray unless already connected; returns True when this call started Ray.

    ``address`` (or RAY_ADDRESS) joins a running cluster; otherwise a local Ray starts.
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    return True
