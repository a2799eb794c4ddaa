"""What a fine-tuning run is told: one dataclass, its checks, and the two ways users spell it (the
Towhee tutorial's ``training_args`` dict and Towhee's ``TrainingConfig``). Imports nothing heavy: the
command line builds its parser from these defaults."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..defaults import cpu_count

PRECISIONS = ('fp32', 'bf16', 'fp16')


@dataclass
class TrainConfig:
    """Settings of one run. Defaults are the Towhee tutorial's, and the winner's recipe (``exp/v98.py``)
    where the tutorial says nothing."""
    output_dir: str = './output'        # checkpoint_epoch%04d.pth.tar, train_log.jsonl
    epochs: int = 6                     # the last epoch; training runs start_epoch+1 .. epochs
    start_epoch: int = 0                # epochs already done (the lr schedule continues from there)
    batch_size: int = 128               # images per step over all processes (each gives ncrops views)
    init_lr: float = 0.1                # SGD's lr at the first epoch, decayed linearly to 0
    warmup: float = 0.0                 # fraction of all steps over which the lr first rises linearly to init_lr
    weight_decay: float = 1e-6          # on weights only; 1-d parameters (biases, norms) get none
    momentum: float = 0.9
    ncrops: int = 2                     # views per image: one moderate, ncrops-1 hard
    hard_p_scale: float = 1.0           # times each hard-view edit's probability (1: the winner's; 0.5 gentler)
    hard_p: dict[str, float] = field(default_factory=dict)  # named edits' probabilities set outright (augment.HARD_EDITS)
    colour_jitter: float = 0.8          # hard views' brightness/contrast/saturation jitter (hue: a quarter)
    memory_size: int = 1024             # embeddings of past steps compared with (cross-batch memory)
    pos_margin: float = 0.0             # ContrastiveLoss(pos_margin=0, neg_margin=1)
    neg_margin: float = 1.0
    gem_p: float = 1.0                  # GeM power while training (the published stages: 1.0)
    input_size: int | None = None       # training crop side; None: the model's input size
    seed: int = 0
    workers: int = 0                    # DataLoader processes (0: load in the training process)
    device: str | None = None           # None: cuda:<gpu> when CUDA exists, else the CPU (with a warning)
    gpu: int = 0                        # the GPU when not distributed
    distributed: bool = False           # DistributedDataParallel over every local GPU, or under torchrun
    precision: str = 'fp32'             # autocast on GPUs: bf16 or fp16
    resume: str | None = None           # a checkpoint of this training to continue
    collapse_steps: int = 20            # consecutive steps of near-equal embeddings that stop training
    pairs: str | None = None            # second stage (exp/v107.py): a CSV of known copies (query,reference)
    negatives: int = 30                 # with pairs: non-copy images drawn for each pair
    quiet: bool = False                 # no progress bar
    extra_args: dict[str, Any] = field(default_factory=dict, repr=False)  # recorded, unused

    def check(self) -> TrainConfig:
        """Raise ValueError naming the first bad setting; return self."""
        def whole(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f'{name} must be a whole number >= {low}, got {value!r}')

        def number(name: str, positive: bool) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value <= 0 if positive else value < 0):
                raise ValueError(f'{name} must be a finite number {"> 0" if positive else ">= 0"}, got {value!r}')
            setattr(self, name, float(value))

        whole('epochs', 1)
        whole('start_epoch', 0)
        if self.start_epoch >= self.epochs:
            raise ValueError(f'start_epoch ({self.start_epoch}) must be below epochs ({self.epochs}): nothing to train')
        whole('batch_size', 2)  # contrastive learning needs other images in the batch
        whole('ncrops', 2)      # and at least two views of each
        whole('memory_size', 0)
        whole('seed', 0)
        whole('workers', 0)
        cores = cpu_count()
        if self.workers > 4 * cores:  # each is a process: a mistyped 1000000 forked until the system's limit
            raise ValueError(f'workers={self.workers} is more than 4 image loading processes per CPU core '
                             f'({cores} here)')
        whole('gpu', 0)
        whole('collapse_steps', 1)
        whole('negatives', 0)
        if self.pairs is not None and not isinstance(self.pairs, (str, os.PathLike)):
            raise TypeError(f'pairs must be the path of a CSV file (query,reference), got {type(self.pairs).__name__}')
        if self.pairs is not None:
            self.pairs = str(self.pairs)
        if self.input_size is not None:
            whole('input_size', 32)
        number('init_lr', positive=True)
        number('weight_decay', positive=False)
        number('momentum', positive=False)
        number('pos_margin', positive=False)
        number('neg_margin', positive=True)
        number('gem_p', positive=True)
        number('hard_p_scale', positive=False)
        if self.hard_p_scale > 1:
            raise ValueError(f'hard_p_scale must be between 0 and 1 (it multiplies probabilities), got {self.hard_p_scale!r}')
        self._check_hard_p()
        number('colour_jitter', positive=False)
        if self.colour_jitter > 1:
            raise ValueError(f'colour_jitter must be between 0 and 1, got {self.colour_jitter!r}')
        number('warmup', positive=False)
        if self.warmup >= 1:
            raise ValueError(f'warmup must be a fraction of the steps, 0 <= warmup < 1, got {self.warmup!r}')
        if self.precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {list(PRECISIONS)}, got {self.precision!r}')
        if not isinstance(self.output_dir, (str, os.PathLike)):
            raise TypeError(f'output_dir must be a folder path, got {type(self.output_dir).__name__}')
        self.output_dir = str(self.output_dir)
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f'output_dir {self.output_dir!r} is a file, not a folder')
        folder = out
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f'output_dir {self.output_dir!r} cannot be written ({str(folder)!r} is not writable)')
        earlier = sorted(out.glob('checkpoint_*.pth.tar')) if self.resume is None and out.is_dir() else []
        if earlier:  # a second run into one folder (op.train's default './output') replaced the first's epochs
            raise ValueError(f'output_dir {self.output_dir!r} already holds an earlier run ({earlier[0].name}'
                             f'{f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""}): choose another '
                             'output_dir, delete them, or continue that run with --resume (resume=)')
        return self

    def _check_hard_p(self) -> None:
        from .augment import HARD_EDITS  # torchvision: only when a run is checked, not to build the parser
        if not isinstance(self.hard_p, dict):
            raise TypeError(f'hard_p must be a dict of edit name -> probability, got {type(self.hard_p).__name__}')
        for name, p in self.hard_p.items():
            if name not in HARD_EDITS:
                raise ValueError(f'hard_p names an unknown edit {name!r}: known are {list(HARD_EDITS)}')
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f'hard_p[{name!r}] must be a probability between 0 and 1, got {p!r}')
        self.hard_p = {name: float(p) for name, p in self.hard_p.items()}

    def record(self) -> dict[str, Any]:
        """The settings as plain values (kept in every checkpoint's ``args`` and in train_log.jsonl)."""
        out = {k: v for k, v in asdict(self).items() if k not in ('extra_args', 'quiet')}
        return {**self.extra_args, **out}


# The Towhee tutorial's documented keys (fine_tune/9_fine_tune_video_deduplication_model.ipynb), then ours.
TUTORIAL_KEYS = ('train_data_dir', 'distributed', 'output_dir', 'gpu', 'start_epoch', 'epochs', 'batch_size', 'init_lr')
TRAINING_ARGS = TUTORIAL_KEYS + tuple(f.name for f in fields(TrainConfig)
                                      if f.name not in TUTORIAL_KEYS + ('extra_args', 'quiet')) + ('quiet',)


def from_training_args(training_args: dict[str, Any] | None) -> tuple[TrainConfig, Any]:
    """The tutorial's ``training_args`` dict -> (checked config, ``train_data_dir``). Unknown keys are
    a ValueError listing the known ones."""
    if training_args is None:
        training_args = {}
    if not isinstance(training_args, dict):
        raise TypeError(f'training_args must be a dict such as {{"train_data_dir": "./images", "epochs": 2}}, '
                        f'got {type(training_args).__name__}')
    unknown = sorted(set(training_args) - set(TRAINING_ARGS))
    if unknown:
        raise ValueError(f'unknown training_args {unknown}: known keys are {list(TRAINING_ARGS)}')
    args = dict(training_args)
    data = args.pop('train_data_dir', None)
    return TrainConfig(**args).check(), data


def from_towhee_config(config: Any) -> TrainConfig:
    """What of Towhee's ``TrainingConfig`` applies to this self-supervised training: ``output_dir``,
    ``epoch_num``, ``batch_size``, ``lr``, ``seed``, ``dataloader_num_workers`` and ``device_str``. Its
    classification settings (loss, metric, optimizer, scheduler) do not apply and are ignored."""
    device = getattr(config, 'device_str', None)
    return TrainConfig(output_dir=config.output_dir, epochs=config.epoch_num, batch_size=config.batch_size,
                       init_lr=config.lr, seed=config.seed, workers=config.dataloader_num_workers,
                       device=device or None).check()
