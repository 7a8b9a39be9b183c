"""Writing weights out: a timm file or ``local-dir`` folder with its ``pretrained_cfg`` (pretrainings and
fine-tunings, with labels and crop_pct), a transformers directory (pretrainings and fine-tunings, with labels, a
``preprocessor_config.json`` and a model card), and the relative-position (LoMaR) encoder's own layout. Every
export is written atomically (a transformers directory: built beside the target, then renamed into place).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import TIMM_NAMES, ConfigError, ModelConfig, parse_img_size
from ..files import atomic_write_text, publish, temporary_path
from ..parts.classifier import TIMM_GLOBAL_POOL
from ..parts.decoder import MaskedDecoder
from ..parts.encoder import ViTEncoder
from ..parts.relpos import RelPosViTEncoder
from .checkpoints import FinetunedRun, finetune_data_stats, load_finetuned
from .crop_pct import timm_crop_pct
from .layouts import canonical_to_hf, decoder_canonical, encoder_canonical, hf_to_canonical_name
from .read import read_safetensors

TIMM_FORMAT = "timm.VisionTransformer"
RELPOS_FORMAT = "leanmim.RelPosViTEncoder"


def timm_state_dict(encoder: ViTEncoder) -> dict[str, Tensor]:
    """The encoder's weights under timm's names; ``pos_embed`` gets timm's (1, 1 + L, D) shape with a zero cls row."""
    return encoder_canonical(encoder)


def timm_create_kwargs(model: ModelConfig) -> dict:
    """Arguments that make ``timm.create_model`` build the matching architecture."""
    if model.name not in TIMM_NAMES:
        raise ConfigError(f"model '{model.name}' has no timm counterpart")
    return dict(model_name=TIMM_NAMES[model.name], img_size=model.img_size, patch_size=model.patch_size,  # N or [H, W]
                in_chans=model.in_chans, embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
                mlp_ratio=model.mlp_ratio)


