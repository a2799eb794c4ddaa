"""A Milvus collection of descriptors (Milvus Lite file or a server) and near-duplicate pairs through it."""
from __future__ import annotations

import json
from typing import Iterator, Sequence

import numpy as np

from .descriptors import check_same_postprocessing
from .metrics import Match

DEFAULT_MILVUS_URI = './isc.db'  # Milvus Lite: embedded, a file, nothing to start
POSTPROCESSING = 'towhee_isc.postprocessing'  # collection property: how its vectors were post-processed


class MilvusIndex:
    """A Milvus collection of descriptors: primary key = image id (indexing again updates), inner
    product on L2-normalised vectors. A file URI is Milvus Lite; ``http://host:19530`` a server."""

    def __init__(self, uri: str = DEFAULT_MILVUS_URI, collection: str = 'isc'):
        try:
            from pymilvus import MilvusClient
        except ImportError as e:
            raise ImportError('the Milvus commands need pymilvus (and milvus-lite for file URIs): '
                              'pip install pymilvus milvus-lite') from e
        self.uri, self.collection = uri, collection
        try:
            self.client = MilvusClient(uri=uri, timeout=10)
        except Exception as e:  # pymilvus raises its own and grpc errors; say which URI failed
            raise ConnectionError(f'cannot reach Milvus at {uri!r}: {e}') from e

    def dim(self) -> int | None:
        if not self.client.has_collection(self.collection):
            return None
        fields = self.client.describe_collection(self.collection)['fields']
        return next(f['params']['dim'] for f in fields if f['name'] == 'vector')

    def postprocessing(self) -> dict | None:
        """How the collection's vectors were post-processed (None: raw, or made before we recorded it)."""
        if not self.client.has_collection(self.collection):
            return None
        text = (self.client.describe_collection(self.collection).get('properties') or {}).get(POSTPROCESSING)
        return json.loads(text) if text else None

    def create(self, dim: int = 256, postprocessing: dict | None = None) -> None:
        """Make the collection if it is not there (``id`` VARCHAR primary key, ``vector``, inner
        product, ``postprocessing`` kept as a property); one of another size is an error."""
        from pymilvus import DataType, MilvusClient
        existing = self.dim()
        if existing is None:
            schema = MilvusClient.create_schema(auto_id=False)
            schema.add_field('id', DataType.VARCHAR, is_primary=True, max_length=512)
            schema.add_field('vector', DataType.FLOAT_VECTOR, dim=dim)
            index = self.client.prepare_index_params()
            index.add_index('vector', index_type='FLAT', metric_type='IP')
            properties = {} if postprocessing is None else {POSTPROCESSING: json.dumps(postprocessing, sort_keys=True)}
            self.client.create_collection(self.collection, schema=schema, index_params=index, properties=properties)
        elif existing != dim:
            raise ValueError(f'collection {self.collection!r} holds {existing}-d vectors; these are {dim}-d')

    def add(self, ids: Sequence[str], vectors: np.ndarray, batch: int = 1000, postprocessing: dict | None = None) -> None:
        """Insert or update by id, creating the collection on first use. Vectors post-processed
        otherwise than the collection's (``postprocessing``, None for raw) are refused."""
        existed = self.client.has_collection(self.collection)
        self.create(vectors.shape[1], postprocessing)
        if existed:
            check_same_postprocessing({f'collection {self.collection!r}': self.postprocessing(),
                                       'the descriptors to add': postprocessing})
        for start in range(0, len(ids), batch):
            rows = [{'id': i, 'vector': v.tolist()} for i, v in zip(ids[start:start + batch], vectors[start:start + batch])]
            self.client.upsert(self.collection, rows)
        self.client.flush(self.collection)

    def count(self) -> int:
        return int(self.client.query(self.collection, filter='', output_fields=['count(*)'])[0]['count(*)'])

    def search(self, query_ids: Sequence[str], queries: np.ndarray, k: int, threshold: float | None = None,
               offsets: np.ndarray | None = None, batch: int = 256) -> list[Match]:
        dim = self.dim()
        if dim is None:
            raise ValueError(f'unknown collection {self.collection!r} at {self.uri!r}: index some descriptors first')
        if dim != queries.shape[1]:
            raise ValueError(f'collection {self.collection!r} holds {dim}-d vectors; the queries are {queries.shape[1]}-d')
        matches = []
        for start in range(0, len(queries), batch):
            hits = self.client.search(self.collection, data=queries[start:start + batch].tolist(), limit=k,
                                      output_fields=['id'], search_params={'metric_type': 'IP'})
            for row, row_hits in enumerate(hits):
                offset = 0.0 if offsets is None else float(offsets[start + row])
                for hit in row_hits:
                    score = float(hit['distance']) - offset
                    if threshold is None or score >= threshold:
                        matches.append(Match(query_ids[start + row], hit['id'], score))
        return matches


def milvus_duplicate_pairs(index: MilvusIndex, ids: Sequence[str], vectors: np.ndarray, threshold: float,
                           k: int = 100) -> Iterator[tuple[int, int, float]]:
    """Near-duplicate pairs through a Milvus collection holding ``ids``: each image's k nearest
    neighbours above ``threshold``. Memory stays O(k x batch) whatever the collection's size."""
    position = {image: i for i, image in enumerate(ids)}
    for m in index.search(ids, vectors, k + 1, threshold):
        i, j = position[m.query_id], position.get(m.reference_id)
        if j is not None and i < j:
            yield i, j, m.score
