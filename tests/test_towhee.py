"""Towhee integration, offline: the registry route, the hub-directory route, pipelines and
DataCollection on Towhee >= 1.0, and the seed examples verbatim on Towhee 0.9."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import towhee_isc
from stand_ins import register_stand_in_image_decode  # tests/ is on pytest's pythonpath

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / 'tests'
TOWHEE09_PYTHON = Path(os.environ.get('TOWHEE09_PYTHON', REPO / '.venv-towhee09' / 'bin' / 'python'))


@pytest.fixture
def published_cache(hub_dir, effnet_ckpt, seed_onnx_cache):
    """The default weights 'downloaded' already: synthetic weights of the published network under the
    published file name; its ONNX export made already."""
    hub_dir.mkdir(parents=True)
    shutil.copy(effnet_ckpt, hub_dir / 'isc_ft_v107.pth.tar')
    seed_onnx_cache(hub_dir.parent.parent)
    return hub_dir


@pytest.fixture
def jpeg(photos, tmp_path) -> Path:
    path = tmp_path / 'towhee.jpeg'
    photos[0].save(path, quality=90)
    return path


def test_import_registers_the_operator_with_towhee(published_cache, effnet_op, jpeg):
    from towhee import ops
    op = ops.image_embedding.isc().get_op()
    assert isinstance(op, towhee_isc.Isc)
    assert np.abs(op(str(jpeg)) - effnet_op(str(jpeg))).max() < 1e-6
    keyword = ops.image_embedding.isc(checkpoint_path=str(published_cache / 'isc_ft_v107.pth.tar'),
                                      timm_backbone='tf_efficientnetv2_m.in21k_ft_in1k', img_size=128,
                                      skip_preprocess=False, device='cpu', backend='torch').get_op()
    assert keyword.img_size == 128


def test_a_light_import_still_registers_once_towhee_loads(small_ckpt):
    """``import towhee_isc`` imports neither Towhee nor torch (fast start-up), yet Towhee imported
    afterwards finds the operator in its registry, in a fresh process as a user's script runs."""
    script = f'''
import json, sys
import towhee_isc
light = not {{'towhee', 'torch', 'timm'}} & set(sys.modules)
from towhee import ops
op = ops.image_embedding.isc(checkpoint_path={str(small_ckpt)!r}, device='cpu').get_op()
print(json.dumps({{'light': light, 'isc': isinstance(op, towhee_isc.Isc), 'factory': callable(towhee_isc.isc)
                  and towhee_isc.isc.__module__ == 'towhee_isc'}}))
'''
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {'light': True, 'isc': True, 'factory': True}


def test_seed_pipeline_and_datacollection(published_cache, effnet_op, jpeg, capsys):
    from towhee import DataCollection, ops, pipe
    register_stand_in_image_decode()
    p = (pipe.input('path')
         .map('path', 'img', ops.image_decode())
         .map('img', 'vec', ops.image_embedding.isc())
         .output('img', 'vec'))
    img, vec = p(str(jpeg)).get()
    assert img.mode == 'BGR'
    assert np.abs(vec - effnet_op(str(jpeg))).max() < 1e-6
    DataCollection(p(str(jpeg))).show()
    table = capsys.readouterr().out
    assert 'img' in table and 'vec' in table and 'shape=(256,)' in table


def test_checkout_works_as_a_hub_operator_directory(published_cache, effnet_op, jpeg, tmp_path):
    """Towhee's cache route: the checkout copied to $TOWHEE_HOME/operators/image-embedding/isc/versions/main."""
    home = tmp_path / 'towhee_home'
    shutil.copytree(REPO, home / 'operators' / 'image-embedding' / 'isc' / 'versions' / 'main',
                    ignore=shutil.ignore_patterns('.git', '.venv*', '__pycache__', 'saved', '*.egg-info'))
    script = f'''
import json, sys
sys.path.insert(0, {str(TESTS)!r})
from towhee import ops, pipe
from stand_ins import register_stand_in_image_decode
register_stand_in_image_decode()
p = pipe.input('path').map('path', 'img', ops.image_decode()).map('img', 'vec', ops.image_embedding.isc()).output('vec')
vec = p({str(jpeg)!r}).get()[0]
op = ops.image_embedding.isc().get_op()
print(json.dumps({{'module': type(op).__module__, 'vec': vec.tolist(), 'imported': 'towhee_isc' in sys.modules}}))
'''
    env = dict(os.environ, TOWHEE_HOME=str(home))
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out['module'].startswith('towhee.operator.image_embedding.isc.')  # loaded from the hub directory
    assert not out['imported']
    assert np.abs(np.array(out['vec']) - effnet_op(str(jpeg))).max() < 1e-6


