"""The project's one logger namespace: every module logs under ``kandinsky_render`` (``kandinsky_render.jobs.job``,
``kandinsky_render.actors.decoder``, ``kandinsky_render.progress``), so one name sets the level or the handler of all
of it (``logger_for("kandinsky_render").setLevel(...)``)."""

from __future__ import annotations

import logging

NAMESPACE = "kandinsky_render"


def logger_for(name: str) -> logging.Logger:
    """The logger of module (or part) ``name`` inside `NAMESPACE`."""
    return logging.getLogger(name if name == NAMESPACE or name.startswith(f"{NAMESPACE}.") else f"{NAMESPACE}.{name}")
