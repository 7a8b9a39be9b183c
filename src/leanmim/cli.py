"""The ``leanmim`` command. Thin: parse, validate, call :mod:`leanmim.api`, print.

Errors the user can fix are printed as one line (``leanmim: error: …``) with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
from typing import Any, Sequence

from . import __version__, catalogue
from .catalogue import OptionSpec
from .config import SECTIONS, ConfigError, RunConfig, field_type


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of usage + error."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see '{self.prog} --help')")


VERBOSE_HELP = ("show every message of the libraries (Lightning, torch) as they print it; by default leanmim "
                "prints its start summary and one progress line")

# Model width/depth fields that `leanmim cost` takes as flags (over the named preset).
SIZE_FIELDS = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def cli_name(field: dataclasses.Field) -> str:
    return field.metadata.get("cli") or field.name


def add_field_flag(group, field: dataclasses.Field | OptionSpec, dest: str, default_text: str | None = None) -> None:
    kind = field_type(field.type)
    flag = "--" + cli_name(field).replace("_", "-")
    help_text = f"{field.metadata.get('help', '')} [{default_text or f'default: {field.default}'}]"
    if kind is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
    else:
        group.add_argument(flag, dest=dest, type=str, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                           help=help_text)


def method_option_defaults() -> dict[str, tuple[OptionSpec, dict[str, Any]]]:
    """Option name -> (the option in the first method that has it, {method: its default there})."""
    options: dict[str, tuple[OptionSpec, dict[str, Any]]] = {}
    for name in catalogue.method_names():
        for option in catalogue.method_options(name):
            options.setdefault(option.name, (option, {}))[1][name] = option.default
    return options


def option_default_text(defaults: dict[str, Any], all_methods: list[str]) -> str:
    """The default, and which methods take the option (all if unsaid); per method where their defaults differ."""
    shown = {method: "none" if value in ("", None) else value for method, value in defaults.items()}
    if len({repr(value) for value in shown.values()}) == 1:
        users = "" if sorted(shown) == sorted(all_methods) else f" ({', '.join(shown)})"
        return f"default: {next(iter(shown.values()))}{users}"
    return "default per method: " + ", ".join(f"{method} {value}" for method, value in shown.items())


def add_pretrain_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (model/data/train sections) and per option of every registered method
    (from the catalogue: no torch import for ``--help``)."""
    methods = catalogue.method_names()
    parser.add_argument("--config", help="YAML written by a previous run (or by hand); flags override it")
    parser.add_argument("--method", default=argparse.SUPPRESS, help=f"one of {', '.join(methods)} [default: mae]")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for field in dataclasses.fields(cls):
            add_field_flag(group, field, f"{section}.{field.name}")
    group = parser.add_argument_group("method options (the methods that take each one, with their defaults; "
                                      "see 'leanmim methods')")
    for name, (option, defaults) in method_option_defaults().items():
        add_field_flag(group, option, f"options.{name}", option_default_text(defaults, methods))


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
    from . import api
    summary = api.pretrain(config_from_args(args))
    print(json.dumps(summary, indent=2) if args.json else
          f"done: {summary['global_step']} steps, run directory {summary['run_dir']}")
    return 0


def command_probe(args) -> int:
    from . import api
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
    from . import api
    print(api.reconstruct(args.run, args.out, num_images=args.num_images, data=args.data, seed=args.seed,
                          overwrite=args.overwrite))
    return 0


def command_export(args) -> int:
    from . import api
    print(api.export(args.run, args.out, overwrite=args.overwrite, format=args.format))
    return 0


