"""The driver: CLI, planning, the Ray pipeline, results bookkeeping, reports, tiny models, benchmarks."""
