"""Fine-tuning (issue 16): the Towhee tutorial's cell, ``towhee-isc train``, the recipe's parts, resuming,
bad input, and DistributedDataParallel on 2 CPU processes (gloo, 127.0.0.1). A tiny timm network
(``test_efficientnet``, 82k parameters) at 64 px on 8 small photos keeps each training to seconds."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from commands import assert_one_line_error, towhee_isc
from towhee_isc.testing import make_synthetic_checkpoint
from towhee_isc.training import augment
from towhee_isc.training.config import TRAINING_ARGS, TrainConfig
from towhee_isc.training.data import EpochBatches
from towhee_isc.training.loop import CollapseDetector, mean_similarity
from towhee_isc.training.loss import CrossBatchMemory
from towhee_isc.training.run import TrainingInterrupted, initial_net, train

REPO = Path(__file__).resolve().parents[1]
ARCH, SIZE = 'test_efficientnet', 64
# One thread per process: on a busy 2-core machine, 2 OpenMP threads per process spin against each other.
ONE_THREAD = {'OMP_NUM_THREADS': '1'}


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory, photos) -> Path:
    path = tmp_path_factory.mktemp('tiny') / 'tiny.pth.tar'
    make_synthetic_checkpoint(path, ARCH, SIZE, photos[:4])
    return path


@pytest.fixture(scope='module')
def images(tmp_path_factory, photos) -> Path:
    """8 small training photos in a folder."""
    folder = tmp_path_factory.mktemp('training_images')
    for i, photo in enumerate(photos):
        small = photo.copy()
        small.thumbnail((96, 96))
        small.save(folder / f'{i}.jpg', quality=90)
    return folder


def config(out: Path, **settings) -> TrainConfig:
    return TrainConfig(output_dir=str(out), device='cpu', quiet=True, **{'epochs': 1, 'batch_size': 4, **settings})


def load(path: Path) -> dict:
    """A checkpoint with everything this training saves (tensors, plain values, argparse.Namespace)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load(path)['state_dict']


# -- the recipe's parts ------------------------------------------------------------------------------

MODES = {'1': None, 'L': None, 'P': None, 'RGB': None, 'RGBA': None, 'CMYK': None, 'YCbCr': None, 'LA': None,
         'I;16': np.uint16, 'I': np.int32, 'F': np.float32}


def every_mode(photo: Image.Image) -> list[Image.Image]:
    small = photo.resize((48, 40))
    out = []
    for mode, dtype in MODES.items():
        if dtype is None:
            out.append(small.convert(mode))
        else:
            grey = np.asarray(small.convert('L'), dtype=np.float64) * (257 if mode == 'I;16' else 1)
            out.append(Image.fromarray(grey.astype(dtype), mode) if mode != 'I;16' else
                       Image.fromarray(grey.astype(np.uint16)))
    return out


def test_every_augmentation_takes_every_image_mode(photos):
    pool = [photos[1].resize((30, 20))]
    augmentations = [augment.Pixelize(p=1), augment.ShufflePixels(p=1), augment.JpegQuality(p=1), augment.Blur(p=1),
                     augment.Rotate(p=1), augment.EdgeEnhance(p=1), augment.OverlayText(p=1),
                     augment.OverlayEmoji(p=1), augment.OverlayImageOrCrop(pool, 32, overlay_p=1.0),
                     augment.OverlayImageOrCrop(pool, 32, overlay_p=0.0),
                     augment.Torchvision(__import__('torchvision').transforms.ColorJitter(0.8, 0.8, 0.8, 0.2))]
    views = augment.recipe(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ncrops=3, pool=pool)
    for image in every_mode(photos[0]):
        for augmentation in augmentations:
            out = augmentation(image)
            assert isinstance(out, Image.Image) and out.mode == 'RGB' and min(out.size) >= 1, (image.mode, augmentation)
        x = views(image)
        assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all(), image.mode
    # the hard views really change the image; the emoji and fonts come from augly (the train extra)
    assert augment.OverlayEmoji().emoji and augment.OverlayText().fonts
    rgb = photos[0].resize((64, 64))
    # Drawn sizes are random: unseeded, a 6-pixel emoji once changed the mean by only 0.36 (one suite run).
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    for augmentation in augmentations[:8]:
        assert np.abs(np.asarray(augmentation(rgb.copy()).resize(rgb.size), float) - np.asarray(rgb, float)).mean() > 0.5, augmentation


