"""Image collections and descriptor files in the challenge's format (HDF5: ``vectors`` float32 N x D,
``image_names`` ASCII ids), written resumably and never half-written."""
from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..atomic import atomic_write

POSTPROCESSING = 'postprocessing'  # the descriptor file attribute saying how vectors were post-processed
IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff', '.gif'}


class DescriptorFileError(ValueError):
    """A descriptor file that is missing, unreadable, or not in the expected format."""


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from folders (recursive), glob patterns, ``.txt`` lists (one path a line) and
    plain files, in a stable order, without repeats."""
    found: list[Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() == '.txt':
            base = path.parent
            lines = [line.strip() for line in path.read_text().splitlines()]
            found += [Path(line) if Path(line).is_absolute() else base / line for line in lines if line]
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            found += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            raise ValueError(f'no such file, folder or pattern: {item!r}')
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError(f'no images found in {list(map(str, inputs))}')
    return unique


def image_id(path: Path) -> str:
    """The challenge's id of an image: its file name without extension (Q00000, R000000)."""
    name = path.stem
    if not name.isascii():
        raise ValueError(f'image ids must be ASCII (the challenge format): {str(path)!r}')
    return name


def read_descriptors(path: str | os.PathLike, dim: int | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, vectors float32 N x D) from a descriptor file, checked."""
    import h5py
    path = str(path)
    if not os.path.isfile(path):
        raise DescriptorFileError(f'descriptor file not found: {path!r}')
    try:
        with h5py.File(path, 'r') as f:
            if 'vectors' not in f or 'image_names' not in f:
                raise DescriptorFileError(f"{path!r} has no 'vectors' and 'image_names' datasets "
                                          f'(it has {sorted(f.keys())})')
            vectors, names = f['vectors'][:], f['image_names'][:]
    except OSError as e:
        raise DescriptorFileError(f'{path!r} is not a readable HDF5 file: {e}') from e
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise DescriptorFileError(f"{path!r}: 'vectors' must be float32 N x D, got {vectors.dtype} {vectors.shape}")
    ids = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if len(ids) != len(vectors):
        raise DescriptorFileError(f"{path!r}: {len(ids)} image_names for {len(vectors)} vectors")
    if dim is not None and vectors.shape[1] != dim:
        raise DescriptorFileError(f'{path!r} holds {vectors.shape[1]}-d vectors, expected {dim}')
    if len(set(ids)) != len(ids):
        raise DescriptorFileError(f'{path!r} repeats image ids')
    return ids, vectors


def write_descriptors(path: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
                      paths: Sequence[str] | None = None, postprocessing: dict | None = None) -> None:
    """Write a descriptor file through a temporary file, renamed when complete. ``paths`` (optional,
    an extra dataset) lets ``dedup`` look at the images again; ``postprocessing`` (the record of
    ``NegativeEmbeddings.record``) is kept as the JSON attribute ``postprocessing``."""
    import h5py
    with atomic_write(path) as tmp, h5py.File(tmp, 'w') as f:
        if postprocessing is not None:
            f.attrs[POSTPROCESSING] = json.dumps(postprocessing, sort_keys=True)
        f.create_dataset('vectors', data=np.asarray(vectors, np.float32))
        f.create_dataset('image_names', data=np.array(list(ids), dtype=object), dtype=h5py.string_dtype('ascii'))
        if paths is not None:
            f.create_dataset('image_paths', data=np.array(list(paths), dtype=object),
                             dtype=h5py.string_dtype('utf-8'))


def read_postprocessing(path: str | os.PathLike) -> dict | None:
    """How a descriptor file's vectors were post-processed (its ``postprocessing`` attribute), or
    None for the network's raw output."""
    import h5py
    if not os.path.isfile(path):
        raise DescriptorFileError(f'descriptor file not found: {str(path)!r}')
    try:
        with h5py.File(str(path), 'r') as f:
            text = f.attrs.get(POSTPROCESSING)
    except OSError as e:
        raise DescriptorFileError(f'{str(path)!r} is not a readable HDF5 file: {e}') from e
    if text is None:
        return None
    try:
        record = json.loads(text.decode() if isinstance(text, bytes) else str(text))
    except ValueError as e:
        raise DescriptorFileError(f"{str(path)!r}: malformed 'postprocessing' attribute: {e}") from e
    if not isinstance(record, dict):
        raise DescriptorFileError(f"{str(path)!r}: malformed 'postprocessing' attribute: {text!r}")
    return record


