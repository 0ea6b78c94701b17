"""``python -m jobs.benchmarks MODE ...``: the same as ``kandinsky-render benchmark MODE ...``."""

from __future__ import annotations

import sys

from jobs.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m jobs.benchmarks"))
