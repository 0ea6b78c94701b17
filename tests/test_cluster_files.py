"""Every file in cluster/ parses and is valid for what reads it (the KubeRay CRDs, Ray's launcher schema, Docker's
build context rules), its entrypoints run real modules with valid flags, and its GPUs fit the job."""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import shlex
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster.resources import StageLayout, StagePlacement, node_accepts, ray_remote_args, resolve_groups
from jobs.options.config_file import parse_args
from jobs.options.flags import build_parser
from jobs.options.job_config import config_from_args
from schemas.config import JobConfig
from tests.helpers.cluster_files import CLUSTER, KUBE_FILES, by_kind, load_docs, ray_job_spec
from tests.helpers.places import REPO

# Files a `ray job submit --working-dir .` entrypoint reads by relative path.
CHECKOUT_FILES = {"cluster/job.yaml": (CLUSTER / "job.yaml").read_text()}
# Fields of KubeRay's RayJobSpec (ray-operator/apis/ray/v1/rayjob_types.go) and RayCronJobSpec
# (raycronjob_types.go, timeZone from v1.7): a misspelt field would be dropped by the API server.
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "preRunningDeadlineSeconds",
}  # fmt: skip
RAYCRONJOB_FIELDS = {"schedule", "jobTemplate", "suspend", "timeZone"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "suspend", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts", "labels", "resources",
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class NodeGroup:
    """One node type / worker group as the job sees it: Ray labels, GPUs per node, the fewest and most nodes."""

    name: str
    labels: dict[str, str]
    gpus_per_node: float
    min_nodes: int
    max_nodes: int


def kube_groups(spec: dict) -> list[NodeGroup]:
    groups = []
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        # GPU groups start empty and autoscale: the job's pools ask for their nodes and follow them.
        assert group["replicas"] == group["minReplicas"] <= group["maxReplicas"], group["groupName"]
        (container,) = group["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["limits"].get("nvidia.com/gpu") == resources["requests"].get("nvidia.com/gpu")
        groups.append(
            NodeGroup(
                name=group["groupName"],
                labels=dict(group.get("labels", {})),
                gpus_per_node=float(resources["limits"].get("nvidia.com/gpu", 0)),
                min_nodes=group["minReplicas"],
                max_nodes=group["maxReplicas"],
            )
        )
    return groups


def launcher_groups(config: dict) -> list[NodeGroup]:
    groups = []
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            assert node_type["resources"].get("GPU", 0) == 0 and node_type["resources"].get("CPU") == 0
            continue
        assert node_type["min_workers"] <= node_type["max_workers"], name
        groups.append(
            NodeGroup(
                name=name,
                labels=dict(node_type.get("labels", {})),
                gpus_per_node=float(node_type["resources"].get("GPU", 0)),
                min_nodes=node_type["min_workers"],
                max_nodes=node_type["max_workers"],
            )
        )
    return groups


def entrypoint_config(entrypoint: str, files: dict[str, str], tmp_path: Path) -> JobConfig:
    """Parse an entrypoint as the job would: it must run ``python -m <real module>`` with valid flags."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    assert importlib.util.find_spec(argv[2]) is not None, f"{argv[2]} is not an importable module"
    assert argv[2] == "jobs.render", "cluster entrypoints run the render job"
    args = argv[3:]
    for position, arg in enumerate(args):
        if arg in files:  # a file the manifest mounts into the pod: use its content
            local = tmp_path / Path(arg).name
            local.write_text(files[arg])
            args[position] = str(local)
    parsed = parse_args(build_parser(), args)
    return config_from_args(parsed, environ={})


def mounted_files(docs: list[dict], spec: dict) -> dict[str, str]:
    """Path in the head pod -> content, for ConfigMap volumes of the head container."""
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc.get("kind") == "ConfigMap"}
    pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    files = {}
    for mount in pod["containers"][0].get("volumeMounts", []):
        if "configMap" not in volumes[mount["name"]]:
            continue  # the model cache
        config_map = config_maps[volumes[mount["name"]]["configMap"]["name"]]
        for key, content in config_map.items():
            files[f"{mount['mountPath']}/{key}"] = content
    return files


def assert_stages_fit(config: JobConfig, groups: list[NodeGroup]) -> None:
    """The stage settings use exactly the GPUs of the node types their placement selects, and nothing else: each
    pool may grow to one actor per GPU slot of its node types at their most nodes (an autoscaler adds them)."""
    cluster_gpus = sum(group.gpus_per_node * group.max_nodes for group in groups)
    actor_groups, _ = resolve_groups(config, cluster_gpus=cluster_gpus, needs_depth=True)
    resolved = {group.name: group.resources for group in actor_groups}
    assert set(resolved) == {"clip", "decoder"}, "the CLIP stages (depth included) and the decoders"
    prior, decoder = resolved["clip"], resolved["decoder"]
    assert prior.num_gpus > 0 and decoder.num_gpus > 0, "cluster configs are GPU clusters"
    claimed: set[str] = set()
    for name, stage in (("prior", prior), ("decoder", decoder)):
        placement = stage.placement
        assert not placement.is_any, f"{name} is not pinned to its node type"
        matching = [group for group in groups if node_accepts(placement, labels=group.labels)]
        assert matching, f"no node type accepts the {name} actors ({placement})"
        assert not claimed & {group.name for group in matching}, f"{name} shares a node type with another stage"
        claimed |= {group.name for group in matching}
        slots = sum(math.floor(group.gpus_per_node / stage.num_gpus + 1e-9) * group.max_nodes for group in matching)
        most = stage.max_actors or stage.num_actors
        assert 1 <= stage.num_actors <= most == slots, f"{name}: at most {most} actors for {slots} GPU slots"
        args = ray_remote_args(stage)
        assert args["num_gpus"] == stage.num_gpus and args["label_selector"] == placement.label_selector
    assert claimed == {group.name for group in groups if group.gpus_per_node}, "a GPU node type serves no stage"


def test_docker_build_context_holds_only_what_the_dockerfile_copies(tmp_path: Path) -> None:
    """What `docker build -f cluster/Dockerfile .` sends, by .dockerignore's rules as docker-py applies them, from
    a checkout holding the quick start's .venv and kandinsky-example/, .git, a model folder and bytecode."""
    docker_build = pytest.importorskip("docker.utils.build")
    tree = tmp_path / "checkout"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "kandinsky-example"))
    junk = {".venv/lib/torch.so": 2**20, "kandinsky-example/images/a.png": 3, ".git/objects/x": 9,
            "models/decoder/unet/weights.safetensors": 2**20, "jobs/__pycache__/job.pyc": 5}  # fmt: skip
    for name, size in junk.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"\0" * size)
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in patterns if line and not line.startswith("#")]
    sent = {path for path in docker_build.exclude_paths(str(tree), patterns, "cluster/Dockerfile")}
    files = {path for path in sent if (tree / path).is_file()}
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    copied = [
        source for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", dockerfile, re.M) for source in line.split()[:-1]
    ]
    for source in copied:  # every file the image needs is in the context
        expected = (
            [p.relative_to(tree).as_posix() for p in (tree / source).rglob("*.py")]
            if (tree / source).is_dir()
            else [source]
        )
        assert set(expected) <= files, source
    assert {path.split("/")[0] for path in files} <= {*copied, ".dockerignore"}
    assert not any("__pycache__" in path or path.endswith(".pyc") for path in files)
    assert sum((tree / path).stat().st_size for path in files) < 2 * 2**20
    # Layer order: torch, then the dependencies from pyproject.toml and constraints.txt only, then the source.
    steps = [line.split()[0] for line in dockerfile.splitlines() if line and not line.startswith((" ", "#"))]
    first_copy = dockerfile.index("\nCOPY")
    assert dockerfile.index("pip install --no-cache-dir torch") < first_copy
    assert copied[:2] == ["pyproject.toml", "constraints.txt"]
    assert dockerfile.index("-r /tmp/requirements.txt") < dockerfile.index("COPY --chown=ray:users schemas")
    assert steps[-1] == "RUN" and dockerfile.rstrip().endswith("pip install --no-cache-dir --no-deps .")


