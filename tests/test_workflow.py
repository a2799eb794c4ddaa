"""The copy-detection workflow end to end on a small set built from real photos: embed -> index
(Milvus Lite, real) -> search -> evaluate, every figure checked against an independent computation."""
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import html_pages
from towhee_isc.workflow.cli import main as cli
from towhee_isc.workflow.descriptors import read_descriptors, read_model, write_descriptors
from towhee_isc.workflow.metrics import Match, evaluate
from towhee_isc.testing import make_copy_detection_set


@pytest.fixture(scope='module')
def copy_set(tmp_path_factory, photos):
    """6 references; 6 queries made from them (crop, resize, JPEG, colour, text, flip); 2 unmatched."""
    return make_copy_detection_set(tmp_path_factory.mktemp('copyset'), photos)


@pytest.fixture
def cmd(small_ckpt, capsys):
    """Run a towhee-isc command in-process; returns (exit code, stdout, stderr)."""
    def run(*args):
        code = cli([*map(str, args)] + (['--checkpoint', str(small_ckpt), '--device', 'cpu']
                                         if args[0] in ('embed', 'index', 'search', 'dedup') else []))
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def plain_average_precision(matches, truth):
    """μAP from its definition, written plainly: walk predictions from best to worst (false first
    at equal scores), add precision x recall step at each true match."""
    labelled = [m for m in matches if m.query_id in truth]
    positives = sum(len(r) for r in truth.values())
    labelled.sort(key=lambda m: (-m.score, m.reference_id in truth[m.query_id]))
    ap, hits = 0.0, 0
    for rank, m in enumerate(labelled, start=1):
        if m.reference_id in truth[m.query_id]:
            hits += 1
            ap += (hits / rank) * (1 / positives)
    return ap


def test_embed_writes_the_challenge_descriptor_format(cmd, copy_set, small_op, tmp_path):
    started = time.perf_counter()
    code, out, err = cmd('embed', copy_set / 'references', '-o', tmp_path / 'refs.h5', '--quiet', '--chunk-size', 2)
    elapsed = time.perf_counter() - started
    assert code == 0, err
    # the reported images/s is the bar's: images over the embedding alone, so at least over the whole call
    assert float(out.split('(')[-1].split()[0]) >= 6 / elapsed
    with h5py.File(tmp_path / 'refs.h5') as f:
        assert f['vectors'].dtype == np.float32 and f['vectors'].shape == (6, 256)
        names = [n.decode() for n in f['image_names'][:]]
    assert names == [f'R{i:06d}' for i in range(6)]
    ids, vectors = read_descriptors(tmp_path / 'refs.h5')
    want = np.stack(small_op(sorted((copy_set / 'references').iterdir())))
    assert np.abs(vectors - want).max() < 1e-5
    assert 'wrote 6 descriptors' in out and 'images/s' in out
    assert not (tmp_path / 'refs.h5.parts').exists()