def test_hard_p_scale_multiplies_each_hard_edit_probability_only():
    mean_std = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    winner, gentle = (augment.recipe(32, *mean_std, hard_p_scale=scale).hard.transforms for scale in (1.0, 0.5))
    def probabilities(hard):
        edits = [hard[0]] + hard[2].augmentations
        return [e.p for e in edits], hard[-1].erase.p
    (p1, erase1), (p05, erase05) = probabilities(winner), probabilities(gentle)
    flips = {0.5, 0.1}  # horizontal and vertical flips are not edits a copy makes hard
    assert [p if p in flips else p / 2 for p in p1] == p05 and erase05 == erase1 / 2 == 0.125
    assert p1[1] == 1.0 and sum(p1) > 2 * sum(p for p in p05 if p not in flips)  # the colour jitter was always on
    # hard_p sets named edits outright (the rest still scaled); colour_jitter sets the jitter's strength
    named = augment.recipe(32, *mean_std, hard_p_scale=0.5, hard_p={'greyscale': 0.9, 'colour': 0.0, 'overlay': 0.4},
                           colour_jitter=0.4).hard.transforms
    p_named, erase_named = probabilities(named)
    assert winner[1].overlay_p == gentle[1].overlay_p == 0.1 and named[1].overlay_p == 0.4
    assert p_named[1] == 0.0 and p_named[5] == 0.9 and p_named[:1] + p_named[2:5] + p_named[6:] == p05[:1] + p05[2:5] + p05[6:]
    assert erase_named == erase05
    jitter = named[2].augmentations[0].transform
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    assert winner[2].augmentations[0].transform.hue == (-0.2, 0.2)  # the winner's 0.8/0.8/0.8/0.2 by default


def test_warmup_raises_the_lr_linearly_then_decays_it_to_zero():
    from towhee_isc.training.loop import linear_lr
    plain = [linear_lr(0.1, e, s, 5, 2) for e in range(2) for s in range(5)]
    assert plain[0] == 0.1 and plain == [linear_lr(0.1, e, s, 5, 2, 0.0) for e in range(2) for s in range(5)]
    warm = [linear_lr(0.1, e, s, 5, 2, 0.2) for e in range(2) for s in range(5)]  # 2 of 10 steps
    assert warm[:3] == pytest.approx([0.05, 0.1, 0.1]) and warm[3:] == pytest.approx([0.1 * (1 - k / 8) for k in range(1, 8)])


def test_cross_batch_memory_is_the_contrastive_loss_over_memory_pairs():
    """Against a restatement with loops: every (batch item, memory slot) pair except an item with its own
    slot; positives relu(d - 0), negatives relu(1 - d), each averaged over the pairs with a loss."""
    torch.manual_seed(0)
    memory = CrossBatchMemory(dim=8, size=10)
    seen: list[tuple[torch.Tensor, int]] = []
    for step in range(4):  # 4 x 4 = 16 > 10: the memory wraps around
        embeddings = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
        labels = torch.tensor([step, step, 9, 9 + step])
        loss = memory(embeddings, labels)
        seen = (seen + [(e.detach(), int(lab)) for e, lab in zip(embeddings, labels)])[-10:]
        own = len(seen) - 4
        pos, neg = [], []
        for i, (e, lab) in enumerate(zip(embeddings.detach(), labels.tolist())):
            for j, (m, mlab) in enumerate(seen):
                if j == own + i:
                    continue
                d = float((e - m).norm())
                (pos if mlab == lab else neg).append(max(d, 0.0) if mlab == lab else max(1.0 - d, 0.0))
        expected = sum(pos) / max(1, sum(v > 0 for v in pos)) + sum(neg) / max(1, sum(v > 0 for v in neg))
        assert abs(loss.item() - expected) < 1e-5, step
        loss.backward()
        assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    state = memory.state_dict()
    restored = CrossBatchMemory(dim=8, size=10)
    restored.load_state_dict(state)
    assert torch.equal(restored.embeddings, memory.embeddings) and int(restored.next) == int(memory.next) == 6


