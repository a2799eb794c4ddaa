"""A stand-in for Towhee's hub operator ``image-decode``, which Towhee downloads at run time (offline
tests cannot). Imports nothing of towhee-isc, so scripts that must not import it can use it."""
import numpy as np
from PIL import Image


class StandInImageDecode:
    """Decodes a file like ``image-decode`` (OpenCV) does: a BGR ``towhee.types.Image``."""

    def __call__(self, path: str):
        from towhee.types import Image as TowheeImage
        with Image.open(path) as image:
            rgb = np.asarray(image.convert('RGB'))
        return TowheeImage(np.ascontiguousarray(rgb[:, :, ::-1]), 'BGR')


def register_stand_in_image_decode() -> None:
    """Register the stand-in as ``image-decode`` in every Towhee registry there is
    (Towhee 0.9 has one for chaining, ``towhee.register``, and one for ``towhee.dc2``)."""
    import towhee
    registers = {towhee.register}
    try:
        from towhee import dc2
        registers.add(dc2.register)
    except ImportError:  # Towhee >= 1.0 has a single registry
        pass
    for register in registers:
        register(name='image-decode')(StandInImageDecode)
