"""A training run with its files: the images checked, the network, the data, the loop, checkpoints in
the official format after every epoch (``checkpoint_epoch%04d.pth.tar``, atomic, earlier ones kept),
``train_log.jsonl``, Ctrl-C saved as ``checkpoint_interrupted.pth.tar``, resuming, and the processes of a
distributed run. ``Isc.train`` and ``towhee-isc train`` both come here."""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_write
from ..images import ImageError, image_size, regular_file
from ..model import IscNet, build_model, preprocess, read_checkpoint
from ..progress import shown
from .augment import recipe
from .config import TrainConfig
from .distributed import sync_batchnorm
from .data import EpochBatches, ViewsDataset, collate
from .loop import Interrupted, Step, fit, no_decay_groups
from .loss import CrossBatchMemory
from .pairs import PairsDataset, negative_pool, read_pairs

INTERRUPTED = 'checkpoint_interrupted.pth.tar'
LOG = 'train_log.jsonl'


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``checkpoint`` holds everything needed to resume it."""

    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint
        super().__init__(f'training interrupted; resume with resume={str(checkpoint)!r}' if checkpoint
                         else 'training interrupted')


@dataclass
class Result:
    checkpoints: list[Path]                  # written by this run, in order
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable inputs and why

    @property
    def last(self) -> Path:
        return self.checkpoints[-1]


def epoch_checkpoint(output_dir: str | os.PathLike, epoch: int) -> Path:
    """``output_dir/checkpoint_epoch%04d.pth.tar`` for 1-based ``epoch``."""
    return Path(output_dir) / f'checkpoint_epoch{epoch:04d}.pth.tar'


def readable(items: Sequence[Any]) -> tuple[list[Any], dict[str, str]]:
    """The items that look like images (file headers read, nothing decoded) and, for the others, why not."""
    good, skipped = [], {}
    for item in items:
        image = item[0] if isinstance(item, tuple) else item
        if isinstance(image, (str, os.PathLike)):
            try:
                image_size(regular_file(Path(image)), f'image file {str(image)!r}')
            except (ImageError, OSError) as e:
                skipped[str(image)] = str(e)
                continue
        good.append(item)
    return good, skipped


def resolve_train_device(config: TrainConfig, local_rank: int | None = None) -> torch.device:
    """``config.device``, or cuda:<gpu> (the local rank's GPU when distributed); the CPU with one
    warning when there is no GPU."""
    if config.device is not None:
        from ..isc import resolve_device
        device = resolve_device(config.device)
        if local_rank is not None and device.type == 'cuda':
            device = torch.device('cuda', local_rank)
    elif torch.cuda.is_available():
        if local_rank is None and config.gpu >= torch.cuda.device_count():
            raise ValueError(f'gpu={config.gpu} but this machine has {torch.cuda.device_count()} GPU(s) '
                             f'(0 to {torch.cuda.device_count() - 1})')
        device = torch.device('cuda', config.gpu if local_rank is None else local_rank)
    else:
        if local_rank in (None, 0):
            # No 'gpu=0 ignored': gpu is 0 by default, so most who read this never set it.
            warnings.warn('no GPU found: training on the CPU; this is slow beyond a few hundred small images',
                          stacklevel=3)
        device = torch.device('cpu')
    if config.precision != 'fp32' and device.type != 'cuda':
        raise ValueError(f'precision {config.precision!r} is autocast on a CUDA device; on the CPU use fp32')
    return device


def train(items: Sequence[Any], net: IscNet, img_size: int, config: TrainConfig,
          on_step: Callable[[Step], None] | None = None) -> Result:
    """Fine-tune (a copy of) ``net`` on ``items`` (paths or images) as ``config`` says; returns the
    checkpoints written. ``img_size`` is the input size the checkpoints record for inference.

    Raises ValueError for bad settings or data (before anything is written), ``TrainingError`` when
    the loss diverges or training collapses, ``TrainingInterrupted`` on Ctrl-C (after saving)."""
    config.check()
    items, skipped = readable(list(items))
    pairs = read_pairs(config.pairs) if config.pairs is not None else None
    if pairs is not None:  # the second stage: the images are the negatives
        items = negative_pool(items, pairs)
        if config.negatives and not items:
            raise ValueError(f'no training images outside the pairs of {config.pairs!r} to draw the negatives from: '
                             'give images that are not copies, or negatives=0')
        if len(pairs) < config.batch_size:
            raise ValueError(f'{config.pairs!r} has {len(pairs)} pairs, fewer than batch_size={config.batch_size}: '
                             'give more pairs or a smaller batch_size')
        items = (pairs, items)
    elif not items:
        raise ValueError(f'no readable training images ({len(skipped)} unreadable)' if skipped
                         else 'no training images given')
    elif len(items) < config.batch_size:
        raise ValueError(f'{len(items)} readable training images are fewer than batch_size={config.batch_size}: '
                         'give more images or a smaller batch_size')
    resume = _read_resume(config, net) if config.resume else None
    if skipped:
        warnings.warn(f'skipped {len(skipped)} unreadable training file(s): {", ".join(list(skipped)[:5])}'
                      + (' ...' if len(skipped) > 5 else ''), stacklevel=2)
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and (config.distributed or int(os.environ['WORLD_SIZE']) > 1):
        return _train_rank(items, net, img_size, config, resume, skipped, on_step)  # under torchrun
    if config.distributed:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise ValueError('distributed=True trains on every local GPU and none was found; on CPUs, start it '
                             'with torchrun (e.g. torchrun --nproc_per_node 2 -m towhee_isc train ... --distributed)')
        if gpus > 1:
            return _spawn(gpus, items, net, img_size, config, resume, skipped)
    return _train_rank(items, net, img_size, config, resume, skipped, on_step)


def _spawn(gpus: int, items, net, img_size, config, resume, skipped) -> Result:
    """One process per local GPU on 127.0.0.1 (NCCL), as torchrun would start them."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': str(gpus)}
    mp.spawn(_spawned, args=(env, items, net, img_size, config, resume, skipped), nprocs=gpus, join=True)
    written = sorted(Path(config.output_dir).glob('checkpoint_epoch*.pth.tar'))
    return Result([p for p in written if int(p.name[16:20]) > config.start_epoch], skipped)


def _spawned(rank: int, env: dict, items, net, img_size, config, resume, skipped) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    _train_rank(items, net, img_size, config, resume, skipped, None)


def _read_resume(config: TrainConfig, net: IscNet) -> dict:
    """A checkpoint this training wrote, with its optimizer and memory; the run continues after it."""
    path = str(config.resume)
    ckpt = read_checkpoint(path)  # readable, official format, tensors only
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(raw, dict) or 'optimizer' not in raw or 'memory' not in raw:
        raise ValueError(f'{path!r} is not a checkpoint of this training (no optimizer or memory state): '
                         'start from its weights with --checkpoint instead of --resume')
    if ckpt.arch != net.arch:
        raise ValueError(f'{path!r} trained a {ckpt.arch} network, not {net.arch}')
    done_epochs, step = int(raw['epoch']), int(raw.get('step', 0))
    if done_epochs >= config.epochs:
        raise ValueError(f'{path!r} already finished epoch {done_epochs} of epochs={config.epochs}: '
                         'raise epochs to train further')
    config.start_epoch = done_epochs
    return {**raw, 'step': step}


def _train_rank(items, net: IscNet, img_size: int, config: TrainConfig, resume: dict | None,
                skipped: dict[str, str], on_step) -> Result:
    distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1
    local_rank = int(os.environ.get('LOCAL_RANK', 0)) if distributed else None
    device = resolve_train_device(config, local_rank)
    if distributed and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if config.batch_size < world:
        raise ValueError(f'batch_size={config.batch_size} is smaller than the {world} processes')
    try:
        return _run(items, net, img_size, config, resume, skipped, on_step, device, rank, world)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(items, net: IscNet, img_size: int, config: TrainConfig, resume: dict | None, skipped: dict[str, str],
         on_step, device: torch.device, rank: int, world: int) -> Result:
    torch.manual_seed(config.seed)
    net = copy.deepcopy(net).float()
    if resume is not None:
        net.load_state_dict({k[len('module.'):] if k.startswith('module.') else k: v
                             for k, v in resume['state_dict'].items()})
    eval_p = net.pool.p
    net.pool.p = config.gem_p
    model: nn.Module = net.to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(sync_batchnorm(net, device),
                                                    device_ids=[device.index] if device.type == 'cuda' else None)
    memory = CrossBatchMemory(net.embedding_dim, config.memory_size, config.pos_margin, config.neg_margin).to(device)
    optimizer = torch.optim.SGD(no_decay_groups(net, config.weight_decay), lr=config.init_lr,
                                momentum=config.momentum)
    start_step = 0
    if resume is not None:
        optimizer.load_state_dict(resume['optimizer'])
        memory.load_state_dict(resume['memory'])
        start_step = resume['step']

    input_size = config.input_size or img_size
    mean_std = preprocess(net.arch, input_size)
    if config.pairs is not None:  # items = (pairs, negatives pool): exp/v107.py's second stage
        dataset = PairsDataset(*items, preprocess(net.arch, input_size), config.negatives, config.seed)
    else:
        dataset = ViewsDataset(items, recipe(input_size, mean_std.mean, mean_std.std, config.ncrops, items,
                                             config.hard_p_scale, config.hard_p, config.colour_jitter), config.seed)
    steps = len(dataset) // config.batch_size

    def batches(epoch: int, skip: int):
        dataset.epoch = epoch
        sampler = EpochBatches(len(dataset), config.batch_size, config.seed, epoch, rank, world, skip)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=config.workers, pin_memory=device.type == 'cuda')

    out = Path(config.output_dir)
    written: list[Path] = []
    record = config.record()

    def save(path: Path, epochs_done: int, step: int) -> None:
        net.pool.p = eval_p  # not a weight; the checkpoint is read with the inference GeM
        state = {'arch': net.arch, 'args': argparse.Namespace(**{**_plain(record), 'train_input_size': input_size, 'input_size': img_size}),
                 'epoch': epochs_done, 'step': step,
                 'state_dict': {'module.' + k: v.detach().cpu() for k, v in net.state_dict().items()},
                 'optimizer': optimizer.state_dict(), 'memory': {k: v.cpu() for k, v in memory.state_dict().items()}}
        net.pool.p = config.gem_p
        with atomic_write(path) as tmp:
            torch.save(state, tmp)

    def on_epoch(epoch: int, loss: float, lr: float) -> None:
        if rank != 0:
            return
        path = epoch_checkpoint(out, epoch + 1)
        save(path, epoch + 1, 0)
        written.append(path)
        with open(out / LOG, 'a', encoding='utf-8') as log:
            log.write(json.dumps({'epoch': epoch + 1, 'loss': loss, 'lr': lr, 'checkpoint': path.name,
                                  'time': time.time()}) + '\n')

    # The bar only where someone watches it (a terminal, or TOWHEE_ISC_PROGRESS=1), as every other step's.
    progress = on_step if on_step is not None else (None if rank != 0 or not shown(config.quiet) else
                                                    ProgressBar(steps * (config.epochs - config.start_epoch) - start_step))
    try:
        fit(model, memory, optimizer, batches, steps, config.epochs, config.init_lr, config.start_epoch, start_step,
            device, config.precision, config.collapse_steps, config.warmup, progress, on_epoch)
    except Interrupted as stop:
        path = out / INTERRUPTED if rank == 0 else None
        if path is not None:
            save(path, stop.epoch, stop.step)
        raise TrainingInterrupted(path) from None
    finally:
        if isinstance(progress, ProgressBar):
            progress.close()
    return Result(written, skipped)


