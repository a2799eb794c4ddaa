"""The second hostile round on files and the workflow (issue 14, items 10-19), each attack run as a user
runs it: every command in its own process. Folders with odd entries (a symlink loop, two links to one
photo, a file name that is not UTF-8, a folder that cannot be read), byte-identical copies at threshold
1.0, ids a spreadsheet would run, outputs that are inputs, negatives of another model, two embeds into
one output, and an index that fails half-way."""
from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from commands import assert_one_line_error, towhee_isc
from towhee_isc.workflow.descriptors import read_descriptors, write_descriptors


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def as_unprivileged(command: list[str]) -> list[str]:
    """``command`` run so that file permissions bind: as root (CI containers, this machine) it keeps uid 0 but
    drops every capability, so a folder of mode 000 really cannot be read (root would read it anyway)."""
    if os.geteuid() != 0:
        return command
    return ['setpriv', '--bounding-set=-all', '--inh-caps=-all', *command]


@pytest.fixture(scope='module')
def odd_folder(tmp_path_factory, photos) -> Path:
    """Two photos, two links to the first, a link to itself, a photo with a Latin-1 name, one named like a
    spreadsheet formula, a sub-folder nobody may read holding a third photo, and a fourth photo 1,100
    folders deep (Python 3.11's os.walk and shutil.rmtree recurse: both fail there)."""
    root = tmp_path_factory.mktemp('odd') / 'photos'
    root.mkdir()
    photos[0].save(root / 'P0.jpg', quality=90)
    photos[1].save(root / 'P1.jpg', quality=90)
    photos[1].save(root / '=HYPERLINK(1).jpg', quality=90)
    os.symlink('P0.jpg', root / 'link_a.jpg')
    os.symlink(root / 'P0.jpg', root / 'link_b.jpg')
    os.symlink('loop.jpg', root / 'loop.jpg')
    (root / os.fsdecode(b'caf\xe9.jpg')).write_bytes((root / 'P1.jpg').read_bytes())
    (root / 'locked').mkdir()
    photos[2].save(root / 'locked' / 'P2.jpg')
    os.chmod(root / 'locked', 0)
    deep = [root / 'deep']
    for _ in range(1100):
        deep.append(deep[-1] / 'd')
    for folder in deep:  # one by one: os.makedirs recurses too
        folder.mkdir()
    photos[3].save(deep[-1] / 'P3.jpg')
    yield root
    os.chmod(root / 'locked', 0o755)
    (deep[-1] / 'P3.jpg').unlink()
    for folder in reversed(deep):  # pytest's clean-up (shutil.rmtree) would recurse
        folder.rmdir()


