"""Every input a user passes, batching, threads, and clear errors for bad input."""
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from towhee.types import Image as TowheeImage, VideoFrame


@pytest.fixture(scope='module')
def rgb(photos) -> np.ndarray:
    return np.asarray(photos[1])  # chelsea, HxWx3 uint8


def assert_embedding(vector, dim=256):
    assert isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.shape == (dim,)
    assert abs(np.linalg.norm(vector) - 1) < 1e-5


def test_numpy_rgb_gives_one_unit_float32_vector(small_op, rgb, photos, reference, small_ckpt):
    vector = small_op(rgb)
    assert_embedding(vector)
    assert np.abs(vector - reference(small_ckpt, [photos[1]])[0]).max() < 1e-5


def test_towhee_image_mode_is_honoured(small_op, rgb):
    want = small_op(rgb)
    assert np.abs(small_op(TowheeImage(rgb[:, :, ::-1].copy(), 'BGR')) - want).max() < 1e-6
    assert np.abs(small_op(TowheeImage(rgb, 'RGB')) - want).max() < 1e-6
    bgra = np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 7, np.uint8)])
    assert np.abs(small_op(TowheeImage(bgra, 'BGRA')) - want).max() < 1e-6


def test_towhee_video_frame_mode_is_honoured(small_op, rgb):
    want = small_op(rgb)
    bgr = VideoFrame(rgb[:, :, ::-1].copy(), 'BGR', timestamp=1000)
    assert np.abs(small_op(bgr) - want).max() < 1e-6
    assert np.abs(small_op([VideoFrame(rgb, 'RGB'), bgr])[1] - want).max() < 1e-6  # in batches too
    assert np.abs(small_op(bgr) - small_op(rgb[:, :, ::-1].copy())).max() > 1e-3  # the channel order matters


def test_alpha_is_dropped_and_grey_is_replicated(small_op, rgb):
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    assert np.abs(small_op(rgba) - small_op(rgb)).max() < 1e-6
    grey = rgb[:, :, 0]
    assert np.abs(small_op(grey) - small_op(np.dstack([grey] * 3))).max() < 1e-6
    assert np.abs(small_op(grey[:, :, None]) - small_op(grey)).max() < 1e-6


@pytest.mark.parametrize('mode', ['RGB', 'RGBA', 'L', 'P', 'CMYK', 'LA'])
def test_pil_image_of_any_mode(small_op, photos, mode):
    image = photos[1].convert(mode)
    vector = small_op(image)
    assert_embedding(vector)
    assert np.abs(vector - small_op(image.convert('RGB'))).max() < 1e-6


def wide_images(grey: np.ndarray) -> dict[str, Image.Image]:
    """The same grey picture in PIL's modes wider than 8 bits, each at its usual scale."""
    wide = grey.astype(np.uint16) * 257  # 0-255 -> 0-65535, as a 16-bit scan or PNG holds it
    return {
        'I;16 (16-bit PNG)': Image.fromarray(wide),
        'I;16B': Image.fromarray(wide).convert('I').convert('I;16B'),
        'I (16-bit values)': Image.fromarray(wide.astype(np.int32), 'I'),
        'I (8-bit values)': Image.fromarray(grey).convert('I'),
        'F (0-1)': Image.fromarray(grey.astype(np.float32) / 255, 'F'),
        'F (0-255)': Image.fromarray(grey).convert('F'),
    }


def test_pixels_wider_than_8_bits_are_scaled_not_clipped(small_op, photos, tmp_path):
    grey = np.asarray(photos[1].convert('L'))
    want = small_op(Image.fromarray(grey))
    for name, image in wide_images(grey).items():
        assert np.abs(small_op(image) - want).max() < 1e-5, name
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'sixteen.png')
    assert Image.open(tmp_path / 'sixteen.png').mode.startswith('I')
    assert np.abs(small_op(tmp_path / 'sixteen.png') - want).max() < 1e-5


