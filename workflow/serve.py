"""``towhee-isc serve``: an HTTP copy-detection service on Ray Serve.

``POST /embed`` and ``POST /search?k=&threshold=`` take one image (the file's bytes as the request
body, or one file in multipart form data) and answer JSON; ``GET /health`` answers 200 once the
replica is ready. The OpenAPI schema is at ``/openapi.json`` (pages at ``/docs``).

Each replica holds one operator, made as ``towhee-isc search`` makes it (``Embedder``: photos turned
upright by their EXIF orientation, the same post-processing), and one handle on the references (a
Milvus collection, or a descriptor file searched exactly); references of another model or
post-processing are refused at start-up. Requests arriving together are embedded as one batch
(``serve.batch``); while a batch runs in a worker thread, the next one gathers. A bad upload is a
4xx answer ``{"error": "..."}`` naming the problem, and the replica keeps serving. Uploads are
bounded in size, in the pace and time their body must arrive at, in number and in the bytes held at
once (counted as they arrive, never as declared), so slow, idle or many clients cannot freeze the
others, and ``/health`` always has room beyond the uploads.
"""
# No ``from __future__ import annotations`` here: Ray ships the deployment class by value, without
# this module's globals, so FastAPI must find real types (not strings) in the endpoints' signatures.
import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from ..defaults import cpu_count
from ..images import ImageError
from .descriptors import check_same_postprocessing, read_descriptors, read_model, read_postprocessing
from .embedding import Embedder, check_same_model
from .engines import meets
from .matching import search_exact
from .milvus import MilvusIndex, _is_lite
from .ray import start_ray

logger = logging.getLogger('towhee_isc.serve')

