"""Representation quality per unit of pretraining compute: every method on Fashion-MNIST, same wall-clock budget.

For each seed, and for each method in turn:

1. calibrate: a short pretraining run (``--calibration-steps`` steps, thrown away) measures the method's
   images/s as the engine runs it (data, augmentation and Lightning included); the first seed calibrates,
   the other seeds reuse its step count;
2. pretrain for ``max_steps = budget · img/s / batch`` optimizer steps. The step count is fixed before
   training, so the warmup + cosine learning-rate schedule runs to its end (Lightning's ``max_time`` would
   stop it part-way down the cosine, at a high learning rate, which favours no method fairly);
3. probe the frozen encoder: weighted kNN and linear probe (``leanmim.api.probe``);
4. fine-tune briefly (``leanmim.api.finetune``, MAE protocol, ``--finetune-epochs``): the epoch is selected on a
   validation split carved from the training split (10 % of each class), and the test split is evaluated
   once for the selected and once for the last checkpoint. The table reports the selected checkpoint's
   test top-1 (``finetune_top1``); ``finetune_last_top1`` is kept in ``quality.json``.

Baselines (same splits): raw pixels, a random encoder (the MAE architecture, untrained, one per seed), and with
fine-tuning the supervised baseline: the same architecture fine-tuned from scratch with the same recipe (first seed).

Pretraining compute of a run: counted MACs (``leanmim.eval.cost`` training-step MACs per image × images seen) and
measured training seconds. Written to ``--results`` (default ``benchmarks/results/``): ``quality.md`` (table,
mean ± sample standard deviation over seeds), ``quality.json`` (every figure, per seed) and
``quality_pareto.png`` (accuracy against pretraining compute, in MACs and in seconds).

Model and training recipe: ``configs/demo.yaml`` (28 px, patch 4, width 192, depth 8, decoder 128 × 2, batch 256,
base lr 1.5e-3), with the per-method options of ``METHOD_OPTIONS`` below. ``--patch-size 2`` gives a 14 × 14 grid
of 2 px patches, where LoMaR's default 7 × 7 windows are a quarter of the image (on the 7 × 7 grid they would be
all of it). Runs live in ``--work`` (default ``runs/quality``): ``seed<S>/<method>/`` holds the benchmark's files
(``plan.json``, ``quality.json``) and the pretraining run in ``run/``. An interrupted benchmark, started again with
the same arguments, reuses each run's plan (its step count), resumes unfinished runs and skips finished evaluations.

    python benchmarks/quality.py                                # every method, 10 minutes each, seed 0
    python benchmarks/quality.py --minutes 20 --seeds 0,1        # the headline comparison
    python benchmarks/quality.py --minutes 10 --methods mae,lomar --patch-size 2 --pool mean \
        --work runs/quality-grid14 --results benchmarks/results/quality-grid14     # LoMaR's regime: a 14 × 14 grid
    python benchmarks/quality.py --minutes 0.2 --methods mae,prmim --seeds 0 --subset 2000,500 \\
        --finetune-epochs 1 --linear-epochs 10 --work /tmp/q/runs --results /tmp/q   # a smoke run (~minutes)

Run it on an otherwise idle machine: the budget is wall-clock time, so other load shrinks every method's step count.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanmim import api
from leanmim.eval.bench import cpu_model, machine_info
from leanmim.config import ConfigError, RunConfig
from leanmim.data import FASHION_MNIST_DIR, read_idx
from leanmim.methods import METHODS

REPO = Path(__file__).resolve().parent.parent

# Options for the 7 × 7 patch grid of 28 px images (every other option: the method's default).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "mae": {},
    # A 5 × 5 window (25 of the 49 patches, ⌊25 · 0.8⌋ = 20 masked) is the smallest whose offsets reach the saturated
    # |Δ| ≥ 4 position bucket that the full 7 × 7 grid uses at evaluation; the default 7 would be the whole image.
    # On a grid of 14 × 14 or more (--patch-size 2) LoMaR keeps its default 7 × 7 windows (see method_options).
    "lomar": {"window_size": 5},
    "prmim": {},   # 3 × 3 aggregation window: fits the 7 × 7 grid
    "pcae": {},    # teacher compresses after blocks 1, 3, 5 of 8 (the authors' i·(depth//3) rule; 1, 3, 6 before issue 15)
    "ddae": {},    # supervised blocks are rescaled to the 8-block encoder by the method
}
# Ablation variants: NAME -> (registered method, options). Pass them in --methods like a method.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mae+dynamic": ("mae", {"dynamic_weighting": True}),                 # DDAE's weighting alone
    "mae+deep": ("mae", {"deep_supervision": True}),                     # DDAE's deep supervision alone
    "prmim-plain": ("prmim", {"throw_selection": "random", "thrown_reconstruction": "none"}),  # plain partial
}


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, values: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.replace(path)


def write_subset(directory: Path, num_train: int, num_test: int) -> Path:
    """The first ``num_train`` / ``num_test`` Fashion-MNIST images and labels as idx files (for smoke runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("t10k", num_test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte.gz"
            array = read_idx(str(Path(FASHION_MNIST_DIR) / name))[:count]
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(directory / name, "wb") as handle:
                handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return directory


def base_config(config_path: Path, data: str, patch_size: int | None = None) -> RunConfig:
    config = RunConfig.load_yaml(config_path)
    if patch_size is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, patch_size=patch_size))
    return dataclasses.replace(config, data=dataclasses.replace(config.data, path=data),
                               train=dataclasses.replace(config.train, progress_bar=False, log_every_steps=50,
                                                         checkpoint_every_epochs=0))


