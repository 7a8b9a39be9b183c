"""Label efficiency: what pretraining buys when labels are few, on Fashion-MNIST.

For each fraction of the training labels (default 1 %, 10 %, 100 %) and each seed, on the same images:

- fine-tune the demo MAE encoder and the demo PR-MIM encoder (``leanmim.api.finetune``);
- the supervised baseline: the same architecture and recipe from scratch (``from_scratch=True``);
- frozen-feature baselines: linear probe and kNN on raw pixels and on a random encoder of the same
  architecture, and (for reference) on the two pretrained encoders (``leanmim.api.probe``).

Every arm sees exactly the same labelled images at a given (fraction, seed): a validation split of
``--val-fraction`` of every class is carved from the training split first (seeded by the seed), then a
stratified subset of ``fraction`` of every class of the rest (``label_fraction``, same seed; smaller
fractions are subsets of larger ones). Fine-tunes select their epoch on the validation split and report the
test top-1 of the selected and of the last checkpoint; probes select nothing. Note the validation split is
labelled too (6 000 images at 10 %): ``last_test_top1`` is the figure that used no validation labels.

Every fine-tune runs ``--steps`` optimizer steps whatever the fraction (the batch shrinks to keep at least 8
batches per epoch on small subsets; epochs = steps / batches per epoch, validation about ``--validations``
times per run), so the comparison is at equal training compute, not equal epochs.

Each result is cached as JSON under ``--work`` (its name carries a hash of the settings that define it), and
each fine-tune resumes from its own output directory: an interrupted benchmark, started again with the same
arguments, redoes nothing that finished. A cached figure of an arm that starts from pretrained weights is
reused only if it started from the same checkpoint and step as now (a run pretrained again is measured again),
and a pretraining that stopped early is refused (``--allow-unfinished`` to measure it anyway). Outputs in ``--results``: ``label_efficiency.json`` (every figure per
seed), ``label_efficiency.md`` (mean ± sample std over seeds) and ``label_efficiency.png`` (test top-1 against
the number of labelled training images, log x).

    python benchmarks/label_efficiency.py --mae-run runs/demo-mae --prmim-run runs/demo-prmim   # 1, 10, 100 %, seeds 0, 1
    python benchmarks/label_efficiency.py --subset 2000,500 --fractions 0.1,1 --steps 4 --validations 2 \\
        --linear-epochs 1 --work /tmp/le/runs --results /tmp/le   # a smoke run: proves the plumbing, measures nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from leanmim import api
from leanmim.weights import load_run
from leanmim.config import ConfigError
from leanmim.train.finetune_data import labelled_data

FINETUNE_ARMS = {"MAE fine-tune": "mae", "PR-MIM fine-tune": "prmim", "supervised from scratch": "mae"}
PROBE_ARMS = {"raw pixels": ("mae", "raw"), "random encoder": ("mae", "random"),
              "MAE encoder": ("mae", None), "PR-MIM encoder": ("prmim", None)}
PLOTTED = {"MAE fine-tune": ("selected_test_top1", "-", "o"), "PR-MIM fine-tune": ("selected_test_top1", "-", "s"),
           "supervised from scratch": ("selected_test_top1", "--", "^"),
           "raw pixels": ("linear_top1", ":", "x"), "random encoder": ("linear_top1", ":", "d")}


def log(message: str) -> None:
    print(f"[label_efficiency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, values: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.replace(path)


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def schedule(num_train: int, args) -> dict[str, int]:
    """Batch size, epochs and validation interval for ``args.steps`` optimizer steps on ``num_train`` images."""
    batch = min(args.batch_size, max(2, num_train // 8))
    batch -= batch % 2                                   # even: mixup/cutmix pair images
    batches_per_epoch = num_train // batch
    epochs = max(1, math.ceil(args.steps / batches_per_epoch))
    return {"batch_size": batch, "epochs": epochs, "val_every_epochs": max(1, epochs // args.validations)}


def pretrained_method(arm: str) -> str | None:
    """The method whose pretrained weights ``arm`` starts from; None for arms that use none (from scratch, raw
    pixels, random encoder)."""
    if arm in FINETUNE_ARMS:
        return None if arm == "supervised from scratch" else FINETUNE_ARMS[arm]
    method, baseline = PROBE_ARMS[arm]
    return method if baseline is None else None


def check_encoders(arms: list[str], runs: dict[str, Path], allow_unfinished: bool) -> dict[str, dict[str, Any]]:
    """The run and step of every encoder an arm starts from; a pretraining that stopped early is refused
    (one line) unless ``allow_unfinished``: its figures would be read as the method's."""
    encoders = {}
    for method in sorted({pretrained_method(arm) for arm in arms} - {None}):
        loaded = load_run(runs[method])
        if loaded.unfinished and not allow_unfinished:
            raise ConfigError(f"{runs[method]}: its pretraining stopped at {loaded.unfinished}; finish it (run its "
                             f"`leanmim pretrain` command again) or pass --allow-unfinished to measure it as it is")
        encoders[method] = {"checkpoint": str(loaded.checkpoint_path.resolve()), "global_step": loaded.global_step,
                            "finished": loaded.unfinished is None}
    return encoders


