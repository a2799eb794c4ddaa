"""python -m towhee_isc: the minimal command for the main job."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'


def run(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'towhee_isc', *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_prints_a_summary_per_image(small_ckpt, photos, tmp_path):
    for i in range(2):
        photos[i].save(tmp_path / f'{i}.png')
    result = run(tmp_path / '0.png', tmp_path / '1.png', '--checkpoint', small_ckpt, '--device', 'cpu')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(tmp_path / '0.png'))
    assert 'dim=256 norm=1.0000 [' in lines[1]


def test_json_gives_full_vectors_equal_to_the_operator(small_ckpt, small_op, photos, tmp_path):
    photos[2].save(tmp_path / 'coffee.jpg')
    result = run(tmp_path / 'coffee.jpg', '--checkpoint', small_ckpt, '--json')
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record['path'] == str(tmp_path / 'coffee.jpg')
    assert np.abs(np.array(record['embedding']) - small_op(tmp_path / 'coffee.jpg')).max() < 1e-6


def test_errors_are_one_line_and_exit_2(small_ckpt, tmp_path):
    result = run(tmp_path / 'missing.jpg', '--checkpoint', small_ckpt)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: image file not found')
    assert 'Traceback' not in result.stderr


def test_offline_the_weights_error_is_one_line_naming_the_flag(tmp_path):
    """No network and no weights in the cache: one line, saying what to do on the command line."""
    env = {**os.environ, 'TORCH_HOME': str(tmp_path / 'torch'), 'TOWHEE_ISC_WEIGHTS_URL': 'http://127.0.0.1:9/offline'}
    result = run(EXAMPLES / 'coffee.jpg', env=env)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith('error: downloading http://127.0.0.1:9/offline/isc_ft_v107.pth.tar failed')
    assert line.endswith('or pass --checkpoint FILE') and 'checkpoint_path' not in line
