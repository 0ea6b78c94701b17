"""Batches: a shard's work rows cut into decoder calls, and consecutive calls grouped into prior calls.

A planned batch is the rows one decoder call serves (equal `schemas.work.CALL_KEY`); consecutive
batches are grouped into one prior stage call, which the prior splits into model calls by its own
`schemas.work.PRIOR_CALL_KEY`. Both are pure functions of the work rows, so batch composition, and
with it the pixels, never depends on scheduling.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import JobConfig
from schemas.work import CALL_KEY, PRIOR_CALL_KEY


class Batches(Sequence[pa.Table]):
    """Planned batches as views of one sorted work table: batch ``i`` is rows ``offsets[i]:offsets[i + 1]``.

    A list of a million small tables would cost gigabytes of Arrow bookkeeping; views are made
    only when a batch is asked for, so a plan costs little more than its rows.
    """

    def __init__(self, work: pa.Table, offsets: np.ndarray) -> None:
        self.work = work
        self.offsets = offsets

    def __len__(self) -> int:
        return max(len(self.offsets) - 1, 0)

    @overload
    def __getitem__(self, index: int) -> pa.Table: ...

    @overload
    def __getitem__(self, index: slice) -> list[pa.Table]: ...

    def __getitem__(self, index: int | slice) -> pa.Table | list[pa.Table]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.work.slice(start, stop - start)

    def __iter__(self) -> Iterator[pa.Table]:
        for i in range(len(self)):
            yield self[i]


def batch(work: pa.Table, *, batch_size: int) -> Batches:
    """Cut work rows into batches a single pipeline call can serve.

    Rows are grouped by `CALL_KEY` and ordered by `PRIOR_CALL_KEY` then (id, image_index) inside a
    group (so rows one prior call can serve stay together), so batch composition depends only on the
    set of work, not on manifest order or file layout. Every batch holds ``batch_size`` rows except
    the last of each group.
    """
    if work.num_rows == 0:
        return Batches(work, np.zeros(1, np.int64))
    keys = [*CALL_KEY, *PRIOR_CALL_KEY, "id", "image_index"]
    order = pc.sort_indices(work.select(keys), sort_keys=[(name, "ascending") for name in keys])
    work = work.take(order)
    n = work.num_rows
    group_start = np.zeros(n, dtype=bool)
    group_start[0] = True
    for name in CALL_KEY:
        column = work.column(name).combine_chunks()
        changed = pc.not_equal(column.slice(1), column.slice(0, n - 1))
        group_start[1:] |= changed.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(group_start)
    position = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    return Batches(work, np.append(np.flatnonzero(position % batch_size == 0), n).astype(np.int64))


def prior_batch_size(config: JobConfig) -> int:
    """Images per prior call: ``prior_batch_size``, else the decoder's ``batch_size``."""
    return config.prior_batch_size or config.batch_size


def group_batches(batches: Iterable[pa.Table], *, max_rows: int) -> Iterator[list[pa.Table]]:
    """Consecutive batches that one prior stage call serves, at most ``max_rows`` rows together.

    A group holds at least one whole batch, so a batch larger than ``max_rows`` is a group alone
    (the prior cuts its model calls to its batch size, and by `PRIOR_CALL_KEY`). A pure function of
    the batch sequence, so prior call composition is as deterministic as the batches themselves.
    """
    group: list[pa.Table] = []
    num_rows = 0
    for table in batches:
        if group and num_rows + table.num_rows > max_rows:
            yield group
            group, num_rows = [], 0
        group.append(table)
        num_rows += table.num_rows
    if group:
        yield group
