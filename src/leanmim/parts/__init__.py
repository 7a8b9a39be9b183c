"""The pieces methods are built from, each once: a method file in ``leanmim.methods`` composes them.

    tokens.py            patchify/unpatchify, random masking and windows, BatchRandom (per-image seeded draws)
    encoder.py           ViTEncoder (timm blocks, sin-cos positions) that runs on visible tokens; pooling
    decoder.py           MaskedDecoder: mask tokens in place, a light transformer, pixels out
    relpos.py            RelPosViTEncoder: relative position bias for windowed encoders (LoMaR)
    losses.py            reconstruction losses: normalised pixels, per-token MSE and cosine, weighting
    teacher.py           an EMA teacher and its cosine momentum schedule (PCAE, DDAE)
    compression.py       token dropping inside the encoder (PCAE), and the 12-block rescaling rule
    partial.py           progressive reconstruction with late queries and throw-away selection (PR-MIM)
    weighting.py         distance-to-visible and depth weights (DDAE)
    deep_supervision.py  per-block decoders for deep supervision (DDAE)
    classifier.py        Classifier: an encoder + pooling + head, as fine-tuning, export and prediction use it

May import ``leanmim.config`` and each other (no circles); never methods, data, weights, train, eval or the API.
"""