def timm_pretrained_cfg(model: ModelConfig, mean=None, std=None, num_classes: int = 0, crop_pct: float = 1.0,
                        label_names: list[str] | None = None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` facts for these weights: input size, the evaluation view (``crop_pct``: crop side /
    resized shorter side, centre crop), normalisation of the training data, stem and head names, class names."""
    cfg: dict[str, Any] = {"input_size": [model.in_chans, *model.img_hw], "fixed_input_size": True,
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


def export_encoder(encoder: ViTEncoder, model: ModelConfig, out: str | Path, mean=None, std=None,
                   crop_pct: float = 1.0) -> Path:
    """Write a pretrained encoder for timm (see :func:`write_timm`); ``mean``/``std``: the training data's,
    ``crop_pct`` its evaluation view (:func:`~leanmim.weights.crop_pct.pretraining_crop_pct`)."""
    if isinstance(encoder, RelPosViTEncoder):
        return export_relpos_encoder(encoder, out)
    return write_timm(timm_state_dict(encoder), model, out, timm_pretrained_cfg(model, mean, std, crop_pct=crop_pct),
                      finetuned=False)


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
    sizes = {key: int(metadata[key]) for key in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    sizes["img_size"] = parse_img_size(metadata["img_size"])   # "224", or "[64, 96]" for a non-square export
    if img_size is not None:
        sizes["img_size"] = img_size
    # exports written before the "relative_term" key existed used the "scaled" form
    encoder = RelPosViTEncoder(**sizes, mlp_ratio=float(metadata["mlp_ratio"]),
                               relative_term=metadata.get("relative_term", "scaled"))
    encoder.load_state_dict(state)
    return encoder


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


def hf_preprocessor_config(model: ModelConfig, mean, std, crop_pct: float) -> dict[str, Any]:
    """``preprocessor_config.json`` that makes ``AutoImageProcessor`` reproduce leanmim's evaluation view: the
    shorter side to round(img_size / crop_pct) (bicubic, antialiased), the centre img_size square, [0, 1], the data's
    mean/std. A ``CLIPImageProcessor`` (the same keys in transformers 4.40+ and 5): ``ViTImageProcessor`` resizes
    to a square, changing the aspect ratio, and cannot centre-crop.

    A non-square H x W: leanmim resizes each image to cover floor(H / crop_pct) x floor(W / crop_pct) keeping its
    aspect ratio, which no transformers processor can say; the shorter side goes to the longer of the two
    (exact for square images, a closer crop of images shaped like the input); the export says so in a warning."""
    from ..data import eval_box

    height, width = model.img_hw
    box = eval_box(model.img_size, crop_pct)
    if height != width:
        warnings.warn(f"preprocessor_config.json: transformers' image processors cannot resize to cover a non-square "
                      f"{box[0]}x{box[1]} box keeping the aspect ratio, as leanmim and timm do; it resizes the shorter "
                      f"side to {max(box)} and centre-crops {height}x{width}, exact for square images, a closer crop of "
                      f"others: for the exact view use the timm export or 'leanmim embed'")
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": max(box)}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": height, "width": width}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [float(v) for v in mean], "image_std": [float(v) for v in std],
            "do_convert_rgb": model.in_chans == 3}


# What save_pretrained, the preprocessor and the card write: an existing --out holding only these is replaced.
HF_EXPORT_FILES = re.compile(r"^(config\.json|generation_config\.json|preprocessor_config\.json|README\.md|"
                             r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json)$")


def write_hf_directory(hf_model: nn.Module, out: str | Path, preprocessor: dict[str, Any] | None,
                       card: str | None) -> Path:
    """``save_pretrained`` + ``preprocessor_config.json`` + the card (``README.md``) into a hidden directory beside
    ``out``, then renamed into place: a kill leaves ``out`` as it was. An existing ``out`` (the caller checked
    ``--overwrite``) is replaced whole, so it may hold only what an export writes."""
    out = Path(out)
    if out.is_symlink():
        raise ConfigError(f"--out '{out}' is a symbolic link: leanmim never writes through links; choose another name")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file: a transformers export is a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not HF_EXPORT_FILES.match(p.name))
        if foreign:
            raise ConfigError(f"--out '{out}' holds files a transformers export does not write "
                              f"({', '.join(foreign[:3])}): --overwrite replaces the whole directory, so move them "
                              f"or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    building, previous = temporary_path(out), out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # "Writing model shards" is no news on a command line
    try:
        hf_model.save_pretrained(str(building))
        if preprocessor is not None:
            (building / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        if card is not None:
            (building / "README.md").write_text(card)
        umask = os.umask(0)
        os.umask(umask)
        for path in building.iterdir():   # safetensors writes 0600: readable as the user's umask says
            os.chmod(path, 0o666 & ~umask)
        if out.exists():
            os.replace(out, previous)
        os.replace(building, out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
    return out


def export_hf(method: nn.Module, model: ModelConfig, out: str | Path, options: dict[str, Any] | None = None,
              mean=None, std=None, crop_pct: float = 1.0, checkpoint_path: Path | None = None) -> Path:
    """A transformers directory: ``ViTMAEForPreTraining`` when the method has an MAE pixel decoder, else ``ViTModel``
    (the encoder, no pooler). Built with transformers itself and written by ``save_pretrained``; with the data's
    ``mean``/``std`` also a ``preprocessor_config.json`` (:func:`hf_preprocessor_config`), with ``checkpoint_path``
    a model card."""
    from .modelcard import model_card

    encoder, decoder = method.encoder, getattr(method, "decoder", None)
    if not isinstance(encoder, ViTEncoder):
        raise ConfigError(f"the {type(encoder).__name__} encoder (relative positions) has no transformers counterpart: "
                          f"use --format timm")
    transformers = require_transformers()
    canonical = encoder_canonical(encoder)
    pixel_decoder = isinstance(decoder, MaskedDecoder) and decoder.head.out_features == model.patch_dim
    if pixel_decoder and model.grid_size[0] != model.grid_size[1]:
        warnings.warn(f"transformers' ViTMAE builds its position tables for square patch grids only; this run's grid is "
                      f"{model.grid_size[0]}x{model.grid_size[1]}: the encoder is exported as a ViTModel, without the "
                      f"decoder (the decoder is in the run's checkpoint)")
        pixel_decoder = False
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
    preprocessor = hf_preprocessor_config(model, mean, std, crop_pct) if mean is not None and std is not None else None
    card = model_card(checkpoint_path, "transformers", classifier=False) if checkpoint_path is not None else None
    return write_hf_directory(hf_model, out, preprocessor, card)


def hf_classifier(loaded: FinetunedRun):
    """The fine-tuned classifier as transformers builds it, with leanmim's weights: ``cls`` pooling is
    ``ViTForImageClassification`` (final norm, cls token, ``classifier``); ``mean`` pooling is
    ``BeitForImageClassification`` with absolute positions, no relative bias, no layer scale and mean pooling (no
    final norm, mean of the patch tokens, ``pooler.layernorm`` = fc_norm). BEiT's key projection has no bias: a
    key bias adds q·b_k to every score of a query, which softmax ignores, so the outputs are equal. ``tokens``
    pooling has no transformers class."""
    transformers = require_transformers()
    classifier, model = loaded.classifier, loaded.config.model
    if not isinstance(classifier.encoder, ViTEncoder) or classifier.pool == "tokens":
        kind = "a --pool tokens classifier (one linear head over all L·D patch features)" \
            if classifier.pool == "tokens" else f"the {type(classifier.encoder).__name__} encoder (relative positions)"
        raise ConfigError(f"{kind} has no transformers counterpart: export it with --format timm to a "
                          f"FILE.safetensors (its metadata describes the layout)")
    names = loaded.results["class_names"]
    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                  label2id={name: index for index, name in enumerate(names)})
    settings = hf_vit_config(model)
    if classifier.pool == "cls":
        hf_model = transformers.ViTForImageClassification(transformers.ViTConfig(**settings, **labels))
    else:
        settings.pop("qkv_bias")
        hf_model = transformers.BeitForImageClassification(transformers.BeitConfig(
            **settings, **labels, use_absolute_position_embeddings=True, use_relative_position_bias=False,
            use_shared_relative_position_bias=False, use_mask_token=False, layer_scale_init_value=0.0,
            use_mean_pooling=True, drop_path_rate=0.0))
    canonical = encoder_canonical(classifier.encoder)
    for prefix, module in (("classifier", classifier.head), ("pooler.layernorm", classifier.fc_norm)):
        canonical.update({f"{prefix}.{name}": tensor.detach().float().contiguous().clone()
                          for name, tensor in module.state_dict().items()})
    aliases = {re.sub(r"^beit\.", "vit.", key): key for key in hf_model.state_dict()}   # BEiT's names read as ViT's
    placed = {re.sub(r"\.attn\.[qkv]\.", ".attn.qkv.", hf_to_canonical_name(key)) for key in aliases}
    unplaced = sorted(set(canonical) - placed)
    if unplaced:
        raise ConfigError(f"the fine-tuned encoder has weights transformers' {type(hf_model).__name__} has no place "
                          f"for ({', '.join(unplaced[:3])}): it cannot be exported exactly; use --format timm")
    state = canonical_to_hf(canonical, list(aliases))
    hf_model.load_state_dict({aliases[key]: value for key, value in state.items()}, strict=True)
    return hf_model.eval()


def export_finetuned_hf(loaded: FinetunedRun, out: str | Path) -> Path:
    """A fine-tuning as a transformers directory (:func:`hf_classifier`) with ``id2label``/``label2id``, the
    ``preprocessor_config.json`` of its evaluation view and data mean/std, and its model card."""
    from .modelcard import model_card

    hf_model = hf_classifier(loaded)
    stats = finetune_data_stats(loaded.checkpoint_path)
    if not stats:
        raise ConfigError(f"'{loaded.checkpoint_path.parent.parent}/finetune.json' records no data mean/std: the "
                          f"export could not carry the fine-tuning's preprocessing")
    notes = []
    if loaded.settings.eval_hflip:
        notes.append("leanmim selected this fine-tuning with mirror averaging (the mean softmax of each image and of "
                     "its mirror image); the model itself scores single images")
    if loaded.classifier.token_drop > 0:
        notes.append(f"leanmim evaluates it with token compression (--token-drop {loaded.classifier.token_drop}); "
                     f"transformers runs the full token sequence, so its outputs differ from leanmim's")
        warnings.warn(notes[-1])
    preprocessor = hf_preprocessor_config(loaded.config.model, stats["mean"], stats["std"],
                                          loaded.results["eval_crop_pct"])
    return write_hf_directory(hf_model, out, preprocessor,
                              model_card(loaded.checkpoint_path, "transformers", classifier=True, notes=notes))


def export_finetuned(path: str | Path, out: str | Path, format: str = "timm") -> Path:
    """Export a fine-tuned classifier (a directory: its selected checkpoint, ``best.ckpt``); ``format="hf"``: a
    transformers directory (:func:`export_finetuned_hf`), else timm as follows.

    For a :class:`ViTEncoder`: timm ``VisionTransformer(global_pool=G, num_classes=K)`` safetensors with G
    'avg' (``--pool mean``: encoder keys without ``norm.*``, plus ``fc_norm.*``, ``head.*``) or 'token' (``cls``:
    encoder keys with ``norm.*``, plus ``head.*``). ``--pool tokens`` has no timm pooling: the encoder is written
    for ``global_pool='', num_classes=0`` (its ``forward_features`` gives (B, 1 + L, D) normed tokens) and the
    head as ``token_head.weight`` (K, L·D) / ``token_head.bias``, applied to ``features[:, 1:].flatten(1)``
    (patch tokens in row-major grid order); the metadata says so. Other encoders (relative positions): their
    own state dict plus the head, architecture in the metadata. The metadata names the checkpoint and epoch.
    """
    from safetensors.torch import save_file

    loaded = load_finetuned(path)
    if format == "hf":
        return export_finetuned_hf(loaded, out)
    classifier = loaded.classifier
    encoder = classifier.encoder
    if isinstance(encoder, ViTEncoder):
        state = timm_state_dict(encoder)
        metadata = {**timm_create_kwargs(loaded.config.model), "format": "timm.VisionTransformer"}
        stats = finetune_data_stats(loaded.checkpoint_path)   # timm's pretrained_cfg: input size, mean/std
        metadata["pretrained_cfg"] = json.dumps(timm_pretrained_cfg(
            loaded.config.model, stats.get("mean"), stats.get("std"),
            0 if classifier.pool == "tokens" else classifier.head.out_features, loaded.results["eval_crop_pct"],
            None if classifier.pool == "tokens" else loaded.results["class_names"]))
    else:
        state = {name: tensor.detach().float().contiguous().clone() for name, tensor in encoder.state_dict().items()}
        architecture = encoder.architecture() if hasattr(encoder, "architecture") else {}
        metadata = {**architecture, "format": f"leanmim.{type(encoder).__name__}+head",
                    "final_norm": classifier.pool != "mean"}
    head_name = "token_head" if classifier.pool == "tokens" else "head"
    for prefix, module in (("fc_norm", classifier.fc_norm), (head_name, classifier.head)):
        state.update({f"{prefix}.{name}": tensor.detach().float().contiguous().clone()
                      for name, tensor in module.state_dict().items()})
    num_classes = classifier.head.out_features
    metadata.update(global_pool=TIMM_GLOBAL_POOL[classifier.pool], pool=classifier.pool, token_drop=classifier.token_drop,
                    num_classes=0 if classifier.pool == "tokens" else num_classes,
                    checkpoint=loaded.checkpoint_path.name, global_step=loaded.results["global_step"],
                    selected_epoch=loaded.results["selected_epoch"],
                    selected_val_top1=loaded.results["selected_val_top1"],
                    weights=("exponential moving average" if loaded.settings.ema_decay > 0 else "trained"))
    if classifier.pool == "tokens":
        metadata.update(head_classes=num_classes, head_input="token_head applies to forward_features(x)[:, 1:]"
                        ".flatten(1): the patch tokens (B, L, D) after the final norm, cls excluded, row-major "
                        "grid order")
    metadata["class_names"] = json.dumps(loaded.results["class_names"])
    out = Path(out)
    if out.suffix != ".safetensors":
        return write_finetuned_folder(loaded, state, metadata, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..files import publish, temporary_path

    tmp = temporary_path(out)
    try:
        save_file(state, str(tmp), metadata={key: str(value) for key, value in metadata.items()})
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_finetuned_folder(loaded: FinetunedRun, state: dict[str, Tensor], metadata: dict[str, Any], out: Path) -> Path:
    """A timm ``local-dir`` folder: ``model.safetensors``, ``config.json`` (architecture, ``model_args``, and the
    ``pretrained_cfg`` with ``label_names``, ``crop_pct``/``crop_mode``, mean/std) and a model card ``README.md``:
    ``timm.create_model("local-dir:OUT", pretrained=True)`` gives the classifier with its labels."""
    from ..config import TIMM_NAMES
    from ..files import atomic_write_text
    from .modelcard import write_model_card

    classifier = loaded.classifier
    if not isinstance(classifier.encoder, ViTEncoder) or classifier.pool == "tokens":
        raise ConfigError("a --pool tokens (or relative-position) classifier has no timm counterpart: export it to a "
                          "FILE.safetensors (the metadata describes its layout)")
    model = loaded.config.model
    pretrained_cfg = json.loads(metadata["pretrained_cfg"])
    args = timm_model_args(model, finetuned=classifier.pool == "mean")
    args.update(global_pool=TIMM_GLOBAL_POOL[classifier.pool], num_classes=classifier.head.out_features)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / "model.safetensors", metadata)
    config = {"architecture": TIMM_NAMES[model.name], "num_classes": classifier.head.out_features,
              "num_features": model.embed_dim, "global_pool": args["global_pool"], "model_args": args,
              "label_names": loaded.results["class_names"], "pretrained_cfg": pretrained_cfg}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    write_model_card(out, loaded.checkpoint_path, "timm", classifier=True)
    return out
