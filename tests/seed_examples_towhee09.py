"""The user's two seed examples, verbatim, on Towhee 0.9.0 (run by test_towhee.py in its own venv).

Runs in a folder holding towhee.jpeg / towhee.jpg, with TORCH_HOME holding the default weights.
Prints one JSON line: the Towhee version, both embeddings, and whether each table was shown.
Outside a notebook Towhee 0.9's ``show()`` hands an HTML table to IPython's ``display``, which
we record on the way.
"""
import json
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stand_ins import register_stand_in_image_decode  # noqa: E402

register_stand_in_image_decode()
result = {'towhee': version('towhee')}

from towhee.utils.thirdparty import ipython_utils  # noqa: E402

tables = []
_display = ipython_utils.display


def recording_display(obj, *args, **kwargs):
    tables.append(getattr(obj, 'data', str(obj)))
    return _display(obj, *args, **kwargs)


ipython_utils.display = recording_display


def shown_table() -> bool:
    """Whether the last show() displayed a table with an image column and a vector column."""
    return bool(tables) and '<table' in tables[-1] and 'img' in tables[-1] and 'vec' in tables[-1]

# Seed example 1: towhee.dc2 pipeline and DataCollection.
from towhee.dc2 import pipe, ops, DataCollection  # noqa: E402

p = pipe.input('path').map('path', 'img', ops.image_decode()).map('img', 'vec', ops.image_embedding.isc()).output('img', 'vec')
DataCollection(p('towhee.jpeg')).show()
result['dc2_table'] = shown_table()
result['dc2'] = p('towhee.jpeg').get()[1].tolist()

# Seed example 2: DataCollection chaining.
import towhee  # noqa: E402

towhee.glob['path']('./towhee.jpg').image_decode['path', 'img']().image_embedding.isc['img', 'vec']().select['img', 'vec']().show()
result['chaining_table'] = shown_table()
vec = towhee.glob['path']('./towhee.jpg').image_decode['path', 'img']().image_embedding.isc['img', 'vec']().select['img', 'vec']().to_list()[0].vec
result['chaining'] = vec.tolist()
print(json.dumps(result))
