"""The ``kandinsky-render`` console script: one sub-command per entry of `COMMANDS`."""

from __future__ import annotations

import sys

COMMANDS = {
    "render": "render manifests (kandinsky-render render --help lists its options)",
    "status": "an output's final view: counts, failed images (--errors), every image (--all), --json",
    "tiny-models": "write tiny random-weight checkpoints for tests and the example",
    "calibrate": "fit a --dry-run GPU-seconds profile from a finished run's results",
    "reuse-embeddings": "turn a run's saved embeddings (--save-embeddings) into a manifest to render again",
    "benchmark": "speed, memory and scale figures, one mode each (see BENCHMARKS.md)",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a sub-command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        from jobs.options.flags import version_text

        print(version_text())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:{width}s}  {text}" for name, text in COMMANDS.items()]
        usage = "usage: kandinsky-render [--version] COMMAND [options]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"kandinsky-render: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "render":
        from jobs.render import main as render_main

        return render_main(rest)
    if command == "status":
        from jobs.reporting.status import main as status_main

        return status_main(rest)
    if command == "calibrate":
        from jobs.reporting.calibrate import main as calibrate_main

        return calibrate_main(rest)
    if command == "reuse-embeddings":
        from jobs.reporting.reuse import main as reuse_main

        return reuse_main(rest)
    if command == "benchmark":
        from jobs.benchmarks import main as benchmark_main

        return benchmark_main(rest)
    from jobs.dev.tiny_models import main as tiny_main

    return tiny_main(rest, prog="kandinsky-render tiny-models")


if __name__ == "__main__":
    sys.exit(main())
