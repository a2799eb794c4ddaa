"""The README's Milvus route as a user runs it, each command in its own process, against Milvus Lite and a real
Milvus standalone server (tests/milvus_server.py, on 127.0.0.1): the results equal the exact mode's. Then
index types, authentication, and the ways a Milvus Lite database or an option can be wrong."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import html_pages
from towhee_isc.testing import make_copy_detection_set
from towhee_isc.workflow.descriptors import write_descriptors
from towhee_isc.workflow.milvus import ivf_nlist, search_params


def towhee_isc(*args, check: bool = True) -> subprocess.CompletedProcess:
    """One command in a fresh process, as a user runs it."""
    done = subprocess.run([sys.executable, '-m', 'towhee_isc', *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
        assert 'Traceback' not in done.stderr and 'NotImplementedError' not in done.stderr, done.stderr
    return done


def towhee_isc_together(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """Several commands, each in a fresh process, run at the same time (they must not share files)."""
    running = [subprocess.Popen([sys.executable, '-m', 'towhee_isc', *map(str, c)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for c in commands]
    done = []
    for command, process in zip(commands, running):
        out, err = process.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return done


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed as ours do: exit code 2, one `error:` line naming the problem, no traceback."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert 'Traceback' not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith('error: ') or ': error: ' in line, done.stderr
    for word in words:
        assert word in line, line
    return line


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def best(rows: list[dict]) -> dict[str, str]:
    """Each query's best reference (the CSV is sorted best first)."""
    return {r['query_id']: r['reference_id'] for r in reversed(rows)}


def assert_same_matches(got: list[dict], want: list[dict]) -> None:
    """Same (query, reference) pairs in the same order, scores within 1e-5."""
    assert [(r['query_id'], r['reference_id']) for r in got] == [(r['query_id'], r['reference_id']) for r in want]
    assert max(abs(float(a['score']) - float(b['score'])) for a, b in zip(got, want)) < 1e-5


@pytest.fixture(scope='module')
def embedded(tmp_path_factory, photos, small_ckpt) -> Path:
    """README step 1, `embed` as a process: references.h5 and queries.h5 of the tests' copy-detection set."""
    root = make_copy_detection_set(tmp_path_factory.mktemp('copyset'), photos)
    model = ['--checkpoint', small_ckpt, '--device', 'cpu']
    towhee_isc('embed', root / 'references', '-o', root / 'references.h5', '--quiet', *model)
    towhee_isc('embed', root / 'queries', '-o', root / 'queries.h5', '--quiet', *model)
    towhee_isc('search', root / 'queries.h5', '--references', root / 'references.h5', '-k', 3, '-o', root / 'exact.csv')
    return root


@pytest.fixture(scope='module')
def planted(tmp_path_factory) -> Path:
    """Descriptor files written directly (images are not the point): 300 random unit vectors in which 12
    were copied with small noise (12 pairs; 4 of them copied twice more: groups of 3), and 20 queries
    that are noisy copies of references."""
    root = tmp_path_factory.mktemp('planted')
    rng = np.random.default_rng(7)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    base = unit(rng.standard_normal((300, 256)))
    copies = unit(base[:12] + 0.02 * rng.standard_normal((12, 256)))
    triples = unit(base[:4] + 0.02 * rng.standard_normal((4, 256)))
    everything = np.concatenate([base, copies, triples])
    ids = [f'I{i:04d}' for i in range(len(everything))]
    write_descriptors(root / 'all.h5', ids, everything)
    write_descriptors(root / 'refs.h5', ids[:300], base)
    write_descriptors(root / 'queries.h5', [f'Q{i:03d}' for i in range(20)],
                      unit(base[::15] + 0.05 * rng.standard_normal((20, 256))))
    # The exact mode's answers, once for every route.
    towhee_isc('dedup', root / 'all.h5', '--threshold', 0.9, '-o', root / 'exact.json')
    towhee_isc('search', root / 'queries.h5', '--references', root / 'refs.h5', '-k', 80, '-o', root / 'exact.csv')
    return root


@pytest.fixture(params=['lite', 'server'])
def milvus(request, tmp_path) -> list[str]:
    """The --milvus-uri (and --token) options of each route, and a collection name of this test's own."""
    name = request.node.name.split('[')[0].removeprefix('test_')[:40] + '_' + request.param
    if request.param == 'lite':
        return ['--milvus-uri', tmp_path / 'isc.db', '--collection', name]
    server = request.getfixturevalue('milvus_server')
    return ['--milvus-uri', server.uri, '--token', server.token, '--collection', name]


