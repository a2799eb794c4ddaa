"""The operator equals the winner's reference pipeline for the same weights."""
import numpy as np
import pytest
import torch

from towhee_isc import Isc
from towhee_isc.model import IscNet


@pytest.fixture(scope='module')
def effnet_reference(effnet_ckpt, photos, reference):
    return reference(effnet_ckpt, photos[:3])


# Eager PyTorch runs the reference's own kernels: equal to 1e-5. ONNX Runtime's fp32 kernels sum in
# another order: equal to 1e-4 (we measure ~2e-5).
@pytest.mark.parametrize('backend, tolerance', [('torch', 1e-5), ('onnxruntime', 1e-4)])
def test_published_architecture_matches_reference(effnet_ckpt, photos, effnet_reference, backend, tolerance):
    op = Isc(checkpoint_path=effnet_ckpt, device='cpu', backend=backend)
    assert op.img_size == 512 and op.embedding_dim == 256
    assert op.net.backbone.feature_info[-1]['num_chs'] == 512
    assert np.abs(np.stack(op(photos[:3])) - effnet_reference).max() < tolerance


def test_resnet50_backbone_matches_reference(tmp_path, photos, reference):
    from towhee_isc.testing import make_synthetic_checkpoint
    path = tmp_path / 'r50.pth.tar'
    make_synthetic_checkpoint(path, 'resnet50', 128, photos)
    op = Isc(checkpoint_path=path, timm_backbone='resnet50', device='cpu')
    assert op.net.backbone.feature_info[-1]['num_chs'] == 2048
    assert op.transform.mean == (0.485, 0.456, 0.406)  # resnet50's own mean/std
    assert np.abs(np.stack(op(photos[:4])) - reference(path, photos[:4])).max() < 1e-5


def test_synthetic_checkpoint_is_numerically_sane(small_op, photos):
    """Calibrated BatchNorm: fp32 agrees with fp64, and different photos get different vectors."""
    x = torch.stack([small_op.transform(p) for p in photos])
    model64 = IscNet(small_op.net.arch).double().eval()
    model64.load_state_dict(small_op.net.state_dict())
    with torch.no_grad():
        diff = (small_op.net(x).double() - model64(x.double())).abs().max().item()
    assert diff < 1e-4
    vectors = np.stack(small_op(photos))
    similarity = vectors @ vectors.T
    assert similarity[~np.eye(len(photos), dtype=bool)].max() < 0.99


def test_gem_with_mean_equals_avg_pool_and_general_power():
    from towhee_isc.model import GeM
    x = torch.rand(2, 5, 7, 3)
    assert torch.allclose(GeM(1.0)(x), torch.nn.functional.avg_pool2d(x, (7, 3)).flatten(1))
    assert torch.allclose(GeM(3.0)(x), x.pow(3).mean((-2, -1)).pow(1 / 3))
    assert (GeM(3.0)(-x) > 0).all()  # clamped before the power


def test_state_dict_names_match_the_reference_checkpoint_layout(small_op):
    keys = list(small_op.net.state_dict())
    assert keys[-6:] == ['fc.weight', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var',
                         'bn.num_batches_tracked']
    assert all(k.startswith(('backbone.', 'fc.', 'bn.')) for k in keys)


def test_the_preprocessing_equals_torchvisions_bit_for_bit(photos):
    """model.Preprocess restates torchvision's Resize((S, S)), ToTensor, Normalize without importing it."""
    from PIL import Image
    from torchvision import transforms
    from towhee_isc.model import preprocess
    for arch, size in (('resnet18', 96), ('tf_efficientnetv2_m_in21ft1k', 512), ('resnet50', 33)):
        ours = preprocess(arch, size)
        theirs = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                     transforms.Normalize(ours.mean, ours.std)])
        for image in photos + [Image.new('RGB', (1, 1), (3, 200, 7)), Image.new('RGB', (5000, 3), (1, 2, 3))]:
            mine, reference = ours(image), theirs(image)
            assert mine.dtype == reference.dtype == torch.float32 and torch.equal(mine, reference)
        # The operator scales and normalises a whole batch of uint8 pixels at once (on a GPU, there):
        # the same numbers as one image at a time.
        batch = ours.to_input(torch.stack([ours.pixels(image) for image in photos]))
        assert batch.shape == (len(photos), 3, size, size) and batch.is_contiguous()
        assert torch.equal(batch, torch.stack([theirs(image) for image in photos]))
