"""Loading canonical tensors into leanmim's modules: position tables resized as the source library does,
one-line errors listing missing, unexpected and mis-shaped weights, refusals that name the file and the reason,
and notes of what was assumed (and the flag that overrides it).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MODEL_PRESETS, ConfigError, ModelConfig, format_img_size, parse_img_size
from ..parts.decoder import MaskedDecoder
from ..parts.encoder import ViTEncoder
from .layouts import DECODER_NAMES, grid_of, is_decoder_key
from .read import Weights, check_transformers_config, describe_encoder, read_weights, table_grid, unsupported_reason


def mae_interpolate_pos_embed(table: Tensor, grid: tuple[int, int], old_grid: tuple[int, int] | None = None) -> Tensor:
    """The MAE reference's ``util/pos_embed.interpolate_pos_embed`` (= transformers ViTMAE's
    ``interpolate_pos_encoding``): (1, 1 + L', D) -> (1, 1 + L, D), cls row kept, patch rows resized by
    ``F.interpolate(mode="bicubic", align_corners=False)`` without antialiasing."""
    rows, cols = old_grid or (grid_of(table),) * 2
    patches = table[:, 1:].reshape(1, rows, cols, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def resized_table(table: Tensor, grid: tuple[int, int], what: str, notes: list[str], layout: str = "timm",
                  old_grid: tuple[int, int] | None = None) -> Tensor:
    """(1, 1 + L', D) or (L', D) -> (1, 1 + L, D), resampled when L' ≠ L as the file's own library does: timm's
    ``resample_abs_pos_embed`` (bicubic, antialiased) for timm files and leanmim's (which export timm files), the
    MAE reference's ``interpolate_pos_embed`` (bicubic, no antialias) for MAE-reference and transformers files.
    The table's own grid is ``old_grid`` (rows, columns) when given (a leanmim run's, which may be non-square),
    else the square its row count makes."""
    from timm.layers import resample_abs_pos_embed

    table = table.float()
    if table.dim() == 2:
        table = table.unsqueeze(0)
    old = tuple(old_grid) if old_grid is not None else (grid_of(table),) * 2
    if old != tuple(grid):
        if layout in ("MAE reference", "transformers"):
            table = mae_interpolate_pos_embed(table, grid, old)
            how = "the MAE reference's interpolate_pos_embed (bicubic, no antialias)"
        else:
            table = resample_abs_pos_embed(table, list(grid), list(old), num_prefix_tokens=1)
            how = "timm's resample_abs_pos_embed (bicubic, antialiased)"
        notes.append(f"{what} resized from a {old[0]}×{old[1]} to a {grid[0]}×{grid[1]} grid by {how}")
    return table


def load_line(weights: Weights, parts: str, notes: list[str]) -> str:
    """One line saying what ``--init-from`` loaded: file, layout, parts, what was adapted or assumed."""
    return f"--init-from: loaded {parts} from '{weights.source}' ({weights.layout} layout)" + (
        f"; {'; '.join(notes)}" if notes else "; nothing adapted")


def fit_report(module: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches) of ``state`` against ``module.state_dict()``."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key} {tuple(state[key].shape)} vs {expected[key]}" for key in state
                  if key in expected and tuple(state[key].shape) != expected[key]]
    return missing, unexpected, mismatched


def fit_error(source: str, part: str, report: tuple[list[str], list[str], list[str]], hint: str) -> ConfigError:
    missing, unexpected, mismatched = report

    def listing(name: str, items: list[str]) -> str:
        return f"{len(items)} {name} ({', '.join(items[:3])}{', …' if len(items) > 3 else ''})" if items else ""

    details = "; ".join(text for text in (listing("missing", missing), listing("unexpected", unexpected),
                                          listing("shape mismatches", mismatched)) if text)
    return ConfigError(f"'{source}': the {part} weights do not fit: {details}; {hint}")


def eps_note(weights: Weights) -> list[str]:
    eps = weights.config.get("layer_norm_eps")
    if eps is None or float(eps) == 1e-6:
        return []
    return [f"the file states layer_norm_eps {eps:g}; leanmim's LayerNorms use 1e-6 (MAE's and timm's, which "
            f"its exports record; outputs move by ~1e-5)"]


def check_heads(found: int | None, expected: int, what: str, flag: str, source: str) -> None:
    if found is not None and int(found) != expected:
        raise ConfigError(f"'{source}' has {found} {what} attention heads, this model {expected}: pass {flag} {found}")


def adapted_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """timm's ``adapt_input_conv`` rule for a plain patch convolution: (D, C', p, p) -> (D, in_chans, p, p), summed
    over the channels for one, else the channels repeated and scaled by C' / in_chans: timm 1.0.31's
    ``adapt_input_conv(in_chans, weight, base_chans=C')``, written out because timm 1.0.23 (the lowest leanmim
    declares) has no ``base_chans`` and assumes C' = 3 (a grayscale file would stay one channel for RGB data)."""
    weight, source = weight.float(), weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.repeat(1, math.ceil(in_chans / source), 1, 1)[:, :in_chans] * (source / in_chans)