def test_epoch_batches_shard_each_global_batch_between_ranks():
    single = list(EpochBatches(10, 4, seed=3, epoch=1))
    ranks = [list(EpochBatches(10, 4, seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    assert len(single) == 2 and all(len(batch) == 4 for batch in single)
    for b, batch in enumerate(single):
        assert set(ranks[0][b]).isdisjoint(ranks[1][b]) and set(ranks[0][b]) | set(ranks[1][b]) == set(batch)
    assert list(EpochBatches(10, 4, seed=3, epoch=1, skip=1)) == single[1:]
    assert list(EpochBatches(10, 4, seed=3, epoch=2)) != single  # a new order each epoch


def test_collapse_detector_and_similarity():
    same = torch.nn.functional.normalize(torch.ones(6, 4), dim=1)
    labels = torch.arange(6)
    assert mean_similarity(same, labels) == pytest.approx(1.0)
    detector = CollapseDetector(patience=3)
    assert [detector(0.99), detector(0.99), detector(0.2), detector(0.99), detector(0.99), detector(0.99)] == \
        [False, False, False, False, False, True]


# -- Isc.train: the Towhee tutorial's cell -----------------------------------------------------------

TUTORIAL_CELL = """\
import towhee
op = towhee.ops.image_embedding.isc().get_op()
op.train(training_args={
        'train_data_dir': './training_images',
        'distributed': False,
        'output_dir': './output',
        'gpu': 0,
        'epochs': 2,
        'batch_size': 8,
        'init_lr': 0.1
    })
new_op = towhee.ops.image_embedding.isc(checkpoint_path='./output/checkpoint_epoch0001.pth.tar').get_op()
"""


def test_tutorial_cell_runs_in_a_fresh_process(tmp_path, tiny_ckpt, images, photos, reference):
    """The cell as Towhee's notebook has it, in a new process that finds the operator through Towhee's hub
    folder. One change: the starting network is a tiny one (``isc(checkpoint_path=...)``), since training
    the published EfficientNetV2-M at 512 px does not fit a CPU test."""
    home = tmp_path / 'towhee_home'
    shutil.copytree(REPO, home / 'operators' / 'image-embedding' / 'isc' / 'versions' / 'main',
                    ignore=shutil.ignore_patterns('.git', '.venv*', '__pycache__', 'saved', '*.egg-info', 'tests'))
    shutil.copytree(images, tmp_path / 'training_images')
    cell = TUTORIAL_CELL.replace('isc().get_op()', f"isc(checkpoint_path={str(tiny_ckpt)!r}).get_op()", 1)
    assert cell.count('\n') == TUTORIAL_CELL.count('\n') and cell != TUTORIAL_CELL
    photos[5].save(tmp_path / 'probe.png')
    check = """
import json, numpy as np
before = op.model.weights_key
vec, new = op('probe.png'), new_op('probe.png')
last = towhee.ops.image_embedding.isc(checkpoint_path='./output/checkpoint_epoch0002.pth.tar').get_op()('probe.png')
print(json.dumps({'same_as_epoch2': float(np.abs(vec - last).max()), 'epoch1_differs': float(np.abs(new - last).max()),
                  'backend': op.model.backend.name, 'model_name': op.model_name}))
"""
    env = {**os.environ, **ONE_THREAD, 'TOWHEE_HOME': str(home), 'CUDA_VISIBLE_DEVICES': ''}
    result = subprocess.run([sys.executable, '-c', cell + check], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out['same_as_epoch2'] < 1e-5            # the operator now embeds with the last epoch's weights
    assert out['epoch1_differs'] > 1e-4            # and epoch 1's checkpoint is a different network
    assert out['model_name'] == 'checkpoint_epoch0002'
    assert result.stderr.count('no GPU found: training on the CPU') == 1
    written = sorted(p.name for p in (tmp_path / 'output').iterdir())
    assert written == ['checkpoint_epoch0001.pth.tar', 'checkpoint_epoch0002.pth.tar', 'train_log.jsonl']
    # the official format, as the winner's own loader reads it
    raw = load(tmp_path / 'output' / 'checkpoint_epoch0001.pth.tar')
    assert raw['arch'] == ARCH and raw['args'].input_size == SIZE and raw['epoch'] == 1
    assert all(k.startswith('module.') for k in raw['state_dict'])
    from towhee_isc import Isc
    ours = Isc(checkpoint_path=tmp_path / 'output' / 'checkpoint_epoch0001.pth.tar', device='cpu', backend='torch')
    assert np.abs(reference(tmp_path / 'output' / 'checkpoint_epoch0001.pth.tar', [photos[5]])[0]
                  - ours(photos[5])).max() < 1e-4
    log = [json.loads(line) for line in (tmp_path / 'output' / 'train_log.jsonl').read_text().splitlines()]
    assert [entry['epoch'] for entry in log] == [1, 2] and all(math.isfinite(e['loss']) and e['lr'] > 0 for e in log)


def test_train_takes_towhee_config_and_dataset_and_checks_keys(tmp_path, tiny_ckpt, photos):
    from towhee_isc import Isc
    op = Isc(checkpoint_path=tiny_ckpt, device='cpu', backend='torch')
    with pytest.raises(ValueError, match="unknown training_args \\['epoch'\\]: known keys are .*'train_data_dir'"):
        op.train(training_args={'train_data_dir': str(tmp_path), 'epoch': 2})
    assert set(TRAINING_ARGS) >= {'train_data_dir', 'distributed', 'output_dir', 'gpu', 'start_epoch', 'epochs',
                                  'batch_size', 'init_lr'}
    before = op(photos[0])
    # Towhee's TrainingConfig by its field names: importing towhee.trainer runs pip (for torchmetrics), a
    # minute offline; the adapter reads only these attributes.
    towhee_config = SimpleNamespace(output_dir=str(tmp_path / 'out'), epoch_num=1, batch_size=4, lr=0.05, seed=42,
                                    dataloader_num_workers=0, device_str='cpu')
    written = op.train(towhee_config, [p.resize((80, 80)) for p in photos])  # Towhee's signature, a dataset of images
    assert [Path(p).name for p in written] == ['checkpoint_epoch0001.pth.tar']
    assert np.abs(op(photos[0]) - before).max() > 1e-4
    with pytest.raises(ValueError, match='eval_dataset is not used'):
        op.train(towhee_config, photos, eval_dataset=photos)


# -- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('settings, message', [
    ({'batch_size': 1}, 'batch_size must be a whole number >= 2'),
    ({'epochs': 0}, 'epochs must be a whole number >= 1'),
    ({'init_lr': 0}, 'init_lr must be a finite number > 0'),
    ({'init_lr': float('nan')}, 'init_lr must be a finite number > 0'),
    ({'workers': 10**6}, 'workers=1000000 is more than 4 image loading processes per CPU core'),
    ({'batch_size': 16}, '8 readable training images are fewer than batch_size=16'),
    ({'hard_p_scale': 1.5}, 'hard_p_scale must be between 0 and 1'),
    ({'hard_p': {'sepia': 0.5}}, "hard_p names an unknown edit 'sepia': known are"),
    ({'hard_p': {'blur': 1.5}}, r"hard_p\['blur'\] must be a probability between 0 and 1"),
    ({'colour_jitter': 1.5}, 'colour_jitter must be between 0 and 1'),
    ({'warmup': 1.0}, 'warmup must be a fraction of the steps'),
])
def test_bad_settings_are_one_clear_error_and_write_nothing(tmp_path, tiny_ckpt, images, settings, message):
    net, size = initial_net('', str(tiny_ckpt), None, None)
    with pytest.raises(ValueError, match=message):
        train(sorted(images.iterdir()), net, size, config(tmp_path / 'out', **settings))
    assert not (tmp_path / 'out').exists()


def test_a_fresh_backbone_warns_of_random_weights_unless_a_resume_replaces_them():
    """`train --timm-backbone X --resume CKPT` said 'starting from random weights' while resuming."""
    import warnings
    from towhee_isc.training.run import _cached_pretrained
    for resuming, expected in ((False, _cached_pretrained('resnet18') is None), (True, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            initial_net('', None, 'resnet18', 64, resuming=resuming)
        assert any('starting from random weights' in str(w.message) for w in caught) == expected, resuming


def test_bad_folders_and_diverging_loss(tmp_path, tiny_ckpt, images):
    net, size = initial_net('', str(tiny_ckpt), None, None)
    paths = sorted(images.iterdir())
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='is a file, not a folder'):
        train(paths, net, size, config(tmp_path / 'file'))
    (tmp_path / 'junk.jpg').write_text('not an image')
    with pytest.raises(ValueError, match='no readable training images \\(1 unreadable\\)'):
        train([tmp_path / 'junk.jpg'], net, size, config(tmp_path / 'out'))
    # an earlier checkpoint is kept when a later run diverges
    out = tmp_path / 'run'
    train(paths, net, size, config(out))
    first = (out / 'checkpoint_epoch0001.pth.tar').read_bytes()
    with pytest.raises(ValueError, match='the loss became nan.*lower init_lr'):
        train(paths, net, size, config(out, epochs=2, init_lr=1e30, resume=str(out / 'checkpoint_epoch0001.pth.tar')))
    assert (out / 'checkpoint_epoch0001.pth.tar').read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint_epoch0001.pth.tar', 'train_log.jsonl']


# -- interrupt and resume ---------------------------------------------------------------------------

def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, tiny_ckpt, images):
    """2 epochs of 2 steps, stopped after step 3 (as Ctrl-C stops it) and resumed from the saved checkpoint:
    the same weights, optimizer and memory as a run that was never interrupted."""
    net, size = initial_net('', str(tiny_ckpt), None, None)
    paths = sorted(images.iterdir())
    train(paths, net, size, config(tmp_path / 'whole', epochs=2))

    def stop_at_step_3(step):
        if step.epoch * step.steps + step.step == 3:
            raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted) as stopped:
        train(paths, net, size, config(tmp_path / 'parts', epochs=2), on_step=stop_at_step_3)
    saved = stopped.value.checkpoint
    assert saved.name == 'checkpoint_interrupted.pth.tar'
    assert sorted(p.name for p in saved.parent.iterdir()) == ['checkpoint_epoch0001.pth.tar',
                                                              'checkpoint_interrupted.pth.tar', 'train_log.jsonl']
    train(paths, net, size, config(tmp_path / 'parts', epochs=2, resume=str(saved)))
    whole = load(tmp_path / 'whole' / 'checkpoint_epoch0002.pth.tar')
    parts = load(tmp_path / 'parts' / 'checkpoint_epoch0002.pth.tar')
    for key, value in whole['state_dict'].items():
        assert torch.allclose(value.float(), parts['state_dict'][key].float(), atol=1e-6), key
    assert torch.allclose(whole['memory']['embeddings'], parts['memory']['embeddings'], atol=1e-6)
    momentum = [s['momentum_buffer'] for s in whole['optimizer']['state'].values()]
    assert all(torch.allclose(a, s['momentum_buffer'], atol=1e-6)
               for a, s in zip(momentum, parts['optimizer']['state'].values()))


# -- the command ---------------------------------------------------------------------------------------

def test_train_command_progress_skipped_files_log_and_ctrl_c(tmp_path, tiny_ckpt, images):
    """The command as a user runs it: an unreadable file is skipped and named, the progress bar shows
    epoch, step, loss and images/s, train_log.jsonl has every epoch; Ctrl-C saves a resumable
    checkpoint and exits 130. Bad input is one line and exit 2, with nothing written."""
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    out = tmp_path / 'out'
    process = subprocess.Popen([sys.executable, '-m', 'towhee_isc', 'train', str(images), str(tmp_path / 'broken.jpg'),
                                '-o', str(out), '--checkpoint', str(tiny_ckpt), '--epochs', '50', '--batch-size', '4',
                                '--lr', '0.05', '--device', 'cpu', '--hard-p', 'greyscale=0.5', '--warmup', '0.1',
                                '--colour-jitter', '0.4'],
                               env={**os.environ, **ONE_THREAD, 'TOWHEE_ISC_PROGRESS': '1'},  # the bar, into this pipe
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / 'train_log.jsonl').exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert 'warning: skipped 1 unreadable training file(s)' in stderr and 'broken.jpg' in stderr
    assert re.search(r'epoch \d+: .* step \d/2 loss \d+\.\d+ \d+\.\d images/s', stderr), stderr[-2000:]  # tqdm adds ETA
    saved = out / 'checkpoint_interrupted.pth.tar'
    assert saved.is_file() and f'--resume {saved} to continue' in stderr
    assert load(saved)['epoch'] >= 1 and 'optimizer' in load(saved) and 'memory' in load(saved)
    settings = load(saved)['args']  # the recipe's options reach the run and are recorded
    assert (settings.hard_p, settings.warmup, settings.colour_jitter) == ({'greyscale': 0.5}, 0.1, 0.4)
    log = [json.loads(line) for line in (out / 'train_log.jsonl').read_text().splitlines()]
    assert log[0]['epoch'] == 1 and math.isfinite(log[0]['loss']) and (out / 'checkpoint_epoch0001.pth.tar').is_file()

    # The same command again into that folder: refused, the earlier run's checkpoints untouched.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert_one_line_error(towhee_isc('train', images, '-o', out, '--checkpoint', tiny_ckpt, env=ONE_THREAD),
                          f"output_dir '{out}' already holds an earlier run (checkpoint_epoch0001.pth.tar and")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    empty = tmp_path / 'empty'
    empty.mkdir()
    assert_one_line_error(towhee_isc('train', empty, '-o', tmp_path / 'none', '--checkpoint', tiny_ckpt, env=ONE_THREAD),
                          'no images found')
    assert not (tmp_path / 'none').exists()


