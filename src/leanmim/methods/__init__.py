"""Pretraining methods, one file each, registered by name (``leanmim methods`` lists them).

    base.py   MIMMethod (what every method is: images in, a loss and logs out), the registry, option handling
    mae.py    MAE: random masking, encoder on visible tokens, light decoder, normalised-pixel loss
    pcae.py   PCAE: an EMA teacher compresses the masked tokens; the student decodes only those that survive
    prmim.py  PR-MIM: decode only part of the masked tokens, supervise the thrown rest through a near-free path
    lomar.py  LoMaR: masked reconstruction inside small random windows, relative positions
    ddae.py   DDAE: MAE with dynamic patch weights and deep feature self-distillation from an EMA teacher

Each method composes pieces from ``leanmim.parts``; may import config and parts, never data, weights, train or eval.
"""

from .base import METHODS, MethodOutput, MIMMethod, build_method, build_options, method_class, register_method
from . import mae  # noqa: F401  (registers)
from . import prmim  # noqa: F401  (registers)
from . import ddae  # noqa: F401  (registers)
from . import pcae  # noqa: F401  (registers)
from . import lomar  # noqa: F401  (registers)

__all__ = ["METHODS", "MethodOutput", "MIMMethod", "build_method", "build_options", "method_class", "register_method"]
