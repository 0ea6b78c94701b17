"""The KubeRay manifests as the operator sees them: valid for the v1.7.0 RayJob and RayCronJob CRDs (unknown
fields refused) and the controller's own rules, every pod sharing the model cache and reading the hub token from
a Secret, GPU pods placed on any platform, and a nightly run that is not retried, is bounded and cleans up."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from tests.helpers.cluster_files import CLUSTER, KUBE_FILES, by_kind, load_docs, ray_job_spec
from tests.helpers.places import REPO

# The KubeRay CRDs (v1.7.0's rayjobs.yaml and raycronjobs.yaml, as the operator installs them) live outside the
# repository: $KANDINSKY_RENDER_KUBERAY_CRDS, else ../shared/kuberay-crds/v1.7.0 beside the checkout.
CRDS = Path(os.environ.get("KANDINSKY_RENDER_KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-crds" / "v1.7.0")
CRD_FILES = {"RayJob": "rayjobs.yaml", "RayCronJob": "raycronjobs.yaml"}


def strict(schema: dict) -> dict:
    """``schema`` refusing unknown fields as ``kubectl apply`` does (strict field validation), except where the
    CRD keeps them (``x-kubernetes-preserve-unknown-fields``) or maps any key (``additionalProperties``)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        open_ended = schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema
        if schema.get("type") == "object" and "properties" in schema and not open_ended:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


def crd_validator(kind: str) -> object:
    """A JSON-schema validator of a ``kind`` object from its CRD's served v1 openAPIV3Schema (skips without CRDs)."""
    import jsonschema

    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (set KANDINSKY_RENDER_KUBERAY_CRDS): manifests not validated")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(validator: object, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(doc)]


def kuberay_rule_errors(spec: dict) -> list[str]:
    """The RayJob rules KubeRay v1.7.0's controller checks beyond the schema (controllers/ray/utils/validation.go)."""
    errors = []
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules") or []
    if rules and spec.get("shutdownAfterJobFinishes"):
        errors.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    order = {"DeleteWorkers": 0, "DeleteCluster": 1, "DeleteSelf": 2}
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for rule in rules:
        condition = rule["condition"]
        if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
            errors.append(f"{rule}: exactly one of jobStatus and jobDeploymentStatus")
        key = ("jobStatus", condition["jobStatus"]) if "jobStatus" in condition else ("jobDeploymentStatus", "")
        key = key if "jobStatus" in condition else ("jobDeploymentStatus", condition.get("jobDeploymentStatus"))
        by_policy = ttls.setdefault(key, {})
        if rule["policy"] in by_policy:
            errors.append(f"duplicate rule {rule}")
        by_policy[rule["policy"]] = condition.get("ttlSeconds", 0)
    for key, by_policy in ttls.items():
        ordered = [by_policy[p] for p in sorted(by_policy, key=order.get) if p in order]
        if ordered != sorted(ordered):
            errors.append(f"{key}: TTLs must grow DeleteWorkers <= DeleteCluster <= DeleteSelf, got {by_policy}")
    if spec.get("backoffLimit", 0) < 0:
        errors.append("backoffLimit must be >= 0")
    return errors


@pytest.mark.parametrize("name", KUBE_FILES)
def test_kuberay_manifests_are_valid_for_the_crds_and_the_controller(name: str) -> None:
    """Each RayJob / RayCronJob validates against KubeRay v1.7.0's CRD schema with unknown fields refused (what
    kubectl apply with strict field validation does), and against the controller's own RayJob rules."""
    docs = load_docs(name)
    (doc,) = [doc for doc in docs if doc.get("kind") in CRD_FILES]
    validator = crd_validator(doc["kind"])
    assert schema_errors(validator, doc) == []
    assert kuberay_rule_errors(ray_job_spec(docs)) == []
    # The checks bite: a misspelt field deep in a pod template, a wrong type, rules beside shutdownAfterJobFinishes.
    typo = copy.deepcopy(doc)
    ray_job_spec([typo])["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "volumeMount"
    ] = []
    assert any("volumeMount" in error for error in schema_errors(validator, typo))
    wrong = copy.deepcopy(doc)
    ray_job_spec([wrong])["backoffLimit"] = "one"
    assert any("'one' is not of type 'integer'" in error for error in schema_errors(validator, wrong))
    both = dict(ray_job_spec(docs), shutdownAfterJobFinishes=True)
    both["deletionStrategy"] = {"deletionRules": [{"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED"}}]}
    assert kuberay_rule_errors(both) == ["shutdownAfterJobFinishes and deletionRules are mutually exclusive"]


def pod_specs(spec: dict) -> dict[str, dict]:
    """Group name ("head" for the head) -> pod spec of a RayJob spec's cluster."""
    cluster = spec["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({group["groupName"]: group["template"]["spec"] for group in cluster["workerGroupSpecs"]})
    return pods


@pytest.mark.parametrize("name", KUBE_FILES)
def test_every_pod_shares_the_model_cache_and_reads_the_hub_token_from_a_secret(name: str) -> None:
    docs = load_docs(name)
    (claim,) = [doc for doc in docs if doc.get("kind") == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # one copy of the weights for every pod and run
    for group, pod in pod_specs(ray_job_spec(docs)).items():
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert set(mounts.values()) <= set(volumes), group
        cache = volumes[mounts["/home/ray/.cache"]]  # HF_HOME's and the job's caches both live under ~/.cache
        assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], group
        (token,) = [env for env in container["env"] if env["name"] == "HF_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"] == {
            "name": "kandinsky-render-hub",
            "key": "HF_TOKEN",
            "optional": True,
        }
        assert pod["securityContext"]["fsGroup"] == 100, group
        if group == "head":
            continue
        # GPU nodes by any of several platforms' labels, not GKE's alone; GPU taints tolerated.
        assert "nodeSelector" not in pod, group
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        keys = {expression["key"] for term in terms for expression in term["matchExpressions"]}
        assert {"cloud.google.com/gke-accelerator", "nvidia.com/gpu.product"} <= keys, group
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_the_nightly_run_is_not_retried_is_bounded_and_cleans_up() -> None:
    """An overlapping night's run exits 75 (the lease): with backoffLimit 0 it does not start a second cluster
    just to exit again; its cluster goes when it ends, its RayJob a week later (RayCronJob never deletes them)."""
    cron = by_kind(load_docs("raycronjob.yaml"), "RayCronJob")["spec"]["jobTemplate"]
    assert cron["backoffLimit"] == 0
    assert 0 < cron["preRunningDeadlineSeconds"] < cron["activeDeadlineSeconds"] < 24 * 3600
    rules = {(r["policy"], *r["condition"].values()) for r in cron["deletionStrategy"]["deletionRules"]}
    for status in ("SUCCEEDED", "FAILED"):
        assert ("DeleteCluster", status, 0) in rules and ("DeleteSelf", status, 7 * 24 * 3600) in rules
    assert "shutdownAfterJobFinishes" not in cron and "ttlSecondsAfterFinished" not in cron
    values = yaml.safe_load((CLUSTER / "kuberay-operator-values.yaml").read_text())
    gates = {gate["name"]: gate["enabled"] for gate in values["featureGates"]}
    assert gates["RayCronJob"] and gates["RayJobDeletionPolicy"] and len(gates) >= 8  # the chart's whole list