def load_encoder(encoder: ViTEncoder, weights: Weights, heads_given: bool = False) -> list[str]:
    """Load the canonical encoder weights into a leanmim ``ViTEncoder``; returns notes on what was adapted.
    ``heads_given``: the head count was the user's (``--num-heads``), not an assumption (the note says so).

    The stored position table is used (resized when the grid differs) and its cls row folded into ``cls_token``
    (leanmim adds no position to cls, so the sum is what the source computes). An RGB patch embedding is
    adapted to grayscale as timm does (``adapt_input_conv``: summed over colours).
    """
    if not isinstance(encoder, ViTEncoder):
        raise ConfigError(f"the {type(encoder).__name__} encoder (relative positions) cannot start from ViT weights: "
                          f"drop --init-from or choose a method with an absolute-position ViT")
    notes: list[str] = []
    state = {key: value for key, value in weights.state.items() if not is_decoder_key(key)}
    grid = stated_grid(state, weights)
    reason = unsupported_reason(state, grid)
    if reason:
        raise ConfigError(f"'{weights.source}' cannot be loaded: {reason}; leanmim reads plain ViTs (MAE, timm "
                          f"vit_*_patch*, transformers ViT/ViTMAE)")
    rows, cols = encoder.grid_size
    ours = (f"{encoder.embed_dim}-d, {encoder.depth} blocks, patch {encoder.patch_size}, "
            f"{f'{rows}²' if rows == cols else f'{rows}×{cols}'} grid")
    hint = (f"its encoder is {describe_encoder(state, weights.config)}, this model's {ours}: choose the matching --model "
            f"(or --embed-dim, --depth, --num-heads, --patch-size)")
    check_transformers_config(weights)
    check_heads(weights.config.get("num_heads"), encoder.num_heads, "encoder", "--num-heads", weights.source)
    if "num_heads" not in weights.config:
        notes.append(f"the file does not state its encoder heads: {encoder.num_heads} from --num-heads" if heads_given
                     else f"the file does not state its encoder heads: {encoder.num_heads} assumed "
                          f"(override with --num-heads)")
    notes += eps_note(weights)
    if "pos_embed" in state:
        table = resized_table(state.pop("pos_embed"), encoder.grid_size, "encoder position table", notes,
                              weights.layout, old_grid=grid)
        if "cls_token" in state and table.shape[-1] == state["cls_token"].shape[-1]:
            state["cls_token"] = state["cls_token"].float() + table[:, :1]
        state["pos_embed"] = table[0, 1:]
    else:
        state["pos_embed"] = encoder.pos_embed.detach().clone()
        notes.append("the weights hold no encoder position table: leanmim's fixed sin-cos table is used")
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.dim() == 4 and patch.shape[1] != encoder.in_chans:
        state["patch_embed.proj.weight"] = adapted_input_conv(patch, encoder.in_chans)
        notes.append(f"patch embedding adapted from {patch.shape[1]} to {encoder.in_chans} input channels (timm's rule)")
    report = fit_report(encoder, state)
    if any(report):
        raise fit_error(weights.source, "encoder", report, hint)
    with torch.no_grad():
        encoder.load_state_dict(state)
    return notes


