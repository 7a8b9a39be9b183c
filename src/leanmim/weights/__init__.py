"""Weights in and out: published layouts read into leanmim's modules, leanmim's runs exported to timm and transformers.

    layouts.py      each layout's key mapping to leanmim's canonical names (MAE authors' = timm, transformers, leanmim)
    read.py         read_weights: any file or directory --init-from takes -> canonical tensors + what the file says
    load.py         loading canonical tensors into an encoder/decoder: resizing, fit checks, refusals, notes
    checkpoints.py  a run's checkpoints and records read back: load_run (pretraining), load_finetuned (fine-tuning)
    crop_pct.py     the evaluation view as timm's crop_pct, square and non-square (what exports and embed use)
    export.py       timm / transformers / safetensors exports of pretrainings and fine-tunings
    modelcard.py    the README.md model card written beside an export

May import config, files, parts, methods and data; never train, eval or the API. ``leanmim.weights`` re-exports the
names below, so ``from leanmim.weights import read_weights`` keeps working.
"""

from __future__ import annotations

from .layouts import (IGNORED, HF_RENAMES, QKV, DECODER_NAMES, hf_to_canonical_name, from_hf, canonical_to_hf,
                      from_leanmim_method, with_cls_row, encoder_canonical, decoder_canonical, is_decoder_key)
from .read import (Weights, torch_load, read_safetensors, read_hf_directory, read_weights, leanmim_run_weights,
                   canonical_weights, unsupported_reason, check_transformers_config, describe_encoder)
from .load import (grid_of, mae_interpolate_pos_embed, resized_table, load_line, fit_report, fit_error, eps_note,
                   check_heads, load_encoder, load_decoder, init_method_from, loaded_parts, check_init_from,
                   model_from_weights, run_from_weights, run_at_img_size, adapted_input_conv)
from .crop_pct import timm_crop_pct, eval_crop_pct, folder_crop_pct, pretraining_crop_pct
from .export import (TIMM_FORMAT, RELPOS_FORMAT, timm_state_dict, timm_create_kwargs,
                     timm_pretrained_cfg, timm_model_args, write_safetensors, write_timm, export_encoder,
                     export_relpos_encoder, load_relpos_encoder, require_transformers, hf_vit_config, export_hf,
                     export_finetuned, write_finetuned_folder)
from .checkpoints import (STATE_PREFIX, find_checkpoint, read_checkpoint, checkpoint_step, newest_checkpoint,
                          LoadedRun, load_run, unfinished_pretraining, read_finetune_entry, selected_checkpoint,
                          FinetunedRun, load_finetuned, finetune_data_stats, run_data_stats)

__all__ = ["IGNORED", "HF_RENAMES", "QKV", "DECODER_NAMES", "hf_to_canonical_name", "from_hf", "canonical_to_hf",
           "from_leanmim_method", "with_cls_row", "encoder_canonical", "decoder_canonical", "is_decoder_key",
           "Weights", "torch_load", "read_safetensors", "read_hf_directory", "read_weights", "leanmim_run_weights",
           "canonical_weights", "unsupported_reason", "check_transformers_config", "describe_encoder", "grid_of",
           "mae_interpolate_pos_embed", "resized_table", "load_line", "fit_report", "fit_error", "eps_note",
           "check_heads", "load_encoder", "load_decoder", "init_method_from", "loaded_parts", "check_init_from",
           "model_from_weights", "run_from_weights", "run_at_img_size", "adapted_input_conv", "TIMM_FORMAT",
           "RELPOS_FORMAT", "timm_state_dict", "timm_create_kwargs", "timm_crop_pct", "timm_pretrained_cfg",
           "timm_model_args", "write_safetensors", "write_timm", "export_encoder", "export_relpos_encoder",
           "load_relpos_encoder", "require_transformers", "hf_vit_config", "export_hf", "export_finetuned",
           "write_finetuned_folder", "eval_crop_pct", "folder_crop_pct", "pretraining_crop_pct", "STATE_PREFIX", "find_checkpoint", "read_checkpoint",
           "checkpoint_step", "newest_checkpoint", "LoadedRun", "load_run", "unfinished_pretraining",
           "read_finetune_entry", "selected_checkpoint", "FinetunedRun", "load_finetuned", "finetune_data_stats",
           "run_data_stats"]
