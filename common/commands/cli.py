"""The ``fedphd`` command line: one program, one sub-command per job.

Sub-commands are found through the ``fedphd.commands`` entry points declared in
pyproject.toml, so this module never imports a role package (cloud, edge, client) itself.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version

from fedphd.common.settings.config import ConfigError, RunConfig, load_config
from fedphd.common.settings.logs import configure_logging
from fedphd.common.settings.topology import parse_address, parse_addresses

COMMAND_GROUP = "fedphd.commands"
# The roles' address flags (argparse dest -> flag, whether it takes a comma list). Checked
# here, before any command runs, so a typo costs one line instead of a data set load and
# then Flower's own multi-line message that never names the flag.
ADDRESS_FLAGS: dict[str, tuple[str, bool]] = {
    "server": ("--server", True),
    "cloud": ("--cloud", False),
    "listen": ("--listen", False),
    "advertise": ("--advertise", False),
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The options every sub-command shares: one TOML file plus overrides."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML run configuration (default: the packaged offline default: digits, "
        "tiny U-Net, 1 cloud, 2 edges, 4 clients)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set topology.clients=8 (repeatable; values "
        "are read as TOML: numbers, true/false, [lists], \"strings\")",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def installed_version() -> str:
    try:
        return version("fedphd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedphd",
        description="Federated training of diffusion U-Nets across cloud, edge and client "
        "processes over Flower's gRPC transport.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"fedphd {installed_version()}",
                        help="print the installed version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        entry.load()(commands)
    return parser


def check_address_flags(args: argparse.Namespace) -> None:
    """Raise ``ConfigError`` naming the flag and the value of the first bad address given."""
    for dest, (flag, many) in ADDRESS_FLAGS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str):
            (parse_addresses if many else parse_address)(value, flag)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_address_flags(args)
    except ConfigError as error:
        print(f"fedphd {args.command}: {error}", file=sys.stderr)
        return 2  # argparse's code for a bad command line
    # After build_parser: loading the sub-commands imported Flower, whose handler goes here.
    configure_logging(verbose=args.verbose)
    from fedphd.common.data.datasets import (
        DatasetNotFoundError,  # heavy (torch): only once a command runs
    )
    from fedphd.common.wire.limits import keep_buffers_for_reuse

    keep_buffers_for_reuse()  # before any model or message is allocated

    try:
        return int(args.run(args) or 0)
    except (ConfigError, DatasetNotFoundError) as error:
        print(f"fedphd {args.command}: {error}", file=sys.stderr)
        return 2
    except ConnectionError as error:
        print(f"fedphd {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedphd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
