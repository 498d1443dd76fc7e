"""The ``cupystreams`` command: ``demo``, ``bench`` and ``info``.

The backend is chosen here, explicitly: ``--backend auto`` (the default) uses
the GPU when CuPy can reach one and otherwise the host backend, and then says
so in the first line it prints. On the host backend that line of ``demo`` and
``bench`` also says that device time is modelled, not measured: the line is
the command's alone, so nothing printed later can contradict it. The library
itself never falls back.

Whatever a user can get wrong is checked before any work runs: the ``cli``
extra (rich for the tables, matplotlib for the timeline), the files to write
(``--output`` ends in ``.png``, ``--json`` in ``.json``, each in an existing
directory that can be written), and the backend, by flag or by
``CUPYSTREAMS_BACKEND``. Each such mistake, like a usage error, exits with
status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from ._backends import (
    BACKEND_ENV_VAR,
    case_hint,
    gpu_problem,
    make_backend,
    resolve_backend_name,
)
from ._bench.model import MODELLED

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["main"]

# What each command needs from the cli extra.
_NEEDS = {"demo": ("rich", "matplotlib"), "bench": ("rich",), "info": ("rich",)}
_TO_HOST = f"pass --backend host (or set {BACKEND_ENV_VAR}=host) to run on host threads"


class UsageError(Exception):
    """A mistake in the command line or its environment; the message says how to fix it."""


def choose_backend(requested: str, command: str) -> tuple[str, str]:
    """(backend, the line that says what runs where) for ``--backend`` and ``command``.

    Raises:
        UsageError: ``CUPYSTREAMS_BACKEND`` names no backend, or ``cupy`` was
            asked for (by flag or by ``CUPYSTREAMS_BACKEND``) and no GPU is usable.
    """
    try:
        name = resolve_backend_name(requested)
    except ValueError:
        # argparse has checked the flag already: only the environment is left.
        value = os.environ.get(BACKEND_ENV_VAR)
        fix = case_hint(value) or "; set it to auto, cupy or host, or unset it"
        raise UsageError(f"{BACKEND_ENV_VAR}={value!r} is not a backend{fix}") from None
    # demo and bench time device work; on host threads that time is the model's.
    modelled = command in ("demo", "bench")
    if name == "host":
        why = "--backend host" if requested == "host" else f"{BACKEND_ENV_VAR}=host"
        what = f"no GPU used; {MODELLED}." if modelled else "host threads, no GPU used."
        return "host", f"Host backend ({why}): {what}"
    problem = gpu_problem()
    if problem is not None:
        if name == "cupy":
            asked = "--backend cupy" if requested == "cupy" else f"{BACKEND_ENV_VAR}=cupy"
            raise UsageError(f"{asked} needs a usable GPU: {problem}; {_TO_HOST}")
        # The full detail is in `cupystreams info`; the first line stays short.
        what = f"; {MODELLED}." if modelled else " (host threads)."
        return "host", f"No usable GPU ({problem.summary}): running on the host backend{what}"
    backend = make_backend("cupy", None)
    from ._bench.info import device_name

    return "cupy", f"GPU {backend.device}: {device_name(backend.device)} (cupy backend)."


def _check_extra(command: str) -> None:
    missing = [name for name in _NEEDS[command] if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"needs the cli extra ({', '.join(missing)} not installed): "
            f"pip install 'cupystreams[cli]'"
        )


def _check_writable(flag: str, path: str, what: str, suffix: str) -> None:
    """Fail now, not after minutes of work, if ``path`` cannot take the file."""
    target = Path(path)
    if target.suffix.lower() != suffix:
        raise UsageError(f"{flag} {path}: {what}; name a file ending in {suffix}")
    if target.is_symlink():
        target = target.resolve()  # checked where it leads
    if target.exists() and not (target.is_file() or target.is_dir()):
        raise UsageError(f"{flag} {path}: not a regular file; name a file ending in {suffix}")
    parent = target.parent
    if not parent.exists():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a directory; name a path in one")
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; name a file ending in {suffix}")
    if not os.access(parent, os.W_OK | os.X_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise UsageError(f"{flag} {path}: permission denied; name a path you can write")


@contextlib.contextmanager
def _writing(flag: str, path: str) -> Iterator[None]:
    """A write that fails despite the checks (a full disk, a directory removed
    meanwhile) becomes a UsageError; other errors pass through."""
    try:
        yield
    except OSError as exc:
        if exc.filename != path:
            raise
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from exc


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="cupystreams", description="A CUDA stream and event pool: demo, benchmarks, info."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    demo.add_argument(
        "--output",
        default="timeline.png",
        metavar="FILE",
        help="the timeline to write, a .png in an existing directory (default: %(default)s)",
    )
    bench = commands.add_parser("bench", help="the benchmark suite with its peers")
    backend_flag(bench)
    bench.add_argument("--quick", action="store_true", help="fewer repeats")
    bench.add_argument(
        "--json", metavar="FILE", help="also write the results to FILE, a .json file"
    )
    info = commands.add_parser("info", help="device, limits, versions, usable adapters")
    backend_flag(info)
    return parser


def _info(console: Console, backend: str) -> None:
    from rich.table import Table
    from rich.text import Text

    from ._bench.info import collect_info

    table = Table(show_header=False, box=None)
    for field, value in collect_info(backend):
        # Text, not str: a value such as "cupystreams[cuda12]" is not markup.
        table.add_row(Text(field), Text(value))
    console.print(table)


def _run(args: argparse.Namespace, backend: str, line: str) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(line, soft_wrap=True, markup=False)
    if args.command == "demo":
        from ._bench.demo import run_demo

        with _writing("--output", args.output):
            run_demo(console, backend, args.quick, args.output)
    elif args.command == "bench":
        from ._bench.suite import run_bench, write_json

        results = run_bench(console, backend, args.quick)
        if args.json is not None:
            with _writing("--json", args.json):
                write_json(args.json, results, backend, args.quick)
            console.print(f"results written to {args.json}", soft_wrap=True, markup=False)
    else:
        _info(console, backend)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cupystreams`` script; returns the exit status.

    A mistake in the command line, its environment or the files it names
    exits with status 2 and one line on stderr, before any work runs.
    """
    args = _parser().parse_args(argv)
    try:
        _check_extra(args.command)
        if args.command == "demo":
            _check_writable("--output", args.output, "the timeline is a PNG", ".png")
        elif args.command == "bench" and args.json is not None:
            _check_writable("--json", args.json, "the results are JSON", ".json")
        backend, line = choose_backend(args.backend, args.command)
        _run(args, backend, line)
    except UsageError as exc:
        # One line: the message may carry a driver's or the OS's own text.
        message = " ".join(str(exc).splitlines())
        print(f"cupystreams {args.command}: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
