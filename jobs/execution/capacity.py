"""Asking the cluster's autoscaler for what the stages need, and scaling from zero: waiting for planned GPUs.

`ask_for_capacity` tells an autoscaler (Ray's ``request_resources``) the shape of every actor the
pools may grow to, so it launches the nodes at once instead of one pending actor at a time;
`withdraw_capacity` takes the request back when the run ends. `await_gpus` is the start of a run
planned for GPUs (``--plan-for``, or node groups Ray knows) when none is up yet: it asks for them
and waits, within ``--stage-wait``, saying what it asked for and what the cluster has.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from cluster.defaults import Machine
from cluster.resources import ACCELERATOR_LABEL
from jobs.execution.pool import Pool
from jobs.execution.scaling import ActorPools
from schemas.loggers import logger_for
from schemas.resources import UNBOUNDED

logger = logger_for(__name__)


def _bundle(pool: Pool) -> dict[str, float]:
    resources = pool.resources
    return {key: value for key, value in (("GPU", resources.num_gpus), ("CPU", resources.num_cpus)) if value}


def _selector(pool: Pool) -> dict[str, str]:
    """The node labels an actor of ``pool`` needs (its ``--*-node-label`` and ``--*-accelerator-type``)."""
    placement = pool.resources.placement
    selector = dict(placement.label_selector)
    if placement.accelerator_type:
        selector.setdefault(ACCELERATOR_LABEL, placement.accelerator_type)
    return selector


def capacity_bundles(pools: Iterable[Pool]) -> list[tuple[dict[str, float], dict[str, str]]]:
    """One (resource bundle, node label selector) per actor the pools may grow to (their MIN when they have no
    upper bound), so the autoscaler starts the node types the stages are pinned to."""
    bundles = []
    for pool in pools:
        resources = pool.resources
        count = resources.max_actors if resources.max_actors and resources.max_actors < UNBOUNDED else None
        bundles += [(_bundle(pool), _selector(pool))] * max(count or resources.num_actors, 1 if pool.started else 0)
    return [(bundle, selector) for bundle, selector in bundles if bundle]


def ask_for_capacity(pools: ActorPools) -> None:
    """Ask the autoscaler, when one runs, for the resources of every actor the model pools may grow to."""
    wanted = capacity_bundles(pools.model_pools)
    if wanted and pools.elasticity.autoscaler:
        from ray.autoscaler.sdk import request_resources

        bundles, selectors = [bundle for bundle, _ in wanted], [selector for _, selector in wanted]
        request_resources(bundles=bundles, bundle_label_selectors=selectors if any(selectors) else None)
        logger.info("asked the autoscaler for %s", describe_bundles(bundles, selectors))


def withdraw_capacity(pools: ActorPools) -> None:
    """Take back what `ask_for_capacity` asked for (idle nodes may then go)."""
    if pools.elasticity.autoscaler:
        from ray.autoscaler.sdk import request_resources

        try:
            request_resources(bundles=[])
        except Exception as exc:  # noqa: BLE001 - the run is over; only say so
            logger.info("could not withdraw the autoscaler request: %s", exc)


def describe_bundles(bundles: list[dict[str, float]], selectors: list[dict[str, str]] | None = None) -> str:
    """``8 x {GPU: 0.9, CPU: 1}, 1 x {GPU: 1, CPU: 1} on kandinsky-render/stage=prior``."""
    counts: dict[tuple, int] = {}
    for bundle, selector in zip(bundles, selectors or [{}] * len(bundles)):
        key = (tuple(sorted(bundle.items())), tuple(sorted(selector.items())))
        counts[key] = counts.get(key, 0) + 1
    parts = []
    for (bundle, selector), n in counts.items():
        where = f" on {', '.join(f'{k}={v}' for k, v in selector)}" if selector else ""
        parts.append(f"{n} x {{{', '.join(f'{k}: {v:g}' for k, v in bundle)}}}{where}")
    return ", ".join(parts)


def await_gpus(
    machine: Machine, *, wait_s: float, read: Callable[[], Machine], poll_s: float = 2.0, heartbeat_s: float = 30.0
) -> Machine:
    """``machine`` once a GPU is up: a run planned for ``machine.planned_gpus`` GPUs with none up asks the
    autoscaler for them and waits up to ``wait_s`` seconds (``read`` re-reads the cluster).

    Raises RuntimeError naming what it asked for and what the cluster has when none comes, after taking the
    request back.
    """
    if machine.gpus or not machine.planned_gpus:
        return machine
    asked = [{"GPU": 1.0}] * int(machine.planned_gpus)
    if machine.autoscaler:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=asked)
    what = f"{int(machine.planned_gpus)} GPU(s) ({describe_bundles(asked)})"
    logger.info(
        "no GPU is up yet; %s %s and waiting up to %.0f s (--stage-wait)",
        "asked the autoscaler for" if machine.autoscaler else "no autoscaler runs: waiting for nodes with",
        what,
        wait_s,
    )
    started = last_line = time.monotonic()
    while True:
        current = read()
        if current.gpus:
            logger.info("%g GPU(s) up after %.0f s", current.gpus, time.monotonic() - started)
            return dataclasses.replace(current, planned_gpus=machine.planned_gpus)
        waited = time.monotonic() - started
        if waited >= wait_s:
            if machine.autoscaler:  # the run gives up: a node launched now would only idle until it times out
                request_resources(bundles=[])
            shapes = ", ".join(node.describe() for node in current.nodes) or "none"
            raise RuntimeError(
                f"waited {round(waited, 1):g} s (--stage-wait {wait_s:g}) for {what}: no GPU came up "
                f"(nodes: {shapes}). "
                + (
                    "The autoscaler did not add a GPU node: check its node types, their max workers and quotas."
                    if machine.autoscaler
                    else "No autoscaler runs on this cluster: add GPU nodes, or leave out --plan-for."
                )
            )
        if time.monotonic() - last_line >= heartbeat_s:
            last_line = time.monotonic()
            logger.info("still waiting for GPUs: %.0f s of %.0f s", waited, wait_s)
        time.sleep(min(poll_s, wait_s - waited))  # the last look is at the end of the wait, not past it
