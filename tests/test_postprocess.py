"""The winner's post-processing (database-side augmentation + negative embedding subtraction) through
the Python API, the operator option and the ``towhee-isc nes`` command, each compared with an
independent restatement of the method written here from its description (brute force, float32)."""
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest

from towhee_isc import Isc, postprocess
from towhee_isc.postprocess import NegativeEmbeddings
from towhee_isc.workflow.cli import main as cli
from towhee_isc.workflow.descriptors import read_descriptors, read_image_paths, read_postprocessing, write_descriptors

TOLERANCE = 1e-5  # the bar: equal to the winner's script on the same inputs to 1e-5
WINNER = dict(k=10, beta=0.35, iterations=1, dba_k=10, alpha=3.0)


def restated(vectors, negatives, k=10, beta=0.35, iterations=1, dba_k=10, alpha=3.0):
    """The method as the issue states it, one row at a time, by full sorting, in float32.
    1. each negative n_i -> normalise(sum over its dba_k nearest negatives (itself included) of s_ij^alpha n_j);
    2. iterations times: x -> normalise(x - beta * mean of its k nearest augmented negatives)."""
    negatives = np.asarray(negatives, np.float32)
    augmented = np.empty_like(negatives)
    for i, n in enumerate(negatives):
        s = negatives @ n
        near = np.argsort(-s, kind='stable')[:dba_k]
        total = np.zeros(negatives.shape[1], np.float32)
        for j in near:
            total += s[j] ** np.float32(alpha) * negatives[j]
        augmented[i] = total / np.linalg.norm(total)
    out = []
    for x in np.asarray(vectors, np.float32):
        for _ in range(iterations):
            near = np.argsort(-(augmented @ x), kind='stable')[:k]
            x = x - np.float32(beta) * augmented[near].mean(axis=0)
            x = x / np.linalg.norm(x)
        out.append(x)
    return np.array(out, np.float32).reshape(len(out), negatives.shape[1])


