"""Inference backends: eager PyTorch (any device, fp32/fp16/bf16) and ONNX Runtime (CPU, fp32).

Both take a preprocessed (N, 3, S, S) float32 CPU tensor and return (N, D) float32 L2-normalised
embeddings as a numpy array. ONNX Runtime runs the operator's own ONNX export, cached on disk
under a key made from the weights, so the export happens once per checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import os
import sys
import warnings
from pathlib import Path
import threading
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write, exclusive, read_memo, remove_partials, update_memo
from .defaults import cpu_count
from .model import IscNet
from .progress import shown

BACKENDS = ('auto', 'torch', 'onnxruntime')
PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
# Images per forward pass when the user does not say, measured with benchmarks/throughput.py on
# 2 cores: ONNX Runtime 6.6 images/s at batch 1 and 2, 6.0 at 4, 5.5 at 8; eager PyTorch 4.0 at 1,
# 4.3 at 4. A GPU wants many (not measured here: no GPU was available).
DEFAULT_BATCH = {('torch', 'cpu'): 1, ('onnxruntime', 'cpu'): 1, ('torch', 'cuda'): 32}
# In Triton, Towhee's pipeline calls the operator with one image at a time, and Triton's dynamic batching
# groups the calls; for a list, the operator sends this many per request: Triton's default max_batch_size
# for an ONNX model whose config does not say one (TritonGPUConfig(max_batch_size=...) raises it).
TRITON_BATCH = 4


def in_daemon_thread(work: Callable[[], Any]) -> Future:
    """``work()`` run in a thread of its own that never holds the process up: a Ctrl-C leaves it
    behind, where a ``ThreadPoolExecutor``'s thread is waited for, when its ``with`` ends and again at
    exit (a decoder between two samples far apart kept the first Ctrl-C waiting 128 s)."""
    future: Future = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(work())
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits)
                future.set_exception(e)
    threading.Thread(target=run, name='isc-prepare', daemon=True).start()
    return future


def result_of(future: Future) -> Any:
    """``future.result()``, waited for in short steps, so a Ctrl-C is taken at once in the main thread."""
    while True:
        try:
            return future.result(timeout=0.2)
        except FutureTimeout:
            continue


def batches(items: Iterator[Any], batch_size: int, max_bytes: int | None = None) -> Iterator[list[Any]]:
    """Lists of the next ``batch_size`` items of ``items``; with ``max_bytes``, a list also ends once its
    arrays (``nbytes``) hold that much, so large video frames do not pile up (one item always passes)."""
    while True:
        batch, held = [], 0
        for item in items:
            batch.append(item)
            held += getattr(item, 'nbytes', 0)
            if len(batch) == batch_size or (max_bytes is not None and held >= max_bytes):
                break
        if not batch:
            return
        yield batch


def padded_batch(n: int, batch_size: int) -> int:
    """Rows to run a batch of ``n`` images as on CUDA: the next power of two, at most ``max(n, batch_size)``.
    cuDNN plans each convolution anew for each batch shape it meets, about 1.5 s for EfficientNetV2-M on
    an H200; `video embed` hands the operator each video's frames, a new remainder per video, and ran at
    a fifth of the operator's rate. Padded, a run meets at most log2(batch_size) + 1 shapes."""
    return min(1 << max(n - 1, 0).bit_length(), max(n, batch_size))


class TorchBackend:
    """Eager PyTorch. On CUDA: channels_last, pinned host memory and non-blocking copies."""
    name = 'torch'

    def __init__(self, model: IscNet, device: torch.device, precision: str = 'fp32'):
        self.device = device
        self.dtype = PRECISIONS[precision]
        self.memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
        if self.dtype != torch.float32:
            model = copy.deepcopy(model)  # keep the caller's fp32 weights for export
        self.model = model.to(device=device, dtype=self.dtype, memory_format=self.memory_format).eval()

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        if batch.device.type == 'cpu' and self.device.type == 'cuda':  # from pinned memory, not blocking
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = batch.to(dtype=self.dtype, memory_format=self.memory_format)
        with torch.inference_mode():
            out = self.model(batch)
        # Reduced precision leaves the norm off 1 by ~1e-3: normalise again in fp32.
        return (F.normalize(out.float(), dim=1) if self.dtype != torch.float32 else out).cpu().numpy()


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU, running an ONNX file of the model (fp32, so exact to ~1e-5)."""
    name = 'onnxruntime'

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_count()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.numpy()})[0]


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("backend='onnxruntime' needs ONNX Runtime: pip install onnxruntime onnx") from e
    return onnxruntime


def resolve_backend(backend: str, device: torch.device, precision: str) -> str:
    """The backend to use: 'auto' is ONNX Runtime for fp32 on the CPU when installed, else PyTorch."""
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}: choose one of {list(BACKENDS)}')
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}: choose one of {list(PRECISIONS)}')
    if backend == 'auto':
        if device.type != 'cpu' or precision != 'fp32':
            return 'torch'
        try:
            import_onnxruntime()
        except ImportError:
            return 'torch'
        return 'onnxruntime'
    if backend == 'onnxruntime':
        if device.type != 'cpu':
            raise ValueError(f"backend='onnxruntime' runs on the CPU; for {device} use backend='torch'")
        if precision != 'fp32':
            raise ValueError(f"backend='onnxruntime' runs fp32 only; precision={precision!r} needs backend='torch'")
        import_onnxruntime()
    return backend


def export_onnx(model: IscNet, img_size: int, path: str | os.PathLike) -> None:
    """Write ``model`` (on the CPU, fp32) as ONNX: opset 17, input 'images' (N, 3, S, S) with a
    dynamic batch axis, output 'embeddings' (N, D) with D fixed in the graph."""
    example = torch.zeros(1, 3, img_size, img_size)
    torch.onnx.export(model, (example,), str(path), input_names=['images'], output_names=['embeddings'],
                      dynamic_axes={'images': {0: 'batch'}, 'embeddings': {0: 'batch'}},
                      opset_version=17, dynamo=False)
    # The exporter cannot infer the vector size through the L2 division and leaves it symbolic; Triton
    # (Towhee's model repository) reads the output shape from the graph, so state it.
    import onnx
    graph = onnx.load(str(path))
    size = graph.graph.output[0].type.tensor_type.shape.dim[1]
    size.Clear()
    size.dim_value = model.embedding_dim
    onnx.save(graph, str(path))


def weights_key(model: IscNet, img_size: int) -> str:
    """A content key for the model: architecture, input size and every weight's bytes."""
    digest = hashlib.sha256(f'{model.arch}|{img_size}'.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}'.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def onnx_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / 'towhee_isc' / 'onnx'