def method_options(method: str, grid_side: int) -> tuple[str, dict[str, Any]]:
    """(registered method, options) of a --methods name on a ``grid_side`` × ``grid_side`` patch grid."""
    method, options = VARIANTS.get(method, (method, METHOD_OPTIONS.get(method, {})))
    if method == "lomar" and grid_side >= 14:
        options = {key: value for key, value in options.items() if key != "window_size"}  # the paper's 7 × 7 windows
    return method, dict(options)


def grid_side(base: RunConfig) -> int:
    return base.model.img_size // base.model.patch_size


def run_config(base: RunConfig, method: str, seed: int, out: Path, **train: Any) -> RunConfig:
    method, options = method_options(method, grid_side(base))
    return dataclasses.replace(base, method=method, options=options,
                               train=dataclasses.replace(base.train, seed=seed, out=str(out), **train))


def plan_steps(base: RunConfig, method: str, seed: int, method_dir: Path, minutes: float, calibration_steps: int,
               num_images: int, first_seed_dir: Path) -> dict[str, Any]:
    """The run's step count for the budget, from a short calibration run; stored in ``plan.json`` and reused.

    The method's first seed calibrates; later seeds take its step count, so seeds differ in their random draws only
    (not in how busy the machine was when they were calibrated)."""
    plan_path = method_dir / "plan.json"
    for source in (plan_path, first_seed_dir / "plan.json"):
        plan = read_json(source)
        if plan is not None and plan["minutes"] == minutes and plan["calibration_steps"] == calibration_steps:
            if source != plan_path:
                write_json(plan_path, plan)
            return plan
    calibration_dir = method_dir / "calibration"
    shutil.rmtree(calibration_dir, ignore_errors=True)
    summary = api.pretrain(run_config(base, method, seed, calibration_dir, max_steps=calibration_steps))
    shutil.rmtree(calibration_dir, ignore_errors=True)
    images_per_second = summary["images_per_second"]
    batch = base.train.batch_size
    max_steps = max(1, math.floor(minutes * 60 * images_per_second / batch))
    plan = {"minutes": minutes, "calibration_steps": calibration_steps, "calibrated_img_per_s": images_per_second,
            "batch_size": batch, "max_steps": max_steps, "epochs_equivalent": max_steps * batch / num_images}
    write_json(plan_path, plan)
    return plan


