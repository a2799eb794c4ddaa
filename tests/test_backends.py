"""Backends (ONNX Runtime, PyTorch), precision and batch size: same embeddings, clear errors."""
import builtins
from pathlib import Path

import numpy as np
import pytest
import torch

from towhee_isc import Isc
from towhee_isc import backends
from towhee_isc.backends import OnnxRuntimeBackend, TorchBackend, resolve_backend


def test_auto_is_onnxruntime_for_fp32_on_cpu_else_torch():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert resolve_backend('auto', cpu, 'fp32') == 'onnxruntime'
    assert resolve_backend('auto', cpu, 'bf16') == 'torch'
    assert resolve_backend('auto', cuda, 'fp32') == 'torch'


def test_backends_agree_within_1e4(small_ckpt, photos):
    ort = Isc(checkpoint_path=small_ckpt, device='cpu', backend='onnxruntime')
    eager = Isc(checkpoint_path=small_ckpt, device='cpu', backend='torch')
    assert isinstance(ort.model.backend, OnnxRuntimeBackend) and isinstance(eager.model.backend, TorchBackend)
    assert np.abs(np.stack(ort(photos)) - np.stack(eager(photos))).max() < 1e-4


def test_default_batch_size_is_the_measured_one_per_backend(small_ckpt):
    assert Isc(checkpoint_path=small_ckpt, device='cpu').batch_size == backends.DEFAULT_BATCH['onnxruntime', 'cpu']
    assert Isc(checkpoint_path=small_ckpt, device='cpu', backend='torch').batch_size == 1
    assert Isc(checkpoint_path=small_ckpt, device='cpu', batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match='batch_size must be a positive int'):
        Isc(checkpoint_path=small_ckpt, device='cpu', batch_size=0)


def test_onnx_export_is_cached_by_weights_content(small_ckpt, photos, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    exports = []
    real_export = backends.export_onnx
    monkeypatch.setattr(backends, 'export_onnx', lambda *a: exports.append(a) or real_export(*a))
    Isc(checkpoint_path=small_ckpt, device='cpu')
    Isc(checkpoint_path=small_ckpt, device='cpu')
    assert len(exports) == 1
    cache = tmp_path / 'torch' / 'hub' / 'towhee_isc' / 'onnx'
    assert sorted(p.name.rsplit('-', 1)[-1].split('.')[-1] for p in cache.iterdir()) == ['json', 'onnx', 'sha256']  # no temporary
    from towhee_isc.testing import make_synthetic_checkpoint
    make_synthetic_checkpoint(tmp_path / 'other.pth.tar', 'resnet18', 96, photos, seed=1)
    Isc(checkpoint_path=tmp_path / 'other.pth.tar', device='cpu')
    assert len(exports) == 2 and len(list(cache.glob('*.onnx'))) == 2
    Isc(checkpoint_path=small_ckpt, img_size=64, device='cpu')  # same weights, other input size
    assert len(exports) == 3


def test_a_weights_file_met_before_runs_its_cached_export_without_building_the_network(small_ckpt, photos, tmp_path,
                                                                                      monkeypatch):
    """A start builds the network (timm, torchvision: ~5.5 CPU-s of imports, then the weights) only for
    weights it has not met: a file is known by its SHA-256, so the same path holding other weights is
    built anew, and damaged memo files count as none. Vectors and fingerprint are the built network's."""
    import json
    import shutil
    import subprocess
    import sys
    from towhee_isc.testing import make_synthetic_checkpoint
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    shutil.copy(small_ckpt, tmp_path / 'ck.pth.tar')
    built = Isc(checkpoint_path=tmp_path / 'ck.pth.tar', device='cpu')
    want, weights = np.stack(built(photos[:2])), built.fingerprint['weights']
    assert 'net' in built.model.__dict__
    known = Isc(checkpoint_path=tmp_path / 'ck.pth.tar', device='cpu')
    assert 'net' not in known.model.__dict__ and isinstance(known.model.backend, OnnxRuntimeBackend)
    assert np.array_equal(np.stack(known(photos[:2])), want) and known.fingerprint['weights'] == weights
    # A fresh process imports neither timm nor torchvision.
    script = ('import sys; from towhee_isc import Isc; op = Isc(checkpoint_path=sys.argv[1], device="cpu"); '
              'v = op(sys.argv[2]); print(op.fingerprint["weights"], "timm" in sys.modules, "torchvision" in sys.modules)')
    photos[0].save(tmp_path / 'p.png')
    done = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'ck.pth.tar'), str(tmp_path / 'p.png')],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == [weights, 'False', 'False'], done.stderr[-2000:]
    # Other weights at the same path: built, and their own vectors.
    make_synthetic_checkpoint(tmp_path / 'ck.pth.tar', 'resnet18', 96, photos, seed=1)
    other = Isc(checkpoint_path=tmp_path / 'ck.pth.tar', device='cpu')
    assert 'net' in other.model.__dict__ and other.fingerprint['weights'] != weights
    assert not np.allclose(np.stack(other(photos[:2])), want)
    # Damaged memos are ignored (and rewritten).
    shutil.copy(small_ckpt, tmp_path / 'ck.pth.tar')
    memos = [tmp_path / 'torch' / 'hub' / 'towhee_isc' / 'onnx' / 'weights-keys.json',
             *(tmp_path / 'torch' / 'hub' / 'towhee_isc').glob('timm-*-backbones.json')]
    assert len(memos) == 2
    for memo, junk in zip(memos, (b'{"x": 1, ', json.dumps({'resnet18': [[0.5, 'a', 1], [0, 0, 0]]}).encode())):
        memo.write_bytes(junk)
    again = Isc(checkpoint_path=tmp_path / 'ck.pth.tar', device='cpu')
    assert 'net' in again.model.__dict__ and np.array_equal(np.stack(again(photos[:2])), want)
    assert again.transform.mean == (0.485, 0.456, 0.406)
    assert 'net' not in Isc(checkpoint_path=tmp_path / 'ck.pth.tar', device='cpu').model.__dict__


