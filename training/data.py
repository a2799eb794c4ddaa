"""Training images -> batches of views, reproducibly: an image's views depend only on (seed, epoch,
image), and an epoch's order only on (seed, epoch), whatever the number of loader processes, ranks, or
where a run was interrupted and resumed."""
from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..images import ImageError, to_pil_rgb


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (the same in every process, unlike ``hash``)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % (1 << 63)
    return value


class ViewsDataset(Dataset):
    """Item i -> (i, views of image i): an int64 label and ``views(image)``, e.g. (ncrops, 3, S, S).

    ``items`` are anything ``images.to_pil_rgb`` reads (paths, PIL images, arrays, bytes), or (image,
    label) pairs whose label is ignored (a Towhee/torchvision dataset). An image that fails to decode
    here (it passed the header check) is replaced by the next one that reads, and counted in ``failed``.
    """

    def __init__(self, items: Sequence[Any], views: Callable[[Image.Image], torch.Tensor], seed: int = 0):
        self.items, self.views, self.seed = items, views, seed
        self.epoch = 0
        self.failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> Image.Image:
        item = self.items[index]
        if isinstance(item, tuple):
            item = item[0]
        return to_pil_rgb(item, f' (training image {index})')

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            try:
                image = self.image(i)
                break
            except ImageError:
                self.failed.add(i)
        else:
            raise ImageError('no training image can be read')
        # Seed Python's and torch's generators for this image only, leaving the caller's untouched.
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = _seed(self.seed, self.epoch, index)
            random.seed(seed)
            torch.manual_seed(seed)
            views = self.views(image)
        random.setstate(state)
        return index, views


class EpochBatches(Sampler[list[int]]):
    """The batches of one epoch for one rank: a permutation of the n images fixed by (seed, epoch),
    cut into global batches of ``batch_size`` (the last incomplete one dropped); rank r of w gets
    items r, r+w, ... of each batch. ``skip`` leaves out the first batches (resuming mid-epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, skip: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.skip = rank, world, skip

    def __len__(self) -> int:
        return self.n // self.batch_size - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=generator).tolist()
        for b in range(self.skip, self.n // self.batch_size):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[self.rank::self.world]


def collate(samples: list[tuple[int | torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(label, (V, 3, S, S))] -> labels (N*V,) int64 and images (N*V, 3, S, S), view-major as the
    winner stacks them (all first views, then all second views, ...). A label is one int for all V views
    of an item, or (V,) labels, one per view (``pairs.PairsDataset``)."""
    labels = torch.stack([torch.as_tensor(label, dtype=torch.long) for label, _ in samples])  # (N,) or (N, V)
    views = torch.stack([v for _, v in samples])          # (N, V, 3, S, S)
    n, v = views.shape[:2]
    labels = labels.repeat(v) if labels.ndim == 1 else labels.T.reshape(n * v)
    return labels, views.transpose(0, 1).reshape(n * v, *views.shape[2:])