def describe_postprocessing(record: dict | None) -> str:
    """A short description of a post-processing record, for messages."""
    if record is None:
        return 'raw, not post-processed'
    settings = ', '.join(f'{name}={record.get(name)}' for name in ('k', 'beta', 'iterations', 'dba_k', 'alpha'))
    return (f"post-processed with {record.get('negatives_count')} negatives "
            f"(content {str(record.get('negatives'))[:8]}), {settings}")


def check_same_postprocessing(sources: dict[str, dict | None]) -> dict | None:
    """The common post-processing of ``sources`` (name -> record); a clear error if they differ, as
    raw and post-processed vectors (or two post-processings) must never be compared."""
    records = list(sources.items())
    for name, record in records[1:]:
        if record != records[0][1]:
            raise ValueError(f'cannot mix descriptors post-processed differently: {records[0][0]} '
                             f'({describe_postprocessing(records[0][1])}) and {name} '
                             f'({describe_postprocessing(record)}); make them alike with the same --negatives '
                             'and settings (towhee-isc nes post-processes a descriptor file)')
    return records[0][1] if records else None


def read_image_paths(path: str | os.PathLike) -> list[str] | None:
    import h5py
    with h5py.File(str(path), 'r') as f:
        if 'image_paths' not in f:
            return None
        return [p.decode() if isinstance(p, bytes) else str(p) for p in f['image_paths'][:]]


def embed_resumable(images: Sequence[Path], output: str | os.PathLike,
                    embed: Callable[[list[Path]], tuple[list[np.ndarray], list[int]]],
                    chunk_size: int = 64, progress: Callable[[int, int], None] | None = None,
                    postprocessing: dict | None = None) -> list[int]:
    """Embed ``images`` into the descriptor file ``output``, resumably.

    Each finished chunk is saved at once as ``<output>.parts/<first index>.npz`` (temporary file,
    then rename), so an interruption loses at most the chunk in flight and a rerun skips what is
    saved. When all chunks are there, the descriptor file is written (temporary file, rename) and
    the parts are removed (``postprocessing`` is recorded in the file). ``embed`` returns the vectors of the images it could read and the
    indices (within its list) of those it could not. Returns the indices of unreadable images.
    """
    output = Path(output)
    parts = output.with_name(output.name + '.parts')
    parts.mkdir(parents=True, exist_ok=True)
    ids = [image_id(p) for p in images]
    if len(set(ids)) != len(ids):
        seen: dict[str, Path] = {}
        clash = next((p, seen[i]) for p, i in zip(images, ids) if seen.setdefault(i, p) != p)
        raise ValueError(f'two images have the same id {image_id(clash[0])!r}: {clash[1]} and {clash[0]}')
    manifest = parts / 'manifest.json'
    plan = {'images': [str(p) for p in images], 'chunk_size': chunk_size}
    if postprocessing is not None:  # parts made with other negatives or settings must not be reused
        plan['postprocessing'] = postprocessing
    plan = json.dumps(plan)
    if manifest.is_file() and manifest.read_text() != plan:
        raise ValueError(f'{str(parts)!r} holds an interrupted run over other images, chunk size or post-processing: '
                         'rerun with the same inputs, or delete that folder to start again')
    manifest.write_text(plan)
    done = {int(p.stem) for p in parts.glob('*.npz')}
    for start in range(0, len(images), chunk_size):
        if start not in done:
            chunk = list(images[start:start + chunk_size])
            vectors, failed = embed(chunk)
            _save_part(parts, start, vectors, failed)
        if progress:
            progress(min(start + chunk_size, len(images)), start in done)
    kept_ids, kept_paths, vectors, skipped = [], [], [], []
    for start in range(0, len(images), chunk_size):
        with np.load(parts / f'{start}.npz') as part:
            failed = set((part['failed'] + start).tolist())
            if len(part['vectors']):
                vectors.append(part['vectors'])
        for i in range(start, min(start + chunk_size, len(images))):
            if i in failed:
                skipped.append(i)
            else:
                kept_ids.append(ids[i])
                kept_paths.append(str(images[i]))
    write_descriptors(output, kept_ids, np.concatenate(vectors) if vectors else np.zeros((0, 256), np.float32),
                      kept_paths, postprocessing)
    shutil.rmtree(parts)
    return skipped


def _save_part(parts: Path, start: int, vectors: Iterable[np.ndarray], failed: Sequence[int]) -> None:
    vectors = list(vectors)
    array = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)
    with atomic_write(parts / f'{start}.npz') as tmp, open(tmp, 'wb') as f:
        np.savez(f, vectors=array, failed=np.asarray(failed, dtype=np.int64))
