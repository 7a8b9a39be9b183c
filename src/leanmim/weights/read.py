"""Reading any weights file ``--init-from`` takes into canonical tensors (always ``weights_only``): the MAE
authors' checkpoints, timm ``.pth``/``.safetensors``, transformers directories, leanmim runs and exports; and what
the file says about itself (head count, activation, epsilon), so that what it does not say can be named.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, image_hw, parse_img_size
from ..parts.decoder import MaskedDecoder
from ..parts.encoder import ViTEncoder
from .layouts import (IGNORED, decoder_canonical, encoder_canonical, from_hf, from_leanmim_method, grid_of,
                      is_decoder_key)


@dataclass
class Weights:
    """Weights read from a file or directory, in the canonical layout."""

    state: dict[str, Tensor]
    layout: str                          # "MAE reference", "timm", "transformers", "leanmim"
    source: str
    config: dict[str, Any] = field(default_factory=dict)   # architecture facts the file states (num_heads, …)

    def has_decoder(self) -> bool:
        return any(is_decoder_key(key) for key in self.state)


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
    """A safetensors file's tensors and metadata (a one-line error when it is not one)."""
    return _with_safetensors(path, lambda handle: ({name: handle.get_tensor(name) for name in handle.keys()},
                                                   dict(handle.metadata() or {})))


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata without reading its tensors."""
    return _with_safetensors(path, lambda handle: dict(handle.metadata() or {}))


def _with_safetensors(path: Path, read: Any) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return read(handle)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"'{path}' is not a readable safetensors file ({str(err)[:100]})") from None


def read_json_config(path: Path) -> dict[str, Any]:
    """A model directory's JSON file (config.json, the safetensors index) as a dict, or a one-line error naming it."""
    try:
        value = json.loads(path.read_text())
    except UnicodeDecodeError:
        value = None
    except ValueError as err:
        raise ConfigError(f"'{path}' is not valid JSON ({err}): restore the file the model came with") from None
    if not isinstance(value, dict):
        raise ConfigError(f"'{path}' is not a JSON object of settings: restore the file the model came with")
    return value


def stated_count(value: Any, key: str, source: str) -> int | None:
    """A head count (or another whole number) a file states: None when absent, else a positive int or a refusal."""
    if value is None:
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ConfigError(f"'{source}' states {key}={value!r}, not a positive whole number: repair the file, or "
                          f"re-export it; the head count can also be given with --num-heads")
    return number


def read_hf_directory(path: Path) -> dict[str, Tensor]:
    """model.safetensors, its sharded form (model.safetensors.index.json) or pytorch_model.bin."""
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")[0]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        weight_map = read_json_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"'{index}' has no weight_map: restore the file the model came with")
        for shard in sorted(set(map(str, weight_map.values()))):
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
            config = read_json_config(source / "config.json")
            state = read_hf_directory(source)
            if "architecture" in config:          # a timm hub / local-dir folder
                model_args = config.get("model_args") or {}
                if not isinstance(model_args, dict):
                    raise ConfigError(f"'{source / 'config.json'}': model_args is not an object: restore the file")
                if "num_heads" in model_args:
                    model_args = {**model_args, "num_heads": stated_count(model_args["num_heads"], "model_args.num_heads",
                                                                          str(source / "config.json"))}
                size = model_args.get("img_size") or ((config.get("pretrained_cfg") or {}).get("input_size") or [])[1:]
                return canonical_weights(state, "timm", str(source), {**model_args, "img_size": stated_img_size(size)})
            where = str(source / "config.json")
            hf = {"num_heads": stated_count(config.get("num_attention_heads"), "num_attention_heads", where),
                  "decoder_num_heads": stated_count(config.get("decoder_num_attention_heads"),
                                                    "decoder_num_attention_heads", where),
                  "layer_norm_eps": config.get("layer_norm_eps"), "hidden_act": config.get("hidden_act"),
                  "qkv_bias": config.get("qkv_bias"), "img_size": stated_img_size(config.get("image_size"))}
            return canonical_weights(from_hf(state), "transformers", str(source), hf)
        return leanmim_run_weights(source)
    if source.suffix == ".safetensors":
        state, metadata = read_safetensors(source)
        if metadata.get("format", "").startswith("leanmim.RelPos"):
            raise ConfigError(f"'{source}' holds a relative-position (LoMaR) encoder: --init-from needs a ViT with "
                              f"absolute positions")
        facts = {key: stated_count(metadata[key], f"metadata {key}", str(source))
                 for key in ("num_heads",) if key in metadata}
        facts["img_size"] = stated_img_size(_json_or_none(metadata.get("pretrained_cfg")).get("input_size", [])[1:])
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
    from .checkpoints import load_run, read_finetune_entry

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
                   {"num_heads": model.num_heads, "decoder_num_heads": model.decoder_num_heads,
                    "img_size": model.img_size})


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