def test_odd_folders_skip_and_name_what_they_cannot_use_and_two_embeds_do_not_mix(odd_folder, small_ckpt,
                                                                                   tmp_path):
    out = tmp_path / 'out.h5'
    model = ['--checkpoint', str(small_ckpt), '--device', 'cpu']
    first = subprocess.Popen(as_unprivileged([sys.executable, '-m', 'towhee_isc', 'embed', str(odd_folder), '-o',
                                              str(out), '--quiet', '--chunk-size', '1', *model]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob('out.h5.parts/*.npz')) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # frozen half-way, its lock held: a second embed must not join in
    try:
        second = towhee_isc('embed', odd_folder, '-o', out, '--quiet', *model)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(second, 'another towhee-isc embed is writing')
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert 'wrote 6 descriptors' in stdout
    lines = stderr.splitlines()
    # The loop is listed under its own name, like a broken link; the folder and the name are named, not hidden.
    assert any(f"{odd_folder / 'loop.jpg'}: " in line and 'symbolic links' in line for line in lines), stderr
    assert any("skipped folder" in line and 'locked' in line and 'Permission denied' in line for line in lines), stderr
    assert any("caf\\xe9.jpg" in line and 'not valid UTF-8' in line for line in lines), stderr
    ids, vectors = read_descriptors(out)
    assert ids == ['=HYPERLINK(1)', 'P0', 'P1', 'P3', 'link_a', 'link_b']  # each link its own image, by its own name
    v = dict(zip(ids, vectors))
    assert float(v['link_a'] @ v['P0']) > 0.9999 and float(v['link_b'] @ v['P0']) > 0.9999
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.h5']  # no lock, no parts left

    # dedup of the same folder: the same skips; links are byte-identical copies, found at threshold 1.0;
    # an id that is a formula is escaped in the CSV.
    result = subprocess.run(as_unprivileged([sys.executable, '-m', 'towhee_isc', 'dedup', str(odd_folder),
                                             '--threshold', '1.0', '-o', str(tmp_path / 'groups.csv'), *model]),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'loop.jpg' in result.stderr and 'skipped folder' in result.stderr and 'caf\\xe9' in result.stderr
    rows = list(csv.DictReader(open(tmp_path / 'groups.csv', encoding='utf-8')))
    groups: dict[str, set] = {}
    for row in rows:
        groups.setdefault(row['group'], set()).add(row['image_id'])
    assert sorted(map(sorted, groups.values())) == [["'=HYPERLINK(1)", 'P1'], ['P0', 'link_a', 'link_b']]
    assert all(not row['path'].startswith(('=', '+', '-', '@')) for row in rows)


def test_negatives_of_another_model_are_refused(small_ckpt, photos, tmp_path):
    """Descriptor files record their model: negatives of another one are refused by nes, embed and search."""
    rng = np.random.default_rng(0)
    other = {'weights': 'another-model', 'img_size': 96}
    write_descriptors(tmp_path / 'negatives.h5', [f'N{i}' for i in range(20)], unit(rng.standard_normal((20, 256))),
                      model=other)
    write_descriptors(tmp_path / 'mine.h5', ['a', 'b'], unit(rng.standard_normal((2, 256))),
                      model={'weights': 'mine', 'img_size': 96})
    result = towhee_isc('nes', tmp_path / 'mine.h5', '--negatives', tmp_path / 'negatives.h5', '-o', tmp_path / 'x.h5')
    assert_one_line_error(result, 'were made by different models')
    photos[0].save(tmp_path / 'q.jpg')
    result = towhee_isc('search', tmp_path / 'q.jpg', '--references', tmp_path / 'q.jpg', '-o', tmp_path / 'm.csv',
                        '--negatives', tmp_path / 'negatives.h5', '--nes-k', 2, '--checkpoint', small_ckpt,
                        '--device', 'cpu')
    assert_one_line_error(result, 'the negatives were made by another model (weights another-model')
    assert not (tmp_path / 'x.h5').exists() and not (tmp_path / 'm.csv').exists()
    from towhee_isc.postprocess import NegativeEmbeddings, PostprocessError
    negatives = NegativeEmbeddings(tmp_path / 'negatives.h5', cache=False)
    with pytest.raises(PostprocessError, match='iterations must be at most 20, got 1000'):
        negatives.subtract(read_descriptors(tmp_path / 'mine.h5')[1], k=2, iterations=1000)


def test_identical_copies_meet_threshold_one_and_outputs_never_replace_inputs(tmp_path):
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((400, 256)))
    ids = [f'+{i}' if i % 2 else f'-{i}' for i in range(800)]  # formulas, to a spreadsheet
    write_descriptors(tmp_path / 'twice.h5', ids, np.concatenate([x, x]))
    result = towhee_isc('dedup', tmp_path / 'twice.h5', '--threshold', '1.0', '-o', tmp_path / 'groups.json')
    assert result.returncode == 0, result.stderr
    groups = json.loads((tmp_path / 'groups.json').read_text())
    assert len(groups) == 400 and all(len(g['members']) == 2 for g in groups)  # every byte-identical pair

    before = (tmp_path / 'twice.h5').read_bytes()
    result = towhee_isc('search', tmp_path / 'twice.h5', '--references', tmp_path / 'twice.h5', '-k', 2,
                        '--threshold', '1.0', '-o', tmp_path / 'twice.h5')
    assert_one_line_error(result, f"output '{tmp_path / 'twice.h5'}' is also an input")
    assert (tmp_path / 'twice.h5').read_bytes() == before
    # Nor a photo: `embed -o photos/*.jpg`, which the shell expands to `-o photos/a.jpg photos/b.jpg`.
    (tmp_path / 'photos').mkdir()
    for name in ('a.jpg', 'b.jpg'):
        (tmp_path / 'photos' / name).write_bytes(b'\xff\xd8\xff\xe0 a photo ' + name.encode())
    result = towhee_isc('embed', '-o', tmp_path / 'photos' / 'a.jpg', tmp_path / 'photos' / 'b.jpg')
    assert_one_line_error(result, f"output '{tmp_path / 'photos' / 'a.jpg'}' is an existing image or video: writing "
                                  'it would destroy it')
    assert (tmp_path / 'photos' / 'a.jpg').read_bytes() == b'\xff\xd8\xff\xe0 a photo a.jpg'
    # Nor a FIFO or a device (`-o /dev/null`, as root, would replace the machine's /dev/null with a file).
    os.mkfifo(tmp_path / 'fifo')
    result = towhee_isc('search', tmp_path / 'twice.h5', '--references', tmp_path / 'twice.h5', '-k', 2,
                        '-o', tmp_path / 'fifo')
    assert_one_line_error(result, f"output '{tmp_path / 'fifo'}' is a device, FIFO or socket, not a file")
    assert stat.S_ISFIFO(os.lstat(tmp_path / 'fifo').st_mode)
    # The CSV of matches: escaped for spreadsheets, read back exactly by evaluate.
    result = towhee_isc('search', tmp_path / 'twice.h5', '--references', tmp_path / 'twice.h5', '-k', 2,
                        '--threshold', '1.0', '-o', tmp_path / 'm.csv')
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(open(tmp_path / 'm.csv')))[1:]
    assert len(rows) == 1600 and all(r[0][0] == "'" and r[1][0] == "'" for r in rows)
    from towhee_isc.workflow.metrics import read_matches
    assert {m.query_id for m in read_matches(tmp_path / 'm.csv')} == set(ids)


