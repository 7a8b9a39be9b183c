"""Typed settings: every option a run, a model or a fine-tuning takes, validated, and read from YAML or flags.

    fields.py    ConfigError, option() (a field with its help and flag), coercion of YAML/flag values, image sizes
    model.py     ModelConfig: the ViT encoder and decoder sizes, the presets and the timm model names
    run.py       DataConfig, TrainConfig, RunConfig (one pretraining run) and its YAML reading/writing
    finetune.py  FinetuneConfig: the fine-tuning recipe

Torch-free (``leanmim --help`` and the method catalogue read it without loading torch). Imports only
``leanmim.files``; everything else in leanmim may import it. Import names from ``leanmim.config`` itself.
"""

from __future__ import annotations

from .fields import (ConfigError, option, launched_by_cluster, as_user_meant, field_type, coerce, dataclass_from_dict,
                     ImageSize, parse_img_size, image_hw, format_img_size)
from .model import (MODEL_PRESETS, TIMM_NAMES, TIMM_EXAMPLES, MODEL_HELP, timm_vit_architecture, default_decoder,
                    ModelConfig, model_from_timm_name)
from .run import (DataConfig, TrainConfig, SECTIONS, RunConfig, MAX_YAML_NODES, AliasBomb, BoundedLoader)
from .finetune import (POOLS, AUTO_AUGMENTS, FinetuneConfig)

__all__ = ["ConfigError", "option", "launched_by_cluster", "as_user_meant", "field_type", "coerce",
           "dataclass_from_dict", "ImageSize", "parse_img_size", "image_hw", "format_img_size", "MODEL_PRESETS", "TIMM_NAMES", "TIMM_EXAMPLES", "MODEL_HELP",
           "timm_vit_architecture", "default_decoder", "ModelConfig", "model_from_timm_name", "DataConfig",
           "TrainConfig", "SECTIONS", "RunConfig", "MAX_YAML_NODES", "AliasBomb", "BoundedLoader", "POOLS",
           "AUTO_AUGMENTS", "FinetuneConfig"]
