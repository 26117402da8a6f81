"""The `p2pdist` command: scheduler, seed and peer services, the `get` client, and `preheat`.

Whatever ends it is one line on stderr: exit 2 for unusable input (flags, config), 1 for a
failure at run time (a port taken, a data dir unusable, a transfer failed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from p2pdist.errors import P2PError

USAGE_EXIT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    from importlib import metadata  # scans the installed packages: only when asked

    try:
        return metadata.version("p2pdist")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_get_arguments(get: argparse.ArgumentParser) -> argparse.ArgumentParser:
    get.add_argument("url", help="http(s)://REGISTRY/v2/NAME/blobs/sha256:...")
    get.add_argument("-o", "--output", required=True, help="file to write")
    get.add_argument("--peer", default="http://127.0.0.1:4001", help="the local peer daemon's proxy URL")
    get.add_argument("--user", help="USER:PASSWORD for the registry (passed to it, never stored)")
    get.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for the whole download")
    get.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return get


GET_HELP = "download one blob URL through the local peer daemon"


def get_parser() -> argparse.ArgumentParser:
    """`p2pdist get`'s flags alone, the same as in the full parser: building that one (every
    service's config flags, the package version) took 0.12 s of a 1 s download."""
    parser = OneLineParser(prog="p2pdist get", description=GET_HELP)
    add_get_arguments(parser)
    parser.set_defaults(command="get")
    return parser


def build_parser() -> argparse.ArgumentParser:
    from p2pdist import config as cfg

    parser = OneLineParser(prog="p2pdist", description="Peer-to-peer distribution of container image blobs.")
    parser.add_argument("--version", action="version", version=f"p2pdist {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    cfg.add_flags(sub.add_parser("scheduler", help="run the scheduler (control plane)"), cfg.SchedulerConfig)
    cfg.add_flags(sub.add_parser("seed", help="run a seed peer (fetches from the origin)"), cfg.SeedConfig)
    cfg.add_flags(sub.add_parser("peer", help="run the peer daemon on this host"), cfg.PeerConfig)
    add_get_arguments(sub.add_parser("get", help=GET_HELP, description=GET_HELP))
    pre = sub.add_parser("preheat", help="put an image's blobs on the seeds or peers before a rollout")
    pre.add_argument("image", help="REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:DIGEST")
    pre.add_argument("--scheduler", default="http://127.0.0.1:8002", help="the scheduler's URL")
    pre.add_argument(
        "--platform", action="append", default=[], help="OS/ARCH of an index to preheat (repeat; default: all)"
    )
    pre.add_argument(
        "--scope",
        choices=("seeds", "all-seeds", "peers"),
        default="seeds",
        help="one seed, every seed, or peers (default: seeds)",
    )
    share = pre.add_mutually_exclusive_group()
    share.add_argument("--percentage", type=int, help="with --scope peers: this percentage of the peers")
    share.add_argument("--count", type=int, help="with --scope peers: this many peers")
    pre.add_argument(
        "--user",
        help="USER:PASSWORD for the registry, used for this job only (or a Bearer token in $P2PDIST_REGISTRY_TOKEN)",
    )
    pre.add_argument("--plain-http", action="store_true", help="the registry speaks HTTP, not HTTPS")
    pre.add_argument("--wait", action="store_true", help="follow the job to its end with a progress bar")
    pre.add_argument("--timeout", type=float, default=1800.0, help="seconds the job may take (default: 1800)")
    pre.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from p2pdist.cli import mirrorconfig, status

    status.add_arguments(
        sub.add_parser("status", help="what the cluster (from the scheduler) or one host (--peer) holds and does")
    )

    mirrorconfig.add_arguments(
        sub.add_parser(
            "mirror-config", help="print or install the containerd/docker settings that pull through the peer"
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    # `get` is timed against curl: it parses its own flags without the services' config.
    parser = get_parser() if given[:1] == ["get"] else build_parser()
    args = parser.parse_args(given[1:] if given[:1] == ["get"] else given)
    try:
        return _run(args)
    except (P2PError, OSError) as exc:
        print(f"p2pdist {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, P2PError) else 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    # The clients first: the services' imports (trio, prometheus, the servers) cost `get`
    # 0.3 CPU-s it does not need.
    if args.command == "get":
        from p2pdist.cli.get import get

        get(args.url, args.output, args.peer, user=args.user, timeout_s=args.timeout, quiet=args.quiet)
        return 0
    if args.command == "preheat":
        from p2pdist.cli.preheat import preheat

        preheat(
            args.image,
            args.scheduler,
            platforms=args.platform,
            scope=args.scope,
            percentage=args.percentage,
            count=args.count,
            user=args.user,
            plain_http=args.plain_http,
            wait=args.wait,
            timeout_s=args.timeout,
            quiet=args.quiet,
        )
        return 0
    if args.command == "status":
        from p2pdist.cli import status

        return status.run(args)
    if args.command == "mirror-config":
        from p2pdist.cli import mirrorconfig

        return mirrorconfig.run(args)
    from p2pdist import config as cfg
    from p2pdist.node.endpoints import run_service, setup_logging

    classes: dict[str, Any] = {"scheduler": cfg.SchedulerConfig, "seed": cfg.SeedConfig, "peer": cfg.PeerConfig}
    cls = classes[args.command]
    config = cfg.load(cls, args.config, cfg.flag_overrides(args, cls))
    setup_logging(config.log_level)
    log_effective_config(args.command, config)
    if config.cluster_secret is None:
        import logging

        logging.getLogger(f"p2pdist.{args.command}").warning(
            "no cluster secret: anyone who reaches this %s's ports can register tasks, announce "
            "hosts and read pieces; set cluster_secret (or %s) on every member",
            args.command,
            cfg.CLUSTER_SECRET_ENV,
        )
    if args.command == "scheduler":
        from scheduler.service import serve as serve_scheduler

        return run_service(serve_scheduler, config, args.command)
    if args.command == "seed":
        from seed.daemon import serve as serve_seed

        return run_service(serve_seed, config, args.command)
    from peer.daemon import serve as serve_peer

    return run_service(serve_peer, config, args.command)


def log_effective_config(role: str, config: object) -> None:
    """One line with every setting in force (secrets only as set/unset), so an operator sees
    what a flag, the file and the defaults came to."""
    import logging

    from p2pdist import config as cfg

    logging.getLogger(f"p2pdist.{role}").info("p2pdist %s %s: %s", version(), role, cfg.describe(config))


if __name__ == "__main__":
    sys.exit(main())
