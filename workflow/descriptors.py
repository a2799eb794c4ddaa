"""Image collections and descriptor files in the challenge's format (HDF5: ``vectors`` float32 N x D,
``image_names`` ids, UTF-8), written resumably and never half-written."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import warnings
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
    plain files, in a stable order, without repeats. Paths named explicitly (on the command line or
    in a list) are kept even if they are not images: embedding then skips and lists them.

    A symbolic link is an image of its own, named by the link (the name the user sees), even when
    two links lead to one file; a link that leads nowhere or in a loop is kept, so embedding skips
    and lists it under its own name. A folder that cannot be read, and a file whose name is not
    valid UTF-8 (ids and descriptor files hold UTF-8 text), are skipped with a warning naming them,
    before any work."""
    # Each found file as its real folder / its own name, so that the same file named twice (a folder and
    # one of its files) is kept once; the link itself is never followed. A folder is walked from its real
    # path: the walk follows no link to a folder, so every folder it finds is real as found. Resolving
    # each file's folder instead cost O(depth^2) a file (os.path.realpath lstats every prefix): 20 empty
    # files 2,000 folders deep took 6.2 CPU-s. Other paths are resolved once per folder.
    found: list[Path] = []
    real_path = path_resolver()

    def real(path: Path) -> Path:  # the file's real folder and its own name: a link stays a link
        return Path(real_path(str(path.parent))) / path.name

    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            found += _images_in(Path(os.path.realpath(path)))
        elif path.is_file() and path.suffix.lower() == '.txt':
            found += map(real, _listed_paths(path))
        elif path.exists() or path.is_symlink():  # a file, or a pipe or device that embedding will refuse
            found.append(real(path))
        elif glob.has_magic(item):
            found += map(real, matched_files(item))
        else:
            raise ValueError(f'no such file, folder or pattern: {item!r}')
    unique = [p for p in dict.fromkeys(found) if _utf8_name(p)]
    if not unique:
        raise ValueError(f'no images found in {list(map(str, inputs))}')
    return unique


def matched_files(pattern: str) -> list[Path]:
    """The files (and links that lead to no folder) a glob ``pattern`` matches (``**`` recursive), sorted."""
    try:
        matched = glob.glob(pattern, recursive=True)
    except RecursionError:  # Python's glob recurses a frame or two a folder: ``**`` fails ~500 folders deep
        raise ValueError(f'the pattern {pattern!r} reaches folders nested deeper than Python\'s glob can walk: '
                         'name the folder instead (folders are walked however deep)') from None
    return sorted(Path(p) for p in matched if Path(p).is_file() or (Path(p).is_symlink() and not Path(p).is_dir()))


def _images_in(folder: Path) -> list[Path]:
    """Files with an image's suffix under ``folder`` (see :func:`files_under`)."""
    return files_under(folder, IMAGE_SUFFIXES)


def path_resolver() -> Callable[[str], str]:
    """``os.path.realpath``, each path made from its parent's real path, remembered: realpath lstats every
    prefix of a path, so files each in a folder of its own down a 2,000-deep chain cost O(depth^3)
    (158 CPU-s for 2,000 one-pixel PNGs); here a path costs one lstat. A link, or a path ending in ``.``
    or ``..``, is resolved by realpath itself."""
    cache: dict[str, str] = {}

    def real(path: str) -> str:
        pending: list[tuple[str, str, str]] = []
        while path not in cache:
            parent, name = os.path.split(path)
            if not parent or name in ('', '.', '..'):
                cache[path] = os.path.realpath(path or '.')
                break
            pending.append((path, parent, name))
            path = parent
        for known, parent, name in reversed(pending):
            cache[known] = os.path.realpath(known) if os.path.islink(known) else os.path.join(cache[parent], name)
        return cache[pending[0][0] if pending else path]
    return real


