"""Evaluation and reporting: what users run on a trained model, and the cost accounting.

    probe.py        frozen-encoder kNN and linear probes (features, accuracy)
    finetuned.py    a fine-tuning's accuracy on its validation or test split
    predict.py      ``leanmim predict``: a fine-tuning's classes for a folder of images, into a CSV
    embed.py        ``leanmim embed``: a run's frozen-encoder features for a folder of images, into safetensors
    reconstruct.py  pictures of masked inputs and their reconstructions
    status.py       ``leanmim status`` / ``leanmim runs``: where runs stand, read from their files
    cost.py         MACs and memory of a training step, counted with torch's FlopCounterMode
    bench.py        methods side by side: images/s, MACs, memory, in one run

May import everything below it (config, files, parts, methods, data, weights, train); never the API or the CLI.
"""