def check_positive(args, names: Sequence[str], command: str) -> None:
    """One line for a size flag given as 0 or less (``--img-size 0`` must not count the default 224 px)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"{command} --{name.replace('_', '-')} must be a positive integer, got {value}")


def command_cost(args) -> int:
    from . import api
    check_positive(args, ("img_size", "patch_size", "in_chans", *SIZE_FIELDS), "cost")
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
    print(f"{result['method']} / {result['model']} @ {result['img_size']} px, patch {result['patch_size']}: "
          f"{result['mode']}")
    print_table([(f"MACs {name}", format_macs(value)) for name, value in result["macs"].items()]
                + [(f"params {name}", f"{value / 1e6:.2f} M") for name, value in result["params"].items()])
    return 0


def command_methods(args) -> int:
    from .config import MODEL_PRESETS, TIMM_EXAMPLES, TIMM_NAMES
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
    from . import api
    settings = {key.split(".", 1)[1]: value for key, value in vars(args).items() if key.startswith("finetune.")}
    results = api.finetune(args.run, **settings)
    if args.json:
        print(json.dumps(results))
    elif results["selected_epoch"] is None:
        print(f"nothing to do: no epoch evaluated, output directory {results['out']}")
    elif results["selected_test_top1"] is None:
        print(f"stopped after {results['epochs_completed']} epochs (validation top-1 "
              f"{100 * results['last_val_top1']:.2f}%): rerun to finish; output directory {results['out']}")
    else:
        print(f"fine-tuned {results['method']} encoder, {results['epochs_completed']} epochs; selected on validation: "
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
    from . import api
    check_positive(args, ("img_size", "patch_size", "in_chans"), "bench")
    from .bench import format_bench_table
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
    from .data import write_shards
    from .run import hold_directory
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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the flags of that subcommand alone (the others listed by name):
    ``pretrain`` and ``finetune`` generate their flags from classes that import torch and Lightning, which
    ``leanmim --help`` or ``leanmim cost --help`` should not wait for."""
    def wanted(name: str) -> bool:
        return only is None or only == name

    parser = OneLineParser(prog="leanmim", description="Masked image modeling pretraining for ViTs at low compute.")
    parser.add_argument("--version", action="version", version=f"leanmim {__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    pretrain = commands.add_parser("pretrain", help="pretrain an encoder (resumes a run found in --out)")
    if wanted("pretrain"):
        add_pretrain_flags(pretrain)
    pretrain.add_argument("--json", action="store_true", help="print the run summary as JSON")
    pretrain.set_defaults(handler=command_pretrain)

    probe = commands.add_parser("probe", help="kNN and linear-probe accuracy of frozen features")
    probe.add_argument("run", nargs="?", help="run directory or checkpoint")
    probe.add_argument("--data", help="labelled data (default: the run's)")
    probe.add_argument("--baseline", choices=("random", "raw"), help="probe a random encoder or raw pixels instead")
    probe.add_argument("--pool", default="mean", choices=("mean", "cls", "cls+mean", "tokens"),
                       help="image feature: mean of patch tokens, cls token, both, or all patch tokens flattened [mean]")
    probe.add_argument("--k", type=int, default=20, help="kNN neighbours [20]")
    probe.add_argument("--temperature", type=float, default=0.07, help="kNN temperature [0.07]")
    probe.add_argument("--linear-epochs", type=int, default=100, help="linear probe epochs [100]")
    probe.add_argument("--labels-per-class", type=int, help="train on this many labelled images per class "
                       "(stratified, seeded by --split-seed) [all]")
    probe.add_argument("--label-fraction", type=float, help="train on this fraction of each class's images [1]")
    probe.add_argument("--val-fraction", type=float, default=0.0, help="first leave out this fraction of each class, "
                       "as finetune's validation split (the probe selects nothing) [0]")
    probe.add_argument("--split-seed", type=int, default=0, help="seed of the left-out split and label subset [0]")
    probe.add_argument("--precision", default="auto", choices=("auto", "bf16", "32"))
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(handler=command_probe)

    reconstruct = commands.add_parser("reconstruct", help="draw reconstructions of random images")
    reconstruct.add_argument("run", help="run directory or checkpoint")
    reconstruct.add_argument("--out", required=True, help="PNG file to write")
    reconstruct.add_argument("--num-images", type=int, default=8)
    reconstruct.add_argument("--data", help="images (default: the run's data)")
    reconstruct.add_argument("--seed", type=int, default=0)
    reconstruct.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    reconstruct.set_defaults(handler=command_reconstruct)

    export = commands.add_parser("export", help="write the weights for timm (default) or transformers")
    export.add_argument("run", help="run directory or checkpoint")
    export.add_argument("--out", required=True, help="timm: FILE.safetensors, or a DIR for timm's local-dir: loader; "
                                                     "hf: a DIR for from_pretrained")
    export.add_argument("--format", default="timm", choices=("timm", "hf"),
                        help="timm VisionTransformer, or hf: transformers ViTMAEForPreTraining (with the decoder) / "
                             "ViTModel [timm]")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.set_defaults(handler=command_export)

    cost = commands.add_parser("cost", help="count MACs per image and parameters")
    cost.add_argument("--config", help="count the model and method of a run's config.yaml")
    cost.add_argument("--method", help="[default: mae]")
    cost.add_argument("--model", help="[default: vit_base_patch16]")
    cost.add_argument("--img-size", type=int, help="[default: 224]")
    cost.add_argument("--patch-size", type=int)
    cost.add_argument("--in-chans", type=int, help="[default: 3]")
    for field in SIZE_FIELDS:
        cost.add_argument(f"--{field.replace('_', '-')}", type=int, help="override the preset")
    cost.add_argument("--option", action="append", metavar="NAME=VALUE", help="a method option (repeatable)")
    cost.add_argument("--inference", action="store_true", help="count the plain full-image encoder forward")
    cost.add_argument("--token-drop", type=float, help="with --inference: token compression drop ratio per stage")
    cost.add_argument("--json", action="store_true", help="print one JSON object")
    cost.set_defaults(handler=command_cost)

    methods = commands.add_parser("methods", help="list methods and their options")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(handler=command_methods)

    finetune = commands.add_parser("finetune", help="fine-tune a run's encoder for classification "
                                                    "(MAE protocol; resumes a fine-tuning found in --out)")
    finetune.add_argument("run", nargs="?", help="pretraining run directory or checkpoint (or pass --init-from)")
    if wanted("finetune"):
        from .config import FinetuneConfig
        group = finetune.add_argument_group("fine-tuning")
        for field in dataclasses.fields(FinetuneConfig):
            add_field_flag(group, field, f"finetune.{field.name}")
    finetune.add_argument("--json", action="store_true", help="print the results as one JSON object")
    finetune.set_defaults(handler=command_finetune)

    bench = commands.add_parser("bench", help="MACs, training img/s and peak memory of methods, relative to MAE")
    bench.add_argument("--methods", help="comma-separated methods [default: all registered; mae is always included]")
    bench.add_argument("--config", help="take the model section from this YAML (flags override it)")
    bench.add_argument("--model", help="encoder preset [vit_base_patch16]")
    bench.add_argument("--img-size", type=int, help="image size [224]")
    bench.add_argument("--patch-size", type=int, help="patch size [the preset's]")
    bench.add_argument("--in-chans", type=int, help="image channels [3]")
    bench.add_argument("--option", action="append", metavar="METHOD.NAME=VALUE",
                       help="a method option, e.g. lomar.window_size=5 (repeatable)")
    bench.add_argument("--steps", type=int, default=10, help="timed training steps per method [10]")
    bench.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per method first [2]")
    bench.add_argument("--batch-size", type=int, default=32, help="images per step [32]")
    bench.add_argument("--precision", default="auto", choices=("auto", "bf16", "32"),
                       help="bf16 autocast or fp32 [auto: bf16 where the hardware supports it]")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[auto: cuda if available]")
    bench.add_argument("--out", help="also draw a PNG bar chart to this file")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(handler=command_bench)

    shard = commands.add_parser("shard", help="write WebDataset shards (tar) + manifest from an image folder or "
                                              "fashion-mnist")
    shard.add_argument("source", help="image folder (recursive; DIR/train/<class>/ + DIR/test/<class>/ keeps classes "
                                      "as cls), an MNIST-format directory, or fashion-mnist")
    shard.add_argument("--out", required=True, help="directory for SPLIT-000000.tar ... and manifest.json")
    shard.add_argument("--shard-size", type=int, default=10_000, help="samples per shard [10000]")
    shard.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in --out")
    shard.add_argument("--json", action="store_true", help="print the manifest as JSON")
    shard.set_defaults(handler=command_shard)
    add_use_commands(commands)
    for subparser in commands.choices.values():  # also after the command: `leanmim pretrain ... --verbose`
        subparser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def add_use_commands(commands) -> None:
    """predict, status, runs (and embed): the commands that use a trained model or read a run."""
    predict = commands.add_parser("predict", help="classify images with a fine-tuning's selected classifier (CSV)")
    predict.add_argument("finetuning", help="fine-tuning output directory or checkpoint")
    predict.add_argument("--data", required=True, help="directory of images (recursive) or one image file")
    predict.add_argument("--out", required=True, help="CSV file to write (image, class_1, probability_1, ...)")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image, most probable first [5, at most "
                                                              "the number of classes]")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass [64]")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    predict.set_defaults(handler=command_predict)

    status = commands.add_parser("status", help="where a pretraining or fine-tuning run stands")
    status.add_argument("run", help="run directory (the --out of pretrain or finetune)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=command_status)

    runs = commands.add_parser("runs", help="one status line per run below a directory")
    runs.add_argument("directory", help="directory that holds runs, e.g. runs/")
    runs.add_argument("--json", action="store_true", help="print one JSON list")
    runs.set_defaults(handler=command_runs)


def command_predict(args) -> int:
    from . import api
    result = api.predict(args.finetuning, args.data, args.out, top_k=args.top_k, batch_size=args.batch_size,
                         overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"predicted {result['rows']} images ({result['skipped']} unreadable, skipped) into {result['out']}")
    return 0


def command_status(args) -> int:
    from . import api
    from .status import format_status
    result = api.status(args.run)
    print(json.dumps(result) if args.json else format_status(result))
    return 0


def command_runs(args) -> int:
    from . import api
    from .status import format_status
    found = api.runs(args.directory)
    if args.json:
        print(json.dumps(found))
    else:
        print("\n".join(format_status(status) for status in found) or f"no runs below {args.directory}")
    return 0


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def worker_error(message: str) -> str | None:
    """The original error of a DataLoader worker (``Caught X in DataLoader worker process N. Original Traceback
    ...``): its last line without the exception's module path, e.g. ``DataError: none of the ... could be read``."""
    if "in DataLoader worker process" not in message or "Original Traceback" not in message:
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    name, _, text = last.partition(": ")
    if name.endswith("DataError"):
        return text
    return f"{name.rsplit('.', 1)[-1]}: {text} (while loading data in a worker process: did the data change during the run?)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure ends in one ``leanmim: error:`` line and exit code 2 (a signal that stopped
    training: one ``leanmim: interrupted`` line and 128 + the signal number, e.g. 130 for Ctrl-C)."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        command = next((arg for arg in argv if not arg.startswith("-")), "")
        args = build_parser(only=command).parse_args(argv)
        if getattr(args, "verbose", False):  # read by leanmim.console, here and in DDP / loader child processes
            os.environ["LEANMIM_VERBOSE"] = "1"
        return args.handler(args)
    except ConfigError as err:
        print(f"leanmim: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanmim: interrupted (rerun the same command to resume from the last checkpoint)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns every failure into one line
        engine = sys.modules.get("leanmim.engine")
        if engine is not None and isinstance(err, engine.TrainingInterrupted):
            print(f"leanmim: {err}", file=sys.stderr)
            return err.exit_code
        data = sys.modules.get("leanmim.data")
        known = (data.DataError,) if data is not None else ()
        known += (engine.NonFiniteLossError,) if engine is not None else ()
        if isinstance(err, known):
            print(f"leanmim: error: {one_line(err)}", file=sys.stderr)
            return 2
        if os.environ.get("LEANMIM_DEBUG"):
            raise
        if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
            print("leanmim: error: out of memory: lower --batch-size (or --max-memory-gb for the data)", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or "file write failed" in str(err):
            print(f"leanmim: error: no space left on the device while writing"
                  f"{' ' + repr(err.filename) if getattr(err, 'filename', None) else ''} (torch: file write failed): the "
                  f"previous checkpoint is intact; free disk space (or point --out elsewhere), then rerun to resume",
                  file=sys.stderr)
            return 2
        worker = worker_error(str(err))
        if worker is not None:  # an error inside a DataLoader worker arrives as a flattened traceback: its last line
            print(f"leanmim: error: {one_line(worker)}", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and getattr(err, "filename", None):
            print(f"leanmim: error: {err.strerror or type(err).__name__}: '{err.filename}'", file=sys.stderr)
            return 2
        print(f"leanmim: error: unexpected {type(err).__name__}: {one_line(err, 240)} (an unchecked input or a bug: "
              f"rerun with LEANMIM_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