def test_embed_index_search_evaluate_with_milvus_lite(cmd, copy_set, tmp_path):
    assert cmd('embed', copy_set / 'references', '-o', tmp_path / 'refs.h5', '--quiet')[0] == 0
    assert cmd('embed', copy_set / 'queries', '-o', tmp_path / 'queries.h5', '--quiet')[0] == 0
    db = tmp_path / 'isc.db'
    code, out, err = cmd('index', tmp_path / 'refs.h5', '--milvus-uri', db, '--collection', 'refs')
    assert code == 0, err
    assert cmd('index', tmp_path / 'refs.h5', '--milvus-uri', db, '--collection', 'refs')[1].endswith('(6 in all)\n')
    # An index that fails on its input (review 28: a typo) leaves a database that was there as it was, and makes
    # no new one: it had left a new, empty ./isc.db behind.
    assert cmd('index', tmp_path / 'nope.h5', '--milvus-uri', db, '--collection', 'refs')[0] == 2
    assert cmd('index', tmp_path / 'nope.h5', '--milvus-uri', tmp_path / 'new.db', '--collection', 'refs')[0] == 2
    assert not (tmp_path / 'new.db').exists()
    code, out, err = cmd('search', tmp_path / 'queries.h5', '--milvus-uri', db, '--collection', 'refs', '-k', 3,
                         '-o', tmp_path / 'matches.csv', '--report', tmp_path / 'report.html', '--report-images', copy_set)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / 'matches.csv')))
    assert len(rows) == 8 * 3 and [float(r['score']) for r in rows] == sorted((float(r['score']) for r in rows), reverse=True)
    # The collection keeps each image's path: the report shows every reference as a thumbnail.
    headers, table = html_pages.table(html_pages.parse((tmp_path / 'report.html').read_text()))
    assert headers == ['query', 'match 1', 'match 2', 'match 3'] and len(table) == 8
    assert all(len(cell.thumbnails) == 1 for cells in table for cell in cells)

    # Independent: brute-force inner products over the two descriptor files.
    qids, q = read_descriptors(tmp_path / 'queries.h5')
    rids, r = read_descriptors(tmp_path / 'refs.h5')
    sim = q @ r.T
    want = {(qids[i], rids[j]): sim[i, j] for i in range(len(qids)) for j in np.argsort(-sim[i])[:3]}
    got = {(row['query_id'], row['reference_id']): float(row['score']) for row in rows}
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in got) < 1e-5

    exact = tmp_path / 'exact.csv'
    assert cmd('search', tmp_path / 'queries.h5', '--references', tmp_path / 'refs.h5', '-k', 3, '-o', exact)[0] == 0
    assert {(r['query_id'], r['reference_id']) for r in csv.DictReader(open(exact))} == want.keys()

    code, out, err = cmd('evaluate', tmp_path / 'matches.csv', copy_set / 'ground_truth.csv', '--json',
                         '--plot', tmp_path / 'pr.png')
    result = json.loads(out)
    matches = [Match(k[0], k[1], v) for k, v in got.items()]
    truth = {f'Q{i:05d}': {f'R{i:06d}'} for i in range(6)} | {'Q00006': set(), 'Q00007': set()}
    assert abs(result['average_precision'] - plain_average_precision(matches, truth)) < 1e-12
    ranked = {q: sorted((m for m in matches if m.query_id == q), key=lambda m: -m.score) for q in truth}
    rank1 = sum(ranked[q][0].reference_id in truth[q] for q in truth) / 6
    assert result['recall_at_rank1'] == pytest.approx(rank1)
    assert set(result) == {'average_precision', 'recall_at_p90', 'threshold_at_p90', 'recall_at_rank1', 'recall_at_rank10'}
    assert Image.open(tmp_path / 'pr.png').size[0] > 300


