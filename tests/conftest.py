"""Shared fixtures: real photos, synthetic checkpoints in the official format, and an independent
re-statement of the winner's reference pipeline to compare the operator against."""
from __future__ import annotations

import os
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision import transforms

from towhee_isc.testing import make_synthetic_checkpoint, sample_photos

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

SMALL_ARCH, SMALL_SIZE = 'resnet18', 96          # where the architecture does not matter
PUBLISHED_ARCH, PUBLISHED_SIZE = 'tf_efficientnetv2_m_in21ft1k', 512  # the published model's name and size


def shared_folder(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run shares (the run's own temporary folder otherwise)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def made_once(tmp_path_factory, name: str, make) -> Path:
    """``shared_folder()/name``, made by ``make(path)`` by the first worker that needs it; the others
    wait for it and use it (a synthetic checkpoint of the published network costs ~30 CPU-s)."""
    from filelock import FileLock
    path = shared_folder(tmp_path_factory) / name
    with FileLock(str(path) + '.lock'):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(path.name + '.part')  # a worker that dies leaves no half file
            make(part)
            part.rename(path)
    return path


@pytest.fixture(scope='session', autouse=True)
def private_torch_home(tmp_path_factory):
    """Downloads and the ONNX cache go to a temporary torch hub, never the user's ~/.cache (one for
    all workers: the ONNX cache locks itself, so each export is made once)."""
    home = shared_folder(tmp_path_factory) / 'torch_home'
    home.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('TORCH_HOME', str(home))
        yield


@pytest.fixture(scope='session', autouse=True)
def ctrl_c_as_a_terminal_sends_it():
    """Ctrl-C interrupts, as in a terminal, however the suite was started. A shell starts a background job
    (``pytest &`` in a script) with SIGINT ignored, every process it starts inherits that, and Python then
    leaves it ignored: the tests that press Ctrl-C on a command (or on this process) saw it run on to the
    end. Python's handler here makes SIGINT caught, which a started command gets back as the default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope='session')
def photos():
    return sample_photos()


@pytest.fixture(scope='session')
def small_ckpt(tmp_path_factory, photos) -> Path:
    return made_once(tmp_path_factory, 'ckpt/small_isc.pth.tar',
                     lambda path: make_synthetic_checkpoint(path, SMALL_ARCH, SMALL_SIZE, photos))


@pytest.fixture(scope='session')
def effnet_ckpt(tmp_path_factory, photos) -> Path:
    """The real EfficientNetV2-M at 512, synthetic weights, saved under the published model's arch name."""
    return made_once(tmp_path_factory, 'ckpt/effnet_isc.pth.tar',
                     lambda path: make_synthetic_checkpoint(path, PUBLISHED_ARCH, PUBLISHED_SIZE, photos[:4]))


@pytest.fixture(scope='session')
def effnet_op(effnet_ckpt):
    """The operator on the published architecture's synthetic weights, given as a checkpoint file."""
    from towhee_isc import Isc
    return Isc(checkpoint_path=effnet_ckpt, device='cpu')


@pytest.fixture(scope='session')
def small_op(small_ckpt):
    from towhee_isc import Isc
    return Isc(checkpoint_path=small_ckpt, device='cpu')


@pytest.fixture(scope='session')
def seed_onnx_cache(effnet_op, small_op):
    """``seed(torch_home)`` gives a fresh torch hub the session's ONNX exports of both synthetic
    checkpoints (hard links), as a second run finds them. An export of the published network costs
    ~35 CPU-s; the tests that start a fresh torch hub test other things (tests/test_export.py and
    test_hostile.py test the export and its cache)."""
    from towhee_isc.backends import onnx_cache_dir
    exports = sorted(onnx_cache_dir().glob('*.onnx'))
    assert len(exports) >= 2, exports

    # ... and what a second run finds beside them: which weights file gave which export, and timm's
    # facts about the backbones (so a process starting on them builds no network and imports no timm).
    hub = onnx_cache_dir().parent  # this session's (a test may point TORCH_HOME elsewhere before seeding)
    memos = [hub / 'onnx' / 'weights-keys.json', *hub.glob('timm-*-backbones.json')]

    def seed(torch_home: Path) -> None:
        folder = Path(torch_home) / 'hub' / 'towhee_isc' / 'onnx'
        folder.mkdir(parents=True, exist_ok=True)
        for file in exports:
            for source in (file, file.with_suffix('.sha256')):
                try:
                    os.link(source, folder / source.name)
                except OSError:  # another file system
                    shutil.copy(source, folder / source.name)
        for memo in memos:
            if memo.is_file():  # copied: the session's own may be rewritten while in use
                shutil.copy(memo, folder.parent / memo.relative_to(hub))
    return seed


@pytest.fixture(scope='session')
def milvus_server(tmp_path_factory):
    """A real Milvus 2.3.5 standalone server for the whole session (shared by the Milvus and service
    tests), with authentication on."""
    from milvus_server import MilvusServerProcess
    server = MilvusServerProcess(tmp_path_factory.mktemp('milvus_server'))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """A fresh torch hub directory; returns its ``checkpoints`` folder (where downloads go)."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return tmp_path / 'torch' / 'hub' / 'checkpoints'


def reference_embed(checkpoint_path, images) -> np.ndarray:
    """The winner's ``isc_feature_extractor.create_model`` + preprocessing, restated independently:
    PIL resize, ToTensor, Normalize, timm backbone, avg_pool2d GeM, fc, BatchNorm, L2."""
    ckpt = torch.load(checkpoint_path, map_location='cpu', weights_only=False)  # our own test file
    state = {k.replace('module.', '', 1): v for k, v in ckpt['state_dict'].items()}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # timm's note that the old arch name was renamed
        backbone = timm.create_model(ckpt['arch'], features_only=True, pretrained=False)
    backbone.load_state_dict({k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')})
    backbone.eval()
    size = ckpt['args'].input_size
    preprocess = transforms.Compose([
        transforms.Resize((size, size)), transforms.ToTensor(),
        transforms.Normalize(mean=backbone.default_cfg['mean'], std=backbone.default_cfg['std'])])
    x = torch.stack([preprocess(image.convert('RGB')) for image in images])
    with torch.no_grad():
        feature = backbone(x)[-1]
        p = 1.0
        pooled = F.avg_pool2d(feature.clamp(min=1e-6).pow(p), (feature.size(-2), feature.size(-1))).pow(1.0 / p)
        fc = F.linear(pooled.view(len(images), -1), state['fc.weight'])
        bn = F.batch_norm(fc, state['bn.running_mean'], state['bn.running_var'], state['bn.weight'],
                          state['bn.bias'], training=False, eps=1e-5)
        return F.normalize(bn).numpy()


@pytest.fixture(scope='session')
def reference():
    return reference_embed


# The slowest files first (their order by the time they took on the 2-core CI machine). pytest-xdist
# hands each worker whole files (--dist loadfile) in collection order (--no-loadscope-reorder in
# pyproject.toml: by default it orders files by their number of tests, which ran test_readme_flow.py,
# two tests and ~100 s, last), so a long file that started last would leave the other worker idle at
# the end. Tests keep their order within a file.
SLOWEST_FIRST = ['test_readme_blocks.py', 'test_hostile.py', 'test_serve.py', 'test_ray.py', 'test_triton.py',
                 'test_readme_flow.py', 'test_milvus.py', 'test_towhee.py', 'test_video.py', 'test_training.py',
                 'test_engines.py', 'test_workflow.py', 'test_export.py', 'test_hostile_files.py']


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))
