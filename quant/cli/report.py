"""`quant report`: render results.md, results.csv, tradeoff.png and report.html again from a results.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report", help="render results.md/.csv, tradeoff.png and report.html from a results.json",
        description="Regenerate the report files of a run from its results.json and the artifacts it names "
        "(build meta.json, calibration caches); report.html is one self-contained page, viewable offline.",
    )
    parser.add_argument("results", type=Path, metavar="RESULTS.json", help="results.json written by `quant run`")
    parser.add_argument("-o", "--output", type=Path, help="folder for the report files (default: beside RESULTS.json)")
    parser.add_argument("--no-examples", action="store_true",
                        help="leave out the enhanced-example spectrograms (they re-run the SE artifacts on one "
                        "short utterance)")
    parser.set_defaults(handler=report)


def report(args: argparse.Namespace) -> int:
    from quant.report import HtmlOptions, load_results, render

    results = load_results(args.results)
    paths = render(results, args.output or args.results.parent, HtmlOptions(examples=not args.no_examples))
    for _, path in sorted(paths.items()):
        print(f"wrote {path}")
    return 0
