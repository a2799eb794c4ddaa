"""One training loop: batches of views -> SGD steps on the contrastive loss. It knows nothing of files,
checkpoints or Towhee: the caller gives the batches and is told about every step and epoch."""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .loss import CrossBatchMemory, gather


class TrainingError(ValueError):
    """Training cannot go on: the loss became NaN, or the embeddings collapsed."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) arrived; training stopped after ``step`` steps of epoch ``epoch + 1`` (all
    weights, optimizer and memory consistent at that point)."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f'interrupted at epoch {epoch + 1}, step {step}')
        self.epoch, self.step = epoch, step


@dataclass
class Step:
    """What the caller is told after every step."""
    epoch: int          # 0-based epoch being trained
    step: int           # steps done in this epoch
    steps: int          # steps in an epoch
    loss: float
    lr: float
    images: int         # network inputs (views) in this step, over all ranks
    seconds: float      # this step's wall time
    similarity: float   # mean cosine similarity between views of different images


def no_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD parameter groups: 1-d parameters (biases, norm scales) without weight decay, as the winner."""
    decay, flat = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (flat if parameter.ndim <= 1 else decay).append(parameter)
    return [{'params': flat, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]


def linear_lr(init_lr: float, epoch: int, step: int, steps: int, epochs: int, warmup: float = 0.0) -> float:
    """lr decayed linearly from ``init_lr`` at the first step to 0 after the last; with ``warmup`` (a
    fraction of all steps), first raised linearly from ``init_lr / warm`` to ``init_lr`` over those
    ``warm`` steps and decayed from there."""
    done, total = epoch * steps + step, epochs * steps
    warm = int(warmup * total)
    if done < warm:
        return init_lr * (done + 1) / warm
    return init_lr * (1.0 - (done - warm) / (total - warm))


class CollapseDetector:
    """Flags a collapse: ``patience`` consecutive steps in which different images' embeddings are all
    nearly the same (mean cosine similarity above ``threshold``)."""

    def __init__(self, patience: int, threshold: float = 0.95):
        self.patience, self.threshold, self.run = patience, threshold, 0

    def __call__(self, similarity: float) -> bool:
        self.run = self.run + 1 if similarity > self.threshold else 0
        return self.run >= self.patience


def mean_similarity(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cosine similarity of (N, D) unit embeddings over the pairs of different images (labels (N,))."""
    other = labels[:, None] != labels[None, :]
    if not other.any():
        return 0.0
    embeddings = embeddings.detach().float()
    return float((embeddings @ embeddings.T)[other].mean())


@contextlib.contextmanager
def sigint_flag() -> Iterable[list[bool]]:
    """While inside: Ctrl-C sets flag[0] instead of raising, so a step is never cut in half (the
    loop stops at the next step boundary). Only in the main thread; elsewhere the flag stays False."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def fit(model: nn.Module, memory: CrossBatchMemory, optimizer: torch.optim.Optimizer,
        batches: Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]], steps: int,
        epochs: int, init_lr: float, start_epoch: int = 0, start_step: int = 0,
        device: torch.device = torch.device('cpu'), precision: str = 'fp32', collapse_steps: int = 20,
        warmup: float = 0.0, on_step: Callable[[Step], None] | None = None,
        on_epoch: Callable[[int, float, float], None] | None = None) -> None:
    """Train epochs ``start_epoch`` .. ``epochs - 1`` (0-based), from step ``start_step`` of the first.

    Args:
        model: maps (B, 3, S, S) float32 to (B, D) unit embeddings; in train mode here. May be a
            DistributedDataParallel: then the loss is taken over every rank's embeddings (gathered).
        memory: the cross-batch memory and loss.
        batches: ``batches(epoch, skip)`` gives this rank's (labels (B,), images (B, 3, S, S)) of the
            epoch, the first ``skip`` steps left out.
        steps: steps per epoch.
        warmup: the fraction of all steps the lr rises over before its linear decay (``linear_lr``).
        on_step: told after every step (may raise KeyboardInterrupt to stop there, as Ctrl-C does).
        on_epoch: ``on_epoch(epoch, mean loss, last lr)`` after each epoch.

    Raises:
        Interrupted: Ctrl-C; the state is that after ``step`` steps of ``epoch``.
        TrainingError: the loss became NaN or infinite, or the embeddings collapsed.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    autocast = (torch.autocast(device.type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[precision])
                if precision != 'fp32' and device.type == 'cuda' else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type) if precision == 'fp16' and device.type == 'cuda' else None
    collapse = CollapseDetector(collapse_steps)
    model.train()
    with sigint_flag() as stop:
        for epoch in range(start_epoch, epochs):
            total, count, lr = 0.0, 0, init_lr
            step = start_step if epoch == start_epoch else 0
            for labels, images in batches(epoch, step):
                started = time.perf_counter()
                lr = linear_lr(init_lr, epoch, step, steps, epochs, warmup)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                images, labels = images.to(device, non_blocking=True), labels.to(device)
                with autocast:
                    embeddings = model(images)
                embeddings, all_labels = gather(embeddings.float()), gather(labels)
                loss = memory(embeddings, all_labels)
                if not torch.isfinite(loss):
                    raise TrainingError(f'the loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}: '
                                        f'training diverged; lower init_lr (now {init_lr:g})')
                optimizer.zero_grad(set_to_none=True)
                # Each rank's gradient flows through its own embeddings only and DDP averages over
                # ranks: scaling by the world size gives the gradient of the one global loss.
                scaled = loss * world
                if scaler is None:
                    scaled.backward()
                    optimizer.step()
                else:
                    scaler.scale(scaled).backward()
                    scaler.step(optimizer)
                    scaler.update()
                step += 1
                loss = loss.item()
                total, count = total + loss, count + 1
                similarity = mean_similarity(embeddings, all_labels)
                if collapse(similarity):
                    raise TrainingError(f'training collapsed at epoch {epoch + 1}, step {step}: the embeddings of '
                                        f'different images are all nearly equal (mean cosine similarity '
                                        f'{similarity:.3f} for {collapse.patience} steps); lower init_lr '
                                        f'(now {init_lr:g}) or use a larger batch_size')
                try:
                    if on_step is not None:
                        on_step(Step(epoch, step, steps, loss, lr, len(embeddings),
                                     time.perf_counter() - started, similarity))
                except KeyboardInterrupt:
                    stop[0] = True
                if _any_rank(stop[0], device):
                    raise Interrupted(epoch, step)
            if on_epoch is not None:
                on_epoch(epoch, total / max(count, 1), lr)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is set on any rank (all ranks stop at the same step, or they would hang)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

