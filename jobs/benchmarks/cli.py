"""``kandinsky-render benchmark MODE``: the mode registry and its command line (see BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from jobs.benchmarks import cpu, gpu, heartbeat, host, layout, log, plan, score, simulated, step
from jobs.benchmarks.common import Mode
from jobs.options.flags import DefaultsHelpFormatter

# A mode is one module with a MODES tuple; register it here. Listed modes first, hidden helpers after.
MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in sorted(
        (
            *cpu.MODES,
            *simulated.MODES,
            *layout.MODES,
            *plan.MODES,
            *log.MODES,
            *gpu.MODES,
            *host.MODES,
            *score.MODES,
            *heartbeat.MODES,
            *step.MODES,
        ),
        key=lambda mode: mode.help is None,
    )
}


def build_parser(prog: str = "kandinsky-render benchmark") -> argparse.ArgumentParser:
    """The ``benchmark`` command line: one sub-command per mode (helper modes work but are not listed)."""
    parser = argparse.ArgumentParser(prog=prog, description="Speed, memory and scale figures (see BENCHMARKS.md).")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode in MODES.values():
        # A sub-command given no help is left out of the list (help=SUPPRESS would print "==SUPPRESS==").
        listed = {} if mode.help is None else {"help": mode.help}
        sub = modes.add_parser(mode.name, formatter_class=DefaultsHelpFormatter, description=mode.help, **listed)
        mode.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "kandinsky-render benchmark") -> int:
    """Run one benchmark mode; its last printed line is a JSON object of its figures."""
    args = build_parser(prog).parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    mode = MODES[args.mode]
    if mode.quiet_libraries:
        from actors.common import quiet_libraries

        quiet_libraries()
    try:
        result = mode.run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0
