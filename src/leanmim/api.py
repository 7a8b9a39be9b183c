"""The Python API; each function is one ``leanmim`` subcommand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig, RunConfig
from .files import atomic_write_text, dumps_strict, read_json_object
from .parts.encoder import pool_features
from .train.precision import default_device
from .train.run import check_output_directory, check_output_file
from .weights import load_run


def _quiet(function):
    """Run ``function`` inside :func:`leanmim.train.console.quiet` (imported on call: it imports Lightning)."""
    import functools

    @functools.wraps(function)
    def quieted(*args, **kwargs):
        from .train.console import quiet
        with quiet():
            return function(*args, **kwargs)
    return quieted


def pretrain(config: RunConfig | dict | str | Path | None = None, callbacks=(), **settings: Any) -> dict[str, Any]:
    """Pretrain, like ``leanmim pretrain``; returns the run summary.

    ``config``: a RunConfig, a dict, or a YAML path (a run's ``config.yaml``); ``settings`` override it by
    the command line's names, lightly-train style::

        api.pretrain(out="runs/demo", data="photos/", model="vit_small_patch16_224", method="mae", epochs=20)

    A setting is a field of the model / data / train sections (``img_size``, ``batch_size``, ``epochs``, …),
    ``model`` (the model name), ``data`` (the data path), ``method``, or an option of the method (``mask_ratio``);
    a whole section may be given as a dict (``train={"epochs": 2}``). An unknown name is a one-line ConfigError.
    """
    from .train.pretrain import pretrain as run_pretraining

    if config is None:
        values = RunConfig().to_dict()
    elif isinstance(config, RunConfig):
        values = config.to_dict()
    elif isinstance(config, (str, Path)):
        values = RunConfig.load_yaml(config).to_dict()
    elif isinstance(config, dict):
        values = RunConfig.from_dict(config).to_dict()
    else:
        raise ConfigError(f"pretrain(config=...) takes a RunConfig, a dict or a YAML path, got {type(config).__name__}")
    return run_pretraining(RunConfig.from_dict(apply_settings(values, settings), source="pretrain()"), callbacks)


def apply_settings(values: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``values`` (RunConfig.to_dict()) with keyword ``settings`` applied by name (see :func:`pretrain`)."""
    from . import catalogue
    from .config import SECTIONS

    settings = dict(settings)
    if "method" in settings:
        if settings["method"] != values["method"]:
            values["options"] = {}  # options of another method do not carry over
        values["method"] = settings.pop("method")
    if values["method"] not in catalogue.method_names():
        raise ConfigError(f"unknown method '{values['method']}': choose one of {', '.join(catalogue.method_names())}")
    fields = {}  # name -> (section, field): the CLI name (model, data) and every field name
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            fields.setdefault(field.name, (section, field.name))
            if field.metadata.get("cli"):
                fields[field.metadata["cli"]] = (section, field.name)
    method_options = {option.name for option in catalogue.method_options(values["method"])}
    for key, value in settings.items():
        if key in SECTIONS and isinstance(value, dict):
            values[key] = {**values[key], **value}
        elif key == "options" and isinstance(value, dict):
            values["options"] = {**values["options"], **value}
        elif key in fields:
            section, name = fields[key]
            values[section][name] = str(value) if isinstance(value, Path) else value
        elif key in method_options:
            values["options"][key] = value
        else:
            raise ConfigError(f"pretrain(): unknown setting '{key}': use a model/data/train field (e.g. img_size, "
                              f"batch_size, epochs, out), model=, data=, method=, or an option of "
                              f"'{values['method']}' ({', '.join(sorted(method_options)) or 'none'})")
    return values


@_quiet
def probe(run: str | Path | None = None, data: str | None = None, baseline: str | None = None, pool: str = "mean",
          k: int = 20, temperature: float = 0.07, linear_epochs: int = 100, batch_size: int = 256,
          precision: str = "auto", seed: int = 0, val_fraction: float = 0.0, split_seed: int = 0,
          labels_per_class: int | None = None, label_fraction: float | None = None) -> dict[str, Any]:
    """Frozen-feature evaluation (weighted kNN + linear probe) on the labelled train/test splits.

    ``baseline``: None (the run's encoder), ``"random"`` (same architecture, untrained) or
    ``"raw"`` (raw pixels; needs no run). Results are written to ``RUN_DIR/probe*.json``.
    The probe chooses nothing (fixed k, epochs and learning rate), so it needs no validation split; a
    ``val_fraction`` > 0 leaves out the images ``finetune`` validates on at that ``split_seed``, so that
    ``labels_per_class`` / ``label_fraction`` (stratified, seeded subsets of the rest) draw the very
    images a fine-tune with the same options trains on.
    """
    from .data import build_labelled_splits, default_channels, default_img_size
    from .data.splits import carve_splits
    from .eval.probe import probe as run_probe
    from .eval.probe import raw_pixel_features
    from .train.precision import bf16_supported
    from .train.run import write_summary

    if baseline not in (None, "random", "raw"):
        raise ConfigError(f"unknown baseline '{baseline}': use random or raw")
    check_probe_settings(k, temperature, linear_epochs, batch_size)
    loaded = load_run(run) if run is not None else None
    if loaded is None and baseline != "raw":
        raise ConfigError("probe needs a run directory or checkpoint (or --baseline raw with --data)")
    data = data or (loaded.config.data.path if loaded else "fashion-mnist")
    if loaded:
        model = loaded.config.model
    else:
        size = default_img_size(data) or 224
        # raw pixels: only the image geometry matters (no encoder, so no patch grid to validate)
        model = ModelConfig(img_size=size, in_chans=default_channels(data) or 3)
    splits = build_labelled_splits(data, model.img_size, model.in_chans)
    subsets = carve_splits(splits.train, splits.test, val_fraction, split_seed, labels_per_class, label_fraction)
    if k > len(subsets.train):
        raise ConfigError(f"--k {k} is larger than the {len(subsets.train)} labelled training images: "
                          f"pass --k {min(20, len(subsets.train))} or less")

    device = default_device()
    if baseline == "raw":
        feature_fn, name = raw_pixel_features, "raw pixels"
    else:
        method = loaded.method
        if baseline == "random":
            method, name = loaded.untrained_method(seed), "random encoder"
        else:
            name = f"{loaded.config.method} encoder"
            loaded.warn_if_unfinished("the probe")
        encoder = method.encoder.to(device)
        feature_fn = lambda images: pool_features(encoder.forward_features(images), pool)  # noqa: E731
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(device.type))
    result = run_probe(feature_fn, subsets.train, splits.test, splits.num_classes, batch_transform=splits.batch_transform,
                       device=device,
                       autocast_dtype=torch.bfloat16 if use_bf16 else None, k=k, temperature=temperature,
                       linear_epochs=linear_epochs, seed=seed, batch_size=batch_size)
    subset = {"val_fraction": val_fraction, "split_seed": split_seed, "labels_per_class": labels_per_class,
              "label_fraction": label_fraction} if (val_fraction or labels_per_class or label_fraction) else {}
    report = {"features": name, "pool": pool if baseline != "raw" else None, "data": data, **result.as_dict(), **subset}
    if loaded is not None:
        report["checkpoint"] = str(loaded.checkpoint_path)
        report["global_step"] = loaded.global_step
        if baseline is None:
            report["pretraining_finished"] = loaded.unfinished is None
        run_dir = loaded.checkpoint_path.parent.parent
        if (run_dir / "config.yaml").is_file():
            # one file per probed checkpoint and setting: probes of other steps or settings never overwrite it
            settings = {"baseline": baseline, "pool": report["pool"], "data": data, "k": k, "temperature": temperature,
                        "linear_epochs": linear_epochs, "batch_size": batch_size, "precision": precision, "seed": seed,
                        "global_step": loaded.global_step, **subset}
            key = probe_result_name(settings)
            atomic_write_text(run_dir / "probes" / f"{key}.json", dumps_strict(report))
            probes = read_json_object(run_dir / "summary.json").get("probes")   # a damaged summary is rewritten
            write_summary(run_dir, {"probes": {**(probes if isinstance(probes, dict) else {}), key: report}})
            report["saved_to"] = str(run_dir / "probes" / f"{key}.json")
    return report


