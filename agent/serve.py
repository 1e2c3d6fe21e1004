"""`unplugd serve`: run the agent's gRPC service until SIGTERM.

A command, beside cli.py and capture.py: only the command line (config,
logging, signals, sd_notify) lives here, and it imports grpc only when it
runs, so `unplugd inspect` does not pay for it. What it runs is assembled
by agent/rpc/server.py (AgentServer: engine, watcher, leases, health,
reflection, and the transports hook `start_bridges(config, backend)`).
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from unplugd.agent.lazylog import Logger
from unplugd.helpformat import HelpFormatter, RawDescriptionHelpFormatter

__all__ = ["add_serve_parser", "main", "run_serve"]

log = Logger(__name__)  # `unplugd inspect` imports this module: no logging import (lazylog)


def add_serve_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the agent's gRPC service",
        description="Serve AgentService on a root-only unix socket (and the transports the config enables).",
        epilog="""\
examples:
  unplugd serve --log-format text                  in a terminal, the log on stderr
  unplugd serve --config ./test.toml --socket /tmp/unplugd/agent.sock

It serves until SIGTERM or SIGINT, then exits 0. A configuration file that
cannot be read or states something invalid exits 2 with one line naming the
file and the key; a socket or transport that cannot be set up exits 1.
""",
        formatter_class=RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="configuration file (default /etc/unplugd/config.toml if present)",
    )
    p.add_argument(
        "--socket", type=Path, default=None, metavar="PATH", help="unix socket path (overrides [server] socket)"
    )
    p.add_argument(
        "--enable-mutations",
        action="store_true",
        help="allow PrepareUnplug/ReleaseUnplug (overrides [mutations] enabled)",
    )
    p.add_argument(
        "--log-format",
        choices=("journal", "text"),
        default=None,
        help="journal (structured, for systemd) or text; default: journal under systemd",
    )
    p.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)  # serve a captured tree (tests)
    # `run` is what agent/cli.py dispatches on; `func` serves main() below.
    p.set_defaults(func=run_serve, run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import logging  # here, not at the top: `unplugd inspect` imports this module for its parser
    import threading

    from unplugd.agent.config import ConfigError, load_config
    from unplugd.agent.daemon.footprint import import_asyncio_without_ssl, one_malloc_arena, release_free_heap
    from unplugd.agent.daemon.logs import sd_notify, setup_logging
    from unplugd.agent.exitcodes import Exit
    from unplugd.agent.roots import Roots

    one_malloc_arena()  # before any thread: per-thread arenas keep what they held (daemon/footprint.py)
    import_asyncio_without_ssl()  # before grpc, whose cygrpc imports asyncio: ~4 MiB of RSS (daemon/footprint.py)
    from unplugd.agent.rpc.server import AgentServer, ServeError

    setup_logging(args.log_format, level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    try:
        config = load_config(args.config).with_overrides(socket=args.socket, enable_mutations=args.enable_mutations)
    except ConfigError as exc:
        log.error("bad configuration", extra={"error": str(exc)})
        return Exit.USAGE
    roots = Roots.under(args.root) if getattr(args, "root", None) else Roots.live_system()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = AgentServer(config, roots=roots)
    try:
        server.start()
    except (ServeError, OSError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        server.stop(grace=0)
        return Exit.FAILURE
    release_free_heap()  # what start-up freed below live chunks: ~3 MiB of the idle RSS (daemon/footprint.py)
    sd_notify("READY=1\nSTATUS=serving on " + str(server.socket_path))
    try:
        while not stop.wait(3600):
            pass
    finally:
        sd_notify("STOPPING=1")
        server.stop()
    return Exit.OK


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m unplugd.agent.serve`: the serve command on its own."""
    parser = argparse.ArgumentParser(prog="unplugd", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
