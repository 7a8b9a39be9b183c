"""Pretraining methods, one file each, registered by name (``leanmim methods`` lists them)."""

from .base import METHODS, MethodOutput, MIMMethod, build_method, build_options, method_class, register_method
from . import mae  # noqa: F401  (registers)
from . import prmim  # noqa: F401  (registers)
from . import ddae  # noqa: F401  (registers)
from . import pcae  # noqa: F401  (registers)
from . import lomar  # noqa: F401  (registers)

__all__ = ["METHODS", "MethodOutput", "MIMMethod", "build_method", "build_options", "method_class", "register_method"]
