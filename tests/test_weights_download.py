"""Published weights: downloaded once into torch hub's cache from a (local) server, atomically."""
import http.server
import threading

import numpy as np
import pytest
import torch

from towhee_isc import Isc, WEIGHTS, WeightsDownloadError
from towhee_isc.model import CheckpointError

RELEASE_PATH = '/lyakaap/ISC21-Descriptor-Track-1st/releases/download/v1.0.1'


class Server:
    """A small HTTP server on 127.0.0.1: ``files`` maps a path to (bytes, claimed Content-Length or False)."""

    def __init__(self):
        self.files, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                if self.path not in server.files:
                    self.send_error(404, 'Not Found')
                    return
                body, length = server.files[self.path]
                self.send_response(200)
                if length is not False:  # False: no Content-Length (the body runs until the connection closes)
                    self.send_header('Content-Length', str(length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_port}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, path, body, length=None):
        self.files[path] = (body, len(body) if length is None else length)


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv('TOWHEE_ISC_WEIGHTS_URL', s.url + RELEASE_PATH)
    yield s
    s.httpd.shutdown()


def test_default_url_is_the_winners_release(monkeypatch):
    monkeypatch.delenv('TOWHEE_ISC_WEIGHTS_URL', raising=False)
    assert WEIGHTS['isc_ft_v107'].url == ('https://github.com/lyakaap/ISC21-Descriptor-Track-1st/releases/'
                                          'download/v1.0.1/isc_ft_v107.pth.tar')
    assert WEIGHTS['isc_selfsup_v98'].url.endswith('/v1.0.1/isc_selfsup_v98.pth.tar')


def test_download_once_into_torch_hub_checkpoints(server, hub_dir, effnet_ckpt, photos):
    # A synthetic checkpoint of the published network stands for the published file.
    server.serve(RELEASE_PATH + '/isc_selfsup_v98.pth.tar', effnet_ckpt.read_bytes())
    op = Isc(model_name='isc_selfsup_v98', device='cpu', backend='torch')
    assert (hub_dir / 'isc_selfsup_v98.pth.tar').read_bytes() == effnet_ckpt.read_bytes()
    assert sorted(p.name for p in hub_dir.iterdir()) == ['isc_selfsup_v98.pth.tar']  # no temporary left
    assert (hub_dir / 'isc_selfsup_v98.pth.tar').stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    local = Isc(checkpoint_path=effnet_ckpt, device='cpu', backend='torch')
    assert np.abs(op(photos[0]) - local(photos[0])).max() < 1e-6
    Isc(model_name='isc_selfsup_v98', device='cpu', backend='torch')
    assert server.requests == [RELEASE_PATH + '/isc_selfsup_v98.pth.tar']  # the cache is reused


def test_a_download_of_another_network_is_refused_and_not_cached(server, hub_dir, small_ckpt):
    # A mirror serving some other ISC checkpoint under the published name: the operator was described
    # by the weights table (EfficientNetV2-M), so these weights must not be used, now or later.
    server.serve(RELEASE_PATH + '/isc_ft_v107.pth.tar', small_ckpt.read_bytes())
    with pytest.raises(CheckpointError, match=r'gave a checkpoint of resnet18 with 256-d vectors at 96 px, not the published '
                                              r'tf_efficientnetv2_m.in21k_ft_in1k.*nothing was cached'):
        Isc(device='cpu')
    assert not any(hub_dir.iterdir())


def test_a_file_already_in_the_cache_needs_no_network(hub_dir, effnet_ckpt, monkeypatch):
    monkeypatch.setenv('TOWHEE_ISC_WEIGHTS_URL', 'http://127.0.0.1:9/nothing-listens-here')
    hub_dir.mkdir(parents=True)
    (hub_dir / 'isc_ft_v107.pth.tar').write_bytes(effnet_ckpt.read_bytes())
    assert Isc(device='cpu', backend='torch').model_name == 'isc_ft_v107'


