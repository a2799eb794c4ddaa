"""The ISC21 descriptor-track 1st-place network and its checkpoints, usable without Towhee.

The network is a timm backbone (``features_only``, last feature map) -> GeM pooling -> linear ->
BatchNorm -> L2 normalisation, exactly as in the winner's ``isc_feature_extractor``. Parameter
names match that code (``backbone.*``, ``fc.weight``, ``bn.*``), so its checkpoints load as they are.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .atomic import read_memo, update_memo
from .weights import checkpoint_file_problem

# timm (and torchvision, which timm imports, and which imports torch._dynamo) are imported only where
# a network is built or a backbone name is first met: together ~5.5 CPU-s on top of torch's ~4 in every
# fresh process. What the operator needs of timm otherwise (whether it knows a name, the backbone's
# mean and std) is remembered per timm version (see ``_remembered``), so a start with a cached ONNX
# export imports neither.

# Names the published checkpoints use that current timm only knows under a new name.
_TIMM_RENAMED = {'tf_efficientnetv2_m_in21ft1k': 'tf_efficientnetv2_m.in21k_ft_in1k'}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the architecture."""


class GeM(nn.Module):
    """Generalised-mean pooling over H and W: (N, C, H, W) float -> (N, C).

    Inputs are clamped to ``eps`` first, so the power is defined for any input. Written with
    ``mean`` over the spatial axes (not ``avg_pool2d`` with a kernel taken from the tensor's size),
    so it traces and exports to ONNX with any input size.
    """

    def __init__(self, p: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean((-2, -1)).pow(1.0 / self.p)


class IscNet(nn.Module):
    """The ISC21 descriptor: (N, 3, S, S) float32 normalised images -> (N, D) L2-normalised embeddings.

    Args:
        arch: a timm model name (plain name, e.g. ``'tf_efficientnetv2_m.in21k_ft_in1k'`` or ``'resnet50'``).
        embedding_dim: output size D (256 for the published weights).
        gem_p: GeM power at inference (1.0 for the published weights).
    """

    def __init__(self, arch: str, embedding_dim: int = 256, gem_p: float = 1.0):
        super().__init__()
        self.arch = arch
        self.backbone = create_backbone(arch)
        self.pool = GeM(p=gem_p)
        self.fc = nn.Linear(self.backbone.feature_info[-1]['num_chs'], embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)

    @property
    def embedding_dim(self) -> int:
        return self.fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.backbone(x)[-1])
        return F.normalize(self.bn(self.fc(x)), dim=1)

    def preprocess(self, input_size: int) -> Preprocess:
        """The reference preprocessing for this network's backbone (see ``preprocess``)."""
        return preprocess(self.arch, input_size)


@dataclass(frozen=True)
class Preprocess:
    """The reference preprocessing: an RGB ``PIL.Image`` -> a (3, S, S) float32 tensor: resized to S x S
    (PIL's bilinear), scaled to [0, 1], then less ``mean`` and over ``std`` per channel.

    The operations of torchvision's ``Resize((S, S))``, ``ToTensor()`` and ``Normalize(mean, std)``, the
    reference code's, in the same order and dtypes, so equal bit for bit (tested); restated because
    importing torchvision costs ~4 CPU-s (it imports ``torch._dynamo``) in every process that embeds.
    """
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_input(self.pixels(image))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The resize, PIL's work on the CPU: a (S, S, C) uint8 tensor."""
        resized = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(resized, np.uint8, copy=True)).view(self.size, self.size, -1)

    def to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(S, S, C) or (N, S, S, C) uint8 pixels -> the network's (C, S, S) or (N, C, S, S) float32 input,
        on the pixels' device: ToTensor's scaling, then ``normalise``. On CUDA as on the CPU bit for bit,
        so a GPU can take uint8 (a quarter of the bytes) and do the float work itself (checked on an H200).
        The divisor is a tensor on that device: PyTorch's CUDA kernel divides by a CPU scalar by multiplying
        with its reciprocal, which may differ in the last bit."""
        x = pixels.movedim(-1, -3).contiguous().to(torch.float32)
        return self.normalise(x.div_(torch.tensor(255, dtype=torch.float32, device=x.device)))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(3, S, S) or (N, 3, S, S) float in [0, 1] -> the network's input (a new tensor)."""
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.clone().sub_(mean).div_(std)


