"""Moved: ``leanmim.finetune`` was the fine-tuning module in leanmim 0.1.0; its names now live in their own folders
(``leanmim.train`` for training, ``leanmim.weights`` for checkpoints and exports, ``leanmim.parts`` for model
pieces). This module keeps old imports working for one release: each name resolves to its new home with a
FutureWarning that says where it moved. Import from the new place.
"""

from __future__ import annotations

from ._moved import moved_names

MOVED = {
    "BEST_CHECKPOINT": "leanmim.files",
    "Classifier": "leanmim.parts.classifier",
    "FinetuneConfig": "leanmim.config",
    "FinetuneData": "leanmim.train.finetune_data",
    "FinetuneModule": "leanmim.train.finetune",
    "FinetunedRun": "leanmim.weights",
    "GlobalBatchSampler": "leanmim.data.sampler",
    "KeepSelected": "leanmim.train.finetune",
    "RESULTS_FILE": "leanmim.files",
    "TIMM_GLOBAL_POOL": "leanmim.parts.classifier",
    "TrainAugment": "leanmim.train.finetune_data",
    "check_finetune_resume": "leanmim.train.finetune",
    "class_scores": "leanmim.parts.classifier",
    "default_output_dir": "leanmim.train.finetune",
    "eval_crop_pct": "leanmim.weights",
    "evaluate_finetuned": "leanmim.eval.finetuned",
    "evaluate_test": "leanmim.train.finetune",
    "export_finetuned": "leanmim.weights",
    "finetune": "leanmim.train.finetune",
    "finetune_data_stats": "leanmim.weights",
    "finetune_identity": "leanmim.train.finetune",
    "finetune_splits": "leanmim.train.finetune_data",
    "initial_encoder": "leanmim.parts.classifier",
    "labelled_data": "leanmim.train.finetune_data",
    "layer_decay_groups": "leanmim.train.optim",
    "load_finetuned": "leanmim.weights",
    "prepare_encoder": "leanmim.parts.classifier",
    "read_finetune_entry": "leanmim.weights",
    "seeded": "leanmim.train.finetune_data",
    "selected_checkpoint": "leanmim.weights",
    "supports_token_drop": "leanmim.parts.classifier",
    "write_finetuned_folder": "leanmim.weights",
    "write_json": "leanmim.train.run",
}

__getattr__, __dir__ = moved_names(__name__, MOVED)