# -- DistributedDataParallel on 2 CPU processes ----------------------------------------------------------

def test_distributed_on_two_cpu_processes_equals_one_process(tmp_path, tiny_ckpt, images):
    """torchrun, 2 ranks on gloo at 127.0.0.1, a global batch of 4 (2 images each): BatchNorm and the loss see
    the whole global batch, so loss and weights match one process on the same batches; rank 0 alone writes."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
         '--master_port', str(port), '-m', 'towhee_isc', 'train', str(images), '-o', str(tmp_path / 'ddp'),
         '--checkpoint', str(tiny_ckpt), '--epochs', '1', '--batch-size', '4', '--distributed', '--device', 'cpu',
         '--quiet'], env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / 'ddp').iterdir()) == ['checkpoint_epoch0001.pth.tar', 'train_log.jsonl']
    net, size = initial_net('', str(tiny_ckpt), None, None)
    train(sorted(images.iterdir()), net, size, config(tmp_path / 'one'))
    ddp_loss = json.loads((tmp_path / 'ddp' / 'train_log.jsonl').read_text())['loss']
    one_loss = json.loads((tmp_path / 'one' / 'train_log.jsonl').read_text())['loss']
    assert abs(ddp_loss - one_loss) < 1e-4
    ddp, one = weights(tmp_path / 'ddp' / 'checkpoint_epoch0001.pth.tar'), weights(tmp_path / 'one' / 'checkpoint_epoch0001.pth.tar')
    assert max(float((ddp[k].float() - one[k].float()).abs().max()) for k in one) < 1e-3


# -- the second stage: known copies (exp/v107.py) ---------------------------------------------------------

@pytest.fixture(scope='module')
def pairs_csv(tmp_path_factory, images) -> Path:
    """4 known copies (rotated, cropped edits of 4 of the training photos) listed as query,reference, with
    paths relative to the CSV's folder; the other 4 photos are the negatives."""
    folder = tmp_path_factory.mktemp('pairs')
    rows = ['query,reference']
    for i, reference in enumerate(sorted(images.iterdir())[:4]):
        with Image.open(reference) as image:
            image.rotate(15 * (i + 1), expand=True).crop((4, 4, 80, 70)).save(folder / f'q{i}.png')
        rows.append(f'q{i}.png,{reference}')
    (folder / 'pairs.csv').write_text('\n'.join(rows) + '\n')
    return folder / 'pairs.csv'


