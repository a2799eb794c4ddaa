"""The winner's descriptor post-processing: database-side augmentation of a set of negatives, then
negative embedding subtraction (arXiv 2112.04323; ``scripts/postprocess.py`` in
lyakaap/ISC21-Descriptor-Track-1st), restated with exact blocked numpy search.

    nes = NegativeEmbeddings('negatives.h5')          # or an (M, D) float32 array of unit rows
    post = nes.subtract(vectors)                      # (N, D) float32 unit rows -> the same, post-processed

1. Augmentation (once per negative set, cached on disk): each negative n_i becomes the L2-normalised
   sum over its ``dba_k`` nearest negatives (inner product, itself included) of s_ij ** alpha * n_j.
2. Subtraction, ``iterations`` times: x <- x - beta * (mean of x's ``k`` nearest augmented negatives),
   x <- x / |x|.

Everything is float32, as in the winner's script. No Towhee here: the operator and the workflow both
use this module.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
import zipfile
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .defaults import ALPHA, BETA, DBA_K, ITERATIONS, K  # noqa: F401 (the winner's settings; imported from here)
from .progress import Progress

# The most iterations allowed: the winner used 1, the paper found nothing past 2 or 3, and each one is a
# full search of the negatives (a typo such as 1000000 would otherwise run for days without a word).
MAX_ITERATIONS = 20
METHOD = 'negative embedding subtraction (arXiv 2112.04323)'
NORM_TOLERANCE = 1e-3  # descriptors must be L2-normalised; fp16 ones are within ~1e-3
# Similarity blocks of ROWS x COLUMNS float32 (128 MB), never N x M. Chunking the negatives too keeps
# the product fed from the cache: with 1,000,000 negatives, 512 rows x 65,536 columns ran 1.7x faster
# than 33 rows x all columns (the same memory).
ROWS, COLUMNS = 512, 65_536
GROUP = 32  # columns per group in the top-k pre-selection (measured fastest of 16..256 for k = 10)
_CACHE_VERSION = 1  # bump when the augmentation's arithmetic changes


class PostprocessError(ValueError):
    """Negatives, descriptors or settings the post-processing cannot use."""


class NegativeEmbeddings:
    """A set of negatives (descriptors of images with no copies of the references), augmented once.

    Args:
        negatives: an (M, D) float array of L2-normalised rows, or the path of a descriptor file
            (HDF5 ``vectors`` float32 M x D and ``image_names``, as ``towhee-isc embed`` writes).
        dba_k: neighbours (itself included) averaged into each negative by the augmentation.
        alpha: the augmentation weighs a neighbour of similarity s by s ** alpha.
        cache: keep the augmented negatives in ``cache_dir`` (default
            ``torch.hub.get_dir()/towhee_isc/nes``), keyed by content, and reuse them.
        cache_dir: where the cache lives.
        progress: False for no progress line during the augmentation and subtraction; otherwise one is
            shown as ``towhee_isc.progress`` decides (on a terminal, for steps longer than 2 s).

    ``negatives`` holds the (M, D) float32 input, ``key`` a content key of it, ``augmented`` the
    (M, D) float32 augmented negatives (computed, or read from the cache, on first use).
    """

    def __init__(self, negatives: np.ndarray | str | os.PathLike, dba_k: int = DBA_K, alpha: float = ALPHA, *,
                 cache: bool = True, cache_dir: str | os.PathLike | None = None, progress: bool | None = None):
        self.dba_k = _positive_int('dba_k', dba_k)
        self.alpha = _finite('alpha', alpha)
        self.negatives = _read_negatives(negatives)
        # The fingerprint of the model that made them (a descriptor file records it; None for an array),
        # so that negatives of another model are refused: their vectors cannot be compared with ours.
        self.model: dict | None = _read_model(negatives)
        if len(self.negatives) < self.dba_k:
            raise PostprocessError(f'dba_k={self.dba_k} needs at least {self.dba_k} negatives, '
                                   f'got {len(self.negatives)}')
        self.key = content_key(self.negatives)
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self._augmented: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return self.negatives.shape[1]

    @property
    def augmented(self) -> np.ndarray:
        """(M, D) float32, L2-normalised rows: the negatives after database-side augmentation."""
        if self._augmented is None:
            self._augmented = self._load_or_augment()
        return self._augmented

    def subtract(self, vectors: np.ndarray, k: int = K, beta: float = BETA, iterations: int = ITERATIONS) -> np.ndarray:
        """Negative embedding subtraction of (N, D) L2-normalised ``vectors``: returns (N, D) float32
        unit rows, in the same order. Each iteration subtracts ``beta`` times the mean of a vector's
        ``k`` nearest augmented negatives, then normalises (a progress line per iteration, unless made with ``progress=False``)."""
        k, beta, iterations = self._settings(k, beta, iterations)
        x = _check_unit_rows(vectors, 'descriptors', self.dim)
        negatives, beta32 = self.augmented, np.float32(beta)
        for n in range(iterations):
            line = f'subtracting negatives ({n + 1}/{iterations})' if self.progress is not False else None
            _, idx = nearest(x, negatives, k, description=line)
            x = x - beta32 * negatives[idx].mean(axis=1)
            x = _normalise(x, 'the subtraction left a zero vector (is beta near 1 or more?)')
        return x

    def record(self, k: int = K, beta: float = BETA, iterations: int = ITERATIONS) -> dict:
        """What descriptor files store about post-processing with these negatives and settings."""
        k, beta, iterations = self._settings(k, beta, iterations)
        return {'method': METHOD, 'negatives': self.key, 'negatives_count': len(self.negatives),
                'dba_k': self.dba_k, 'alpha': self.alpha, 'k': k, 'beta': beta, 'iterations': iterations}

    def _settings(self, k, beta, iterations) -> tuple[int, float, int]:
        k = _positive_int('k', k)
        if k > len(self.negatives):
            raise PostprocessError(f'k={k} needs at least {k} negatives, got {len(self.negatives)}')
        iterations = _positive_int('iterations', iterations)
        if iterations > MAX_ITERATIONS:
            raise PostprocessError(f'iterations must be at most {MAX_ITERATIONS}, got {iterations} (the winner used 1)')
        return k, _finite('beta', beta), iterations

    # -- the augmentation and its cache --------------------------------------------------------------

    def _cache_path(self) -> Path:
        folder = self.cache_dir
        if folder is None:
            import torch  # only for its cache folder, as the ONNX export uses
            folder = Path(torch.hub.get_dir()) / 'towhee_isc' / 'nes'
        digest = hashlib.sha256(f'{_CACHE_VERSION}|{self.key}|{self.dba_k}|{self.alpha!r}'.encode()).hexdigest()[:24]
        m, d = self.negatives.shape
        return folder / f'{m}x{d}-{digest}.npz'

    def _load_or_augment(self) -> np.ndarray:
        if not self.cache:
            return augment(self.negatives, self.dba_k, self.alpha, self.progress)
        path = self._cache_path()
        if path.is_file():
            cached = self._read_cache(path)
            if cached is not None:
                return cached
        augmented = augment(self.negatives, self.dba_k, self.alpha, self.progress)
        with atomic_write(path) as tmp, open(tmp, 'wb') as f:
            np.savez(f, augmented=augmented)
        return augmented

    def _read_cache(self, path: Path) -> np.ndarray | None:
        """The cached augmentation, or None (with a warning) if the file is damaged. The zip
        format's CRC-32 catches changed bytes; shape and unit norms catch the rest."""
        try:
            with np.load(path, allow_pickle=False) as f:
                augmented = f['augmented']
            if augmented.dtype == np.float32 and augmented.shape == self.negatives.shape:
                _check_unit_rows(augmented, 'cached negatives', self.dim)
                return augmented
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            pass
        warnings.warn(f'damaged cache file {str(path)!r}: computing the augmentation again', stacklevel=3)
        return None


