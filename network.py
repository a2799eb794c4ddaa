"""The network the operator calls, behind Towhee's ``accelerate``.

``ModelSpec`` is what the operator knows about its weights before reading them (architecture, input
size, embedding size), enough to preprocess images and check results. ``IscModel`` reads the weights,
builds the network and runs it with a backend. The operator makes it through ``accelerated_model``: in
a Triton model repository built by ``towhee.build_pipeline_model``, that returns a client of the
repository's ONNX model instead, so a Triton-side operator only preprocesses, and never reads or
holds the weights.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

with warnings.catch_warnings():  # Towhee's own imports warn about pkg_resources and pydantic: not ours to fix
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    try:
        from towhee import accelerate
    except ImportError:  # Towhee 0.9: its draft of accelerate fails outside its runtime, and it has no Triton route
        def accelerate(model):
            return model

from .backends import (OnnxRuntimeBackend, TorchBackend, exported_onnx, file_sha256, onnx_backend, remember_key,
                       remembered_key, weights_key)
from .model import Checkpoint, CheckpointError, IscNet, architecture, build_model, check_arch, read_checkpoint
from .weights import check_cached, get_weights, load_published


@dataclass(frozen=True)
class ModelSpec:
    """The weights an operator uses, as known before reading them.

    Published weights are described by the weights table, downloaded or not (a Triton server needs
    no weights; a cached file must be the network the table describes). A checkpoint file is
    described by its metadata and the shape of its ``fc.weight``: the file is mapped, its weights
    not read.
    """
    name: str                    # the published name, or the checkpoint file's name without suffixes
    arch: str                    # timm name of the backbone (mean/std, and checked against the weights)
    img_size: int                # square input side S
    embedding_dim: int           # D
    checkpoint_path: str | None  # None: the published weights ``name``
    timm_backbone: str | None    # the user's override of the checkpoint's architecture

    @classmethod
    def resolve(cls, model_name: str, checkpoint_path: Any, timm_backbone: str | None,
                img_size: int | None) -> ModelSpec:
        backbone = None if timm_backbone is None else check_arch(timm_backbone)
        if checkpoint_path is None:
            weights = get_weights(model_name)
            if backbone is not None and backbone != weights.arch:
                raise ValueError(f'there are no published ISC weights for timm_backbone={timm_backbone!r} '
                                 f'({model_name!r} is {weights.arch}); pass checkpoint_path= with your own weights')
            check_cached(model_name)  # a file put in the cache by hand must be the published network
            return cls(model_name, weights.arch, img_size or weights.input_size, weights.embedding_dim, None, None)
        if not isinstance(checkpoint_path, (str, os.PathLike)):
            raise TypeError(f'checkpoint_path must be a str or os.PathLike, got {type(checkpoint_path).__name__}')
        # Kept as given, not made absolute: an operator rebuilt elsewhere (a Triton server) reads it there.
        checkpoint_path = str(checkpoint_path)
        header = read_checkpoint(checkpoint_path, mmap=True)
        arch, dim = architecture(header, backbone)
        size = img_size or header.input_size
        if not size:
            raise ValueError(f'{header.source!r} does not say its input size: pass img_size= '
                             '(512 for the published models)')
        if backbone is None:  # the checkpoint's own arch: an unknown one names the file
            try:
                arch = check_arch(arch)
            except ValueError as e:
                raise CheckpointError(f'{header.source!r}: {e}; pass timm_backbone= if it was trained with another'
                                      ) from e
        return cls(Path(checkpoint_path).name.split('.')[0], arch, size, dim, checkpoint_path, timm_backbone)

    def load(self) -> Checkpoint:
        """The checkpoint, read in full (published weights downloaded once into torch hub's cache)."""
        return load_published(self.name) if self.checkpoint_path is None else read_checkpoint(self.checkpoint_path)

    def weights_file(self) -> Path | None:
        """The file the weights are read from, if it is there (published weights: once downloaded)."""
        path = Path(self.checkpoint_path) if self.checkpoint_path is not None else get_weights(self.name).cache_path
        return path if path.is_file() else None


class IscModel:
    """The ISC network with its weights, run by one backend.

    Called with a preprocessed (N, 3, S, S) float32 tensor, it returns the (N, D) float32 embeddings
    as a CPU tensor, rows L2-normalised. It pickles (Ray): an ONNX Runtime session is left out and
    rebuilt from the export cache.

    Args:
        spec: the weights to read.
        device: where PyTorch runs.
        backend: ``'torch'`` or ``'onnxruntime'`` (resolved by ``backends.resolve_backend``).
        precision: ``'fp32'``, ``'fp16'`` or ``'bf16'`` (PyTorch backend).
        num_threads: ONNX Runtime's intra-op threads; None: every core.
    """

    def __init__(self, spec: ModelSpec, device: torch.device, backend: str, precision: str,
                 num_threads: int | None):
        self.spec, self.img_size = spec, spec.img_size
        self.device, self.precision, self.num_threads = device, precision, num_threads
        self.backend = self._make_backend(backend)

    @functools.cached_property
    def net(self) -> IscNet:
        """The network with its weights, built when first needed: ONNX Runtime on a cached export runs
        without it (see ``_exported``)."""
        net = build_model(self.spec.load(), self.spec.timm_backbone)
        # Published weights were checked against the table as they were read; a checkpoint file is
        # described by its header, which can only disagree if the file changed in between.
        if check_arch(net.arch) != self.spec.arch or net.embedding_dim != self.spec.embedding_dim:
            raise CheckpointError(f'the weights of {self.spec.name!r} are a {net.arch} network giving '
                                  f'{net.embedding_dim}-d vectors, not the {self.spec.arch} giving '
                                  f'{self.spec.embedding_dim}-d vectors expected: {self.spec.checkpoint_path!r} '
                                  'changed while the operator was built')
        # A fast start took its weights key from the memo of the file's hash (``_exported``): the
        # network read now must be those weights, or the operator would embed with one set of weights
        # and describe itself (fingerprint, a pickle's export) by another.
        known = self.__dict__.get('weights_key')
        if known is not None and weights_key(net, self.img_size) != known:
            raise CheckpointError(f'{self.spec.checkpoint_path or self.spec.name!r} holds other weights than '
                                  'when this operator started (it was replaced): make a new operator')
        return net

    @functools.cached_property
    def weights_key(self) -> str:
        """The weights' content key (a hash of every weight): for the ONNX cache and ``Isc.fingerprint``,
        computed when first needed, so an operator that needs neither does not hash 200 MB at start."""
        return weights_key(self.net, self.img_size)

    def _make_backend(self, backend: str) -> TorchBackend | OnnxRuntimeBackend:
        if backend == 'onnxruntime':
            # Unpickled, it runs the network that came with it, whatever the file holds now: nothing is
            # looked up or remembered by the file's hash.
            digest, session = (None, None) if 'net' in self.__dict__ else self._exported()
            if session is None:
                session = onnx_backend(self.net, self.img_size, self.weights_key, self.num_threads)
                # Remembered only if the file is still what was hashed before the network was read from it.
                path = self.spec.weights_file() if session is not None and digest is not None else None
                if path is not None and file_sha256(path) == digest:
                    remember_key(digest, self.spec.arch, self.img_size, self.weights_key, self.net.arch)
            if session is not None:
                return session
        # asked for, or ONNX Runtime could not be set up (it warned why)
        return TorchBackend(self.net, self.device, self.precision)

    def _exported(self) -> tuple[str | None, OnnxRuntimeBackend | None]:
        """(the weights file's SHA-256, ONNX Runtime on the export made of it before, if it is cached):
        a weights file met before is known by its content, so its network need not be built."""
        path = self.spec.weights_file()
        if path is None:
            return None, None
        digest = file_sha256(path)
        known = remembered_key(digest, self.spec.arch, self.img_size)
        onnx = known and exported_onnx(known[1], self.img_size, known[0])
        if not onnx:
            return digest, None
        try:
            session = OnnxRuntimeBackend(onnx, self.num_threads)
        except Exception:  # noqa: BLE001 (a cached file ONNX Runtime refuses: build and export as if unknown)
            return digest, None
        self.__dict__['weights_key'] = known[0]
        return digest, session

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.backend(batch))

    def __getstate__(self) -> dict[str, Any]:
        self.net  # noqa: B018 (the weights travel with the pickle, as the unpickling machine may not have them)
        state = self.__dict__.copy()
        if isinstance(state['backend'], OnnxRuntimeBackend):
            state['backend'] = 'onnxruntime'
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.backend == 'onnxruntime':
            self.backend = self._make_backend('onnxruntime')


# Towhee's accelerate decorator, applied by call so that IscModel stays a plain class that pickles.
# Outside Triton this builds an IscModel; in a Triton repository it gives a towhee TritonClient that
# sends the batch to the repository's ONNX model and returns its (N, D) output as a torch tensor.
accelerated_model = accelerate(IscModel)
