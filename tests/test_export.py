"""save_model: every format loads where users load it and gives the operator's embeddings."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from towhee_isc import Isc


@pytest.fixture(scope='module')
def batch(small_op, photos):
    return torch.stack([small_op.transform(p) for p in photos[:3]])


@pytest.fixture(scope='module')
def want(small_op, photos):
    return np.stack(small_op(photos[:3]))


def test_pytorch_export_is_an_official_checkpoint_that_loads_back(small_op, photos, tmp_path, want):
    path = small_op.save_model('pytorch', tmp_path / 'isc.pth')
    raw = torch.load(path, weights_only=False)
    assert raw['arch'] == 'resnet18' and raw['args'].input_size == 96
    assert all(k.startswith('module.') for k in raw['state_dict'])
    again = Isc(checkpoint_path=path, device='cpu')
    assert np.abs(np.stack(again(photos[:3])) - want).max() < 1e-6


def test_torchscript_export_needs_only_torch_jit(small_op, tmp_path, batch, want):
    path = small_op.save_model('torchscript', tmp_path)
    assert path == str(tmp_path / 'small_isc.pt')
    module = torch.jit.load(path)
    with torch.no_grad():
        assert np.abs(module(batch).numpy() - want).max() < 1e-4
        assert module(batch[:1]).shape == (1, 256)


def test_onnx_export_runs_in_onnxruntime_with_any_batch(small_op, tmp_path, batch, want):
    path = small_op.save_model('onnx', tmp_path / 'isc.onnx')
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')) >= 17
    (output,) = model.graph.output  # a fixed vector size (Triton reads it), a free batch axis
    assert [d.dim_value or d.dim_param for d in output.type.tensor_type.shape.dim] == ['batch', 256]
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    (name,) = [i.name for i in session.get_inputs()]
    for n in (1, 3):
        out = session.run(None, {name: batch[:n].numpy()})[0]
        assert out.shape == (n, 256) and np.abs(out - want[:n]).max() < 1e-4


def test_default_path_is_under_the_torch_hub_cache_never_in_the_package(small_op, hub_dir):
    import towhee_isc
    from pathlib import Path
    path = Path(small_op.save_model())
    assert path == hub_dir.parent / 'towhee_isc' / 'saved' / 'pytorch' / 'small_isc.pth'  # TORCH_HOME/hub/...
    assert path.is_file()
    assert not (Path(towhee_isc.__file__).resolve().parent / 'saved' / 'pytorch' / 'small_isc.pth').exists()


def test_export_leaves_the_live_model_alone(small_op, photos, tmp_path, want):
    small_op.save_model('torchscript', tmp_path)
    assert not small_op.net.training
    assert np.abs(np.stack(small_op(photos[:3])) - want).max() == 0


def test_unknown_format_is_refused_before_any_work(small_op, tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format 'tensorrt'.*\['pytorch', 'torchscript', 'onnx'\]"):
        small_op.save_model('tensorrt', tmp_path / 'x')
    assert not (tmp_path / 'x').exists()


def test_supported_formats_and_model_names():
    assert Isc.supported_formats == ('pytorch', 'torchscript', 'onnx')
    assert Isc.supported_model_names() == ['isc_ft_v107', 'isc_selfsup_v98']
    assert Isc.supported_model_names('onnx') == ['isc_ft_v107', 'isc_selfsup_v98']
    with pytest.raises(ValueError, match='unknown format'):
        Isc.supported_model_names('caffe')


def test_published_architecture_exports_to_onnx(effnet_ckpt, photos, tmp_path):
    op = Isc(checkpoint_path=effnet_ckpt, device='cpu')
    path = op.save_model('onnx', tmp_path)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    x = torch.stack([op.transform(p) for p in photos[:2]]).numpy()
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.abs(out - np.stack(op(photos[:2]))).max() < 1e-4
