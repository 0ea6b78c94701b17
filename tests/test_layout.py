"""The stage layout on GPUs (cluster/layout.py), its resolution into actor groups and `--dry-run --plan-for`."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from cluster.layout import CLIP_SHARE, StageCosts, choose, co_located, dedicated, sweep
from cluster.resources import resolve_groups
from schemas.config import JobConfig
from schemas.resources import StageResources
from tests.helpers.cli import command
from tests.helpers.places import REPO

# ~4% (a 768x768, 50-step decoder image against a 25-step prior, both guided): the real models' ratio
REAL = StageCosts(prior=0.0215, decoder=0.517, source="H100 estimate")


@pytest.mark.parametrize("num_gpus", [2, 4, 8, 16, 64])
def test_the_chosen_layout_is_within_5_percent_of_the_best_swept(num_gpus: int) -> None:
    for costs in (REAL, StageCosts(prior=0.1, decoder=0.5), StageCosts(prior=0.02, decoder=0.5, score=0.01)):
        chosen = choose(num_gpus=num_gpus, costs=costs)
        best = sweep(num_gpus=num_gpus, costs=costs)[0]
        assert chosen.images_per_s >= 0.95 * best.images_per_s, (num_gpus, costs, chosen.describe(), best.describe())
        assert chosen.note and sum(g.num_actors * g.num_gpus for g in chosen.groups) <= num_gpus + 1e-9


def test_small_clusters_co_locate_and_large_ones_keep_dedicated_clip_gpus() -> None:
    two = choose(num_gpus=2, costs=REAL)
    assert two.kind == "co-located" and "would be 4% busy" in two.note
    # a dedicated prior GPU on 2 GPUs halves the images/s per GPU
    old = dedicated(num_gpus=2, num_clip_gpus=1, costs=REAL, clip_stages=("prior",))
    assert two.images_per_s > 1.8 * old.images_per_s
    large = choose(num_gpus=64, costs=REAL)
    assert large.kind == "dedicated" and large.group("clip").num_actors == 3 and large.group("decoder").num_actors == 61
    one = choose(num_gpus=1, costs=REAL)
    assert one.kind == "co-located" and one.group("clip").num_gpus == CLIP_SHARE


def test_co_location_time_slicing_and_the_clip_group_capacity() -> None:
    perfect = co_located(num_gpus=4, num_clip_actors=1, costs=REAL, clip_stages=("prior",), efficiency=1.0)
    assert perfect.images_per_s == pytest.approx(4 / (REAL.prior + REAL.decoder))
    lossy = co_located(num_gpus=4, num_clip_actors=1, costs=REAL, clip_stages=("prior",))
    assert lossy.images_per_s < perfect.images_per_s
    # one CLIP actor cannot feed decoders whose CLIP work needs more than a GPU's time
    heavy = co_located(num_gpus=8, num_clip_actors=1, costs=StageCosts(prior=0.5, decoder=0.5), clip_stages=("prior",))
    assert heavy.images_per_s <= 0.9 / 0.5 + 1e-9
    with pytest.raises(ValueError):
        dedicated(num_gpus=2, num_clip_gpus=2, costs=REAL, clip_stages=("prior",))
    with pytest.raises(ValueError):
        StageCosts(prior=0.1, decoder=0.0)


def _config(**fields) -> JobConfig:
    return JobConfig(manifest="m.parquet", output="out", **fields)


def test_groups_follow_the_layout() -> None:
    one, writers = resolve_groups(_config(layout="one-process"), cluster_gpus=0.0, needs_depth=True)
    assert [(g.name, g.stages) for g in one] == [("model", ("depth", "prior", "decoder"))]
    assert one[0].resources.num_gpus == 0.0 and writers.num_actors == 1
    scored = _config(layout="co-located", score="clip", prior=StageResources(num_actors=1))
    groups, _ = resolve_groups(scored, cluster_gpus=4.0, needs_depth=False)
    assert [(g.name, g.stages, g.resources.num_actors, g.resources.num_gpus) for g in groups] == [
        ("clip", ("prior", "score"), 1, CLIP_SHARE),
        ("decoder", ("decoder",), 4, 1 - CLIP_SHARE),
    ]
    # a stage given actors of its own leaves the CLIP group; GPUs are never more than the cluster has
    apart = _config(layout="dedicated", score="clip", scorer=StageResources(num_actors=2, num_gpus=0.0))
    groups, _ = resolve_groups(apart, cluster_gpus=4.0, needs_depth=False)
    assert [(g.name, g.stages) for g in groups] == [
        ("clip", ("prior",)),
        ("decoder", ("decoder",)),
        ("score", ("score",)),
    ]
    assert groups[1].resources.num_actors == 3
    with pytest.raises(ValueError, match="ask for 5 GPUs"):
        resolve_groups(_config(layout="dedicated", decoder=StageResources(num_actors=4)), cluster_gpus=4.0,
                       needs_depth=False)  # fmt: skip
    with pytest.raises(ValueError, match="not chosen"):
        resolve_groups(_config(), cluster_gpus=0.0, needs_depth=False)


def _dry_run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command(), "render", "--example", "--dry-run", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


def test_dry_run_plans_for_hypothetical_clusters_as_text_and_json() -> None:
    text = _dry_run("--plan-for", "8xH100", "--plan-for", "2xL4")
    assert text.returncode == 0, text.stderr
    assert "plan for 8xH100 (H100 profile, estimated: FLOP counts at 40% of the GPU's peak" in text.stdout
    assert "plan for 2xL4" in text.stdout and "GPU-hours" in text.stdout and "best of the layouts swept" in text.stdout
    assert re.search(r"15 image\(s\) in \d+:\d\d:\d\d \(h:mm:ss\)", text.stdout), text.stdout
    # only the planned clusters: not this machine's defaults, actors or its calibration-file (cpu-tiny) profile
    for local in ("defaults chosen for this machine", "model calls per stage", "cpu-tiny"):
        assert local not in text.stdout, local
    proc = _dry_run("--plan-for", "4xH200", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plans"][0]
    assert plan["cluster"] == "4xH200" and plan["layout"] in ("dedicated", "co-located")
    assert sum(g["num_actors"] * g["num_gpus"] for g in plan["groups"]) <= 4 + 1e-9
    assert plan["of_best"] >= 0.95 and plan["images_per_s"] > 0 and set(plan["idle"]) <= {"clip", "decoder", "shared"}


def test_plan_for_refuses_unknown_types_and_clusters_too_small_for_the_flags() -> None:
    unknown = _dry_run("--plan-for", "4xB300")
    assert unknown.returncode == 2 and "'B300'" in unknown.stderr and "H100" in unknown.stderr
    malformed = _dry_run("--plan-for", "lots")
    assert malformed.returncode == 2 and "NxTYPE" in malformed.stderr
    small = _dry_run("--plan-for", "2xH100", "--num-decoder-actors", "4")
    assert small.returncode == 2 and "2xH100" in small.stderr and "the cluster has 2" in small.stderr