def test_readme_flow_each_command_in_its_own_process_equals_exact(milvus, embedded, tmp_path):
    refs, queries = embedded / 'references.h5', embedded / 'queries.h5'
    done = towhee_isc('index', refs, *milvus)
    assert 'indexed 6 descriptors' in done.stdout and '(FLAT index)' in done.stdout and '(6 in all)' in done.stdout
    assert towhee_isc('index', refs, *milvus).stdout.endswith('(6 in all)\n')  # again: updated, not doubled
    towhee_isc('search', queries, *milvus, '-k', 3, '-o', tmp_path / 'milvus.csv', '--report', tmp_path / 'report.html',
               '--report-images', embedded, '--ground-truth', embedded / 'ground_truth.csv')
    want = read_csv(embedded / 'exact.csv')
    assert len(want) == 8 * 3
    assert_same_matches(read_csv(tmp_path / 'milvus.csv'), want)
    # The collection keeps each image's path: every query, match and missed reference is a thumbnail.
    headers, table = html_pages.table(html_pages.parse((tmp_path / 'report.html').read_text()))
    assert headers == ['query', 'match 1', 'match 2', 'match 3', 'missed (ground truth)'] and len(table) == 8
    assert all(len(cell.thumbnails) == 1 for cells in table for cell in cells[:4])
    found = {(r['query_id'], r['reference_id']) for r in want}
    missed = [f'Q{i:05d}' for i in range(6) if (f'Q{i:05d}', f'R{i:06d}') not in found]
    assert [len(cells[4].thumbnails) for cells in table] == [int(f'Q{i:05d}' in missed) for i in range(8)]


def test_dedup_run_twice_equals_exact(milvus, planted, tmp_path):
    exact = json.loads((planted / 'exact.json').read_text())
    assert len(exact) == 12 and sorted(len(g['members']) for g in exact) == [2] * 8 + [3] * 4
    for run in ('first', 'second'):  # the second finds the collection filled and released by the first
        towhee_isc('dedup', planted / 'all.h5', '--threshold', 0.9, *milvus, '-o', tmp_path / f'{run}.json')
        assert json.loads((tmp_path / f'{run}.json').read_text()) == exact, run


def test_approximate_index_types(milvus, planted, tmp_path):
    refs, queries = planted / 'refs.h5', planted / 'queries.h5'
    want = read_csv(planted / 'exact.csv')
    for index_type in ('IVF_FLAT', 'HNSW'):
        collection = [*milvus[:-1], milvus[-1] + '_' + index_type]
        done = towhee_isc('index', refs, *collection, '--index-type', index_type.lower())
        assert f'({index_type} index)' in done.stdout
        # More neighbours than --ef: the search must raise ef to k or Milvus refuses it.
        towhee_isc('search', queries, *collection, '-k', 80, '--ef', 16, '--nprobe', 7, '-o', tmp_path / 'milvus.csv')
        got = read_csv(tmp_path / 'milvus.csv')
        assert len(got) == len(want) == 20 * 80
        assert best(got) == best(want)
        found = {(r['query_id'], r['reference_id']) for r in got} & {(r['query_id'], r['reference_id']) for r in want}
        assert len(found) / len(want) > 0.9, index_type  # 300 vectors: these settings are close to exact
    # A collection keeps its index: asking for another one is refused, saying which it has.
    one_line_error(towhee_isc('index', refs, *collection, '--index-type', 'ivf_flat', check=False),
                   'already has a HNSW index, not IVF_FLAT')


@pytest.mark.parametrize('route', ['lite', 'server'])
def test_image_paths_are_stored_and_read_back_whatever_the_ids(route, tmp_path, request):
    from towhee_isc.workflow.milvus import MilvusIndex
    if route == 'lite':
        uri, token = str(tmp_path / 'isc.db'), None
    else:
        server = request.getfixturevalue('milvus_server')
        uri, token = server.uri, server.token
    ids = ["it's", 'say "hi"', 'back\\slash', 'été', 'no path']  # ids are user data: quotes must not break a query
    paths = {i: f'/photos/{i}.jpg' for i in ids[:-1]}
    index = MilvusIndex(uri, f'paths_{route}', token)
    index.add(ids, np.eye(len(ids), 8, dtype=np.float32), paths=paths)
    assert index.stores_paths() and index.paths(ids + ['unknown']) == paths


