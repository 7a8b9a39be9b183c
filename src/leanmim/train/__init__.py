"""Training: one core used by both tasks, and the two tasks as short siblings that say only what differs.

The core:
    precision.py      which precision and device a run gets (bf16 where the hardware has it)
    trainer.py        build_trainer: the Lightning Trainer both tasks run on, its atomic checkpoint writer and
                      schedule, the signal handling that saves and stops (Ctrl-C, SIGTERM, SIGUSR1), the NaN guard
    loggers.py        Lightning's loggers by name, one CSV log per run continued by every resume, the progress record
    optim.py          the warmup-cosine schedule, weight-decay and layer-decay parameter groups, resume position
    run.py            a run directory's identity: resume exactly the same run or refuse and say what differs;
                      data fingerprints, the summary, refusing to overwrite a user's files
    lock.py           one process at a time per run directory (RunLock), rank-zero detection under launchers
    console.py        what a run prints: the start summary, one progress line, quiet third-party warnings
    messages.py       leanmim's warnings as one line each, for every command (stdlib only)
The tasks:
    pretrain.py       PretrainModule + PretrainData around a method; ``pretrain(config)``
    finetune.py       FinetuneModule, selection on validation, test once; ``finetune(run, settings)``
    finetune_data.py  the fine-tuning's labelled splits, augmentation and data module

May import config, files, parts, methods, data and weights; never eval or the API.
"""