# Set before ray is first imported (it reads it then): a local Ray then binds every process to 127.0.0.1
# and announces no network address (verified with ray 2.60).
LOOPBACK_ONLY = ('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
MAX_BODY_BYTES = 32 * 2**20  # a 32 MB upload is already a very large photo
UPLOAD_TIMEOUT_S = 30.0  # a whole body must arrive within this (a 32 MB photo at ~1 MB/s)
# A body must also keep coming: its first bytes within UPLOAD_GRACE_S, then MIN_UPLOAD_RATE bytes a second on
# average, so that a client declaring a body and sending nothing (or a byte now and then) frees its upload
# slot within seconds, not the whole upload timeout.
UPLOAD_GRACE_S = 2.0
MIN_UPLOAD_RATE = 16 * 1024
MAX_UPLOADS = 1024  # uploads a replica holds at once (arriving, queued or embedding); more are a 503 at once
MAX_ONGOING = MAX_UPLOADS + 64  # requests a replica holds at once: room for /health beyond the uploads
HELD_BODIES = 16  # upload bytes a replica holds at once (as they arrive): this many of the largest
MILVUS_TIMEOUT_S = 30.0  # one call to Milvus while answering a request (TOWHEE_ISC_MILVUS_TIMEOUT may lower it)
IMAGE_TYPE = re.compile(r"image/[a-z0-9][a-z0-9!#$&^_.+-]*")  # image/<subtype>, RFC 6838 characters


@dataclass(frozen=True)
class ServiceSettings:
    """Everything a replica needs, small and picklable (Ray ships it to each replica).

    ``isc`` are the ``Embedder``'s keyword arguments (the operator's, as the CLI gives them); the
    references are a descriptor file (``references``, searched exactly) or a Milvus collection
    (``milvus_uri`` + ``collection``, and ``token`` for a server that requires one)."""
    isc: dict[str, Any]
    references: Optional[str] = None
    milvus_uri: Optional[str] = None
    collection: Optional[str] = None
    token: Optional[str] = None
    threshold: float = 0.8
    max_batch_size: int = 8
    batch_wait_s: float = 0.005
    max_body_bytes: int = MAX_BODY_BYTES
    upload_timeout_s: float = UPLOAD_TIMEOUT_S
    loopback_only: bool = True


class References:
    """The images uploads are matched against: a descriptor file (exact search) or a Milvus collection.

    ``where`` describes them for the operator's console (paths and URIs included); ``name`` for
    HTTP answers (no folders, no addresses)."""

    def __init__(self, settings: ServiceSettings):
        self.index: Optional[MilvusIndex] = None
        self.model: Optional[dict] = None  # the model that made them, where recorded
        if settings.references:
            self.ids, self.vectors = read_descriptors(settings.references)
            self.dim: int = self.vectors.shape[1]
            self.model = read_model(settings.references)
            self.postprocessing = read_postprocessing(settings.references)
            self.where = f'descriptor file {settings.references} ({len(self.ids)} images, exact search)'
            self.name = f'descriptor file {os.path.basename(settings.references)!r} ({len(self.ids)} images)'
        elif settings.collection:
            self.index = MilvusIndex(settings.milvus_uri, settings.collection, settings.token, existing=True)
            # A request (and /health) waits for a frozen Milvus this long at most, not a batch job's minutes.
            self.index.timeout = min(self.index.timeout, MILVUS_TIMEOUT_S)
            dim = self.index.dim()
            if dim is None:
                self.index.close()
                raise ValueError(f'unknown collection {settings.collection!r} at {settings.milvus_uri!r}: '
                                 'index some descriptors first (towhee-isc index)')
            self.dim = dim
            self.postprocessing = self.index.postprocessing()
            self.model = self.index.model()
            self.index.load()  # a released collection cannot be searched
            self.where = f'Milvus collection {settings.collection!r} at {settings.milvus_uri}'
            server = (f'Milvus Lite database {os.path.basename(settings.milvus_uri)!r}' if _is_lite(settings.milvus_uri)
                      else 'a Milvus server')
            self.name = f'Milvus collection {settings.collection!r} ({server})'
        else:
            raise ValueError('give the references to match against: --collection NAME or --references FILE.h5')

    def check_fit(self, images: Embedder) -> None:
        """Refuse references whose vectors cannot be compared with ``images``' (as ``towhee-isc search``
        refuses them): another vector size, another model (where the file records it), another
        post-processing (raw references against post-processed uploads, or the reverse)."""
        op = images.op
        if self.dim != op.embedding_dim:
            raise ValueError(f'the references are {self.dim}-d; the model gives {op.embedding_dim}-d')
        check_same_model({'the references': self.model, 'the uploads (the service\'s model)': op.fingerprint})
        check_same_postprocessing({'the references': self.postprocessing,
                                   'the uploads (the service\'s settings)': images.postprocessing})

    def problem(self) -> Optional[str]:
        """Why the references cannot be searched now (a collection dropped, Milvus gone), or None."""
        if self.index is None:
            return None  # in memory
        try:
            if self.index.dim() is None:
                return f'collection {self.index.collection!r} is not there any more: index it again'
        except Exception:
            return 'Milvus does not answer'
        return None

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Each of the (N, D) float32 ``vectors``' k best references as (id, score), best first."""
        query_ids = [str(i) for i in range(len(vectors))]
        if self.index is None:
            matches = search_exact(query_ids, vectors, self.ids, self.vectors, k)
        else:
            matches = self.index.search(query_ids, vectors, k)
        found: list[list[tuple[str, float]]] = [[] for _ in query_ids]
        for m in matches:
            found[int(m.query_id)].append((m.reference_id, m.score))
        return [sorted(row, key=lambda hit: -hit[1]) for row in found]

    def close(self) -> None:
        if self.index is not None:
            self.index.close()  # Milvus Lite: stops its in-process server, which holds the folder
            self.index = None


# -- the HTTP interface ---------------------------------------------------------------------------

class Refused(ValueError):
    """A request the service cannot answer, with the HTTP status that says why."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close or status == 408  # the rest of the body may never come: end the connection


class EmbedAnswer(BaseModel):
    embedding: list[float] = Field(description='the L2-normalised descriptor (256 floats for the published models)')


class MatchAnswer(BaseModel):
    id: str = Field(description='the reference image id')
    score: float = Field(description='cosine similarity to the upload')
    match: bool = Field(description='whether the score reaches the threshold (within float32 rounding, as '
                                       '``towhee-isc search`` counts it: a byte-identical copy meets 1.0)')


class SearchAnswer(BaseModel):
    matches: list[MatchAnswer] = Field(description='the k best references, best first')


class HealthAnswer(BaseModel):
    status: str = Field(description="'ready', or 'not ready' (then the answer is a 503 and ``error`` says why)")
    model: str
    dim: int
    references: str = Field(description='what the uploads are matched against (no paths or addresses)')
    batch_sizes: dict[str, int] = Field(description="this replica's batches so far: size -> count")
    error: Optional[str] = None


class ErrorAnswer(BaseModel):
    error: str


_IMAGE_BODY = {'requestBody': {'required': True, 'content': {
    'image/*': {'schema': {'type': 'string', 'format': 'binary'}},
    'application/octet-stream': {'schema': {'type': 'string', 'format': 'binary'}},
    'multipart/form-data': {'schema': {'type': 'object', 'required': ['file'],
                                       'properties': {'file': {'type': 'string', 'format': 'binary'}}}}}}}
_ERRORS = {code: {'model': ErrorAnswer, 'description': why} for code, why in [
    (400, 'not an image, empty, damaged, over the pixel limit, or a malformed form'),
    (408, 'the body did not arrive in time'), (411, 'no Content-Length'), (413, 'body too large'),
    (415, 'wrong Content-Type'), (422, 'bad query parameter'),
    (503, 'busy (too many upload bytes at once, or no part of the body arrived within 2 s) or the references '
          'cannot be searched now: retry later')]}

app = FastAPI(title='towhee-isc', description='Image copy detection with the ISC21 descriptor.')


@app.exception_handler(Refused)
async def _upload_error(request: Request, e: Refused) -> JSONResponse:
    # Where the rest of the body may never come, close the connection, or the server would wait for it.
    headers = {'Connection': 'close'} if e.close else None
    return JSONResponse({'error': str(e)}, status_code=e.status, headers=headers)


@app.exception_handler(ImageError)
async def _image_error(request: Request, e: ImageError) -> JSONResponse:
    return JSONResponse({'error': str(e)}, status_code=400)


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    # The details (paths, addresses, library messages) go to the replica's log, never to the client.
    logger.exception('internal error answering %s %s', request.method, request.url.path)
    return JSONResponse({'error': "internal error (the service's log has the details)"}, status_code=500)


@app.exception_handler(RequestValidationError)
async def _bad_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = '; '.join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return JSONResponse({'error': problems}, status_code=422)


def check_upload(request: Request, limit: int) -> tuple[int, bool]:
    """The declared length of an upload, and whether it is a form, from its headers alone: the raw body
    (``image/<type>``, ``application/octet-stream``) or one file of ``multipart/form-data``. Nothing
    is read before the length is known and within ``limit`` (the server refuses a body longer than
    it declares)."""
    content_type = request.headers.get('content-type', '')
    media = content_type.split(';')[0].strip().lower()
    multipart = media == 'multipart/form-data'
    if not (multipart or media == 'application/octet-stream' or IMAGE_TYPE.fullmatch(media)):
        raise Refused(415, f'unsupported Content-Type {content_type or "(none)"!r}: send the image file as '
                           'the body (image/* or application/octet-stream) or as multipart/form-data')
    length = request.headers.get('content-length')
    if length is None:
        raise Refused(411, f'a Content-Length is required (uploads up to {limit} bytes)')
    if not length.isdigit():
        raise Refused(400, f'bad Content-Length {length!r}')
    if int(length) > limit:
        raise Refused(413, f'the body is {int(length)} bytes; uploads are limited to {limit} bytes')
    return int(length), multipart


async def arriving(request: Request, length: int, hold: Callable[[int], None], timeout_s: float) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, each passed to ``hold`` (which may refuse it: a 503) and paced:
    its first bytes within UPLOAD_GRACE_S, then MIN_UPLOAD_RATE bytes a second on average, all of it
    within ``timeout_s``; else a 408. ``length`` is the declared length (for the message)."""
    started, received = time.monotonic(), 0
    grace = min(UPLOAD_GRACE_S, timeout_s)
    chunks = request.stream()
    while True:
        due = started + min(timeout_s, grace + received / MIN_UPLOAD_RATE)  # the next bytes are due by then
        try:
            async with asyncio.timeout(max(0.0, due - time.monotonic())):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if not received:  # an idle client, or a body held up on its way (Serve's proxy, under load)
                raise Refused(503, f'no part of the body arrived within {grace:g} s: the service may be busy, '
                                   'retry', close=True) from None
            raise Refused(408, f'the body did not arrive in time: {received} of {length} bytes after '
                               f'{time.monotonic() - started:.1f} s (an upload must send its first bytes within '
                               f'{grace:g} s, then {MIN_UPLOAD_RATE // 1024} KB a second, all within {timeout_s:g} s)'
                          ) from None
        hold(len(chunk))
        received += len(chunk)
        yield chunk


async def read_upload(request: Request, multipart: bool, body: AsyncIterator[bytes]) -> bytes:
    """The uploaded image's bytes from the ``body`` chunks: the raw body, or the one file of a multipart form."""
    if not multipart:
        return b''.join([chunk async for chunk in body])
    try:
        form = await MultiPartParser(request.headers, body, max_files=1, max_fields=8).parse()
    except Refused:
        raise
    except Exception as e:  # Starlette's MultiPartException and the parser's own errors
        raise Refused(400, f'malformed multipart form data: {e}') from None
    files = [value for value in form.values() if isinstance(value, UploadFile)]
    if len(files) != 1:
        raise Refused(400, f'multipart form data must hold one image file (field "file"), found {len(files)}')
    return await files[0].read()


class Uploads:
    """The uploads a replica holds (from their headers until embedded) and the body bytes of theirs that
    have arrived, both bounded, so that many or large uploads at once cannot exhaust its memory or its
    request slots: one over a bound is a 503 at once. Bytes count as they arrive, never as declared: a
    client that declares 32 MB and sends nothing holds nothing but one upload slot, for UPLOAD_GRACE_S."""

    def __init__(self, max_uploads: int, max_bytes: int):
        self.max_uploads, self.max_bytes = max_uploads, max_bytes
        self.count = self.bytes = 0

    @contextlib.contextmanager
    def one(self) -> Iterator[Callable[[int], None]]:
        """Hold one upload; yields ``hold(n)``, to call as each n bytes arrive. All is freed at the end."""
        if self.count >= self.max_uploads:
            raise Refused(503, 'too many uploads in progress: retry shortly')
        self.count += 1
        held = 0

        def hold(n: int) -> None:
            nonlocal held
            if self.bytes + n > self.max_bytes:
                raise Refused(503, 'too many upload bytes in progress: retry shortly')
            self.bytes += n
            held += n
        try:
            yield hold
        finally:
            self.count -= 1
            self.bytes -= held


def _replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to every interface ('[::]:0',
    hard-coded, no setting). On a local, loopback-only Ray, bind it to 127.0.0.1 instead: the proxy
    reaches the replica at the node's address, which is 127.0.0.1 there. Only this replica process's
    reference to the helper is replaced, and only the address it is given."""
    from ray.serve._private import replica
    bind = getattr(replica, 'add_port_to_grpc_server', None)
    if bind is None or getattr(bind, 'loopback', False):  # another Serve version, or done already
        return

    def on_loopback(server, address: str):
        return bind(server, '127.0.0.1:' + address.rsplit(':', 1)[1] if address.startswith('[::]:') else address)

    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback


@serve.deployment
@serve.ingress(app)
class IscService:
    """One replica: one operator, the references, and a batcher in front of the operator."""

    def __init__(self, settings: ServiceSettings):
        if settings.loopback_only:
            _replica_grpc_on_loopback()
        self.settings = settings
        self.references = References(settings)  # first: a dropped collection fails here, before the model loads
        self.images = Embedder(**settings.isc)  # the operator as towhee-isc search makes it (EXIF, post-processing)
        self.op = self.images.op
        self.references.check_fit(self.images)
        self.uploads = Uploads(MAX_UPLOADS, HELD_BODIES * settings.max_body_bytes)
        self.batch_sizes: Counter[int] = Counter()
        self._embed_one.set_max_batch_size(settings.max_batch_size)
        self._embed_one.set_batch_wait_timeout_s(settings.batch_wait_s)

    @app.get('/health', response_model=HealthAnswer, responses={503: {'model': HealthAnswer}})
    async def health(self) -> Any:
        """200 when uploads can be answered; 503, with the reason, when the references cannot be searched."""
        problem = await asyncio.to_thread(self.references.problem)
        answer = {'status': 'not ready' if problem else 'ready', 'model': self.op.model_name,
                  'dim': self.op.embedding_dim, 'references': self.references.name,
                  'batch_sizes': {str(size): n for size, n in sorted(self.batch_sizes.items())}, 'error': problem}
        return JSONResponse(answer, status_code=503) if problem else answer

    @app.post('/embed', response_model=EmbedAnswer, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
    async def embed(self, request: Request) -> dict:
        """The upload's descriptor."""
        vector = await self._vector(request)
        return {'embedding': vector.tolist()}

    @app.post('/search', response_model=SearchAnswer, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
    async def search(self, request: Request, k: int = Query(10, ge=1, le=1000, description='matches to return'),
                     threshold: Optional[float] = Query(None, allow_inf_nan=False,
                                                        description="score that makes a match (default: the service's)")
                     ) -> dict:
        """The upload's k best references, best first, each marked a match if its score reaches the threshold."""
        vector = await self._vector(request)
        threshold = self.settings.threshold if threshold is None else threshold
        try:
            hits = (await asyncio.to_thread(self.references.search, vector[None], k))[0]
        except Exception:
            logger.exception('searching the references failed')
            problem = await asyncio.to_thread(self.references.problem)
            raise Refused(503, f'the references cannot be searched now ({problem or "see the service log"})') from None
        return {'matches': [{'id': i, 'score': score, 'match': bool(meets(score, threshold))} for i, score in hits]}

    async def _vector(self, request: Request) -> np.ndarray:
        """The upload's vector. It holds an upload slot and its bytes as they arrive (bounded) until
        embedded, and its body must keep arriving (``arriving``): a slow or idle client gets a 408 within
        seconds, never a slot for good."""
        length, multipart = check_upload(request, self.settings.max_body_bytes)
        with self.uploads.one() as hold:
            body = arriving(request, length, hold, self.settings.upload_timeout_s)
            data = await read_upload(request, multipart, body)
            result = await self._embed_one(data)
        if isinstance(result, ImageError):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _embed_one(self, images: list[bytes]) -> list[Union[np.ndarray, ImageError]]:
        # In a thread, so the event loop keeps taking requests (the next batch) meanwhile.
        return await asyncio.to_thread(self._embed_batch, images)

    def _embed_batch(self, images: list[bytes]) -> list[Union[np.ndarray, ImageError]]:
        """(D,) float32 vectors, or the ImageError of an upload that cannot be used (it fails alone)."""
        self.batch_sizes[len(images)] += 1
        return self.op.embed_each(images)

    def __del__(self):
        references = getattr(self, 'references', None)
        if references is not None:
            references.close()


# -- running it -----------------------------------------------------------------------------------

def check_settings(settings: ServiceSettings) -> str:
    """Refuse before Ray starts what would only fail in the replicas: missing or unreachable
    references, unknown weights, a missing checkpoint, a device that is not there, references of
    another model or post-processing. Returns where the references are."""
    from ..weights import get_weights
    references = References(settings)
    try:
        checkpoint = settings.isc.get('checkpoint_path')
        if checkpoint is None:
            get_weights(settings.isc.get('model_name', 'isc_ft_v107'))
        elif not os.path.isfile(checkpoint):
            raise ValueError(f'no such checkpoint file: {checkpoint!r}')
        references.check_fit(Embedder(**settings.isc))  # the replicas' operator, built once here
        return references.where
    finally:
        references.close()  # Milvus Lite admits one process at a time: free the file for the replicas


def absolute_paths(settings: ServiceSettings) -> ServiceSettings:
    """The same settings with local files made absolute: replicas need not share the driver's folder.
    Server URIs (``http://...``) stay as they are."""
    def absolute(path):
        return path if path is None or '://' in str(path) else os.path.abspath(path)
    isc = {**settings.isc, 'checkpoint_path': absolute(settings.isc.get('checkpoint_path'))}
    if settings.isc.get('negatives') is not None:
        isc['negatives'] = absolute(settings.isc['negatives'])
    return replace(settings, isc=isc, references=absolute(settings.references), milvus_uri=absolute(settings.milvus_uri))


def check_room(replicas: int, num_gpus: float, resources: dict[str, float], where: str) -> None:
    """Refuse replicas that do not fit (each reserves one CPU, or ``num_gpus`` GPUs): Serve would wait for
    them for ever."""
    cpus, gpus = resources.get('CPU', 0.0), resources.get('GPU', 0.0)
    if num_gpus and replicas * num_gpus > gpus + 1e-9:
        raise ValueError(f'--replicas {replicas} with --device cuda needs {replicas * num_gpus:g} GPU(s) (one each); '
                         f'{where} has {gpus:g}')
    if not num_gpus and replicas > cpus + 1e-9:
        raise ValueError(f'--replicas {replicas} needs {replicas} CPUs (one each); {where} has {cpus:g}: '
                         'ask for fewer replicas')


def private_ray_token() -> None:
    """Ray (2.52 and later) protects a new local cluster with a token it writes to ~/.ray/auth_token,
    readable by everyone under the usual umask: anyone who reads it may run code in the cluster. Write
    it first, readable by this user only (or narrow an existing one to that)."""
    if os.environ.get('RAY_AUTH_MODE', 'token').lower() != 'token' or os.environ.get('RAY_AUTH_TOKEN'):
        return
    path = os.environ.get('RAY_AUTH_TOKEN_PATH') or os.path.join(os.path.expanduser('~'), '.ray', 'auth_token')
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
        return
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
    with os.fdopen(descriptor, 'w') as f:
        f.write(generate_new_authentication_token())


def run_service(settings: ServiceSettings, host: str = '127.0.0.1', port: int = 8000, replicas: int = 1,
                ray_address: Optional[str] = None, num_gpus: float = 0) -> None:
    """Start Ray (a local one bound to 127.0.0.1 unless ``ray_address`` names a cluster), deploy
    ``replicas`` replicas behind Serve's HTTP proxy on ``host:port``, and serve until SIGINT
    (KeyboardInterrupt) or SIGTERM (a normal return); then shut Serve and the local Ray down. A
    replica that cannot start again (after it died) ends it with :class:`ServiceStartError`."""
    import ray
    settings = replace(absolute_paths(settings), loopback_only=ray_address is None)
    if settings.milvus_uri and settings.collection and not settings.references and replicas > 1 \
            and _is_lite(settings.milvus_uri):
        raise ValueError('a Milvus Lite file admits one process: use --replicas 1, or a Milvus server '
                         '(--milvus-uri http://HOST:19530)')
    if ray_address is None:
        if os.environ.get(LOOPBACK_ONLY[0]) != LOOPBACK_ONLY[1]:
            raise RuntimeError(f'a local Ray must start with {LOOPBACK_ONLY[0]}={LOOPBACK_ONLY[1]} in the environment '
                               'before ray is imported (towhee-isc serve sets it)')
        check_room(replicas, num_gpus, {'CPU': cpu_count(), 'GPU': num_gpus and _local_gpus()},
                   'this machine')
    signal.signal(signal.SIGTERM, _stop)
    try:
        where = check_settings(settings)
        started = time.perf_counter()
        if ray_address is None:
            private_ray_token()
            # Serve kills an HTTP proxy not ready within 5 s, and serve.start then fails: on a busy machine
            # a new worker process can take longer than that to start. The local Ray's processes inherit it.
            os.environ.setdefault('RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S', '60')
        start_ray(ray_address)  # once more if the local raylet was slow to register
        signal.signal(signal.SIGTERM, _stop)  # again: ray.init installs its own
        try:
            check_room(replicas, num_gpus, ray.cluster_resources(), 'the Ray cluster')
            _serve(settings, host, port, replicas, num_gpus, where, started)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break the shutdown
            serve.shutdown()
    except Stopped:
        print('stopped (SIGTERM)', flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ray.is_initialized():
            ray.shutdown()


def _serve(settings: ServiceSettings, host: str, port: int, replicas: int, num_gpus: float, where: str,
           started: float) -> None:
    """Deploy the replicas, then watch them until interrupted."""
    serve.start(http_options={'host': host, 'port': port}, logging_config={'log_level': 'WARNING'})
    deployment = IscService.options(
        num_replicas=replicas, max_ongoing_requests=MAX_ONGOING,
        ray_actor_options={'num_cpus': 0 if num_gpus else 1, 'num_gpus': num_gpus})
    try:
        serve.run(deployment.bind(settings), name='isc', route_prefix='/')
    except RuntimeError as e:  # Serve says only that the deployment failed: find the replica's error
        raise ServiceStartError(f'the service did not start: {replica_error() or e}') from None
    print(f'serving on http://{host}:{port} ({replicas} replica(s), batches up to {settings.max_batch_size}; '
          f'references: {where}; ready in {time.perf_counter() - started:.0f} s)', flush=True)
    while True:
        time.sleep(2)
        failure = replica_failure()
        if failure:
            raise ServiceStartError(f'a replica could not start again, so the service stopped: {failure}')


def _local_gpus() -> int:
    import torch  # only asked with --device cuda
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class ServiceStartError(RuntimeError):
    """A replica could not start (its own error is in the message)."""


class Stopped(Exception):
    """SIGTERM: stop serving, shut down cleanly, exit 0."""


def _deployment_status():
    return serve.status().applications['isc'].deployments['IscService']


def replica_error() -> Optional[str]:
    """The last line of the error that stopped the replicas, from Serve's status."""
    try:
        message = _deployment_status().message
    except Exception:  # the status is a help here, never a second failure
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def replica_failure() -> Optional[str]:
    """While serving: the error of a replica that failed to start again (Serve would retry it for ever,
    every request waiting meanwhile), or None."""
    try:
        status = _deployment_status()
    except Exception:
        return None
    if 'failed to start' in status.message or str(status.status).endswith('DEPLOY_FAILED'):
        return replica_error() or str(status.status)
    return None


def _stop(signum, frame):
    raise Stopped
