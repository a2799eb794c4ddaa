"""Search engines: exact search equals brute force, the approximate one finds the copies exact search
finds, and the commands say which engine they used."""
import json
import subprocess
import sys

import numpy as np
import pytest

from towhee_isc.workflow.descriptors import write_descriptors
from towhee_isc.workflow.engines import Exact, Ivf, choose_engine
from towhee_isc.workflow.matching import search


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plant_copies(rng: np.random.Generator, x: np.ndarray, pairs: int, low: float, high: float) -> set:
    """Make ``pairs`` vectors copies of others at a cosine drawn in [low, high]; returns the pairs (i < j)."""
    chosen = rng.choice(len(x), size=(pairs, 2), replace=False)
    a, b = chosen[:, 0], chosen[:, 1]
    away = x[b] - np.sum(x[b] * x[a], axis=1, keepdims=True) * x[a]  # a direction orthogonal to the original
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    cos = rng.uniform(low, high, size=(pairs, 1)).astype(np.float32)
    x[b] = cos * x[a] + np.sqrt(1 - cos ** 2) * away
    return {(min(i, j), max(i, j)) for i, j in zip(a.tolist(), b.tolist())}


def test_exact_nearest_equals_brute_force():
    rng = np.random.default_rng(0)
    queries, references = unit(rng, 300, 64), unit(rng, 2000, 64)
    indices, scores = Exact().nearest(queries, references, 5)
    sim = queries @ references.T
    want = np.sort(sim, axis=1)[:, ::-1][:, :5]
    assert indices.shape == scores.shape == (300, 5)
    assert np.abs(scores - want).max() < 1e-5
    assert np.abs(np.take_along_axis(sim, indices, axis=1) - want).max() < 1e-5  # the right references
    # no ties at this size: the indices are brute force's too
    assert (indices == np.argsort(-sim, axis=1)[:, :5]).all()
    assert Exact().nearest(queries[:2], references[:3], 10)[0].shape == (2, 3)  # k beyond the references


def test_exact_pairs_equal_brute_force():
    rng = np.random.default_rng(1)
    x = unit(rng, 5000, 32)
    plant_copies(rng, x, 50, 0.7, 0.99)
    i, j, s = Exact().pairs(x, 0.6)
    sim = x @ x.T
    rows, cols = np.nonzero(np.triu(sim >= 0.6, 1))
    near_threshold = np.abs(sim[rows, cols] - 0.6) < 1e-5
    assert set(zip(i.tolist(), j.tolist())) ^ set(zip(rows.tolist(), cols.tolist())) <= \
        set(zip(rows[near_threshold].tolist(), cols[near_threshold].tolist()))
    assert len(i) >= 50 and (i < j).all()
    assert np.abs(s - sim[i, j]).max() < 1e-5


def test_approximate_engine_finds_what_exact_finds_on_planted_copies():
    rng = np.random.default_rng(2)
    x = unit(rng, 20_000, 256)
    planted = plant_copies(rng, x, 300, 0.85, 0.95)
    engine = choose_engine(len(x), len(x), exact_up_to=1_000)  # force the approximate path at this size
    assert isinstance(engine, Ivf) and engine.description.startswith('approximate')
    exact = set(zip(*(a.tolist() for a in Exact().pairs(x, 0.8)[:2])))
    assert exact == planted  # random 256-d vectors are far apart: only the copies reach 0.8
    i, j, s = engine.pairs(x, 0.8)
    found = set(zip(i.tolist(), j.tolist()))
    assert len(found & exact) >= 0.99 * len(exact)
    assert len(found) == len(i) and (s >= 0.8).all() and (i < j).all()  # each pair once, all above
    # nearest: each copy's best reference is its original
    copies = np.array(sorted(b for _, b in planted))
    originals = np.array([a for a, _ in sorted(planted, key=lambda p: p[1])])
    references = np.delete(np.arange(len(x)), copies)
    indices, scores = engine.nearest(x[copies], x[references], 3)
    assert np.mean(references[indices[:, 0]] == originals) >= 0.99
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_small_jobs_are_exact_and_exact_can_be_forced():
    assert isinstance(choose_engine(1000, 1000), Exact)
    assert isinstance(choose_engine(10, 10 ** 9), Exact)  # few queries: exact search is cheap
    assert isinstance(choose_engine(10 ** 6, 10 ** 6), Ivf)
    assert isinstance(choose_engine(10 ** 6, 10 ** 6, exact=True), Exact)
    assert Ivf.for_size(10 ** 6) == Ivf(nlist=4000, nprobe=127, pair_nprobe=51)  # 4 sqrt(N) cells


