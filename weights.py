"""The published ISC21 weights (data) and their download into torch hub's cache."""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_write, exclusive, remove_partials
from .progress import Progress

# The table is read to build the command line's --help: torch, the model (timm) and urllib are imported
# only by the functions that read or download weights.
if TYPE_CHECKING:
    from .model import Checkpoint

# Overrides the release URL below (a mirror, or an internal server on an air-gapped site).
WEIGHTS_URL_ENV = 'TOWHEE_ISC_WEIGHTS_URL'
RELEASE_URL = 'https://github.com/lyakaap/ISC21-Descriptor-Track-1st/releases/download/v1.0.1'


@dataclass(frozen=True)
class Weights:
    """One published checkpoint. Mean/std are not restated: they come from the backbone's timm config."""
    file_name: str
    arch: str          # timm name (the checkpoint itself says 'tf_efficientnetv2_m_in21ft1k')
    input_size: int    # square input side S
    embedding_dim: int
    description: str
    licence: str = 'MIT (lyakaap/ISC21-Descriptor-Track-1st)'

    @property
    def url(self) -> str:
        return f"{os.environ.get(WEIGHTS_URL_ENV, RELEASE_URL).rstrip('/')}/{self.file_name}"

    @property
    def cache_path(self) -> Path:
        """Where torch hub (and the winner's own package) keeps the file."""
        import torch
        return Path(torch.hub.get_dir()) / 'checkpoints' / self.file_name


_EFFNETV2_M = dict(arch='tf_efficientnetv2_m.in21k_ft_in1k', input_size=512, embedding_dim=256)
WEIGHTS: dict[str, Weights] = {
    'isc_ft_v107': Weights('isc_ft_v107.pth.tar', **_EFFNETV2_M,
                           description='fine-tuned on ISC ground truth; the 1st-place submission (default)'),
    'isc_selfsup_v98': Weights('isc_selfsup_v98.pth.tar', **_EFFNETV2_M,
                               description='self-supervised stage, before fine-tuning'),
}
DEFAULT_WEIGHTS = 'isc_ft_v107'


class WeightsDownloadError(OSError):
    """The published weights could not be downloaded."""


def get_weights(name: str) -> Weights:
    """The table entry for ``name``; a ValueError lists the known names."""
    if not isinstance(name, str):
        raise TypeError(f'model_name must be a str such as {DEFAULT_WEIGHTS!r}, got {type(name).__name__}')
    if name not in WEIGHTS:
        raise ValueError(f'unknown model_name {name!r}: the published ISC weights are '
                         f'{sorted(WEIGHTS)}; for other weights pass checkpoint_path=')
    return WEIGHTS[name]


def load_published(name: str) -> Checkpoint:
    """The checkpoint of published weights ``name``, downloaded once into torch hub's cache.

    The download goes to a temporary file beside the target and is renamed into place only once it
    is complete and reads as a checkpoint of the network the table describes, so the cache never
    holds a partial or corrupt file; a cached file that is another network is refused (see
    ``check_cached``).
    """
    from .model import Checkpoint, CheckpointError, read_checkpoint
    weights = get_weights(name)
    target = weights.cache_path
    _check_regular(target)
    if target.is_file():
        return _checked_cache(read_checkpoint(target), weights)
    with exclusive(target.parent):  # one download of the cache at a time; the others then find the file
        if target.is_file():
            return _checked_cache(read_checkpoint(target), weights)
        remove_partials(target)  # left by a download that was killed
        with atomic_write(target) as tmp:
            with open(tmp, 'wb') as out:
                _download(weights.url, out, target)
            try:
                ckpt = read_checkpoint(tmp)
            except CheckpointError as e:
                with open(tmp, 'rb') as f:
                    start = f.read(32)
                raise CheckpointError(f'{weights.url} did not give a readable ISC checkpoint (it sent '
                                      f'{tmp.stat().st_size} bytes starting {start!r}), so nothing was cached; '
                                      f'check {WEIGHTS_URL_ENV} or pass checkpoint_path=') from e
            found = _other_network(ckpt, weights)
            if found:
                raise CheckpointError(f'{weights.url} gave {found}, so nothing was cached; check {WEIGHTS_URL_ENV} '
                                      'or pass checkpoint_path=')
    return Checkpoint(ckpt.state_dict, ckpt.arch, ckpt.input_size, str(target))