def files_under(folder: Path, suffixes: set[str]) -> list[Path]:
    """Files with one of ``suffixes`` under ``folder``, sorted. Links to folders are not followed; anything
    else with such a name is kept (a pipe or a broken link is then skipped and listed when read). A
    sub-folder that cannot be read is skipped with a warning (``Path.rglob`` would hide it). Walked with a
    list, not recursion: a folder nested thousands deep (a crafted archive) made ``os.walk`` of Python
    3.11 fail with RecursionError, ending the whole run."""
    found, todo = [], [str(folder)]
    while todo:
        top = todo.pop()
        try:
            with os.scandir(top) as listing:
                entries = list(listing)
        except OSError as error:
            warnings.warn(f'skipped folder {_shown(error.filename or top)}: {error.strerror or error}; '
                          'nothing in it is included')
            continue
        for entry in entries:
            try:
                is_folder = entry.is_dir()
            except OSError:
                is_folder = False
            if is_folder:
                if not entry.is_symlink():
                    todo.append(entry.path)
            elif Path(entry.name).suffix.lower() in suffixes:
                found.append(Path(entry.path))
    return sorted(found)


def _utf8_name(path: Path) -> bool:
    """Whether ``path`` is valid UTF-8 text; if not, a warning names it (its undecodable bytes as \\xNN)."""
    try:
        str(path).encode('utf-8')
        return True
    except UnicodeEncodeError:
        warnings.warn(f'skipped {_shown(path)}: its name is not valid UTF-8, which ids and descriptor files '
                      'need: rename it')
        return False


def _shown(path: str | os.PathLike) -> str:
    """A file name as it can be printed: bytes that are not UTF-8 as \\xNN."""
    return "'" + os.fsencode(path).decode('utf-8', 'backslashreplace') + "'"


def _listed_paths(path: Path) -> list[Path]:
    """The paths in a ``.txt`` list, relative ones taken from the list's folder."""
    try:
        lines = [line.strip() for line in path.read_text(encoding='utf-8-sig').splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f'{str(path)!r} is not a UTF-8 text list of image paths ({e.reason} at byte {e.start})') from None
    return [Path(line) if Path(line).is_absolute() else path.parent / line for line in lines if line]


def image_ids(paths: Sequence[Path]) -> list[str]:
    """The ids of ``paths``; two images with the same id (same file name in two folders) are an error,
    since every output (descriptor file, Milvus, matches) is keyed by id."""
    seen: dict[str, Path] = {}
    for path in paths:
        other = seen.setdefault(name := image_id(path), path)
        if other != path:
            raise ValueError(f'two images have the same id {name!r}: {other} and {path}; '
                             'ids are file names without extension, so rename one')
    return list(seen)


def image_id(path: Path) -> str:
    """The challenge's id of an image: its file name without extension (Q00000, R000000)."""
    return path.stem