def test_threshold_score_normalisation_and_report(cmd, copy_set, tmp_path):
    cmd('embed', copy_set / 'references', '-o', tmp_path / 'refs.h5', '--quiet')
    cmd('embed', copy_set / 'queries', '-o', tmp_path / 'queries.h5', '--quiet')
    background = tmp_path / 'background.h5'
    cmd('embed', copy_set / 'queries' / 'sub', '-o', background, '--quiet')
    qids, q = read_descriptors(tmp_path / 'queries.h5')
    rids, r = read_descriptors(tmp_path / 'refs.h5')
    _, b = read_descriptors(background)
    offset = 0.5 * np.sort(q @ b.T, axis=1)[:, -2]
    sim = q @ r.T - offset[:, None]
    # A threshold between the two weakest queries' best scores: exactly one query has no match.
    weakest = np.argsort(sim.max(axis=1))
    threshold = float(sim.max(axis=1)[weakest[:2]].mean())
    lonely, found, clean = qids[weakest[0]], qids[weakest[-1]], qids[weakest[-2]]
    top2 = {qids[i]: [rids[j] for j in np.argsort(-sim[i])[:2]] for i in range(len(qids))}
    # Ground truth: `found`'s best is true and another reference, not in its 2 best, is missed; `lonely`'s best is
    # true but under the threshold; `clean` has no copy; the other queries are not labelled.
    missed = next(ref for ref in rids if ref not in top2[found])
    truth = {found: {top2[found][0], missed}, lonely: {top2[lonely][0]}, clean: set()}
    (tmp_path / 'gt.csv').write_text('query_id,reference_id\n' + ''.join(
        f'{query},{ref}\n' for query, refs in truth.items() for ref in sorted(refs) or ['']))
    code, _, err = cmd('search', tmp_path / 'queries.h5', '--references', tmp_path / 'refs.h5', '-k', 2,
                       '--score-norm', background, '--factor', 0.5, '--nth', 2, '--threshold', threshold,
                       '-o', tmp_path / 'norm.csv', '--report', tmp_path / 'report.html', '--ground-truth', tmp_path / 'gt.csv',
                       '--report-images', copy_set)
    assert code == 0, err
    (tmp_path / 'bad_gt.csv').write_text('query,reference\nQ00000,R000000\n')
    for extra, message in ((['--ground-truth', tmp_path / 'gt.csv'], '--ground-truth marks the matches of the --report'),
                           (['--report', tmp_path / 'r.html', '--ground-truth', tmp_path / 'bad_gt.csv'],
                            'must start with the columns query_id,reference_id')):
        code, _, err = cmd('search', tmp_path / 'queries.h5', '--references', tmp_path / 'refs.h5', '-o', tmp_path / 'x.csv', *extra)
        assert code == 2 and message in err and not (tmp_path / 'x.csv').exists(), err
    want = {(qids[i], rids[j]) for i in range(len(qids)) for j in np.argsort(-sim[i])[:2] if sim[i, j] >= threshold}
    rows = list(csv.DictReader(open(tmp_path / 'norm.csv')))
    assert {(row['query_id'], row['reference_id']) for row in rows} == want
    for row in rows:
        i, j = qids.index(row['query_id']), rids.index(row['reference_id'])
        assert float(row['score']) == pytest.approx(sim[i, j], abs=1e-5)

    page = html_pages.parse((tmp_path / 'report.html').read_text())
    kept = [Match(row['query_id'], row['reference_id'], float(row['score'])) for row in rows]
    assert html_pages.summary(page) == {
        'queries': '8', 'matches per query (k)': '2', 'threshold': f'{threshold:g}',
        'matches at or above the threshold': str(len(rows)), 'queries with a match': '7',
        'μAP (ground truth)': f'{plain_average_precision(kept, truth):.4f}',
        'recall at precision 0.9': f"{evaluate(kept, truth)['recall_at_p90']:.4f}",
        'true matches kept': f'{sum(m.reference_id in truth.get(m.query_id, ()) for m in kept)} of 3'}
    headers, table = html_pages.table(page)
    assert headers == ['query', 'match 1', 'match 2', 'missed (ground truth)']
    assert [cells[0].all(cls='id')[0].text for cells in table] == sorted(qids)  # every query, by id
    for cells in table:
        query = cells[0].all(cls='id')[0].text
        i = qids.index(query)
        assert len(cells[0].thumbnails) == 1
        tags = {t.text for t in cells[0].all(cls='tag')}
        assert ('no match' in tags) == (query == lonely)
        assert ('not in ground truth' in tags) == (query not in truth)
        for cell, ref in zip(cells[1:3], top2[query]):  # both candidates, best first, whatever their score
            above = sim[i, rids.index(ref)] >= threshold
            assert cell.all(cls='id')[0].text == ref and len(cell.thumbnails) == 1
            assert cell.all(cls='score')[0].text == f'{sim[i, rids.index(ref)]:.4f}'
            marks = {t.text for t in cell.all(cls='tag')}
            assert ('pass' in cell.classes) == above and ('≥ T' in marks) == above
            assert marks - {'≥ T'} == (set() if query not in truth else {'✓ true'} if ref in truth[query] else {'✗ false'})
        missed_cell = cells[3].text
        if query == found:
            assert missed_cell == f'{missed} not among the 2 found' and len(cells[3].thumbnails) == 1
        elif query == lonely:
            assert missed_cell.startswith(f'{top2[lonely][0]} rank 1, ') and missed_cell.endswith('below the threshold')
        else:
            assert missed_cell == ('no copy to find' if query == clean else '' if query not in truth else '—')


