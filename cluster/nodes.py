"""Placement per node: whether an actor of a group fits a node (its free GPUs and CPUs, its labels), and whether a
layout's actors can be placed on a cluster's nodes at all, said in words that name the node shapes.

Ray places an actor on one node: cluster-wide sums say nothing about whether a 0.5-GPU, 0.66-CPU
decoder fits beside a CLIP actor on a 1-GPU, 1-CPU node. Shapes are Ray's resource dicts
(``{"CPU": 8, "GPU": 1, "accelerator_type:L4": 1}``) and label dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cluster.resources import ACCELERATOR_LABEL, StageGroup, StageLayout, node_accepts

_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class NodeShape:
    """One node (or node type) of a cluster: what it has, what is free on it, its Ray labels."""

    name: str
    total: Mapping[str, float]
    available: Mapping[str, float] | None = None  # None: as total (a node type, or an empty node)
    labels: Mapping[str, str] = field(default_factory=dict)
    draining: bool = False
    node_id: str = ""  # Ray's node id (hex), for live nodes

    @property
    def free(self) -> Mapping[str, float]:
        """What an actor could still take on this node."""
        return self.total if self.available is None else self.available

    def describe(self) -> str:
        """``worker-1 {CPU: 1, GPU: 1 (L4)}``."""
        kind = self.labels.get(ACCELERATOR_LABEL)
        gpus = f", GPU: {self.total.get('GPU', 0):g}" + (f" ({kind})" if kind else "") if self.total.get("GPU") else ""
        return f"{self.name} {{CPU: {self.total.get('CPU', 0):g}{gpus}}}"


def fits(layout: StageLayout, node: NodeShape, *, free: Mapping[str, float] | None = None) -> bool:
    """Whether one more actor reserving ``layout`` fits on ``node`` now (``free``: its free resources)."""
    free = node.free if free is None else free
    if node.draining or not node_accepts(layout.placement, labels=_labels(node)):
        return False
    return free.get("GPU", 0.0) + _EPS >= layout.num_gpus and free.get("CPU", 0.0) + _EPS >= layout.num_cpus


def _labels(node: NodeShape) -> Mapping[str, str]:
    """The node's labels, with Ray's accelerator-type label read from its ``accelerator_type:<t>`` resource too."""
    kinds = [key.split(":", 1)[1] for key in node.total if key.startswith("accelerator_type:")]
    if kinds and ACCELERATOR_LABEL not in node.labels:
        return {**node.labels, ACCELERATOR_LABEL: kinds[0]}
    return node.labels


def unplaceable(groups: Sequence[StageGroup], nodes: Sequence[NodeShape]) -> list[str]:
    """The groups none of whose actors fits any of ``nodes`` even empty, each in words naming the node shapes."""
    problems = []
    shapes = ", ".join(node.describe() for node in nodes) or "none"
    for group in groups:
        if not any(fits(group.resources, node, free=node.total) for node in nodes):
            layout = group.resources
            where = _where(layout)
            problems.append(
                f"stage {group.name}: each actor needs {layout.num_gpus:g} GPU and {layout.num_cpus:g} CPU on one "
                f"node{where}, and no node has that (nodes: {shapes})"
            )
    return problems


def _where(layout: StageLayout) -> str:
    placement = layout.placement
    parts = [f"accelerator type {placement.accelerator_type}"] if placement.accelerator_type else []
    parts += [f"{key}={value}" for key, value in placement.label_selector.items()]
    return f" with {', '.join(parts)}" if parts else ""


def cpus_per_gpu_actor(nodes: Sequence[NodeShape], *, actors_per_gpu: float) -> float:
    """The CPUs each GPU actor may reserve so that every GPU of every GPU node can hold its actors: at most 1,
    less on nodes with fewer CPUs than GPU actors (a 1-GPU, 1-CPU node holding a CLIP actor and a decoder: 0.5)."""
    shares = [
        node.total.get("CPU", 0.0) / (node.total["GPU"] * actors_per_gpu) for node in nodes if node.total.get("GPU")
    ]
    return min([1.0, *shares])
