"""One prepared check of leanmim on a GPU: the chip's ceiling, every method's training step, the real CLI with its
loader, checkpoint + resume, probe and fine-tune, and an equal-GPU-time quality comparison on a 14 x 14 grid.

Parts, in order, each time-boxed (``--minutes`` scales the boxes; the default fits 8 minutes on one H200 with start-up):

1. ``ceiling``: a large bf16 matrix product (8192^3 on CUDA), median of timed products on random data (CUDA events).
2. ``steps``: each method's training step (forward + backward + fused AdamW) at ViT-B/16 224 px under bf16 autocast,
   the largest batch of ``BATCHES`` that fits, eager and ``torch.compile``: images/s, peak memory, and the fraction of
   the ceiling = counted MACs (``leanmim.eval.cost.count_train_step``, torch's FlopCounterMode) x 2 x images/s / ceiling.
   MAE's eager rate is set beside the published 313 images/s (RTX A6000) as a ratio per TFLOP/s of peak.
3. ``cli``: the real ``leanmim pretrain`` (a subprocess) for ``CLI_SECONDS`` on JPEGs written here from Fashion-MNIST
   at 224 px, streamed from disk (``--max-memory-gb`` tiny) with as many loader workers as the machine has cores;
   images/s from the run's CSV log, and the share of step time not explained by the bare step of part 2 (the time the
   GPU waits for data, plus Lightning's own overhead). Then SIGTERM (exit 143, ``last.ckpt``), the same command again:
   it must resume from the saved step (its first logged step is past it) and save a later one.
4. ``probe``, ``finetune``: ``leanmim.api.probe`` / ``leanmim.api.finetune`` (what ``leanmim probe`` / ``finetune`` call)
   on that run and the labelled JPEG folder.
5. ``quality``: all five methods on Fashion-MNIST at 56 px, patch 4 (a 14 x 14 grid), ``configs/demo.yaml``'s recipe,
   the same GPU-time budget each (a calibration run sets the step count, as benchmarks/quality.py does), then kNN +
   linear probe of the frozen encoder. Methods that do not fit the remaining time are listed as skipped.

Writes ``device_check.json`` and ``device_check.md`` to ``--out`` (default ``benchmarks/results/device/``).

On the lent H200 (its own torch/Lightning/timm, no network; make the wheels it lacks first, here:
``pip download --no-deps -d .whl webdataset braceexpand``; see docs/gpu.md), one command
(device tool ``run``, ``carry: [".whl"]``, ``timeout_s: 560``):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src \
      PYTHONUNBUFFERED=1 && python3 benchmarks/device_check.py --out $OUT/device 2>&1 | tee $OUT/log

``--smoke``: tiny sizes on the CPU, every part (compile off, two quality methods), in well under a minute; the test
suite runs it (tests/test_device_check.py).

Published figure: MAE ViT-B/16 pretraining at 313 images/s per GPU, 128 / 0.4084 s per iteration on 8 x RTX A6000
(ConvMAE authors' measurement of MAE, https://github.com/Alpha-VL/ConvMAE/issues/5). A6000 dense bf16 peak: 154.8
TFLOP/s, half the 309.7 TFLOP/s "with sparsity" tensor figure of NVIDIA's RTX A6000 datasheet
(https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/quadro-product-literature/proviz-print-nvidia-rtx-a6000-datasheet-us-nvidia-1454980-r9-web.pdf).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))        # runs from the source tree (no pip install on the device machine)
sys.path.insert(0, str(REPO / "benchmarks"))

from leanmim import api  # noqa: E402
from leanmim.config import ModelConfig  # noqa: E402
from leanmim.eval.cost import count_train_step  # noqa: E402
from leanmim.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx  # noqa: E402
from leanmim.parts.encoder import training_attention  # noqa: E402
from leanmim.train.optim import adamw, parameter_groups  # noqa: E402
from leanmim.methods import build_method  # noqa: E402

METHODS = ("mae", "pcae", "prmim", "lomar", "ddae")
BATCHES = (512, 256, 128, 64, 32)
PUBLISHED_MAE_RATE = 313.0          # img/s per GPU, RTX A6000, batch 128 (ConvMAE issue #5)
A6000_BF16_DENSE_TFLOPS = 154.8     # NVIDIA RTX A6000 datasheet: 309.7 TFLOP/s with sparsity / 2
CLI_SECONDS = 60


@dataclasses.dataclass
class Sizes:
    """What a full run and a smoke run differ in."""
    device: str
    matmul: int
    model: dict[str, Any]
    batches: tuple[int, ...]
    timed_steps: int
    compile: bool
    jpeg_size: int
    train_images: int
    test_images: int
    cli_seconds: float
    cli_model: list[str]
    finetune_epochs: int
    quality_methods: tuple[str, ...]
    quality_seconds: float
    quality_subset: tuple[int, int] | None
    linear_epochs: int


def full_sizes() -> Sizes:
    return Sizes("cuda", 8192, dict(name="vit_base_patch16", img_size=224, in_chans=3), BATCHES, 10, True,
                 224, 6000, 1000, CLI_SECONDS, ["--model", "vit_base_patch16"], 1, METHODS, 25.0, None, 30)


def smoke_sizes() -> Sizes:
    tiny = dict(name="vit_tiny_patch16", img_size=56, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=2,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    cli = ["--model", "vit_tiny_patch16", "--patch-size", "8", "--embed-dim", "64", "--depth", "2", "--num-heads", "2",
           "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2"]
    return Sizes("cpu", 128, tiny, (8, 4), 2, False, 56, 96, 40, 3.0, cli, 1, ("mae", "lomar"), 1.0, (200, 100), 2)


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- 1. ceiling

def matmul_ceiling(device: torch.device, size: int, repeats: int = 10) -> dict[str, Any]:
    """FLOP/s of a size^3 bf16 matrix product on random data: median of ``repeats`` after 3 warm-ups."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    flops = 2 * size ** 3 / statistics.median(times)
    return {"size": size, "dtype": "bfloat16", "flops": flops, "tflops": round(flops / 1e12, 2)}


