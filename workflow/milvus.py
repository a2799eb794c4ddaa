"""A Milvus collection of descriptors (Milvus Lite file or a server) and near-duplicate pairs through it.

Every public call works in a fresh process: the collection is loaded before it is searched or
counted (Milvus keeps a collection loaded only while the process that loaded it runs, and Milvus
Lite runs inside ours). Milvus's own errors become :class:`MilvusError`, one line that names the URI.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from ..defaults import DEFAULT_MILVUS_URI, INDEX_TYPES  # noqa: F401 (imported from here too)
from ..progress import Progress
from .descriptors import check_same_postprocessing
from .embedding import check_same_model
from .engines import meets
from .metrics import Match

POSTPROCESSING = 'towhee_isc.postprocessing'  # collection property: how its vectors were post-processed
PATH = 'path'  # each image's path, as descriptor files keep it, in the collection's dynamic field (for reports)
MODEL = 'towhee_isc.model'  # collection property: the operator fingerprint of the model that made them
# Collection property 'true' while `index` writes and 'false' when all is written: a run that failed (or was
# killed) leaves it, and search refuses the partial collection until `index` runs again.
INCOMPLETE = 'towhee_isc.incomplete'
MAX_ID_BYTES = 512  # the id field's max_length; checked before anything is written
# An id indexed again is the same image when its new vector is this close to the stored one (the same model
# on the same file gives the same vector, within 1e-5; ONNX and PyTorch within 1e-4).
SAME_IMAGE = 0.999
# What `index` can do about ids held for other images (check_same_images); other commands say their own.
REPLACE_HINT = 'rename those files, or give --replace to replace those references'
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 200  # Milvus's usual starting point
# Default search widths: on 100,000 random 256-d vectors these found >= 99 % of copies at rank 1
# (benchmarks/milvus_index.py; at nlist/16 cells or ef 64, only 98 % and 84 %).
IVF_NPROBE_SHARE, HNSW_EF = 8, 256
# Every call to Milvus (a describe, a batch of 1,000 rows written, 256 queries searched, a load) must be answered
# within this many seconds, or the command fails with one line instead of hanging on a frozen server. Healthy
# calls take seconds; loading a very large collection may take longer: TOWHEE_ISC_MILVUS_TIMEOUT=SECONDS.
CALL_TIMEOUT_S = 300.0
TIMEOUT_VARIABLE = 'TOWHEE_ISC_MILVUS_TIMEOUT'
CONNECT_TIMEOUT_S = 10.0  # gRPC's handshake and Milvus's Connect
# A Milvus server returns at most this many matches per query (its topk limit); Milvus Lite has none and
# would try to allocate k x queries results (a typo of -k could take every byte of memory).
MAX_TOP_K = 16384


def call_timeout() -> float:
    """The seconds one call to Milvus may take: ``TOWHEE_ISC_MILVUS_TIMEOUT``, else ``CALL_TIMEOUT_S``."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return CALL_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f'{TIMEOUT_VARIABLE}={text!r}: give the seconds one call to Milvus may take (above 0)')
    return seconds


class MilvusError(ValueError):
    """Milvus refused a request, failed it, or its Lite database cannot be opened."""