def test_outputs_never_replace_what_the_run_reads_nor_a_lock_of_the_users(photos, tmp_path, capsys, monkeypatch):
    """Round 6, in-process (``cli.main``, the command's entry point; these checks run before any work, and the
    test above shows them from a separate process): an input reached through a ``.txt`` list or a glob, a
    JPEG named ``.jfif``, a camcorder video given as ``-o`` of its own ``video embed`` (``.mts``, or any name),
    a video or HEIC photo of a name no suffix list knows (``.MOD``, ``.HEIC``),
    and a ``--score-norm`` background of another model; ``embed`` leaves a ``<output>.lock`` of the user's."""
    from towhee_isc.atomic import sole_writer
    from towhee_isc.workflow.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'lst').mkdir()
    photos[0].save(tmp_path / 'lst' / 'scan.jfif', 'JPEG')
    (tmp_path / 'lst' / 'scan.raw').write_bytes(b'a camera raw file Pillow cannot read')
    (tmp_path / 'lst' / 'list.txt').write_text('scan.raw\nscan.jfif\n')
    (tmp_path / 'holiday.mts').write_bytes(b'\x47' + bytes(187))  # an MPEG transport stream packet
    (tmp_path / 'clip').write_bytes(b'\x47' + bytes(187))
    # Round 7: names no suffix list knows, told by content: a camcorder's MPEG program stream, an iPhone photo.
    (tmp_path / 'MOV001.MOD').write_bytes(b'\x00\x00\x01\xba' + bytes(2044))
    (tmp_path / 'IMG_0001.HEIC').write_bytes(b'\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic' + bytes(100))
    # Round 8: kinds no signature list names (a Fujifilm RAW, a Photoshop file): refused as no kind written.
    (tmp_path / 'DSCF0001.RAF').write_bytes(b'FUJIFILMCCD-RAW 0201FF383501' + bytes(range(256)) * 4)
    (tmp_path / 'design.psd').write_bytes(b'8BPS\x00\x01' + bytes(range(256)) * 4)
    import zipfile  # round 9: any zip passed as an npz (an .xlsx is a zip)
    with zipfile.ZipFile(tmp_path / 'budget.xlsx', 'w') as sheet:
        sheet.writestr('[Content_Types].xml', '<Types/>')
    with zipfile.ZipFile(tmp_path / 'arch.zip', 'w') as bundle:  # round 10: a zip whose first member is an array
        bundle.writestr('frames.npy', b'')
        bundle.writestr('notes.txt', 'my notes')
    (tmp_path / 'notes.csv').write_text('query_id,reference_id,score\n')
    (tmp_path / 'gt.csv').write_text('query_id,reference_id\n')
    rng = np.random.default_rng(0)
    for name, weights in (('q.h5', 'A'), ('r.h5', 'A'), ('bgB.h5', 'B')):
        write_descriptors(tmp_path / name, [f'{name}{i}' for i in range(4)], unit(rng.standard_normal((4, 256))),
                          model={'weights': weights, 'img_size': 64})
    refs = ['--references', 'r.h5']
    cases = [
        (['search', 'lst/list.txt', *refs, '-o', 'lst/scan.raw'],
         "output 'lst/scan.raw' is also an input (lst/scan.raw, listed in lst/list.txt)"),
        (['dedup', 'lst/*.raw', '-o', 'lst/scan.raw'], "output 'lst/scan.raw' is also an input (lst/scan.raw, "
                                                       "matched by 'lst/*.raw')"),
        (['search', 'lst/list.txt', *refs, '-o', 'lst/scan.jfif'], "output 'lst/scan.jfif' is an existing image"),
        (['video', 'embed', 'holiday.mts', '-o', 'holiday.mts'], "output 'holiday.mts' is an existing image or video"),
        (['video', 'embed', 'clip', '-o', './clip'], "output './clip' is also an input (clip)"),
        (['dedup', 'r.h5', '-o', 'IMG_0001.HEIC'], "output 'IMG_0001.HEIC' is an existing image or video"),
        (['search', 'q.h5', *refs, '-o', 'MOV001.MOD'], "output 'MOV001.MOD' is an existing image or video"),
        (['dedup', 'r.h5', '-o', 'DSCF0001.RAF'], "output 'DSCF0001.RAF' is an existing file that is not text, the "
                                                  'kind this command writes there'),
        (['dedup', 'r.h5', '--report', 'design.psd'], "--report 'design.psd' is an existing file that is not text"),
        (['dedup', 'r.h5', '-o', 'budget.xlsx'], "output 'budget.xlsx' is an existing file that is not text"),
        # Round 10: only the kind *this* command writes there: descriptors of another run, or a zip holding
        # arrays and notes, given as a CSV; a CSV given as descriptors; a CSV as a plot.
        (['dedup', 'r.h5', '-o', 'q.h5'], "output 'q.h5' is an existing file that is not text"),
        (['search', 'q.h5', *refs, '-o', 'arch.zip'], "output 'arch.zip' is an existing file that is not text"),
        (['video', 'embed', 'holiday.mts', '-o', 'arch.zip'], "output 'arch.zip' is an existing file that is not npz"),
        (['embed', 'lst', '-o', 'notes.csv'], "output 'notes.csv' is an existing file that is not HDF5"),
        (['nes', 'q.h5', '--negatives', 'r.h5', '-o', 'notes.csv'], "output 'notes.csv' is an existing file that is "
                                                                     'not HDF5'),
        (['evaluate', 'notes.csv', 'notes.csv', '--plot', 'gt.csv'], "--plot 'gt.csv' is an existing file that is "
                                                                      'not PNG'),
        (['search', 'q.h5', *refs, '--score-norm', 'bgB.h5', '-o', 'sn.csv'],
         'the --score-norm background bgB.h5 and q.h5 were made by different models (weights B at 64 px vs A'),
    ]
    before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('error: ') and message in err, (args, err)
    assert {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()} == before
    from towhee_isc.workflow.cli import is_of_kind  # what each command writes passes as its own kind
    np.savez(tmp_path / 'frames.npz', features=np.zeros((2, 4), np.float32), ids=np.array(['a', 'b']))
    assert is_of_kind(tmp_path / 'frames.npz', 'npz') and is_of_kind(tmp_path / 'r.h5', 'HDF5')
    assert is_of_kind(tmp_path / 'notes.csv', 'text') and not is_of_kind(tmp_path / 'frames.npz', 'HDF5')
    (tmp_path / 'out.h5.lock').write_text('my notes on out.h5')
    for output in ('out.h5', 'other.h5'):
        with sole_writer(tmp_path / output, 'towhee-isc embed'):
            assert (tmp_path / f'{output}.lock').exists()
    assert (tmp_path / 'out.h5.lock').read_text() == 'my notes on out.h5' and not (tmp_path / 'other.h5.lock').exists()