def preprocess(arch: str, input_size: int) -> Preprocess:
    """The reference preprocessing for backbone ``arch`` at ``input_size`` px (see ``Preprocess``).

    Mean and std are the backbone's own, from its timm pretrained config, as in the reference code;
    read from timm's table (or remembered from it), so no network is built for them.
    """
    mean, std = _remembered(check_arch(arch))
    return Preprocess(input_size, mean, std)


def timm_name(arch: str) -> str:
    """The name current timm knows ``arch`` by (the published checkpoints use a pre-1.0 name)."""
    return _TIMM_RENAMED.get(arch, arch)


def check_arch(arch: str) -> str:
    """The timm name of ``arch``; a ValueError when timm does not know it."""
    if not isinstance(arch, str):
        raise TypeError(f'a timm backbone is named by a str, got {type(arch).__name__} {arch!r}')
    name = timm_name(arch)
    if name in _timm_memo():
        return name
    import timm
    if not timm.is_model(name):
        raise ValueError(f'unknown timm backbone {arch!r}: give a plain timm model name such as '
                         f"'resnet50' or 'tf_efficientnetv2_m.in21k_ft_in1k' (see timm.list_models())")
    _remember(name)
    return name


Norm = tuple[tuple[float, float, float], tuple[float, float, float]]


def _remembered(name: str) -> Norm:
    """Mean and std of timm backbone ``name`` (known to timm: see ``check_arch``)."""
    return _timm_memo().get(name) or _remember(name)


def _remember(name: str) -> Norm:
    """Ask timm for ``name``'s mean and std, and keep them in the memo file for the next process."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    norm = (tuple(map(float, mean)), tuple(map(float, std)))
    try:
        path = _timm_memo_path()
    except OSError:
        return norm  # no timm version to key it by: the next process asks timm again
    update_memo(path, lambda memo: {**memo, name: [list(norm[0]), list(norm[1])]})
    return norm


def _timm_memo_path() -> Path:
    if not _timm_version():
        raise OSError('no timm version to key the memo by')  # then nothing is remembered
    return Path(torch.hub.get_dir()) / 'towhee_isc' / f'timm-{_timm_version()}-backbones.json'


@functools.cache
def _timm_version() -> str:
    """timm's installed version, read from its metadata without importing it ('' where there is none)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version('timm')
    except PackageNotFoundError:
        return ''


def _timm_memo() -> dict[str, Norm]:
    """The backbones timm knows that this machine has met, with their mean and std (for this timm
    version); entries that are not three finite numbers each, or a file that does not read, count as none."""
    try:
        data = read_memo(_timm_memo_path())
    except OSError:  # no timm version to key it by
        return {}
    memo = {}
    for name, norm in data.items():
        try:
            mean, std = ([float(v) for v in values] for values in norm)
        except (TypeError, ValueError):
            continue
        if len(mean) == len(std) == 3 and all(math.isfinite(v) for v in mean + std) and all(v > 0 for v in std):
            memo[name] = (tuple(mean), tuple(std))
    return memo


def create_backbone(arch: str) -> nn.Module:
    """``timm.create_model(arch, features_only=True)`` without pretrained weights, with a clear error."""
    import timm
    return timm.create_model(check_arch(arch), features_only=True, pretrained=False)


@dataclass(frozen=True)
class Checkpoint:
    """What an ISC checkpoint file holds.

    ``arch`` and ``input_size`` are None for a plain state dict, which carries no metadata.
    """
    state_dict: Mapping[str, torch.Tensor]
    arch: str | None
    input_size: int | None
    source: str


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Checkpoint:
    """Read an ISC checkpoint: the official format (``arch``, ``args.input_size``, ``state_dict``
    with ``module.`` prefixes) or a plain state dict, with or without the prefix.

    Only tensors, containers and ``argparse.Namespace`` are unpickled (``weights_only=True``).
    ``mmap=True`` maps the weights instead of reading them (cheap: for the metadata and shapes); files
    in the pre-1.6 format cannot be mapped and are read.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, truncated, or holds other objects.
    """
    path = str(path)
    fix = ('if it is a download in the cache, delete it to download it again; otherwise pass a valid ISC '
           'checkpoint as checkpoint_path=')
    problem = checkpoint_file_problem(path)
    if problem:
        raise CheckpointError(problem)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = _load(path, mmap)
    except Exception as e:  # torch.load fails in many ways on a bad file (UnpicklingError, KeyError, ...)
        unsafe = [line for line in str(e).splitlines() if 'GLOBAL' in line]
        if unsafe:
            raise CheckpointError(f'{path!r} is not a safe ISC checkpoint: it holds objects other than tensors '
                                  f'and argparse.Namespace ({unsafe[0].strip()}); {fix}') from e
        raise CheckpointError(f'{path!r} is not a readable PyTorch checkpoint (truncated, or not a checkpoint '
                              f'at all: {type(e).__name__}); {fix}') from e

    if isinstance(raw, dict) and 'state_dict' in raw:
        ckpt = Checkpoint(raw['state_dict'], _arch(raw.get('arch'), path), _input_size(raw.get('args'), path), path)
    else:
        ckpt = Checkpoint(raw, None, None, path)
    if not isinstance(ckpt.state_dict, Mapping) or not ckpt.state_dict or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.state_dict.items()):
        raise CheckpointError(f'{path!r} holds no state dict of named tensors; {fix}')
    return ckpt


