"""The driver: CLI, planning, the Ray pipeline, results bookkeeping, reports, tiny models, benchmarks."""

import time

# When this process first imported the driver: a command's own start (jobs.execution.timeline.command_started).
IMPORTED_AT = time.time()