def load_decoder(decoder: MaskedDecoder, weights: Weights) -> list[str]:
    """Load the canonical decoder weights into a ``MaskedDecoder``. A prediction head of another size (another
    target, or other channels) is left as initialised, with a note; everything else must fit."""
    notes: list[str] = []
    names = {value: key for key, value in DECODER_NAMES.items()}
    state = {}
    for key, value in weights.state.items():
        if is_decoder_key(key):
            first, _, rest = key.partition(".")
            state[names.get(first, first) + (f".{rest}" if rest else "")] = value
    if "pos_embed" in state:
        table = resized_table(state.pop("pos_embed"), decoder.grid_size, "decoder position table", notes,
                              weights.layout)
        if table[0, 0].abs().max() > 0:
            notes.append("the decoder position table's cls row is not zero and was dropped (leanmim adds none to cls)")
        state["pos_embed"] = table[0, 1:]
    else:
        state["pos_embed"] = decoder.pos_embed.detach().clone()
    head = state.get("head.weight")
    if head is not None and tuple(head.shape) != tuple(decoder.head.weight.shape):
        state.pop("head.weight"), state.pop("head.bias", None)
        notes.append(f"decoder prediction head left as initialised: it predicts {decoder.head.out_features} values "
                     f"per patch, the weights' {head.shape[0]}")
    if len(decoder.blocks):
        check_heads(weights.config.get("decoder_num_heads"), decoder.blocks[0].attn.num_heads, "decoder",
                    "--decoder-num-heads", weights.source)
        if "decoder_num_heads" not in weights.config:
            notes.append(f"the file does not state its decoder heads: {decoder.blocks[0].attn.num_heads} assumed "
                         f"(override with --decoder-num-heads)")
    missing, unexpected, mismatched = fit_report(decoder, state)
    missing = [key for key in missing if not key.startswith("head.") or "head.weight" in state]
    if missing or unexpected or mismatched:
        width = state["embed.weight"].shape[0] if "embed.weight" in state else "?"
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        def canonical(key: str) -> str:
            first, _, rest = key.partition(".")
            return DECODER_NAMES.get(first, first) + (f".{rest}" if rest else "")

        raise fit_error(weights.source, "decoder", ([canonical(k) for k in missing], [canonical(k) for k in unexpected],
                                                    [canonical(k) for k in mismatched]),
                        f"its decoder is {width}-d with {depth} blocks: pass --decoder-embed-dim {width} "
                        f"--decoder-depth {depth} (and the matching --decoder-num-heads)")
    with torch.no_grad():
        decoder.load_state_dict(state, strict=False)
    return notes


def init_method_from(method: nn.Module, weights: Weights | str | Path) -> list[str]:
    """Start a method from published weights: the encoder always, the decoder when both have one, and any EMA
    teacher made equal to the loaded encoder. Returns notes on what was adapted or left as initialised."""
    if not isinstance(weights, Weights):
        weights = read_weights(weights)
    notes = load_encoder(method.encoder, weights)
    decoder = getattr(method, "decoder", None)
    if weights.has_decoder() and isinstance(decoder, MaskedDecoder):
        notes += load_decoder(decoder, weights)
    elif isinstance(decoder, MaskedDecoder):
        notes.append("the weights hold no decoder: the decoder starts from its initialisation")
    with torch.no_grad():
        for teacher in method.teacher_modules() if hasattr(method, "teacher_modules") else []:
            if isinstance(teacher, type(method.encoder)):
                teacher.load_state_dict(method.encoder.state_dict())
    return notes


def loaded_parts(method: nn.Module, weights: Weights) -> str:
    """"encoder" or "encoder and decoder": what :func:`init_method_from` loads into ``method``."""
    both = weights.has_decoder() and isinstance(getattr(method, "decoder", None), MaskedDecoder)
    return "encoder and decoder" if both else "encoder"


