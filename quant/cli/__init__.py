"""Command line: argument parsing only. Each command group lives in its own module and calls a library function.

Every subcommand module exposes `register(subparsers)`, which adds its parser and sets `handler` to a function
taking the parsed namespace. Library code is imported inside handlers so `quant --help` stays fast and works
without optional backends.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from quant import __version__
from quant.errors import FileAccessError, QuantError

log = logging.getLogger(__name__)

COMMAND_MODULES = ("spec_commands", "export", "calibrate", "cache", "inspect", "build", "evaluate", "bench", "run",
                   "search", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quant",
        description="Turn trained speech models into FP32/FP16/INT8 artifacts for ONNX Runtime and TensorRT, "
        "calibrated on real speech, and measure what each precision costs and buys.",
    )
    parser.add_argument("--version", action="version", version=f"quant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"quant.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # quant's progress at INFO; other libraries only warnings (ONNX Runtime's quantizer logs one INFO line per tensor
    # it leaves unquantized on the root logger: noise, not news); -v shows everything
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    logging.getLogger("quant").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.handler(args) or 0)
    except QuantError as error:
        return _fail(args.command, str(error), error)
    except OSError as error:
        # Last resort for file errors the library did not convert where it knew the path: still one line naming the
        # file (OSError carries it). Any other exception is a bug and keeps its traceback.
        return _fail(args.command, str(FileAccessError.from_os_error(error, "use")), error)
    except KeyboardInterrupt:
        print(f"quant {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(command: str, message: str, error: BaseException) -> int:
    log.debug("traceback of the error below", exc_info=error)
    one_line = " ".join(message.split())  # even when a wrapped library message (torch, onnx) spans several lines
    print(f"quant {command}: error: {one_line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