def test_an_operator_whose_weights_file_was_replaced_never_teaches_the_memo_a_wrong_key(small_ckpt, photos, tmp_path,
                                                                                      monkeypatch):
    """Hostile round 15: unpickling an operator after its file was replaced recorded the new file's hash
    with the old weights' key, and every later start on the new file ran the old export. An unpickled
    operator runs the network it carries and remembers nothing; a fast-started one whose file was
    replaced refuses to build (pickle) the other weights under its old key."""
    import pickle
    import shutil
    from towhee_isc.model import CheckpointError
    from towhee_isc.testing import make_synthetic_checkpoint
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    path = tmp_path / 'model.pth.tar'
    make_synthetic_checkpoint(tmp_path / 'b.pth.tar', 'resnet18', 96, photos, seed=1)
    shutil.copy(small_ckpt, path)
    a = Isc(checkpoint_path=path, device='cpu')
    want_a = np.stack(a(photos[:2]))
    shutil.copy(tmp_path / 'b.pth.tar', path)
    worker = pickle.loads(pickle.dumps(a))
    assert np.array_equal(np.stack(worker(photos[:2])), want_a) and worker.fingerprint == a.fingerprint
    b = Isc(checkpoint_path=path, device='cpu')  # a fresh start on the new file: its own weights
    want_b = np.stack(Isc(checkpoint_path=path, device='cpu', backend='torch')(photos[:2]))
    assert b.fingerprint['weights'] != a.fingerprint['weights'] and np.abs(np.stack(b(photos[:2])) - want_b).max() < 1e-4
    shutil.copy(small_ckpt, path)
    fast = Isc(checkpoint_path=path, device='cpu')  # known: started from the cached export, no network
    assert 'net' not in fast.model.__dict__ and fast.fingerprint == a.fingerprint
    shutil.copy(tmp_path / 'b.pth.tar', path)
    with pytest.raises(CheckpointError, match='holds other weights than when this operator started'):
        pickle.dumps(fast)
    assert np.array_equal(np.stack(fast(photos[:2])), want_a)  # still usable, with the weights it started with


def test_missing_onnxruntime(small_ckpt, monkeypatch):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == 'onnxruntime':
            raise ImportError('No module named onnxruntime')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_onnxruntime)
    with pytest.raises(ImportError, match=r"backend='onnxruntime' needs ONNX Runtime: pip install onnxruntime"):
        Isc(checkpoint_path=small_ckpt, device='cpu', backend='onnxruntime')
    assert isinstance(Isc(checkpoint_path=small_ckpt, device='cpu').model.backend, TorchBackend)  # auto falls back


def test_bad_backend_and_precision_arguments(small_ckpt):
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'.*\['auto', 'torch', 'onnxruntime'\]"):
        Isc(checkpoint_path=small_ckpt, device='cpu', backend='tensorrt')
    with pytest.raises(ValueError, match=r"unknown precision 'int8'.*\['fp32', 'fp16', 'bf16'\]"):
        Isc(checkpoint_path=small_ckpt, device='cpu', precision='int8')
    with pytest.raises(ValueError, match="runs fp32 only; precision='fp16' needs backend='torch'"):
        Isc(checkpoint_path=small_ckpt, device='cpu', backend='onnxruntime', precision='fp16')
    with pytest.raises(ValueError, match="runs on the CPU; for cuda use backend='torch'"):
        resolve_backend('onnxruntime', torch.device('cuda'), 'fp32')


@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_reduced_precision_gives_unit_float32_vectors_close_to_fp32(small_ckpt, small_op, photos, precision):
    op = Isc(checkpoint_path=small_ckpt, device='cpu', precision=precision)
    assert isinstance(op.model.backend, TorchBackend) and op.model.backend.dtype == backends.PRECISIONS[precision]
    assert next(op.net.parameters()).dtype == torch.float32  # the fp32 master stays for export
    vectors = np.stack(op(photos))
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    cosine = (vectors * np.stack(small_op(photos))).sum(1)
    assert cosine.min() > 0.99
    assert np.abs(np.stack(op(photos[:3])) - vectors[:3]).max() < 1e-2  # batching does not change much