def test_a_collection_made_before_paths_were_kept_still_takes_descriptors(tmp_path):
    from pymilvus import DataType, MilvusClient
    from towhee_isc.workflow.milvus import MilvusIndex
    old = MilvusIndex(tmp_path / 'old.db', 'old')
    client = old.client  # the collection made as an older towhee-isc made it: no dynamic field
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field('id', DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field('vector', DataType.FLOAT_VECTOR, dim=8)
    index = client.prepare_index_params()
    index.add_index('vector', index_type='FLAT', metric_type='IP')
    client.create_collection('old', schema=schema, index_params=index)
    old.add(['a', 'b'], np.eye(2, 8, dtype=np.float32), paths={'a': '/photos/a.jpg'})
    assert old.count() == 2 and not old.stores_paths() and old.paths(['a', 'b']) == {}


def test_search_parameters_follow_the_index():
    assert search_params('FLAT', 10, 1) == {'metric_type': 'IP', 'params': {}}
    assert search_params('HNSW', 10, 1)['params'] == {'ef': 256}
    assert search_params('HNSW', 301, 1)['params'] == {'ef': 301}  # Milvus requires ef >= k
    assert search_params('HNSW', 10, 1, ef=32)['params'] == {'ef': 32}
    assert search_params('HNSW', 100, 1, ef=32)['params'] == {'ef': 100}
    assert search_params('IVF_FLAT', 10, 1265)['params'] == {'nprobe': 158}
    assert search_params('IVF_FLAT', 10, 7)['params'] == {'nprobe': 7}  # never more cells than there are
    assert search_params('IVF_FLAT', 10, 1265, nprobe=32)['params'] == {'nprobe': 32}
    assert ivf_nlist(100_000) == 1265 and ivf_nlist(300) == 7 and ivf_nlist(5) == 1


def test_a_server_with_authentication_needs_the_token(milvus_server, planted):
    done = towhee_isc('index', planted / 'refs.h5', '--milvus-uri', milvus_server.uri, check=False)
    one_line_error(done, f'Milvus at {milvus_server.uri!r} refused the connection: authentication failed',
                   'requires --token')
    done = towhee_isc('index', planted / 'refs.h5', '--milvus-uri', milvus_server.uri, '--token', 'root:wrong',
                      check=False)
    one_line_error(done, f'Milvus at {milvus_server.uri!r} refused the connection: authentication failed',
                   'check --token')
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no pymilvus traceback before it


def test_broken_milvus_lite_databases_are_one_line_errors(planted, tmp_path):
    refs, queries = planted / 'refs.h5', planted / 'queries.h5'
    garbage = tmp_path / 'garbage.db'
    garbage.write_bytes(b'not a database\n' * 100)
    photos = tmp_path / 'photos.db'  # a folder of someone's files: Milvus Lite would write its own into it
    photos.mkdir()
    (photos / 'holiday.jpg').write_bytes(b'jpeg')
    # Real databases whose collection's files were damaged afterwards.
    schema, data = tmp_path / 'damaged_schema.db', tmp_path / 'damaged_data.db'
    towhee_isc('index', refs, '--milvus-uri', schema, '--collection', 'refs')
    shutil.copytree(schema, data)
    next(schema.rglob('schema.json')).write_text('{not json')
    for part in data.rglob('*.parquet'):
        part.write_bytes(b'junk')
    out = tmp_path / 'm.csv'
    cases = {  # each its own process; run side by side, since each spends seconds importing
        ('index', refs, '--milvus-uri', garbage): ['is not a Milvus Lite database'],
        ('index', refs, '--milvus-uri', photos): ['is a folder but not a Milvus Lite database'],
        ('search', queries, '--milvus-uri', schema, '--collection', 'refs', '-o', out): [f"Milvus at '{schema}'", 'schema'],
        ('search', queries, '--milvus-uri', data, '--collection', 'refs', '-o', out): [f"Milvus at '{data}'", 'Parquet'],
        ('search', queries, '--milvus-uri', tmp_path / 'none.db', '-o', out): ['no Milvus Lite database'],
        ('index', refs, '--milvus-uri', tmp_path / 'no' / 'such' / 'x.db'): ['does not exist'],
    }
    for done, words in zip(towhee_isc_together(*cases), cases.values()):
        one_line_error(done, *words)
    assert garbage.read_bytes() == b'not a database\n' * 100
    assert [p.name for p in photos.iterdir()] == ['holiday.jpg']
    assert not out.exists() and not (tmp_path / 'none.db').exists()  # a search leaves no empty database behind
    assert not (tmp_path / 'no').exists()  # nor an index missing folders


def test_a_database_in_use_by_another_process_is_a_one_line_error(planted, tmp_path):
    db = tmp_path / 'busy.db'
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, pymilvus; c = pymilvus.MilvusClient(sys.argv[1]); '
                               'print("open", flush=True); sys.stdin.read()', str(db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'open\n'
        one_line_error(towhee_isc('index', planted / 'refs.h5', '--milvus-uri', db, check=False),
                       'another process holds the lock')
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_k_below_one_is_refused_before_milvus_is_asked(planted, tmp_path):
    db, out = tmp_path / 'isc.db', tmp_path / 'm.csv'
    commands = [('search', planted / 'queries.h5', '--milvus-uri', db, '-k', '0', '-o', out),
                ('search', planted / 'queries.h5', '--milvus-uri', db, '-k', '-1', '-o', out),
                ('dedup', planted / 'all.h5', '--milvus-uri', db, '-k', '0', '-o', out)]
    for done in towhee_isc_together(*commands):
        one_line_error(done, 'argument -k: must be at least 1')
    assert not db.exists() and not out.exists()
