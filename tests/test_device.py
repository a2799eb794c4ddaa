"""Device selection: what users pass, and clear errors for devices that are not there."""
import pytest
import torch

from towhee_isc.isc import resolve_device


def test_none_picks_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device(None) == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device(None) == torch.device('cuda')
    assert resolve_device('cuda:1') == torch.device('cuda', 1)
    with pytest.raises(ValueError, match="'cuda:2' requested but only 2 CUDA"):
        resolve_device('cuda:2')


@pytest.mark.parametrize('device', ['cpu', torch.device('cpu')])
def test_cpu_as_str_or_torch_device(device):
    assert resolve_device(device) == torch.device('cpu')


def test_unavailable_or_unknown_devices_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match="'cuda' requested but no CUDA device is available"):
        resolve_device('cuda')
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device('gpu0')
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device('meta')
    with pytest.raises(TypeError, match='device must be a str or torch.device'):
        resolve_device(0)


def test_operator_runs_on_the_chosen_device(small_ckpt):
    from towhee_isc import Isc
    op = Isc(checkpoint_path=small_ckpt, device=torch.device('cpu'))
    assert op.device == torch.device('cpu') and next(op.net.parameters()).device.type == 'cpu'
