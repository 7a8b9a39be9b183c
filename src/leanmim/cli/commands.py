"""What each ``leanmim`` subcommand does: validate its arguments, call :mod:`leanmim.api`, print the result."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Sequence

from .. import catalogue
from ..config import ConfigError, RunConfig, format_img_size, parse_img_size

SIZE_FIELDS = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The YAML (if any) with the command-line flags applied on top."""
    values = RunConfig.load_yaml(args.config).to_dict() if args.config else RunConfig().to_dict()
    given = {key: value for key, value in vars(args).items() if "." in key}
    if hasattr(args, "method"):
        if args.method != values["method"]:
            values["options"] = {}  # options of another method do not carry over
        values["method"] = args.method
    if values["method"] not in catalogue.method_names():
        raise ConfigError(f"unknown method '{values['method']}': choose one of {', '.join(catalogue.method_names())}")
    method_options = {option.name for option in catalogue.method_options(values["method"])}
    for key, value in given.items():
        section, name = key.split(".", 1)
        if section == "options" and name not in method_options:
            raise ConfigError(f"--{name.replace('_', '-')} is not an option of method '{values['method']}' "
                              f"(its options: {', '.join(sorted(method_options)) or 'none'})")
        values[section][name] = value
    return RunConfig.from_dict(values, source="command line")


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def format_macs(value: float) -> str:
    return f"{value / 1e9:.3f} G"


def command_pretrain(args) -> int:
    from .. import api
    summary = api.pretrain(config_from_args(args))
    print(json.dumps(summary, indent=2) if args.json else
          f"done: {summary['global_step']} steps, run directory {summary['run_dir']}")
    return 0


def command_probe(args) -> int:
    from .. import api
    report = api.probe(args.run, data=args.data, baseline=args.baseline, pool=args.pool, k=args.k,
                       temperature=args.temperature, linear_epochs=args.linear_epochs, precision=args.precision,
                       val_fraction=args.val_fraction, split_seed=args.split_seed,
                       labels_per_class=args.labels_per_class, label_fraction=args.label_fraction)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['features']} ({report['num_train']} train / {report['num_test']} test images, "
              f"{report['feature_dim']}-d features): kNN top-1 {100 * report['knn_top1']:.2f}%"
              + (f"  linear top-1 {100 * report['linear_top1']:.2f}%" if report['linear_top1'] is not None else ""))
    return 0


def command_reconstruct(args) -> int:
    from .. import api
    print(api.reconstruct(args.run, args.out, num_images=args.num_images, data=args.data, seed=args.seed,
                          overwrite=args.overwrite))
    return 0


def command_export(args) -> int:
    from .. import api
    print(api.export(args.run, args.out, overwrite=args.overwrite, format=args.format))
    return 0


