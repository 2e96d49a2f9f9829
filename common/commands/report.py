"""``fedphd report``: Markdown report and plots of finished runs
(:mod:`fedphd.common.quality.report` does the work)."""

from __future__ import annotations

import argparse
import sys

from fedphd.common.commands.cli import add_config_args
from fedphd.common.quality.report import ReportError, write_report


def run(args: argparse.Namespace) -> int:
    try:
        report = write_report(args.runs, args.out)
    except ReportError as error:
        print(f"fedphd report: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report",
        help="Markdown report and plots (loss, FD/FID, bytes per link) for finished runs",
        description="Read the metrics.jsonl (and config.toml, summary.json) of one or more run "
        "folders and write report.md with loss, sample-quality and cumulative-bytes plots; "
        "several runs are compared on the same axes.",
    )
    add_config_args(parser)  # like every sub-command; each run's own config.toml is what counts
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders of `fedphd launch`")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for report.md and the PNG plots")
    parser.set_defaults(run=run)