def test_dedup_groups_copies_and_keeps_the_largest(cmd, photos, tmp_path):
    folder = tmp_path / 'photos'
    folder.mkdir()
    photos[0].save(folder / 'a_big.png')
    photos[0].resize((256, 256)).save(folder / 'a_small.jpg', quality=95)
    photos[0].resize((300, 300)).save(folder / 'a_mid.jpg', quality=95)
    for i in (1, 2, 3):
        photos[i].save(folder / f'other{i}.jpg')
    code, out, err = cmd('dedup', folder, '--threshold', 0.9, '-o', tmp_path / 'groups.json')
    assert code == 0, err
    groups = json.loads((tmp_path / 'groups.json').read_text())
    assert groups == [{'keep': 'a_big', 'members': ['a_big', 'a_mid', 'a_small']}]
    assert 'group 1: keep a_big' in out
    cmd('embed', folder, '-o', tmp_path / 'all.h5', '--quiet')
    code, out, err = cmd('dedup', tmp_path / 'all.h5', '--threshold', 0.9, '-o', tmp_path / 'groups.csv',
                         '--report', tmp_path / 'groups.html', '--report-images', folder)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / 'groups.csv')))
    # The kept image first, then the others by their score to it: the similarity of their descriptors.
    ids, vectors = read_descriptors(tmp_path / 'all.h5')
    v = dict(zip(ids, vectors))
    score = {m: float(v[m] @ v['a_big']) for m in ('a_mid', 'a_small')}
    assert [(r['image_id'], r['keep']) for r in rows] == [('a_big', 'True')] + [
        (m, 'False') for m in sorted(score, key=score.get, reverse=True)]
    assert rows[0]['score_to_kept'] == '' and all(float(r['score_to_kept']) == pytest.approx(score[r['image_id']], abs=1e-6)
                                                  for r in rows[1:])
    for r in rows:  # each image's resolution and file size, from the file itself
        path = folder / Path(r['path']).name
        assert r['path'] == str(path.resolve())
        assert (int(r['width']), int(r['height']), int(r['bytes'])) == (*Image.open(path).size, path.stat().st_size)
    page = html_pages.parse((tmp_path / 'groups.html').read_text())
    members = page.all(cls='member')
    assert [m.all(cls='id')[0].text for m in members] == [r['image_id'] for r in rows]
    assert 'keep' in members[0].classes and [t.text for t in members[0].all(cls='tag')] == ['keep']
    for member, row in zip(members[1:], rows[1:]):  # under each copy: its score to the kept image, size and file size
        assert 'keep' not in member.classes and not member.all(cls='tag')
        assert member.all(cls='score')[0].text == f"score {float(row['score_to_kept']):.4f}"
        assert f"{row['width']}×{row['height']}" in member.text
    assert all(len(m.thumbnails) == 1 for m in members)
    code, out, err = cmd('dedup', tmp_path / 'all.h5', '--threshold', 0.9, '--milvus-uri', tmp_path / 'd.db',
                         '-o', tmp_path / 'milvus.json')
    assert code == 0, err
    assert json.loads((tmp_path / 'milvus.json').read_text()) == groups


