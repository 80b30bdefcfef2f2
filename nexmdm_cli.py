"""``nexmdm``: the installed command; each sub-command is one of the ``python -m`` tools.

``nexmdm serve`` runs the service (``python -m api serve``), ``nexmdm db|scheduler|simulate|console
ARGS`` pass ARGS to ``python -m db|scheduler|simulator|console``, and ``nexmdm keys ARGS`` to
``python -m api keys`` (operator keys) where that command exists.
"""

from __future__ import annotations

import importlib
import sys

# sub-command -> (module whose main(argv) runs it, words put before the user's arguments)
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "serve": ("api.__main__", ["serve"]),
    "keys": ("api.__main__", ["keys"]),
    "db": ("db.__main__", []),
    "scheduler": ("scheduler.__main__", []),
    "simulate": ("simulator.__main__", []),
    "console": ("console.__main__", []),
}

USAGE = "usage: nexmdm {" + "|".join(COMMANDS) + "} [ARGS...]  (nexmdm COMMAND --help for each)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the sub-command's ``main``; Ctrl-C ends with status 130 and no traceback."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"nexmdm: unknown command {args[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    module_name, prefix = COMMANDS[args[0]]
    try:
        return int(importlib.import_module(module_name).main([*prefix, *args[1:]]) or 0)
    except KeyboardInterrupt:
        print("nexmdm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