def test_seed_examples_verbatim_on_towhee_0_9(published_cache, effnet_op, photos, tmp_path):
    assert TOWHEE09_PYTHON.is_file(), (
        f'{TOWHEE09_PYTHON} is missing: scripts/setup.sh makes the Towhee 0.9 environment '
        '(or point TOWHEE09_PYTHON at one with towhee==0.9.0 and towhee-isc installed)')
    photos[0].save(tmp_path / 'towhee.jpeg', quality=90)
    photos[0].save(tmp_path / 'towhee.jpg', quality=90)
    env = dict(os.environ, PYTHONPATH='')
    result = subprocess.run([str(TOWHEE09_PYTHON), str(REPO / 'tests' / 'seed_examples_towhee09.py')],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out['towhee'] == '0.9.0'
    want = effnet_op(str(tmp_path / 'towhee.jpg'))
    for name in ('dc2', 'chaining'):
        assert np.abs(np.array(out[name]) - want).max() < 1e-5, name
    assert out['dc2_table'] and out['chaining_table']


def test_windows_of_paths_hand_the_operator_lists_and_keep_row_order(small_ckpt, small_op, photos, tmp_path,
                                                                     monkeypatch):
    """The README's batched pipeline: rows -> windows of paths -> one operator call per window -> rows."""
    from towhee import ops, pipe
    paths = []
    for i in range(7):
        paths.append(str(tmp_path / f'{i}.jpg'))
        photos[i].save(paths[-1])
    calls = []
    real_call = towhee_isc.Isc.__call__
    monkeypatch.setattr(towhee_isc.Isc, '__call__', lambda self, data: calls.append(len(data)) or real_call(self, data))
    p = (pipe.input('paths')
         .flat_map('paths', 'path', lambda paths: paths)
         .window('path', 'batch', 3, 3, lambda batch: batch)
         .map('batch', 'vecs', ops.image_embedding.isc(checkpoint_path=str(small_ckpt), device='cpu'))
         .flat_map(('batch', 'vecs'), ('path', 'vec'), lambda batch, vecs: list(zip(batch, vecs)))
         .output('path', 'vec'))
    rows = list(iter(p(paths).get, None))
    assert [path for path, _ in rows] == paths
    assert calls == [3, 3, 1]
    for path, vec in rows:
        assert np.abs(vec - small_op(path)).max() < 1e-6


def test_readme_pipeline_decode_embed_insert_into_milvus(small_ckpt, small_op, photos, tmp_path):
    from towhee import ops, pipe
    from towhee_isc.workflow.milvus import MilvusIndex
    register_stand_in_image_decode()
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f'R{i:06d}.jpg'))
        photos[i].save(paths[-1])
    index = MilvusIndex(str(tmp_path / 'isc.db'), 'isc')
    index.create(dim=256)
    client = index.client  # README's route: our Milvus Lite on its private socket
    insert = (pipe.input('path')
              .map('path', 'img', ops.image_decode())
              .map('img', 'vec', ops.image_embedding.isc(checkpoint_path=str(small_ckpt)))
              .map(('path', 'vec'), 'count',
                   lambda path, vec: client.upsert('isc', [{'id': Path(path).stem, 'vector': vec.tolist()}])['upsert_count'])
              .output('count'))
    assert [insert(p).get()[0] for p in paths + paths[:1]] == [1, 1, 1, 1]
    client.flush('isc')
    assert client.query('isc', filter='', output_fields=['count(*)'])[0]['count(*)'] == 3  # no duplicate
    hits = client.search('isc', data=[small_op(paths[1]).tolist()], limit=1, search_params={'metric_type': 'IP'})
    assert hits[0][0]['id'] == 'R000001' and hits[0][0]['distance'] == pytest.approx(1, abs=1e-5)


def test_hub_loader_finds_every_requirement_installed():
    """Towhee's hub loader pip-installs each requirements.txt line whose name is not spelled exactly
    as pkg_resources knows it (e.g. 'Pillow' for 'pillow'): offline that would fail."""
    import re
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        import pkg_resources
    installed = {d.project_name for d in pkg_resources.working_set}
    names = [re.split(r'(~|>|<|=|!|\]|\[| )', line)[0].replace('_', '-')
             for line in (REPO / 'requirements.txt').read_text().split('\n') if line]
    assert names and [n for n in names if n not in installed] == []
