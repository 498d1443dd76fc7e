"""The ``cupystreams`` command: ``demo``, ``bench`` and ``info``.

The backend is chosen here, explicitly: ``--backend auto`` (the default) uses
the GPU when CuPy can reach one and otherwise the host backend, and then says
so in the first line it prints. The library itself never falls back.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from ._backends import BACKEND_ENV_VAR, make_backend, resolve_backend_name
from ._errors import BackendUnavailableError

__all__ = ["main"]


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, the line that says what runs where) for ``--backend``.

    Raises:
        BackendUnavailableError: ``cupy`` was asked for (by flag or by
            ``CUPYSTREAMS_BACKEND``) and no GPU is usable.
    """
    name = resolve_backend_name(requested)
    if name == "host":
        why = "--backend host" if requested == "host" else f"{BACKEND_ENV_VAR}=host"
        return "host", f"Host backend ({why}): simulated work on host threads, no GPU used."
    try:
        backend = make_backend("cupy", None)
    except BackendUnavailableError as exc:
        if name == "cupy":
            raise
        reason = str(exc).split("; ")[0]  # the rest says how to opt in, which we do
        return "host", f"No usable GPU ({reason}): running on the host backend with simulated work."
    from ._bench.info import device_name

    return "cupy", f"GPU {backend.device}: {device_name(backend.device)} (cupy backend)."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cupystreams", description="A CUDA stream and event pool: demo, benchmarks, info."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def backend_flag(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--backend",
            choices=("auto", "cupy", "host"),
            default="auto",
            help=f"auto: the GPU if usable, else the host backend (or {BACKEND_ENV_VAR})",
        )

    demo = commands.add_parser("demo", help="overlap, priority and memory, in one table")
    backend_flag(demo)
    demo.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    demo.add_argument("--output", default="timeline.png", help="timeline PNG to write")
    bench = commands.add_parser("bench", help="the benchmark suite with its peers")
    backend_flag(bench)
    bench.add_argument("--quick", action="store_true", help="fewer repeats")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    info = commands.add_parser("info", help="device, limits, versions, usable adapters")
    backend_flag(info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cupystreams`` script; returns the exit status."""
    args = _parser().parse_args(argv)
    console = Console(highlight=False)
    try:
        backend, line = choose_backend(args.backend)
    except BackendUnavailableError as exc:
        Console(stderr=True).print(f"cupystreams {args.command}: {exc}", soft_wrap=True)
        return 2
    console.print(line, soft_wrap=True, markup=False)
    if args.command == "demo":
        from ._bench.demo import run_demo

        run_demo(console, backend, args.quick, args.output)
    elif args.command == "bench":
        from ._bench.suite import run_bench, write_json

        results = run_bench(console, backend, args.quick)
        if args.json:
            write_json(args.json, results, backend, args.quick)
            console.print(f"results written to {args.json}", soft_wrap=True, markup=False)
    else:
        from ._bench.info import collect_info

        table = Table(show_header=False, box=None)
        for field, value in collect_info(backend):
            table.add_row(field, value)
        console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