def test_a_failed_index_is_refused_by_search_until_index_runs_again(tmp_path):
    rng = np.random.default_rng(2)
    vectors = unit(rng.standard_normal((2000, 8)))
    ids = [f'R{i:04d}' for i in range(2000)]
    long = ids.copy()
    long[1499] = 'x' * 600
    write_descriptors(tmp_path / 'long.h5', long, vectors)
    write_descriptors(tmp_path / 'refs.h5', ids, vectors)
    milvus = ['--milvus-uri', tmp_path / 'isc.db', '--collection', 'refs']
    result = towhee_isc('index', tmp_path / 'long.h5', *milvus)
    assert_one_line_error(result, 'row 1500) is 600 bytes long, over the 512 bytes of a Milvus id: nothing was written')
    # The server fails the second batch of 1,000 rows (injected where Milvus raises it), as a full disk or a
    # frozen server would; the command still runs in its own process.
    failing = ('import sys; from pymilvus import MilvusClient; from pymilvus.exceptions import MilvusException\n'
               'upsert, calls = MilvusClient.upsert, []\n'
               'def fail_second(self, *a, **k):\n'
               '    calls.append(1)\n'
               '    if len(calls) == 2: raise MilvusException(message="disk quota exceeded")\n'
               '    return upsert(self, *a, **k)\n'
               'MilvusClient.upsert = fail_second\n'
               'from towhee_isc.workflow.cli import main; sys.exit(main(sys.argv[1:]))')
    result = subprocess.run([sys.executable, '-c', failing, 'index', tmp_path / 'refs.h5', *map(str, milvus)],
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "disk quota exceeded; 1000 of 2000 rows were written, and collection 'refs' is "
                                  'marked incomplete')
    write_descriptors(tmp_path / 'q.h5', ids[:3], vectors[:3])
    result = towhee_isc('search', tmp_path / 'q.h5', *milvus, '-k', 1, '-o', tmp_path / 'm.csv')
    assert_one_line_error(result, "collection 'refs'")
    assert 'is incomplete' in result.stderr and not (tmp_path / 'm.csv').exists()
    from towhee_isc.workflow.milvus import MilvusIndex  # index again (in this process: the same call as the command)
    index = MilvusIndex(str(tmp_path / 'isc.db'), 'refs', existing=True)
    index.add(ids, vectors)
    index.check_complete()  # the rerun completed it: search takes it again
    assert index.count() == 2000 and index.search(ids[:1], vectors[:1], 1)[0].reference_id == ids[0]