def ivf_nlist(n: int) -> int:
    """IVF cells for a collection of ``n`` vectors: about 4 sqrt(n), the usual rule, but at most n/39
    (k-means wants 39 points a cell; faiss warns on stderr below that) and within [1, 65536]."""
    return int(max(1, min(65536, round(4 * math.sqrt(max(n, 1))), n // 39)))


def index_params(index_type: str, n: int) -> dict:
    """Build parameters of ``index_type`` for a collection of about ``n`` vectors."""
    if index_type == 'IVF_FLAT':
        return {'nlist': ivf_nlist(n)}
    if index_type == 'HNSW':
        return {'M': HNSW_M, 'efConstruction': HNSW_EF_CONSTRUCTION}
    return {}


def search_params(index_type: str, k: int, nlist: int, nprobe: int | None = None, ef: int | None = None) -> dict:
    """Search parameters for ``k`` neighbours: IVF probes ``nprobe`` cells (default nlist/8, at least 16),
    HNSW explores ``ef`` candidates (default 256; never below k, which Milvus requires)."""
    params: dict = {}
    if index_type == 'IVF_FLAT':
        params['nprobe'] = min(nlist, nprobe or max(16, nlist // IVF_NPROBE_SHARE))  # never more cells than there are
    elif index_type == 'HNSW':
        params['ef'] = max(k, ef or HNSW_EF)
    return {'metric_type': 'IP', 'params': params}


class _MilvusLogs(logging.Filter):
    """Holds back the error records pymilvus and Milvus Lite log (a traceback each) while one of our
    calls runs: dropped when the call fails, since we raise the failure as one line, and logged as
    usual when it succeeds. Keeps the last exception logged: Milvus Lite says only there why it could
    not open its folder."""

    LOGGERS = ('pymilvus.decorators', 'milvus_lite.server_manager', 'milvus_lite.adapter.grpc.servicer')

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.cause: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.held.append(record)
        if record.exc_info and record.exc_info[1] is not None:
            self.cause = record.exc_info[1]
        return False


@contextlib.contextmanager
def _milvus_errors(uri: str, what: str, timeout: float | None = None) -> Iterator[None]:
    """Milvus's exceptions and error logs during ``what`` → one :class:`MilvusError` naming ``uri``; so are
    gRPC's own (pymilvus lets some through), a call unanswered within ``timeout`` seconds among them."""
    import grpc
    from pymilvus.exceptions import MilvusException
    logs = _MilvusLogs()
    loggers = [logging.getLogger(name) for name in _MilvusLogs.LOGGERS]
    for logger in loggers:
        logger.addFilter(logs)
    try:
        yield
    except MilvusException as e:
        # Milvus Lite logs why it could not open its folder and raises only 'Open local milvus failed'
        reason = f'{type(logs.cause).__name__}: {logs.cause}' if logs.cause is not None else e.message
        raise MilvusError(f'Milvus at {uri!r}: {what} failed: {reason}') from e
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            waited = f' within {timeout:g} s' if timeout else ''
            reason = (f'no answer{waited} (the server is frozen or overloaded; {TIMEOUT_VARIABLE}=SECONDS '
                      'waits longer)')
        else:
            reason = f'{e.code().name}: {e.details()}'
        raise MilvusError(f'Milvus at {uri!r}: {what} failed: {reason}') from e
    finally:
        for logger in loggers:
            logger.removeFilter(logs)
    for record in logs.held:  # the call succeeded: what Milvus logged meanwhile is not ours to hide
        logging.getLogger(record.name).handle(record)


def _unauthenticated(error: BaseException | None) -> bool:
    """Whether gRPC's UNAUTHENTICATED status is somewhere in ``error``'s chain (pymilvus wraps it twice)."""
    seen = set()
    while error is not None and id(error) not in seen:  # a chain can loop back
        seen.add(id(error))
        code = getattr(error, 'code', None)
        if callable(code) and getattr(code(), 'name', None) == 'UNAUTHENTICATED':
            return True
        error = error.__cause__ or error.__context__
    return False


def _is_lite(uri: str) -> bool:
    return uri.endswith('.db')


def _check_lite_folder(path: str, existing: bool) -> None:
    """Refuse what Milvus Lite would choke on or silently write into: a file, or a folder of other
    things (it would add its own files to it); with ``existing``, a database that is not there (a
    search would leave an empty one behind)."""
    if not os.path.exists(path):
        if existing:
            raise MilvusError(f'no Milvus Lite database at {path!r}: index some descriptors first')
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):  # Milvus Lite would make every missing folder on the way
            raise MilvusError(f'cannot make a Milvus Lite database at {path!r}: the folder {parent!r} does not exist')
        return
    if not os.path.isdir(path):
        raise MilvusError(f'{path!r} is not a Milvus Lite database: Milvus Lite keeps a folder there, and this is '
                          'a file (from an older milvus-lite, or something else): move it away or pass another '
                          '--milvus-uri')
    if os.listdir(path) and not os.path.isdir(os.path.join(path, 'collections')):
        raise MilvusError(f'{path!r} is a folder but not a Milvus Lite database (no collections/ in it): '
                          'pass another --milvus-uri')


class _LiteServers:
    """Milvus Lite's in-process gRPC servers, one per database folder, each on a Unix socket in a private
    folder (mode 0700, made by ``tempfile.mkdtemp``), so only this user's processes can reach it.

    pymilvus's own route for a ``.db`` URI (milvus_lite's ``server_manager``) listens on a 127.0.0.1
    TCP port without authentication (Milvus Lite 3.2 has none): any local user could then read, change
    or drop the collections while a command runs. Shared within the process (counted), stopped by the
    last ``release`` or at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, list[Any]] = {}  # database folder -> [grpc server, MilvusLite, socket folder, users]
        atexit.register(self.release_all)

    def acquire(self, path: str) -> str:
        """A ``unix:`` URI for pymilvus to reach the database folder ``path`` (started on first use)."""
        path = os.path.abspath(path)
        with self._lock:
            if path not in self._open:
                from milvus_lite.adapter.grpc.server import start_server_in_thread
                folder = tempfile.mkdtemp(prefix='towhee-isc-milvus-')
                try:
                    # It binds f'{host}:{port}': a unix: address with port 0 is the socket file 'milvus:0'.
                    server, db, _ = start_server_in_thread(path, host=f'unix:{folder}/milvus', port=0)
                except BaseException:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise
                self._open[path] = [server, db, folder, 0]
            self._open[path][3] += 1
            return f'unix:{self._open[path][2]}/milvus:0'

    def release(self, path: str, force: bool = False) -> None:
        """One user fewer for ``path``; the last one stops its server and closes the database."""
        with self._lock:
            entry = self._open.get(os.path.abspath(path))
            if entry is None:
                return
            entry[3] -= 1
            if entry[3] > 0 and not force:
                return
            del self._open[os.path.abspath(path)]
        server, db, folder, _ = entry
        server.stop(grace=2).wait()
        db.close()
        shutil.rmtree(folder, ignore_errors=True)

    def release_all(self) -> None:
        for path in list(self._open):
            self.release(path, force=True)


_LITE = _LiteServers()


def close_milvus_lite() -> None:
    """Stop every Milvus Lite server of this process, closing their databases (also done at exit)."""
    _LITE.release_all()


@contextlib.contextmanager
def new_database_removed_on_failure(uri: str) -> Iterator[None]:
    """Around what a command does before it writes into the Milvus Lite database ``uri`` (opening it, reading
    and checking its inputs): where the database was not there before and this fails (bad input, Ctrl-C),
    what it made is removed again, so that such a command leaves no new ``./isc.db`` behind. A server's, or a
    database that was there, is left as it is; a write that fails part-way marks its collection incomplete
    instead (``MilvusIndex.add``)."""
    made = _is_lite(str(uri)) and not os.path.exists(uri)
    try:
        yield
    except BaseException:
        if made and os.path.isdir(uri):
            _LITE.release(str(uri), force=True)  # its server holds the folder
            shutil.rmtree(uri, ignore_errors=True)
        raise


class MilvusIndex:
    """A Milvus collection of descriptors: primary key = image id (indexing again updates), inner
    product on L2-normalised vectors. A ``.db`` URI is Milvus Lite (a folder); ``http://host:19530``
    a server, with ``token`` (``user:password`` or an API key) where it requires authentication.
    ``existing``: a Milvus Lite database must already be there (for reading)."""

    def __init__(self, uri: str = DEFAULT_MILVUS_URI, collection: str = 'isc', token: str | None = None,
                 existing: bool = False):
        try:
            from pymilvus import MilvusClient
        except ImportError as e:
            raise ImportError('the Milvus commands need pymilvus (and milvus-lite for file URIs): '
                              'pip install pymilvus milvus-lite') from e
        self.uri, self.collection = str(uri), collection
        self.timeout = call_timeout()  # every call below passes it: pymilvus waits for ever by default
        self._lite = _is_lite(self.uri)
        self.address = self.uri  # where pymilvus connects: for Milvus Lite, its private Unix socket
        if self._lite:
            _check_lite_folder(self.uri, existing)
            try:
                self.address = _LITE.acquire(self.uri)
            except Exception as e:  # Milvus Lite says why (e.g. another process holds the folder's lock)
                raise MilvusError(f'Milvus at {self.uri!r}: opening the Milvus Lite database failed: '
                                  f'{type(e).__name__}: {e}') from e
        try:
            with _milvus_errors(self.uri, 'opening the Milvus Lite database'):
                self.client = MilvusClient(uri=self.address, token=token or '', timeout=min(CONNECT_TIMEOUT_S, self.timeout))
        except MilvusError as e:
            if self._lite:
                _LITE.release(self.uri)
                raise
            if _unauthenticated(e):  # reachable, but our credentials were refused: not 'cannot reach'
                raise ConnectionError(f'Milvus at {self.uri!r} refused the connection: authentication failed ('
                                      + ('check --token: user:password or an API key)' if token else
                                         'this server requires --token user:password or an API key)')) from e
            reason = getattr(e.__cause__, 'message', e.__cause__)
            hint = '' if token else ' (a server with authentication also refuses this without --token)'
            raise ConnectionError(f'cannot reach Milvus at {self.uri!r}: {reason}{hint}') from e
        except Exception as e:  # grpc and others; say which URI failed
            raise ConnectionError(f'cannot reach Milvus at {self.uri!r}: {e}') from e

    def _errors(self, what: str):
        return _milvus_errors(self.uri, what, self.timeout)

    def close(self) -> None:
        """Close the connection; for Milvus Lite also stop its server (which holds the database folder)
        once no other index in this process uses it."""
        self.client.close()
        if self._lite:
            self._lite = False
            _LITE.release(self.uri)

    def dim(self) -> int | None:
        """The collection's vector size, or None when there is no such collection."""
        with self._errors(f'describing collection {self.collection!r}'):
            if not self.client.has_collection(self.collection, timeout=self.timeout):
                return None
            fields = self.client.describe_collection(self.collection, timeout=self.timeout)['fields']
        return int(next(f['params']['dim'] for f in fields if f['name'] == 'vector'))

    def index_type(self) -> tuple[str, dict]:
        """(index type, its build parameters) of the collection's vector index; ('FLAT', {}) without one."""
        with self._errors(f'describing the index of {self.collection!r}'):
            names = self.client.list_indexes(self.collection, field_name='vector', timeout=self.timeout)
            if not names:
                return 'FLAT', {}
            info = self.client.describe_index(self.collection, names[0], timeout=self.timeout)
        kind = str(info.get('index_type', 'FLAT')).upper()
        return ('FLAT' if kind == 'BRUTE_FORCE' else kind), info  # Milvus Lite's name for FLAT

    def _property(self, name: str) -> dict | None:
        if self.dim() is None:
            return None
        with self._errors(f'describing collection {self.collection!r}'):
            text = (self.client.describe_collection(self.collection, timeout=self.timeout).get('properties') or {}).get(name)
        return json.loads(text) if text else None

    def postprocessing(self) -> dict | None:
        """How the collection's vectors were post-processed (None: raw, or made before we recorded it)."""
        return self._property(POSTPROCESSING)

    def model(self) -> dict | None:
        """The fingerprint of the model that made the collection's vectors (``Isc.fingerprint``), or None
        (made before we recorded it, or from descriptor files that do not say)."""
        return self._property(MODEL)

    def create(self, dim: int = 256, index_type: str | None = None, size: int = 0,
               postprocessing: dict | None = None, model: dict | None = None) -> str:
        """Make the collection if it is not there (``id`` VARCHAR primary key, ``vector``, inner
        product, an ``index_type`` index sized for about ``size`` vectors, default FLAT;
        ``postprocessing`` and ``model`` kept as properties). One of another vector size is an error; one with
        another index type too, when ``index_type`` is given. Returns the index type the collection has."""
        from pymilvus import DataType, MilvusClient
        if index_type is not None and index_type not in INDEX_TYPES:
            raise ValueError(f'unknown index type {index_type!r}; choose one of {", ".join(INDEX_TYPES)}')
        existing = self.dim()
        if existing is not None:
            if existing != dim:
                raise ValueError(f'collection {self.collection!r} holds {existing}-d vectors; these are {dim}-d')
            has = self.index_type()[0]
            if index_type is not None and has != index_type:
                raise ValueError(f'collection {self.collection!r} at {self.uri!r} already has a {has} index, '
                                 f'not {index_type}: drop --index-type (to use its {has}) or pick another --collection')
            return has
        index_type = index_type or 'FLAT'
        with self._errors(f'creating collection {self.collection!r}'):
            # The dynamic field holds each image's path where it is known: rows written by others without one
            # (README's Towhee pipeline) still fit, which a declared field would refuse (Milvus 2.3 has no defaults).
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
            schema.add_field('id', DataType.VARCHAR, is_primary=True, max_length=512)
            schema.add_field('vector', DataType.FLOAT_VECTOR, dim=dim)
            properties = {name: json.dumps(record, sort_keys=True)
                          for name, record in ((POSTPROCESSING, postprocessing), (MODEL, model)) if record is not None}
            extra = {'properties': properties} if properties else {}
            self.client.create_collection(self.collection, schema=schema, timeout=self.timeout, **extra)
            index = self.client.prepare_index_params()
            build = index_params(index_type, size)
            # pymilvus 3 sends build parameters as separate keys, which servers read; Milvus Lite 3 reads only
            # a JSON 'params' key (the older wire format, which servers read too) and would silently use its
            # defaults (nlist 128 on any size). Send both.
            index.add_index('vector', index_type=index_type, metric_type='IP', params={**build, 'params': build})
            # sync=False: waiting for the build asks for a timestamp (AllocTimestamp), which Milvus Lite
            # does not implement: its gRPC server logs a NotImplementedError traceback although all works.
            # An empty collection has nothing to build; a server indexes each segment as it seals.
            self.client.create_index(self.collection, index, sync=False, timeout=self.timeout)
        return index_type

    def add(self, ids: Sequence[str], vectors: np.ndarray, batch: int = 1000, index_type: str | None = None,
            postprocessing: dict | None = None, model: dict | None = None,
            paths: dict[str, str] | None = None, fields: Sequence[dict] | None = None, replace: bool = True,
            if_taken: str = REPLACE_HINT, remove: Sequence[str] = ()) -> str:
        """Insert or update by id (``vectors`` float32 N x D), creating the collection on first use
        with an ``index_type`` index. Vectors post-processed otherwise than the collection's
        (``postprocessing``, None for raw) are refused, and so are those of another ``model`` (where both
        record theirs); without ``replace``, so are ids the collection holds for another image (see
        ``check_same_images``; ``if_taken`` says what the user can do then). ``paths`` (id -> image path) are
        stored beside the vectors, for reports; ``fields`` (one dict per row) too (a video frame's video id and
        seconds). The rows ``remove`` are deleted while the collection is marked as being written (a replaced
        video's frames beyond its new length). Returns the index type the collection has."""
        if self.dim() is not None:
            self.check_same_source(postprocessing, model)
            if not replace:
                self.check_same_images(ids, vectors, if_taken)
        for row, image in enumerate(ids):  # before anything is written, not at the row Milvus refuses
            if len(image.encode('utf-8')) > MAX_ID_BYTES:
                raise ValueError(f'image id {image[:40]!r}... (row {row + 1}) is {len(image.encode())} bytes long, over '
                                 f"the {MAX_ID_BYTES} bytes of a Milvus id: nothing was written; shorten the file name")
        kind = self.create(vectors.shape[1], index_type, len(ids), postprocessing, model)
        paths = paths or {}
        with_paths = self.stores_paths()
        if fields is not None and not with_paths:
            raise ValueError(f'collection {self.collection!r} was made by an older towhee-isc and keeps no fields '
                             'beside the vectors: index into a new --collection')
        written = 0
        with self._errors(f'marking {self.collection!r} as being written'):
            self.client.alter_collection_properties(self.collection, properties={INCOMPLETE: 'true'},
                                                   timeout=self.timeout)
        try:
            with self._errors(f'writing to {self.collection!r}'), \
                    Progress(len(ids), f'uploading to {self.collection!r}', unit='vector') as progress:
                for start in range(0, len(ids), batch):
                    rows = [{'id': i, 'vector': v.tolist(), **({PATH: paths[i]} if with_paths and i in paths else {}),
                             **(fields[start + n] if fields is not None else {})}
                            for n, (i, v) in enumerate(zip(ids[start:start + batch], vectors[start:start + batch]))]
                    self.client.upsert(self.collection, rows, timeout=self.timeout)
                    written += len(rows)
                    progress.advance(len(rows))
                for start in range(0, len(remove), batch):
                    self.client.delete(self.collection, ids=list(remove[start:start + batch]), timeout=self.timeout)
                # Milvus Lite then builds the new segments' index in a background thread that it waits for when
                # the process ends (searching them exactly until then); reloading here would race that thread.
                self.client.flush(self.collection, timeout=self.timeout)
                # (not dropped: Milvus 2.3 servers cannot drop a property)
                self.client.alter_collection_properties(self.collection, properties={INCOMPLETE: 'false'},
                                                       timeout=self.timeout)
        except MilvusError as e:
            raise MilvusError(f'{e}; {written} of {len(ids)} rows were written, and collection {self.collection!r} '
                              'is marked incomplete: search refuses it until this index runs again') from e.__cause__
        return kind

    def check_same_source(self, postprocessing: dict | None, model: dict | None) -> None:
        """Refuse vectors to add that were post-processed otherwise or made by another model than the collection's."""
        check_same_postprocessing({f'collection {self.collection!r}': self.postprocessing(),
                                   'the descriptors to add': postprocessing})
        check_same_model({f'collection {self.collection!r}': self.model(), 'the descriptors to add': model})

    def check_same_images(self, ids: Sequence[str], vectors: np.ndarray, if_taken: str = REPLACE_HINT,
                          batch: int = 1000) -> None:
        """Refuse ids the collection already holds for another image: two phones' IMG_0001.jpg would
        otherwise replace one reference by another without a word. The same image embedded again by the
        same model gives the same vector (cosine above SAME_IMAGE); another image, even a re-saved copy
        of it, a lower one. Nothing is written; the error ends with ``if_taken``, what the user can do."""
        self.load()
        other: list[str] = []
        with self._errors(f'reading vectors from {self.collection!r}'):
            for start in range(0, len(ids), batch):
                mine = dict(zip(ids[start:start + batch], vectors[start:start + batch]))
                listed = ', '.join(json.dumps(i, ensure_ascii=False) for i in mine)
                rows = self.client.query(self.collection, filter=f'id in [{listed}]', output_fields=['id', 'vector'],
                                         consistency_level='Strong', timeout=self.timeout)
                other += [row['id'] for row in rows
                          if float(np.dot(np.asarray(row['vector'], np.float32), mine[row['id']])) < SAME_IMAGE]
        if other:
            raise ValueError(f'{len(other)} id(s) are in collection {self.collection!r} already for another image '
                             f'({", ".join(map(repr, sorted(other)[:5]))}{", ..." if len(other) > 5 else ""}): '
                             f'nothing was written; {if_taken}')

    def check_complete(self) -> None:
        """Refuse a collection that an ``index`` run left half-written (it failed or was killed)."""
        with self._errors(f'describing collection {self.collection!r}'):
            properties = self.client.describe_collection(self.collection, timeout=self.timeout).get('properties') or {}
        if properties.get(INCOMPLETE) == 'true':
            raise MilvusError(f'collection {self.collection!r} at {self.uri!r} is incomplete: an index run into it '
                              'failed or was stopped before it finished; run that index again')

    def stores_paths(self) -> bool:
        """Whether the collection can keep image paths (one made before they were kept has no dynamic field)."""
        with self._errors(f'describing collection {self.collection!r}'):
            return bool(self.client.describe_collection(self.collection, timeout=self.timeout).get('enable_dynamic_field'))

    def paths(self, ids: Sequence[str], batch: int = 1000) -> dict[str, str]:
        """The stored image path of each of ``ids`` that has one (none for a collection that keeps no paths)."""
        if not ids or not self.stores_paths():
            return {}
        self.load()
        found = {}
        with self._errors(f'reading image paths from {self.collection!r}'):
            for start in range(0, len(ids), batch):
                # Ids are user data: each a JSON string literal (escaped quotes), which Milvus's expressions read.
                listed = ', '.join(json.dumps(i, ensure_ascii=False) for i in ids[start:start + batch])
                rows = self.client.query(self.collection, filter=f'id in [{listed}]', output_fields=['id', PATH],
                                         consistency_level='Strong', timeout=self.timeout)
                found.update((row['id'], row[PATH]) for row in rows if row.get(PATH))
        return found

    def rows(self, filter: str, output_fields: Sequence[str], group: str, counter: str, groups: int,
             batch: int = 4096) -> list[dict]:
        """Every row matching ``filter`` (a Milvus expression), with ``output_fields``, however many: the
        filter matches ``groups`` groups (rows of one value of the field ``group``: a video), each numbered
        0, 1, 2, ... by the integer field ``counter`` (its frames). Read in windows of ``counter`` of at most
        ``batch`` rows (a plain query returns at most 16,384), widened as groups end, until one finds none.
        (pymilvus's ``query_iterator`` pages by id, pasting the last id unescaped into its expression: a
        video named ``Bob "live".mp4`` broke every read of it.)"""
        self.load()
        found: list[dict] = []
        low, active = 0, max(1, groups)
        with self._errors(f'reading rows of {self.collection!r}'):
            while True:
                step = max(1, batch // active)
                page = self.client.query(self.collection, output_fields=list({*output_fields, group, counter}),
                                         filter=f'({filter}) and {counter} >= {low} and {counter} < {low + step}',
                                         consistency_level='Strong', timeout=self.timeout)
                if not page:
                    return found
                found += page
                low, active = low + step, len({row[group] for row in page})

    def load(self) -> None:
        """Load the collection for search and query if it is not (each new process finds it released)."""
        from pymilvus.client.types import LoadState
        with self._errors(f'loading {self.collection!r}'):
            if self.client.get_load_state(self.collection, timeout=self.timeout)['state'] != LoadState.Loaded:
                self.client.load_collection(self.collection, timeout=self.timeout)

    def count(self) -> int:
        """Vectors in the collection."""
        self.load()
        with self._errors(f'counting {self.collection!r}'):
            rows = self.client.query(self.collection, filter='', output_fields=['count(*)'],
                                     consistency_level='Strong', timeout=self.timeout)
        return int(rows[0]['count(*)'])

    def search(self, query_ids: Sequence[str], queries: np.ndarray, k: int, threshold: float | None = None,
               offsets: np.ndarray | None = None, batch: int = 256, nprobe: int | None = None,
               ef: int | None = None) -> list[Match]:
        """The ``k`` best references of each query (``queries`` float32 N x D), best first; scores
        minus ``offsets`` (N,) when given, kept at or above ``threshold``. ``nprobe`` (IVF_FLAT) and
        ``ef`` (HNSW) trade speed for recall; see :func:`search_params`."""
        if not 1 <= k <= MAX_TOP_K:
            raise ValueError(f'k must be between 1 and {MAX_TOP_K} (the most Milvus returns per query), got {k}')
        dim = self.dim()
        if dim is None:
            raise ValueError(f'unknown collection {self.collection!r} at {self.uri!r}: index some descriptors first')
        if dim != queries.shape[1]:
            raise ValueError(f'collection {self.collection!r} holds {dim}-d vectors; the queries are {queries.shape[1]}-d')
        self.check_complete()
        kind, info = self.index_type()
        built = info.get('params') if isinstance(info.get('params'), dict) else info  # Lite nests them
        nlist = int(built.get('nlist') or ivf_nlist(self.count() if kind == 'IVF_FLAT' else 1))
        params = search_params(kind, k, nlist, nprobe, ef)
        self.load()
        matches = []
        with self._errors(f'searching {self.collection!r}'), \
                Progress(len(queries), f'searching {self.collection!r}', unit='query') as progress:
            for start in range(0, len(queries), batch):
                hits = self.client.search(self.collection, data=queries[start:start + batch].tolist(), limit=k,
                                          output_fields=['id'], search_params=params, consistency_level='Strong',
                                          timeout=self.timeout)
                for row, row_hits in enumerate(hits):
                    offset = 0.0 if offsets is None else float(offsets[start + row])
                    for hit in row_hits:
                        score = float(hit['distance']) - offset
                        if threshold is None or meets(score, threshold):
                            matches.append(Match(query_ids[start + row], hit['id'], score))
                progress.advance(len(hits))
        return matches


def milvus_duplicate_pairs(index: MilvusIndex, ids: Sequence[str], vectors: np.ndarray, threshold: float,
                           k: int = 100, nprobe: int | None = None,
                           ef: int | None = None) -> Iterator[tuple[int, int, float]]:
    """Near-duplicate pairs through a Milvus collection holding ``ids``: each image's k nearest
    neighbours above ``threshold``. Memory stays O(k x batch) whatever the collection's size."""
    position = {image: i for i, image in enumerate(ids)}
    for m in index.search(ids, vectors, k + 1, threshold, nprobe=nprobe, ef=ef):
        i, j = position[m.query_id], position.get(m.reference_id)
        if j is not None and i < j:
            yield i, j, m.score
