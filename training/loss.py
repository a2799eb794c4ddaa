"""The winner's loss: pytorch-metric-learning's ``ContrastiveLoss(pos_margin=0, neg_margin=1)`` inside a
``CrossBatchMemory``, restated in a few lines (and gathered across processes as its
``DistributedLossWrapper`` does).

Each step's embeddings are compared with a memory of the last ``size`` embeddings (this step's
included, detached). Views of the same image (same label) are pulled together, all others pushed
apart to at least ``neg_margin``; each kind of pair is averaged over the pairs that still have a
loss (pml's ``AvgNonZeroReducer``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def contrastive_loss(anchors: torch.Tensor, anchor_labels: torch.Tensor, refs: torch.Tensor,
                     ref_labels: torch.Tensor, exclude: torch.Tensor, pos_margin: float = 0.0,
                     neg_margin: float = 1.0) -> torch.Tensor:
    """(A, D) anchors with int64 labels (A,), against (R, D) references with labels (R,); ``exclude``
    is an (A, R) bool mask of pairs left out (an anchor with itself). Embeddings are L2-normalised,
    distance is Euclidean. Returns a scalar: mean of the non-zero positive losses ``relu(d - pos_margin)``
    plus mean of the non-zero negative losses ``relu(neg_margin - d)``."""
    distance = torch.cdist(F.normalize(anchors.float(), dim=1), F.normalize(refs.float(), dim=1))
    same = anchor_labels[:, None] == ref_labels[None, :]
    positive, negative = same & ~exclude, ~same & ~exclude
    return (_mean_nonzero(F.relu(distance[positive] - pos_margin))
            + _mean_nonzero(F.relu(neg_margin - distance[negative])))


def _mean_nonzero(losses: torch.Tensor) -> torch.Tensor:
    count = (losses > 0).sum()
    return losses.sum() / count.clamp(min=1)


class CrossBatchMemory(nn.Module):
    """A FIFO of the last ``size`` embeddings (detached) and their labels, and the loss against it.

    Its state is in buffers, so ``state_dict`` saves and restores it for resuming.

    Called with this step's (N, D) embeddings and (N,) int64 labels, it adds them to the memory and
    returns the contrastive loss of the embeddings against the whole memory (each embedding's own
    slot excluded). In a distributed run, pass every rank's embeddings gathered (``gather``): the
    memory then stays the same on every rank.
    """

    def __init__(self, dim: int, size: int, pos_margin: float = 0.0, neg_margin: float = 1.0):
        super().__init__()
        self.size, self.pos_margin, self.neg_margin = size, pos_margin, neg_margin
        self.register_buffer('embeddings', torch.zeros(size, dim))
        self.register_buffer('labels', torch.zeros(size, dtype=torch.long))
        self.register_buffer('filled', torch.zeros((), dtype=torch.long))  # slots in use, at most size
        self.register_buffer('next', torch.zeros((), dtype=torch.long))    # where the next one goes

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(embeddings)
        if n > self.size:  # a memory smaller than the batch: the batch alone, as pml does
            slots = torch.arange(n, device=embeddings.device)
            return contrastive_loss(embeddings, labels, embeddings.detach(), labels,
                                    slots[:, None] == slots[None, :], self.pos_margin, self.neg_margin)
        slots = (self.next + torch.arange(n, device=self.embeddings.device)) % self.size
        self.embeddings[slots] = embeddings.detach().to(self.embeddings.dtype)
        self.labels[slots] = labels
        self.next.copy_((self.next + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
        used = torch.arange(int(self.filled), device=self.embeddings.device)
        exclude = slots[:, None] == used[None, :]
        return contrastive_loss(embeddings, labels, self.embeddings[used], self.labels[used], exclude,
                                self.pos_margin, self.neg_margin)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated in rank order; this rank's part keeps its gradient (the
    others' are copies). Without a process group, ``tensor`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)