def clustered(count, dim=256, seed=0, clusters=12):
    """Unit vectors around a few centres, so that neighbours are close and the settings matter."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, count)] + 0.6 * rng.standard_normal((count, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope='module')
def negatives():
    return clustered(300, seed=1)


@pytest.fixture(scope='module')
def negatives_file(tmp_path_factory, negatives):
    path = tmp_path_factory.mktemp('negatives') / 'negatives.h5'
    write_descriptors(path, [f'N{i:06d}' for i in range(len(negatives))], negatives)
    return path


@pytest.fixture
def augmentations(monkeypatch):
    """Counts the augmentations actually computed (not read from the cache)."""
    calls = []
    real = postprocess.augment

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)
    monkeypatch.setattr(postprocess, 'augment', counting)
    return calls


# -- the Python API --------------------------------------------------------------------------------

@pytest.mark.parametrize('count, settings', [
    (300, WINNER),
    (300, dict(k=3, beta=0.5, iterations=2, dba_k=5, alpha=1.0)),
    (300, dict(k=25, beta=0.2, iterations=3, dba_k=1, alpha=2.0)),
    (2000, dict(k=7, beta=0.35, iterations=1, dba_k=12, alpha=4.0)),  # grouped top-k selection, leftover columns
], ids=['winner', 'k3-beta0.5-iter2-dba5-alpha1', 'k25-beta0.2-iter3-dba1-alpha2', '2000-negatives'])
def test_api_equals_the_restated_method(tmp_path, count, settings):
    negatives, vectors = clustered(count, seed=2), clustered(40, seed=3)
    subtract = {name: settings[name] for name in ('k', 'beta', 'iterations')}
    nes = NegativeEmbeddings(negatives, dba_k=settings['dba_k'], alpha=settings['alpha'], cache_dir=tmp_path)
    got = nes.subtract(vectors, **subtract)
    want = restated(vectors, negatives, **settings)
    assert got.dtype == np.float32 and got.shape == vectors.shape
    assert np.abs(got - want).max() < TOLERANCE
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5
    assert np.abs(got - vectors).max() > 0.05  # it did change them


@pytest.mark.parametrize('count, rows, columns, settings', [
    (2000, 64, 1300, dict(k=5, beta=0.35, iterations=2, dba_k=5, alpha=3.0)),  # grouped top-k in both chunks
    (300, 7, 296, WINNER),  # the last chunk holds fewer negatives than k
])
def test_blocks_of_rows_and_chunks_of_negatives_merge_exactly(tmp_path, monkeypatch, count, rows, columns, settings):
    monkeypatch.setattr(postprocess, 'ROWS', rows)
    monkeypatch.setattr(postprocess, 'COLUMNS', columns)
    negatives, vectors = clustered(count, seed=9), clustered(30, seed=10)
    nes = NegativeEmbeddings(negatives, dba_k=settings['dba_k'], alpha=settings['alpha'], cache=False)
    got = nes.subtract(vectors, settings['k'], settings['beta'], settings['iterations'])
    assert np.abs(got - restated(vectors, negatives, **settings)).max() < TOLERANCE


def test_winner_defaults_and_rows_independent_of_order_and_batch(tmp_path, negatives):
    vectors = clustered(30, seed=4)
    nes = NegativeEmbeddings(negatives, cache_dir=tmp_path)
    assert (nes.dba_k, nes.alpha) == (10, 3.0)
    whole = nes.subtract(vectors)
    assert np.abs(whole - restated(vectors, negatives)).max() < TOLERANCE
    order = np.random.default_rng(0).permutation(len(vectors))
    assert np.abs(nes.subtract(vectors[order]) - whole[order]).max() < 1e-6
    assert np.abs(nes.subtract(vectors[7:8])[0] - whole[7]).max() < 1e-6
    assert nes.subtract(np.zeros((0, 256), np.float32)).shape == (0, 256)


def test_negatives_from_a_descriptor_file(tmp_path, negatives, negatives_file):
    from_file = NegativeEmbeddings(negatives_file, cache_dir=tmp_path)
    assert np.array_equal(from_file.negatives, negatives) and from_file.key == NegativeEmbeddings(negatives).key


# -- the cache ---------------------------------------------------------------------------------------

def test_augmentation_is_computed_once_and_cached_by_content(tmp_path, negatives, augmentations):
    first = NegativeEmbeddings(negatives, cache_dir=tmp_path).augmented
    again = NegativeEmbeddings(negatives.copy(), cache_dir=tmp_path).augmented
    assert augmentations == [300] and np.array_equal(first, again)
    NegativeEmbeddings(negatives, alpha=2.0, cache_dir=tmp_path).augmented  # other settings: another entry
    NegativeEmbeddings(negatives[:-1], cache_dir=tmp_path).augmented      # other content: another entry
    assert augmentations == [300, 300, 299] and len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize('damage', ['flip a byte', 'truncate', 'not a zip', 'wrong array'])
def test_a_damaged_cache_file_is_recomputed(tmp_path, negatives, augmentations, damage):
    good = NegativeEmbeddings(negatives, cache_dir=tmp_path).augmented
    (path,) = tmp_path.iterdir()
    data = bytearray(path.read_bytes())
    if damage == 'flip a byte':
        data[len(data) // 2] ^= 0x40
    elif damage == 'truncate':
        data = data[:len(data) // 3]
    elif damage == 'not a zip':
        data = b'garbage' * 100
    else:
        with open(path, 'wb') as f:
            np.savez(f, augmented=np.ones((3, 3), np.float32))
        data = path.read_bytes()
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match='damaged cache file'):
        again = NegativeEmbeddings(negatives, cache_dir=tmp_path).augmented
    assert np.array_equal(again, good) and len(augmentations) == 2
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # repaired: read back without complaint
        assert np.array_equal(NegativeEmbeddings(negatives, cache_dir=tmp_path).augmented, good)
    assert len(augmentations) == 2


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_value_error(tmp_path, negatives):
    nes = NegativeEmbeddings(negatives, cache_dir=tmp_path)
    vectors = clustered(5, seed=5)
    nan, off = vectors.copy(), vectors.copy()
    nan[2, 3] = np.nan
    off[1] *= 1.5
    (tmp_path / 'text.h5').write_text('no hdf5')
    with h5py.File(tmp_path / 'empty.h5', 'w') as f:
        f['other'] = np.zeros(3)
    cases = [
        (lambda: nes.subtract(clustered(5, dim=128)), 'descriptors are 128-d but the negatives are 256-d'),
        (lambda: nes.subtract(vectors, k=301), 'k=301 needs at least 301 negatives, got 300'),
        (lambda: NegativeEmbeddings(negatives[:5], dba_k=10), 'dba_k=10 needs at least 10 negatives, got 5'),
        (lambda: nes.subtract(nan), 'descriptors hold NaN or infinite values (row 2)'),
        (lambda: nes.subtract(off), 'descriptors must be L2-normalised (unit rows): row 1 has norm 1.5'),
        (lambda: NegativeEmbeddings(np.vstack([negatives, nan])), 'negatives hold NaN or infinite values (row 302)'),
        (lambda: NegativeEmbeddings(negatives * 2), 'negatives must be L2-normalised'),
        (lambda: NegativeEmbeddings(np.zeros((0, 256), np.float32)), 'negatives: the set is empty'),
        (lambda: NegativeEmbeddings(negatives[0]), 'negatives must be an (N, D) array, got shape (256,)'),
        (lambda: nes.subtract(vectors, beta=float('nan')), 'beta must be a finite number, got nan'),
        (lambda: nes.subtract(vectors, beta=float('inf')), 'beta must be a finite number, got inf'),
        (lambda: NegativeEmbeddings(negatives, alpha=float('nan')), 'alpha must be a finite number, got nan'),
        (lambda: NegativeEmbeddings(negatives, alpha=float('-inf')), 'alpha must be a finite number, got -inf'),
        (lambda: nes.subtract(vectors, k=0), 'k must be an integer of at least 1, got 0'),
        (lambda: nes.subtract(vectors, iterations=0), 'iterations must be an integer of at least 1, got 0'),
        (lambda: nes.subtract(vectors, k=2.5), 'k must be an integer of at least 1, got 2.5'),
        (lambda: NegativeEmbeddings(negatives, dba_k=0), 'dba_k must be an integer of at least 1, got 0'),
        (lambda: NegativeEmbeddings(tmp_path / 'missing.h5'), 'descriptor file not found'),
        (lambda: NegativeEmbeddings(tmp_path / 'text.h5'), 'not a readable HDF5 file'),
        (lambda: NegativeEmbeddings(tmp_path / 'empty.h5'), "has no 'vectors' and 'image_names' datasets"),
        (lambda: NegativeEmbeddings(negatives, dba_k=300, alpha=0.5, cache=False).augmented, 'use an integer alpha'),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as error:
            call()
            pytest.fail(f'no error for {message!r}')
        assert message in str(error.value), (message, str(error.value))
    with pytest.raises(TypeError, match='must be a float array, got dtype int64'):
        nes.subtract(np.ones((2, 256), np.int64))


# -- the operator option -------------------------------------------------------------------------------

def test_operator_returns_post_processed_vectors(small_ckpt, small_op, photos, negatives, negatives_file,
                                                 augmentations):
    raw = np.stack(small_op(photos[:4]))
    op = Isc(checkpoint_path=small_ckpt, device='cpu', negatives=negatives_file)
    assert np.abs(np.stack(op(photos[:4])) - restated(raw, negatives)).max() < TOLERANCE
    single = op(photos[1])
    assert single.shape == (256,) and np.abs(single - restated(raw[1:2], negatives)[0]).max() < TOLERANCE
    assert op.postprocessing == {'method': postprocess.METHOD, 'negatives': postprocess.content_key(negatives),
                                 'negatives_count': 300, **WINNER}
    settings = dict(k=4, beta=0.5, iterations=2, dba_k=6, alpha=2.0)
    tuned = Isc(checkpoint_path=small_ckpt, device='cpu', negatives=negatives,
                **{f'nes_{name}': value for name, value in settings.items()})
    assert np.abs(np.stack(tuned(photos[:4])) - restated(raw, negatives, **settings)).max() < TOLERANCE
    Isc(checkpoint_path=small_ckpt, device='cpu', negatives=negatives_file)  # built again: read from the cache
    assert augmentations == [300, 300]  # once for the winner's settings, once for dba_k=6 and alpha=2


def test_towhee_pipeline_gets_post_processed_vectors(small_ckpt, small_op, photos, negatives, negatives_file, tmp_path):
    from towhee import ops, pipe
    photos[2].save(tmp_path / 'coffee.png')
    p = (pipe.input('path')
         .map('path', 'vec', ops.image_embedding.isc(checkpoint_path=str(small_ckpt), device='cpu',
                                                     negatives=str(negatives_file), nes_beta=0.5))
         .output('vec'))
    vec = p(str(tmp_path / 'coffee.png')).get()[0]
    want = restated(small_op(tmp_path / 'coffee.png')[None], negatives, beta=0.5)[0]
    assert np.abs(vec - want).max() < TOLERANCE


def test_operator_refuses_bad_negatives_and_settings(small_ckpt, negatives):
    cases = [(dict(negatives=clustered(50, dim=128)), 'the negatives are 128-d but this model makes 256-d vectors'),
             (dict(negatives=negatives, nes_beta=float('nan')), 'beta must be a finite number'),
             (dict(negatives=negatives, nes_iterations=0), 'iterations must be an integer of at least 1'),
             (dict(negatives=negatives, nes_k=301), 'k=301 needs at least 301 negatives'),
             (dict(negatives=NegativeEmbeddings(negatives), nes_alpha=2.0), 'differ from the given NegativeEmbeddings')]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace('(', r'\(')):
            Isc(checkpoint_path=small_ckpt, device='cpu', **kwargs)


# -- the command line ----------------------------------------------------------------------------------

def run(*args):
    return subprocess.run([sys.executable, '-m', 'towhee_isc', *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_nes_command_keeps_ids_in_order_and_records_the_settings(tmp_path, negatives, negatives_file):
    vectors = clustered(25, seed=6)
    ids = [f'Q{i:05d}' for i in np.random.default_rng(1).permutation(25)]  # not sorted: order must be kept
    paths = [f'/photos/{i}.jpg' for i in ids]
    write_descriptors(tmp_path / 'queries.h5', ids, vectors, paths)
    result = run('nes', tmp_path / 'queries.h5', '--negatives', negatives_file, '-o', tmp_path / 'out.h5',
                 '--k', 4, '--beta', 0.3, '--iterations', 2, '--dba-k', 6, '--alpha', 2.0)
    assert result.returncode == 0, result.stderr
    got_ids, got = read_descriptors(tmp_path / 'out.h5')
    assert got_ids == ids and read_image_paths(tmp_path / 'out.h5') == paths
    settings = dict(k=4, beta=0.3, iterations=2, dba_k=6, alpha=2.0)
    assert np.abs(got - restated(vectors, negatives, **settings)).max() < TOLERANCE
    assert read_postprocessing(tmp_path / 'out.h5') == {
        'method': postprocess.METHOD, 'negatives': postprocess.content_key(negatives), 'negatives_count': 300,
        **settings}
    assert read_postprocessing(tmp_path / 'queries.h5') is None
    assert 'wrote 25 post-processed descriptors' in result.stdout

    # the winner's defaults; and a bad setting is one line, exit 2, nothing written
    assert run('nes', tmp_path / 'queries.h5', '--negatives', negatives_file, '-o', tmp_path / 'default.h5').returncode == 0
    assert np.abs(read_descriptors(tmp_path / 'default.h5')[1] - restated(vectors, negatives)).max() < TOLERANCE
    bad = run('nes', tmp_path / 'queries.h5', '--negatives', negatives_file, '-o', tmp_path / 'bad.h5', '--beta', 'nan')
    assert bad.returncode == 2 and not (tmp_path / 'bad.h5').exists()
    assert bad.stderr.strip().splitlines()[-1] == "error: towhee-isc nes: argument --beta: must be a finite number, got 'nan' (see towhee-isc nes --help)"


@pytest.fixture
def cmd(capsys):
    """Run a towhee-isc command in-process; returns (exit code, stdout, last stderr line)."""
    def call(*args):
        try:
            code = cli([*map(str, args)])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        return code, out.out, lines[-1] if lines else ''
    return call


def test_nes_command_errors(cmd, tmp_path, negatives, negatives_file):
    write_descriptors(tmp_path / 'queries.h5', ['a', 'b'], clustered(2, seed=7))
    write_descriptors(tmp_path / 'q128.h5', ['a', 'b'], clustered(2, dim=128, seed=7))
    write_descriptors(tmp_path / 'few.h5', ['a', 'b'], negatives[:2])
    write_descriptors(tmp_path / 'offnorm.h5', ['a', 'b'], 2 * negatives[:2])
    nan = negatives[:20].copy()
    nan[3, 0] = np.nan
    write_descriptors(tmp_path / 'nan.h5', [str(i) for i in range(20)], nan)
    (tmp_path / 'text.h5').write_text('no hdf5')
    queries, out = tmp_path / 'queries.h5', tmp_path / 'out.h5'
    ok = (queries, '--negatives', negatives_file, '-o', out)
    cases = [
        ((tmp_path / 'q128.h5', '--negatives', negatives_file, '-o', out), 'descriptors are 128-d but the negatives are 256-d'),
        ((*ok, '--k', 400), 'k=400 needs at least 400 negatives, got 300'),
        ((queries, '--negatives', tmp_path / 'few.h5', '-o', out), 'dba_k=10 needs at least 10 negatives, got 2'),
        ((queries, '--negatives', tmp_path / 'nan.h5', '-o', out), "nan.h5' holds NaN or infinite vectors"),
        ((queries, '--negatives', tmp_path / 'offnorm.h5', '-o', out), "offnorm.h5' holds vectors that are not L2-normalised"),
        ((queries, '--negatives', tmp_path / 'missing.h5', '-o', out), 'descriptor file not found'),
        ((queries, '--negatives', tmp_path / 'text.h5', '-o', out), 'not a readable HDF5 file'),
        ((tmp_path / 'missing.h5', '--negatives', negatives_file, '-o', out), 'descriptor file not found'),
        ((*ok, '--beta', 'inf'), "argument --beta: must be a finite number, got 'inf'"),
        ((*ok, '--alpha', 'nan'), "argument --alpha: must be a finite number, got 'nan'"),
        ((*ok, '--k', 0), "argument --k: must be at least 1, got 0"),
        ((*ok, '--iterations', '0'), "argument --iterations: must be at least 1, got 0"),
        ((*ok, '--dba-k', 'x'), "argument --dba-k: 'x' is not a whole number"),
    ]
    for args, message in cases:
        code, _, err = cmd('nes', *args)
        assert code == 2 and err.startswith('error: ') and message in err, (args, err)
        assert not out.exists()
    assert cmd('nes', *ok)[0] == 0
    code, _, err = cmd('nes', out, '--negatives', negatives_file, '-o', tmp_path / 'twice.h5')
    assert code == 2 and 'is already post-processed with 300 negatives' in err and not (tmp_path / 'twice.h5').exists()
    before = queries.read_bytes()
    for args, what in [((queries, '--negatives', negatives_file, '-o', queries), queries),
                       ((queries, '--negatives', negatives_file, '-o', negatives_file), negatives_file)]:
        code, _, err = cmd('nes', *args)
        assert code == 2 and f"output '{what}' is also an input" in err and 'would destroy it' in err, err
    assert queries.read_bytes() == before
    # The weights are read too: `embed -o` naming them (a fine-tuned run's, perhaps) would replace them at the end.
    weights = tmp_path / 'tuned.pth.tar'
    weights.write_bytes(b'weights')
    code, _, err = cmd('embed', queries, '--checkpoint', weights, '-o', weights)
    assert code == 2 and f"output '{weights}' is also an input" in err, err
    assert weights.read_bytes() == b'weights'


def test_workflow_commands_post_process_and_refuse_mixing(cmd, small_ckpt, small_op, photos, negatives,
                                                          negatives_file, tmp_path):
    for i, photo in enumerate(photos[:3]):
        photo.save(tmp_path / f'R{i:06d}.jpg')
    images = sorted(tmp_path.glob('R*.jpg'))
    model = ('--checkpoint', small_ckpt, '--device', 'cpu')
    nes = ('--negatives', negatives_file, '--nes-k', 5, '--nes-beta', 0.4)
    assert cmd('embed', *images, '-o', tmp_path / 'raw.h5', '--quiet', *model)[0] == 0
    assert cmd('embed', *images, '-o', tmp_path / 'post.h5', '--quiet', *model, *nes)[0] == 0
    raw = np.stack(small_op(images))
    want = restated(raw, negatives, k=5, beta=0.4)
    assert np.abs(read_descriptors(tmp_path / 'post.h5')[1] - want).max() < TOLERANCE
    assert read_postprocessing(tmp_path / 'post.h5')['beta'] == 0.4
    # `nes` on the raw file gives the same file as `embed --negatives`
    assert cmd('nes', tmp_path / 'raw.h5', '--negatives', negatives_file, '-o', tmp_path / 'nes.h5', '--k', 5,
               '--beta', 0.4)[0] == 0
    assert read_postprocessing(tmp_path / 'nes.h5') == read_postprocessing(tmp_path / 'post.h5')
    assert np.abs(read_descriptors(tmp_path / 'nes.h5')[1] - want).max() < TOLERANCE

    # search: images embedded now with --negatives against post-processed references: allowed, exact
    csv = tmp_path / 'matches.csv'
    code, out, err = cmd('search', *images, '--references', tmp_path / 'post.h5', '-k', 1, '-o', csv, *model, *nes)
    assert code == 0, err
    rows = sorted(r.split(',') for r in csv.read_text().splitlines()[1:])
    assert [r[:2] for r in rows] == [[f'R{i:06d}'] * 2 for i in range(3)]  # each image finds itself
    assert max(abs(float(r[2]) - 1) for r in rows) < 1e-5
    refused = [
        (('search', tmp_path / 'raw.h5', '--references', tmp_path / 'post.h5', '-o', csv),
         f'cannot mix descriptors post-processed differently: {tmp_path / "raw.h5"} (raw, not post-processed) '
         f'and {tmp_path / "post.h5"} (post-processed with 300 negatives'),
        (('search', *images, '--references', tmp_path / 'post.h5', '-o', csv, *model),
         'the queries embedded now (raw, not post-processed)'),
        (('search', tmp_path / 'post.h5', '--references', tmp_path / 'post.h5', '-o', csv, '--negatives', negatives_file),
         'k=10, beta=0.35'),
        (('search', tmp_path / 'post.h5', '--references', tmp_path / 'post.h5', '-o', csv, '--score-norm',
          tmp_path / 'raw.h5'), f'{tmp_path / "raw.h5"} (raw, not post-processed)'),
        (('dedup', tmp_path / 'raw.h5', tmp_path / 'nes.h5'), 'cannot mix descriptors post-processed differently'),
    ]
    csv.unlink()
    for args, message in refused:
        code, _, err = cmd(*args)
        assert code == 2 and err.startswith('error: ') and message in err, (args, err)
        assert not csv.exists()


def test_a_milvus_collection_keeps_its_post_processing(cmd, tmp_path, negatives_file):
    vectors = clustered(4, seed=8)
    write_descriptors(tmp_path / 'raw.h5', [f'R{i}' for i in range(4)], vectors)
    assert cmd('nes', tmp_path / 'raw.h5', '--negatives', negatives_file, '-o', tmp_path / 'post.h5')[0] == 0
    db = ('--milvus-uri', tmp_path / 'isc.db', '--collection', 'refs')
    assert cmd('index', tmp_path / 'post.h5', *db)[0] == 0
    code, _, err = cmd('index', tmp_path / 'raw.h5', *db)
    assert code == 2 and "collection 'refs' (post-processed with 300 negatives" in err
    assert f'{tmp_path / "raw.h5"} (raw, not post-processed)' in err
    code, _, err = cmd('search', tmp_path / 'raw.h5', *db, '-o', tmp_path / 'm.csv')
    assert code == 2 and 'cannot mix' in err and not (tmp_path / 'm.csv').exists()
    code, _, err = cmd('search', tmp_path / 'post.h5', *db, '-k', 1, '-o', tmp_path / 'm.csv')
    assert code == 0, err
    rows = sorted(r.split(',')[:2] for r in (tmp_path / 'm.csv').read_text().splitlines()[1:])
    assert rows == [[f'R{i}'] * 2 for i in range(4)]
