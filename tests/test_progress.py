"""Progress lines of the long steps: drawn on stderr where someone watches (a terminal; here forced with
TOWHEE_ISC_PROGRESS=1, which also draws them from the start), never with --quiet or into a pipe."""
from __future__ import annotations

import re

import numpy as np
import pytest

from commands import towhee_isc
from towhee_isc.workflow.descriptors import write_descriptors

SHOWN = {'TOWHEE_ISC_PROGRESS': '1'}


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 256)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('progress')
    references = unit_rows(300, 1)
    queries = references[:20] + 0.05 * unit_rows(20, 2)
    write_descriptors(folder / 'r.h5', [f'R{i:03d}' for i in range(300)], references)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    write_descriptors(folder / 'q.h5', [f'Q{i:03d}' for i in range(20)], queries)
    (folder / 'gt.csv').write_text('query_id,reference_id\n' + ''.join(f'Q{i:03d},R{i:03d}\n' for i in range(20)))
    return folder


def last_line(stderr: str, description: str) -> str:
    """The last drawing of a progress line (tqdm redraws it in place with carriage returns)."""
    drawings = [d for d in re.split(r'[\r\n]', stderr) if d.startswith(description)]
    assert drawings, (description, stderr[-2000:])
    return drawings[-1]


def test_every_long_command_step_draws_a_line_with_its_rate(files):
    steps = {('dedup', 'r.h5'): ['finding pairs (exact)'],
             ('search', 'q.h5', '--references', 'r.h5', '-o', 'm.csv'): ['searching (exact)'],
             ('evaluate', 'm.csv', 'gt.csv'): ['reading m.csv', 'reading gt.csv', 'scoring 200 matches'],
             ('nes', 'q.h5', '--negatives', 'r.h5', '-o', 'n.h5'): ['augmenting negatives', 'subtracting negatives']}
    for args, descriptions in steps.items():
        result = towhee_isc(*args, cwd=files, env=SHOWN)
        assert result.returncode == 0, result.stderr
        for description in descriptions:
            line = last_line(result.stderr, description)
            assert '100%|' in line and re.search(r'\[\d\d:\d\d, [\d.]+ \w+/s\]$', line.rstrip()), line


@pytest.mark.parametrize('how', ['--quiet', 'a pipe'])
def test_no_lines_with_quiet_or_into_a_pipe(files, how):
    result = towhee_isc('dedup', 'r.h5', *(['--quiet'] if how == '--quiet' else []), cwd=files,
                        env=SHOWN if how == '--quiet' else {'TOWHEE_ISC_PROGRESS': ''})
    assert result.returncode == 0 and result.stderr == '', result.stderr


def test_approximate_search_and_milvus_uploads_draw_lines(monkeypatch, capsys, tmp_path):
    from towhee_isc.workflow.engines import Ivf
    from towhee_isc.workflow.milvus import MilvusIndex
    monkeypatch.setenv('TOWHEE_ISC_PROGRESS', '1')
    vectors = unit_rows(2000, 3)
    Ivf(nlist=8, nprobe=2, pair_nprobe=2).pairs(vectors, 0.9)
    Ivf(nlist=8, nprobe=2, pair_nprobe=2).nearest(vectors[:50], vectors, 5)
    index = MilvusIndex(str(tmp_path / 'p.db'), 'progress')
    ids = [f'R{i}' for i in range(len(vectors))]
    index.add(ids, vectors)
    assert len(index.search(ids[:300], vectors[:300], 3)) == 900
    err = capsys.readouterr().err
    assert last_line(err, 'clustering into 8 cells').endswith(']')
    for description in ('finding pairs (IVF)', 'searching (IVF)', "uploading to 'progress'", "searching 'progress'"):
        assert '100%|' in last_line(err, description), description



def test_images_given_to_search_index_or_dedup_draw_the_embedding_line(monkeypatch, capsys, tmp_path, small_ckpt, photos):
    """Their embedding is most of their time (dedup of a photo folder was silent for a minute)."""
    from towhee_isc.workflow.embedding import Embedder, load_descriptors
    for i, photo in enumerate(photos[:3]):
        photo.resize((64, 48)).save(tmp_path / f'p{i}.jpg')
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    monkeypatch.setenv('TOWHEE_ISC_PROGRESS', '1')
    embedder = Embedder(checkpoint_path=str(small_ckpt), device='cpu', backend='torch')
    ids, vectors, _ = load_descriptors([str(tmp_path)], embedder)
    assert ids == ['p0', 'p1', 'p2'] and vectors.shape == (3, 256)
    line = last_line(capsys.readouterr().err, 'embedding')
    assert '100%|' in line and '4/4' in line, line  # the unreadable file is counted as done, and listed
