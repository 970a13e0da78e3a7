"""Command line: `python -m sdpa demo | bench | config`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m sdpa {demo,bench,config} [options]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from ._demo import main as demo

        return demo()
    if command == "bench":
        from ._bench import main as bench

        return bench(rest)
    if command == "config":
        from ._config import show_config

        show_config()
        return 0
    print(f"unknown command {command!r}; {usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
