"""``python -m console [--url U] [--device-url D] [--admin-key K]``: the Textual operator console.

It talks to the operator plane (--url); the simulator it starts sends heartbeats to the device
plane (--device-url)."""

from __future__ import annotations

import argparse
import shlex
import sys

from config.admin_key import admin_key_path
from config.settings import Settings
from console.sources.simulator import DEFAULT_COMMAND


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the console until the operator quits."""
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="python -m console", description="NexMDM operator console.")
    parser.add_argument("--url", default=settings.operator_url,
                        help="the operator plane (default: http://ADMIN_HOST:ADMIN_PORT from the environment)")
    parser.add_argument("--device-url", default=None,
                        help="the device plane, for the simulator (default: http://HOST:PORT from the "
                             "environment; --url when SPLIT_PLANES=false)")
    parser.add_argument("--admin-key", default=None,
                        help="the operator key (default: ADMIN_KEY, else the development key under var/)")
    parser.add_argument("--poll-interval", type=float, default=1.0, metavar="S", help="seconds between polls")
    parser.add_argument("--simulator-cmd", default=shlex.join(DEFAULT_COMMAND),
                        help="how to run the simulator (default: %(default)s)")
    parser.add_argument("--no-local-server", action="store_true",
                        help="never offer to start a local server when none answers")
    args = parser.parse_args(argv)
    key_file = admin_key_path(settings)
    admin_key = args.admin_key or settings.admin_key
    if not admin_key and key_file.exists():
        admin_key = key_file.read_text().strip()

    from console.app import ConsoleApp  # Textual is imported only when the console really runs

    app = ConsoleApp(
        args.url, admin_key,
        device_url=args.device_url or settings.device_url,
        poll_interval_s=max(0.2, args.poll_interval),
        output_dir=settings.var_dir / "console",
        simulator_command=shlex.split(args.simulator_cmd),
        admin_key_file=key_file,
        offer_local_server=not args.no_local_server,
    )
    try:
        app.run()
    finally:
        app.stop_children()
    return 0


if __name__ == "__main__":
    sys.exit(main())