def test_wide_pixels_are_scaled_in_blocks_to_the_same_values(monkeypatch):
    """Round 9: a 16-bit image was scaled in float64 temporaries of the whole image (2.2 GB at 88 MP); in blocks
    of rows the values are those of the whole-image formula, and the memory a few bytes a pixel."""
    import tracemalloc
    from towhee_isc import images
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (37, 29)).astype(np.uint16)
    wide[0, :6] = [0, 128, 129, 385, 65407, 65535]  # around the rounding points of v / 257, and the ends
    cases = [Image.fromarray(wide), Image.fromarray(wide).convert('I').convert('I;16B'),
             Image.fromarray(wide.astype(np.int32), 'I'), Image.fromarray((wide % 256).astype(np.int32), 'I'),
             Image.fromarray(wide.astype(np.float32) / 65535, 'F'), Image.fromarray((wide % 256).astype(np.float32), 'F')]
    monkeypatch.setattr(images, 'WIDE_BLOCK_PIXELS', 100)  # several blocks of rows, the last one short
    for image in cases:
        values = np.asarray(image, dtype=np.float64)
        high = values.max()
        scale = 257.0 if high > 255 else 1 / 255 if image.mode == 'F' and high <= 1 else 1.0
        want = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        assert np.array_equal(images._wide_to_uint8(image, 'test'), want), image.mode
    monkeypatch.undo()
    big = Image.fromarray(np.full((2000, 2000), 40000, np.uint16))  # 4 MP: 8 MB as it is, 32 MB in float64
    tracemalloc.start()
    scaled = images._wide_to_uint8(big, 'test')
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (scaled == 156).all() and peak < 6 * 4_000_000, peak


@pytest.mark.parametrize('values, message', [
    (np.full((8, 8), -3, np.int32), 'negative values'),
    (np.full((8, 8), 1 << 20, np.int32), 'no known scale'),
    (np.full((8, 8), np.nan, np.float32), 'NaN or infinite'),
    (np.full((8, 8), 300.0, np.float32), 'no known scale'),
])
def test_wide_pixels_without_a_known_scale_are_refused(small_op, photos, values, message):
    from towhee_isc.images import ImageError
    with pytest.raises(ImageError, match=message):
        small_op(Image.fromarray(values))
    assert_embedding(small_op(photos[0]))


def test_file_paths_str_and_pathlib(small_op, photos, tmp_path):
    path = tmp_path / 'cat.png'
    photos[1].save(path)
    assert np.abs(small_op(str(path)) - small_op(photos[1])).max() < 1e-6
    assert np.abs(small_op(path) - small_op(photos[1])).max() < 1e-6


def test_list_gives_list_in_order_equal_to_single_calls(small_op, photos, rgb, tmp_path):
    path = tmp_path / 'rocket.jpg'
    photos[3].save(path)
    inputs = [photos[0], rgb, path, TowheeImage(rgb[:, :, ::-1].copy(), 'BGR')] + photos[4:]
    vectors = small_op(inputs)
    assert isinstance(vectors, list) and len(vectors) == len(inputs)
    for item, vector in zip(inputs, vectors):
        assert_embedding(vector)
        assert np.abs(vector - small_op(item)).max() < 1e-5
    assert small_op(tuple(inputs[:2]))[1].shape == (256,)


@pytest.mark.parametrize('batch_size', [1, 3, 16])
def test_results_do_not_depend_on_batch_size(small_ckpt, photos, batch_size):
    from towhee_isc import Isc
    op = Isc(checkpoint_path=small_ckpt, device='cpu', batch_size=batch_size)
    base = Isc(checkpoint_path=small_ckpt, device='cpu', batch_size=1)
    assert np.abs(np.stack(op(photos)) - np.stack(base(photos))).max() < 1e-5
    assert np.abs(np.stack(list(op.embed_stream(iter(photos)))) - np.stack(base(photos))).max() < 1e-5


def test_a_gpu_operator_decodes_a_batch_in_threads_in_order(small_ckpt, photos):
    """On CUDA the images of a batch are decoded by a pool of threads, and a short batch is padded to a
    power of two: same vectors, same order, and an error still names its own list item. (Both are chosen
    by the operator's device; the network stays on the CPU here, which has no GPU.)"""
    from towhee_isc import Isc
    from towhee_isc.backends import padded_batch
    from towhee_isc.images import ImageError
    op = Isc(checkpoint_path=small_ckpt, device='cpu', batch_size=4)
    want = np.stack(op(photos[:7]))
    op.device = torch.device('cuda')
    backend, rows = op.model.backend, []
    op.model.backend = lambda batch: (rows.append(len(batch)), backend(batch))[1]
    assert np.abs(np.stack(op(photos[:7])) - want).max() < 1e-5
    assert rows == [4, 4]  # the last 3 padded to 4: one batch shape (cuDNN plans each shape anew)
    assert [padded_batch(n, 32) for n in (1, 3, 17, 32, 40)] == [1, 4, 32, 32, 40]
    with pytest.raises(ImageError, match=r'list item 3\b'):
        op(photos[:3] + [b'not an image'] + photos[:2])
    assert np.abs(np.stack(op(photos[:7])) - want).max() == 0  # usable afterwards
    stream, got = op.embed_stream(iter(photos[:5] + [b'not an image'])), []
    with pytest.raises(ImageError, match=r'list item 5\b'):  # after the vectors of the batch before its own
        got.extend(stream)
    assert len(got) == 4 and np.abs(np.stack(got) - want[:4]).max() == 0

