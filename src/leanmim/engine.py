"""Moved: ``leanmim.engine`` was the pretraining engine module in leanmim 0.1.0; its names now live in their own folders
(``leanmim.train`` for training, ``leanmim.weights`` for checkpoints and exports, ``leanmim.parts`` for model
pieces). This module keeps old imports working for one release: each name resolves to its new home with a
FutureWarning that says where it moved. Import from the new place.
"""

from __future__ import annotations

from ._moved import moved_names

MOVED = {
    "AtomicCheckpointIO": "leanmim.train.trainer",
    "GlobalBatchSampler": "leanmim.data.sampler",
    "LOGGER_EXTRAS": "leanmim.train.loggers",
    "NonFiniteLossError": "leanmim.train.trainer",
    "PretrainData": "leanmim.train.pretrain",
    "PretrainModule": "leanmim.train.pretrain",
    "ProgressLogger": "leanmim.train.loggers",
    "RunCheckpoint": "leanmim.train.trainer",
    "StopOnSignal": "leanmim.train.trainer",
    "ThroughputSummary": "leanmim.train.trainer",
    "TrainingInterrupted": "leanmim.train.trainer",
    "_pretrain": "leanmim.train.pretrain",
    "bf16_supported": "leanmim.train.precision",
    "build_loggers": "leanmim.train.loggers",
    "build_trainer": "leanmim.train.trainer",
    "legacy_identity": "leanmim.train.pretrain",
    "lightning_precision": "leanmim.train.precision",
    "parameter_groups": "leanmim.train.optim",
    "pretrain": "leanmim.train.pretrain",
    "pretrain_identity": "leanmim.train.pretrain",
    "resolve_config": "leanmim.train.pretrain",
    "resume_position": "leanmim.train.optim",
    "save_resume_point": "leanmim.train.trainer",
    "warmup_cosine": "leanmim.train.optim",
    "write_summary": "leanmim.train.run",
}

__getattr__, __dir__ = moved_names(__name__, MOVED)