def test_a_crafted_descriptor_file_cannot_make_a_report_show_other_files(photos, tmp_path):
    """A descriptor file's ``image_paths`` are anyone's words: the report shows only images read now or under
    the folders given (here ``--report-images shared``), never a private photo it names, directly or by
    ``shared/../``."""
    private, shared = tmp_path / 'private', tmp_path / 'shared'
    private.mkdir()
    shared.mkdir()
    photos[0].save(private / 'secret.jpg')
    photos[1].save(shared / 'ok.jpg')
    x = unit(np.ones((1, 8)))
    paths = [str(private / 'secret.jpg'), str(shared / '..' / 'private' / 'secret.jpg'), str(shared / 'ok.jpg')]
    write_descriptors(tmp_path / 'crafted.h5', ['a', 'b', 'c'], np.repeat(x, 3, axis=0), paths)
    result = towhee_isc('dedup', tmp_path / 'crafted.h5', '--threshold', '0.9', '--report', tmp_path / 'groups.html',
                        '--report-images', shared)
    assert result.returncode == 0, result.stderr
    import html_pages
    members = {m.all(cls='id')[0].text: m for m in html_pages.parse((tmp_path / 'groups.html').read_text()).all(cls='member')}
    assert sorted(members) == ['a', 'b', 'c'] and len(members['c'].thumbnails) == 1
    for refused in ('a', 'b'):
        assert not members[refused].thumbnails and 'not shown: outside the folders given' in members[refused].text


def test_a_frozen_milvus_server_is_one_line_within_the_call_timeout(tmp_path):
    """A server that completes the connection, then never answers (``frozen_milvus.py``): every call is
    bounded by TOWHEE_ISC_MILVUS_TIMEOUT (here 2 s), so search ends with one line instead of hanging."""
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name('frozen_milvus.py'))],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        write_descriptors(tmp_path / 'q.h5', ['a'], unit(np.ones((1, 8))))
        started = time.monotonic()
        result = towhee_isc('search', tmp_path / 'q.h5', '--milvus-uri', f'http://127.0.0.1:{port}', '--collection', 'C',
                            '-o', tmp_path / 'm.csv', env={'TOWHEE_ISC_MILVUS_TIMEOUT': '2'}, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        server.kill()
        server.wait()
    assert_one_line_error(result, f"Milvus at 'http://127.0.0.1:{port}': describing collection 'C' failed: no answer "
                                  'within 2 s (the server is frozen or overloaded; TOWHEE_ISC_MILVUS_TIMEOUT')
    assert elapsed < 60 and not (tmp_path / 'm.csv').exists(), elapsed


def test_a_descriptor_file_declaring_more_data_than_memory_is_refused_from_its_header(tmp_path):
    """2 KB of HDF5 can declare a terabyte of compressed zeros: reading it would get the process killed."""
    import h5py
    with h5py.File(tmp_path / 'bomb.h5', 'w') as f:
        f.create_dataset('vectors', shape=(10**9, 256), dtype='float32', compression='gzip', chunks=(4096, 256))
        f.create_dataset('image_names', data=np.array([b'a']))
    assert (tmp_path / 'bomb.h5').stat().st_size < 10_000
    # A -k that Milvus Lite would try to allocate (k x queries results) is refused before anything is opened.
    result = towhee_isc('dedup', tmp_path / 'bomb.h5', '--milvus-uri', tmp_path / 'isc.db', '-k', 10**9, timeout=120)
    assert_one_line_error(result, f'-k {10**9} is more than the 16383 neighbours Milvus can return per image')
    assert not (tmp_path / 'isc.db').exists()
    result = towhee_isc('dedup', tmp_path / 'bomb.h5', timeout=120)
    assert_one_line_error(result, "declares 953.7 GiB of data (vectors (1000000000, 256), image_names (1,)) in a file of")
    # Good vectors, but the image paths (read for reports) declared as 64 TB: refused from the header too.
    from towhee_isc.workflow.descriptors import write_descriptors
    write_descriptors(tmp_path / 'q.h5', ['q'], np.eye(1, 8, dtype=np.float32))
    with h5py.File(tmp_path / 'paths_bomb.h5', 'w') as f:
        f.create_dataset('vectors', data=np.eye(1, 8, dtype=np.float32))
        f.create_dataset('image_names', data=np.array([b'r']))
        f.create_dataset('image_paths', shape=(10**12,), dtype='S64', compression='gzip', chunks=(2**16,))
    result = towhee_isc('search', tmp_path / 'q.h5', '--references', tmp_path / 'paths_bomb.h5', '-o',
                        tmp_path / 'm.csv', timeout=120)
    assert_one_line_error(result, 'declares 59604.6 GiB of data (image_paths (1000000000000,)) in a file of')
    # The same in a video descriptor npz: deflate packs the zeros, the .npy header declares the shape.
    import io
    import zipfile
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {'descr': '<f4', 'fortran_order': False, 'shape': (10**9, 256)})
    with zipfile.ZipFile(tmp_path / 'bomb.npz', 'w', zipfile.ZIP_DEFLATED) as archive:
        archive.writestr('features.npy', header.getvalue() + bytes(2**20))
        for name, array in {'video_ids': np.array(['V1']), 'timestamps': np.zeros((1, 2))}.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f'{name}.npy', buffer.getvalue())
    result = towhee_isc('video', 'dedup', tmp_path / 'bomb.npz', '-o', tmp_path / 'groups.json', timeout=120)
    assert_one_line_error(result, "declares 953.7 GiB of arrays, more than")