# ----------------------------------------------------------------------------- 2. training steps

class Stepper:
    """One method + AdamW (fused on CUDA, as the engine builds it) stepping on one random batch under bf16 autocast."""

    def __init__(self, method_name: str, model: ModelConfig, batch: int, device: torch.device, compiled: bool):
        torch.manual_seed(0)
        self.device = device
        self.method = build_method(method_name, model, {}).to(device)
        self.optimizer = adamw(parameter_groups(self.method, 0.05), 1e-4, (0.9, 0.95))
        self.images = torch.randn(batch, model.in_chans, model.img_size, model.img_size, device=device)
        self.forward = torch.compile(self.method) if compiled else self.method

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16), training_attention(self.method, self.device):
            loss = self.forward(self.images).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def time_step(method_name: str, model: ModelConfig, batches, device, compiled: bool, timed_steps: int) -> dict[str, Any]:
    """The largest batch of ``batches`` whose step fits: images/s (median of timed steps) and peak memory."""
    for batch in batches:
        stepper = None
        try:
            stepper = Stepper(method_name, model, batch, device, compiled)
            for _ in range(3):      # warm-up: allocation, cuDNN/cuBLAS handles, compilation
                stepper.step()
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(timed_steps):
                start = time.perf_counter()
                stepper.step()
                synchronize(device)
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            return {"batch": batch, "images_per_second": batch / statistics.median(times),
                    "step_seconds": statistics.median(times), "peak_memory_gib": None if peak is None else peak / 2 ** 30}
        except Exception as error:  # noqa: BLE001 - out of memory: try the next batch; anything else is reported
            if not is_out_of_memory(error):
                raise
        finally:
            del stepper
            if device.type == "cuda":
                torch.cuda.empty_cache()
    raise RuntimeError(f"no batch of {list(batches)} fits")