def check_init_from(method_name: str, model: ModelConfig, options: dict[str, Any], weights: Weights) -> None:
    """Raise the one-line error loading would raise, without building real tensors (the method on ``meta``)."""
    from ..methods import build_method

    with torch.device("meta"):
        method = build_method(method_name, model, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init_method_from(method, weights)


def stated_grid(state: dict[str, Tensor], weights: Weights) -> tuple[int, int] | None:
    """The (rows, columns) of the file's encoder position table (:func:`table_grid`: the grid its stated input size
    makes, else a square), None without a table or patch embedding."""
    table, patch = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if not isinstance(table, Tensor) or table.dim() not in (2, 3) or not isinstance(patch, Tensor) or patch.dim() != 4:
        return None
    table = table if table.dim() == 3 else table.unsqueeze(0)
    try:
        return table_grid(table, weights.config, patch.shape[-1])
    except ConfigError:
        return None   # no square either: unsupported_reason says why in one line


def model_from_weights(weights: Weights, in_chans: int | None = None, img_size: int | None = None,
                       num_heads: int | None = None) -> ModelConfig:
    """The encoder architecture the weights describe (for fine-tuning weights that come without a leanmim run).

    Width, depth, patch, MLP ratio and image size (grid × patch, unless ``img_size``) come from the tensors; heads
    from ``num_heads`` (``--num-heads``; checked against the file when it states them, by :func:`load_encoder`),
    else from the file's config, else from the preset of that width, else width / 64.
    """
    state = weights.state
    patch = state["patch_embed.proj.weight"]
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    if depth == 0:
        raise ConfigError(f"'{weights.source}' holds no transformer blocks")
    if num_heads is not None and embed_dim % num_heads:
        raise ConfigError(f"--num-heads {num_heads} does not divide the {embed_dim}-d width of '{weights.source}': "
                          f"pass a divisor of {embed_dim}")
    presets = [(name, preset) for name, preset in MODEL_PRESETS.items() if preset["embed_dim"] == embed_dim]
    heads = num_heads or weights.config.get("num_heads") or (presets[0][1]["num_heads"] if presets
                                                              else max(1, embed_dim // 64))
    exact = [name for name, preset in presets if preset["depth"] == depth and preset["patch_size"] == patch_size]
    name = exact[0] if exact else presets[0][0] if presets else "vit_base_patch16"
    if "pos_embed" in state:   # the grid the file states (a non-square one), else the square of its table
        rows, cols = table_grid(state["pos_embed"].reshape(1, -1, embed_dim), weights.config, patch_size)
    else:
        rows = cols = 224 // patch_size
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if "blocks.0.mlp.fc1.weight" in state else 4.0
    return ModelConfig(name=name, img_size=img_size or [rows * patch_size, cols * patch_size], patch_size=patch_size,
                       in_chans=in_chans or patch.shape[1], embed_dim=embed_dim, depth=depth, num_heads=int(heads),
                       mlp_ratio=mlp_ratio).resolved()


def run_from_weights(path: str | Path, data: str, num_heads: int | None = None, img_size: int | None = None):
    """A :class:`~leanmim.weights.checkpoints.LoadedRun` for weights without a leanmim run (``finetune --init-from``): an
    MAE-method model of the architecture the file describes (channels: the data's; heads: ``num_heads`` if given;
    image size: ``img_size`` if given, the position table resized), encoder loaded. Warns one line of what was
    loaded and assumed (:func:`load_line`)."""
    from ..config import DataConfig, RunConfig, TrainConfig
    from ..data import default_channels
    from ..methods import build_method
    from .checkpoints import LoadedRun

    weights = read_weights(path)
    model = model_from_weights(weights, in_chans=default_channels(data), img_size=img_size, num_heads=num_heads)
    method = build_method("mae", model, {})
    notes = load_encoder(method.encoder, weights, heads_given=num_heads is not None)
    warnings.warn(load_line(weights, "encoder", notes))
    config = RunConfig("mae", model, DataConfig(path=data), TrainConfig(), {})
    return LoadedRun(config, method.eval(), Path(weights.source), 0, 0)


def run_at_img_size(loaded, img_size):
    """(the :class:`~leanmim.weights.checkpoints.LoadedRun` ``loaded`` rebuilt for ``img_size``-pixel images, notes):
    the same weights, each absolute position table (L', D) of another grid resized to (L, D) by
    :func:`resized_table`'s rule for leanmim's own weights (timm's, the layout leanmim exports); relative-position
    encoders need no change. ``loaded`` itself when the size is already ``img_size``."""
    import dataclasses

    from ..methods import build_method

    old = loaded.config.model
    img_size = parse_img_size(img_size)   # N or [H, W]
    if img_size == old.img_size:
        return loaded, []
    model = dataclasses.replace(old, img_size=img_size)
    model.validate()   # a size that is no multiple of the patch, or a single patch: one line
    method = build_method(loaded.config.method, model, loaded.config.options)
    expected = method.state_dict()
    state, notes = {}, []
    for key, value in loaded.method.state_dict().items():
        # by grid, not by shape: a 4×6 table and a 6×4 one have the same shape
        if key.endswith("pos_embed") and value.dim() == 2 and key in expected and (
                expected[key].shape != value.shape or old.grid_size != model.grid_size):
            with_cls = torch.cat([value.new_zeros(1, value.shape[-1]), value]).unsqueeze(0)   # (1, 1 + L', D)
            value = resized_table(with_cls, model.grid_size, key, [], old_grid=old.grid_size)[0, 1:].to(value.dtype)
        state[key] = value
    report = fit_report(method, state)
    if any(report):
        raise fit_error(str(loaded.checkpoint_path), loaded.config.method, report,
                        f"fine-tune at its own --img-size {format_img_size(old.img_size)}")
    method.load_state_dict(state)
    if "encoder.pos_embed" in state:
        notes.append(f"encoder position table resized from a {old.grid_size[0]}×{old.grid_size[1]} to a "
                     f"{model.grid_size[0]}×{model.grid_size[1]} grid by timm's resample_abs_pos_embed (bicubic, "
                     f"antialiased)")
    return dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, model=model), method=method.eval()), notes
