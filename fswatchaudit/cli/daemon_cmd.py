"""`daemon`: run as a service (service/daemon.py), or only check its configuration."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import EXIT_USAGE
from ..service import config as config_mod
from ..service.daemon import Daemon, check


def cmd_daemon(args: argparse.Namespace) -> int:
    if args.check:
        return check(args.config)
    if os.geteuid() != 0:
        print("fswatchaudit: the daemon must run as root", file=sys.stderr)
        return EXIT_USAGE
    return Daemon(args.config).run()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "daemon", help="run as a service: rules.d, msgpack logs, control socket",
        description="Audit the rules of rules.d into rotated msgpack logs until SIGTERM. "
                    "SIGHUP reloads the configuration and rules.d, SIGUSR1 rotates the log. "
                    "Control it with `fswatchaudit ctl`.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"configuration file (default: {config_mod.DEFAULT_PATH} if it "
                        "exists, else the built-in defaults)")
    p.add_argument("--check", action="store_true",
                   help="only validate the configuration and rules.d, then exit "
                        "(0 valid, 2 not)")
    p.set_defaults(func=cmd_daemon)
