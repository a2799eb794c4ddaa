"""Checkpoint formats, safe loading, and weights that do not fit."""
import argparse
import os

import numpy as np
import pytest
import torch

from towhee_isc import CheckpointError, Isc
from towhee_isc.model import read_checkpoint


def test_official_format_fields_are_read(small_ckpt):
    raw = torch.load(small_ckpt, weights_only=False)
    assert raw['arch'] == 'resnet18' and raw['args'].input_size == 96
    assert all(k.startswith('module.') for k in raw['state_dict'])
    ckpt = read_checkpoint(small_ckpt)
    assert (ckpt.arch, ckpt.input_size) == ('resnet18', 96)


@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_plain_state_dict_needs_backbone_and_size(small_ckpt, small_op, photos, tmp_path, prefix):
    raw = torch.load(small_ckpt, weights_only=False)
    plain = {prefix + k[len('module.'):]: v for k, v in raw['state_dict'].items()}
    path = tmp_path / 'plain.pth'
    torch.save(plain, path)
    with pytest.raises(CheckpointError, match='timm_backbone='):
        Isc(checkpoint_path=path, device='cpu')
    with pytest.raises(ValueError, match='img_size='):
        Isc(checkpoint_path=path, timm_backbone='resnet18', device='cpu')
    op = Isc(checkpoint_path=path, timm_backbone='resnet18', img_size=96, device='cpu')
    assert np.abs(op(photos[0]) - small_op(photos[0])).max() < 1e-6


def test_weights_that_do_not_fit_name_keys_and_shapes(small_ckpt):
    with pytest.raises(CheckpointError, match=r"do not fit timm backbone 'resnet50': backbone\.layer1\.0\.conv1\.weight: "
                                              r"checkpoint \(64, 64, 3, 3\) vs model \(64, 64, 1, 1\)"):
        Isc(checkpoint_path=small_ckpt, timm_backbone='resnet50', device='cpu')


def test_missing_and_unexpected_keys_are_named(small_ckpt, tmp_path):
    raw = torch.load(small_ckpt, weights_only=False)
    raw['state_dict'].pop('module.bn.running_var')
    raw['state_dict']['module.extra.weight'] = torch.zeros(1)
    path = tmp_path / 'broken.pth.tar'
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match='missing bn.running_var; unexpected extra.weight'):
        Isc(checkpoint_path=path, device='cpu')


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / 'text.pth').write_text('hello')
    torch.save({'state_dict': {'a': 'not a tensor'}}, tmp_path / 'strings.pth')
    with pytest.raises(CheckpointError, match="text.pth' is not a readable PyTorch checkpoint"):
        Isc(checkpoint_path=tmp_path / 'text.pth', device='cpu')
    with pytest.raises(CheckpointError, match='no state dict of named tensors'):
        Isc(checkpoint_path=tmp_path / 'strings.pth', device='cpu')
    with pytest.raises(CheckpointError, match='not found'):
        Isc(checkpoint_path=tmp_path / 'nothing.pth', device='cpu')


class Payload:
    def __reduce__(self):
        return (os.system, ('echo pwned > /dev/null',))


def test_arbitrary_pickled_objects_are_refused(small_ckpt, tmp_path):
    raw = torch.load(small_ckpt, weights_only=False)
    raw['optimizer'] = Payload()
    torch.save(raw, tmp_path / 'evil.pth.tar')
    with pytest.raises(CheckpointError, match='not a safe ISC checkpoint'):
        read_checkpoint(tmp_path / 'evil.pth.tar')


def test_namespace_args_and_optimizer_state_are_allowed(small_ckpt, tmp_path):
    raw = torch.load(small_ckpt, weights_only=False)
    raw['args'] = argparse.Namespace(input_size=96, arch='resnet18', lr=0.1, eval_p=1.0)
    raw['optimizer'] = {'state': {0: {'momentum_buffer': torch.zeros(3)}}, 'param_groups': [{'lr': 0.1}]}
    raw['epoch'] = 10
    torch.save(raw, tmp_path / 'full.pth.tar')
    assert read_checkpoint(tmp_path / 'full.pth.tar').input_size == 96


def test_img_size_argument_overrides_the_checkpoint(small_ckpt):
    op = Isc(checkpoint_path=small_ckpt, img_size=64, device='cpu')
    assert op.img_size == 64 and op.transform.size == 64
    with pytest.raises(ValueError, match='img_size'):
        Isc(checkpoint_path=small_ckpt, img_size=0, device='cpu')


def test_unknown_backbone_and_model_name(small_ckpt, hub_dir):
    with pytest.raises(ValueError, match="unknown timm backbone 'no_such_net'"):
        Isc(checkpoint_path=small_ckpt, timm_backbone='no_such_net', device='cpu')
    with pytest.raises(ValueError, match=r"unknown model_name 'isc_v1'.*\['isc_ft_v107', 'isc_selfsup_v98'\]"):
        Isc(model_name='isc_v1', device='cpu')
    with pytest.raises(ValueError, match="no published ISC weights for timm_backbone='resnet50'"):
        Isc(timm_backbone='resnet50', device='cpu')


@pytest.mark.parametrize('kwargs, error, message', [
    ({'timm_backbone': 123}, TypeError, 'a timm backbone is named by a str, got int'),
    ({'model_name': ['isc_ft_v107']}, TypeError, 'model_name must be a str'),
    ({'checkpoint_path': 123}, TypeError, 'checkpoint_path must be a str or os.PathLike, got int'),
    ({'num_threads': True}, ValueError, 'num_threads must be a positive int'),
    ({'checkpoint_path': '.'}, CheckpointError, "checkpoint file '.' is not a regular file"),
    ({'checkpoint_path': 'no/such.pth'}, CheckpointError, r"'no/such.pth' not found \(relative to the working folder"),
])
def test_arguments_of_the_wrong_kind_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        Isc(device='cpu', **kwargs)


def test_a_checkpoint_of_an_architecture_timm_does_not_know_is_named(small_ckpt, tmp_path):
    raw = torch.load(small_ckpt, weights_only=False)
    raw['arch'] = 'foo_net'
    torch.save(raw, tmp_path / 'foo.pth')
    with pytest.raises(CheckpointError, match=r"foo.pth': unknown timm backbone 'foo_net'.*pass timm_backbone="):
        Isc(checkpoint_path=tmp_path / 'foo.pth', device='cpu')


def test_the_timm_memo_is_read_and_written_under_a_lock(tmp_path, monkeypatch):
    """Hostile round 15: processes meeting new backbones at once each read the memo, added their own and
    wrote it, losing the others' entries (2 runs of 3 with 6 processes). Each now waits for the others."""
    import threading
    from towhee_isc import model
    from towhee_isc.atomic import exclusive
    memo = tmp_path / 'hub' / 'timm-backbones.json'
    monkeypatch.setattr(model, '_timm_memo_path', lambda: memo)
    with exclusive(memo.parent):
        writer = threading.Thread(target=model._remember, args=('resnet18',))
        writer.start()
        writer.join(1.0)
        assert writer.is_alive() and not memo.exists()  # waiting for the lock
    writer.join(60)
    model._remember('resnet34')
    assert sorted(model._timm_memo()) == ['resnet18', 'resnet34']
