"""LoMaR A/B: the relative-position logit term in the authors' form against the scaled form, same steps, 2 seeds.

    added  (default, the authors' iRPE):  logits = scale · q·kᵀ + q·rᵀ
    scaled (ablation):                    logits = scale · q·(k + r)ᵀ        (scale = 1/8 at head width 64)

Both forms express the same functions; they differ in how fast the position table r moves in logit units
under AdamW, and r is the only position information the LoMaR encoder has. So the A/B is run where positions
matter: a 14 × 14 patch grid (28 px Fashion-MNIST, patch 2), 7 × 7 windows (4 per image, 39 of 49 patches
masked), an encoder of width 192, 3 heads (head width 64), depth 4 (``--depth``). Everything else is
``configs/demo.yaml``; fp32 (``--precision``). Every run trains for the same fixed number of optimizer steps
(``--steps``), so accuracy is comparable on a busy machine; wall time is not.

Per run: pretrain (``leanmim.api.pretrain``), then probe the frozen encoder on the full 14 × 14 image
(``leanmim.api.probe``: weighted kNN and linear probe) for each ``--pools`` entry, on the first
``--probe-subset`` Fashion-MNIST train / test images. Also recorded: the final loss and the RMS of the
relative tables in logit units (RMS(r) for 'added', scale · RMS(r) for 'scaled').

Written to ``--results``: ``lomar_relpos_ab.md`` (table, mean ± sample std over seeds) and
``lomar_relpos_ab.json`` (every figure per run). Runs live in ``--work``; a finished run or probe is reused
when the script is started again with the same arguments.

    python benchmarks/lomar_relpos_ab.py                                   # the README figures (~1 h, 2 cores)
    python benchmarks/lomar_relpos_ab.py --steps 4 --seeds 0 --probe-subset 500,200 --linear-epochs 5 \\
        --work /tmp/ab/runs --results /tmp/ab                               # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leanmim import api
from leanmim.eval.bench import cpu_model
from leanmim.weights import load_run
from leanmim.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import read_json, write_json, write_subset  # noqa: E402  (same directory)

FORMS = ("added", "scaled")


def log(message: str) -> None:
    print(f"[lomar-ab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_config(args, form: str, seed: int, out: Path) -> RunConfig:
    base = RunConfig.load_yaml(args.config)
    model = dataclasses.replace(base.model, patch_size=2, embed_dim=192, num_heads=3, depth=args.depth)
    train = dataclasses.replace(base.train, seed=seed, out=str(out), max_steps=args.steps, batch_size=args.batch_size,
                                precision=args.precision, progress_bar=False, log_every_steps=25,
                                checkpoint_every_epochs=0)
    options = {"window_size": 7, "num_windows": 4, "relative_term": form}
    return dataclasses.replace(base, method="lomar", model=model, train=train, options=options)


def table_rms_in_logit_units(run_dir: Path) -> float:
    """RMS over every block of the relative table, times ``scale`` for the scaled form (its logit contribution)."""
    encoder = load_run(run_dir).method.encoder
    values = []
    for block in encoder.blocks:
        factor = block.attn.scale if block.attn.relative_term == "scaled" else 1.0
        values.append(block.attn.relative_table.detach().float() * factor)
    return torch.cat([v.flatten() for v in values]).pow(2).mean().sqrt().item()


def evaluate(args, form: str, seed: int, probe_data: str) -> dict[str, Any]:
    run_dir = Path(args.work) / f"seed{seed}" / form
    summary = read_json(run_dir / "summary.json")
    if summary is None or summary.get("global_step") != args.steps:
        log(f"{form} seed {seed}: pretraining {args.steps} steps")
        summary = api.pretrain(run_config(args, form, seed, run_dir))
    result = {"form": form, "seed": seed, "steps": summary["global_step"], "final_loss": summary["final_loss"],
              "train_seconds_shared_machine": summary["train_seconds_this_session"],
              "table_rms_logit_units": table_rms_in_logit_units(run_dir)}
    for pool in args.pools:
        cache = run_dir / f"ab_probe_{pool}_{args.probe_subset.replace(',', '-')}_{args.linear_epochs}.json"
        probe = read_json(cache)
        if probe is None:
            log(f"{form} seed {seed}: probing (pool {pool})")
            probe = api.probe(run_dir, data=probe_data, pool=pool, linear_epochs=args.linear_epochs, seed=seed)
            write_json(cache, probe)
        result[f"knn_{pool}"], result[f"linear_{pool}"] = probe["knn_top1"], probe["linear_top1"]
    log(f"{form} seed {seed}: " + ", ".join(f"{key} {value:.4g}" for key, value in result.items()
                                             if isinstance(value, float)))
    return result


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(results: list[dict[str, Any]], args) -> str:
    columns = [(f"kNN top-1 % ({pool})", f"knn_{pool}") for pool in args.pools]
    columns += [(f"linear top-1 % ({pool})", f"linear_{pool}") for pool in args.pools]
    lines = [f"LoMaR relative-position term, Fashion-MNIST 28 px, patch 2 (14 × 14 grid), 7 × 7 windows × 4, "
             f"width 192, 3 heads, depth {args.depth}, batch {args.batch_size}, {args.steps} steps, fp{args.precision}; "
             f"seeds {','.join(map(str, args.seeds))}, mean ± sample std. Probes on the full 14 × 14 image, first "
             f"{args.probe_subset} train,test images, linear probe {args.linear_epochs} epochs. "
             f"Machine: {cpu_model()}, shared with other jobs (no speed figures).", "",
             "| relative term | seeds | final loss | table RMS (logit units) | "
             + " | ".join(name for name, _ in columns) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(columns)]
    for form in FORMS:
        rows = [r for r in results if r["form"] == form]
        if not rows:
            continue
        label = {"added": "added: scale·q·kᵀ + q·rᵀ (authors', default)", "scaled": "scaled: scale·q·(k + r)ᵀ"}[form]
        cells = [mean_std([100 * r[key] for r in rows]) for _, key in columns]
        lines.append(f"| {label} | {len(rows)} | {mean_std([r['final_loss'] for r in rows])} | "
                     f"{statistics.mean(r['table_rms_logit_units'] for r in rows):.3g} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "", "| relative term | seed | final loss | "
              + " | ".join(name for name, _ in columns) + " |", "|---|---:|---:|" + "---:|" * len(columns)]
    for r in results:
        lines.append(f"| {r['form']} | {r['seed']} | {r['final_loss']:.3f} | "
                     + " | ".join(f"{100 * r[key]:.2f}" for _, key in columns) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per run, the same for both forms")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default="0,1")
    parser.add_argument("--depth", type=int, default=4, help="encoder blocks")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="32", help="training precision (fp32 is the faster one on CPU here)")
    parser.add_argument("--pools", type=lambda text: text.split(","), default="tokens,mean",
                        help="probe features, comma-separated (see leanmim probe --pool)")
    parser.add_argument("--probe-subset", default="10000,2000", help="TRAIN,TEST images for the probes")
    parser.add_argument("--linear-epochs", type=int, default=100)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="base recipe")
    parser.add_argument("--work", default=str(REPO / "runs" / "lomar_relpos_ab"), help="run directories")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the outputs go")
    args = parser.parse_args()

    num_train, num_test = (int(n) for n in args.probe_subset.split(","))
    probe_data = str(write_subset(Path(args.work) / f"fashion-mnist-{num_train}-{num_test}", num_train, num_test))
    started = time.time()
    results = [evaluate(args, form, seed, probe_data) for seed in args.seeds for form in FORMS]
    results_dir = Path(args.results)
    write_json(results_dir / "lomar_relpos_ab.json",
               {"arguments": vars(args), "results": results, "wall_seconds_shared_machine": round(time.time() - started)})
    table = markdown(results, args)
    (results_dir / "lomar_relpos_ab.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
