"""Embedding on Ray Data: many processes, machines and GPUs, the same vectors as one process.

``IscEmbedder`` is the callable class for ``ds.map_batches`` (Ray Data's convention for models: the
constructor builds the operator once per actor, ``__call__`` maps a batch of columns to a batch; only
its arguments are pickled). ``embed_on_ray`` is ``towhee-isc embed --ray-address``: it hands
``embedding.embed_collection`` (and so ``descriptors.embed_resumable``) another way of embedding a
chunk, a pool of Ray actors, so the descriptor file, its ids, the skipped images and the resumability
are those of the single-process embed.

Ray is an optional extra (``pip install 'towhee-isc[ray]'``), imported only when used.
"""
from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from ..images import ImageError

RAY_EXTRA = "pip install 'towhee-isc[ray]'"
# How long Ray Data may go without finishing a batch, or without starting the actors, before the
# embed fails with a message instead of waiting forever (a published-model actor starts in ~30 s).
STALL_TIMEOUT_S = 600
# A Ray started or joined on this machine's loopback stays there (keep_ray_on_loopback).
LOOPBACK_ONLY = ('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
PROBE_TIMEOUT_S = 10
# While `embed --ray-address` runs, the head is asked every HEAD_CHECK_S seconds whether it still answers;
# HEAD_LOST_AFTER failures in a row (a refused connection fails at once) mean it is gone. Ray's own driver would
# print errors for a minute (its GCS reconnection timeout) and then end the process with exit 1.
HEAD_CHECK_S = 2.0
HEAD_LOST_AFTER = 3
# How a gRPC server (a Ray head's GCS) greets a client: the HTTP/2 connection preface is answered with
# a SETTINGS frame (a 9-byte frame header whose 4th byte, the type, is 4).
HTTP2_PREFACE = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


class RayClusterError(ConnectionError):
    """The Ray cluster could not be used: unreachable, too small for the actors asked for, or an
    actor or node died. Chunks saved before it happened are kept; the same command continues."""


def import_ray(quiet: bool = False):
    """The ``ray`` package with Ray Data, or an ImportError that says how to install it. ``quiet``:
    Ray Data logs errors only (read when it is first imported; a user's RAY_DATA_LOG_LEVEL wins), so
    its notices do not drown the command's progress bar; failures still arrive as exceptions."""
    if quiet:
        os.environ.setdefault('RAY_DATA_LOG_LEVEL', 'ERROR')
    try:
        import ray
        import ray.data  # noqa: F401 (the extra, not only Ray Core)
    except ImportError:
        raise ImportError(f'embedding on Ray needs Ray Data: {RAY_EXTRA}') from None
    return ray


class IscEmbedder:
    """Embeds batches of images on Ray actors, for
    ``ds.map_batches(IscEmbedder, fn_constructor_kwargs={...}, compute=ray.data.ActorPoolStrategy(size=N),
    num_cpus=C, num_gpus=G)`` (``concurrency=N`` in Ray before 2.51).

    Args:
        column: the input column, holding image file paths (str) or image bytes. By default
            ``'bytes'`` when a batch has it (``ray.data.read_binary_files(..., include_paths=True)``),
            else ``'path'``.
        **isc_kwargs: ``Isc`` arguments (``checkpoint_path=``, ``model_name=``, ``device=``...). As in
            ``towhee-isc embed``, photos are turned upright by their EXIF orientation unless
            ``exif_transpose=False``; ``num_threads`` defaults to the CPUs Ray reserved for the actor.

    A batch (a dict of columns) maps to a batch with every input column but the image bytes, plus
    ``id`` (str: the file name without extension from ``path``, or the batch's own ``id`` column),
    ``vector`` (float32, (N, D); a row of NaN for an image that could not be used) and ``error``
    (str: empty, or why that image could not be used). Any other error (settings, weights, device)
    concerns every image and propagates.
    """

    def __init__(self, column: str | None = None, **isc_kwargs: Any):
        from ..isc import Isc
        self.column = column
        kwargs = {'exif_transpose': True, **isc_kwargs}
        if kwargs.get('num_threads') is None:
            kwargs['num_threads'] = reserved_cpus()
        self.op = Isc(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = self.column or ('bytes' if 'bytes' in batch else 'path')
        if column not in batch:
            raise ValueError(f'IscEmbedder needs a {column!r} column of image paths or bytes; the batch has '
                             f'{sorted(batch)} (pass column= to name another)')
        items = [_image_item(x) for x in batch[column]]
        if 'id' in batch:
            ids = np.asarray(batch['id'])
        elif 'path' in batch:
            ids = np.array([Path(str(p)).stem for p in batch['path']], dtype=object)
        else:
            raise ValueError("IscEmbedder names each vector by an 'id' or 'path' column; the batch has neither")
        vectors = np.full((len(items), self.op.embedding_dim), np.nan, np.float32)
        errors = np.full(len(items), '', dtype=object)
        for i, result in enumerate(self.op.embed_each(items) if items else []):
            if not isinstance(result, ImageError):
                vectors[i] = result
            else:  # bytes do not say where they came from: the path does
                errors[i] = (f'{batch["path"][i]}: {result}' if isinstance(items[i], bytes) and 'path' in batch
                             else str(result))
        holds_bytes = bool(items) and isinstance(items[0], bytes)
        kept = {name: values for name, values in batch.items() if not (name == column and holds_bytes)}
        return {**kept, 'id': ids, 'vector': vectors, 'error': errors}


def _image_item(value: Any) -> str | bytes:
    """A column value as the operator takes it: numpy hands over str_ / bytes_ / object values."""
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    return str(value)


def reserved_cpus() -> int | None:
    """The CPUs Ray reserved for this worker (at least 1), or None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get('CPU')
    return max(1, int(cpus)) if cpus else None


class RayChunks:
    """``embed(chunk) -> (vectors, {failed index: reason})`` for ``descriptors.embed_resumable``, with the
    images embedded by a pool of Ray actors.

    ``embed_resumable`` asks for the chunks it has not saved in order. At the first call this starts
    one Ray Data stream over that chunk and every image after it, and answers each call as soon as
    all of that chunk's images are back; images of later chunks that come back first wait in memory
    (a vector is 1 KB). So the actors never wait for the driver, and a chunk is saved as soon as it
    and the chunks before it are done.

    ``images`` must be the list ``embed_resumable`` is given; ``isc_kwargs`` as for ``IscEmbedder``.
    """

    def __init__(self, images: Sequence[Path], isc_kwargs: dict[str, Any], actors: int, cpus_per_actor: float,
                 gpus_per_actor: float = 0, batch_size: int = 16, strict: bool = False):
        self.images = list(images)
        self.position = {path: i for i, path in enumerate(self.images)}
        self.isc_kwargs, self.strict = isc_kwargs, strict
        self.actors, self.cpus, self.gpus, self.batch_size = actors, cpus_per_actor, gpus_per_actor, batch_size
        self.op = None  # the driver's own operator, for its fingerprint (set by embed_on_ray)
        self.postprocessing: dict | None = None  # what the actors' operators post-process with (the same)
        self._stream: Iterator[dict[str, np.ndarray]] | None = None
        self._stream_start = 0
        self._results: dict[int, tuple[np.ndarray, str]] = {}

    def __call__(self, chunk: list[Path]) -> tuple[list[np.ndarray], dict[int, str]]:
        start = self.position[chunk[0]]
        if self.images[start:start + len(chunk)] != list(chunk):
            raise ValueError('RayChunks was given another list of images than the one being embedded')
        if self._stream is None or start < self._stream_start:
            self._start_stream(start)
        wanted = range(start, start + len(chunk))
        while any(i not in self._results for i in wanted):
            batch = self._next_batch()
            for i, vector, error in zip(batch['index'].tolist(), batch['vector'], batch['error']):
                self._results[i] = (vector, str(error))
        vectors, failed = [], {}
        for k, i in enumerate(wanted):
            vector, error = self._results.pop(i)
            if not error:
                vectors.append(vector)
            elif self.strict:
                raise ImageError(error)
            else:
                failed[k] = error
        return vectors, failed

    def close(self) -> None:
        """Stop the stream (and so its actors), e.g. when every chunk needed is saved."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _start_stream(self, start: int) -> None:
        self.close()
        ray = import_ray()
        rows = [{'index': i, 'path': str(p)} for i, p in enumerate(self.images[start:], start)]
        # Blocks of one actor batch each, so the pool shares the work evenly (at most ~10,000 blocks).
        rows_per_block = max(self.batch_size, math.ceil(len(rows) / 10_000))
        blocks = math.ceil(len(rows) / rows_per_block)
        dataset = ray.data.from_items(rows, override_num_blocks=blocks)
        # No more actors than blocks: each would load the model for nothing, and Ray Data warns of it.
        dataset = dataset.map_batches(
            IscEmbedder, fn_constructor_kwargs={'column': 'path', **self.isc_kwargs}, batch_size=self.batch_size,
            compute=ray.data.ActorPoolStrategy(size=min(self.actors, blocks)), num_cpus=self.cpus,
            num_gpus=self.gpus or None)
        self._stream = (batch for batch in dataset.iter_batches(batch_size=None, batch_format='numpy'))
        self._stream_start = start
        self._results.clear()

    def _next_batch(self) -> dict[str, np.ndarray]:
        try:
            return next(self._stream)
        except StopIteration:
            raise RuntimeError('the Ray stream ended before every image came back (a bug)') from None
        except (ValueError, TypeError, OSError, ImportError):  # the operator's own errors, raised as they are
            raise
        except Exception as e:
            self._stream = None
            raise RayClusterError(f'the Ray job failed: {_one_line(e)}. The chunks saved so far are kept: '
                                  'run the same command again to continue') from e


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0] if text else ""}'