def check_probe_settings(k: int, temperature: float, linear_epochs: int, batch_size: int) -> None:
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    if not temperature > 0:
        raise ConfigError(f"--temperature must be positive, got {temperature}")
    if linear_epochs < 0:
        raise ConfigError(f"--linear-epochs must be 0 (kNN only) or more, got {linear_epochs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")


def probe_result_name(settings: dict[str, Any]) -> str:
    """``encoder-mean-step1638-3f2a9c1e``: what was probed, at which step, and a hash of every other setting."""
    import hashlib

    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{settings['baseline'] or 'encoder'}-{settings['pool'] or 'pixels'}-step{settings['global_step']}-{digest}"


def reconstruct(run: str | Path, out: str | Path, num_images: int = 8, data: str | None = None, seed: int = 0,
                overwrite: bool = False) -> Path:
    """Draw original / masked / reconstruction / reconstruction + visible for ``num_images`` images
    (an existing ``out`` is refused unless ``overwrite``)."""
    from .data import build_pretrain_data
    from .eval.reconstruct import reconstruction_panels, save_reconstruction_grid

    if not 1 <= num_images <= 256:
        raise ConfigError(f"--num-images must lie between 1 and 256, got {num_images}")
    check_output_file(out, overwrite, suffixes=(".png",))
    loaded = load_run(run)
    model = loaded.config.model
    data = build_pretrain_data(data or loaded.config.data.path, model.img_size, model.in_chans, augment=False)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(data.dataset), generator=generator)[:num_images].tolist()
    images = torch.stack([data.dataset[i] for i in indices])
    if data.batch_transform is not None:
        images = data.batch_transform(images)
    device = default_device()
    panels = reconstruction_panels(loaded.method.to(device), images.float().to(device), seed=seed)
    return save_reconstruction_grid(panels, data.mean, data.std, out)