def part_steps(sizes: Sizes, device: torch.device, ceiling: float, deadline: float) -> dict[str, Any]:
    model = ModelConfig(**sizes.model).resolved()
    rows = []
    for method in METHODS:
        counter = build_method(method, model, {})       # MACs counted on the CPU at batch 2 (same per image)
        macs = count_train_step(counter, torch.randn(2, model.in_chans, model.img_size, model.img_size))
        del counter
        for compiled in (False, True) if sizes.compile else (False,):
            if time.monotonic() > deadline:
                rows.append({"method": method, "compile": compiled, "skipped": "time box spent"})
                continue
            try:
                row = time_step(method, model, sizes.batches, device, compiled, sizes.timed_steps)
            except Exception as error:  # noqa: BLE001 - one failing method must not hide the others
                rows.append({"method": method, "compile": compiled, "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            row.update(method=method, compile=compiled, train_macs_per_image=macs,
                       fraction_of_ceiling=macs * 2 * row["images_per_second"] / ceiling)
            rows.append(row)
            log(f"step {method} compile={compiled}: batch {row['batch']}, {row['images_per_second']:.0f} img/s, "
                f"{row['fraction_of_ceiling']:.1%} of the ceiling")
    return {"model": dataclasses.asdict(model), "rows": rows}


def published_comparison(steps: dict[str, Any], ceiling_flops: float) -> dict[str, Any] | None:
    """MAE's eager img/s per TFLOP/s of this GPU's measured ceiling, over the published A6000 img/s per TFLOP/s."""
    mae = next((r for r in steps["rows"] if r["method"] == "mae" and not r["compile"] and "images_per_second" in r), None)
    if mae is None:
        return None
    here = mae["images_per_second"] / (ceiling_flops / 1e12)
    published = PUBLISHED_MAE_RATE / A6000_BF16_DENSE_TFLOPS
    return {"mae_images_per_second": mae["images_per_second"], "published_images_per_second": PUBLISHED_MAE_RATE,
            "published_gpu": "RTX A6000", "published_peak_tflops": A6000_BF16_DENSE_TFLOPS,
            "here_per_tflop": here, "published_per_tflop": published, "ratio_per_tflop": here / published}


# ----------------------------------------------------------------------------- 3. the CLI, resume

def write_jpegs(root: Path, size: int, train: int, test: int) -> Path:
    """Fashion-MNIST pictures as RGB JPEGs (quality 90) resized bicubically to ``size``, in ROOT/{train,test}/CLASS/."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        images = read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz"))[:count]
        labels = read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz"))[:count]
        for i, (image, label) in enumerate(zip(images, labels)):
            jobs.append((image, root / split / FASHION_MNIST_CLASSES[int(label)].replace("/", "-") / f"{i:06d}.jpg", size))
    for path in {job[1].parent for job in jobs}:
        path.mkdir(parents=True, exist_ok=True)
    workers = min(len(os.sched_getaffinity(0)), 16)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_save_jpeg, jobs, chunksize=256))
    return root


def _save_jpeg(job) -> None:
    from PIL import Image
    image, path, size = job
    Image.fromarray(np.asarray(image)).convert("RGB").resize((size, size), Image.BICUBIC).save(path, quality=90)


def logged_steps(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's CSV log (RUN/logs/metrics.csv: one log per run, continued by each resumed session
    from the step it resumed at; flushed every 100 steps and when a signal stops the run)."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as handle:
        return list(csv.DictReader(handle))


def checkpoint_step(run_dir: Path) -> int | None:
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))


def progress_step(run_dir: Path) -> int:
    """The step the run's summary.json says it reached (written by the run every few seconds while it trains)."""
    try:
        return int(json.loads((run_dir / "summary.json").read_text()).get("progress", {}).get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def run_cli_until(command: list[str], run_dir: Path, seconds: float, box: float, startup: float) -> dict[str, Any]:
    """Start ``command``; let it train ``seconds`` after its first step (seen in its summary.json progress, or assumed
    after ``startup`` seconds), and until it has gone at least 2 steps beyond where it started; then SIGTERM it.
    Progress-based rather than time-based, so that a slow (or busy) machine still stops a run that has trained."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    step_before = progress_step(run_dir)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step_at = None
    while process.poll() is None and time.monotonic() - started < box:
        step = progress_step(run_dir)
        if first_step_at is None and (step > step_before or time.monotonic() - started > startup):
            first_step_at = time.monotonic()
        if first_step_at is not None and time.monotonic() - first_step_at >= seconds and step >= step_before + 2:
            break
        time.sleep(0.2)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return {"returncode": process.returncode, "output_tail": output[-1500:],
            "trained_seconds": None if first_step_at is None else round(time.monotonic() - first_step_at, 1)}


def part_cli(sizes: Sizes, work: Path, step_rates: dict[int, float], batch: int, box: float) -> dict[str, Any]:
    data = write_jpegs(work / "jpegs", sizes.jpeg_size, sizes.train_images, sizes.test_images)
    run_dir = work / "cli-run"
    workers = len(os.sched_getaffinity(0))
    command = [sys.executable, "-m", "leanmim", "pretrain", "--method", "mae", *sizes.cli_model, "--img-size",
               str(sizes.jpeg_size), "--in-chans", "3", "--data", str(data), "--max-memory-gb", "0.001",
               "--num-workers", str(workers), "--batch-size", str(batch), "--max-steps", "100000",
               "--precision", "bf16", "--log-every-steps", "5", "--logger", "csv", "--no-progress-bar",
               "--checkpoint-every-epochs", "0", "--out", str(run_dir)]
    startup = 10.0 if sizes.device == "cpu" else 40.0     # import, data listing, statistics, first step (compilation)
    first = run_cli_until(command, run_dir, sizes.cli_seconds, box * 0.6, startup)
    saved = checkpoint_step(run_dir)
    first_rows = logged_steps(run_dir)
    rates = [float(r["img_per_s"]) for r in first_rows if r.get("img_per_s")]
    rate = statistics.median(rates[len(rates) // 4:]) if rates else None     # past the start-up steps
    bare = step_rates.get(batch)
    second = run_cli_until(command, run_dir, max(2.0, sizes.cli_seconds / 6), box * 0.4, startup)
    # the second session's rows: those the first session had not logged (the log is one file, continued)
    step_rows = [int(r["step"]) for r in logged_steps(run_dir) if r.get("step") and r.get("loss_step")]
    resumed_steps = step_rows[len([r for r in first_rows if r.get("step") and r.get("loss_step")]):]
    after = checkpoint_step(run_dir)
    announced = f"(step {saved})" in second["output_tail"]     # "resumed from .../last.ckpt (step S)"
    return {
        "data": f"{sizes.train_images} train / {sizes.test_images} test JPEGs at {sizes.jpeg_size} px, streamed",
        "workers": workers, "batch": batch, "command": " ".join(command[1:]),
        "first_run": first, "images_per_second": rate, "bare_step_images_per_second": bare,
        "share_of_step_time_not_compute": None if rate is None or bare is None else max(0.0, 1 - rate / bare),
        "saved_step": saved, "resume_run": second, "resumed_first_logged_step": min(resumed_steps, default=None),
        "step_after_resume": after,
        "sigterm_exit_143": first["returncode"] == 143,
        "resumed_from_saved_step": bool(saved and announced and resumed_steps and min(resumed_steps) >= saved
                                        and after is not None and after > saved),
        "data_dir": str(data), "run_dir": str(run_dir),
    }


# ----------------------------------------------------------------------------- 4. probe, fine-tune

def part_probe(cli: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    start = time.perf_counter()
    result = api.probe(cli["run_dir"], data=cli["data_dir"], linear_epochs=sizes.linear_epochs)
    return {"knn_top1": result["knn_top1"], "linear_top1": result["linear_top1"],
            "seconds": round(time.perf_counter() - start, 1)}


def part_finetune(cli: dict[str, Any], sizes: Sizes, work: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = api.finetune(cli["run_dir"], data=cli["data_dir"], out=str(work / "finetune"),
                          epochs=sizes.finetune_epochs, batch_size=min(cli["batch"], 128), progress_bar=False)
    return {"epochs": sizes.finetune_epochs, "selected_test_top1": result["selected_test_top1"],
            "seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------- 5. quality on a 14 x 14 grid

def part_quality(sizes: Sizes, work: Path, deadline: float) -> dict[str, Any]:
    import quality

    data = "fashion-mnist"
    if sizes.quality_subset is not None:
        data = str(quality.write_subset(work / "fmnist-subset", *sizes.quality_subset))
    base = quality.base_config(REPO / "configs" / "demo.yaml", data)
    model = dataclasses.replace(base.model, img_size=56, patch_size=4)
    if sizes.quality_subset is not None:
        model = dataclasses.replace(model, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                    decoder_num_heads=2)
    train = dataclasses.replace(base.train, precision="bf16")
    if sizes.quality_subset is not None:
        train = dataclasses.replace(train, batch_size=32)
    base = dataclasses.replace(base, model=model, train=train)
    num_images = sizes.quality_subset[0] if sizes.quality_subset else 60000
    rows = []
    for method in sizes.quality_methods:
        if time.monotonic() + sizes.quality_seconds * 1.5 > deadline:
            rows.append({"method": method, "skipped": "time box spent"})
            continue
        method_dir = work / "quality" / method
        plan = quality.plan_steps(base, method, 0, method_dir, sizes.quality_seconds / 60, 10, num_images, method_dir)
        summary = api.pretrain(quality.run_config(base, method, 0, method_dir / "run", max_steps=plan["max_steps"]))
        probe = api.probe(method_dir / "run", linear_epochs=sizes.linear_epochs)
        rows.append({"method": method, "steps": summary["global_step"], "train_seconds": summary["train_seconds_this_session"],
                     "images_per_second": summary["images_per_second"], "knn_top1": probe["knn_top1"],
                     "linear_top1": probe["linear_top1"]})
        log(f"quality {method}: kNN {probe['knn_top1']:.4f}, linear {probe['linear_top1']:.4f}")
    return {"grid": "56 px, patch 4 (14 x 14)", "budget_seconds_each": sizes.quality_seconds, "rows": rows}


# ----------------------------------------------------------------------------- report

def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Device check ({report['device_name']}, {report['mode']})", "",
             f"bf16 matmul ceiling: {fmt(report.get('ceiling', {}).get('tflops'))} TFLOP/s", "",
             "| method | compile | batch | img/s | fraction of ceiling | peak GiB |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in report.get("steps", {}).get("rows", []):
        note = row.get("skipped") or row.get("error")
        if note:
            lines.append(f"| {row['method']} | {row['compile']} | - | {note} | - | - |")
        else:
            lines.append(f"| {row['method']} | {row['compile']} | {row['batch']} | {row['images_per_second']:.0f} | "
                         f"{row['fraction_of_ceiling']:.1%} | {fmt(row['peak_memory_gib'], '.1f')} |")
    comparison = report.get("published")
    if comparison:
        lines += ["", f"MAE {comparison['mae_images_per_second']:.0f} img/s here vs {PUBLISHED_MAE_RATE:.0f} on an RTX A6000 "
                  f"({A6000_BF16_DENSE_TFLOPS} TFLOP/s bf16 dense): {comparison['ratio_per_tflop']:.2f} x per TFLOP/s of peak"]
    cli = report.get("cli")
    if cli:
        lines += ["", f"leanmim pretrain (MAE, batch {cli['batch']}, {cli['workers']} workers, {cli['data']}): "
                  f"{fmt(cli['images_per_second'], '.0f')} img/s, bare step {fmt(cli['bare_step_images_per_second'], '.0f')}; "
                  f"share of step time not compute {fmt(cli['share_of_step_time_not_compute'], '.1%')}; SIGTERM exit 143: "
                  f"{cli['sigterm_exit_143']}; saved step {cli['saved_step']}, resumed from it: {cli['resumed_from_saved_step']} "
                  f"(first logged step {cli['resumed_first_logged_step']}, then step {cli['step_after_resume']})"]
    for name in ("probe", "finetune"):
        if report.get(name):
            lines.append(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in report[name].items()))
    quality_rows = report.get("quality", {}).get("rows", [])
    if quality_rows:
        lines += ["", f"Equal GPU time ({report['quality']['budget_seconds_each']} s each, {report['quality']['grid']}):", "",
                  "| method | steps | kNN | linear |", "| --- | ---: | ---: | ---: |"]
        for row in quality_rows:
            if "skipped" in row:
                lines.append(f"| {row['method']} | {row['skipped']} | - | - |")
            else:
                lines.append(f"| {row['method']} | {row['steps']} | {row['knn_top1']:.2%} | {row['linear_top1']:.2%} |")
    for name, error in report.get("errors", {}).items():
        lines.append(f"\n{name} failed: {error.splitlines()[-1] if error else ''}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite's run)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "device"),
                        help="directory for device_check.json and device_check.md")
    parser.add_argument("--minutes", type=float, default=7.0, help="time for all parts together [7]")
    parser.add_argument("--work", help="scratch directory [a temporary one]")
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        parser.error(f"--minutes must be a positive number, got {args.minutes}")
    sizes = smoke_sizes() if args.smoke else full_sizes()
    if sizes.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: run it on a GPU machine, or pass --smoke for the CPU check")
    device = torch.device(sizes.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="leanmim-device-check-"))
    start = time.monotonic()
    total = args.minutes * 60
    # the share of the whole time each part may take, counted from the start (a part past its box is cut short)
    boxes = {"ceiling": 0.03, "steps": 0.42, "cli": 0.72, "probe": 0.77, "finetune": 0.84, "quality": 1.0}
    report: dict[str, Any] = {"mode": "smoke (CPU)" if args.smoke else "full", "torch": torch.__version__,
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "cpu_count": len(os.sched_getaffinity(0)), "errors": {}}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def attempt(name: str, run: Callable[[], Any]) -> None:
        try:
            report[name] = run()
        except Exception:  # noqa: BLE001 - a failing part is recorded; the rest still runs
            report["errors"][name] = traceback.format_exc()[-2000:]
            log(f"{name} failed:\n{report['errors'][name]}")
        report[f"{name}_done_at_s"] = round(time.monotonic() - start, 1)
        (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))

    attempt("ceiling", lambda: matmul_ceiling(device, sizes.matmul))
    ceiling = report.get("ceiling", {}).get("flops", float("nan"))
    attempt("steps", lambda: part_steps(sizes, device, ceiling, start + boxes["steps"] * total))
    if "steps" in report:
        report["published"] = published_comparison(report["steps"], ceiling)
    mae_rows = [r for r in report.get("steps", {}).get("rows", []) if r["method"] == "mae" and "batch" in r
                and not r["compile"]]
    batch = min(mae_rows[0]["batch"], 256) if mae_rows else sizes.batches[-1]
    step_rates = {r["batch"]: r["images_per_second"] for r in mae_rows}
    if batch not in step_rates and mae_rows:   # the CLI's batch was capped: time the bare step at that batch too
        step_rates[batch] = time_step("mae", ModelConfig(**sizes.model).resolved(), (batch,), device, False,
                                      sizes.timed_steps)["images_per_second"]
    cli_box = (boxes["cli"] - boxes["steps"]) * total
    attempt("cli", lambda: part_cli(sizes, work, step_rates, batch, max(cli_box, sizes.cli_seconds * 3)))
    if "cli" in report and report["cli"]["saved_step"]:
        attempt("probe", lambda: part_probe(report["cli"], sizes))
        attempt("finetune", lambda: part_finetune(report["cli"], sizes, work))
    attempt("quality", lambda: part_quality(sizes, work, start + total))
    report["seconds"] = round(time.monotonic() - start, 1)
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
