"""The `synomaly` command: a thin layer over the engine's functions, one module per group of sub-commands.

argparse lives only in this package. `python -m synomaly.cli` and the `synomaly` console script both run `main`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from ..contract import ERROR_PREFIX, EXIT_FAILED, EXIT_INPUT, EXIT_MODEL, __version__
from ..errors import Cancelled, SynomalyError
from . import cohorts, data, detection, models, training

__all__ = ["build_parser", "main"]

#: Command modules of the research layer (datasets, evaluation), by the sub-commands they add: installed with
#: the pip package, not into Slicer (SynomalyDetect/CMakeLists.txt). Imported only when the parser is built,
#: and only where they are present; elsewhere their commands answer with RESEARCH_MISSING.
RESEARCH_COMMANDS = {"preparation": ("prepare",), "evaluation": ("evaluate",), "benchmarks": ("bench-authors",)}
RESEARCH_MISSING = ("`synomaly {command}` is not installed here: the research modules (datasets, evaluation) "
                    "come with the pip package (pip install synomaly), not with the Slicer extension")


def _install_signal_handlers() -> None:
    """Turn SIGTERM into KeyboardInterrupt so every command cleans up the same way."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    # A process started in the background by a non-interactive shell inherits SIGINT as ignored, and
    # Python then leaves it ignored; a program (or a person) that interrupts us must still stop us.
    signal.signal(signal.SIGINT, handler)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    p = argparse.ArgumentParser(prog="synomaly", description="Unsupervised anomaly detection with Synomaly noise "
                                "and multi-stage diffusion. Research use only; not for diagnosis.")
    p.add_argument("--version", action="version", version=f"synomaly {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (training, detection, cohorts, models, data):
        group.add_parsers(sub)
    for module, commands in RESEARCH_COMMANDS.items():
        try:
            group = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("synomaly."):
                raise
            for command in commands:
                _add_missing_command(sub, command)
        else:
            group.add_parsers(sub)
    return p


def _add_missing_command(sub, command: str) -> None:
    """A sub-command whose module is not installed: it takes any arguments and fails with RESEARCH_MISSING."""

    def missing(args) -> int:
        raise SynomalyError(RESEARCH_MISSING.format(command=command))

    # no option prefix: `--help` and every option land in `arguments`, so each call gets the message
    p = sub.add_parser(command, help="(not installed here: pip install synomaly)", add_help=False, prefix_chars="\0")
    p.add_argument("arguments", nargs="*")
    p.set_defaults(func=missing)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command, turning errors into messages and exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _install_signal_handlers()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("synomaly: interrupted; nothing was written", file=sys.stderr)
        return Cancelled.exit_code
    except SynomalyError as exc:
        print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # model file problems and the like come with their own messages
        from ..modelio import ModelFileError

        if isinstance(exc, ModelFileError):
            print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
            return EXIT_MODEL
        if isinstance(exc, RuntimeError) and "device" in str(exc) and "requested" in str(exc):
            print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)  # an unavailable --device
            return EXIT_INPUT
        if args.verbose:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"{ERROR_PREFIX} unexpected {type(exc).__name__}: {first} (run with --verbose for the details)",
              file=sys.stderr)
        return EXIT_FAILED


