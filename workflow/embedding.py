"""The copy-detection workflow as functions: embed images to arrays or to a descriptor file, load
descriptors from files or images. Search, indexing and dedup live in ``matching`` and ``milvus``,
metrics in ``metrics``; the ``towhee-isc`` command only calls these."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import sole_writer
from ..images import ImageError
from ..progress import Progress
from .descriptors import (embed_resumable, find_images, image_ids, read_descriptors, read_image_paths,
                          read_model, read_postprocessing)

DESCRIPTOR_SUFFIXES = ('.h5', '.hdf5')


class Embedder:
    """The operator (``Isc`` arguments), made on first use, that skips unreadable images unless
    ``strict``. Photos are turned upright by their EXIF orientation, as people see them.

    Only ``ImageError`` (one image cannot be used) skips an image; any other error (a missing
    checkpoint, a bad device, broken weights) concerns every image and propagates at once. With
    ``negatives=`` (and the ``nes_*`` settings) the vectors are post-processed as the operator does.
    """

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

    def __call__(self, paths: list[Path]) -> tuple[list[np.ndarray], dict[int, str]]:
        """Vectors of the readable images, and {index: reason} for the others (an error if ``strict``)."""
        op = self.op  # settings errors surface here, before any image is judged
        if self.strict:
            return op(paths), {}
        results = op.embed_each(paths)
        return ([r for r in results if not isinstance(r, ImageError)],
                {i: str(r) for i, r in enumerate(results) if isinstance(r, ImageError)})

    def with_progress(self, paths: list[Path], chunk_size: int = 64) -> tuple[list[np.ndarray], dict[int, str]]:
        """``self(paths)`` a chunk at a time, drawing the 'embedding' progress line as ``embed`` does: for
        search, index and dedup given images, whose embedding is most of their time."""
        vectors, failed = [], {}
        with Progress(len(paths), 'embedding', unit='img', delay=0) as progress:
            for start in range(0, len(paths), chunk_size):
                chunk_vectors, chunk_failed = self(paths[start:start + chunk_size])
                vectors += chunk_vectors
                failed.update({start + i: reason for i, reason in chunk_failed.items()})
                progress.advance(len(paths[start:start + chunk_size]))
        return vectors, failed


def embed_collection(inputs: Sequence[str], output: str, embedder: Embedder, chunk_size: int = 64,
                     quiet: bool = False) -> tuple[int, dict[Path, str], float]:
    """Embed images into a descriptor file, resumably.

    Returns (rows written, {skipped file: reason}, images/s). A second embed into the same ``output``
    while this one runs fails at once (``atomic.Busy``): the two would share, then remove, its parts folder.
    """
    with sole_writer(output, 'towhee-isc embed'):
        return _embed_collection(inputs, output, embedder, chunk_size, quiet)


def _embed_collection(inputs: Sequence[str], output: str, embedder: Embedder, chunk_size: int,
                      quiet: bool) -> tuple[int, dict[Path, str], float]:
    images = find_images(inputs)
    image_ids(images)  # two images with one id: refused before anything starts
    model = embedder.op.fingerprint  # builds the operator: a settings error stops here, before any output
    reached = 0

    def advance(done: int, resumed: bool) -> None:
        """``done`` images are finished; the last chunk was saved by an earlier run if ``resumed``."""
        nonlocal reached
        progress.advance(done - reached, earlier=resumed)
        reached = done

    # The rate (returned, and printed by the command) is the bar's: images embedded by this run per second.
    with Progress(len(images), 'embedding', unit='img', quiet=quiet, delay=0) as progress:
        skipped = embed_resumable(images, output, embedder, chunk_size, advance, model, embedder.postprocessing)
    return len(images) - len(skipped), {images[i]: reason for i, reason in skipped.items()}, progress.rate


def inputs_postprocessing(inputs: Sequence[str], embedder: Embedder, label: str = 'inputs') -> dict[str, dict | None]:
    """How each input's vectors are post-processed (name -> record, None for raw): descriptor files
    say it in their attribute; images embedded now get the embedder's."""
    records = {str(path): read_postprocessing(path) for path in inputs
               if str(path).lower().endswith(DESCRIPTOR_SUFFIXES) and Path(path).is_file()}
    if any(not str(i).lower().endswith(DESCRIPTOR_SUFFIXES) for i in inputs):
        records[f'the {label} embedded now'] = embedder.postprocessing
    return records


def load_descriptors(inputs: Sequence[str], embedder: Embedder, models: dict[str, dict | None] | None = None,
                     read: set[str] | None = None) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Descriptor files as they are and images embedded now, in one set: (ids, vectors, id -> image path).

    Ids must be unique across everything, and every part must come from the same model (descriptor
    files record it): mixing two models' vectors is refused. Pass the same ``models`` dict to
    several calls (queries, then references) to check across them too. ``read``, if given, gets the
    paths of the images embedded now (as opposed to paths a descriptor file names).
    """
    models = {} if models is None else models
    files = [str(i) for i in inputs if str(i).lower().endswith(DESCRIPTOR_SUFFIXES)]
    others = [i for i in inputs if not str(i).lower().endswith(DESCRIPTOR_SUFFIXES)]
    ids, vectors, paths = [], [], {}
    for path in files:
        file_ids, file_vectors = read_descriptors(path)
        ids += file_ids
        vectors.append(file_vectors)
        paths.update(zip(file_ids, read_image_paths(path) or []))
        models[path] = read_model(path)
    if others:
        images = find_images(others)
        image_ids(images)  # clashing names are an error before anything is embedded
        models['the images embedded now'] = embedder.op.fingerprint
        check_same_model(models)
        embedded, failed = embedder.with_progress(images)
        if failed:
            print(f'skipped {len(failed)} unreadable file(s):', file=sys.stderr)
            for i, reason in failed.items():
                print(f'  {images[i]}: {reason}', file=sys.stderr)
        kept = [p for i, p in enumerate(images) if i not in failed]
        kept_ids = image_ids(kept)
        ids += kept_ids
        paths.update(zip(kept_ids, map(str, kept)))
        if read is not None:
            read.update(map(str, kept))
        if embedded:
            vectors.append(np.stack(embedded))
    check_same_model(models)
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise ValueError(f'the inputs repeat image ids ({", ".join(repeated)}): every image needs its own id')
    if not ids:
        raise ValueError(f'no descriptors in {list(map(str, inputs))}')
    return ids, np.concatenate(vectors), paths


def check_same_model(models: dict[str, dict | None]) -> None:
    """Refuse vectors of different models (weights or input size) in one comparison; sources that do
    not record their model (None) are taken on trust."""
    known = [(source, (m.get('weights'), m.get('img_size'))) for source, m in models.items() if m]
    for source, key in known[1:]:
        if key != known[0][1]:
            raise ValueError(f'{known[0][0]} and {source} were made by different models (weights {known[0][1][0]} '
                             f'at {known[0][1][1]} px vs {key[0]} at {key[1]} px): their vectors cannot be compared; '
                             'embed both with the same model')