def cached_onnx(model: IscNet, img_size: int, key: str | None = None, cache_dir: Path | None = None) -> Path:
    """The ONNX export of ``model``, made once and kept in ``torch.hub.get_dir()/towhee_isc/onnx``
    under its weights' content ``key``, with a SHA-256 of the file beside it.

    Written atomically, so concurrent processes never read a partial file, and under a lock on the
    cache folder, so processes starting together (Ray actors, workers) export once: the others wait
    and use that export. A cached file that no longer matches its checksum (damaged on disk, truncated,
    edited) is exported again.
    """
    key = key or weights_key(model, img_size)
    cache_dir = cache_dir or onnx_cache_dir()
    path = _onnx_path(cache_dir, model.arch, img_size, key)
    checksum = path.with_suffix('.sha256')
    if _verified(path, checksum):
        return path
    with exclusive(cache_dir):
        if _verified(path, checksum):  # another process exported it while this one waited
            return path
        remove_partials(path)  # left by an export that was killed
        remove_partials(checksum)
        if path.exists():
            warnings.warn(f'the cached ONNX export {str(path)!r} is damaged or unverified: exporting it again')
        if shown():  # the first use's silent pause after the download bar: say what it is
            print(f'exporting the network to ONNX for the CPU (once per model, kept in {str(cache_dir)!r})',
                  file=sys.stderr, flush=True)
        with atomic_write(path) as tmp:
            export_onnx(model, img_size, tmp)
            digest = file_sha256(tmp)
        with atomic_write(checksum) as tmp:
            tmp.write_text(digest + '\n')
    return path


def _onnx_path(cache_dir: Path, arch: str, img_size: int, key: str) -> Path:
    return cache_dir / f'{arch.replace("/", "_")}-{img_size}-{key}.onnx'


def exported_onnx(arch: str, img_size: int, key: str) -> Path | None:
    """The cached export of the network whose weights' content key is ``key``, if there is one and it
    matches its checksum: ONNX Runtime can run it without the network being built."""
    path = _onnx_path(onnx_cache_dir(), arch, img_size, key)
    return path if _verified(path, path.with_suffix('.sha256')) else None


# Which weights file gave which weights key: the key hashes the built network's weights, so knowing it
# from the file's own SHA-256 (~0.3 s for the published 200 MB) lets a process that finds the export
# cached skip building the network (~1-3 s) and importing timm and torchvision (~5.5 CPU-s).
KEYS_KEPT = 1000


def _keys_path() -> Path:
    return onnx_cache_dir() / 'weights-keys.json'


def _keys() -> dict[str, str]:
    return {k: v for k, v in read_memo(_keys_path()).items() if isinstance(v, str)}


def _memo_entry(file_digest: str, arch: str, img_size: int) -> str:
    return f'{file_digest}|{arch}|{img_size}'


def remembered_key(file_digest: str, arch: str, img_size: int) -> tuple[str, str] | None:
    """(weights key, the network's own arch name) remembered for a weights file of SHA-256
    ``file_digest`` built as backbone ``arch`` at ``img_size`` px, or None."""
    key, _, net_arch = _keys().get(_memo_entry(file_digest, arch, img_size), '').partition('|')
    return (key, net_arch) if key and net_arch else None


def remember_key(file_digest: str, arch: str, img_size: int, key: str, net_arch: str) -> None:
    """Keep ``key`` for the next process (the newest ``KEYS_KEPT``); a folder that cannot be written
    only costs that process the network's build."""
    entry = _memo_entry(file_digest, arch, img_size)

    def add(keys: dict) -> dict:
        keys.pop(entry, None)  # re-inserted last: the newest are kept
        keys[entry] = f'{key}|{net_arch}'
        return dict(list(keys.items())[-KEYS_KEPT:])
    update_memo(_keys_path(), add)


def _verified(path: Path, checksum: Path) -> bool:
    return path.is_file() and checksum.is_file() and checksum.read_text().strip() == file_sha256(path)


def onnx_backend(model: IscNet, img_size: int, key: str, threads: int | None = None) -> OnnxRuntimeBackend | None:
    """ONNX Runtime on the cached export; None (with a warning) when the cache folder cannot be
    written or the cached model cannot be loaded, so the caller falls back to PyTorch."""
    try:
        return OnnxRuntimeBackend(cached_onnx(model, img_size, key), threads)
    except OSError as e:
        warnings.warn(f'cannot use the ONNX cache ({e}); running PyTorch instead (slower on the CPU). '
                      'Set TORCH_HOME to a writable folder to get ONNX Runtime back.')
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