def connect(address: str) -> tuple[Any, bool]:
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:PORT``), quietly: the command's progress
    bar is the only progress shown, and actors' logs stay in the cluster's log folder. Returns
    (``ray``, whether this call joined: False if this process was connected already).

    A cluster on this machine's loopback address is joined on loopback (see ``keep_ray_on_loopback``);
    an address where no Ray head answers fails at once, one line, instead of Ray's minutes of retries."""
    ray = import_ray()
    joined = not ray.is_initialized()
    if joined:
        address = check_address(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
        except ConnectionError as e:
            raise RayClusterError(f'cannot reach a Ray cluster at {address!r}: {_one_line(e)} '
                                  '(start one with `ray start --head`)') from e
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # an ImageError stays an ImageError, not a wrapper
    context.execution_no_progress_timeout_s = STALL_TIMEOUT_S
    context.wait_for_min_actors_s = STALL_TIMEOUT_S
    return ray, joined


def check_address(address: str) -> str:
    """``address`` as HOST:PORT (``auto`` resolved), checked at once: a Ray head must answer there.
    A head on this machine's loopback is then joined on loopback (``keep_ray_on_loopback``)."""
    address = resolve_address(address)
    host, port = split_address(address)
    if is_loopback(host):
        keep_ray_on_loopback()
    _probe(address, host, port)
    return address


def keep_ray_on_loopback() -> None:
    """Make a Ray that this process starts or joins on this machine stay on 127.0.0.1.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported; unless it is ``0``, Ray on Linux
    rewrites a loopback address (``127.0.0.1:6379``, or what ``auto`` finds) to the machine's network
    address, where a head started with ``--node-ip-address 127.0.0.1`` does not listen, and then retries
    for minutes. Set here in the environment (for the processes Ray starts) and, if ray is imported
    already, in the constant it was read into."""
    os.environ[LOOPBACK_ONLY[0]] = LOOPBACK_ONLY[1]
    constants = sys.modules.get('ray._private.ray_constants')
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def resolve_address(address: str) -> str:
    """``auto`` as Ray resolves it (``RAY_ADDRESS``, else the last ``ray start`` on this machine), as
    HOST:PORT; any other address as given."""
    if address != 'auto':
        return address
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        raise ImportError(f'embedding on Ray needs Ray Data: {RAY_EXTRA}') from None
    try:
        return get_ray_address_from_environment('auto', None)
    except ConnectionError:
        raise RayClusterError("--ray-address auto: no Ray cluster was started on this machine (`ray start --head`) "
                              'and RAY_ADDRESS is not set') from None


def split_address(address: str) -> tuple[str, int | None]:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT``; port None where there is none."""
    host, _, port = address.removeprefix('ray://').rpartition(':')
    if not host or not port.isdigit():
        return address, None
    return host.strip('[]'), int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _probe(address: str, host: str, port: int | None) -> None:
    """Fail at once unless a gRPC server (a Ray head) answers at a HOST:PORT address: Ray itself retries
    for minutes where nothing listens, or where something else does."""
    if port is None:
        return  # a form Ray will judge
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as s:
            s.sendall(HTTP2_PREFACE)
            answer = s.recv(9)
    except OSError as e:
        raise RayClusterError(f'cannot reach a Ray cluster at {address!r}: {e.strerror or e} '
                              '(start one with `ray start --head`, or check the address)') from None
    if len(answer) < 4 or answer[3] != 4:
        raise RayClusterError(f'no Ray head answers at {address!r}: something else listens there (check the address '
                              'and port that `ray start --head` printed)')


class HeadWatch:
    """For a command's own process: while in this block, a thread checks that the Ray head at ``address``
    (HOST:PORT) still answers (``_probe``); once it has not for ``HEAD_LOST_AFTER`` checks in a row, it
    writes one ``error:`` line to ``stderr`` and ends the process with exit 2. The chunks saved so far
    are whole files (they are written atomically), so the same command continues from them."""

    def __init__(self, address: str, stderr: io.TextIOBase):
        self.address, self.stderr = address, stderr
        self.host, self.port = split_address(address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name='ray-head-watch', daemon=True)

    def __enter__(self) -> HeadWatch:
        if self.port is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        failures = 0
        while not self._stop.wait(HEAD_CHECK_S):
            try:
                _probe(self.address, self.host, self.port)
                failures = 0
            except RayClusterError:
                failures += 1
                if failures >= HEAD_LOST_AFTER and not self._stop.is_set():
                    self.stderr.write(f'error: the Ray head at {self.address!r} stopped answering: the chunks saved so '
                                      'far are kept; run the same command again, with a cluster, to continue\n')
                    self.stderr.flush()
                    os._exit(2)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """For a command's own process: Ray's C++ side (the driver's core worker) writes its warnings and
    errors straight to file descriptor 2, outside Python; in this block that descriptor goes to
    /dev/null (the same messages are in the cluster's log folder), while ``sys.stderr`` (the progress
    bar, the command's own lines) keeps writing where stderr went."""
    sys.stderr.flush()
    kept = os.dup(2)
    python_stderr = sys.stderr
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(kept), 'wb', buffering=0), encoding=python_stderr.encoding,
                                  errors='backslashreplace', line_buffering=True, write_through=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(kept, 2)
        os.close(kept)
        sys.stderr.close()
        sys.stderr = python_stderr


# Each actor (and each video task) is a process that loads the model (~1 GB with the published network):
# at most 4 per CPU, as train's --workers, so that a fraction such as --cpus-per-actor 0.001 cannot start
# thousands of them (Ray schedules fractions of a CPU).
MIN_CPUS_PER_WORKER = 0.25


def check_cpus_per_worker(cpus: float, option: str) -> None:
    """Refuse ``option`` (--cpus-per-actor, --cpus-per-task) under MIN_CPUS_PER_WORKER."""
    if not cpus >= MIN_CPUS_PER_WORKER:
        raise ValueError(f'{option} must be at least {MIN_CPUS_PER_WORKER:g} (each one loads the model: at most '
                         f'{1 / MIN_CPUS_PER_WORKER:g} per CPU), got {cpus:g}')


def plan_actors(resources: dict[str, float], actors: int | None, cpus_per_actor: float,
                gpus_per_actor: float) -> int:
    """The number of actors to start: ``actors``, or as many as the cluster holds. Refuses what the
    cluster cannot hold at once, which Ray would otherwise wait for without a word."""
    check_cpus_per_worker(cpus_per_actor, '--cpus-per-actor')
    if gpus_per_actor < 0 or (actors is not None and actors < 1):
        raise ValueError(f'--actors must be at least 1 and --gpus-per-actor at least 0; got {actors}, {gpus_per_actor}')
    cpus, gpus = resources.get('CPU', 0.0), resources.get('GPU', 0.0)
    fit = math.floor(cpus / cpus_per_actor + 1e-9)
    if gpus_per_actor:
        fit = min(fit, math.floor(gpus / gpus_per_actor + 1e-9))
    if fit < 1:
        raise RayClusterError(f'the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s): not enough for one actor of '
                              f'{cpus_per_actor:g} CPU(s) and {gpus_per_actor:g} GPU(s); ask for less per actor')
    if actors is None:
        return fit
    if actors > fit:
        raise RayClusterError(f'{actors} actors of {cpus_per_actor:g} CPU(s) and {gpus_per_actor:g} GPU(s) do not fit '
                              f'in the Ray cluster ({cpus:g} CPU(s), {gpus:g} GPU(s)); Ray would wait for them '
                              f'forever: use --actors {fit} or less, or add nodes')
    return actors


def embed_on_ray(inputs: Sequence[str], output: str, address: str, isc_kwargs: dict[str, Any],
                 actors: int | None = None, cpus_per_actor: float = 1, gpus_per_actor: float = 0,
                 chunk_size: int = 64, strict: bool = False, quiet: bool = False,
                 own_process: bool = False) -> tuple[int, dict[Path, str], float]:
    """``embed_collection`` with the chunks embedded by ``actors`` Ray actors (default: as many as the
    cluster holds), each reserving ``cpus_per_actor`` CPUs (its threads) and ``gpus_per_actor`` GPUs.

    Images, the checkpoint and ``output``'s folder (where the parts of an unfinished run are saved)
    must be at the same paths on every node: shared storage. Returns (rows written, skipped files,
    images/s), as ``embed_collection`` does.

    ``own_process`` (the command line): the process is this embed's alone, so Ray's C++ messages are kept
    off stderr (``native_stderr_silenced``) and, should the head stop answering, the process ends at once
    with one line and exit 2 (``HeadWatch``) instead of Ray's minute of errors and exit 1.
    """
    address = check_address(address)  # first: a wrong address is said at once, before Ray Data or the operator
    import_ray(quiet=True)  # then a missing extra
    from ..isc import Isc
    from .descriptors import find_images
    isc_kwargs = {'exif_transpose': True, **isc_kwargs}
    images = find_images(inputs)
    # The driver's own operator: settings and checkpoint errors stop here, before the cluster is
    # used; it also gives the fingerprint of what the actors compute (the same on every backend).
    driver_op = Isc(**{**isc_kwargs, 'device': 'cpu', 'backend': 'torch'})
    with contextlib.ExitStack() as own:
        if own_process:
            own.enter_context(native_stderr_silenced())
            own.enter_context(HeadWatch(address, sys.stderr))
        return _embed_on_cluster(images, output, address, isc_kwargs, driver_op, actors, cpus_per_actor,
                                 gpus_per_actor, chunk_size, strict, quiet)


def _embed_on_cluster(images: list[Path], output: str, address: str, isc_kwargs: dict[str, Any], driver_op,
                      actors: int | None, cpus_per_actor: float, gpus_per_actor: float, chunk_size: int,
                      strict: bool, quiet: bool) -> tuple[int, dict[Path, str], float]:
    from .embedding import embed_collection
    ray, joined = connect(address)
    chunks = None
    try:
        actors = plan_actors(ray.cluster_resources(), actors, cpus_per_actor, gpus_per_actor)
        # Each actor call takes a share of a chunk (at most 16 images), so a chunk spreads over the pool.
        batch_size = max(1, min(16, chunk_size // actors))
        chunks = RayChunks(images, isc_kwargs, actors, cpus_per_actor, gpus_per_actor, batch_size, strict)
        chunks.op, chunks.postprocessing = driver_op, driver_op.postprocessing
        # The same list again: embed_collection finds these exact files, in this order.
        return embed_collection([str(p) for p in images], output, chunks, chunk_size, quiet)
    finally:
        if chunks is not None:
            chunks.close()
        if joined:
            ray.shutdown()


# Ray gives a new local raylet a fixed 30 s to register with its GCS (ray/_private/node.py, no setting); on
# a loaded machine it sometimes takes longer and ray.init fails with this. A second start then succeeds.
RAY_START_TIMED_OUT = 'The current node timed out during startup'
# ... and when its GCS server never published its port (a quiet 2-core machine, once in 3 runs of the test
# suite: the session's log folder empty, the server had not started): "Timed out waiting for file
# .../gcs_server_port_...". Both are a local start that did not come up, tried once more.
GCS_PORT_TIMED_OUT = ('Timed out waiting for file', 'gcs_server_port')


def _start_timed_out(error: Exception) -> bool:
    message = str(error)
    return RAY_START_TIMED_OUT in message or all(part in message for part in GCS_PORT_TIMED_OUT)


def start_ray(ray_address: str | None) -> None:
    """``ray.init``: join the cluster at ``ray_address``, or start a local Ray, once more if its raylet
    did not register or its GCS server publish its port in time (the processes of the failed start are
    stopped first, by PID)."""
    import ray
    if ray_address is None:
        # Ray waits 30 s for a local GCS server to publish its port, then fails ("Timed out waiting for file
        # .../gcs_server_port_..."): on a busy 2-core machine (the test suite beside other work) it took
        # longer. The operator's own setting wins.
        os.environ.setdefault('RAY_gcs_server_port_wait_time_s', '120')
    for attempt in (1, 2):
        began = _clock_ticks_since_boot()
        try:
            ray.init(address=ray_address or 'local', include_dashboard=False, log_to_driver=False,
                     logging_level='WARNING')
            return
        except Exception as e:
            if ray_address is not None or attempt == 2 or not _start_timed_out(e):
                raise
            ray.shutdown()
            _stop_processes_started_since(began)
            print('Ray did not start within its fixed 30 s (a busy machine?): starting it once more',
                  file=sys.stderr, flush=True)


def _clock_ticks_since_boot() -> int | None:
    try:
        return int(float(Path('/proc/uptime').read_text().split()[0]) * os.sysconf('SC_CLK_TCK'))
    except (OSError, ValueError):
        return None  # not Linux: the failed start's processes end with this one (Ray's reaper)


def _stop_processes_started_since(began: int | None) -> None:
    """SIGKILL this process's descendants that started after ``began`` (clock ticks since boot, 10 ms):
    the failed Ray start's GCS, raylet and workers, and nothing that was running before."""
    if began is None:
        return
    parents: dict[int, int] = {}
    started: dict[int, int] = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                fields = Path(f'/proc/{entry}/stat').read_text().rsplit(')', 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(entry)], started[int(entry)] = int(fields[1]), int(fields[19])
    mine, todo = [], [os.getpid()]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        mine += children
        todo += children
    for pid in mine:
        if started[pid] > began:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
