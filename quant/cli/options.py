"""argparse `type=` checks shared by the commands: a bad value stops the command at parse time (exit 2, the option
named), before any work, instead of meaning something else (`--limit 0` as "all") or failing minutes later."""

from __future__ import annotations

import argparse
import math
import re


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts: --limit, --batch-size, --threads, --runs...)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (where 0 has a documented meaning, e.g. `cache diff --top 0`: all rows)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


def positive_int_list(text: str) -> tuple[int, ...]:
    """A comma list of whole numbers >= 1, e.g. `--threads 1,2`."""
    values = tuple(positive_int(part.strip()) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of whole numbers, e.g. 1,2")
    return values


def percentile(text: str) -> float:
    """A percentile in (0, 100], the range quant.calib.histogram.percentile_amax accepts."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 100):
        raise argparse.ArgumentTypeError(f"{value:g} is outside (0, 100]; e.g. 99.99")
    return value


def version_digits(text: str) -> str:
    """TensorRT version as the cache header writes it: ASCII digits only, e.g. 8601 or 101300."""
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a version in digits only, e.g. 8601 (TensorRT 8.6.1) or "
                                         "101300 (10.13.0)")
    return text


def rewrite_list(text: str) -> tuple[str, ...]:
    """A comma list of graph rewrites (quant.spec.Rewrite), e.g. `--rewrites deconv-to-conv,split-concat-conv`."""
    from typing import get_args

    from quant.spec import Rewrite

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    known = get_args(Rewrite)
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)}: not a graph rewrite; known: "
                                         f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a rewrite twice")
    return names


def _int(text: str) -> int:
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):  # int() would also take "1_000" and non-ASCII digits
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)