def check_cached(name: str) -> None:
    """Refuse a file in the cache under published name ``name`` that is not the network the table
    describes (architecture, vector size, input size), reading only its header. An operator is
    described by the table, downloaded or not (a Triton server has no weights), so a file put there by
    hand must not change what it computes."""
    from .model import read_checkpoint
    weights = get_weights(name)
    _check_regular(weights.cache_path)
    if weights.cache_path.is_file():
        _checked_cache(read_checkpoint(weights.cache_path, mmap=True), weights)


def _check_regular(path: Path) -> None:
    """A folder (or pipe) where the download belongs would only fail after the whole download."""
    if path.exists() and not path.is_file():
        from .model import CheckpointError
        raise CheckpointError(f'{str(path)!r} is not a regular file: remove it, so that the published weights '
                              'can be downloaded there')


def _checked_cache(ckpt: Checkpoint, weights: Weights) -> Checkpoint:
    from .model import CheckpointError
    found = _other_network(ckpt, weights)
    if found:
        raise CheckpointError(f'{str(weights.cache_path)!r} holds {found}: delete it to download the published '
                              'file again, or pass it as checkpoint_path=')
    return ckpt


def _other_network(ckpt: Checkpoint, weights: Weights) -> str | None:
    """How ``ckpt`` differs from the network ``weights`` describes, or None."""
    from .model import strip_module_prefix, timm_name
    fc = strip_module_prefix(ckpt.state_dict).get('fc.weight')
    found = (timm_name(ckpt.arch) if ckpt.arch else None, None if fc is None or fc.ndim != 2 else fc.shape[0],
             ckpt.input_size)
    if found == (weights.arch, weights.embedding_dim, weights.input_size):
        return None
    size = f'at {found[2]} px' if found[2] else 'with no input size'
    return (f'a checkpoint of {found[0] or "an unnamed architecture"} with {found[1]}-d vectors {size}, '
            f'not the published {weights.arch} with {weights.embedding_dim}-d vectors at {weights.input_size} px')


# A download gives up when it takes longer than this in all (seconds; TOWHEE_ISC_DOWNLOAD_TIMEOUT), when the
# server has not sent its response headers within HEADERS_SECONDS, or when fewer than STALL_BYTES arrive in
# STALL_SECONDS: a server that drips bytes never trips a socket timeout (it bounds each read, not the whole).
STALL_SECONDS, STALL_BYTES = 60.0, 64 * 1024
HEADERS_SECONDS = 60.0
# The published files are a few hundred MB: a mirror sending more (endless, or lying about its size) would
# fill the disk for an hour before the time limit stops it.
MAX_DOWNLOAD_BYTES = 2 * 2**30


def download_timeout() -> float:
    value = os.environ.get('TOWHEE_ISC_DOWNLOAD_TIMEOUT', '3600')
    try:
        seconds = float(value)
    except ValueError:
        seconds = float('nan')
    if not seconds > 0 or seconds == float('inf'):
        raise ValueError(f'TOWHEE_ISC_DOWNLOAD_TIMEOUT must be a positive number of seconds, got {value!r}')
    return seconds


class _Watchdog:
    """Cuts every connection of one download (redirects included) once a time limit passes, wherever the
    download is waiting then: a proxy's CONNECT, the TLS handshake, reading the headers or the body (the TCP
    connect itself is bounded by the socket timeout). ``expired`` says which limit."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.expired: str | None = None
        self._timers: list[threading.Timer] = []

    def limit(self, seconds: float, why: str) -> threading.Timer:
        timer = threading.Timer(seconds, self._cut, (why,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        return timer

    def watch(self, sock: socket.socket) -> None:
        """Cut ``sock``'s connection when a limit passes; the watchdog closes ``sock`` when stopped."""
        self.sockets.append(sock)
        if self.expired:  # the limit passed while it connected
            self._cut(self.expired)

    def _cut(self, why: str) -> None:
        self.expired = self.expired or why
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
            except OSError:
                pass

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for sock in self.sockets:
            sock.close()

    def opener(self):
        """urllib's opener (proxies, redirects as usual) whose HTTP(S) connections this watchdog can cut."""
        import urllib.request
        watchdog = self

        class Watched:
            def do_open(self, http_class, req, **kwargs):
                class Connection(http_class):
                    def __init__(self, *args, **kwargs):
                        super().__init__(*args, **kwargs)
                        create = self._create_connection

                        def created(*args, **kwargs) -> socket.socket:
                            sock = create(*args, **kwargs)
                            # Watched at once, as a duplicate: connect() goes on with a proxy's CONNECT and the
                            # TLS handshake, on a TLS socket that takes this one's place (detaching it).
                            watchdog.watch(sock.dup())
                            return sock
                        self._create_connection = created
                return super().do_open(Connection, req, **kwargs)

        http = type('WatchedHTTPHandler', (Watched, urllib.request.HTTPHandler), {})
        https = type('WatchedHTTPSHandler', (Watched, urllib.request.HTTPSHandler), {})
        return urllib.request.build_opener(http, https)