def test_pairs_items_are_query_reference_and_negatives_with_their_labels(images, pairs_csv, tmp_path):
    from towhee_isc.training.data import collate
    from towhee_isc.training.pairs import PairsDataset, negative_pool, read_pairs
    pairs = read_pairs(pairs_csv)
    assert [q.name for q, _ in pairs] == ['q0.png', 'q1.png', 'q2.png', 'q3.png'] and all(q.is_file() for q, _ in pairs)
    resolved = []
    real = os.path.realpath

    def counted(path):
        resolved.append(path)
        return real(path)
    (tmp_path / 'link.png').symlink_to(pairs[0][1])  # a link to a reference is that reference
    with mock.patch('os.path.realpath', counted):
        pool = negative_pool(sorted(images.iterdir()) + [tmp_path / 'link.png'], pairs)
    assert [p.name for p in pool] == [p.name for p in sorted(images.iterdir())[4:]]  # no copy is a negative
    # each folder resolved once, not each file (#14 round 12: O(depth^2) a file, 2,000 folders deep)
    assert len(resolved) <= 3, resolved
    dataset = PairsDataset(pairs, pool, lambda image: torch.zeros(3, 8, 8), negatives=3, seed=0)
    labels, views = collate([dataset[0], dataset[1]])
    assert views.shape == (10, 3, 8, 8)
    assert labels[:4].tolist() == [0, 1, 0, 1]                      # view-major: queries, then references
    assert all(4 <= label < 4 + len(pool) for label in labels[4:].tolist())  # each negative its own pool label
    again = collate([dataset[0], dataset[1]])[0]
    dataset.epoch = 1
    assert torch.equal(labels, again) and any(not torch.equal(labels, collate([dataset[0], dataset[1]])[0])
                                              for dataset.epoch in range(1, 6))  # fixed per (seed, epoch, pair)


