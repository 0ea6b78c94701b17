"""The files in cluster/ as tests read them: KubeRay manifests and their RayJob specs."""

from __future__ import annotations

import yaml

from tests.helpers.places import REPO

CLUSTER = REPO / "cluster"
KUBE_FILES = ("rayjob.yaml", "raycronjob.yaml")


def load_docs(name: str) -> list[dict]:
    """The YAML documents of ``cluster/NAME``."""
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


def by_kind(docs: list[dict], kind: str) -> dict:
    """The one document of ``kind``."""
    (found,) = [doc for doc in docs if doc.get("kind") == kind]
    return found


def ray_job_spec(docs: list[dict]) -> dict:
    """The RayJob spec of a RayJob or of a RayCronJob's template."""
    for doc in docs:
        if doc.get("kind") == "RayJob":
            return doc["spec"]
        if doc.get("kind") == "RayCronJob":
            return doc["spec"]["jobTemplate"]
    raise AssertionError("no RayJob or RayCronJob")