def _load(path: str, mmap: bool) -> object:
    if mmap:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap can only be used' not in str(e):
                raise
    return torch.load(path, map_location='cpu', weights_only=True)


def _arch(arch: object, path: str) -> str | None:
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise CheckpointError(f"{path!r} has an invalid 'arch' {arch!r}: expected a timm model name")
    return arch


def _input_size(args: object, path: str) -> int | None:
    """``args.input_size``: an int, or a (C,) H, W sequence whose last item is the side."""
    size = getattr(args, 'input_size', None)
    if isinstance(size, (tuple, list)) and size:
        size = size[-1]
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 4096:
        raise CheckpointError(f"{path!r} has an invalid 'args.input_size' {size!r}: expected an int "
                              'between 32 and 4096')
    return size


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DataParallel training leaves on every key."""
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def architecture(ckpt: Checkpoint, arch: str | None = None) -> tuple[str, int]:
    """The architecture (``arch`` overrides the checkpoint's) and vector size D of ``ckpt``, from its
    metadata and the shape of ``fc.weight`` (no weight is read).

    Raises:
        CheckpointError: a plain state dict without ``arch``, or no 2-d ``fc.weight``.
    """
    arch = arch or ckpt.arch
    if arch is None:
        raise CheckpointError(f'{ckpt.source!r} is a plain state dict without metadata: '
                              f"say its architecture with timm_backbone= (e.g. 'resnet50')")
    fc = strip_module_prefix(ckpt.state_dict).get('fc.weight')
    if fc is None or fc.ndim != 2:
        raise CheckpointError(f"{ckpt.source!r} has no 2-d 'fc.weight': not an ISC descriptor checkpoint")
    return arch, fc.shape[0]


def build_model(ckpt: Checkpoint, arch: str | None = None) -> IscNet:
    """Build the network for ``ckpt`` (``arch`` overrides its metadata) and load its weights exactly.

    Returns the model in eval mode on the CPU.

    Raises:
        CheckpointError: no architecture is known, or the weights do not fit it (names the keys).
    """
    arch, dim = architecture(ckpt, arch)
    state_dict = strip_module_prefix(ckpt.state_dict)
    model = IscNet(arch, embedding_dim=dim)
    expected = model.state_dict()
    problems = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
                for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    problems += [f'missing {k}' for k in expected if k not in state_dict]
    problems += [f'unexpected {k}' for k in state_dict if k not in expected]
    if problems:
        raise CheckpointError(f'the weights in {ckpt.source!r} do not fit timm backbone {arch!r}: {_listed(problems)}. '
                              f'Pass the timm_backbone the checkpoint was trained with.')
    # load_state_dict would quietly cast integer weights, and NaN or inf give NaN or zero vectors later.
    broken = [f'{k} is {v.dtype}, not floating point' for k, v in state_dict.items()
              if expected[k].is_floating_point() and not v.is_floating_point()]
    broken += [f'{k} holds NaN or infinite values' for k, v in state_dict.items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f'the weights in {ckpt.source!r} are broken: {_listed(broken)}')
    model.load_state_dict(state_dict)
    return model.eval()


def _listed(problems: list[str], shown: int = 8) -> str:
    return '; '.join(problems[:shown]) + (f'; ... ({len(problems)} in all)' if len(problems) > shown else '')


def save_checkpoint(model: IscNet, path: str | os.PathLike, input_size: int) -> None:
    """Write ``model`` in the official format, which ``read_checkpoint`` and the reference code load."""
    state_dict = {'module.' + k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({'arch': model.arch, 'args': argparse.Namespace(input_size=input_size),
                'epoch': 0, 'state_dict': state_dict}, str(path))