def test_skip_preprocess_takes_chw_and_nchw(small_ckpt, small_op, photos):
    from towhee_isc import Isc
    op = Isc(checkpoint_path=small_ckpt, device='cpu', skip_preprocess=True)
    x = torch.stack([small_op.transform(p) for p in photos[:3]])
    want = np.stack(small_op(photos[:3]))
    assert np.abs(op(x[0]) - want[0]).max() < 1e-6
    assert np.abs(op(x.numpy()[1]) - want[1]).max() < 1e-6
    batch = op(x)
    assert isinstance(batch, list) and np.abs(np.stack(batch) - want).max() < 1e-5
    assert np.abs(np.stack(op([x[0], x[2].double().numpy()])) - want[[0, 2]]).max() < 1e-5
    with pytest.raises(ValueError, match=r'shape \(3, 96, 96\)'):
        op(x[:, :, :64])
    with pytest.raises(ValueError, match='NaN'):
        op(torch.full((3, 96, 96), float('nan')))
    with pytest.raises(TypeError, match='float'):
        op(np.zeros((3, 96, 96), np.uint8))
    with pytest.raises(ValueError):
        op([x])  # a batch inside a list
    assert_embedding(op(x[0]))  # still works


def test_one_operator_from_many_threads(small_op, photos):
    want = [small_op(p) for p in photos]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = small_op(photos[i % len(photos)])
                assert np.abs(results[i] - want[i % len(photos)]).max() < 1e-5
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8


@pytest.mark.parametrize('bad, error, message', [
    (None, TypeError, 'got None'),
    ([], ValueError, 'empty list'),
    (np.zeros((0, 5, 3), np.uint8), ValueError, 'zero-size'),
    (np.zeros((8, 8, 3), np.float32), TypeError, 'uint8'),
    (np.zeros((8, 8, 2), np.uint8), ValueError, 'HxWx3'),
    (np.zeros((2, 8, 8, 3), np.uint8), ValueError, 'HxWx3'),
    (TowheeImage(np.zeros((8, 8, 3), np.uint8), 'HSV'), ValueError, "mode 'HSV'"),
    (Image.new('RGB', (0, 0)), ValueError, 'zero-size'),
    (torch.zeros(3, 8, 8), TypeError, 'unsupported input type Tensor'),
    (42, TypeError, 'unsupported input type int'),
    ([np.zeros((8, 8, 3), np.uint8), 'nope'], ValueError, r'list item 1'),
])
def test_bad_input_is_a_clear_error_and_the_operator_keeps_working(small_op, photos, bad, error, message):
    with pytest.raises(error, match=message):
        small_op(bad)
    assert_embedding(small_op(photos[0]))


def test_bad_files_are_clear_errors(small_op, photos, tmp_path):
    (tmp_path / 'notes.txt').write_text('not an image')
    photos[0].save(tmp_path / 'whole.jpg')
    (tmp_path / 'cut.jpg').write_bytes((tmp_path / 'whole.jpg').read_bytes()[:2000])
    with pytest.raises(ValueError, match='image file not found'):
        small_op(tmp_path / 'missing.jpg')
    with pytest.raises(ValueError, match='notes.txt. is not an image'):
        small_op(str(tmp_path / 'notes.txt'))
    with pytest.raises(ValueError, match='cannot read image file'):
        small_op(tmp_path / 'cut.jpg')
    with pytest.raises(ValueError, match='cannot read image file|not an image'):
        small_op(tmp_path)  # a directory
    assert_embedding(small_op(tmp_path / 'whole.jpg'))
