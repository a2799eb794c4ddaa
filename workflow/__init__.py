"""The copy-detection workflow built on the operator: ``towhee-isc`` embed, index, search, dedup, evaluate.

``embedding`` (embed images to arrays or to a resumable descriptor file), ``descriptors`` (finding
images; descriptor files), ``matching`` (exact search, score normalisation, duplicate groups, report),
``milvus`` (a Milvus collection), ``metrics`` (the challenge's scorer), ``cli`` (the command),
``ray`` (embedding on a Ray cluster: the optional extra ``towhee-isc[ray]``).

The names below load on first use: ``towhee-isc --help`` imports this package and must stay instant.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embedding import Embedder, embed_collection, load_descriptors

__all__ = ['Embedder', 'embed_collection', 'load_descriptors']


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    from . import embedding
    return getattr(embedding, name)
