"""towhee-isc: the ISC21 1st-place image copy-detection descriptor as the Towhee operator
``image-embedding/isc``.

Importing this package registers the operator with Towhee, so ``ops.image_embedding.isc()``
resolves offline; the same directory also works as a Towhee hub operator directory.
"""
from .isc import Isc
from .model import CheckpointError, IscNet
from .weights import WEIGHTS, WeightsDownloadError

__all__ = ['Isc', 'IscNet', 'isc', 'CheckpointError', 'WeightsDownloadError', 'WEIGHTS']


def isc(*args, **kwargs) -> Isc:
    """The factory Towhee looks up: ``isc(...)`` is ``Isc(...)``."""
    return Isc(*args, **kwargs)


def _register_with_towhee() -> None:
    from towhee import register
    register(name='image-embedding/isc')(Isc)


_register_with_towhee()
