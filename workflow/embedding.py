"""The copy-detection workflow as functions: embed images to arrays or to a descriptor file, load
descriptors from files or images. Search, indexing and dedup live in ``matching``, metrics in
``metrics``; the ``towhee-isc`` command only calls these."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .descriptors import embed_resumable, find_images, image_id, read_descriptors, read_image_paths, read_postprocessing

DESCRIPTOR_SUFFIXES = ('.h5', '.hdf5')


class Embedder:
    """The operator, made on first use (``Isc`` arguments), that skips unreadable images unless
    ``strict``. Photos are turned upright by their EXIF orientation, as people see them. With
    ``negatives=`` (and the ``nes_*`` settings) the vectors are post-processed as the operator does."""

    def __init__(self, strict: bool = False, **isc_kwargs):
        self.strict = strict
        self.isc_kwargs = {'exif_transpose': True, **isc_kwargs}
        self._op = None
        if isc_kwargs.get('negatives') is not None:  # read once here: its record is needed before the operator
            from ..postprocess import ALPHA, DBA_K, NegativeEmbeddings
            if not isinstance(isc_kwargs['negatives'], NegativeEmbeddings):
                self.isc_kwargs['negatives'] = NegativeEmbeddings(
                    isc_kwargs['negatives'], isc_kwargs.get('nes_dba_k', DBA_K), isc_kwargs.get('nes_alpha', ALPHA))

    @property
    def postprocessing(self) -> dict | None:
        """How the vectors it makes are post-processed (the record descriptor files keep), None if raw."""
        negatives = self.isc_kwargs.get('negatives')
        if negatives is None:
            return None
        from ..postprocess import BETA, ITERATIONS, K
        return negatives.record(self.isc_kwargs.get('nes_k', K), self.isc_kwargs.get('nes_beta', BETA),
                                self.isc_kwargs.get('nes_iterations', ITERATIONS))

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

    skipped = embed_resumable(images, output, embedder, chunk_size, progress, getattr(embedder, 'postprocessing', None))
    if bar:
        bar.close()
    seconds = time.perf_counter() - started
    return len(images) - len(skipped), [images[i] for i in skipped], embedded / seconds if seconds else 0.0


def inputs_postprocessing(inputs: Sequence[str], embedder: Embedder, label: str = 'inputs') -> dict[str, dict | None]:
    """How each input's vectors are post-processed (name -> record, None for raw): descriptor files
    say it in their attribute; images embedded now get the embedder's."""
    if all(str(i).lower().endswith(DESCRIPTOR_SUFFIXES) for i in inputs):
        return {str(path): read_postprocessing(path) for path in inputs if Path(path).is_file()}
    return {f'the {label} embedded now': embedder.postprocessing}


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
