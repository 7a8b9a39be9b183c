"""Weights in and out: every layout leanmim reads or writes, mapped to and from one canonical layout.

The canonical layout is the MAE reference's (facebookresearch/mae ``models_mae.py``), whose encoder
names are timm's ``VisionTransformer`` names::

    patch_embed.proj.{weight,bias}  cls_token (1, 1, D)  pos_embed (1, 1 + L, D)  norm.*
    blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*
    decoder_embed.*  mask_token (1, 1, D_d)  decoder_pos_embed (1, 1 + L, D_d)  decoder_norm.*  decoder_pred.*
    decoder_blocks.i.* (as blocks.i.*)

Each layout is a small key mapping to it:

- MAE reference checkpoint (``{"model": …}``) and timm ViT state dicts (.pth / .safetensors): canonical already;
- transformers ``ViTMAEForPreTraining`` / ``ViTMAEModel`` / ``ViTModel`` directories: :data:`HF_RENAMES`, with
  the separate q/k/v projections fused into ``qkv`` (both the 4.x names files hold and the 5.x in-memory names);
- leanmim: a method's modules (``ViTEncoder`` keeps ``pos_embed`` (L, D) without the cls row;
  ``MaskedDecoder`` names in :data:`DECODER_NAMES`); its runs, checkpoints and exports.

Reading: :func:`read_weights` (any of the above, always ``weights_only``), then :func:`load_encoder` /
:func:`load_decoder` / :func:`init_method_from` (position tables resized bicubically as timm does; one-line
errors listing missing, unexpected and mis-shaped weights). Writing: :func:`export_encoder` (timm file or
timm ``local-dir`` folder with its ``pretrained_cfg``), :func:`export_hf` (a transformers directory),
and the relative-position (LoMaR) encoder's own layout.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import MODEL_PRESETS, TIMM_NAMES, ConfigError, ModelConfig
from .run import atomic_write_text, publish, temporary_path
from .decoder import MaskedDecoder
from .encoder import ViTEncoder
from .relpos import RelPosViTEncoder

# ----------------------------------------------------------------------------- layouts (key mappings)

# Keys a classifier or a wrapper adds that no pretraining encoder uses: ignored when reading.
IGNORED = re.compile(r"^(head|fc_norm|pooler|classifier|embeddings\.mask_token)(\.|$)")

# transformers -> canonical, applied in order to every key (4.x file names and 5.x module names alike).
HF_RENAMES: list[tuple[str, str]] = [
    (r"^vit\.", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
    (r"^decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.", r"decoder_blocks.\1."),
    (r"^layernorm\.", "norm."),
    (r"^decoder\.(decoder_embed|decoder_pos_embed|decoder_norm|decoder_pred|mask_token)", r"\1"),
    (r"\.attention\.(?:attention\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(?:attention\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(?:attention\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.(?:intermediate\.dense|mlp\.fc1)\.", ".mlp.fc1."),
    (r"\.(?:output\.dense|mlp\.fc2)\.", ".mlp.fc2."),
]
QKV = ("q", "k", "v")

# leanmim MaskedDecoder name -> canonical name.
DECODER_NAMES = {"embed": "decoder_embed", "mask_token": "mask_token", "pos_embed": "decoder_pos_embed",
                 "blocks": "decoder_blocks", "norm": "decoder_norm", "head": "decoder_pred"}


def hf_to_canonical_name(key: str) -> str:
    for pattern, replacement in HF_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers names -> canonical; q, k, v stacked into timm's ``qkv`` (3·D, D)."""
    renamed = {hf_to_canonical_name(key): value for key, value in state.items()}
    canonical = {}
    for key, value in renamed.items():
        match = re.match(r"^(.*\.attn)\.([qkv])\.(weight|bias)$", key)
        if match is None:
            canonical[key] = value
        elif match.group(2) == "q":
            prefix, kind = match.group(1), match.group(3)
            parts = [renamed.get(f"{prefix}.{name}.{kind}") for name in QKV]
            if any(part is None for part in parts):
                raise ConfigError(f"transformers weights have {prefix}.q.{kind} without its k and v: the file is incomplete")
            canonical[f"{prefix}.qkv.{kind}"] = torch.cat(parts, dim=0)
    return canonical