def check_positive(args, names: Sequence[str], command: str) -> None:
    """One line for a size flag given as 0 or less (``--img-size 0`` must not count the default 224 px)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"{command} --{name.replace('_', '-')} must be a positive integer, got {value}")


def command_cost(args) -> int:
    from .. import api
    check_positive(args, ("patch_size", "in_chans", *SIZE_FIELDS), "cost")
    args.img_size = None if args.img_size is None else parse_img_size(args.img_size, "cost --img-size")
    if args.token_drop is not None and not 0.0 <= args.token_drop < 1.0:
        raise ConfigError(f"cost --token-drop must lie in [0, 1), got {args.token_drop}")
    options = {}
    for item in args.option or []:
        if "=" not in item:
            raise ConfigError(f"--option expects NAME=VALUE, got '{item}'")
        name, value = item.split("=", 1)
        options[name.replace("-", "_")] = value
    encoder_kwargs = {"token_drop": args.token_drop} if args.token_drop is not None else {}
    model_overrides = {key: getattr(args, key) for key in SIZE_FIELDS if getattr(args, key) is not None}
    method, model, img_size, patch_size, in_chans = args.method, args.model, args.img_size, args.patch_size, args.in_chans
    if args.config:  # a run's config.yaml: its method, model and options, unless given on the command line
        config = RunConfig.load_yaml(args.config)
        method = args.method or config.method
        options = {**(config.options if method == config.method else {}), **options}
        known = {key: value for key, value in vars(config.model).items() if value is not None}
        model, img_size = args.model or known.pop("name"), args.img_size or known.pop("img_size", None)
        patch_size, in_chans = args.patch_size or known.pop("patch_size", None), args.in_chans or known.pop("in_chans", None)
        model_overrides = {**{k: v for k, v in known.items() if k in SIZE_FIELDS + ("mlp_ratio",)}, **model_overrides}
    result = api.cost(method or "mae", model or "vit_base_patch16", img_size or 224, patch_size, in_chans or 3,
                      options, inference=args.inference, model_overrides=model_overrides, **encoder_kwargs)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['method']} / {result['model']} @ {format_img_size(result['img_size'])} px, patch {result['patch_size']}: "
          f"{result['mode']}")
    print_table([(f"MACs {name}", format_macs(value)) for name, value in result["macs"].items()]
                + [(f"params {name}", f"{value / 1e6:.2f} M") for name, value in result["params"].items()])
    return 0


def command_methods(args) -> int:
    from ..config import MODEL_PRESETS, TIMM_EXAMPLES, TIMM_NAMES
    listing = catalogue.listing()
    if args.json:
        print(json.dumps(listing, default=str))
        return 0
    print("models (--model):")
    for name, preset in MODEL_PRESETS.items():
        print(f"    {name:<30} {preset['embed_dim']} wide, {preset['depth']} blocks, {preset['num_heads']} heads, "
              f"patch {preset['patch_size']} (exports as timm {TIMM_NAMES[name]})")
    print(f"    or any timm name that builds a plain ViT, e.g. {', '.join(TIMM_EXAMPLES)}\n")
    for name, entry in listing.items():
        print(f"{name}: {entry['summary']}")
        for option, meta in entry["options"].items():
            print(f"    --{option.replace('_', '-'):<28} {str(meta['default']):<12} {meta['help']}")
    return 0


def command_finetune(args) -> int:
    from .. import api
    from ..train.console import plural
    settings = {key.split(".", 1)[1]: value for key, value in vars(args).items() if key.startswith("finetune.")}
    results = api.finetune(args.run, **settings)
    if args.json:
        print(json.dumps(results))
    elif results["selected_epoch"] is None:
        print(f"nothing to do: no epoch evaluated, output directory {results['out']}")
    elif results["selected_test_top1"] is None:
        print(f"stopped after {plural(results['epochs_completed'], 'epoch')} (validation top-1 "
              f"{100 * results['last_val_top1']:.2f}%): rerun to finish; output directory {results['out']}")
    else:
        print(f"fine-tuned {results['method']} encoder, {plural(results['epochs_completed'], 'epoch')}; "
              f"selected on validation: "
              f"epoch {results['selected_epoch']} (val top-1 {100 * results['selected_val_top1']:.2f}%), test top-1 "
              f"{100 * results['selected_test_top1']:.2f}%; last epoch: test top-1 "
              f"{100 * results['last_test_top1']:.2f}%; output directory {results['out']}")
    return 0


def parse_method_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """['lomar.window_size=5', …] -> {'lomar': {'window_size': '5'}}."""
    options: dict[str, dict[str, str]] = {}
    for item in items or []:
        target, _, value = item.partition("=")
        method, _, name = target.partition(".")
        if not (value and method and name):
            raise ConfigError(f"--option expects METHOD.NAME=VALUE, got '{item}'")
        options.setdefault(method, {})[name.replace("-", "_")] = value
    return options


def command_bench(args) -> int:
    from .. import api
    check_positive(args, ("patch_size", "in_chans"), "bench")
    args.img_size = None if args.img_size is None else parse_img_size(args.img_size, "bench --img-size")
    from ..eval.bench import format_bench_table
    model = dataclasses.asdict(RunConfig.load_yaml(args.config).model) if args.config else {}
    given = {"name": args.model, "img_size": args.img_size, "patch_size": args.patch_size, "in_chans": args.in_chans}
    model.update({key: value for key, value in given.items() if value is not None})
    name, img_size = model.pop("name", "vit_base_patch16"), model.pop("img_size", None) or 224
    patch_size, in_chans = model.pop("patch_size", None), model.pop("in_chans", None) or 3
    result = api.bench(args.methods, model=name, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                       steps=args.steps, batch_size=args.batch_size, precision=args.precision,
                       warmup_steps=args.warmup_steps, options=parse_method_options(args.option),
                       model_overrides=model, device=args.device, plot=args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_bench_table(result))
        if args.out:
            print(f"plot: {result['plot']}")
    return 0


def command_shard(args) -> int:
    from ..data import write_shards
    from ..train.lock import hold_directory
    lock = hold_directory(args.out)   # one writer per --out (released by the kernel if this process dies)
    manifest = write_shards(args.source, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    lock.path.unlink(missing_ok=True)  # done: the directory holds the shards and their manifest only
    lock.release()
    if args.json:
        print(json.dumps(manifest))
    else:
        for split, entry in manifest["splits"].items():
            print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards, --data "
                  f"'{args.out}/{entry['pattern']}'")
        print(f"manifest: {args.out}/manifest.json (--data {args.out} reads the train split, or both for probe/finetune)")
    return 0


def command_predict(args) -> int:
    from .. import api
    result = api.predict(args.finetuning, args.data, args.out, top_k=args.top_k, batch_size=args.batch_size,
                         overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"predicted {result['rows']} images ({result['skipped']} unreadable, skipped) into {result['out']}")
    return 0


def command_embed(args) -> int:
    import warnings

    from .. import api
    with warnings.catch_warnings():   # the skipped images are printed below, once
        warnings.filterwarnings("ignore", message="embed skipped")
        result = api.embed(args.source, args.data, args.out, pool=args.pool, batch_size=args.batch_size,
                           overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"embedded {result['rows']} images ({result['feature_dim']}-d {result['pool']} features) into {result['out']}")
    if result["skipped"]:
        examples = ", ".join(result["skipped_examples"][:3])
        print(f"skipped {result['skipped']} unreadable image(s): {examples}{', ...' if result['skipped'] > 3 else ''}")
    return 0


def command_status(args) -> int:
    from .. import api
    from ..eval.status import format_status
    result = api.status(args.run)
    print(json.dumps(result) if args.json else format_status(result))
    return 0


def command_runs(args) -> int:
    from .. import api
    from ..eval.status import format_status
    found = api.runs(args.directory)
    if args.json:
        print(json.dumps(found))
    else:
        print("\n".join(format_status(status) for status in found) or f"no runs below {args.directory}")
    return 0