def _plain(record: dict) -> dict:
    """Settings that unpickle with ``weights_only`` (str, numbers, bools, None, and dicts of them such as hard_p)."""
    def plain(v) -> bool:
        return v is None or isinstance(v, (str, int, float, bool))
    return {k: v for k, v in record.items()
            if plain(v) or isinstance(v, dict) and all(isinstance(a, str) and plain(b) for a, b in v.items())}


class ProgressBar:
    """A tqdm bar on stderr: epoch, step, loss, images/s (network inputs) and tqdm's ETA."""

    def __init__(self, total: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit='step', dynamic_ncols=True, mininterval=1.0)

    def __call__(self, step: Step) -> None:
        self.bar.set_description(f'epoch {step.epoch + 1}', refresh=False)
        self.bar.set_postfix_str(f'step {step.step}/{step.steps} loss {step.loss:.4f} '
                                 f'{step.images / max(step.seconds, 1e-9):.1f} images/s', refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def initial_net(model_name: str, checkpoint: str | None, timm_backbone: str | None,
                img_size: int | None, resuming: bool = False) -> tuple[IscNet, int]:
    """The network to start from and its input size: a checkpoint, a timm architecture (its pretrained
    weights when in the local timm/Hugging Face cache, else random), or the published weights.
    ``resuming``: a resumed checkpoint's weights replace these, so no warning about random ones."""
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
        size = img_size or ckpt.input_size
        if not size:
            raise ValueError(f'{checkpoint!r} does not say its input size: pass --img-size')
        return build_model(ckpt, timm_backbone), size
    if timm_backbone is not None:
        return fresh_net(timm_backbone, warn=not resuming), img_size or 224
    from ..network import ModelSpec
    spec = ModelSpec.resolve(model_name, None, None, img_size)
    return build_model(spec.load()), spec.img_size


def fresh_net(arch: str, warn: bool = True) -> IscNet:
    """A new network for ``arch``: the backbone's timm pretrained weights when they are in the local
    timm/Hugging Face cache (nothing is downloaded), else random with a warning; fc and bn initialised
    as the winner's."""
    net = IscNet(arch)
    cached = _cached_pretrained(net.arch)
    if cached is None:
        if warn:
            warnings.warn(f'no pretrained {arch} weights in the local timm/Hugging Face cache: starting from random '
                          'weights', stacklevel=3)
    else:
        import timm
        pretrained = timm.create_model(net.arch, features_only=True, pretrained=True,
                                       pretrained_cfg_overlay={'file': str(cached)})
        net.backbone.load_state_dict(pretrained.state_dict())
    nn.init.xavier_normal_(net.fc.weight)
    nn.init.ones_(net.bn.weight)
    nn.init.zeros_(net.bn.bias)
    return net


def _cached_pretrained(arch: str) -> Path | None:
    """The file of ``arch``'s timm pretrained weights if already downloaded (Hugging Face or torch hub cache)."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            for name in ('model.safetensors', 'pytorch_model.bin'):
                found = try_to_load_from_cache(cfg.hf_hub_id, name)
                if isinstance(found, str):
                    return Path(found)
        except ImportError:
            pass
    if cfg.url:
        found = Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(cfg.url)
        if found.is_file():
            return found
    return None