def canonical_to_hf(canonical: dict[str, Tensor], hf_keys: list[str]) -> dict[str, Tensor]:
    """Fill every key of a transformers model's state dict from canonical weights (q, k, v split from ``qkv``)."""
    state = {}
    for key in hf_keys:
        name = hf_to_canonical_name(key)
        match = re.match(r"^(.*\.attn)\.([qkv])\.(weight|bias)$", name)
        if match:
            fused = canonical[f"{match.group(1)}.qkv.{match.group(3)}"]
            state[key] = fused.chunk(3, dim=0)[QKV.index(match.group(2))].contiguous()
        elif name in canonical:
            state[key] = canonical[name].contiguous()
        else:
            raise ConfigError(f"no weight for transformers' '{key}' (canonical '{name}'): this model cannot be exported")
    return state


def from_leanmim_method(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A method's state dict (``encoder.*``, ``decoder.*``; Lightning's ``method.`` prefix allowed) -> canonical."""
    canonical = {}
    for key, value in state.items():
        key = key.removeprefix("method.")
        if key.startswith("encoder."):
            name = key[len("encoder."):]
            canonical[name] = with_cls_row(value) if name == "pos_embed" else value
        elif key.startswith("decoder."):
            first, _, rest = key[len("decoder."):].partition(".")
            name = DECODER_NAMES.get(first, first) + (f".{rest}" if rest else "")
            canonical[name] = with_cls_row(value) if first == "pos_embed" else value
    return canonical


def with_cls_row(table: Tensor) -> Tensor:
    """(L, D) leanmim table -> (1, 1 + L, D) with the zero cls row the MAE reference, timm and ViTMAE store."""
    table = table.detach().float()
    return torch.cat([torch.zeros(1, table.shape[-1]), table], dim=0).unsqueeze(0).contiguous()


def encoder_canonical(encoder: ViTEncoder) -> dict[str, Tensor]:
    """The encoder's weights under canonical (= timm) names, float32, ``pos_embed`` (1, 1 + L, D)."""
    state = {name: tensor.detach().float().contiguous().clone() for name, tensor in encoder.state_dict().items()}
    state["pos_embed"] = with_cls_row(encoder.pos_embed)
    return state


def decoder_canonical(decoder: MaskedDecoder) -> dict[str, Tensor]:
    return from_leanmim_method({f"decoder.{name}": tensor.detach().float().contiguous().clone()
                                for name, tensor in decoder.state_dict().items()})


# ----------------------------------------------------------------------------- reading

@dataclass
class Weights:
    """Weights read from a file or directory, in the canonical layout."""

    state: dict[str, Tensor]
    layout: str                          # "MAE reference", "timm", "transformers", "leanmim"
    source: str
    config: dict[str, Any] = field(default_factory=dict)   # architecture facts the file states (num_heads, …)

    def has_decoder(self) -> bool:
        return any(is_decoder_key(key) for key in self.state)


