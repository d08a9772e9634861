"""Command line: ``python -m opsd_kit.cli train --profile tiny --algorithm opsd --set max_steps=5``.

Runs under ``accelerate launch -m opsd_kit.cli train ...`` for several processes.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import ALGORITHMS


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, true, null)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opsd_kit")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with OPSD or a baseline")
    t.add_argument("--profile", default="tiny")
    t.add_argument("--algorithm", default="opsd", choices=ALGORITHMS)
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)

    from .config import load_profile
    from .trainer import train

    config = load_profile(args.profile, args.algorithm, **parse_overrides(args.set))
    result = train(config)
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps,
                      "interrupted": result.interrupted, "ledger": result.ledger}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
