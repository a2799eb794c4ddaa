"""The copy-detection workflow as functions: embed images to arrays or to a descriptor file, load
descriptors from files or images. Search, indexing and dedup live in ``matching``, metrics in
``metrics``; the ``towhee-isc`` command only calls these."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .descriptors import embed_resumable, find_images, image_id, read_descriptors, read_image_paths

DESCRIPTOR_SUFFIXES = ('.h5', '.hdf5')


class Embedder:
    """The operator, made on first use (``Isc`` arguments), that skips unreadable images unless
    ``strict``. Photos are turned upright by their EXIF orientation, as people see them."""

    def __init__(self, strict: bool = False, **isc_kwargs):
        self.strict = strict
        self.isc_kwargs = {'exif_transpose': True, **isc_kwargs}
        self._op = None

    @property
    def op(self):
        if self._op is None:
            from ..isc import Isc
            self._op = Isc(**self.isc_kwargs)
        return self._op

    def __call__(self, paths: list[Path]) -> tuple[list[np.ndarray], list[int]]:
        """Vectors of the readable images, and the indices of the others (an error with --strict)."""
        try:
            return self.op(paths), []
        except ValueError:
            if self.strict:
                raise
        vectors, failed = [], []
        for i, path in enumerate(paths):  # find which ones failed
            try:
                vectors.append(self.op(path))
            except ValueError:
                failed.append(i)
        return vectors, failed


def embed_collection(inputs: Sequence[str], output: str, embedder: Embedder, chunk_size: int = 64,
                     quiet: bool = False) -> tuple[int, list[Path], float]:
    """Embed images into a descriptor file, resumably. Returns (rows written, skipped files, images/s)."""
    images = find_images(inputs)
    started, embedded, reached = time.perf_counter(), 0, 0
    bar = None
    if not quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(images), unit='img', file=sys.stderr, smoothing=0.1)

    def progress(done: int, resumed: bool) -> None:
        """``done`` images are finished; the last chunk was saved by an earlier run if ``resumed``."""
        nonlocal embedded, reached
        step, reached = done - reached, done
        if not resumed:
            embedded += step
        if bar:
            bar.update(step)

    skipped = embed_resumable(images, output, embedder, chunk_size, progress)
    if bar:
        bar.close()
    seconds = time.perf_counter() - started
    return len(images) - len(skipped), [images[i] for i in skipped], embedded / seconds if seconds else 0.0


def load_descriptors(inputs: Sequence[str], embedder: Embedder) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Descriptor files as they are, or images embedded now: (ids, vectors, id -> image path)."""
    if all(str(i).lower().endswith(DESCRIPTOR_SUFFIXES) for i in inputs):
        ids, vectors, paths = [], [], {}
        for path in inputs:
            file_ids, file_vectors = read_descriptors(path)
            ids += file_ids
            vectors.append(file_vectors)
            paths.update(zip(file_ids, read_image_paths(path) or []))
        if len(set(ids)) != len(ids):
            raise ValueError('the descriptor files repeat image ids')
        return ids, np.concatenate(vectors), paths
    images = find_images(inputs)
    vectors, failed = embedder(images)
    if failed:
        print(f'skipped {len(failed)} unreadable file(s): ' + ', '.join(str(images[i]) for i in failed), file=sys.stderr)
    failed_set = set(failed)
    kept = [p for i, p in enumerate(images) if i not in failed_set]
    ids = [image_id(p) for p in kept]
    return ids, np.stack(vectors), dict(zip(ids, map(str, kept)))