def is_decoder_key(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a file holding other Python objects is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(f"refused to read '{path}': it holds Python objects besides tensors (e.g. a full training "
                          f"checkpoint with its arguments), which leanmim never unpickles; save only the weights, "
                          f"e.g. torch.save(checkpoint['model'], 'weights.pth'), and pass that file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(f"'{path}' is not a readable torch file ({str(err).splitlines()[0][:100]})") from None


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"'{path}' is not a readable safetensors file ({str(err)[:100]})") from None


def read_hf_directory(path: Path) -> dict[str, Tensor]:
    """model.safetensors, its sharded form (model.safetensors.index.json) or pytorch_model.bin."""
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")[0]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(read_safetensors(path / shard)[0])
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch_load(path / "pytorch_model.bin")
    raise ConfigError(f"'{path}' has a config.json but no model.safetensors or pytorch_model.bin")


def read_weights(path: str | Path) -> Weights:
    """Read ViT weights in any supported layout (see the module docstring), converted to the canonical one."""
    source = Path(path).expanduser()
    if not source.exists():
        raise ConfigError(f"--init-from '{path}' does not exist: pass a weights file (.pth/.safetensors), a "
                          f"transformers directory or a leanmim run")
    if source.is_dir():
        if (source / "config.json").is_file():
            config = json.loads((source / "config.json").read_text())
            state = read_hf_directory(source)
            if "architecture" in config:          # a timm hub / local-dir folder
                return canonical_weights(state, "timm", str(source), config.get("model_args", {}))
            hf = {"num_heads": config.get("num_attention_heads"),
                  "decoder_num_heads": config.get("decoder_num_attention_heads"),
                  "layer_norm_eps": config.get("layer_norm_eps"), "hidden_act": config.get("hidden_act"),
                  "qkv_bias": config.get("qkv_bias")}
            return canonical_weights(from_hf(state), "transformers", str(source), hf)
        return leanmim_run_weights(source)
    if source.suffix == ".safetensors":
        state, metadata = read_safetensors(source)
        if metadata.get("format", "").startswith("leanmim.RelPos"):
            raise ConfigError(f"'{source}' holds a relative-position (LoMaR) encoder: --init-from needs a ViT with "
                              f"absolute positions")
        facts = {key: int(metadata[key]) for key in ("num_heads",) if key in metadata}
        return canonical_weights(state, "leanmim export" if "format" in metadata else "timm", str(source), facts)
    loaded = torch_load(source)
    if isinstance(loaded, dict) and isinstance(loaded.get("leanmim"), dict):
        return leanmim_run_weights(source)
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        return canonical_weights(loaded["model"], "MAE reference", str(source))
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ConfigError(f"'{source}' holds a {type(loaded).__name__}, not a dict of weights")
    return canonical_weights(loaded, "timm", str(source))


def leanmim_run_weights(path: Path) -> Weights:
    from .checkpoint import load_run
    from .finetune import read_finetune_entry

    if read_finetune_entry(path) is not None:
        raise ConfigError(f"'{path}' is a fine-tuning result: export it ('leanmim export') and pass the exported "
                          f"file, or pass the pretraining run")
    loaded = load_run(path)
    method = loaded.method
    if not isinstance(method.encoder, ViTEncoder):
        raise ConfigError(f"'{path}' is a {loaded.config.method} run with a relative-position encoder: "
                          f"--init-from needs a ViT with absolute positions")
    state = encoder_canonical(method.encoder)
    if isinstance(getattr(method, "decoder", None), MaskedDecoder):
        state.update(decoder_canonical(method.decoder))
    model = loaded.config.model
    return Weights(state, "leanmim", str(loaded.checkpoint_path),
                   {"num_heads": model.num_heads, "decoder_num_heads": model.decoder_num_heads})


def canonical_weights(state: dict[str, Any], layout: str, source: str, config: dict | None = None) -> Weights:
    """Normalise a state dict already in (or converted to) canonical names; recognise leanmim and HF names."""
    if not all(isinstance(value, Tensor) for value in state.values()):
        raise ConfigError(f"'{source}' has entries that are not tensors: it is not a state dict of weights")
    state = {re.sub(r"^(module|_orig_mod)\.", "", key): value for key, value in state.items()}
    if any(key.startswith(("encoder.cls_token", "method.encoder.")) for key in state):
        state, layout = from_leanmim_method(state), "leanmim"
    elif any(key.startswith(("vit.", "embeddings.", "encoder.layer.", "layers.")) for key in state):
        state, layout = from_hf(state), "transformers"
    state = {key: value for key, value in state.items() if not IGNORED.match(key)}
    if "patch_embed.proj.weight" not in state:
        raise ConfigError(f"'{source}' holds no ViT weights leanmim recognises (no patch embedding under timm, MAE "
                          f"or transformers names; keys such as {', '.join(list(state)[:3]) or 'none'})")
    return Weights(state, layout, source, {key: value for key, value in (config or {}).items() if value is not None})


# ----------------------------------------------------------------------------- loading into leanmim modules

def grid_of(table: Tensor) -> int:
    """Side of the square grid of a (1, 1 + L, D) table."""
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise ConfigError(f"a position table with {table.shape[1]} rows is not cls + a square grid of patches")
    return side


def mae_interpolate_pos_embed(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """The MAE reference's ``util/pos_embed.interpolate_pos_embed`` (= transformers ViTMAE's
    ``interpolate_pos_encoding``): (1, 1 + L', D) -> (1, 1 + L, D), cls row kept, patch rows resized by
    ``F.interpolate(mode="bicubic", align_corners=False)`` without antialiasing."""
    old = grid_of(table)
    patches = table[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def resized_table(table: Tensor, grid: tuple[int, int], what: str, notes: list[str], layout: str = "timm") -> Tensor:
    """(1, 1 + L', D) or (L', D) -> (1, 1 + L, D), resampled when L' ≠ L as the file's own library does: timm's
    ``resample_abs_pos_embed`` (bicubic, antialiased) for timm files and leanmim's (which export timm files), the
    MAE reference's ``interpolate_pos_embed`` (bicubic, no antialias) for MAE-reference and transformers files."""
    from timm.layers import resample_abs_pos_embed

    table = table.float()
    if table.dim() == 2:
        table = table.unsqueeze(0)
    old = grid_of(table)
    if (old, old) != tuple(grid):
        if layout in ("MAE reference", "transformers"):
            table = mae_interpolate_pos_embed(table, grid)
            how = "the MAE reference's interpolate_pos_embed (bicubic, no antialias)"
        else:
            table = resample_abs_pos_embed(table, list(grid), [old, old], num_prefix_tokens=1)
            how = "timm's resample_abs_pos_embed (bicubic, antialiased)"
        notes.append(f"{what} resized from a {old}×{old} to a {grid[0]}×{grid[1]} grid by {how}")
    return table


def unsupported_reason(state: dict[str, Tensor]) -> str | None:
    """Why a ViT in canonical names is one leanmim's blocks cannot compute (None: it can)."""
    keys = list(state)
    if any(re.search(r"\.(ls[12]\.gamma|gamma_[12])$", key) for key in keys):
        return "its blocks have layer scale (ls1/ls2), which leanmim's ViT blocks lack"
    if any(key.startswith("reg_token") for key in keys):
        return f"it has {state[[k for k in keys if k.startswith('reg_token')][0]].shape[1]} register tokens, " \
               f"which leanmim's ViT lacks"
    if "blocks.0.attn.qkv.weight" in state and "blocks.0.attn.qkv.bias" not in state:
        if "blocks.0.attn.q_bias" in state:
            return "its attention has separate q/v biases (BEiT-style q_bias/v_bias), leanmim's one qkv bias"
        return "its attention has no qkv bias, leanmim's ViT blocks have one (qkv_bias=True)"
    if any(re.search(r"\.attn\.(q|k)_norm\.", key) for key in keys):
        return "its attention normalises q and k (qk_norm), which leanmim's blocks do not"
    table = state.get("pos_embed")
    if table is not None and table.dim() == 3 and math.isqrt(table.shape[1] - 1) ** 2 != table.shape[1] - 1:
        return (f"its position table has {table.shape[1]} rows, not cls + a square grid (extra prefix tokens such "
                f"as registers or distillation, or no cls row)")
    return None


def load_line(weights: Weights, parts: str, notes: list[str]) -> str:
    """One line saying what ``--init-from`` loaded: file, layout, parts, what was adapted or assumed."""
    return f"--init-from: loaded {parts} from '{weights.source}' ({weights.layout} layout)" + (
        f"; {'; '.join(notes)}" if notes else "; nothing adapted")


def describe_encoder(state: dict[str, Tensor]) -> str:
    weight = state.get("patch_embed.proj.weight")
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    if weight is None or weight.dim() != 4:
        return f"{depth} blocks"
    grid = f", {grid_of(state['pos_embed'])}² grid" if "pos_embed" in state and state["pos_embed"].dim() == 3 else ""
    return f"{weight.shape[0]}-d, {depth} blocks, patch {weight.shape[-1]}{grid}"


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


def check_transformers_config(weights: Weights) -> None:
    """Refuse what a transformers config states that leanmim's blocks would compute differently (one line);
    ``layer_norm_eps`` other than the blocks' 1e-6 is kept out of the error: it moves outputs by ~1e-5, noted."""
    act = weights.config.get("hidden_act")
    if act is not None and act != "gelu":
        raise ConfigError(f"'{weights.source}' states hidden_act '{act}': leanmim's ViT blocks use exact GELU "
                          f"('gelu'), so this model would compute another function; it cannot be loaded")
    if weights.config.get("qkv_bias") is False:
        raise ConfigError(f"'{weights.source}' states qkv_bias false: leanmim's ViT blocks have a qkv bias, "
                          f"so it cannot be loaded")


def eps_note(weights: Weights) -> list[str]:
    eps = weights.config.get("layer_norm_eps")
    if eps is None or float(eps) == 1e-6:
        return []
    return [f"the file states layer_norm_eps {eps:g}; leanmim's LayerNorms use 1e-6 (MAE's and timm's, which "
            f"its exports record; outputs move by ~1e-5)"]


def check_heads(found: int | None, expected: int, what: str, flag: str, source: str) -> None:
    if found is not None and int(found) != expected:
        raise ConfigError(f"'{source}' has {found} {what} attention heads, this model {expected}: pass {flag} {found}")


def load_encoder(encoder: ViTEncoder, weights: Weights) -> list[str]:
    """Load the canonical encoder weights into a leanmim ``ViTEncoder``; returns notes on what was adapted.

    The stored position table is used (resized when the grid differs) and its cls row folded into ``cls_token``
    (leanmim adds no position to cls, so the sum is what the source computes). An RGB patch embedding is
    adapted to grayscale as timm does (``adapt_input_conv``: summed over colours).
    """
    if not isinstance(encoder, ViTEncoder):
        raise ConfigError(f"the {type(encoder).__name__} encoder (relative positions) cannot start from ViT weights: "
                          f"drop --init-from or choose a method with an absolute-position ViT")
    notes: list[str] = []
    state = {key: value for key, value in weights.state.items() if not is_decoder_key(key)}
    reason = unsupported_reason(state)
    if reason:
        raise ConfigError(f"'{weights.source}' cannot be loaded: {reason}; leanmim reads plain ViTs (MAE, timm "
                          f"vit_*_patch*, transformers ViT/ViTMAE)")
    ours = f"{encoder.embed_dim}-d, {encoder.depth} blocks, patch {encoder.patch_size}, {encoder.grid_size[0]}² grid"
    hint = (f"its encoder is {describe_encoder(state)}, this model's {ours}: choose the matching --model "
            f"(or --embed-dim, --depth, --num-heads, --patch-size)")
    check_transformers_config(weights)
    check_heads(weights.config.get("num_heads"), encoder.num_heads, "encoder", "--num-heads", weights.source)
    if "num_heads" not in weights.config:
        notes.append(f"the file does not state its encoder heads: {encoder.num_heads} assumed "
                     f"(override with --num-heads)")
    notes += eps_note(weights)
    if "pos_embed" in state:
        table = resized_table(state.pop("pos_embed"), encoder.grid_size, "encoder position table", notes,
                              weights.layout)
        if "cls_token" in state and table.shape[-1] == state["cls_token"].shape[-1]:
            state["cls_token"] = state["cls_token"].float() + table[:, :1]
        state["pos_embed"] = table[0, 1:]
    else:
        state["pos_embed"] = encoder.pos_embed.detach().clone()
        notes.append("the weights hold no encoder position table: leanmim's fixed sin-cos table is used")
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.dim() == 4 and patch.shape[1] != encoder.in_chans:
        from timm.models._manipulate import adapt_input_conv

        state["patch_embed.proj.weight"] = adapt_input_conv(encoder.in_chans, patch.float(), base_chans=patch.shape[1])
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
    from .methods import build_method

    with torch.device("meta"):
        method = build_method(method_name, model, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init_method_from(method, weights)


def model_from_weights(weights: Weights, in_chans: int | None = None, img_size: int | None = None) -> ModelConfig:
    """The encoder architecture the weights describe (for fine-tuning weights that come without a leanmim run).

    Width, depth, patch, MLP ratio and image size (grid × patch) come from the tensors; heads from the file's
    config when it states them, else from the preset of that width, else width / 64.
    """
    state = weights.state
    patch = state["patch_embed.proj.weight"]
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    if depth == 0:
        raise ConfigError(f"'{weights.source}' holds no transformer blocks")
    presets = [(name, preset) for name, preset in MODEL_PRESETS.items() if preset["embed_dim"] == embed_dim]
    heads = weights.config.get("num_heads") or (presets[0][1]["num_heads"] if presets else max(1, embed_dim // 64))
    exact = [name for name, preset in presets if preset["depth"] == depth and preset["patch_size"] == patch_size]
    name = exact[0] if exact else presets[0][0] if presets else "vit_base_patch16"
    grid = grid_of(state["pos_embed"].reshape(1, -1, embed_dim)) if "pos_embed" in state else 224 // patch_size
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if "blocks.0.mlp.fc1.weight" in state else 4.0
    return ModelConfig(name=name, img_size=img_size or grid * patch_size, patch_size=patch_size,
                       in_chans=in_chans or patch.shape[1], embed_dim=embed_dim, depth=depth, num_heads=int(heads),
                       mlp_ratio=mlp_ratio).resolved()


# ----------------------------------------------------------------------------- writing: timm

TIMM_FORMAT = "timm.VisionTransformer"
RELPOS_FORMAT = "leanmim.RelPosViTEncoder"


def timm_state_dict(encoder: ViTEncoder) -> dict[str, Tensor]:
    """The encoder's weights under timm's names; ``pos_embed`` gets timm's (1, 1 + L, D) shape with a zero cls row."""
    return encoder_canonical(encoder)


def timm_create_kwargs(model: ModelConfig) -> dict:
    """Arguments that make ``timm.create_model`` build the matching architecture."""
    if model.name not in TIMM_NAMES:
        raise ConfigError(f"model '{model.name}' has no timm counterpart")
    return dict(model_name=TIMM_NAMES[model.name], img_size=model.img_size, patch_size=model.patch_size,
                in_chans=model.in_chans, embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
                mlp_ratio=model.mlp_ratio)


def timm_crop_pct(img_size: int, crop_pct: float) -> float:
    """``crop_pct`` nudged so that timm's ``floor(img_size / crop_pct)`` gives leanmim's resized side exactly
    (16 / (16 / 18) is 17.999… in floating point)."""
    target = round(img_size / crop_pct)
    while math.floor(img_size / crop_pct) < target:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def timm_pretrained_cfg(model: ModelConfig, mean=None, std=None, num_classes: int = 0, crop_pct: float = 1.0,
                        label_names: list[str] | None = None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` facts for these weights: input size, the evaluation view (``crop_pct``: crop side /
    resized shorter side, centre crop), normalisation of the training data, stem and head names, class names."""
    cfg: dict[str, Any] = {"input_size": [model.in_chans, model.img_size, model.img_size], "fixed_input_size": True,
                           "interpolation": "bicubic", "crop_pct": timm_crop_pct(model.img_size, crop_pct),
                           "crop_mode": "center", "num_classes": num_classes, "first_conv": "patch_embed.proj",
                           "classifier": "head"}
    if mean is not None and std is not None:
        cfg.update(mean=[float(v) for v in mean], std=[float(v) for v in std])
    if label_names:
        cfg["label_names"] = list(label_names)
    return cfg


def timm_model_args(model: ModelConfig, finetuned: bool) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments: the architecture and the pooling leanmim uses (mean of the patch
    tokens; a pretrained encoder keeps its final norm before pooling, a fine-tuned one has ``fc_norm`` after)."""
    args = {key: value for key, value in timm_create_kwargs(model).items() if key != "model_name"}
    args.update(global_pool="avg", fc_norm=finetuned)
    return args


def write_safetensors(state: dict[str, Tensor], out: Path, metadata: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(out)
    try:
        save_file({key: value.contiguous() for key, value in state.items()}, str(tmp),
                  metadata={key: value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list))
                            else str(value) for key, value in metadata.items()})
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_timm(state: dict[str, Tensor], model: ModelConfig, out: str | Path, pretrained_cfg: dict[str, Any],
               finetuned: bool, extra_metadata: dict[str, Any] | None = None) -> Path:
    """A file (``*.safetensors``: weights, with the timm facts in its metadata) or a timm ``local-dir`` folder
    (``model.safetensors`` + ``config.json``: ``timm.create_model("local-dir:DIR", pretrained=True)``)."""
    out = Path(out)
    args = timm_model_args(model, finetuned)
    metadata = {**timm_create_kwargs(model), "format": TIMM_FORMAT, "global_pool": "avg", "fc_norm": finetuned,
                "pretrained_cfg": pretrained_cfg, **(extra_metadata or {})}
    if out.suffix == ".safetensors":
        return write_safetensors(state, out, metadata)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / "model.safetensors", metadata)
    config = {"architecture": TIMM_NAMES[model.name], "num_classes": pretrained_cfg.get("num_classes", 0),
              "num_features": model.embed_dim, "global_pool": "avg", "model_args": args,
              "pretrained_cfg": pretrained_cfg}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    return out


def export_encoder(encoder: ViTEncoder, model: ModelConfig, out: str | Path, mean=None, std=None) -> Path:
    """Write a pretrained encoder for timm (see :func:`write_timm`); ``mean``/``std``: the training data's."""
    if isinstance(encoder, RelPosViTEncoder):
        return export_relpos_encoder(encoder, out)
    return write_timm(timm_state_dict(encoder), model, out, timm_pretrained_cfg(model, mean, std), finetuned=False)


def export_relpos_encoder(encoder: RelPosViTEncoder, out: str | Path) -> Path:
    """Write a relative-position encoder's state dict (atomically); the metadata holds its architecture."""
    state = {name: tensor.detach().float().contiguous().clone() for name, tensor in encoder.state_dict().items()}
    return write_safetensors(state, Path(out), {**encoder.architecture(), "format": RELPOS_FORMAT})


def load_relpos_encoder(path: str | Path, img_size: int | None = None) -> RelPosViTEncoder:
    """Rebuild an exported ``RelPosViTEncoder``, optionally for another ``img_size`` (same weights: no absolute
    position embedding, and the relative buckets saturate)."""
    state, metadata = read_safetensors(Path(path))
    if metadata.get("format") != RELPOS_FORMAT:
        raise ConfigError(f"'{path}' is not a {RELPOS_FORMAT} export (format: {metadata.get('format')})")
    sizes = {key: int(metadata[key]) for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    if img_size is not None:
        sizes["img_size"] = img_size
    # exports written before the "relative_term" key existed used the "scaled" form
    encoder = RelPosViTEncoder(**sizes, mlp_ratio=float(metadata["mlp_ratio"]),
                               relative_term=metadata.get("relative_term", "scaled"))
    encoder.load_state_dict(state)
    return encoder


# ----------------------------------------------------------------------------- writing: transformers

def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("--format hf needs the transformers library: pip install 'leanmim[hf]'") from None
    return transformers


def hf_vit_config(model: ModelConfig) -> dict[str, Any]:
    return dict(hidden_size=model.embed_dim, num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
                intermediate_size=int(model.embed_dim * model.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-6,
                image_size=model.img_size, patch_size=model.patch_size, num_channels=model.in_chans, qkv_bias=True,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def export_hf(method: nn.Module, model: ModelConfig, out: str | Path, options: dict[str, Any] | None = None) -> Path:
    """A transformers directory: ``ViTMAEForPreTraining`` when the method has an MAE pixel decoder, else ``ViTModel``
    (the encoder, no pooler). Built with transformers itself and written by ``save_pretrained``."""
    encoder, decoder = method.encoder, getattr(method, "decoder", None)
    if not isinstance(encoder, ViTEncoder):
        raise ConfigError(f"the {type(encoder).__name__} encoder (relative positions) has no transformers counterpart: "
                          f"use --format timm")
    transformers = require_transformers()
    canonical = encoder_canonical(encoder)
    pixel_decoder = isinstance(decoder, MaskedDecoder) and decoder.head.out_features == model.patch_dim
    if pixel_decoder:
        canonical.update(decoder_canonical(decoder))
        config = transformers.ViTMAEConfig(
            **hf_vit_config(model), decoder_hidden_size=decoder.decoder_dim, decoder_num_hidden_layers=len(decoder.blocks),
            decoder_num_attention_heads=model.decoder_num_heads,
            decoder_intermediate_size=int(decoder.decoder_dim * model.mlp_ratio),
            mask_ratio=float((options or {}).get("mask_ratio", 0.75)),
            norm_pix_loss=bool((options or {}).get("norm_pix_loss", True)))
        hf_model = transformers.ViTMAEForPreTraining(config)
    else:
        hf_model = transformers.ViTModel(transformers.ViTConfig(**hf_vit_config(model)), add_pooling_layer=False)
    hf_model.load_state_dict(canonical_to_hf(canonical, list(hf_model.state_dict())), strict=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out))
    return out


def run_from_weights(path: str | Path, data: str):
    """A :class:`~leanmim.checkpoint.LoadedRun` for weights without a leanmim run (``finetune --init-from``): an
    MAE-method model of the architecture the file describes (channels: the data's), encoder loaded."""
    from .checkpoint import LoadedRun
    from .config import DataConfig, RunConfig, TrainConfig
    from .data import default_channels
    from .methods import build_method

    weights = read_weights(path)
    model = model_from_weights(weights, in_chans=default_channels(data))
    method = build_method("mae", model, {})
    for note in load_encoder(method.encoder, weights):
        warnings.warn(f"--init-from: {note}")
    config = RunConfig("mae", model, DataConfig(path=data), TrainConfig(), {})
    return LoadedRun(config, method.eval(), Path(weights.source), 0, 0)


def run_data_stats(checkpoint_path: Path, config) -> tuple[list[float] | None, list[float] | None]:
    """Mean/std of the data a run was pretrained on: from its ``summary.json``, else known constants, else None."""
    summary = Path(checkpoint_path).parent.parent / "summary.json"
    try:
        dataset = json.loads(summary.read_text()).get("dataset") or {}
        if dataset.get("mean") and dataset.get("std"):
            return list(dataset["mean"]), list(dataset["std"])
    except (OSError, ValueError, AttributeError):
        pass
    from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_ALIASES

    if str(config.data.path).lower() in FASHION_MNIST_ALIASES:
        return [FASHION_MNIST_MEAN] * config.model.in_chans, [FASHION_MNIST_STD] * config.model.in_chans
    warnings.warn("the run records no data mean/std (an older run): the export's pretrained_cfg leaves them out")
    return None, None