def _download(url: str, out, target: Path) -> None:
    import http.client
    import urllib.error
    fix = (f'check the network or set {WEIGHTS_URL_ENV} to a mirror, or download it yourself to '
           f'{str(target)!r} or pass checkpoint_path=')
    deadline = download_timeout()
    started = window_start = time.monotonic()
    received = window_bytes = 0
    watchdog = _Watchdog()
    watchdog.limit(deadline, f'it took over {deadline:g} s (TOWHEE_ISC_DOWNLOAD_TIMEOUT)')
    # Where the whole download's limit comes first, it is the one to name (two timers of one length race).
    headers = watchdog.limit(HEADERS_SECONDS, f'the server had not sent its response headers after '
                                              f'{HEADERS_SECONDS:g} s') if HEADERS_SECONDS < deadline else None
    try:
        with watchdog.opener().open(url, timeout=STALL_SECONDS) as response:
            if headers:
                headers.cancel()
            expected = response.headers.get('Content-Length')
            if expected is not None and int(expected) > MAX_DOWNLOAD_BYTES:
                raise WeightsDownloadError(f'{url} declares {int(expected)} bytes, more than the '
                                           f'{MAX_DOWNLOAD_BYTES} any published weights need; {fix}')
            # The progress line starts once the server answers: offline, the error line is all there is.
            with Progress(int(expected) if expected else None, f'downloading {target.name}', unit='B', delay=0,
                          scale=True) as progress:
                while chunk := response.read1(1 << 20):  # returns what has arrived, so the clocks below run
                    out.write(chunk)
                    progress.advance(len(chunk))
                    received += len(chunk)
                    window_bytes += len(chunk)
                    if received > MAX_DOWNLOAD_BYTES:
                        raise WeightsDownloadError(f'{url} sent over {MAX_DOWNLOAD_BYTES} bytes, more than any '
                                                   f'published weights need; {fix}')
                    now = time.monotonic()
                    if now - started > deadline:
                        raise WeightsDownloadError(f'downloading {url} took over {deadline:g} s ({received} '
                                                   f'bytes so far; TOWHEE_ISC_DOWNLOAD_TIMEOUT); {fix}')
                    if now - window_start >= STALL_SECONDS:
                        if window_bytes < STALL_BYTES:
                            raise WeightsDownloadError(f'downloading {url} stalled: {window_bytes} bytes in the last '
                                                       f'{now - window_start:.0f} s; {fix}')
                        window_start, window_bytes = now, 0
    except WeightsDownloadError:
        raise
    except urllib.error.HTTPError as e:
        raise WeightsDownloadError(f'downloading {url} failed: HTTP {e.code} {e.reason}; {fix}') from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if watchdog.expired:
            raise WeightsDownloadError(f'downloading {url} was given up: {watchdog.expired}; {fix}') from None
        raise WeightsDownloadError(f'downloading {url} failed: {e}; {fix}') from e
    finally:
        watchdog.stop()
    if watchdog.expired:  # cut in the body: the read ended early, as if the body were complete
        raise WeightsDownloadError(f'downloading {url} was given up: {watchdog.expired} ({received} bytes '
                                   f'so far); {fix}')
    if expected is not None and received != int(expected):
        raise WeightsDownloadError(f'downloading {url} stopped after {received} of {expected} bytes; {fix}')


def checkpoint_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a checkpoint file (missing, a folder, ...), or None: checked by the commands'
    parsers too, so a mistyped --checkpoint is answered before torch is imported."""
    if os.path.isfile(path):
        return None
    where = '' if os.path.isabs(path) else f' (relative to the working folder {os.getcwd()!r})'
    what = 'is not a regular file' if os.path.exists(path) else 'not found'
    return f'checkpoint file {path!r} {what}{where}'