def augment(negatives: np.ndarray, dba_k: int = DBA_K, alpha: float = ALPHA, progress: bool | None = None) -> np.ndarray:
    """Database-side augmentation: (M, D) float32 unit rows -> (M, D) float32 unit rows, each the
    normalised sum of its ``dba_k`` nearest negatives (itself included) weighted by similarity ** alpha."""
    out = np.empty_like(negatives)
    alpha32 = np.float32(alpha)

    def augment_rows(start: int, sims: np.ndarray, idx: np.ndarray) -> None:
        with np.errstate(invalid='ignore'):  # a negative similarity ** fractional alpha is NaN: reported below
            weights = np.power(sims, alpha32)
        summed = (negatives[idx] * weights[:, :, None]).sum(axis=1)
        out[start:start + len(summed)] = _normalise(
            summed, f'alpha={alpha} gives NaN or zero weights for some negatives (negative similarities '
                    'to a fractional power?): use an integer alpha')

    nearest(negatives, negatives, dba_k, each_block=augment_rows,
            description='augmenting negatives' if progress is not False else None)
    return out


def nearest(queries: np.ndarray, database: np.ndarray, k: int, each_block=None, description: str | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``database`` (M, D) by inner product for each of ``queries`` (N, D):
    (similarities (N, k) float32, indices (N, k) int64), in no particular order within a row.

    Blocked: ``ROWS`` query rows times ``COLUMNS`` database rows at a time (BLAS), each block's best
    k merged with those of the blocks before. With ``each_block(start, sims, idx)`` the results go to
    it block by block and the returned arrays are empty. ``description`` names its progress line
    (``towhee_isc.progress``); None: no line.
    """
    n, m = len(queries), len(database)
    keep = each_block is None
    sims_out = np.empty((n if keep else 0, k), np.float32)
    idx_out = np.empty((n if keep else 0, k), np.int64)
    progress = Progress(n, description or '', unit='row', quiet=description is None)
    for start in range(0, n, ROWS):
        block = queries[start:start + ROWS]
        sims = idx = None
        for first in range(0, m, COLUMNS):
            sim = block @ database[first:first + COLUMNS].T
            chunk_idx = _top_k_columns(sim, min(k, sim.shape[1]))
            chunk_sims = np.take_along_axis(sim, chunk_idx, axis=1)
            if sims is None:
                sims, idx = chunk_sims, chunk_idx + first
            else:  # merge with the best so far
                sims, idx = np.concatenate([sims, chunk_sims], axis=1), np.concatenate([idx, chunk_idx + first], axis=1)
                best = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k:]
                sims, idx = np.take_along_axis(sims, best, axis=1), np.take_along_axis(idx, best, axis=1)
        if keep:
            sims_out[start:start + len(block)], idx_out[start:start + len(block)] = sims, idx
        else:
            each_block(start, sims, idx)
        progress.advance(len(block))
    progress.close()
    return sims_out, idx_out


def _top_k_columns(sim: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest values. A full argpartition of every row costs more
    than the matrix product; instead, split the columns into groups of GROUP (column i * n + j is in
    group j), take each group's maximum, and look only inside the k groups with the largest maxima
    (they hold the k largest values: any other group's values are exceeded by those k maxima) and
    the columns left over. Exact, up to the order of equal values, and 10-30x cheaper here."""
    b, m = sim.shape
    n = m // GROUP
    if n < 4 * k:
        return np.argpartition(sim, m - k, axis=1)[:, m - k:]
    full = n * GROUP
    maxima = sim[:, :full].reshape(b, GROUP, n).max(axis=1)
    groups = np.argpartition(maxima, n - k, axis=1)[:, n - k:]
    candidates = (groups[:, :, None] + n * np.arange(GROUP)).reshape(b, -1)
    if full < m:
        candidates = np.concatenate([candidates, np.broadcast_to(np.arange(full, m), (b, m - full))], axis=1)
    values = np.take_along_axis(sim, candidates, axis=1)
    c = candidates.shape[1]
    return np.take_along_axis(candidates, np.argpartition(values, c - k, axis=1)[:, c - k:], axis=1)


def content_key(vectors: np.ndarray) -> str:
    """A key for an array's content (shape and float32 bytes)."""
    digest = hashlib.sha256(f'{vectors.shape}|float32'.encode())
    digest.update(np.ascontiguousarray(vectors, np.float32).data)
    return digest.hexdigest()[:24]


# -- checks -----------------------------------------------------------------------------------------

def _read_negatives(negatives) -> np.ndarray:
    if isinstance(negatives, (str, os.PathLike)):
        try:
            from .workflow.descriptors import read_descriptors
        except ImportError as e:  # h5py is a workflow dependency
            raise ImportError("reading a negatives file needs h5py: pip install 'towhee-isc[workflow]' "
                              '(or pip install h5py), or pass an (M, D) array') from e
        try:
            _, negatives = read_descriptors(negatives)
        except ValueError as e:
            raise PostprocessError(f'negatives: {e}') from e
    return _check_unit_rows(negatives, 'negatives')


def _read_model(negatives) -> dict | None:
    if not isinstance(negatives, (str, os.PathLike)):
        return None
    from .workflow.descriptors import read_model
    try:
        return read_model(negatives)
    except ValueError as e:
        raise PostprocessError(f'negatives: {e}') from e


def same_model(a: dict | None, b: dict | None) -> bool:
    """Whether two operator fingerprints (``Isc.fingerprint``) make comparable vectors: the same weights at
    the same input size. An unknown one (None) is taken on trust."""
    return a is None or b is None or (a.get('weights'), a.get('img_size')) == (b.get('weights'), b.get('img_size'))


def _check_unit_rows(vectors, name: str, dim: int | None = None) -> np.ndarray:
    """``vectors`` as a C-contiguous (N, D) float32 array of finite unit rows, or a clear error."""
    if isinstance(vectors, (str, bytes)) or not (hasattr(vectors, '__array__') or isinstance(vectors, (list, tuple))):
        raise TypeError(f'{name} must be an (N, D) float array, got {type(vectors).__name__}')
    array = np.asarray(vectors)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f'{name} must be a float array, got dtype {array.dtype}')
    if array.ndim != 2 or array.shape[1] == 0:
        raise PostprocessError(f'{name} must be an (N, D) array, got shape {array.shape}')
    if dim is not None and array.shape[1] != dim:
        raise PostprocessError(f'{name} are {array.shape[1]}-d but the negatives are {dim}-d')
    if name == 'negatives' and len(array) == 0:
        raise PostprocessError('negatives: the set is empty')
    array = np.ascontiguousarray(array, np.float32)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise PostprocessError(f'{name} hold NaN or infinite values (row {bad})')
    norms = np.linalg.norm(array, axis=1)
    off = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
    if len(off):
        raise PostprocessError(f'{name} must be L2-normalised (unit rows): row {int(off[0])} has norm '
                               f'{norms[off[0]]:.4g} ({len(off)} rows are off)')
    return array


def _normalise(x: np.ndarray, problem: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise PostprocessError(problem)
    return x / norms


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise PostprocessError(f'{name} must be an integer of at least 1, got {value!r}')
    return int(value)


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise PostprocessError(f'{name} must be a finite number, got {value!r}')
    return float(value)

