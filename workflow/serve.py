"""``towhee-isc serve``: an HTTP copy-detection service on Ray Serve.

``POST /embed`` and ``POST /search?k=&threshold=`` take one image (the file's bytes as the request
body, or one file in multipart form data) and answer JSON; ``GET /health`` answers 200 once the
replica is ready. The OpenAPI schema is at ``/openapi.json`` (pages at ``/docs``).

Each replica holds one operator and one handle on the references (a Milvus collection, or a
descriptor file searched exactly). Requests arriving together are embedded as one batch
(``serve.batch``); while a batch runs in a worker thread, the next one gathers. A bad upload is a
4xx answer ``{"error": "..."}`` naming the problem, and the replica keeps serving.
"""
# No ``from __future__ import annotations`` here: Ray ships the deployment class by value, without
# this module's globals, so FastAPI must find real types (not strings) in the endpoints' signatures.
import asyncio
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.datastructures import UploadFile

from ..images import ImageError
from .descriptors import read_descriptors
from .matching import search_exact
from .milvus import MilvusIndex

# Set before ray is first imported (it reads it then): a local Ray then binds every process to 127.0.0.1
# and announces no network address (verified with ray 2.60).
LOOPBACK_ONLY = ('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
MAX_BODY_BYTES = 32 * 2**20  # a 32 MB upload is already a very large photo
RAW_TYPES = ('image/', 'application/octet-stream')


@dataclass(frozen=True)
class ServiceSettings:
    """Everything a replica needs, small and picklable (Ray ships it to each replica).

    ``isc`` are the operator's keyword arguments; the references are a descriptor file
    (``references``, searched exactly) or a Milvus collection (``milvus_uri`` + ``collection``)."""
    isc: dict[str, Any]
    references: Optional[str] = None
    milvus_uri: Optional[str] = None
    collection: Optional[str] = None
    threshold: float = 0.8
    max_batch_size: int = 8
    batch_wait_s: float = 0.005
    max_body_bytes: int = MAX_BODY_BYTES
    loopback_only: bool = True


class References:
    """The images uploads are matched against: a descriptor file (exact search) or a Milvus collection."""

    def __init__(self, settings: ServiceSettings):
        self.index: Optional[MilvusIndex] = None
        if settings.references:
            self.ids, self.vectors = read_descriptors(settings.references)
            self.dim: int = self.vectors.shape[1]
            self.where = f'descriptor file {settings.references} ({len(self.ids)} images, exact search)'
        elif settings.collection:
            self.index = MilvusIndex(settings.milvus_uri, settings.collection)
            dim = self.index.dim()
            if dim is None:
                raise ValueError(f'unknown collection {settings.collection!r} at {settings.milvus_uri!r}: '
                                 'index some descriptors first (towhee-isc index)')
            self.dim = dim
            self.index.client.load_collection(settings.collection)  # a released collection cannot be searched
            self.where = f'Milvus collection {settings.collection!r} at {settings.milvus_uri}'
        else:
            raise ValueError('give the references to match against: --collection NAME or --references FILE.h5')

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
        if self.index is None:
            return
        self.index.client.close()
        if '://' not in self.index.uri:  # Milvus Lite: stop its in-process server, which holds the file
            from milvus_lite.server_manager import server_manager_instance
            server_manager_instance.release_server(self.index.uri)


# -- the HTTP interface ---------------------------------------------------------------------------

class UploadError(ValueError):
    """A request the service cannot use, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EmbedAnswer(BaseModel):
    embedding: list[float] = Field(description='the L2-normalised descriptor (256 floats for the published models)')


class MatchAnswer(BaseModel):
    id: str = Field(description='the reference image id')
    score: float = Field(description='cosine similarity to the upload')
    match: bool = Field(description='whether the score reaches the threshold')


class SearchAnswer(BaseModel):
    matches: list[MatchAnswer] = Field(description='the k best references, best first')


class HealthAnswer(BaseModel):
    status: str
    model: str
    dim: int
    references: str
    batch_sizes: dict[str, int] = Field(description="this replica's batches so far: size -> count")


class ErrorAnswer(BaseModel):
    error: str


_IMAGE_BODY = {'requestBody': {'required': True, 'content': {
    'image/*': {'schema': {'type': 'string', 'format': 'binary'}},
    'application/octet-stream': {'schema': {'type': 'string', 'format': 'binary'}},
    'multipart/form-data': {'schema': {'type': 'object', 'required': ['file'],
                                       'properties': {'file': {'type': 'string', 'format': 'binary'}}}}}}}
_ERRORS = {code: {'model': ErrorAnswer, 'description': why} for code, why in [
    (400, 'not an image, empty, damaged, over the pixel limit, or a malformed form'),
    (411, 'no Content-Length'), (413, 'body too large'), (415, 'wrong Content-Type'), (422, 'bad query parameter')]}

app = FastAPI(title='towhee-isc', description='Image copy detection with the ISC21 descriptor.')


@app.exception_handler(UploadError)
async def _upload_error(request: Request, e: UploadError) -> JSONResponse:
    return JSONResponse({'error': str(e)}, status_code=e.status)


@app.exception_handler(ImageError)
async def _image_error(request: Request, e: ImageError) -> JSONResponse:
    return JSONResponse({'error': str(e)}, status_code=400)


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    return JSONResponse({'error': f'internal error: {type(e).__name__}: {e}'}, status_code=500)


@app.exception_handler(RequestValidationError)
async def _bad_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = '; '.join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return JSONResponse({'error': problems}, status_code=422)


async def read_upload(request: Request, limit: int) -> bytes:
    """The uploaded image's bytes: the raw body (``image/*``, ``application/octet-stream``) or the one
    file of a ``multipart/form-data`` body. The declared length is checked before anything is read
    (the server refuses a body longer than it declares)."""
    content_type = request.headers.get('content-type', '')
    media = content_type.split(';')[0].strip().lower()
    multipart = media == 'multipart/form-data'
    if not (multipart or media.startswith(RAW_TYPES)):
        raise UploadError(415, f'unsupported Content-Type {content_type or "(none)"!r}: send the image file as '
                               'the body (image/* or application/octet-stream) or as multipart/form-data')
    length = request.headers.get('content-length')
    if length is None:
        raise UploadError(411, f'a Content-Length is required (uploads up to {limit} bytes)')
    if not length.isdigit():
        raise UploadError(400, f'bad Content-Length {length!r}')
    if int(length) > limit:
        raise UploadError(413, f'the body is {int(length)} bytes; uploads are limited to {limit} bytes')
    if not multipart:
        return await request.body()
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as e:  # Starlette's MultiPartException and the parser's own errors
        raise UploadError(400, f'malformed multipart form data: {e}') from None
    files = [value for value in form.values() if isinstance(value, UploadFile)]
    if len(files) != 1:
        raise UploadError(400, f'multipart form data must hold one image file (field "file"), found {len(files)}')
    return await files[0].read()


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
        from .. import Isc
        if settings.loopback_only:
            _replica_grpc_on_loopback()
        self.settings = settings
        self.op = Isc(**settings.isc)
        self.references = References(settings)
        if self.references.dim != self.op.embedding_dim:
            raise ValueError(f'the references are {self.references.dim}-d; the model gives {self.op.embedding_dim}-d')
        self.batch_sizes: Counter[int] = Counter()
        self._embed_one.set_max_batch_size(settings.max_batch_size)
        self._embed_one.set_batch_wait_timeout_s(settings.batch_wait_s)

    @app.get('/health', response_model=HealthAnswer)
    async def health(self) -> dict:
        return {'status': 'ready', 'model': self.op.model_name, 'dim': self.op.embedding_dim,
                'references': self.references.where,
                'batch_sizes': {str(size): n for size, n in sorted(self.batch_sizes.items())}}

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
        hits = (await asyncio.to_thread(self.references.search, vector[None], k))[0]
        return {'matches': [{'id': i, 'score': score, 'match': score >= threshold} for i, score in hits]}

    async def _vector(self, request: Request) -> np.ndarray:
        data = await read_upload(request, self.settings.max_body_bytes)
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
    """Refuse before Ray starts what would only fail in the replicas: unknown weights, a missing
    checkpoint, references that are missing or unreachable. Returns where the references are."""
    from ..weights import get_weights
    checkpoint = settings.isc.get('checkpoint_path')
    if checkpoint is None:
        get_weights(settings.isc.get('model_name', 'isc_ft_v107'))
    elif not os.path.isfile(checkpoint):
        raise ValueError(f'no such checkpoint file: {checkpoint!r}')
    references = References(settings)
    try:
        return references.where
    finally:
        references.close()  # Milvus Lite admits one process at a time: free the file for the replicas


def absolute_paths(settings: ServiceSettings) -> ServiceSettings:
    """The same settings with local files made absolute: replicas need not share the driver's folder."""
    def absolute(path):
        return None if path is None or '://' in str(path) else os.path.abspath(path)
    isc = {**settings.isc, 'checkpoint_path': absolute(settings.isc.get('checkpoint_path'))}
    return replace(settings, isc=isc, references=absolute(settings.references), milvus_uri=absolute(settings.milvus_uri))


def run_service(settings: ServiceSettings, host: str = '127.0.0.1', port: int = 8000, replicas: int = 1,
                ray_address: Optional[str] = None, num_gpus: float = 0) -> None:
    """Start Ray (a local one bound to 127.0.0.1 unless ``ray_address`` names a cluster), deploy
    ``replicas`` replicas behind Serve's HTTP proxy on ``host:port``, and serve until SIGINT or
    SIGTERM; then shut Serve and the local Ray down."""
    import ray
    settings = replace(absolute_paths(settings), loopback_only=ray_address is None)
    where = check_settings(settings)
    if settings.milvus_uri and settings.collection and not settings.references and replicas > 1 \
            and '://' not in settings.milvus_uri:
        raise ValueError('a Milvus Lite file admits one process: use --replicas 1, or a Milvus server '
                         '(--milvus-uri http://HOST:19530)')
    if ray_address is None and os.environ.get(LOOPBACK_ONLY[0]) != LOOPBACK_ONLY[1]:
        raise RuntimeError(f'a local Ray must start with {LOOPBACK_ONLY[0]}={LOOPBACK_ONLY[1]} in the environment '
                           'before ray is imported (towhee-isc serve sets it)')
    started = time.perf_counter()
    ray.init(address=ray_address or 'local', include_dashboard=False, log_to_driver=False, logging_level='WARNING')
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own
    try:
        serve.start(http_options={'host': host, 'port': port}, logging_config={'log_level': 'WARNING'})
        deployment = IscService.options(
            num_replicas=replicas, max_ongoing_requests=4 * settings.max_batch_size,
            ray_actor_options={'num_cpus': 0 if num_gpus else 1, 'num_gpus': num_gpus})
        try:
            serve.run(deployment.bind(settings), name='isc', route_prefix='/')
        except RuntimeError as e:  # Serve says only that the deployment failed: find the replica's error
            raise ServiceStartError(f'the service did not start: {replica_error() or e}') from None
        print(f'serving on http://{host}:{port} ({replicas} replica(s), batches up to {settings.max_batch_size}; '
              f'references: {where}; ready in {time.perf_counter() - started:.0f} s)', flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


class ServiceStartError(RuntimeError):
    """A replica could not start (its own error is in the message)."""


def replica_error() -> Optional[str]:
    """The last line of the error that stopped the replicas, from Serve's status."""
    try:
        message = serve.status().applications['isc'].deployments['IscService'].message
    except Exception:  # the status is a help here, never a second failure
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _interrupt(signum, frame):
    raise KeyboardInterrupt