def encoder_key(encoder: dict[str, Any]) -> tuple[str, int]:
    """(run directory, step): what a fine-tune's own identity says it started from (``source.path``,
    ``source.global_step``)."""
    return str(Path(encoder["checkpoint"]).parent.parent), encoder["global_step"]


def cached_encoder_key(entry: dict[str, Any], out: Path) -> tuple[str, int] | None:
    """The encoder a cached entry started from: recorded in the entry, or (older entries) read from the identity of
    the fine-tune's own run.json."""
    if "encoder" in entry:
        return encoder_key(entry["encoder"])
    identity = (read_json(out / "run.json") or {}).get("identity", {})
    if "source.global_step" not in identity:
        return None
    return identity.get("source.path"), identity["source.global_step"]


def run_arm(arm: str, fraction: float, seed: int, runs: dict[str, Path], data: str, num_train: int,
            args, encoders: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One arm at one (fraction, seed), cached under ``args.work``; a cached figure of an arm that starts from
    pretrained weights counts only if it started from the same checkpoint and step as now (a run pretrained
    again at the same path makes it stale)."""
    subset = {"label_fraction": None if fraction >= 1 else fraction, "val_fraction": args.val_fraction,
              "split_seed": seed}
    if arm in FINETUNE_ARMS:
        run = runs[FINETUNE_ARMS[arm]]
        settings = {**subset, **schedule(num_train, args), "seed": seed, "from_scratch": arm == "supervised from scratch",
                    **args.finetune_options}
        key = {"arm": arm, "run": str(run.resolve()), "data": data, **settings}
    else:
        method, baseline = PROBE_ARMS[arm]
        run = runs[method]
        settings = {**subset, "baseline": baseline, "pool": args.probe_pool, "linear_epochs": args.linear_epochs,
                    "seed": seed}
        key = {"arm": arm, "run": str(run.resolve()), "data": data, **settings}
    name = f"{arm.replace(' ', '_').replace('-', '').lower()}-f{fraction:g}-s{seed}-{settings_hash(key)}"
    path = args.work / f"{name}.json"
    cached = read_json(path)
    encoder = encoders.get(pretrained_method(arm))
    if cached is not None and (encoder is None or cached_encoder_key(cached, args.work / name) == encoder_key(encoder)):
        log(f"{arm}, {fraction:g} of the labels, seed {seed}: done before ({path})")
        return cached
    if cached is not None:   # the run was pretrained again: its old figures and fine-tune directory are stale
        stale = f"{name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
        log(f"{arm}, {fraction:g} of the labels, seed {seed}: cached figures are of another encoder; moved to "
            f"{args.work / stale}")
        path.rename(args.work / f"{stale}.json")
        if (args.work / name).exists():
            (args.work / name).rename(args.work / stale)
    log(f"{arm}, {fraction:g} of the labels ({num_train} images), seed {seed}")
    started = time.perf_counter()
    if arm in FINETUNE_ARMS:
        result = api.finetune(run, out=str(args.work / name), data=data, progress_bar=False, log_every_steps=50,
                              **settings)
        figures = {key: result[key] for key in ("selected_epoch", "selected_val_top1", "selected_test_top1",
                                                 "last_val_top1", "last_test_top1", "global_step", "num_train",
                                                 "num_val")}
    else:
        result = api.probe(run, data=data, **settings)
        figures = {key: result[key] for key in ("knn_top1", "linear_top1", "num_train", "feature_dim")}
    entry = {"arm": arm, "fraction": fraction, "seed": seed, **figures, "settings": key,
             **({"encoder": encoder} if encoder else {}),
             "seconds_on_a_possibly_shared_machine": round(time.perf_counter() - started, 1)}
    if entry["num_train"] != num_train:
        raise RuntimeError(f"{arm}: trained on {entry['num_train']} images, expected {num_train}")
    write_json(path, entry)
    return entry


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{arm: {fraction: {metric: (mean, std), num_train, seeds}}}."""
    table: dict[str, dict[str, Any]] = {}
    for entry in entries:
        table.setdefault(entry["arm"], {}).setdefault(entry["fraction"], []).append(entry)
    metrics = ("selected_test_top1", "last_test_top1", "linear_top1", "knn_top1")
    return {arm: {fraction: {"num_train": runs[0]["num_train"], "seeds": [run["seed"] for run in runs],
                             **{metric: mean_std([run[metric] for run in runs]) for metric in metrics
                                if metric in runs[0]}}
                  for fraction, runs in sorted(per_fraction.items())}
            for arm, per_fraction in table.items()}


def markdown(summary: dict[str, dict[str, Any]], args, machine: str) -> str:
    def cell(entry: dict[str, Any], metric: str) -> str:
        if metric not in entry:
            return "—"
        mean, std = entry[metric]
        return f"{100 * mean:.2f} ± {100 * std:.2f}" if len(entry["seeds"]) > 1 else f"{100 * mean:.2f}"

    lines = [f"Fashion-MNIST label efficiency ({machine}); seeds {','.join(map(str, args.seeds))}, mean ± sample std. "
             f"Validation split: {args.val_fraction:g} of each training class (used only to select the fine-tune "
             f"epoch). Fine-tunes: {args.steps} optimizer steps each; options {args.finetune_options or 'default'}. "
             f"Probes: {args.probe_pool} features, linear {args.linear_epochs} epochs.", "",
             "| arm | labels | labelled images | test top-1, selected on val | test top-1, last epoch | linear probe | kNN |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for arm, per_fraction in summary.items():
        for fraction, entry in per_fraction.items():
            lines.append(f"| {arm} | {100 * fraction:g} % | {entry['num_train']} | {cell(entry, 'selected_test_top1')} | "
                         f"{cell(entry, 'last_test_top1')} | {cell(entry, 'linear_top1')} | {cell(entry, 'knn_top1')} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for arm, (metric, style, marker) in PLOTTED.items():
        if arm not in summary:
            continue
        points = sorted(summary[arm].values(), key=lambda entry: entry["num_train"])
        label = arm + (" (linear probe)" if metric == "linear_top1" else "")
        axis.errorbar([p["num_train"] for p in points], [100 * p[metric][0] for p in points],
                      yerr=[100 * p[metric][1] for p in points], linestyle=style, marker=marker, capsize=3, label=label)
    axis.set_xscale("log")
    axis.set_xlabel("labelled training images (log scale)")
    axis.set_ylabel("Fashion-MNIST test top-1 (%)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def parse_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--finetune-option expects NAME=VALUE, got '{item}'")
        options[name.replace("-", "_")] = value
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mae-run", type=Path, default=Path("runs/demo-mae"), help="pretrained MAE run [runs/demo-mae]")
    parser.add_argument("--prmim-run", type=Path, default=Path("runs/demo-prmim"),
                        help="pretrained PR-MIM run [runs/demo-prmim]")
    parser.add_argument("--data", help="labelled data [the MAE run's]")
    parser.add_argument("--subset", help="TRAIN,TEST: only the first Fashion-MNIST images of each split (smoke runs)")
    parser.add_argument("--fractions", default="0.01,0.1,1", help="fractions of the training labels [0.01,0.1,1]")
    parser.add_argument("--seeds", default="0,1", help="seeds: label subset, validation split, training [0,1]")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per fine-tune [2000]")
    parser.add_argument("--batch-size", type=int, default=256, help="fine-tuning batch at most [256]")
    parser.add_argument("--validations", type=int, default=20, help="validations per fine-tune, about [20]")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation split per class [0.1]")
    parser.add_argument("--finetune-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a leanmim finetune setting for every fine-tune, e.g. pool=tokens (repeatable)")
    parser.add_argument("--probe-pool", default="tokens", help="probe features [tokens]")
    parser.add_argument("--linear-epochs", type=int, default=30, help="linear probe epochs [30]")
    parser.add_argument("--arms", help=f"comma-separated subset of: {', '.join([*FINETUNE_ARMS, *PROBE_ARMS])}")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="measure a pretrained run whose pretraining stopped early (refused otherwise)")
    parser.add_argument("--work", type=Path, default=Path("runs/label_efficiency"), help="cache [runs/label_efficiency]")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="outputs [benchmarks/results]")
    args = parser.parse_args(argv)
    args.fractions = [float(x) for x in args.fractions.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.finetune_options = parse_options(args.finetune_option)
    arms = [*FINETUNE_ARMS, *PROBE_ARMS] if not args.arms else [a.strip() for a in args.arms.split(",")]
    unknown = [arm for arm in arms if arm not in FINETUNE_ARMS and arm not in PROBE_ARMS]
    if unknown or any(not 0 < f <= 1 for f in args.fractions):
        raise SystemExit(f"unknown arms {unknown} or fractions outside (0, 1]: {args.fractions}")

    runs = {"mae": args.mae_run, "prmim": args.prmim_run}
    reference = load_run(args.mae_run).config
    encoders = check_encoders(arms, runs, args.allow_unfinished)
    data = args.data or reference.data.path
    if args.subset:
        from quality import write_subset   # benchmarks/quality.py, beside this script

        num_train, num_test = (int(n) for n in args.subset.split(","))
        data = str(write_subset(args.work / f"fashion-mnist-{num_train}-{num_test}", num_train, num_test))
    entries = []
    for seed in args.seeds:
        for fraction in sorted(args.fractions):
            _, subsets = labelled_data(data, reference.model.img_size, reference.model.in_chans, args.val_fraction, seed,
                                       None, None if fraction >= 1 else fraction)
            for arm in arms:
                entries.append(run_arm(arm, fraction, seed, runs, data, len(subsets.train), args, encoders))

    summary = summarise(entries)
    machine = f"{platform.machine()}, {platform.processor() or 'CPU'}"
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "label_efficiency.json",
               {"command": " ".join(sys.argv), "machine": machine, "entries": entries,
                "summary": {arm: {str(f): v for f, v in per.items()} for arm, per in summary.items()}})
    (args.results / "label_efficiency.md").write_text(markdown(summary, args, machine))
    plot(summary, args.results / "label_efficiency.png")
    log(f"wrote {args.results / 'label_efficiency.md'}, .json and .png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:   # a run that is missing, not a pretraining or unfinished: one line, exit 2 as the CLI
        print(f"label_efficiency.py: error: {error}", file=sys.stderr)
        sys.exit(2)
