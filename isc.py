"""The Towhee operator ``image-embedding/isc``: images -> 256-d ISC21 copy-detection descriptors."""
from __future__ import annotations

import copy
import os
import shutil
import warnings
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Iterable, Iterator

import numpy as np
import torch

with warnings.catch_warnings():  # Towhee's own imports warn about pkg_resources and pydantic: not ours to fix
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    from towhee import register
    from towhee.operator import NNOperator

from .backends import (DEFAULT_BATCH, TRITON_BATCH, batches, cached_onnx, export_onnx, in_daemon_thread, padded_batch,
                       resolve_backend, result_of)
from .defaults import cpu_count
from .images import ImageError, image_size, is_jpeg, to_pil_rgb
from .model import IscNet, preprocess, save_checkpoint
from .network import IscModel, ModelSpec, accelerated_model
from .postprocess import ALPHA, BETA, DBA_K, ITERATIONS, K, NegativeEmbeddings, same_model
from .weights import DEFAULT_WEIGHTS, WEIGHTS

_EXPORT_SUFFIX = {'pytorch': '.pth', 'torchscript': '.pt', 'onnx': '.onnx'}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> ``cuda`` when available, else ``cpu``; anything else must name an available device."""
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f'device {str(device)!r} requested but no CUDA device is available; use device=\'cpu\'')
        if device.index is not None and device.index >= count:
            raise ValueError(f'device {str(device)!r} requested but only {count} CUDA device(s) exist')
    elif device.type != 'cpu':
        raise ValueError(f"unsupported device {str(device)!r}: use 'cpu', 'cuda' or 'cuda:N'")
    return device


class Isc(NNOperator):
    """ISC21 1st-place copy-detection descriptor (EfficientNetV2-M, GeM, 256-d, L2-normalised).

    Args:
        model_name: published weights to use when no ``checkpoint_path`` is given
            (``'isc_ft_v107'``, the default, or ``'isc_selfsup_v98'``); downloaded once into
            ``torch.hub.get_dir()/checkpoints``.
        checkpoint_path: a local checkpoint in the official format, or a plain state dict.
        timm_backbone: timm architecture; overrides the checkpoint's ``arch`` and is required for a
            plain state dict.
        img_size: square input side S; defaults to the checkpoint's ``args.input_size`` (512).
        skip_preprocess: inputs are already preprocessed float (3, S, S) / (N, 3, S, S) arrays.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:N'`` or a ``torch.device``; None picks CUDA when available.
        batch_size: images per forward pass when called with a list; None picks the measured best
            for the backend (1 on the CPU, 32 on CUDA; 4 per request when the network runs in Triton).
        backend: ``'auto'`` (ONNX Runtime for fp32 on the CPU when installed, else PyTorch),
            ``'onnxruntime'`` or ``'torch'``. Both give the same embeddings within 1e-4.
        precision: ``'fp32'`` (default, exact), ``'fp16'`` or ``'bf16'`` (PyTorch backend; for GPUs).
        fast_decode: decode JPEG files at a reduced scale (DCT domain, never below 2S) before resizing:
            much faster for large photos; changes the pixels about as much as re-encoding the JPEG at
            quality 90 does (see README).
        decode_on_device: decode JPEG files with torchvision on ``device`` (nvJPEG on CUDA) and resize
            there (bilinear, antialiased); not bit-exact with the PIL path (see README). Other files
            and inputs take the usual path.
        exif_transpose: turn image files upright by their EXIF orientation (phone photos). Off by
            default, as in the reference code.
        negatives: post-process every returned vector as the winner did (negative embedding
            subtraction, see ``postprocess.py``) with these negatives: a descriptor file (HDF5
            ``vectors``/``image_names``), an (M, D) float32 array of unit rows, or a
            ``NegativeEmbeddings``. None (default): the network's raw output.
        nes_k, nes_beta, nes_iterations: the subtraction's neighbours, weight and repeats (10, 0.35, 1).
        nes_dba_k, nes_alpha: the negatives' augmentation (10, 3.0); a ``NegativeEmbeddings`` brings its own.
        num_threads: CPU threads for inference (ONNX Runtime's intra-op threads; when given, also
            PyTorch's, which is process-wide); None uses every core this process may use. A Ray
            actor passes the CPUs reserved for it.

    Calling it with one image returns a float32 ``np.ndarray`` of shape (256,) with L2 norm 1; with a
    list (or an (N, 3, S, S) batch when ``skip_preprocess``) it returns a list of those, in order.
    Images may be ``towhee.types.Image`` or ``towhee.types.VideoFrame`` (its ``mode`` is honoured: BGR
    from ``ops.image_decode()``),
    uint8 ``np.ndarray`` in RGB (HxWx3, HxW grey, HxWx4 with alpha dropped), ``PIL.Image`` of any mode
    (16-bit and float modes scaled to 8 bits), a file path, or the bytes of an image file (``bytes``, or
    a 1-d uint8 array of them: what Towhee's Triton client can send).

    Raises ``images.ImageError`` (a ValueError) for an image that cannot be used, naming it; other
    ValueError/TypeError for bad settings or input types. The operator keeps working afterwards.

    The network with its weights is ``self.model``, a ``network.IscModel`` (``self.net`` is its
    ``IscNet``), made through Towhee's ``accelerate``: in a Triton model repository built by
    ``towhee.build_pipeline_model`` it is a client of the repository's ONNX model instead, and the
    operator there only preprocesses (see README, "Serve it with Triton").

    It pickles (for Ray and multiprocessing): the ONNX Runtime session is left out and rebuilt from
    the cached export on unpickling.
    """

    supported_formats = tuple(_EXPORT_SUFFIX)

    def __init__(self, model_name: str = DEFAULT_WEIGHTS, checkpoint_path: str | os.PathLike | None = None,
                 timm_backbone: str | None = None, img_size: int | None = None,
                 skip_preprocess: bool = False, device: str | torch.device | None = None,
                 batch_size: int | None = None, backend: str = 'auto', precision: str = 'fp32',
                 fast_decode: bool = False, decode_on_device: bool = False, exif_transpose: bool = False,
                 negatives: str | os.PathLike | np.ndarray | NegativeEmbeddings | None = None,
                 nes_k: int = K, nes_beta: float = BETA, nes_iterations: int = ITERATIONS,
                 nes_dba_k: int = DBA_K, nes_alpha: float = ALPHA,
                 num_threads: int | None = None):
        super().__init__()
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f'batch_size must be a positive int or None, got {batch_size!r}')
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f'num_threads must be a positive int or None (every core), got {num_threads!r}')
        if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int)
                                     or not 32 <= img_size <= 4096):
            raise ValueError(f'img_size must be an int between 32 and 4096, got {img_size!r}')
        self.device = resolve_device(device)
        backend = resolve_backend(backend, self.device, precision)
        self.spec = ModelSpec.resolve(model_name, checkpoint_path, timm_backbone, img_size)
        self.model_name = self.spec.name
        self.img_size: int = self.spec.img_size
        self.skip_preprocess = skip_preprocess
        self.fast_decode = fast_decode
        self.decode_on_device = decode_on_device
        self.exif_transpose = exif_transpose
        self.precision = precision
        self.num_threads = num_threads
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        # The network and its weights: an IscModel, or inside a Triton repository built by
        # towhee.build_pipeline_model a client of its ONNX model (see network.py).
        self.model = accelerated_model(self.spec, self.device, backend, precision, num_threads)
        # After the weights: published weights that cannot be downloaded are said before timm is imported.
        self.transform = preprocess(self.spec.arch, self.img_size)
        default_batch = (DEFAULT_BATCH[(self.model.backend.name, self.device.type)]
                         if isinstance(self.model, IscModel) else TRITON_BATCH)
        self.batch_size: int = batch_size or default_batch
        self.nes, self.postprocessing = self._negatives(negatives, nes_k, nes_beta, nes_iterations, nes_dba_k, nes_alpha)

    def _negatives(self, negatives, k: int, beta: float, iterations: int, dba_k: int, alpha: float
                   ) -> tuple[NegativeEmbeddings | None, dict | None]:
        """The post-processing's negatives (augmented now, or read from the cache) and its record."""
        if negatives is None:
            return None, None
        if not isinstance(negatives, NegativeEmbeddings):
            negatives = NegativeEmbeddings(negatives, dba_k, alpha)
        elif (dba_k, alpha) != (DBA_K, ALPHA) and (dba_k, alpha) != (negatives.dba_k, negatives.alpha):
            raise ValueError(f'nes_dba_k/nes_alpha ({dba_k}, {alpha}) differ from the given NegativeEmbeddings\' '
                             f'({negatives.dba_k}, {negatives.alpha}): set them when building it')
        if negatives.dim != self.embedding_dim:
            raise ValueError(f'the negatives are {negatives.dim}-d but this model makes {self.embedding_dim}-d vectors')
        if isinstance(self.model, IscModel) and not same_model(negatives.model, self.fingerprint):
            raise ValueError(f'the negatives were made by another model (weights {negatives.model.get("weights")} at '
                             f'{negatives.model.get("img_size")} px; this one: {self.fingerprint["weights"]} at '
                             f'{self.img_size} px): embed the negatives with this model')
        record = negatives.record(k, beta, iterations)  # checks the settings
        negatives.augmented  # noqa: B018 (augment now, so that the first call is not slow)
        return negatives, record

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.num_threads is not None:  # process-wide: the new process must honour it too
            torch.set_num_threads(self.num_threads)

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    @property
    def net(self) -> IscNet:
        """The PyTorch network with its weights."""
        return self._local_model().net

    def _local_model(self) -> IscModel:
        """The IscModel; an operator whose network runs in Triton holds no weights."""
        if not isinstance(self.model, IscModel):
            raise ValueError(f'the network of {self.model_name!r} runs in Triton ({type(self.model).__name__}): '
                             'its weights are not loaded in this process')
        return self.model

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What makes the vectors, whatever the backend or batch size: the weights' content key, the
        input size and every setting that changes pixels or numbers. Equal fingerprints give
        interchangeable vectors (to ~1e-5); a workflow records it to refuse mixing two models."""
        return {'weights': self._local_model().weights_key, 'img_size': self.img_size, 'precision': self.precision,
                'exif_transpose': self.exif_transpose, 'fast_decode': self.fast_decode,
                'decode_on_device': self.decode_on_device, 'skip_preprocess': self.skip_preprocess}

    def __call__(self, data: Any) -> np.ndarray | list[np.ndarray]:
        items, single = self._split(data)
        vectors = self._embed(items, single)
        if self.nes is not None:  # the winner's post-processing (negative embedding subtraction)
            vectors = self.nes.subtract(vectors, self.postprocessing['k'], self.postprocessing['beta'],
                                        self.postprocessing['iterations'])
        return vectors[0] if single else list(vectors)

    def embed_each(self, items: list[Any]) -> list[np.ndarray | ImageError]:
        """For each image of ``items``: its vector, or the ``ImageError`` saying why it cannot be used.
        The list runs as one batch; only when an image in it fails are they run again one by one, so
        one bad image (an upload, a file in a folder) never fails the others."""
        try:
            return list(self(items))
        except ImageError:
            pass
        out: list[np.ndarray | ImageError] = []
        for item in items:
            try:
                out.append(self(item))
            except ImageError as e:
                out.append(e)
        return out

    # -- input conversion: every input goes through _split, then _prepare ----------------------------

    def _split(self, data: Any) -> tuple[list[Any], bool]:
        """The single inputs in ``data``, and whether it was one image rather than a list or batch."""
        if data is None:
            raise TypeError('expected an image or a list of images, got None')
        if isinstance(data, (list, tuple)):
            if not data:
                raise ValueError('expected an image or a list of images, got an empty list')
            return list(data), False
        if self.skip_preprocess:
            tensor = self._check_preprocessed(data, batch_ok=True)
            return ([tensor], True) if tensor.ndim == 3 else (list(tensor.unbind(0)), False)
        return [data], True

    def _prepare(self, item: Any, index: int | None) -> torch.Tensor:
        """One input -> the resized image's (S, S, 3) uint8 pixels (``_batch`` makes them the network's
        input), or the (3, S, S) float32 input itself (``skip_preprocess``, ``decode_on_device``)."""
        if self.skip_preprocess:
            return self._check_preprocessed(item, batch_ok=False, index=index)
        where = '' if index is None else f' (list item {index})'
        # Decoding at no less than 2S keeps the change to the resized pixels about that of re-encoding
        # the JPEG at quality 90 (measured: mean 0.0005 of the 0-1 range); at S it doubles.
        draft = (2 * self.img_size, 2 * self.img_size) if self.fast_decode else None
        if self.decode_on_device and isinstance(item, (str, os.PathLike)) and is_jpeg(Path(item)):
            return self._decode_jpeg_on_device(Path(item), where)
        return self.transform.pixels(to_pil_rgb(item, where, draft, self.exif_transpose))

    def _batch(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        """``_prepare``'s tensors -> the network's (N, 3, S, S) float32 input. Pixels are scaled and
        normalised where the network runs: a GPU is sent a quarter of the bytes and spares the CPU the
        float work, which held an H200 back (the same numbers bit for bit: ``Preprocess.to_input``)."""
        if all(t.dtype == torch.uint8 for t in prepared):
            pixels = torch.stack(prepared)
            network = getattr(self.model, 'device', None)  # an IscModel's; None for Triton's model
            if network is not None and network.type == 'cuda':
                pixels = pixels.pin_memory().to(network, non_blocking=True)
            return self.transform.to_input(pixels)
        inputs = [self.transform.to_input(t) if t.dtype == torch.uint8 else t for t in prepared]
        if self.decode_on_device:  # some may be on the device already, others on the CPU
            inputs = [t.to(self.device) for t in inputs]
        return torch.stack(inputs)

    def _decode_jpeg_on_device(self, path: Path, where: str) -> torch.Tensor:
        """torchvision's JPEG decoder on the operator's device, then resize and normalise there.
        The header is read first, so the pixel limit holds here as on the PIL path."""
        from torchvision.io import ImageReadMode, decode_jpeg
        what = f'JPEG file {str(path)!r}{where}'
        image_size(path, what)
        try:
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            image = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except (RuntimeError, OSError) as e:
            raise ImageError(f'cannot decode {what}: {e}') from e
        x = image.unsqueeze(0).float().div_(255)
        x = torch.nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode='bilinear',
                                            antialias=True, align_corners=False)[0]
        return self.transform.normalise(x)

    def _check_preprocessed(self, item: Any, batch_ok: bool, index: int | None = None) -> torch.Tensor:
        size = (3, self.img_size, self.img_size)
        shapes = (f'{size} or (N, *{size})' if batch_ok else f'{size}') + ('' if index is None else
                                                                           f' (list item {index})')
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.asarray(item))
        if isinstance(item, torch.Tensor):
            item = item.detach()  # a tensor that requires grad cannot become numpy for ONNX Runtime
        if not isinstance(item, torch.Tensor):
            raise TypeError(f'skip_preprocess=True takes float np.ndarray or torch.Tensor of shape {shapes}, '
                            f'got {type(item).__name__}')
        if not item.is_floating_point():
            raise TypeError(f'skip_preprocess=True takes float arrays, got dtype {item.dtype}')
        if tuple(item.shape[-3:]) != size or item.ndim not in ((3, 4) if batch_ok else (3,)) or item.numel() == 0:
            raise ValueError(f'skip_preprocess=True takes arrays of shape {shapes}, got {tuple(item.shape)}')
        if not torch.isfinite(item).all():
            raise ValueError('the preprocessed input holds NaN or infinite values')
        return item.float()

    # -- inference ---------------------------------------------------------------------------------

    def _embed(self, items: list[Any], single: bool) -> np.ndarray:
        """(N, D) float32 embeddings of a list."""
        return np.concatenate(list(self._embed_batches(iter(items), single, ahead=len(items) > self.batch_size)))

    def _embed_batches(self, items: Iterator[Any], single: bool, max_bytes: int | None = None,
                       ahead: bool = True) -> Iterator[np.ndarray]:
        """(n, D) float32 embeddings of ``items``, batch by batch (``backends.batches``). While the
        backend runs one batch, a worker thread takes and decodes the next (PIL releases the GIL). On a
        GPU one thread cannot keep up with the network (measured on an H200: 140 images/s, CPU-bound),
        so there the images of a batch are decoded by a pool of threads. ``ahead=False``: one batch (a
        single image, a short list), run in this thread."""
        decoders = ThreadPoolExecutor(max_workers=min(8, cpu_count())) if self.device.type == 'cuda' else None
        chunks = batches(items, self.batch_size, max_bytes)
        taken = 0

        def prepare() -> tuple[torch.Tensor, int] | None:
            nonlocal taken
            chunk = next(chunks, None)
            if chunk is None:
                return None
            start, taken = taken, taken + len(chunk)
            indices = [None if single else start + i for i in range(len(chunk))]
            mapper = decoders.map if decoders is not None and len(chunk) > 1 else map
            return self._batch(list(mapper(self._prepare, chunk, indices))), start

        try:
            if not ahead:
                batch, start = prepare()
                yield self._checked(self._run(batch), start)
                return
            pending = in_daemon_thread(prepare)
            try:
                while (prepared := result_of(pending)) is not None:
                    pending = in_daemon_thread(prepare)
                    yield self._checked(self._run(prepared[0]), prepared[1])
            except Exception:
                wait([pending])  # it shares the stream with whoever goes on after this error
                raise
            # On Ctrl-C (or when the consumer stops), the batch being taken is left behind: it may wait
            # long on its stream (a decoder between samples far apart).
        finally:
            if decoders is not None:
                decoders.shutdown(cancel_futures=True)

    def embed_stream(self, items: Iterable[Any], max_batch_bytes: int | None = None) -> Iterator[np.ndarray]:
        """The (D,) float32 vector of each of ``items``, in order, for a stream too long to hold at once
        (a video's frames): ``batch_size`` at a time, the next batch decoded while the network runs this
        one, as a list is, but never stopping between lists. With ``max_batch_bytes`` a batch of numpy
        arrays also ends at that many bytes. An image that cannot be used raises ``ImageError`` naming
        its place in the stream (``list item N``), after the vectors of the batches before its own."""
        for vectors in self._embed_batches(iter(items), False, max_batch_bytes):
            if self.nes is not None:  # row by row, so a batch at a time is the same as all at once
                vectors = self.nes.subtract(vectors, self.postprocessing['k'], self.postprocessing['beta'],
                                            self.postprocessing['iterations'])
            yield from vectors

    def _run(self, batch: torch.Tensor) -> np.ndarray:
        """The network on one batch: an IscModel here, or the ONNX model in Triton (a torch tensor either way)."""
        if isinstance(self.model, IscModel):
            n = len(batch)
            rows = padded_batch(n, self.batch_size) if self.device.type == 'cuda' else n
            if rows > n:  # rows of zeros, dropped after: each image's vector is its own (inference mode)
                batch = torch.cat([batch, batch.new_zeros((rows - n, *batch.shape[1:]))])
            return self.model(batch).cpu().numpy()[:n]
        # In Triton: the repository's ONNX model was exported on the build machine; with checkpoint_path=
        # the server describes the weights by its own file at that path, which must be the same file.
        fix = ('was the repository built with these settings? With checkpoint_path=, the server needs the '
               'same checkpoint file at that path')
        try:
            vectors = self.model(batch).cpu().numpy()
        except Exception as e:  # Triton's errors (pb_utils.TritonModelException and others) say what, not why
            message = e.message() if callable(getattr(e, 'message', None)) else e
            raise ValueError(f'the ONNX model in Triton refused a {tuple(batch.shape)} batch ({message}): '
                             f'{fix}') from e
        if vectors.shape != (len(batch), self.embedding_dim):
            raise ValueError(f'the ONNX model in Triton gave {vectors.shape} vectors for {len(batch)} images, '
                             f'not {self.embedding_dim}-d ones: {fix}')
        return vectors

    def _checked(self, vectors: np.ndarray, start: int) -> np.ndarray:
        """The backend's vectors, refused if any is not a finite unit vector: broken weights must never
        give silent NaN or zero descriptors (finite weights and inputs cannot produce them)."""
        norms = np.linalg.norm(vectors, axis=1)
        bad = ~(np.isfinite(vectors).all(axis=1) & (np.abs(norms - 1) < 1e-3))
        if bad.any():
            raise ValueError(f'the network gave a non-finite or zero vector (item {start + int(np.argmax(bad))}): '
                             f'the weights of {self.model_name!r} are broken; use another checkpoint')
        return vectors

    # -- fine-tuning (training/) ---------------------------------------------------------------------

    def train(self, training_args: dict[str, Any] | None = None, train_dataset: Any = None, eval_dataset: Any = None,
              resume_checkpoint_path: str | None = None, **kwargs: Any) -> list[str]:
        """Fine-tune this operator's network with the winner's self-supervised recipe, as Towhee's tutorial
        calls it: ``op.train(training_args={'train_data_dir': './images', 'output_dir': './output', ...})``
        (keys: ``training.config.TRAINING_ARGS``; also accepted as keyword arguments). Towhee's own
        ``train(training_config, train_dataset, ...)`` works too: a ``TrainingConfig``'s epochs, batch size,
        lr and output folder, and a dataset of images. Writes ``output_dir/checkpoint_epoch%04d.pth.tar``
        after each epoch; afterwards this operator embeds with the last one. Returns the checkpoints written."""
        from .training.operator import train_operator
        result = train_operator(self, training_args, train_dataset, eval_dataset, resume_checkpoint_path, **kwargs)
        return [str(path) for path in result.checkpoints]

    # -- export ------------------------------------------------------------------------------------

    @staticmethod
    def supported_model_names(format: str | None = None) -> list[str]:  # noqa: A002 (Towhee's name)
        """Names of the published weights; every export format supports all of them."""
        if format is not None and format not in _EXPORT_SUFFIX:
            raise ValueError(f'unknown format {format!r}: supported formats are {list(_EXPORT_SUFFIX)}')
        return sorted(WEIGHTS)

    def save_model(self, format: str = 'pytorch', path: str | os.PathLike = 'default') -> str:  # noqa: A002
        """Export the model; returns the written file's path.

        ``'pytorch'`` writes an official-format checkpoint (``checkpoint_path=`` loads it back),
        ``'torchscript'`` a traced module for ``torch.jit.load``, ``'onnx'`` an opset-17 model with a
        dynamic batch axis. Exports take preprocessed (N, 3, S, S) float32 and return (N, D) float32.
        ``path='default'`` writes ``<torch hub dir>/towhee_isc/saved/<format>/<model name><suffix>``
        (``torch.hub.get_dir()``, beside the downloaded weights; never inside the package, which may be
        a read-only site-packages); a directory gets that file name; anything else is the file to write.
        """
        if format not in _EXPORT_SUFFIX:
            raise ValueError(f'unknown export format {format!r}: supported formats are {list(_EXPORT_SUFFIX)}')
        net = self.net  # before any folder is made: an operator whose network runs in Triton has none
        file_name = self.model_name + _EXPORT_SUFFIX[format]
        if str(path) == 'default':
            path = Path(torch.hub.get_dir()) / 'towhee_isc' / 'saved' / format / file_name
        path = Path(path)
        if path.is_dir():
            path = path / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Export a CPU fp32 copy, so the live model (maybe serving other threads) is never touched.
        model = copy.deepcopy(net).cpu().float().eval()
        if format == 'pytorch':
            save_checkpoint(model, path, self.img_size)
        elif format == 'torchscript':
            with torch.no_grad():
                torch.jit.trace(model, torch.zeros(1, 3, self.img_size, self.img_size)).save(str(path))
        else:  # the ONNX cache's export when it has this network's (the same exporter): made once
            try:
                shutil.copyfile(cached_onnx(model, self.img_size), path)
            except OSError:  # an unwritable cache folder
                export_onnx(model, self.img_size, path)
        return str(path)


# Towhee's registry: ``ops.image_embedding.isc()`` finds the operator offline. Here, where ``Isc`` is
# defined, so that the package's ``__init__`` need not import Towhee (it imports this module once Towhee is loaded).
register(name='image-embedding/isc')(Isc)