def names(text: str) -> list[str]:
    """Comma-separated command-line list -> its non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def integers(text: str) -> list[int]:
    return [int(item) for item in names(text)]


def wants_finetuning(method: str, seed: int, args) -> bool:
    return (args.finetune_epochs > 0 and (args.finetune_methods is None or method in args.finetune_methods)
            and (args.finetune_seeds is None or seed in args.finetune_seeds))


FINETUNE_PROTOCOL = "selected on validation"   # cached fine-tunes without it predate the validation split


def finetune_figures(method_dir: Path, method: str, seed: int, args) -> dict[str, Any]:
    """Fine-tune the run's encoder for ``--finetune-epochs`` (MAE protocol); its own directory per epoch count.
    ``finetune_top1``: test top-1 of the epoch selected on validation; ``finetune_last_top1``: of the last epoch."""
    if not wants_finetuning(method, seed, args):
        return {"finetune_epochs": 0, "finetune_top1": None, "finetune_last_top1": None}
    log(f"{method} seed {seed}: fine-tuning {args.finetune_epochs} epoch(s)")
    result = api.finetune(method_dir / "run", out=str(method_dir / f"finetune-{args.finetune_epochs}ep-val"),
                          epochs=args.finetune_epochs, seed=seed, progress_bar=False, log_every_steps=50)
    return {"finetune_epochs": args.finetune_epochs, "finetune_protocol": FINETUNE_PROTOCOL,
            "finetune_top1": result["selected_test_top1"], "finetune_last_top1": result["last_test_top1"],
            "finetune_selected_epoch": result["selected_epoch"], "finetune_seconds": result["train_seconds_this_session"]}


def evaluate_method(base: RunConfig, method: str, seed: int, method_dir: Path, first_seed_dir: Path, args,
                    num_images: int) -> dict[str, Any]:
    """Plan, pretrain, probe (and fine-tune) one method at one seed. ``method_dir`` holds the benchmark's own files
    (``plan.json``, ``train_seconds.json``, ``quality.json``) beside the pretraining run in ``method_dir/run``, which
    the engine must find new or its own."""
    run_dir = method_dir / "run"
    cached = read_json(method_dir / "quality.json")
    if cached is not None:
        log(f"{method} seed {seed}: done before, reusing {method_dir / 'quality.json'}")
        if wants_finetuning(method, seed, args) and (cached.get("finetune_epochs") != args.finetune_epochs
                                                     or cached.get("finetune_protocol") != FINETUNE_PROTOCOL):
            cached.update(finetune_figures(method_dir, method, seed, args))
            write_json(method_dir / "quality.json", cached)
        return cached
    plan = plan_steps(base, method, seed, method_dir, args.minutes, args.calibration_steps, num_images, first_seed_dir)
    log(f"{method} seed {seed}: {plan['max_steps']} steps (calibrated {plan['calibrated_img_per_s']:.0f} img/s)")
    config = run_config(base, method, seed, run_dir, max_steps=plan["max_steps"])
    summary = api.pretrain(config)
    # Training seconds over every session of this run (an interrupted benchmark resumes its runs).
    earlier = read_json(method_dir / "train_seconds.json") if summary["resumed_from"] else None
    train_seconds = (earlier or {"seconds": 0.0})["seconds"] + summary["train_seconds_this_session"]
    write_json(method_dir / "train_seconds.json", {"seconds": train_seconds})
    cost = api.cost(config.method, config.model.name, config.model.img_size, config.model.patch_size, config.model.in_chans,
                    config.options, model_overrides={k: v for k, v in dataclasses.asdict(config.model).items()
                                                     if k not in ("name", "img_size", "patch_size", "in_chans")})
    images_seen = summary["global_step"] * base.train.batch_size
    log(f"{method} seed {seed}: probing")
    probe = api.probe(run_dir, linear_epochs=args.linear_epochs, seed=seed, pool=args.pool)
    result = {
        "method": method, "seed": seed, "options": config.options, "plan": plan,
        "steps": summary["global_step"], "images_seen": images_seen,
        "train_seconds": train_seconds, "train_img_per_s": summary["images_per_second"],
        "final_loss": summary["final_loss"],
        "train_macs_per_image": cost["macs"]["train_step"], "pretrain_macs": cost["macs"]["train_step"] * images_seen,
        "knn_top1": probe["knn_top1"], "linear_top1": probe["linear_top1"],
    } | finetune_figures(method_dir, method, seed, args)
    write_json(method_dir / "quality.json", result)
    return result


def evaluate_baselines(data: str, seeds: list[int], reference_run: Path, work: Path, args) -> dict[str, list[dict[str, Any]]]:
    """Raw pixels (seed-independent features: first seed only) and a random encoder per seed; cached in ``work``."""

    def cached_probe(name: str, seed: int, **kwargs: Any) -> dict[str, Any]:
        settings = {"data": data, "pool": kwargs.get("pool"), "linear_epochs": args.linear_epochs, "seed": seed}
        path = work / "baselines" / f"{name}-seed{seed}.json"
        cached = read_json(path)
        if cached is not None and cached["settings"] == settings:
            log(f"baseline {name} seed {seed}: done before, reusing {path}")
            return cached["probe"]
        # The run only fixes the image geometry (and, for the random encoder, the architecture).
        result = api.probe(reference_run, linear_epochs=args.linear_epochs, seed=seed, **kwargs)
        write_json(path, {"settings": settings, "probe": result})
        return result

    raw = cached_probe("raw", seeds[0], data=data, baseline="raw")
    baselines = {"raw pixels": [{"seed": seeds[0], "knn_top1": raw["knn_top1"], "linear_top1": raw["linear_top1"]}],
                 "random encoder": []}
    for seed in seeds:
        random = cached_probe("random", seed, baseline="random", pool=args.pool)
        baselines["random encoder"].append({"seed": seed, "knn_top1": random["knn_top1"],
                                            "linear_top1": random["linear_top1"]})
    if args.finetune_epochs > 0:  # the supervised baseline: same architecture and fine-tuning recipe, no pretraining
        seed = seeds[0]
        path = work / "baselines" / f"scratch-seed{seed}-{args.finetune_epochs}ep-val.json"
        scratch = read_json(path)
        if scratch is None:
            log(f"baseline: fine-tuning from scratch, {args.finetune_epochs} epoch(s), seed {seed}")
            scratch = api.finetune(reference_run, out=str(path.with_suffix("")), epochs=args.finetune_epochs, seed=seed,
                                   from_scratch=True, progress_bar=False, log_every_steps=50)
            write_json(path, scratch)
        baselines["supervised from scratch"] = [{"seed": seed, "finetune_top1": scratch["selected_test_top1"],
                                                 "finetune_last_top1": scratch["last_test_top1"]}]
    return baselines


def mean_spread(values: list[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    keys = ("knn_top1", "linear_top1", "finetune_top1", "pretrain_macs", "train_seconds", "steps")
    return {name: {key: mean_spread([run.get(key) for run in runs]) for key in keys} | {"seeds": len(runs)}
            for name, runs in per_seed.items()}


def percent(entry: tuple[float, float] | None) -> str:
    if entry is None:
        return "—"
    mean, spread = entry
    return f"{100 * mean:.2f} ± {100 * spread:.2f}" if spread else f"{100 * mean:.2f}"


def markdown_table(summary: dict[str, dict[str, Any]], machine: str, args, base: RunConfig) -> str:
    seeds, ablation_seeds = (",".join(map(str, values)) for values in (args.seeds, args.ablation_seeds or args.seeds))
    side = grid_side(base)
    variants = f" (ablation variants: {ablation_seeds})" if any(name in VARIANTS for name in args.methods) else ""
    finetuning = (f"Fine-tuning: {args.finetune_epochs} epoch(s), MAE protocol; its column is the test top-1 of the "
                  f"epoch selected on a validation split (10 % of each training class)." if args.finetune_epochs > 0
                  else "No fine-tuning (--finetune-epochs 0).")
    lines = [f"Fashion-MNIST, {args.minutes:g} min pretraining per method (wall clock, {machine}); patch "
             f"{base.model.patch_size} ({side} × {side} grid); probes on `--pool {args.pool}` features, linear "
             f"{args.linear_epochs} epochs; seeds {seeds}{variants}; mean ± sample std over seeds. {finetuning}",
             "",
             "| features | seeds | steps | pretraining TMACs | pretraining min | kNN top-1 % | linear top-1 % | fine-tune top-1 % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in summary.items():
        steps = f"{entry['steps'][0]:.0f}" if entry.get("steps") else "—"
        macs = f"{entry['pretrain_macs'][0] / 1e12:.1f}" if entry.get("pretrain_macs") else "—"
        minutes = f"{entry['train_seconds'][0] / 60:.1f}" if entry.get("train_seconds") else "—"
        lines.append(f"| {name} | {entry['seeds']} | {steps} | {macs} | {minutes} | {percent(entry.get('knn_top1'))} | "
                     f"{percent(entry.get('linear_top1'))} | {percent(entry.get('finetune_top1'))} |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with less (or equal) compute and higher accuracy, by compute."""
    front, best = [], -math.inf
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto_plot(summary: dict[str, dict[str, Any]], methods: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    colours = plt.get_cmap("tab10")
    for axis, (key, label, scale) in zip(axes, [("pretrain_macs", "pretraining compute, TMACs (counted)", 1e-12),
                                                ("train_seconds", "pretraining time, minutes (measured)", 1 / 60)]):
        for metric, marker, name_suffix in (("linear_top1", "o", "linear"), ("finetune_top1", "^", "fine-tune")):
            points = []
            for index, method in enumerate(methods):
                x, y = summary[method].get(key), summary[method].get(metric)
                if x is None or y is None:
                    continue
                axis.errorbar(x[0] * scale, 100 * y[0], xerr=x[1] * scale, yerr=100 * y[1], marker=marker,
                              color=colours(index), capsize=3, linestyle="none",
                              label=f"{method} ({name_suffix})")
                points.append((x[0] * scale, 100 * y[0]))
            front = pareto_front(points)
            if len(front) > 1:
                axis.plot(*zip(*front), color="black", linewidth=0.8, linestyle=":")
        for baseline, style, metric, kind in (("raw pixels", "--", "linear_top1", "linear"),
                                              ("random encoder", "-.", "linear_top1", "linear"),
                                              ("supervised from scratch", ":", "finetune_top1", "fine-tune")):
            if baseline in summary and summary[baseline].get(metric):
                axis.axhline(100 * summary[baseline][metric][0], color="grey", linestyle=style, linewidth=1,
                             label=f"{baseline} ({kind})")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("Fashion-MNIST test top-1, %")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle("accuracy vs pretraining compute (dotted: Pareto front per accuracy type)", fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock pretraining budget per method and seed")
    parser.add_argument("--methods", type=names, default=",".join(sorted(METHODS)), help="comma-separated [every registered one]")
    parser.add_argument("--seeds", type=integers, default="0", help="comma-separated seeds [0]; e.g. 0,1 for the headline comparison")
    parser.add_argument("--ablation-seeds", type=integers, help="comma-separated seeds for the ablation variants "
                        f"({', '.join(VARIANTS)}) [the --seeds]")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="model and training recipe")
    parser.add_argument("--patch-size", type=int, help="override the config's patch size (2: a 14 × 14 grid at 28 px, "
                        "where LoMaR runs its default 7 × 7 windows)")
    parser.add_argument("--calibration-steps", type=int, default=12, help="steps of the calibration run per method")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs per method (0: skip)")
    parser.add_argument("--finetune-methods", type=names, help="comma-separated: fine-tune only these (from --methods) [all]")
    parser.add_argument("--finetune-seeds", type=integers, help="comma-separated: fine-tune only at these seeds [all]")
    parser.add_argument("--pool", default="tokens", help="probe feature (see leanmim probe --pool) [tokens]")
    parser.add_argument("--linear-epochs", type=int, default=100, help="linear-probe epochs")
    parser.add_argument("--subset", help="TRAIN,TEST: use only the first images of each split (smoke runs)")
    parser.add_argument("--work", default=str(REPO / "runs" / "quality"), help="run directories")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the outputs go")
    args = parser.parse_args()

    methods, seeds = args.methods, args.seeds
    unknown = [name for name in methods if name not in METHODS and name not in VARIANTS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}: registered are {', '.join(sorted(METHODS))}")
    ablation_seeds = seeds if args.ablation_seeds is None else args.ablation_seeds
    work, results = Path(args.work), Path(args.results)
    data, num_images = "fashion-mnist", 60000
    if args.calibration_steps < 3:  # the engine's images/s leaves out the first two steps (one-off costs)
        parser.error(f"--calibration-steps must be at least 3 (the first two steps are not timed), got {args.calibration_steps}")
    if args.patch_size is not None and args.patch_size < 1:
        parser.error(f"--patch-size must be a positive integer, got {args.patch_size}")
    try:
        base = base_config(Path(args.config), data, args.patch_size)
    except ConfigError as error:
        parser.error(str(error))
    if base.model.img_size % base.model.patch_size:
        parser.error(f"--patch-size {base.model.patch_size} does not divide the {base.model.img_size} px images")
    if args.subset:  # written only once every argument has been checked
        try:
            num_train, num_test = (int(n) for n in args.subset.split(","))
        except ValueError:
            parser.error(f"--subset takes TRAIN,TEST (two image counts, e.g. 2000,500), got '{args.subset}'")
        data, num_images = str(write_subset(work / f"fashion-mnist-{num_train}-{num_test}", num_train, num_test)), num_train
        base = dataclasses.replace(base, data=dataclasses.replace(base.data, path=data))

    per_seed: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    started = time.time()
    for seed in seeds:
        for method in methods:
            if method in VARIANTS and seed not in ablation_seeds:
                continue
            per_seed[method].append(evaluate_method(base, method, seed, work / f"seed{seed}" / method,
                                                    work / f"seed{seeds[0]}" / method, args, num_images))
    log("baselines: raw pixels, random encoder")
    reference = work / f"seed{seeds[0]}" / ("mae" if "mae" in methods else methods[0]) / "run"  # its architecture
    per_seed.update(evaluate_baselines(data, seeds, reference, work, args))

    machine = machine_info(torch.device("cpu"), None)
    machine.pop("precision")
    summary = summarise(per_seed)
    report = {"minutes": args.minutes, "seeds": seeds, "methods": methods, "config": args.config,
              "recipe": base.to_dict(), "grid": f"{grid_side(base)}x{grid_side(base)}", "pool": args.pool,
              "method_options": {method: method_options(method, grid_side(base))[1] for method in methods}, "data": data,
              "finetune_epochs": args.finetune_epochs, "linear_epochs": args.linear_epochs, "machine": machine,
              "per_seed": per_seed,
              "summary": {name: {key: (list(value) if isinstance(value, tuple) else value) for key, value in entry.items()}
                          for name, entry in summary.items()},
              "wall_seconds": round(time.time() - started, 1)}
    write_json(results / "quality.json", report)
    table = markdown_table(summary, f"{cpu_model()}, {machine['threads']} threads", args, base)
    (results / "quality.md").write_text(table)
    plot = pareto_plot(summary, methods, results / "quality_pareto.png")
    print(table)
    print(f"written: {results / 'quality.md'}, {results / 'quality.json'}, {plot}")


if __name__ == "__main__":
    main()
