"""``towhee-isc serve``: the real command started as its own process on 127.0.0.1 (Ray on loopback),
real HTTP requests (single, concurrent, hostile); vectors compared with the operator's and matches
with ``towhee-isc search``. One service for the whole module; it is stopped by its PID."""
import concurrent.futures
import csv
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands import assert_one_line_error, towhee_isc
from towhee_isc.testing import make_copy_detection_set

MAX_BODY_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def copy_set(tmp_path_factory, photos) -> Path:
    return make_copy_detection_set(tmp_path_factory.mktemp('serve'), photos)


@pytest.fixture(scope='module')
def service(copy_set, small_ckpt):
    """``towhee-isc serve`` on a Milvus Lite collection indexed by ``towhee-isc index`` (README's order)."""
    root, model = copy_set, ['--checkpoint', small_ckpt]
    for args in (['embed', root / 'references', '-o', root / 'refs.h5', '--quiet'],
                 ['index', root / 'refs.h5', '--milvus-uri', root / 'isc.db', '--collection', 'refs']):
        done = towhee_isc(*args, *model)
        assert done.returncode == 0, done.stderr[-3000:]
    port = free_port()
    log = open(root / 'serve.log', 'w')
    process = subprocess.Popen(
        [sys.executable, '-m', 'towhee_isc', 'serve', '--collection', 'refs', '--milvus-uri', str(root / 'isc.db'),
         '--host', '127.0.0.1', '--port', str(port), '--max-batch-size', '8', '--max-body-mb', str(MAX_BODY_MB),
         *map(str, model)], stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 600  # Ray's start-up on a busy 2-core machine; a hang still ends
        while get(url + '/health')[0] != 200:
            assert process.poll() is None, (root / 'serve.log').read_text()[-3000:]
            assert time.monotonic() < deadline, 'the service never became ready'
            time.sleep(1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def get(url: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:  # before the app is deployed, Serve's proxy answers in plain text
        return e.code, None
    except OSError:  # not listening yet
        return 0, None


def post(url: str, body: bytes, content_type: str | None = 'image/jpeg', multipart: bool = False,
         headers: dict | None = None) -> tuple[int, dict]:
    """POST ``body`` as the request body, or as the one file of a multipart form; returns (status, JSON)."""
    headers = dict(headers or {})
    if multipart:
        boundary = 'isc-test-boundary'
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload"\r\n'
                f'Content-Type: {content_type}\r\n\r\n').encode() + body + f'\r\n--{boundary}--\r\n'.encode()
        content_type = f'multipart/form-data; boundary={boundary}'
    if content_type is not None:
        headers['Content-Type'] = content_type
    request = urllib.request.Request(url, data=body, headers=headers, method='POST')
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def encoded(image: Image.Image, fmt: str = 'JPEG') -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card)."""
    data = bytearray(encoded(Image.new('L', (8, 8)), 'PNG'))
    data[16:24] = struct.pack('>II', width, height)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_an_upload_gets_the_operators_vector_as_body_or_as_form(service, small_op, photos):
    image = encoded(photos[0])
    expected = small_op(image)
    for multipart in (False, True):
        status, answer = post(service + '/embed', image, multipart=multipart)
        assert status == 200, answer
        assert np.abs(np.asarray(answer['embedding'], np.float32) - expected).max() <= 1e-5


def test_concurrent_uploads_each_get_their_own_vector_and_a_bad_one_fails_alone(service, small_op, photos):
    uploads = [encoded(p.resize((200 + 10 * i, 150)), 'PNG') for i, p in enumerate(photos[:7])]
    uploads.insert(3, b'<html>not an image</html>')
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: post(service + '/embed', body, 'image/png'), uploads))
    for body, (status, answer) in zip(uploads, answers):
        if body.startswith(b'<html>'):
            assert status == 400 and 'is not an image' in answer['error'], answer
        else:
            assert status == 200, answer
            assert np.abs(np.asarray(answer['embedding'], np.float32) - small_op(body)).max() <= 1e-5
    status, health = get(service + '/health')
    assert status == 200 and sum(int(size) * n for size, n in health['batch_sizes'].items()) >= len(uploads)


def test_search_gives_what_the_search_command_gives(service, copy_set, small_ckpt, tmp_path):
    queries = sorted((copy_set / 'queries').rglob('Q*'))
    out = tmp_path / 'matches.csv'
    done = towhee_isc('search', *queries, '--references', copy_set / 'refs.h5', '-k', 3, '-o', out,
                      '--checkpoint', small_ckpt)
    assert done.returncode == 0, done.stderr[-3000:]
    expected: dict[str, list[tuple[str, float]]] = {}
    with open(out, newline='') as f:
        for row in csv.DictReader(f):
            expected.setdefault(row['query_id'], []).append((row['reference_id'], float(row['score'])))
    threshold = 0.5
    for query in queries:
        status, answer = post(f'{service}/search?k=3&threshold={threshold}', query.read_bytes(),
                              'image/png' if query.suffix == '.png' else 'image/jpeg', multipart=query.suffix == '.png')
        assert status == 200, answer
        want = sorted(expected[query.stem], key=lambda hit: -hit[1])
        got = answer['matches']
        assert [m['id'] for m in got] == [i for i, _ in want]
        assert np.allclose([m['score'] for m in got], [s for _, s in want], atol=1e-5)
        assert [m['match'] for m in got] == [s >= threshold for _, s in want]


@pytest.mark.parametrize('body, content_type, query, status, message', [
    (b'<html>not an image</html>', 'image/jpeg', '', 400, 'is not an image'),
    (b'', 'image/jpeg', '', 400, 'empty image bytes'),
    (png_claiming(30000, 30000), 'image/png', '', 400, 'pixel limit'),
    ('big', 'image/jpeg', '', 413, 'limited to'),
    (b'GIF89a', 'text/plain', '', 415, 'unsupported Content-Type'),
    (b'{"image": 1}', 'application/json', '', 415, 'unsupported Content-Type'),
    (b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n', 'multipart/form-data; boundary=x', '',
     400, 'one image file'),
    ('photo', 'image/jpeg', '?k=0', 422, 'k'),
    ('photo', 'image/jpeg', '?threshold=nan', 422, 'threshold'),
])
def test_a_bad_request_is_a_4xx_naming_the_problem_and_the_service_keeps_serving(
        service, photos, small_op, body, content_type, query, status, message):
    photo = encoded(photos[1])
    if isinstance(body, str):  # made here: too large for the parameter list, or needing the photos
        body = {'big': b'\xff' * (MAX_BODY_MB * 2**20 + 1), 'photo': photo}[body]
    got, answer = post(f'{service}/search{query}', body, content_type)
    assert got == status and message in answer['error'], (got, answer)
    got, answer = post(service + '/embed', photo)
    assert got == 200 and np.abs(np.asarray(answer['embedding'], np.float32) - small_op(photo)).max() <= 1e-5


def test_the_openapi_schema_documents_the_endpoints(service):
    status, schema = get(service + '/openapi.json')
    assert status == 200
    assert {'/embed', '/search', '/health'} <= set(schema['paths'])
    search = schema['paths']['/search']['post']
    assert {p['name'] for p in search['parameters']} == {'k', 'threshold'}
    assert {'image/*', 'application/octet-stream', 'multipart/form-data'} <= set(search['requestBody']['content'])
    assert {'400', '413', '415'} <= set(search['responses'])


def test_missing_references_are_a_start_up_error(copy_set, small_ckpt, tmp_path):
    model = ['--checkpoint', small_ckpt, '--port', free_port()]
    assert_one_line_error(towhee_isc('serve', '--collection', 'nope', '--milvus-uri', tmp_path / 'empty.db', *model),
                          "unknown collection 'nope'")
    assert_one_line_error(towhee_isc('serve', '--references', tmp_path / 'missing.h5', *model), 'missing.h5')
    assert_one_line_error(towhee_isc('serve', '--collection', 'refs', '--milvus-uri', f'http://127.0.0.1:{free_port()}',
                                     *model), 'cannot reach Milvus')
