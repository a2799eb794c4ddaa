"""towhee-isc: the ISC21 1st-place image copy-detection descriptor as the Towhee operator
``image-embedding/isc``.

Importing this package registers the operator with Towhee, so ``ops.image_embedding.isc()``
resolves offline; the same directory also works as a Towhee hub operator directory.

The import is light (no torch, timm or Towhee: ``towhee-isc --help`` answers at once): ``Isc``,
``IscNet`` and the rest load on first use, and the registration happens as soon as Towhee is
imported (at once if it already is), since the registry lives in Towhee.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .isc import Isc
    from .model import CheckpointError, IscNet
    from .weights import WEIGHTS, WeightsDownloadError

__all__ = ['Isc', 'IscNet', 'isc', 'CheckpointError', 'WeightsDownloadError', 'WEIGHTS']

# Public name -> the module (relative) that defines it, imported on first access.
_LAZY = {'Isc': '.isc', 'IscNet': '.model', 'CheckpointError': '.model', 'WeightsDownloadError': '.weights',
         'WEIGHTS': '.weights'}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def isc(*args, **kwargs) -> Isc:
    """The factory Towhee looks up: ``isc(...)`` is ``Isc(...)``."""
    return __getattr__('Isc')(*args, **kwargs)


class _Package(types.ModuleType):
    """This package, whose ``isc`` stays the factory Towhee calls: importing the submodule ``isc.py``
    (lazily, after the ``def`` above) would otherwise rebind the package's ``isc`` to that module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name == 'isc' and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _load_operator() -> None:
    """Import ``isc.py``, which registers ``Isc`` with Towhee as it is defined. When ``isc.py`` is the
    one importing Towhee, it is half-way through (found in ``sys.modules``) and registers once done."""
    importlib.import_module('.isc', __name__)


class _RegisterWhenTowheeLoads:
    """A one-shot import hook: when ``towhee`` is first imported, load the operator (registering it)
    right after Towhee's own ``__init__`` has run. (A ``sys.meta_path`` finder; importlib.abc's base
    classes are not imported for it: they cost more than the rest of this package's import.)"""

    def find_spec(self, name, path, target=None):
        if name != 'towhee':
            return None
        sys.meta_path.remove(self)  # first, so that finding the real spec below does not come back here
        spec = importlib.util.find_spec('towhee')
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister:
    """Towhee's own loader, which then loads the operator."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _load_operator()

    def __getattr__(self, name: str) -> Any:  # anything else (resources, source) is Towhee's loader's
        return getattr(self.loader, name)


if 'towhee' in sys.modules:
    _load_operator()
elif not any(isinstance(finder, _RegisterWhenTowheeLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTowheeLoads())