def test_a_descriptor_file_declaring_more_than_it_can_hold_is_refused_even_when_memory_would_do(tmp_path):
    """Free memory is no bound on a shared machine: a 12 KB file declaring 12 GiB (chunks never written read
    as zeros) made dedup allocate 12 GiB, and 3 MB of unwritten variable-length ids (each read as a 1 MB
    fill value) 1.88 GB. What a file declares is bounded by its size; honest files, compressed ones
    included, are read."""
    import h5py
    from towhee_isc.workflow import descriptors
    with h5py.File(tmp_path / 'zeros.h5', 'w') as f:
        vectors = f.create_dataset('vectors', shape=(2**18, 256), dtype='f4', chunks=(4096, 256), compression='gzip')
        vectors[:4096] = 0  # one chunk written; the rest read as the fill value, stored nowhere
        f.create_dataset('image_names', data=np.array(['a'], dtype=object), dtype=h5py.string_dtype())
    with pytest.raises(descriptors.DescriptorFileError, match=r"declares 0\.3 GiB of data \(vectors \(262144, 256\), "
                                                              r"image_names \(1,\)\) in a file of [\d,]+ bytes: more than 16 times"):
        descriptors.read_descriptors(tmp_path / 'zeros.h5')
    with h5py.File(tmp_path / 'fill.h5', 'w') as f:
        f.create_dataset('vectors', data=np.tile(np.eye(1, 8, dtype='f4'), (200, 1)))
        f.create_dataset('image_names', shape=(200,), dtype=h5py.string_dtype(), chunks=(64,), fillvalue='x' * 10**5)
    with pytest.raises(descriptors.DescriptorFileError, match=r'\(vectors \(200, 8\), image_names \(200,\)\) in a file'):
        descriptors.read_descriptors(tmp_path / 'fill.h5')
    rng = np.random.default_rng(0)
    honest = rng.standard_normal((2000, 256)).astype(np.float32)
    honest /= np.linalg.norm(honest, axis=1, keepdims=True)
    with h5py.File(tmp_path / 'gzip.h5', 'w') as f:
        f.create_dataset('vectors', data=honest, compression='gzip', compression_opts=9)
        f.create_dataset('image_names', data=np.array([f'img_{n:06d}' for n in range(2000)], dtype='S64'),
                         compression='gzip', compression_opts=9)  # zero-padded fixed-length ids: ~10x
    ids, vectors = descriptors.read_descriptors(tmp_path / 'gzip.h5')
    assert ids[-1] == 'img_001999' and np.array_equal(vectors, honest)


def test_a_descriptor_file_whose_data_lie_in_other_files_is_refused(tmp_path):
    """HDF5 lets a dataset keep its bytes in any other file: ids read from the user's secret would go into
    the CSV (and a report or the service's answers). Such a file is refused, naming the dataset."""
    import h5py
    secret = tmp_path / 'secret.txt'
    secret.write_text('API_KEY=hunter2 and more of this private file\n')
    with h5py.File(tmp_path / 'crafted.h5', 'w') as f:
        f.create_dataset('vectors', data=unit(np.ones((2, 8))))
        f.create_dataset('image_names', shape=(2,), dtype='S16', external=[(str(secret), 0, 32)])
    with h5py.File(tmp_path / 'crafted.h5') as f:
        assert list(f['image_names'][()]) == [b'API_KEY=hunter2 ', b'and more of this']  # what h5py reads
    result = towhee_isc('dedup', tmp_path / 'crafted.h5', '--threshold', '0.5', '-o', tmp_path / 'groups.csv')
    assert_one_line_error(result, "'image_names' is stored outside the file (an HDF5 link, external or virtual "
                                  'dataset): descriptor files must hold their own data')
    assert not (tmp_path / 'groups.csv').exists()