def test_pairs_train_the_second_stage_and_bad_pairs_files_are_one_clear_line(tmp_path, tiny_ckpt, images, pairs_csv):
    out = tmp_path / 'stage2'
    result = towhee_isc('train', images, '-o', out, '--checkpoint', tiny_ckpt, '--pairs', pairs_csv, '--negatives', '2',
                        '--epochs', '2', '--batch-size', '2', '--memory-size', '32', '--device', 'cpu', '--quiet',
                        env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load(out / 'checkpoint_epoch0002.pth.tar')
    assert saved['args'].pairs == str(pairs_csv) and saved['args'].negatives == 2
    log = [json.loads(line) for line in (out / 'train_log.jsonl').read_text().splitlines()]
    assert [e['epoch'] for e in log] == [1, 2] and all(math.isfinite(e['loss']) and e['loss'] > 0 for e in log)
    start = weights(tiny_ckpt) if 'state_dict' in load(tiny_ckpt) else None
    assert start is None or any(not torch.equal(start[k], saved['state_dict'][k]) for k in start)

    net, size = initial_net('', str(tiny_ckpt), None, None)
    paths = sorted(images.iterdir())
    (tmp_path / 'columns.csv').write_text('q,r\na.png,b.png\n')
    (tmp_path / 'empty.csv').write_text('query,reference\n')
    (tmp_path / 'missing.csv').write_text(f'query,reference\n{paths[0]},{tmp_path / "gone.jpg"}\n')
    for csv_file, message in [(tmp_path / 'nothing.csv', "pairs file '.*nothing.csv' not found"),
                              (tmp_path / 'columns.csv', 'must have the columns query,reference; it has q,r'),
                              (tmp_path / 'empty.csv', 'has no pairs'),
                              (tmp_path / 'missing.csv', "line 2: .*gone.jpg"),
                              (pairs_csv, '4 pairs, fewer than batch_size=8')]:
        with pytest.raises(ValueError, match=message):
            train(paths, net, size, config(tmp_path / 'bad', pairs=str(csv_file), batch_size=8 if csv_file == pairs_csv else 2))
        assert not (tmp_path / 'bad').exists()
    assert_one_line_error(towhee_isc('train', images, '-o', tmp_path / 'bad', '--checkpoint', tiny_ckpt, '--pairs',
                                     tmp_path / 'columns.csv', env=ONE_THREAD), 'must have the columns query,reference')
    assert not (tmp_path / 'bad').exists()
