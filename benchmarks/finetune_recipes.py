"""The fine-tuning recipe search on Fashion-MNIST: every configuration tried, not just the winner.

Each configuration is a name and the ``leanmim finetune`` options it adds to the common ones; it runs
through the real CLI (``python -m leanmim finetune RUN --out WORK/NAME ... --json``), so what is measured is
exactly what a user gets. Selection is on the validation split carved from the training split (10 % of each
class, seeded); the test split is evaluated once for the selected epoch and once for the last, and the table
reports both. The wall time of each fine-tune is the subprocess's, start-up and evaluation included, and the
JSON records how many threads it had and whether another job shared the machine (``--shared``).

One result file per configuration (``WORK/NAME.json``): an interrupted search, started again, redoes nothing
that finished (and a half-finished fine-tune resumes from its own checkpoints). A configuration stopped by hand
is kept as ``WORK/NAME.json`` with ``stopped_after_epoch``, its validation history read from its metrics.csv
and no test figures (no test pass was run for it). ``--table`` collects every
result under WORK into ``--results``/finetune_recipes.{json,md}.

    python benchmarks/finetune_recipes.py --run runs/demo-mae --config "tokens-lr1e-3: --pool tokens --base-lr 1e-3"
    python benchmarks/finetune_recipes.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("selected_epoch", "selected_val_top1", "selected_test_top1", "last_val_top1", "last_test_top1",
        "global_step", "num_train", "num_val", "num_test", "train_seconds_this_session")


def log(message: str) -> None:
    print(f"[finetune_recipes {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_config(text: str) -> tuple[str, str]:
    """``"NAME: OPTIONS"`` -> (NAME, OPTIONS); NAME becomes a folder and a file name under --work."""
    name, colon, options = text.partition(":")
    name = name.strip()
    if not colon or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME: OPTIONS (e.g. \"tokens: --pool tokens\")")
    if not all(char.isalnum() or char in "._-" for char in name) or name.startswith("."):
        raise argparse.ArgumentTypeError(f"configuration name {name!r} must be letters, digits, '.', '_' or '-' "
                                         "(it names a folder and a file under --work)")
    try:
        shlex.split(options)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"options of {name!r} cannot be split like a shell line: {error}") from None
    return name, options.strip()


def run_config(args: argparse.Namespace, name: str, options: str) -> dict:
    path = args.work / f"{name}.json"
    if path.exists():
        done = json.loads(path.read_text())
        if (done.get("options"), done.get("run")) != (options, str(args.run)):
            print(f"finetune_recipes.py: error: configuration '{name}' was run before with --run {done.get('run')} "
                  f"and options '{done.get('options')}': give '{options}' on {args.run} another name", file=sys.stderr)
            sys.exit(2)
        log(f"{name}: done before ({path})")
        return done
    command = [sys.executable, "-m", "leanmim", "finetune", str(args.run), "--out", str(args.work / name),
               "--no-progress-bar", "--json", *shlex.split(options)]
    log(f"{name}: {' '.join(command[2:])}")
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed (exit {completed.returncode}): {completed.stderr.strip().splitlines()[-1:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    entry = {"name": name, "options": options, "run": str(args.run), **{key: result.get(key) for key in KEYS},
             "history": result.get("history"), "settings": result.get("settings"),
             "wall_seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": os.environ.get("OMP_NUM_THREADS", "all"),
             "shared_machine": args.shared, "machine": f"{platform.processor() or platform.machine()}, "
                                                      f"{os.cpu_count()} cores"}
    path.write_text(json.dumps(entry, indent=2) + "\n")
    log(f"{name}: val {entry['selected_val_top1']:.4f} (epoch {entry['selected_epoch']}), "
        f"test {entry['selected_test_top1']:.4f}, last {entry['last_test_top1']:.4f}, {seconds / 60:.1f} min")
    return entry


def table(args: argparse.Namespace) -> None:
    entries = sorted((json.loads(path.read_text()) for path in args.work.glob("*.json")),
                     key=lambda entry: entry.get("finished", entry["name"]))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "finetune_recipes.json").write_text(json.dumps(entries, indent=2) + "\n")
    lines = ["# Fine-tuning recipes tried on Fashion-MNIST", "",
             "Every configuration tried, in the order run (`python benchmarks/finetune_recipes.py`). Selection on the",
             "validation split (10 % of each training class, seed 0); test top-1 of the selected epoch and of the last.",
             "Wall time: the whole `leanmim finetune` command (start-up, training, validation, two test passes);",
             "'shared' means another job ran on the other core, so the time is an upper bound, not a measurement.", "",
             "| configuration | options | encoder | train images | epochs | selected epoch | val top-1 | test top-1 (selected) | test top-1 (last) | wall time | threads | val top-1 after each validation |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in entries:
        epochs = entry["settings"]["epochs"] if entry.get("settings") else "?"
        curve = ", ".join(f"{100 * point['val_top1']:.1f}" for point in entry.get("history") or [])
        if entry.get("stopped_after_epoch"):   # recorded by hand from its metrics.csv: no test pass was run
            outcome = (f"stopped after epoch {entry['stopped_after_epoch']} | {100 * entry['selected_val_top1']:.2f} "
                       f"| — | — | —")
        else:
            outcome = (f"{entry['selected_epoch']} | {100 * entry['selected_val_top1']:.2f} | "
                       f"{100 * entry['selected_test_top1']:.2f} | {100 * entry['last_test_top1']:.2f} | "
                       f"{entry['wall_seconds'] / 60:.1f} min{' (shared)' if entry['shared_machine'] else ''}")
        lines.append(f"| {entry['name']} | `{entry['options']}` | {entry['run']} | {entry['num_train']} | {epochs} | "
                     f"{outcome} | {entry['threads']} | {curve} |")
    (args.results / "finetune_recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo-mae"), help="pretraining run to fine-tune")
    parser.add_argument("--config", action="append", default=[], metavar="NAME: OPTIONS", type=parse_config,
                        help="a configuration: its name, a colon, its leanmim finetune options (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("runs/finetune_recipes"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--shared", action="store_true", help="record that another job shares the machine")
    parser.add_argument("--table", action="store_true", help="only collect the results into the table")
    args = parser.parse_args()
    names = [name for name, _ in args.config]
    if len(set(names)) != len(names):
        parser.error(f"configuration names must differ (each names its own folder): {names}")
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for name, options in args.config:
            run_config(args, name, options)
    table(args)


if __name__ == "__main__":
    main()
