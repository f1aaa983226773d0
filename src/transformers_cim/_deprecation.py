"""Old import paths kept for one release after the training side moved to `transformers_cim.training`.

Each module left at an old path (`transformers_cim.trainer`, `transformers_cim.data`, ...) is one call of
:func:`alias_module`, which warns once with the new path and puts the new module in the old one's place, so
`from transformers_cim.trainer import CIMTrainer`, `import transformers_cim.data.collate` and
`mock.patch("transformers_cim.streaming.X")` all reach the one real module. The targets are imported by name, here
only, so the library's own code never imports the training side (see tests/test_layout.py).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

REMOVED_IN = "0.2.0"


def moved_message(old_name: str, new_names: tuple[str, ...]) -> str:
    """The warning text: where the module went and when the old path goes."""
    return (
        f"`{old_name}` moved to `{'`, `'.join(new_names)}`; the old import path is deprecated and will be "
        f"removed in transformers-cim {REMOVED_IN}."
    )


def _alias_package_modules(old_name: str, package: ModuleType) -> None:
    """Make `old_name.sub` the same module object as `package.sub` for every submodule of a package."""
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        sys.modules[f"{old_name}.{info.name}"] = module


def alias_module(old_name: str, *new_names: str) -> None:
    """Replace the module being imported as `old_name` by the module `new_names[0]` (warning with a FutureWarning).

    With several new names (a module that was split), the old module instead re-exports the `__all__` of each.
    """
    warnings.warn(moved_message(old_name, new_names), FutureWarning, stacklevel=3)
    targets = [importlib.import_module(name) for name in new_names]
    if len(targets) == 1:
        sys.modules[old_name] = targets[0]
        if hasattr(targets[0], "__path__"):
            _alias_package_modules(old_name, targets[0])
        return
    old = sys.modules[old_name]
    exported = []
    for target in targets:
        for name in target.__all__:
            setattr(old, name, getattr(target, name))
            exported.append(name)
    old.__all__ = sorted(exported)


def moved_attributes(old_module: str, new_modules: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for names that left `old_module`: each name in `new_modules` is looked up in the module
    named there, with a FutureWarning; other names raise AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        if name not in new_modules:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            moved_message(f"{old_module}.{name}", (f"{new_modules[name]}.{name}",)), FutureWarning, stacklevel=2
        )
        return getattr(importlib.import_module(new_modules[name]), name)

    return __getattr__
