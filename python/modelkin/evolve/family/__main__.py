"""``python -m modelkin.evolve.family MODEL [--split search|test]``: prints the task scores as JSON,
the contract of a command evaluator."""

from __future__ import annotations

import argparse
import json

from . import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m modelkin.evolve.family")
    parser.add_argument("model")
    parser.add_argument("--split", default="search", choices=["search", "test"])
    args = parser.parse_args()
    print(json.dumps(evaluate(args.model, args.split)))


if __name__ == "__main__":
    main()
