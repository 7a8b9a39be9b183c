"""Mirror-image test-time augmentation for finished fine-tunings, decided on validation, reported on test.

For each fine-tuning directory: top-1 of its selected classifier on its own validation split without and with
horizontal-flip averaging (``leanmim.eval.finetuned.evaluate_finetuned``); the protocol with the higher validation top-1
is chosen (a tie keeps the plain one), and only then is the test split evaluated, once, with the chosen protocol.

    python benchmarks/flip_tta.py runs/finetune_recipes/NAME [more fine-tuning directories]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from leanmim.config import ConfigError
from leanmim.data import DataError
from leanmim.eval.finetuned import evaluate_finetuned


def decide_and_report(path: Path) -> dict:
    started = time.perf_counter()
    plain_val, flip_val = evaluate_finetuned(path, "val", hflip=False), evaluate_finetuned(path, "val", hflip=True)
    chosen = "hflip" if flip_val > plain_val else "plain"
    test = evaluate_finetuned(path, "test", hflip=chosen == "hflip")
    return {"finetuning": str(path), "val_top1_plain": plain_val, "val_top1_hflip": flip_val, "chosen": chosen,
            "test_top1_chosen": test, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finetunings", nargs="+", type=Path, help="fine-tuning output directories")
    parser.add_argument("--results", type=Path, help="write flip_tta.{md,json} into this folder")
    args = parser.parse_args()
    rows = []
    for path in args.finetunings:
        try:
            rows.append(decide_and_report(path))
        except (ConfigError, DataError) as error:   # one line, exit 2, as the CLI and the other benchmark scripts
            print(f"flip_tta.py: error: {error}", file=sys.stderr)
            sys.exit(2)
        row = rows[-1]
        print(f"{path}: val {100 * row['val_top1_plain']:.2f} plain / {100 * row['val_top1_hflip']:.2f} hflip -> "
              f"{row['chosen']}, test {100 * row['test_top1_chosen']:.2f} %", flush=True)
    if args.results:
        lines = ["# Mirror-image test-time augmentation, decided on validation", "",
                 f"`python benchmarks/flip_tta.py {' '.join(sys.argv[1:])}`. Validation top-1 of each fine-tuning's "
                 "selected checkpoint without and with flip averaging; the higher one is chosen, then the test split "
                 "is evaluated once with it.", "",
                 "| fine-tuning | val plain | val hflip | chosen | test (chosen) |", "|---|---:|---:|---|---:|"]
        lines += [f"| {row['finetuning']} | {100 * row['val_top1_plain']:.2f} | {100 * row['val_top1_hflip']:.2f} | "
                  f"{row['chosen']} | {100 * row['test_top1_chosen']:.2f} |" for row in rows]
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "flip_tta.md").write_text("\n".join(lines) + "\n")
        (args.results / "flip_tta.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