@pytest.mark.parametrize("name", KUBE_FILES)
def test_kuberay_manifests(name: str, tmp_path: Path) -> None:
    docs = load_docs(name)
    assert {doc["apiVersion"] for doc in docs if doc["kind"] in ("RayJob", "RayCronJob")} == {"ray.io/v1"}
    spec = ray_job_spec(docs)
    assert set(spec) <= RAYJOB_FIELDS, set(spec) - RAYJOB_FIELDS
    # The cluster goes when the job ends: shutdownAfterJobFinishes (rayjob.yaml) or deletionRules (raycronjob.yaml).
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules", [])
    assert (spec.get("shutdownAfterJobFinishes") and spec["ttlSecondsAfterFinished"] > 0) or any(
        rule["policy"] == "DeleteCluster" for rule in rules
    )
    config = entrypoint_config(spec["entrypoint"], mounted_files(docs, spec), tmp_path)
    assert config.output.startswith("s3://") and not config.storage_options.get("key")
    groups = kube_groups(spec)
    assert_stages_fit(config, groups)
    if any(group.min_nodes < group.max_nodes for group in groups):  # someone must add the nodes
        assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True

    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs the driver, not actors"
    images = {
        container["image"]
        for group in [head, *spec["rayClusterSpec"]["workerGroupSpecs"]]
        for container in group["template"]["spec"]["containers"]
    }
    assert len(images) == 1, images
    dockerfile_ray = re.search(r"^FROM rayproject/ray:([0-9.]+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert dockerfile_ray and spec["rayClusterSpec"]["rayVersion"] == dockerfile_ray.group(1)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env == yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


def test_raycronjob_schedule_and_alpha_notes() -> None:
    cron = by_kind(load_docs("raycronjob.yaml"), "RayCronJob")
    assert set(cron["spec"]) <= RAYCRONJOB_FIELDS
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5, "standard 5-field cron schedule"
    text = (CLUSTER / "raycronjob.yaml").read_text()
    for note in ("ALPHA", "1.6", "RayCronJob=true", "NO concurrency policy", "lease"):
        assert note in text, note
    # A run is bounded below the daily period so a stuck run cannot overlap the next one for long.
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


def test_launcher_config_is_valid_for_ray_and_fits_the_job(tmp_path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own schema (no cloud access needed)
    job = entrypoint_config("python -m jobs.render --config cluster/job.yaml", CHECKOUT_FILES, tmp_path)
    assert_stages_fit(job, launcher_groups(config))

    broken = copy.deepcopy(config)
    broken["available_node_types"]["prior-gpu"]["lables"] = {}
    with pytest.raises(Exception, match="lables"):
        validate_config(prepare_config(broken))


def test_stage_checks_catch_mismatched_gpus(tmp_path: Path) -> None:
    """The agreement check itself fails when a node type and the stage settings disagree."""
    entrypoint = "python -m jobs.render --config cluster/job.yaml --num-decoder-actors 3"
    job = entrypoint_config(entrypoint, CHECKOUT_FILES, tmp_path)
    groups = launcher_groups(yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text()))
    with pytest.raises(AssertionError, match="decoder: at most 3 actors for 8 GPU slots"):
        assert_stages_fit(job, groups)


def test_runtime_env_file_is_a_valid_ray_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    runtime_env = RuntimeEnv(**data)
    assert runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "pip" not in data and "working_dir" not in data  # the image holds deps; --working-dir uploads code


def test_rayignore_keeps_the_working_dir_small(tmp_path: Path) -> None:
    """What `ray job submit --working-dir .` uploads: the packages, not venvs, outputs or tests."""
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "checkout"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "kandinsky-example"))
    (tree / ".venv" / "lib").mkdir(parents=True)
    (tree / ".venv" / "lib" / "torch.so").write_bytes(b"\0" * 2**20)
    (tree / "kandinsky-example" / "images").mkdir(parents=True)
    (tree / "kandinsky-example" / "images" / "a.png").write_bytes(b"png")
    (tree / "jobs" / "__pycache__").mkdir(exist_ok=True)
    (tree / "jobs" / "__pycache__" / "x.pyc").write_bytes(b"pyc")
    package = tmp_path / "package.zip"
    # .gitignore off: .rayignore alone must do the job (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 users).
    create_package(str(tree), package, include_gitignore=False)
    names = set(zipfile.ZipFile(package).namelist())
    for needed in ("jobs/render.py", "jobs/dev/examples/manifest.parquet", "schemas/config.py", "actors/prior.py"):
        assert needed in names
    assert "cluster/runtime_env.yaml" in names and "pyproject.toml" in names
    for name in names:
        left_out = (".venv/", "kandinsky-example/", "tests/", "docs/")
        assert not name.startswith(left_out) and "__pycache__" not in name, name
    assert package.stat().st_size < 2 * 2**20  # Ray stores files uncompressed: the code is about 1 MB