def read_descriptors(path: str | os.PathLike, dim: int | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, vectors float32 N x D) from a descriptor file, checked: any problem is a
    ``DescriptorFileError`` that names the file."""
    import h5py
    path = str(path)
    if not os.path.isfile(path):
        raise DescriptorFileError(f'descriptor file not found: {path!r}')
    try:
        with h5py.File(path, 'r') as f:
            if not isinstance(f.get('vectors'), h5py.Dataset) or not isinstance(f.get('image_names'), h5py.Dataset):
                raise DescriptorFileError(f"{path!r} has no 'vectors' and 'image_names' datasets "
                                          f'(it has {sorted(f.keys())})')
            check_stored_inside(path, f, 'vectors', 'image_names')
            # The types each is read as, checked before reading (a compound of strings hid 56 GiB of them).
            if f['vectors'].ndim != 2 or f['vectors'].dtype != np.float32:
                raise DescriptorFileError(f"{path!r}: 'vectors' must be float32 N x D, got "
                                          f"{f['vectors'].dtype} {f['vectors'].shape}")
            check_strings(path, f['image_names'])
            check_fits_in_memory(path, f['vectors'], f['image_names'])
            vectors, names = f['vectors'][()], f['image_names'][()]
    except DescriptorFileError:
        raise
    except (OSError, TypeError, ValueError, KeyError) as e:  # h5py's ways of saying the file is damaged
        raise DescriptorFileError(f'{path!r} is not a readable HDF5 file: {e}') from e
    try:
        ids = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError:
        raise DescriptorFileError(f"{path!r}: 'image_names' are not text") from None
    if len(ids) != len(vectors):
        raise DescriptorFileError(f"{path!r}: {len(ids)} image_names for {len(vectors)} vectors")
    if dim is not None and vectors.shape[1] != dim:
        raise DescriptorFileError(f'{path!r} holds {vectors.shape[1]}-d vectors, expected {dim}')
    if len(set(ids)) != len(ids):
        raise DescriptorFileError(f'{path!r} repeats image ids')
    if not np.isfinite(vectors).all():
        raise DescriptorFileError(f'{path!r} holds NaN or infinite vectors')
    norms = np.linalg.norm(vectors, axis=1)
    off = np.flatnonzero(np.abs(norms - 1) > 1e-3)
    if off.size:  # inner products of such vectors are not cosines: every score would be off
        raise DescriptorFileError(f'{path!r} holds vectors that are not L2-normalised (row {off[0]} has norm '
                                  f'{norms[off[0]]:.4g}); normalise them, as the operator does')
    return ids, vectors


def check_stored_inside(path: str, f, *names: str) -> None:
    """Refuse datasets whose data lie outside the descriptor file: HDF5 lets a dataset be a link to
    another file, keep its bytes in any other file (external storage) or map other files (a virtual
    dataset). A file from someone else could then make ids, paths or reports carry the contents of
    this user's files (an id read from ~/.ssh/id_rsa)."""
    import h5py
    for name in names:
        dataset = f[name]
        if (not isinstance(f.get(name, getlink=True), h5py.HardLink) or dataset.external
                or dataset.is_virtual):
            raise DescriptorFileError(f'{path!r}: {name!r} is stored outside the file (an HDF5 link, external '
                                      'or virtual dataset): descriptor files must hold their own data')


def check_strings(path: str, dataset) -> None:
    """Refuse a dataset that is not a 1-d list of strings (variable-length or fixed-length) before it is read."""
    import h5py
    if dataset.ndim != 1 or h5py.check_string_dtype(dataset.dtype) is None:
        raise DescriptorFileError(f"{path!r}: {dataset.name.lstrip('/')!r} must be a list of strings, got "
                                  f'{dataset.dtype} {dataset.shape}')


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable), or None if unknown."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# A descriptor file holds about what it declares: float32 vectors barely compress (gzip gains ~10 %),
# variable-length ids take more room in the file than in memory, fixed-length ids padded with zeros
# compress a few times. Data declared beyond this many times the file's size (plus 1 MiB) is not there:
# chunks never written (read as the fill value) or compressed zeros, a 12 KB file declaring 12 GiB.
MAX_EXPANSION = 16
# HDF5 inflates a compressed chunk whole to read any of it, and a chunk may be far larger than its dataset
# when a dimension can grow: 2 x 8 vectors in one 512 MiB chunk (a 532 KB file) took 572 MB to read.
# Honest chunks (h5py picks at most 1 MiB) cover a dataset with little padding: what the chunks cover is
# bounded by this many times the dataset, or one chunk of this size for a small dataset.
CHUNKS_SLACK, CHUNKS_FLOOR_BYTES = 4, 16 * 2**20
# HDF5 spends ~10 us on each chunk a read touches, and keeps ~4 KB for each chunk never written (read as the
# fill value, stored nowhere): 1,500 x 256 vectors in chunks of one float, never written (a 92 KB file),
# took 1.47 GB to read. Honest chunks hold a row or more (h5py picks 8 KB to 1 MiB; a writer appending
# rows, one 1 KB row of 256 float32), and an honest writer writes every chunk: a dataset may have this
# many chunks, or one per CHUNK_MIN_BYTES of its data, and this many never written.
CHUNKS_FLOOR_COUNT, CHUNK_MIN_BYTES, CHUNKS_UNWRITTEN = 4096, 1024, 64


