"""leanmim: masked image modeling pretraining for Vision Transformers at a fraction of the compute."""

__version__ = "0.1.0"