def test_reports_escape_ids_and_say_why_a_thumbnail_is_missing(photos, tmp_path):
    from towhee_isc.workflow.reports import GroupMember, groups_report, search_report
    photos[0].save(tmp_path / 'a.jpg')
    (tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
    hostile = ['<script>alert(1)</script>', 'R"><img src=x onerror=alert(1)>', "R'&amp;"]  # ids are user data
    paths = {hostile[1]: str(tmp_path / 'gone.jpg'), hostile[2]: str(tmp_path / 'broken.jpg')}
    search_report(tmp_path / 'report.html', ['Q2', hostile[0]], [Match(hostile[0], r, 0.9 - n / 10)
                  for n, r in enumerate([hostile[1], hostile[2], 'R3'])], 3, {hostile[0]: str(tmp_path / 'a.jpg')}, paths,
                  reference_missing='the collection keeps no image paths')
    page = html_pages.parse((tmp_path / 'report.html').read_text())
    assert not page.all('script') and all(img.attrs['src'].startswith('data:image/jpeg;base64,') for img in page.all('img'))
    _, table = html_pages.table(page)
    assert [cells[0].all(cls='id')[0].text for cells in table] == [hostile[0], 'Q2']  # sorted by id
    assert table[1][0].all(cls='tag')[0].text == 'no match' and len(table[1]) == 4  # no candidates: still a row
    cells = table[0]
    assert len(cells[0].thumbnails) == 1 and [c.all(cls='id')[0].text for c in cells[1:]] == [*hostile[1:], 'R3']
    assert cells[1].all('i')[0].text == f"image gone: {tmp_path / 'gone.jpg'}"
    assert 'is not an image' in cells[2].all('i')[0].text
    assert cells[3].all('i')[0].text == 'the collection keeps no image paths'

    def group(*members):
        return [GroupMember(m, paths.get(m, str(tmp_path / 'a.jpg')), n == 0, None if n == 0 else 0.95, 512, 512, 9000)
                for n, m in enumerate(members)]
    groups_report(tmp_path / 'groups.html', [group('K1', 'C1'), group(hostile[0], hostile[1], hostile[2])], 9, 0.9)
    page = html_pages.parse((tmp_path / 'groups.html').read_text())
    assert not page.all('script') and [h.text for h in page.all('h2')] == ['Group 1: 3 images', 'Group 2: 2 images']
    assert [m.all(cls='id')[0].text for m in page.all(cls='member')] == [*hostile, 'K1', 'C1']
    assert html_pages.summary(page) == {'images': '9', 'groups': '2', 'images in groups': '5',
                                        'copies that could go': '3', 'threshold': '0.9'}


def test_a_stored_path_with_a_nul_byte_is_a_cell_that_says_so_not_the_end_of_the_report(tmp_path):
    """Hostile round 15: a descriptor file's relative path holding a NUL byte ended `search --report`
    with 'embedded null byte' and no page (os calls raise ValueError on such names)."""
    from towhee_isc.workflow.reports import ImageFolders, Thumbnails
    thumbnails = Thumbnails(ImageFolders([tmp_path]))
    for path in ('x\0y.jpg', str(tmp_path / 'x\0y.jpg')):
        assert 'holds a NUL byte' in thumbnails(path)

def test_images_people_really_have(cmd, photos, tmp_path, small_op):
    """Mixed formats in nested folders, EXIF orientation, CMYK / palette / alpha, a GIF's first frame."""
    folder = tmp_path / 'phone'
    (folder / 'nested').mkdir(parents=True)
    upright = photos[1]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / 'phone.jpg', exif=exif, quality=95)
    upright.save(folder / 'upright.jpg', quality=95)
    photos[2].convert('CMYK').save(folder / 'nested' / 'cmyk.tiff')
    photos[3].convert('P').save(folder / 'nested' / 'palette.gif')
    photos[4].convert('RGBA').save(folder / 'nested' / 'alpha.webp')
    photos[5].save(folder / 'nested' / 'plain.bmp')
    code, out, err = cmd('embed', folder, '-o', tmp_path / 'phone.h5', '--quiet')
    assert code == 0 and 'wrote 6 descriptors' in out, err
    ids, vectors = read_descriptors(tmp_path / 'phone.h5')
    assert sorted(ids) == ['alpha', 'cmyk', 'palette', 'phone', 'plain', 'upright']
    v = dict(zip(ids, vectors))
    assert float(v['phone'] @ v['upright']) > 0.99  # turned upright before embedding
    assert float(small_op(folder / 'phone.jpg') @ v['upright']) < 0.99  # the operator alone does not


