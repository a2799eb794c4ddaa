"""The optional second stage, as the winner's ``exp/v107.py``: known copies instead of augmentations.

Each known copy (query, reference) is one training item: the query and its reference share a label,
and ``negatives`` images that are not copies of anything (drawn from the training images, as v107
draws references outside the ground truth) each get a label of their own. All are only resized and
normalised (no augmentation: the copies are the real edits). The loss and memory are the first
stage's (``loss.CrossBatchMemory``).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..csvfiles import read_csv
from ..workflow.descriptors import path_resolver
from ..images import ImageError, image_size, regular_file, to_pil_rgb
from .data import _seed

COLUMNS = ('query', 'reference')


def read_pairs(path: str | os.PathLike) -> list[tuple[Path, Path]]:
    """A CSV of known copies with the header ``query,reference`` (more columns are ignored), one pair a
    row; relative image paths are relative to the CSV's folder. Raises ValueError naming the problem:
    no such file, not a UTF-8 CSV, other columns, no pairs, or an image that is missing or not an image."""
    path = Path(path)
    header, rows = read_csv(path, 'pairs file')
    if not set(COLUMNS) <= set(header):
        raise ValueError(f'pairs file {str(path)!r} must have the columns {",".join(COLUMNS)}; '
                         f'it has {",".join(header) or "none"}')
    pairs = []
    checked: set[Path] = set()  # an image in many rows is checked once (a 14 MB JPEG in every row: 25 CPU-s)
    for line, row in enumerate(rows, start=2):
        pair = []
        for column in COLUMNS:
            value = (row.get(column) or '').strip()
            if not value:
                raise ValueError(f'pairs file {str(path)!r} line {line}: no {column} image')
            image = Path(value) if os.path.isabs(value) else path.parent / value
            try:
                if image not in checked:
                    image_size(regular_file(image), f'{column} image {str(image)!r}')
                    checked.add(image)
            except (ImageError, OSError) as e:
                raise ValueError(f'pairs file {str(path)!r} line {line}: {e}') from None
            pair.append(image)
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise ValueError(f'pairs file {str(path)!r} has no pairs (only its header)')
    return pairs


def negative_pool(items: Sequence[Any], pairs: Sequence[tuple[Path, Path]]) -> list[Any]:
    """The training images that are not in any pair (a copy must never be another pair's negative)."""
    real = path_resolver()  # realpath, each folder resolved once (it lstats every prefix: O(depth^2) a call)
    paired = {real(os.fspath(p)) for pair in pairs for p in pair}
    return [item for item in items if not (isinstance(item, (str, os.PathLike)) and real(os.fspath(item)) in paired)]


class PairsDataset(Dataset):
    """Pair i -> (labels (2 + negatives,) int64, images (2 + negatives, 3, S, S) float32): the query and
    its reference labelled i, then the negatives, image j of the pool labelled ``len(pairs) + j``.
    Which negatives depends only on (seed, epoch, i)."""

    def __init__(self, pairs: Sequence[tuple[Any, Any]], pool: Sequence[Any], transform: Callable[[Image.Image], torch.Tensor],
                 negatives: int, seed: int = 0):
        self.pairs, self.pool, self.transform = pairs, pool, transform
        self.negatives, self.seed, self.epoch = negatives, seed, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(_seed(self.seed, self.epoch, index))
        chosen = [rng.randrange(len(self.pool)) for _ in range(self.negatives)]
        images = [*self.pairs[index], *(self.pool[j] for j in chosen)]
        labels = [index, index, *(len(self.pairs) + j for j in chosen)]
        return (torch.tensor(labels, dtype=torch.long),
                torch.stack([self.transform(to_pil_rgb(image, ' (pairs)')) for image in images]))