def stated_img_size(value: Any) -> int | list[int] | None:
    """The input size a file's config states (timm's ``img_size`` / ``input_size[1:]``, transformers' ``image_size``),
    as an int or [height, width]; None when it states none or something that is not a size."""
    if value in (None, [], ""):
        return None
    try:
        return parse_img_size(value)
    except ConfigError:
        return None


def _json_or_none(text: str | None) -> dict[str, Any]:
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def table_grid(table: Tensor, weights_config: dict[str, Any] | None = None, patch_size: int | None = None
               ) -> tuple[int, int]:
    """(rows, columns) of the patch grid of a (1, 1 + L, D) position table: the one the file's stated input size
    makes (``weights_config["img_size"]`` / ``patch_size``) when its L patches fit it, which a non-square grid
    needs; else the square of L patches (a one-line error when L is no square)."""
    size = (weights_config or {}).get("img_size")
    if size is not None and patch_size:
        height, width = image_hw(size)
        rows, cols = height // patch_size, width // patch_size
        if rows * cols == table.shape[1] - 1 and height % patch_size == 0 == width % patch_size:
            return rows, cols
    side = grid_of(table)
    return side, side


def unsupported_reason(state: dict[str, Tensor], grid: tuple[int, int] | None = None) -> str | None:
    """Why a ViT in canonical names is one leanmim's blocks cannot compute (None: it can). ``grid``: the patch grid
    the file states (:func:`table_grid`), which lets a non-square table through."""
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
    if table is not None and table.dim() == 3 and math.isqrt(table.shape[1] - 1) ** 2 != table.shape[1] - 1 and (
            grid is None or grid[0] * grid[1] != table.shape[1] - 1):
        return (f"its position table has {table.shape[1]} rows, not cls + a square grid (extra prefix tokens such "
                f"as registers or distillation, or no cls row)")
    return None


def describe_encoder(state: dict[str, Tensor], weights_config: dict[str, Any] | None = None) -> str:
    weight = state.get("patch_embed.proj.weight")
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    if weight is None or weight.dim() != 4:
        return f"{depth} blocks"
    grid = ""
    if "pos_embed" in state and state["pos_embed"].dim() == 3:
        rows, cols = table_grid(state["pos_embed"], weights_config, weight.shape[-1])
        grid = f", {rows}² grid" if rows == cols else f", {rows}×{cols} grid"
    return f"{weight.shape[0]}-d, {depth} blocks, patch {weight.shape[-1]}{grid}"


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


def stated_preprocessing(path: str | Path) -> dict[str, Any]:
    """The evaluation preprocessing a weights file or directory states about itself: ``mean``, ``std`` (lists) and
    ``crop_pct``, each present only when the file says it. Read from a timm ``pretrained_cfg`` (leanmim's and timm's
    exports: safetensors metadata or a local-dir ``config.json``) or a transformers ``preprocessor_config.json``."""
    source = Path(path).expanduser()
    cfg: dict[str, Any] = {}
    if source.is_file() and source.suffix == ".safetensors":
        stated = read_safetensors_metadata(source).get("pretrained_cfg")
        try:
            cfg = json.loads(stated) if isinstance(stated, str) else {}
        except ValueError:
            cfg = {}
    elif source.is_dir() and (source / "config.json").is_file():
        cfg = read_json_config(source / "config.json").get("pretrained_cfg") or {}
        processor = source / "preprocessor_config.json"
        if not cfg and processor.is_file():
            settings = read_json_config(processor)
            cfg = {"mean": settings.get("image_mean"), "std": settings.get("image_std")}
            size, crop = settings.get("size"), settings.get("crop_size")
            edge = size.get("shortest_edge") if isinstance(size, dict) else size
            side = crop.get("height") if isinstance(crop, dict) else crop
            if settings.get("do_center_crop") and isinstance(edge, (int, float)) and isinstance(side, (int, float)):
                cfg["crop_pct"] = side / edge
    found: dict[str, Any] = {}
    if isinstance(cfg, dict):
        for key in ("mean", "std"):
            values = cfg.get(key)
            if isinstance(values, (list, tuple)) and values and all(isinstance(v, (int, float)) for v in values):
                found[key] = [float(v) for v in values]
        crop = cfg.get("crop_pct")
        if isinstance(crop, (int, float)) and 0 < crop <= 1:
            found["crop_pct"] = float(crop)
    return found

