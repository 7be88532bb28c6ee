"""Model families, found by name. A new family is one new module in this package that
subclasses ``ModelFamily`` and decorates it with ``@register``."""

from __future__ import annotations

import importlib
import pkgutil

from visionserve.errors import ModelError
from visionserve.families.base import ModelFamily

_FAMILIES: dict[str, type[ModelFamily]] = {}
_discovered = False


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    _FAMILIES[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if not _discovered:
        for mod in pkgutil.iter_modules(__path__):
            if mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")
        _discovered = True


def family_names() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def get_family(name: str) -> type[ModelFamily]:
    _discover()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}") from None