def check_fits_in_memory(path: str, *datasets) -> None:
    """Refuse datasets whose arrays the file cannot plausibly hold (more than MAX_EXPANSION times its size)
    or that would not fit in the memory available now, from their shapes alone: a compressed file of a
    few KB can declare a 100 GB dataset of zeros, and reading it would make the kernel kill this process
    (or another one). Variable-length data is counted for plain strings (see ``variable_length_bytes``); any
    other (in a compound, an array, a sequence) is refused unread, and so are chunks far larger than the
    dataset or far more or many never written (see ``check_chunks``)."""
    import h5py
    for d in datasets:
        if d.dtype.hasobject and h5py.check_string_dtype(d.dtype) is None:
            raise DescriptorFileError(f"{path!r}: {d.name.lstrip('/')!r} holds variable-length data of type "
                                      f'{d.dtype} (in a compound, array or sequence), which a descriptor file never '
                                      'holds: only numbers and plain strings are read')
    need = sum(d.size * (d.dtype.itemsize if d.dtype.kind != 'O' else 64) + variable_length_bytes(d) for d in datasets)
    size = os.path.getsize(path)
    shapes = ', '.join(f'{d.name.lstrip("/")} {d.shape}' for d in datasets)
    if need > MAX_EXPANSION * size + 2**20:
        raise DescriptorFileError(f'{path!r} declares {need / 2**30:.1f} GiB of data ({shapes}) in a file of '
                                  f'{size:,} bytes: more than {MAX_EXPANSION} times its size, which no descriptor '
                                  'file holds (data never written, or compressed zeros)')
    free = available_memory()
    if free is not None and need > free:
        raise DescriptorFileError(f'{path!r} declares {need / 2**30:.1f} GiB of data ({shapes}), more than the '
                                  f'{free / 2**30:.1f} GiB of memory available')
    for d in datasets:  # after the sizes: counting the chunks written walks the file's index of them
        check_chunks(path, d)


