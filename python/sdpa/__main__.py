"""Command line: `python -m sdpa demo | bench | config` (`python -m sdpa --help`)."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdpa",
        description="sdpa: flash-style scaled dot-product attention for NumPy on the CPU.",
        epilog="`python -m sdpa COMMAND --help` describes each command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="self-attention over three tokens, step by step, checked against the reference",
        description="Self-attention over three tokens ('The cat sat', 3-dim embeddings, seeded "
        "projections): prints Q, K, V, the attention weights and the output, and checks them "
        "against sdpa.reference.",
    )
    demo.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the attention weights as a heatmap into FILE.png "
        '(needs matplotlib: pip install "sdpa[plot]")',
    )
    # The bench parses its own options (python -m sdpa bench --help lists them).
    commands.add_parser(
        "bench",
        add_help=False,
        help="time the benchmark suite against naive NumPy and PyTorch (see bench --help)",
    )
    commands.add_parser(
        "config",
        help="print the version, kernel variant (ISA), threads and build flags",
        description="Print sdpa's version, the active kernel variant (ISA) and the ones this "
        "build and CPU offer, the thread count, the compiler flags and the CPU features; the "
        "same table as sdpa.show_config().",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from ._bench import main as bench

        return bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from ._demo import main as demo

        return demo(plot=args.plot)
    from ._config import show_config

    show_config()
    return 0


if __name__ == "__main__":
    sys.exit(main())