def export(run: str | Path, out: str | Path, overwrite: bool = False, format: str = "timm") -> Path:
    """Write the run's weights for another library; an existing ``out`` is refused unless ``overwrite``.

    ``timm`` (default): the encoder (a fine-tuning result: encoder, fc_norm and head) as a ``.safetensors`` file,
    or, when ``out`` does not end in ``.safetensors``, a timm ``local-dir`` folder (``model.safetensors`` +
    ``config.json``); both carry timm's ``pretrained_cfg`` (input size, the evaluation crop, the training data's
    mean/std, pooling; a fine-tuning's class names). ``hf``: a transformers directory — a pretraining as
    ``ViTMAEForPreTraining`` (with the decoder) or ``ViTModel``; a fine-tuning as ``ViTForImageClassification``
    (``--pool cls``) or ``BeitForImageClassification`` (``--pool mean``: BEiT's mean-pooling head is leanmim's),
    with ``id2label``/``label2id`` — plus ``preprocessor_config.json`` and a model card, written atomically."""
    from .weights import export_encoder, export_finetuned, export_hf, read_finetune_entry, run_data_stats
    from .weights.crop_pct import pretraining_crop_pct

    if format not in ("timm", "hf"):
        raise ConfigError(f"unknown export format '{format}': use timm or hf")
    if format == "hf" or Path(out).suffix != ".safetensors":
        check_output_directory(out, overwrite)
    else:
        check_output_file(out, overwrite, suffixes=(".safetensors",))
    if read_finetune_entry(run) is not None:
        # timm: a .safetensors file, or a local-dir folder with its labels; hf: a transformers classifier directory
        return export_finetuned(run, out, format=format)
    loaded = load_run(run)
    mean, std = run_data_stats(loaded.checkpoint_path, loaded.config)
    crop_pct = pretraining_crop_pct(loaded.config)
    if format == "hf":
        return export_hf(loaded.method, loaded.config.model, out, loaded.config.options, mean=mean, std=std,
                         crop_pct=crop_pct, checkpoint_path=loaded.checkpoint_path)
    return export_encoder(loaded.method.encoder, loaded.config.model, out, mean, std, crop_pct=crop_pct)


def predict(finetuning: str | Path, data: str, out: str | Path, top_k: int | None = None, batch_size: int = 64,
            overwrite: bool = False) -> dict[str, Any]:
    """Classify every image below ``data`` with a fine-tuning's selected classifier; writes a CSV (see
    :mod:`leanmim.eval.predict`) and returns a summary (rows, skipped images, the CSV's path). ``top_k``: classes
    per image (None: min(5, the number of classes))."""
    from .eval.predict import predict as run_predict

    return run_predict(finetuning, data, out, top_k=top_k, batch_size=batch_size, overwrite=overwrite)