def test_variable_length_strings_pointing_at_one_long_string_are_counted_as_read(tmp_path, monkeypatch):
    """HDF5 stores each variable-length string as a pointer into a heap: a crafted file can point all of
    them at one long string, so reading 1 MB of file takes 64 MB (or, with more pointers, all memory)."""
    import h5py
    from towhee_isc.workflow import descriptors
    path = tmp_path / 'heap_bomb.h5'
    count = 64
    write_descriptors(path, [f'i{n}' for n in range(count)], np.eye(count, 8, dtype=np.float32),
                      paths=['x' * 2**20] + [f'p{n}' for n in range(1, count)])
    monkeypatch.setattr(descriptors, 'available_memory', lambda: 32 * 2**20)
    assert len(descriptors.read_image_paths(path)[0]) == 2**20  # honest: 1 MB of strings, read
    monkeypatch.setattr(descriptors, 'available_memory', lambda: 2**19)  # but not in half a MB of memory
    with pytest.raises(descriptors.DescriptorFileError, match='more than the 0.0 GiB of memory available'):
        descriptors.read_image_paths(path)
    monkeypatch.setattr(descriptors, 'available_memory', lambda: 32 * 2**20)
    with h5py.File(path, 'r') as f:
        offset = f['image_paths'].id.get_offset()
    data = bytearray(path.read_bytes())
    first = data[offset:offset + 16]  # (length, heap address, index) of the long string
    data[offset:offset + 16 * count] = first * count
    path.write_bytes(bytes(data))
    assert path.stat().st_size < 2 * 2**20
    with pytest.raises(descriptors.DescriptorFileError, match=r'declares 0\.1 GiB of data \(image_paths \(64,\)\)'):
        descriptors.read_image_paths(path)
    # The model attribute is one string: an array of strings (which could all point at one) is refused unread.
    with h5py.File(path, 'a') as f:
        f.attrs['model'] = np.array(['{}'] * 1000, dtype=h5py.string_dtype())
    with pytest.raises(descriptors.DescriptorFileError, match=r"malformed 'model' attribute: object of shape \(1000,\)"):
        descriptors.read_model(path)