def check_chunks(path: str, dataset) -> None:
    """Refuse a chunked dataset whose chunks cover far more than it holds (see CHUNKS_SLACK), that has far
    more chunks than its data needs, or many chunks never written (see CHUNKS_FLOOR_COUNT)."""
    if not dataset.chunks:
        return
    name, nbytes = dataset.name.lstrip('/'), dataset.size * dataset.dtype.itemsize
    per_dim = [-(-size // chunk) for size, chunk in zip(dataset.shape, dataset.chunks)]
    covered = math.prod(n * chunk for n, chunk in zip(per_dim, dataset.chunks))
    if covered * dataset.dtype.itemsize > max(CHUNKS_SLACK * nbytes, CHUNKS_FLOOR_BYTES):
        raise DescriptorFileError(f"{path!r}: {name!r} {dataset.shape} is stored in chunks of "
                                  f'{dataset.chunks}: reading it would inflate {covered * dataset.dtype.itemsize:,} '
                                  'bytes, far more than it holds (a crafted file)')
    count = math.prod(per_dim)
    if count > max(CHUNKS_FLOOR_COUNT, nbytes // CHUNK_MIN_BYTES):
        raise DescriptorFileError(f"{path!r}: {name!r} {dataset.shape} is stored in {count:,} chunks of "
                                  f'{dataset.chunks}, over the {max(CHUNKS_FLOOR_COUNT, nbytes // CHUNK_MIN_BYTES):,} '
                                  f'allowed for its {nbytes:,} bytes (a crafted file: each chunk costs time and memory to read)')
    try:
        unwritten = count - dataset.id.get_num_chunks()
    except (AttributeError, RuntimeError):  # an HDF5 older than 1.10.5 cannot count them
        return
    if unwritten > CHUNKS_UNWRITTEN:
        raise DescriptorFileError(f"{path!r}: {name!r} {dataset.shape} has {unwritten:,} of its {count:,} chunks "
                                  'never written (they would read as its fill value): a descriptor file writes its data')


def variable_length_bytes(dataset) -> int:
    """The total length of a dataset's variable-length strings, as HDF5 counts it without keeping them
    (``H5Dvlen_get_buf_size``, which h5py does not wrap); 0 for other datasets. Their count says nothing:
    a crafted file can point every string at one long stored string (1 MB of file, 200 MB read)."""
    if dataset.dtype.kind != 'O':
        return 0
    import ctypes

    import h5py.h5d
    try:  # dlsym on h5py's module finds it in the libhdf5 the module links to (Linux, macOS)
        buffer_size = ctypes.CDLL(h5py.h5d.__file__).H5Dvlen_get_buf_size
    except (OSError, AttributeError):  # elsewhere (Windows looks in the module alone): counted as before
        return 0
    buffer_size.argtypes = [ctypes.c_int64] * 3 + [ctypes.POINTER(ctypes.c_uint64)]
    size = ctypes.c_uint64()
    kind, space = dataset.id.get_type(), dataset.id.get_space()  # kept: HDF5 closes them when collected
    if buffer_size(dataset.id.id, kind.id, space.id, ctypes.byref(size)) < 0:
        return 0  # not variable-length data (object references): nothing more is read
    return size.value


def read_model(path: str | os.PathLike) -> dict | None:
    """The operator fingerprint a descriptor file records (``Isc.fingerprint``), or None (a file made
    elsewhere, or before files recorded it)."""
    return _json_attribute(path, 'model')


def write_descriptors(path: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
                      paths: Sequence[str] | None = None, model: dict | None = None,
                      postprocessing: dict | None = None) -> None:
    """Write a descriptor file through a temporary file, renamed when complete. ``paths`` (optional,
    an extra dataset) lets ``dedup`` look at the images again; ``model`` (the operator's
    fingerprint) and ``postprocessing`` (``NegativeEmbeddings.record``), JSON attributes, let later
    commands refuse to mix vectors of two models or post-processings."""
    import h5py
    with atomic_write(path) as tmp, h5py.File(tmp, 'w') as f:
        f.create_dataset('vectors', data=np.asarray(vectors, np.float32))
        # UTF-8 (the challenge's ids are ASCII, a subset): a photo named in any language keeps its name.
        f.create_dataset('image_names', data=np.array(list(ids), dtype=object), dtype=h5py.string_dtype('utf-8'))
        if paths is not None:
            f.create_dataset('image_paths', data=np.array(list(paths), dtype=object),
                             dtype=h5py.string_dtype('utf-8'))
        if model is not None:
            f.attrs['model'] = json.dumps(model, sort_keys=True)
        if postprocessing is not None:
            f.attrs[POSTPROCESSING] = json.dumps(postprocessing, sort_keys=True)


def read_postprocessing(path: str | os.PathLike) -> dict | None:
    """How a descriptor file's vectors were post-processed (its ``postprocessing`` attribute), or
    None for the network's raw output."""
    return _json_attribute(path, POSTPROCESSING)


def _json_attribute(path: str | os.PathLike, name: str) -> dict | None:
    """A descriptor file's JSON attribute ``name`` as a dict, None if absent; a malformed one names the file."""
    import h5py
    if not os.path.isfile(path):
        raise DescriptorFileError(f'descriptor file not found: {str(path)!r}')
    try:
        with h5py.File(str(path), 'r') as f:
            # One string: an array of them (or a string array as its type) could point each at one long
            # string (see variable_length_bytes).
            stored = f.attrs.get_id(name) if name in f.attrs else None
            if stored is not None and (stored.shape not in ((), (1,)) or h5py.check_string_dtype(stored.dtype) is None):
                raise DescriptorFileError(f'{str(path)!r}: malformed {name!r} attribute: {stored.dtype} of shape '
                                          f'{stored.shape}, not one JSON string')
            text = f.attrs.get(name)
    except OSError as e:
        raise DescriptorFileError(f'{str(path)!r} is not a readable HDF5 file: {e}') from e
    if text is None:
        return None
    try:
        record = json.loads(text.decode() if isinstance(text, bytes) else str(text))
    except ValueError as e:
        raise DescriptorFileError(f"{str(path)!r}: malformed {name!r} attribute: {e}") from e
    if not isinstance(record, dict):
        raise DescriptorFileError(f"{str(path)!r}: malformed {name!r} attribute: {text!r}")
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
    """The image paths a descriptor file records (one per id), or None; checked as ``read_descriptors``
    checks its datasets (a few KB of compressed file can declare tens of GB of paths)."""
    import h5py
    with h5py.File(str(path), 'r') as f:
        if not isinstance(f.get('image_paths'), h5py.Dataset):
            return None
        check_stored_inside(str(path), f, 'image_paths')
        check_strings(str(path), f['image_paths'])
        check_fits_in_memory(str(path), f['image_paths'])
        return [p.decode() if isinstance(p, bytes) else str(p) for p in f['image_paths'][()]]


def embed_resumable(images: Sequence[Path], output: str | os.PathLike,
                    embed: Callable[[list[Path]], tuple[list[np.ndarray], dict[int, str]]],
                    chunk_size: int = 64, progress: Callable[[int, bool], None] | None = None,
                    model: dict | None = None, postprocessing: dict | None = None) -> dict[int, str]:
    """Embed ``images`` into the descriptor file ``output``, resumably.

    Each finished chunk is saved at once as ``<output>.parts/<first index>.npz`` (temporary file,
    then rename), so an interruption loses at most the chunk in flight and a rerun skips what is
    saved, unless one of its images changed since (``file_stamp``): that chunk is embedded again,
    with a warning. The parts folder's manifest records the images, the chunk size, ``model`` (what makes
    the vectors, e.g. ``Isc.fingerprint``) and ``postprocessing``: a rerun with other images, another
    model or other post-processing is refused, so different vectors never mix; both are recorded in
    the descriptor file. When all chunks are there, the descriptor file is written
    (temporary file, rename) and the parts are removed. ``embed`` returns the vectors of the images
    it could read and {index within its list: reason} for those it could not. Returns
    {image index: reason} of the unreadable images. If no image could be read, nothing is written.
    """
    output = Path(output)
    parts = output.with_name(output.name + '.parts')
    ids = image_ids(images)
    plan = {'images': [str(p) for p in images], 'chunk_size': chunk_size, 'model': model,
            'postprocessing': postprocessing}
    # Taken before any image is read: a file changed after this is found changed by the next resume.
    stamps = np.array([file_stamp(p) for p in images], dtype=np.int64).reshape(len(images), len(STAMP_FIELDS))
    done = _resume(parts, plan, stamps, chunk_size)
    for start in range(0, len(images), chunk_size):
        if start not in done:
            vectors, failed = embed(list(images[start:start + chunk_size]))
            _save_part(parts, plan, start, vectors, failed, stamps[start:start + chunk_size])
        if progress:
            progress(min(start + chunk_size, len(images)), start in done)
    kept_ids, kept_paths, vectors, skipped = [], [], [], {}
    for start in range(0, len(images), chunk_size):
        with np.load(parts / f'{start}.npz') as part:
            failed = dict(zip((part['failed'] + start).tolist(), part['reasons'].tolist()))
            if len(part['vectors']):
                vectors.append(part['vectors'])
        for i in range(start, min(start + chunk_size, len(images))):
            if i in failed:
                skipped[i] = failed[i]
            else:
                kept_ids.append(ids[i])
                kept_paths.append(str(images[i]))
    if not kept_ids:
        shutil.rmtree(parts)
        first = next(iter(skipped.items()))
        raise ValueError(f'none of the {len(images)} images could be read (the first, {images[first[0]]}: '
                         f'{first[1]}); nothing was written')
    write_descriptors(output, kept_ids, np.concatenate(vectors), kept_paths, model, postprocessing)
    shutil.rmtree(parts)
    return skipped


# What says a file is the one a saved part was made from, without reading it: a file replaced or
# rewritten at its path (a re-download, a repaired copy) differs in one of them. ctime too, because
# ``cp -p``/``rsync -t``/``touch -r`` can set a new file's mtime back to the old one's (and its size
# may be the same); only the kernel sets ctime.
STAMP_FIELDS = ('st_size', 'st_mtime_ns', 'st_ctime_ns', 'st_ino')


def file_stamp(path: str | os.PathLike) -> tuple[int, ...]:
    """``STAMP_FIELDS`` of the file at ``path`` (links followed); all -1 where it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return (-1,) * len(STAMP_FIELDS)
    return tuple(int(getattr(info, field)) for field in STAMP_FIELDS)


def warn_changed(changed: int) -> None:
    if changed:
        warnings.warn(f'{changed} input(s) changed since the interrupted run: embedded again')


def _resume(parts: Path, plan: dict, stamps: np.ndarray, chunk_size: int) -> set[int]:
    """The chunks an interrupted run with the same ``plan`` saved in ``parts`` whose images are unchanged
    (``stamps``: ``file_stamp`` of each image now); another plan is refused."""
    if not parts.exists():
        return set()
    manifest = parts / 'manifest.json'
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or saved.get('images') != plan['images'] or saved.get('chunk_size') != plan['chunk_size']:
        raise ValueError(f'{str(parts)!r} holds an interrupted run over other images or chunk size: '
                         'rerun with the same inputs, or delete that folder to start again')
    if saved.get('model') != plan['model']:
        raise ValueError(f'{str(parts)!r} holds an interrupted run made with another model or settings '
                         f"({_differences(saved.get('model'), plan['model'])}): rerun with the same --checkpoint, "
                         '--model-name and options, or delete that folder to start again')
    if saved.get('postprocessing') != plan['postprocessing']:
        raise ValueError(f'{str(parts)!r} holds an interrupted run with other post-processing '
                         f"({describe_postprocessing(saved.get('postprocessing'))}): rerun with the same --negatives "
                         'and settings, or delete that folder to start again')
    done, changed = set(), 0
    for p in parts.glob('*.npz'):
        if not (p.stem.isdigit() and _readable_part(p)):
            continue
        start = int(p.stem)
        with np.load(p) as data:
            saved_stamps = data['stamps'] if 'stamps' in data.files else None
        now = stamps[start:start + chunk_size]
        if saved_stamps is not None and saved_stamps.shape == now.shape and (saved_stamps == now).all():
            done.add(start)
        else:  # made from other files than those at its paths now (or by a version that did not record them)
            changed += len(now) if saved_stamps is None or saved_stamps.shape != now.shape else \
                int((saved_stamps != now).any(axis=1).sum())
            p.unlink()
    warn_changed(changed)
    return done


def _readable_part(part: Path) -> bool:
    """Whether a saved chunk reads back whole; a damaged one is removed, so it is embedded again."""
    try:
        with np.load(part) as data:
            ok = {'vectors', 'failed', 'reasons'} <= set(data.files) and np.isfinite(data['vectors']).all()
    except Exception:  # noqa: BLE001 (numpy and zipfile fail in many ways on a damaged file)
        ok = False
    if not ok:
        warnings.warn(f'{str(part)!r} is damaged: embedding that chunk again')
        part.unlink()
    return ok


def _differences(before: dict | None, now: dict | None) -> str:
    before, now = before or {}, now or {}
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return ', '.join(f'{k}: {before.get(k)!r} then, {now.get(k)!r} now' for k in keys) or 'unknown'


def _save_part(parts: Path, plan: dict, start: int, vectors: Iterable[np.ndarray], failed: dict[int, str],
               stamps: np.ndarray) -> None:
    """Save one chunk with ``stamps`` (its images' ``file_stamp``s before they were read); the parts folder and its manifest appear with the first chunk, so a run that
    fails before any image is embedded leaves nothing behind."""
    if not parts.exists():
        parts.mkdir(parents=True)
        with atomic_write(parts / 'manifest.json') as tmp:
            tmp.write_text(json.dumps(plan))
    vectors = list(vectors)
    array = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)
    with atomic_write(parts / f'{start}.npz') as tmp, open(tmp, 'wb') as f:
        np.savez(f, vectors=array, failed=np.asarray(list(failed), dtype=np.int64),
                 reasons=np.asarray(list(failed.values()), dtype=str), stamps=stamps)
