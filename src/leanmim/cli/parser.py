"""The ``leanmim`` command's parser: every subcommand and flag, generated from the typed configs and the method catalogue."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .. import __version__, catalogue
from ..catalogue import OptionSpec
from ..config import SECTIONS, ConfigError, field_type
from .commands import (SIZE_FIELDS, command_bench, command_cost, command_embed, command_export, command_finetune,
                       command_methods, command_predict, command_pretrain, command_probe, command_reconstruct,
                       command_runs, command_shard, command_status)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of usage + error."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see '{self.prog} --help')")


VERBOSE_HELP = ("show every message of the libraries (Lightning, torch) as they print it; by default leanmim "
                "prints its start summary and one progress line")

# Model width/depth fields that `leanmim cost` takes as flags (over the named preset).


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
                             "ViTModel, a fine-tuning ViTForImageClassification (cls) / BeitForImageClassification "
                             "(mean) [timm]")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file (hf: directory)")
    export.set_defaults(handler=command_export)

    cost = commands.add_parser("cost", help="count MACs per image and parameters")
    cost.add_argument("--config", help="count the model and method of a run's config.yaml")
    cost.add_argument("--method", help="[default: mae]")
    cost.add_argument("--model", help="[default: vit_base_patch16]")
    cost.add_argument("--img-size", metavar="N|HxW", help="N or HEIGHTxWIDTH [default: 224]")
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
        from ..config import FinetuneConfig
        group = finetune.add_argument_group("fine-tuning")
        for field in dataclasses.fields(FinetuneConfig):
            add_field_flag(group, field, f"finetune.{field.name}")
    finetune.add_argument("--json", action="store_true", help="print the results as one JSON object")
    finetune.set_defaults(handler=command_finetune)

    bench = commands.add_parser("bench", help="MACs, training img/s and peak memory of methods, relative to MAE")
    bench.add_argument("--methods", help="comma-separated methods [default: all registered; mae is always included]")
    bench.add_argument("--config", help="take the model section from this YAML (flags override it)")
    bench.add_argument("--model", help="encoder preset [vit_base_patch16]")
    bench.add_argument("--img-size", metavar="N|HxW", help="image size, N or HEIGHTxWIDTH [224]")
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
    """predict, embed, status, runs: the commands that use a trained model or read a run."""
    predict = commands.add_parser("predict", help="classify images with a fine-tuning's selected classifier (CSV)")
    predict.add_argument("finetuning", help="fine-tuning output directory or checkpoint")
    predict.add_argument("--data", required=True, help="directory of images (recursive) or one image file")
    predict.add_argument("--out", required=True, help="CSV file to write (image, class_1, probability_1, ...)")
    predict.add_argument("--top-k", type=int, default=None, help="classes per image, most probable first "
                                                                 "[min(5, the number of classes)]")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass [64]")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    predict.set_defaults(handler=command_predict)

    embed = commands.add_parser("embed", help="features of every image of a folder from a run's frozen encoder "
                                              "(safetensors)")
    embed.add_argument("source", help="pretraining run or fine-tuning (directory or checkpoint), an export, or any "
                                      "weights --init-from reads (.pth/.safetensors, a timm or transformers directory)")
    embed.add_argument("--data", required=True, help="directory of images (recursive), one image file, or shards (a "
                                                     "directory with manifest.json, or a pattern 'DIR/train-{0..9}.tar')")
    embed.add_argument("--out", required=True, help="FILE.safetensors to write: tensor 'features' (N, F) float32, the "
                                                    "image paths (relative to --data) in its metadata")
    embed.add_argument("--pool", default="mean", choices=("mean", "cls", "cls+mean", "tokens"),
                       help="image feature, as probe pools it: mean of patch tokens, cls token, both, or all patch "
                            "tokens flattened [mean]")
    embed.add_argument("--batch-size", type=int, default=64, help="images per forward pass [64]")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    embed.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    embed.set_defaults(handler=command_embed)

    status = commands.add_parser("status", help="where a pretraining or fine-tuning run stands")
    status.add_argument("run", help="run directory (the --out of pretrain or finetune)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=command_status)

    runs = commands.add_parser("runs", help="one status line per run below a directory")
    runs.add_argument("directory", help="directory that holds runs, e.g. runs/")
    runs.add_argument("--json", action="store_true", help="print one JSON list")
    runs.set_defaults(handler=command_runs)