def embed(source: str | Path, data: str, out: str | Path, pool: str = "mean", batch_size: int = 64,
          overwrite: bool = False) -> dict[str, Any]:
    """The frozen encoder's features of every image below ``data`` (a directory, recursive, one image, or shards),
    written atomically to ``out`` (``.safetensors``: tensor ``features`` (N, F) float32, the N image paths relative
    to ``data`` in its metadata; read it back with :func:`leanmim.eval.embed.read_embeddings`).

    ``source``: a pretraining run or a fine-tuning (directory or checkpoint), evaluated with its own preprocessing
    (data mean/std, resize + centre crop); or an export or any weights ``--init-from`` reads, with the preprocessing
    the file states (else the images' own mean/std and a 0.875 crop, said in a warning). ``pool`` as
    :func:`probe`'s (mean, cls, cls+mean, tokens). Unreadable images are skipped and counted; returns a summary
    (rows, feature_dim, skipped, skipped_examples, out)."""
    from .eval.embed import embed as run_embed

    return run_embed(source, data, out, pool=pool, batch_size=batch_size, overwrite=overwrite)


def status(run: str | Path) -> dict[str, Any]:
    """Where a pretraining or fine-tuning run stands (see :mod:`leanmim.eval.status`)."""
    from .eval.status import run_status

    return run_status(run)


def runs(directory: str | Path) -> list[dict[str, Any]]:
    """The status of every run below ``directory``."""
    from .eval.status import find_runs

    return find_runs(directory)


def finetune(run: str | Path, callbacks=(), **settings: Any) -> dict[str, Any]:
    """Fine-tune a run's encoder for classification (MAE protocol), like ``leanmim finetune``.

    ``settings`` are :class:`leanmim.config.FinetuneConfig` fields (epochs, batch_size, base_lr, lr,
    token_drop, pool, val_fraction, labels_per_class, out, precision, …). Rerunning with the same ``out``
    resumes. Returns the results (validation top-1 per epoch; the epoch selected on validation; test top-1
    of the selected and of the last checkpoint), also written to ``OUT/finetune.json``.
    """
    from .config import FinetuneConfig
    from .train.finetune import finetune as run_finetuning

    return run_finetuning(run, FinetuneConfig.from_dict(settings, "finetune settings"), callbacks)


@_quiet
def bench(methods: str | list[str] | None = None, model: str = "vit_base_patch16", img_size: int = 224,
          patch_size: int | None = None, in_chans: int = 3, steps: int = 10, batch_size: int = 32,
          precision: str = "auto", warmup_steps: int = 2, options: dict[str, dict[str, Any]] | None = None,
          model_overrides: dict[str, Any] | None = None, device: str = "auto",
          plot: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Counted MACs, measured training img/s and peak memory of methods side by side, each relative to MAE,
    like ``leanmim bench``. ``methods``: names or a comma-separated string (default: every registered method);
    ``options``: per-method option overrides; ``plot``: also draw a PNG bar chart there."""
    from .eval.bench import bench as run_bench
    from .eval.bench import save_bench_plot

    if plot is not None:
        check_output_file(plot, overwrite, suffixes=(".png", ".pdf", ".svg"))
    if steps < 1 or warmup_steps < 0 or batch_size < 1:
        raise ConfigError(f"bench needs --steps >= 1, --warmup-steps >= 0 and --batch-size >= 1 "
                          f"(got {steps}, {warmup_steps}, {batch_size})")
    model_config = ModelConfig(name=model, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                               **(model_overrides or {})).resolved()
    if isinstance(methods, str):
        methods = [name.strip() for name in methods.split(",") if name.strip()]
    result = run_bench(methods, model_config, steps=steps, batch_size=batch_size, precision=precision,
                       warmup_steps=warmup_steps, options=options, device=device)
    if plot is not None:
        result["plot"] = str(save_bench_plot(result, plot))
    return result


def cost(method: str = "mae", model: str = "vit_base_patch16", img_size: int = 224, patch_size: int | None = None,
         in_chans: int = 3, options: dict[str, Any] | None = None, inference: bool = False,
         model_overrides: dict[str, Any] | None = None, **encoder_kwargs: Any) -> dict[str, Any]:
    """MACs per image (counted) and parameter counts of a method/model, like ``leanmim cost``."""
    from .eval.cost import method_cost

    model_config = ModelConfig(name=model, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                               **(model_overrides or {})).resolved()
    return method_cost(method, model_config, options, inference=inference, **encoder_kwargs)


def methods() -> dict[str, dict[str, Any]]:
    """Registered methods (including any registered at run time): summary and options with defaults and meanings."""
    from .catalogue import from_registry, listing

    return listing(from_registry())