def test_strings_hidden_in_a_compound_and_chunks_larger_than_their_data_are_refused_unread(tmp_path, capsys):
    """Round 7, in-process (``cli.main``, what the commands run; the checks come before any work): image names
    as a compound of one variable-length string, every one pointing at one 1 MB string (60,000 of them: 56 GiB
    from 3.4 MB of file; the size check counted the compound's 16 bytes), and 2 x 8 vectors in one 16 MiB chunk
    (inflated whole to read a row: 1000:1 at 512 MiB). A string array as the type of the ``model`` attribute
    is one more route to the same strings. An honest file with h5py's own chunks is read."""
    import h5py
    from towhee_isc.workflow import descriptors
    from towhee_isc.workflow.cli import main
    count = 64
    names = np.empty(count, dtype=[('s', h5py.string_dtype())])
    names['s'] = ['x' * 2**20] + ['y'] * (count - 1)
    with h5py.File(tmp_path / 'compound.h5', 'w') as f:
        f.create_dataset('vectors', data=np.eye(count, 8, dtype=np.float32))
        f.create_dataset('image_names', data=names)
        offset = f['image_names'].id.get_offset()
    data = bytearray((tmp_path / 'compound.h5').read_bytes())
    data[offset:offset + 16 * count] = data[offset:offset + 16] * count  # every name: the 1 MB string
    (tmp_path / 'compound.h5').write_bytes(bytes(data))
    with h5py.File(tmp_path / 'chunk.h5', 'w') as f:
        f.create_dataset('vectors', shape=(2, 8), maxshape=(None, 8), dtype='f4', chunks=(2**19 + 2**10, 8),
                         compression='gzip', compression_opts=1)[:] = np.eye(2, 8, dtype=np.float32)
        f.create_dataset('image_names', data=np.array(['a', 'b'], dtype=object), dtype=h5py.string_dtype())
    cases = {'compound.h5': "'image_names' must be a list of strings, got [('s', 'O')] (64,)",
             'chunk.h5': "'vectors' (2, 8) is stored in chunks of (525312, 8): reading it would inflate 16,809,984 bytes"}
    for name, message in cases.items():
        assert main(['dedup', str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and message in err, err
    with h5py.File(tmp_path / 'chunk.h5', 'a') as f:
        f.create_dataset('sequences', shape=(2,), dtype=h5py.vlen_dtype('f4'))
        with pytest.raises(descriptors.DescriptorFileError, match="'sequences' holds variable-length data"):
            descriptors.check_fits_in_memory(str(tmp_path / 'chunk.h5'), f['sequences'])
        string_array = h5py.h5t.py_create(np.dtype((h5py.string_dtype(), (1000,))), logical=True)
        h5py.h5a.create(f.id, b'model', string_array, h5py.h5s.create(h5py.h5s.SCALAR))
    with pytest.raises(descriptors.DescriptorFileError, match=r"malformed 'model' attribute: \('O', \(1000,\)\) of "
                                                              r'shape \(\), not one JSON string'):
        descriptors.read_model(tmp_path / 'chunk.h5')
    honest = unit(np.random.default_rng(0).standard_normal((10, 8)))
    with h5py.File(tmp_path / 'honest.h5', 'w') as f:
        f.create_dataset('vectors', data=honest, maxshape=(None, 8), chunks=True, compression='gzip')
        f.create_dataset('image_names', data=np.array([f'i{n}' for n in range(10)], dtype=object),
                         dtype=h5py.string_dtype(), maxshape=(None,), chunks=True)
    assert descriptors.read_descriptors(tmp_path / 'honest.h5')[0][-1] == 'i9'


def test_chunks_of_a_float_each_or_never_written_are_refused_unread(tmp_path):
    """Round 11: HDF5 spends ~10 us on each chunk a read touches and keeps ~4 KB for each chunk never written:
    1,500 x 256 vectors in chunks of one float, never written (a 92 KB file), took 1.47 GB to read. Rows as
    chunks (a writer appending 1 KB rows), written, are read; 4,200 of them, more than the floor of chunks."""
    import h5py
    from towhee_isc.workflow import descriptors
    for name, rows, chunks, written in [('tiny.h5', 1500, (1, 1), 0), ('unwritten.h5', 4200, (1, 256), 100),
                                        ('rows.h5', 4200, (1, 256), 4200)]:
        with h5py.File(tmp_path / name, 'w') as f:
            vectors = f.create_dataset('vectors', (rows, 256), np.float32, chunks=chunks, fillvalue=1 / 16)
            vectors[:written] = unit(np.random.default_rng(0).standard_normal((written, 256)))
            f.create_dataset('image_names', data=np.array([f'i{n}' for n in range(rows)], dtype=object),
                             dtype=h5py.string_dtype(), maxshape=(None,), chunks=True)
            f['padding'] = np.random.default_rng(1).integers(0, 255, 2**18, dtype=np.uint8)  # passes the size check
    for name, message in [('tiny.h5', r"'vectors' \(1500, 256\) is stored in 384,000 chunks of \(1, 1\), over the "
                                      r'4,096 allowed for its 1,536,000 bytes'),
                          ('unwritten.h5', r"'vectors' \(4200, 256\) has 4,100 of its 4,200 chunks never written")]:
        with pytest.raises(descriptors.DescriptorFileError, match=message):
            descriptors.read_descriptors(tmp_path / name)
    ids, vectors = descriptors.read_descriptors(tmp_path / 'rows.h5')
    assert ids[-1] == 'i4199' and vectors.shape == (4200, 256)


def test_a_report_shows_only_images_under_its_folders_whatever_links_or_dots_say(tmp_path):
    """The test of what a report may show (``ImageFolders``), paths resolved one folder at a time: a link
    out of a folder, ``..`` out of it, and a folder named like the allowed one's prefix are refused."""
    from towhee_isc.workflow.reports import ImageFolders
    (tmp_path / 'photos' / 'sub').mkdir(parents=True)
    (tmp_path / 'secret').mkdir()
    (tmp_path / 'photos-private').mkdir()
    for path in ('photos/sub/a.jpg', 'secret/s.jpg', 'photos-private/p.jpg'):
        (tmp_path / path).write_bytes(b'x')
    (tmp_path / 'photos' / 'out').symlink_to(tmp_path / 'secret')
    (tmp_path / 'photos' / 'in.jpg').symlink_to(tmp_path / 'photos' / 'sub' / 'a.jpg')
    (tmp_path / 'elsewhere').symlink_to(tmp_path / 'photos' / 'sub')
    allowed = ImageFolders([tmp_path / 'photos'], read=[str(tmp_path / 'secret' / 'read.jpg')])
    for path, ok in (('photos/sub/a.jpg', True), ('photos/in.jpg', True), ('elsewhere/a.jpg', True),
                     ('photos/out/s.jpg', False), ('photos/sub/../../secret/s.jpg', False),
                     ('photos/../photos-private/p.jpg', False), ('photos-private/p.jpg', False),
                     ('photos/sub/..', True), ('photos/out/..', False), ('secret/read.jpg', True)):
        assert allowed(str(tmp_path / path)) is ok, path