def test_ray_remote_args_only_pin_when_asked() -> None:
    free = StageLayout(num_actors=2, num_gpus=1.0, num_cpus=1.0)
    assert ray_remote_args(free) == {"num_gpus": 1.0, "num_cpus": 1.0}
    pinned = StageLayout(
        num_actors=1,
        num_gpus=0.5,
        num_cpus=2.0,
        placement=StagePlacement(accelerator_type="L4", label_selector={"kandinsky-render/stage": "prior"}),
    )
    assert ray_remote_args(pinned) == {
        "num_gpus": 0.5,
        "num_cpus": 2.0,
        "accelerator_type": "L4",
        "label_selector": {"kandinsky-render/stage": "prior"},
    }
    selector = StagePlacement(label_selector={"zone": "in(a,b)", "market": "!spot"})
    assert node_accepts(selector, labels={"zone": "b", "market": "on-demand"})
    assert not node_accepts(selector, labels={"zone": "c", "market": "on-demand"})
    assert not node_accepts(selector, labels={"zone": "a", "market": "spot"})
    assert node_accepts(StagePlacement(accelerator_type="L4"), labels={"ray.io/accelerator-type": "L4"})
    assert not node_accepts(StagePlacement(accelerator_type="L4"), labels={"ray.io/accelerator-type": "A100"})


def test_grafana_dashboard_uses_the_jobs_metrics() -> None:
    """Every metric the dashboard queries is one the job exports (jobs/execution/metrics.py), and each is shown."""
    import json

    from jobs.execution.metrics import METRICS

    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for query in queries for name in re.findall(r"ray_kandinsky_render_\w+", query)}
    exported = {spec.exported for spec in METRICS}
    histograms = {f"{spec.exported}_bucket" for spec in METRICS if spec.kind == "histogram"}
    assert used <= exported | histograms, used - exported - histograms
    assert {spec.exported for spec in METRICS} <= {name.removesuffix("_bucket") for name in used}
    assert all("$run_id" in query for query in queries)  # one run or all, chosen at the top
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
