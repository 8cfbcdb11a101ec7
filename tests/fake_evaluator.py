"""A command-line evaluator for the tests: prints hashed scores of a model as JSON.

Options make it misbehave on purpose (sleep, hang on merged models, print no JSON or NaN, fail), and
--log records each evaluation's start and end, so tests can count what was evaluated."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evolve_support import hashed_scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--split", default="search")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--log")
    parser.add_argument("--mode", default="ok", choices=["ok", "hang-merged", "no-json", "nan", "fail", "extra-task"])
    args = parser.parse_args()
    merged = f"{os.sep}models{os.sep}" in args.model
    if args.log:
        with open(args.log, "a") as log:
            log.write(f"start {args.model} {args.split}\n")
    if args.mode == "hang-merged" and merged:
        time.sleep(60)
    time.sleep(args.sleep)
    scores = hashed_scores(args.model, args.split)
    if args.mode == "no-json" and merged:
        print("evaluation finished, no numbers today")
        return
    if args.mode == "nan" and merged:
        scores["alpha"] = float("nan")
    if args.mode == "fail" and merged:
        print("out of GPU memory", file=sys.stderr)
        sys.exit(3)
    print("progress: 100%")
    print(json.dumps(scores))
    if args.log:
        with open(args.log, "a") as log:
            log.write(f"end {args.model} {args.split}\n")


if __name__ == "__main__":
    main()
