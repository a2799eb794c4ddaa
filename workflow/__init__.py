"""The copy-detection workflow built on the operator: ``towhee-isc`` embed, index, search, dedup, evaluate.

``embedding`` (embed images to arrays or to a resumable descriptor file), ``descriptors`` (finding
images; descriptor files), ``matching`` (exact search, score normalisation, duplicate groups, report),
``milvus`` (a Milvus collection), ``metrics`` (the challenge's scorer), ``cli`` (the command),
``ray`` (embedding on a Ray cluster: the optional extra ``towhee-isc[ray]``).
"""
from .embedding import Embedder, embed_collection, load_descriptors

__all__ = ['Embedder', 'embed_collection', 'load_descriptors']