def test_dedup_finds_pairs_across_query_blocks_with_either_engine():
    from towhee_isc.workflow.engines import TILE as BLOCK, Exact, Ivf  # rows of one tile of pairs
    from towhee_isc.workflow.matching import duplicate_groups, near_duplicate_pairs
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((BLOCK + 5, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[7] = vectors[BLOCK + 2]  # in the first and the second block of query rows
    ids = [f'I{i}' for i in range(len(vectors))]
    for engine in (Exact(), Ivf(nlist=16, nprobe=2, pair_nprobe=2)):
        groups = duplicate_groups(ids, near_duplicate_pairs(vectors, 0.999, engine))
        assert [(g.members, g.keep) for g in groups] == [(['I7', f'I{BLOCK + 2}'], 'I7')]


def test_unreadable_files_are_skipped_counted_and_listed(cmd, copy_set, tmp_path):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    for f in (copy_set / 'references').iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / 'broken.jpg').write_bytes(b'not a jpeg')
    code, out, err = cmd('embed', folder, '-o', tmp_path / 'mixed.h5', '--quiet', '--chunk-size', 4)
    assert code == 0 and 'wrote 6 descriptors' in out
    assert 'skipped 1 unreadable' in err and 'broken.jpg' in err
    assert read_descriptors(tmp_path / 'mixed.h5')[0] == [f'R{i:06d}' for i in range(6)]
    code, _, err = cmd('embed', folder, '-o', tmp_path / 'strict.h5', '--quiet', '--strict')
    assert code == 2 and 'broken.jpg' in err and not (tmp_path / 'strict.h5').exists()


def test_killed_embed_resumes_without_losing_or_duplicating_rows(small_ckpt, photos, tmp_path):
    folder = tmp_path / 'many'
    folder.mkdir()
    for i in range(40):
        photos[i % len(photos)].rotate(i * 9).save(folder / f'R{i:06d}.jpg', quality=90)
    command = [sys.executable, '-m', 'towhee_isc', 'embed', str(folder), '--checkpoint', str(small_ckpt),
               '--device', 'cpu', '--chunk-size', '2', '--quiet']
    whole = subprocess.run(command + ['-o', str(tmp_path / 'whole.h5')], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    parts = tmp_path / 'resumed.h5.parts'
    process = subprocess.Popen(command + ['-o', str(tmp_path / 'resumed.h5')], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(parts.glob('*.npz'))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = len(list(parts.glob('*.npz')))
    assert 3 <= saved < 20 and not (tmp_path / 'resumed.h5').exists()
    # An image of a saved chunk replaced meanwhile (a re-download) is embedded again, never its old vector kept.
    shutil.copy(folder / 'R000001.jpg', folder / 'R000000.jpg')
    again = subprocess.run(command + ['-o', str(tmp_path / 'resumed.h5')], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert '1 input(s) changed since the interrupted run: embedded again' in again.stderr
    ids, vectors = read_descriptors(tmp_path / 'resumed.h5')
    want_ids, want = read_descriptors(tmp_path / 'whole.h5')
    assert ids == want_ids and len(ids) == 40 and np.array_equal(vectors[1:], want[1:])
    assert np.allclose(vectors[0], want[1], atol=1e-5) and not np.allclose(vectors[0], want[0], atol=1e-2)
    assert not parts.exists()


def test_bad_inputs_are_one_line_errors(cmd, copy_set, tmp_path):
    (tmp_path / 'text.h5').write_text('no hdf5')
    with h5py.File(tmp_path / 'f64.h5', 'w') as f:
        f['vectors'] = np.zeros((2, 256))
        f['image_names'] = np.array([b'a', b'b'])
    with h5py.File(tmp_path / 'd128.h5', 'w') as f:
        f['vectors'] = np.eye(2, 128, dtype=np.float32)
        f['image_names'] = np.array([b'a', b'b'])
    db = tmp_path / 'isc.db'
    cmd('embed', copy_set / 'references', '-o', tmp_path / 'refs.h5', '--quiet')
    cmd('index', tmp_path / 'refs.h5', '--milvus-uri', db, '--collection', 'refs')
    # Another image under an indexed id (two phones' IMG_0001.jpg) replaced that reference without a word.
    ids, vectors = read_descriptors(tmp_path / 'refs.h5')
    write_descriptors(tmp_path / 'phone_b.h5', ids[:1], vectors[1:2], model=read_model(tmp_path / 'refs.h5'))
    out = tmp_path / 'out.csv'
    cases = [
        (('index', tmp_path / 'phone_b.h5', '--milvus-uri', db, '--collection', 'refs'),
         "1 id(s) are in collection 'refs' already for another image ('R000000'): nothing was written; rename those "
         'files, or give --replace'),
        # dedup adds to the collection as index does (often the references' own): never replacing a reference.
        (('dedup', tmp_path / 'phone_b.h5', '--milvus-uri', db, '--collection', 'refs'),
         "1 id(s) are in collection 'refs' already for another image ('R000000'): nothing was written; rename those "
         'files, replace those references first (towhee-isc index ... --replace), or dedup into another --collection'),
        (('index', tmp_path / 'missing.h5', '--milvus-uri', db), 'descriptor file not found'),
        (('index', tmp_path / 'text.h5', '--milvus-uri', db), 'not a readable HDF5 file'),
        (('index', tmp_path / 'f64.h5', '--milvus-uri', db), "'vectors' must be float32"),
        (('index', tmp_path / 'd128.h5', '--milvus-uri', db, '--collection', 'refs'), 'holds 256-d vectors; these are 128-d'),
        (('search', tmp_path / 'refs.h5', '--milvus-uri', db, '--collection', 'nope', '-o', out), "unknown collection 'nope'"),
        (('search', tmp_path / 'refs.h5', '--milvus-uri', 'http://127.0.0.1:9', '-o', out), "cannot reach Milvus at 'http://127.0.0.1:9'"),
        (('embed', tmp_path / 'nowhere', '-o', out), 'no such file, folder or pattern'),
    ]
    for args, message in cases:
        code, _, err = cmd(*args)
        assert code == 2 and message in err and 'Traceback' not in err, (args, err)
        assert not out.exists()
    code, out_text, _ = cmd('index', tmp_path / 'phone_b.h5', '--milvus-uri', db, '--collection', 'refs', '--replace')
    assert code == 0 and out_text.endswith('(6 in all)\n'), out_text


@pytest.mark.parametrize('content, message', [
    ('query,reference,score\nQ1,R1,0.5\n', 'must start with the columns query_id,reference_id,score'),
    ('query_id,reference_id,score\nQ1,R1,high\n', "line 2: score 'high' is not a number"),
    ('query_id,reference_id,score\nQ1,R1,0.5\nQ1,R1,0.4\n', "line 3: the pair ('Q1', 'R1') is predicted twice"),
])
def test_malformed_prediction_csv(cmd, copy_set, tmp_path, content, message):
    (tmp_path / 'bad.csv').write_text(content)
    code, _, err = cmd('evaluate', tmp_path / 'bad.csv', copy_set / 'ground_truth.csv')
    assert code == 2 and message in err


def m(q, r, s):
    return Match(q, r, s)


TRUTH = {'Q1': {'R1'}, 'Q2': {'R2'}, 'Q3': set()}


def test_metric_perfect_ranking():
    result = evaluate([m('Q1', 'R1', 0.9), m('Q2', 'R2', 0.8), m('Q3', 'R9', 0.1)], TRUTH)
    assert result['average_precision'] == 1.0 and result['recall_at_p90'] == 1.0
    assert result['threshold_at_p90'] == 0.8 and result['recall_at_rank1'] == 1.0


def test_metric_all_wrong_never_reaches_p90():
    result = evaluate([m('Q1', 'R2', 0.9), m('Q2', 'R1', 0.8)], TRUTH)
    assert result == {'average_precision': 0.0, 'recall_at_p90': 0.0, 'threshold_at_p90': None,
                      'recall_at_rank1': 0.0, 'recall_at_rank10': 0.0}


def test_metric_ties_rank_false_matches_first():
    tied = [m('Q1', 'R1', 0.5), m('Q1', 'R7', 0.5), m('Q2', 'R2', 0.5), m('Q3', 'R9', 0.5)]
    # worst case order: two false, then two true: precision 1/3 and 2/4 at the true ones
    assert evaluate(tied, TRUTH)['average_precision'] == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4))
    assert evaluate(tied, TRUTH)['average_precision'] == pytest.approx(plain_average_precision(tied, TRUTH))
    assert evaluate(tied, TRUTH)['recall_at_rank1'] == 0.5  # Q1: R7 ties R1 and ranks first; Q2 found
    assert evaluate(tied, TRUTH)['recall_at_rank10'] == 1.0


def test_metric_without_positives_and_unlabelled_queries():
    assert evaluate([m('Q3', 'R1', 0.9)], {'Q3': set()})['average_precision'] == 0.0
    result = evaluate([m('QX', 'R1', 0.99), m('Q1', 'R1', 0.5)], TRUTH)  # QX is not labelled: ignored
    assert result['average_precision'] == 0.5 and result['recall_at_p90'] == 0.5
