"""Towhee's route to Triton: README's build block makes a model repository in one process; README's
server lines put the operator in Towhee's hub folder; another process plays Triton's Python backend
(``triton_side.py``: Towhee's mock Triton utilities, the repository's ONNX model in ONNX Runtime as
the model the pipeline calls). That process finds the operator only through the hub folder, and has no
weights and no network."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dill
import numpy as np
import pytest

from commands import BIN
from towhee_isc import Isc
from towhee_isc.weights import WEIGHTS, WEIGHTS_URL_ENV

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
README = REPO / 'README.md'
NO_NETWORK = 'http://127.0.0.1:9/'  # the discard port: nothing listens, so a download fails at once


def readme_client_block() -> str:
    """README's Triton client script, as written."""
    section = README.read_text().split('**3. Call it**', 1)[1]
    match = re.search(r'```python\n(.*?)```', section, re.S)
    assert match, 'README has no ```python block after "**3. Call it**"'
    return match.group(1)


def readme_build_block() -> str:
    """README's Triton build script, as written."""
    match = re.search(r'```python\n(# build_triton\.py\n.*?)```', README.read_text(), re.S)
    assert match, 'README has no ```python block starting with "# build_triton.py"'
    return match.group(1)


def run(args: list[str], cwd: Path, env: dict[str, str | None], check: bool = True) -> subprocess.CompletedProcess:
    """``args`` in a fresh process, with ``env`` over this one's (None removes a variable)."""
    merged = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    result = subprocess.run(args, cwd=cwd, env=merged, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


def readme_server_lines() -> list[str]:
    """README's server-side shell lines, as written (comments dropped)."""
    section = README.read_text().split('**2. On the Triton server**', 1)[1]
    block = section[section.index('```bash') + len('```bash'):]
    block = block[:block.index('```')]
    return [line.split('  #')[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope='module')
def server_home(tmp_path_factory) -> Path:
    """A Triton server's home after README's set-up lines, each run in its own shell process: the
    operator cloned into ~/.towhee's hub folder (git clone: the committed checkout), the pip line
    checked with --dry-run (it must not change this environment), tritonserver not run (not here)."""
    home = tmp_path_factory.mktemp('server_home')
    lines = readme_server_lines()
    assert [line.split()[0] for line in lines] == ['git', 'pip', 'tritonserver']
    for line in lines[:2]:
        line = line.replace('path/to/this/checkout', str(REPO)) + (' --dry-run' if line.startswith('pip ') else '')
        run(['bash', '-c', line], home, {'HOME': str(home), 'PATH': f'{BIN}{os.pathsep}{os.environ["PATH"]}'})
    assert (home / '.towhee' / 'operators' / 'image-embedding' / 'isc' / 'versions' / 'main' / '__init__.py').is_file()
    return home


@pytest.fixture
def server(server_home, tmp_path) -> tuple[Path, dict[str, str]]:
    """The Triton side: a working folder, and an environment whose home holds the operator in Towhee's
    default hub folder (~/.towhee, no TOWHEE_HOME), an empty torch hub (no weights), no reachable weights server."""
    folder = tmp_path / 'server'
    folder.mkdir()
    return folder, {'HOME': str(server_home), 'TOWHEE_HOME': None, 'TORCH_HOME': str(tmp_path / 'server_torch'),
                    WEIGHTS_URL_ENV: NO_NETWORK}


def serve(repository: Path, images: list[Path], server: tuple[Path, dict[str, str]], check: bool = True):
    """triton_side.py's JSON, or (check=False) the finished process."""
    folder, env = server
    result = run([sys.executable, str(TESTS / 'triton_side.py'), str(repository), *map(str, images)], folder, env,
                 check)
    return json.loads(result.stdout.strip().splitlines()[-1]) if check else result


def operator_vectors(op: Isc, images: list[Path]) -> np.ndarray:
    """What the operator gives for the images as triton_side.py sends them: the file's bytes, then
    the decoded RGB array."""
    from PIL import Image
    return np.stack([v for image in images
                     for v in (op(image.read_bytes()), op(np.asarray(Image.open(image).convert('RGB'))))])


@pytest.fixture
def images(tmp_path, photos) -> list[Path]:
    paths = []
    for i, photo in enumerate(photos[:2]):
        paths.append(tmp_path / f'photo{i}.jpg')
        photo.convert('RGB').save(paths[-1], quality=90)
    return paths


def test_readme_recipe_runs_the_network_as_the_repositorys_onnx_model(effnet_ckpt, images, server, tmp_path,
                                                                    monkeypatch, seed_onnx_cache):
    # The build machine: the published weights in its torch hub (a synthetic checkpoint of the
    # published architecture under the published file name), README's block run as written.
    build_torch = tmp_path / 'build_torch'
    (build_torch / 'hub' / 'checkpoints').mkdir(parents=True)
    shutil.copy(effnet_ckpt, build_torch / 'hub' / 'checkpoints' / WEIGHTS['isc_ft_v107'].file_name)
    seed_onnx_cache(build_torch)  # the build machine exported the network before
    build = tmp_path / 'build'
    build.mkdir()
    (build / 'build_triton.py').write_text(readme_build_block())
    run([sys.executable, 'build_triton.py'], build, {'TORCH_HOME': str(build_torch), WEIGHTS_URL_ENV: NO_NETWORK})
    repository = build / 'model_repository'
    onnx_model = repository / 'image-embedding.isc-0' / '1' / 'model.onnx'
    assert onnx_model.is_file() and (repository / 'pipeline' / '1' / 'pipe.pickle').is_file()
    assert 'KIND_GPU' in (repository / 'image-embedding.isc-0' / 'config.pbtxt').read_text()

    result = serve(repository, images, server)

    # The network ran as the ONNX model, once per image, on the preprocessed tensor ...
    assert result['onnx_calls'] == [[1, 3, 512, 512]] * (2 * len(images))
    # ... the operator came from the hub folder, and read no weights there (none exist, none downloadable).
    assert 'towhee.operator.image_embedding.isc.main.isc' in result['operator_modules']
    assert not result['towhee_isc_imported']
    assert result['torch_loads'] == []
    monkeypatch.setenv('TORCH_HOME', str(build_torch))
    op = Isc(model_name='isc_ft_v107', device='cpu')
    expected = operator_vectors(op, images)
    assert np.abs(np.array(result['vectors']) - expected).max() < 1e-5

    # README's client block, as written, against the same repository behind Triton's HTTP protocol.
    folder, env = server
    merged = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    log = open(tmp_path / 'triton_http.log', 'w')
    http = subprocess.Popen([sys.executable, str(TESTS / 'triton_side.py'), '--http', str(repository)], cwd=folder,
                            env=merged, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = http.stdout.readline()
        assert line.startswith('listening on '), (tmp_path / 'triton_http.log').read_text()[-3000:]
        client = readme_client_block()
        script = client + 'import json\nprint(json.dumps(vector.tolist()))\n'  # the block, then its result
        done = run([sys.executable, '-c', script], REPO, {'TRITON_URL': f'127.0.0.1:{line.split()[-1]}'})
        assert 'towhee import triton_client' not in client and 'Traceback' not in done.stderr
        assert done.stdout.splitlines()[0] == '(256,) float32'
        vector = np.array(json.loads(done.stdout.splitlines()[-1]))
        assert np.abs(vector - op(str(REPO / 'examples' / 'coffee.jpg'))).max() < 1e-5
    finally:
        http.terminate()
        http.wait(timeout=30)
        log.close()


def test_a_checkpoint_path_is_kept_as_written_and_only_its_header_is_read_on_the_server(small_ckpt, images, server,
                                                                                          tmp_path):
    build = tmp_path / 'build'
    (build / 'weights').mkdir(parents=True)
    shutil.copy(small_ckpt, build / 'weights' / 'small.pth.tar')
    code = '''
import towhee
from towhee import AutoConfig, ops, pipe
import towhee_isc
p = (pipe.input('image')
     .map('image', 'vec', ops.image_embedding.isc(checkpoint_path='weights/small.pth.tar', device='cpu'),
          config=AutoConfig.TritonCPUConfig())
     .output('vec'))
assert towhee.build_pipeline_model(dc_pipeline=p, model_root='repo', format_priority=['onnx'], parallelism=1)
'''
    run([sys.executable, '-c', code], build, {})
    with open(build / 'repo' / 'pipeline' / '1' / 'pipe.pickle', 'rb') as f:
        dag = dill.load(f)
    [node] = [n for n in dag.nodes.values() if n.op_info.operator == 'image-embedding/isc']
    assert node.op_info.init_kws['checkpoint_path'] == 'weights/small.pth.tar'  # not the build machine's absolute path

    folder, _ = server
    (folder / 'weights').mkdir()
    shutil.copy(small_ckpt, folder / 'weights' / 'small.pth.tar')
    shutil.rmtree(build / 'weights')  # the build machine's copy is not what the server reads
    result = serve(build / 'repo', images, server)

    assert len(result['onnx_calls']) == 2 * len(images)
    assert result['torch_loads'] == [{'file': 'weights/small.pth.tar', 'mmap': True}]  # the header, mapped
    expected = operator_vectors(Isc(checkpoint_path=small_ckpt, device='cpu'), images)
    assert np.abs(np.array(result['vectors']) - expected).max() < 1e-5


def test_a_different_checkpoint_on_the_server_is_named_not_silently_used(small_ckpt, images, server, tmp_path,
                                                                          photos):
    from towhee_isc.testing import make_synthetic_checkpoint
    build = tmp_path / 'build'
    (build / 'weights').mkdir(parents=True)
    shutil.copy(small_ckpt, build / 'weights' / 'w.pth.tar')
    code = """
import towhee, towhee_isc
from towhee import AutoConfig, ops, pipe
p = pipe.input('image').map('image', 'vec', ops.image_embedding.isc(checkpoint_path='weights/w.pth.tar'),
                             config=AutoConfig.TritonCPUConfig()).output('vec')
assert towhee.build_pipeline_model(dc_pipeline=p, model_root='repo', format_priority=['onnx'], parallelism=1)
"""
    run([sys.executable, '-c', code], build, {})
    folder, _ = server
    (folder / 'weights').mkdir()
    make_synthetic_checkpoint(folder / 'weights' / 'w.pth.tar', 'resnet18', 128, photos[:2])  # trained at 128 px
    result = serve(build / 'repo', images, server, check=False)
    assert result.returncode != 0
    assert 'the ONNX model in Triton refused a (1, 3, 128, 128) batch' in result.stderr
    assert 'the server needs the same checkpoint file at that path' in result.stderr


def test_an_operator_whose_network_runs_in_triton_says_so_where_weights_are_needed(small_ckpt):
    from towhee.runtime.node_config import NodeConfig
    from towhee.runtime.runtime_conf import set_runtime_config

    config = NodeConfig(name='isc', acc_info={'type': 'triton', 'params': {
        'model_name': 'image-embedding.isc-0', 'inputs': ['images'], 'outputs': ['embeddings']}})
    with set_runtime_config(config):
        op = Isc(checkpoint_path=small_ckpt, device='cpu')
    assert type(op.model).__name__ == 'TritonClient' and op.embedding_dim == 256
    for needs_weights in (lambda: op.fingerprint, lambda: op.net, lambda: op.save_model('onnx', 'x.onnx')):
        with pytest.raises(ValueError, match='runs in Triton'):
            needs_weights()