def test_fast_decode_only_changes_large_jpegs_slightly(small_ckpt, small_op, photos, tmp_path):
    big = photos[0].resize((2048, 2048))
    big.save(tmp_path / 'big.jpg', quality=95)
    big.save(tmp_path / 'big.png')
    fast = Isc(checkpoint_path=small_ckpt, device='cpu', fast_decode=True)
    exact = small_op(tmp_path / 'big.jpg')
    approx = fast(tmp_path / 'big.jpg')
    assert 0 < np.abs(approx - exact).max() and float(approx @ exact) > 0.98
    assert np.abs(fast(tmp_path / 'big.png') - small_op(tmp_path / 'big.png')).max() < 1e-6  # PNG: no draft


def test_decode_on_device_is_close_to_the_pil_path_and_only_takes_jpeg_files(small_ckpt, small_op, photos, tmp_path):
    """The CUDA path's logic, run on the CPU (torchvision's decoder is libjpeg there, nvJPEG on CUDA)."""
    photos[0].save(tmp_path / 'a.jpg', quality=95)
    photos[1].save(tmp_path / 'b.png')
    (tmp_path / 'fake.jpg').write_bytes(b'\xff\xd8\xff' + b'\x00' * 100)
    op = Isc(checkpoint_path=small_ckpt, device='cpu', backend='torch', decode_on_device=True)
    exact = np.stack(small_op([tmp_path / 'a.jpg', tmp_path / 'b.png', photos[2]]))
    got = np.stack(op([tmp_path / 'a.jpg', tmp_path / 'b.png', photos[2]]))
    assert float(got[0] @ exact[0]) > 0.98 and np.abs(got[0] - exact[0]).max() > 0  # resized differently
    assert np.abs(got[1:] - exact[1:]).max() < 1e-4  # PNG and PIL inputs: the usual path
    with pytest.raises(ValueError, match="JPEG file .*fake.jpg. is not an image"):
        op(tmp_path / 'fake.jpg')


@pytest.mark.parametrize('backend', ['onnxruntime', 'torch'])
def test_operator_pickles_and_gives_identical_vectors_after(small_ckpt, photos, backend, monkeypatch):
    """Ray and multiprocessing ship operators by pickle; the ONNX Runtime session is rebuilt from the cache."""
    import pickle
    op = Isc(checkpoint_path=small_ckpt, device='cpu', backend=backend, num_threads=1)
    monkeypatch.setattr(backends, 'export_onnx', lambda *a: pytest.fail('unpickling exported the model again'))
    try:
        copy = pickle.loads(pickle.dumps(op))
        assert type(copy.model.backend) is type(op.model.backend) and copy.model.backend is not op.model.backend
        assert np.array_equal(np.stack(copy(photos)), np.stack(op(photos)))
        assert copy.fingerprint == op.fingerprint and copy.num_threads == 1
    finally:
        torch.set_num_threads(backends.cpu_count())


def test_num_threads_sets_onnxruntime_and_torch_threads(small_ckpt):
    before = torch.get_num_threads()
    try:
        op = Isc(checkpoint_path=small_ckpt, device='cpu', num_threads=1)
        assert op.model.backend.session.get_session_options().intra_op_num_threads == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    every = Isc(checkpoint_path=small_ckpt, device='cpu')  # None: every core this process may use
    assert every.model.backend.session.get_session_options().intra_op_num_threads == backends.cpu_count()
    assert torch.get_num_threads() == before
    for bad in (0, 1.5, '2'):
        with pytest.raises(ValueError, match='num_threads must be a positive int or None'):
            Isc(checkpoint_path=small_ckpt, device='cpu', num_threads=bad)


EXPORT_ONCE = '''
import os, sys, time
from pathlib import Path
from towhee_isc import backends
from towhee_isc.model import build_model, read_checkpoint
ckpt, folder = sys.argv[1], Path(sys.argv[2])
model = build_model(read_checkpoint(ckpt), None)
real_export = backends.export_onnx
def export(*args):
    with open(folder / 'exports.log', 'a') as log:
        log.write(f'{os.getpid()}\\n')
    time.sleep(1)  # export slowly, so the other process surely arrives while this one holds the lock
    real_export(*args)
backends.export_onnx = export
(folder / f'ready-{os.getpid()}').touch()
deadline = time.time() + 120
while len(list(folder.glob('ready-*'))) < 2 and time.time() < deadline:  # start together
    time.sleep(0.01)
print(backends.cached_onnx(model, 96, cache_dir=folder / 'cache'))
'''


def test_processes_starting_together_export_the_model_once(small_ckpt, tmp_path):
    """Ray actors start at once on a machine: one exports, the others wait for that export."""
    import subprocess
    import sys
    runs = [subprocess.Popen([sys.executable, '-c', EXPORT_ONCE, str(small_ckpt), str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len((tmp_path / 'exports.log').read_text().split()) == 1
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1 and backends._verified(Path(paths.pop()), next((tmp_path / 'cache').glob('*.sha256')))