def test_score_normalisation_offsets_stay_finite_with_the_approximate_engine():
    from towhee_isc.workflow.matching import nth_neighbour_similarity
    rng = np.random.default_rng(5)
    queries, background = unit(rng, 50, 16), unit(rng, 1000, 16)
    want = np.sort(queries @ background.T, axis=1)[:, -3]
    got = nth_neighbour_similarity(queries, background, 3, Ivf(nlist=400, nprobe=1, pair_nprobe=1))  # ~2.5 a cell
    assert np.isfinite(got).all() and (got <= want + 1e-5).all()  # a row short of 3 is looked up exactly
    assert np.abs(nth_neighbour_similarity(queries, background, 3, Exact()) - want).max() < 1e-5


@pytest.mark.parametrize('bad, message', [
    (lambda x: Exact().nearest(x, x, 0), 'k (matches per query) must be a positive integer, got 0'),
    (lambda x: Ivf(4, 2, 2).nearest(x, x, -1), 'positive integer, got -1'),
    (lambda x: Exact().pairs(x, float('nan')), 'threshold must be a finite number, got nan'),
    (lambda x: Ivf(4, 2, 2).pairs(x, float('inf')), 'threshold must be a finite number, got inf'),
    (lambda x: Exact().nearest(x, x[:, :8], 1), 'descriptor sizes differ: 16 vs 8'),
    (lambda x: search(['q'], x[:1], ['r'], x[1:2], 1, threshold=float('nan')),
     '--threshold must be a finite number, got nan'),
])
def test_bad_arguments_are_clear_errors(bad, message):
    x = unit(np.random.default_rng(3), 200, 16)
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        bad(x)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'towhee_isc', *map(str, args)], capture_output=True, text=True)


def test_commands_say_which_engine_and_exact_forces_exact(tmp_path):
    # 100,001 descriptors: past the size where dedup goes approximate (small vectors keep it quick)
    rng = np.random.default_rng(4)
    x = unit(rng, 100_001, 16)
    planted = plant_copies(rng, x, 20, 0.999, 0.9999)
    ids = [f'I{i:06d}' for i in range(len(x))]
    write_descriptors(tmp_path / 'many.h5', ids, x)
    result = run('dedup', tmp_path / 'many.h5', '--threshold', 0.998, '-o', tmp_path / 'groups.json')
    assert result.returncode == 0, result.stderr
    assert 'search engine: approximate (faiss IVF' in result.stdout
    assert '20 group(s) of near-duplicates among 100001 images' in result.stdout
    found = {tuple(sorted(int(m[1:]) for m in g['members'])) for g in json.loads((tmp_path / 'groups.json').read_text())}
    assert found == planted  # as the exact engine finds them (test_approximate_engine_finds_what_exact_finds...)
    # --exact: the same command names the exact engine before its work (~25 CPU-s here), stopped there.
    forced = subprocess.Popen([sys.executable, '-m', 'towhee_isc', 'dedup', str(tmp_path / 'many.h5'), '--threshold',
                               '0.998', '--exact', '-o', str(tmp_path / 'exact.json')], stdout=subprocess.PIPE, text=True)
    try:
        assert forced.stdout.readline() == 'search engine: exact (faiss flat inner product)\n'
    finally:
        forced.kill()
        forced.communicate()

    write_descriptors(tmp_path / 'queries.h5', ids[:3], x[:3])
    result = run('search', tmp_path / 'queries.h5', '--references', tmp_path / 'many.h5', '-k', 2,
                 '-o', tmp_path / 'matches.csv')
    assert result.returncode == 0 and 'search engine: exact' in result.stdout  # 3 queries: exact is cheap
    result = run('search', tmp_path / 'queries.h5', '--references', tmp_path / 'many.h5', '-k', 0,
                 '-o', tmp_path / 'bad.csv')
    assert result.returncode == 2 and 'argument -k: must be at least 1, got 0' in result.stderr  # refused by the parser
    assert not (tmp_path / 'bad.csv').exists()
    result = run('dedup', tmp_path / 'queries.h5', '--threshold', 'nan')
    assert result.returncode == 2 and "argument --threshold: must be a finite number, got 'nan'" in result.stderr