def test_a_cached_file_of_another_network_is_refused(hub_dir, small_ckpt, effnet_ckpt, tmp_path, monkeypatch):
    # The operator is described by the weights table, downloaded or not (a Triton server has no weights),
    # so a file put under the published name by hand must not change what model_name= computes.
    monkeypatch.setenv('TOWHEE_ISC_WEIGHTS_URL', 'http://127.0.0.1:9/nothing-listens-here')
    hub_dir.mkdir(parents=True)
    cached = hub_dir / 'isc_ft_v107.pth.tar'
    cached.write_bytes(small_ckpt.read_bytes())
    with pytest.raises(CheckpointError, match=r'holds a checkpoint of resnet18 with 256-d vectors at 96 px, not the '
                                              r'published tf_efficientnetv2_m.in21k_ft_in1k.*at 512 px: delete it'):
        Isc(device='cpu')
    raw = torch.load(effnet_ckpt, weights_only=False)
    raw['args'].input_size = 384  # the published network, trained at another size
    torch.save(raw, cached)
    with pytest.raises(CheckpointError, match='at 384 px, not the published'):
        Isc(device='cpu')
    torch.save(raw['state_dict'], cached)  # a plain state dict: no architecture
    with pytest.raises(CheckpointError, match='an unnamed architecture with 256-d vectors with no input size.*delete it'):
        Isc(device='cpu')
    cached.unlink()
    cached.mkdir()  # a folder where the file belongs: refused before any download
    with pytest.raises(CheckpointError, match='is not a regular file: remove it'):
        Isc(device='cpu')


def test_404_says_which_url_and_how_to_fix(server, hub_dir):
    with pytest.raises(WeightsDownloadError, match=r'isc_ft_v107\.pth\.tar failed: HTTP 404.*TOWHEE_ISC_WEIGHTS_URL'
                                                   r'.*checkpoint_path='):
        Isc(device='cpu')
    assert not hub_dir.exists() or not any(hub_dir.iterdir())


def test_truncated_download_leaves_nothing_in_the_cache(server, hub_dir, small_ckpt):
    body = small_ckpt.read_bytes()
    server.serve(RELEASE_PATH + '/isc_ft_v107.pth.tar', body[:len(body) // 2], length=len(body))
    with pytest.raises(WeightsDownloadError, match='isc_ft_v107'):
        Isc(device='cpu')
    assert not any(hub_dir.iterdir())


def test_a_mirror_sending_more_than_any_weights_need_is_stopped_and_nothing_cached(server, hub_dir, monkeypatch):
    """A broken or hostile mirror would otherwise fill the disk for the whole time limit (an hour)."""
    from towhee_isc import weights
    path = RELEASE_PATH + '/isc_ft_v107.pth.tar'
    server.serve(path, b'', length=10**12)  # declared: refused before a byte is written
    with pytest.raises(WeightsDownloadError, match=r'declares 1000000000000 bytes, more than the 2147483648'):
        Isc(device='cpu')
    monkeypatch.setattr(weights, 'MAX_DOWNLOAD_BYTES', 4096)  # undeclared: stopped once past the limit
    server.serve(path, bytes(3 * 2**20), length=False)
    with pytest.raises(WeightsDownloadError, match='sent over 4096 bytes, more than any published weights need'):
        Isc(device='cpu')
    assert not any(hub_dir.iterdir())


def test_corrupt_download_is_refused_and_not_cached(server, hub_dir):
    server.serve(RELEASE_PATH + '/isc_ft_v107.pth.tar', b'<html>rate limited</html>')
    with pytest.raises(CheckpointError, match=r'isc_ft_v107.pth.tar did not give a readable ISC checkpoint \(it sent 25 bytes starting b.<html>rate.*\), so nothing was cached'):
        Isc(device='cpu')
    assert not any(hub_dir.iterdir())


def test_corrupt_file_in_the_cache_says_delete_it(hub_dir):
    hub_dir.mkdir(parents=True)
    (hub_dir / 'isc_ft_v107.pth.tar').write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match=r"isc_ft_v107\.pth\.tar' is not a readable.*delete .*checkpoint_path"):
        Isc(device='cpu')


def test_mirror_override(server, hub_dir, effnet_ckpt, monkeypatch):
    monkeypatch.setenv('TOWHEE_ISC_WEIGHTS_URL', server.url + '/mirror/isc/')
    server.serve('/mirror/isc/isc_ft_v107.pth.tar', effnet_ckpt.read_bytes())
    Isc(device='cpu', backend='torch')
    assert server.requests == ['/mirror/isc/isc_ft_v107.pth.tar']
    assert (hub_dir / 'isc_ft_v107.pth.tar').is_file()


def test_unreachable_server(hub_dir, monkeypatch):
    monkeypatch.setenv('TOWHEE_ISC_WEIGHTS_URL', 'http://127.0.0.1:9/isc')
    with pytest.raises(WeightsDownloadError, match='127.0.0.1:9/isc/isc_ft_v107.pth.tar failed'):
        Isc(device='cpu')
