"""Old import paths kept for one release: a module whose names moved resolves each to its new home, with a warning.

Used by ``leanmim.engine`` and ``leanmim.finetune`` (modules in 0.1.0); stdlib only.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable


def moved_names(old: str, moved: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` for names that now live elsewhere: ``moved`` maps each name to the
    module that holds it; reading one warns (FutureWarning) where it moved and returns the object itself."""
    def __getattr__(name: str) -> object:
        if name not in moved:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved to {moved[name]}.{name}; import it from there", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    def __dir__() -> list[str]:
        return sorted(moved)

    return __getattr__, __dir__
