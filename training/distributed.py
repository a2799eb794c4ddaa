"""BatchNorm over every rank's batch. On GPUs that is PyTorch's ``SyncBatchNorm`` (timm's converter, which
also knows timm's ``BatchNormAct2d``); PyTorch's refuses CPU modules, so on the CPU (gloo) each
BatchNorm's training forward is replaced by the same computation here: statistics summed over the ranks
with an all_reduce that carries the gradient back. Either way a distributed step normalises as one process would over
the global batch."""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm synchronised across the process group (in place on the CPU)."""
    if device.type == 'cuda':
        from timm.layers import convert_sync_batchnorm
        return convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = types.MethodType(_synced_forward, module)
    return model


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum of every rank's gradient (each rank's loss uses the total)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _synced_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm (and, for timm's BatchNormAct2d, its drop and activation) with the batch statistics of
    all ranks in training; the module's own forward otherwise."""
    if not self.training:
        return type(self).forward(self, x)
    dims = [0] + list(range(2, x.ndim))
    channels = x.shape[1]
    local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / channels])])
    total = _AllReduceSum.apply(local)
    count = total[-1]
    mean = total[:channels] / count
    var = total[channels:2 * channels] / count - mean * mean
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * count / (count - 1))
    shape = [1, channels] + [1] * (x.ndim - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    for extra in ('drop', 'act'):  # timm's BatchNormAct2d
        if hasattr(self, extra):
            y = getattr(self, extra)(y)
    return y
