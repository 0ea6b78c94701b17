"""The words and bounds a job's options are checked against: scorers, runners, layouts, and the largest batch,
shard, shards in flight and planned cluster a mistyped number may ask for (`schemas.config.JobConfig` checks them)."""

from __future__ import annotations

import re

from schemas.keys import MAX_SEED
from schemas.numbers import DAY_S, MAX_WAIT_S

SCORERS = ("clip",)
EMBEDDING_DTYPES = ("float32", "float16")
RUNNERS = ("ray", "local")
# How the model stages share processes and GPUs (cluster/layout.py): the CLIP stages (prior, scoring, depth) on
# GPUs of their own, beside the decoders on the decoders' GPUs, or every stage in one process (CPU clusters).
LAYOUT_DEDICATED = "dedicated"
LAYOUT_CO_LOCATED = "co-located"
LAYOUT_ONE_PROCESS = "one-process"
LAYOUTS = (LAYOUT_DEDICATED, LAYOUT_CO_LOCATED, LAYOUT_ONE_PROCESS)
# Bounds that keep a mistyped number from exhausting memory (a batch, the shards held open, a planned cluster).
MAX_BATCH_SIZE = 1 << 16  # also what planning uses to cut work without batching it
MAX_SHARD_ROWS = 10_000_000
MAX_SHARDS_IN_FLIGHT = 10_000
MAX_PLANNED_GPUS = 100_000
# ``--plan-for`` values: N GPUs of a type (``8xH100``); the type is checked against the calibration profiles.
PLAN_FOR = re.compile(r"\s*(\d+)\s*[xX*]\s*([A-Za-z0-9_.-]+)\s*")
# Each numeric option of `schemas.config.JobConfig`: (field, low, high, low bound excluded).
NUMBER_RANGES = (
    ("idle_timeout_s", 0.0, MAX_WAIT_S, False),
    ("call_timeout_s", 0.0, MAX_WAIT_S, True),
    ("call_timeout_floor_s", 0.0, MAX_WAIT_S, True),
    ("call_timeout_warm_floor_s", 0.0, MAX_WAIT_S, True),
    ("stage_wait_s", 0.0, MAX_WAIT_S, True),
    ("connect_wait_s", 0.0, DAY_S, True),
    ("lease_ttl_s", 0.0, DAY_S, True),
    ("lease_wait_s", 0.0, MAX_WAIT_S, False),
    ("max_error_fraction", 0.0, 1.0, False),
    ("min_clip_score", 0.0, 100.0, False),
    ("seed", 0, MAX_SEED, False),
    ("batch_size", 1, MAX_BATCH_SIZE, False),
    ("prior_batch_size", 1, MAX_BATCH_SIZE, False),
    ("shard_rows", 1, MAX_SHARD_ROWS, False),
    ("shards_in_flight", 1, MAX_SHARDS_IN_FLIGHT, False),
    ("compact_every", 1, 1 << 40, False),
)
