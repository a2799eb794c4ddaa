"""README's workflow, exactly as written there: each `towhee-isc` line of its "Find copies" block run in
order, each in its own shell process, in a folder laid out as the block assumes (references/,
queries/, ground_truth.csv, ~/Pictures). When README changes, this test runs the new text."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import html_pages
from commands import BIN
from towhee_isc.testing import make_copy_detection_set
from towhee_isc.workflow.descriptors import read_descriptors

README = Path(__file__).resolve().parents[1] / 'README.md'


def readme_workflow_lines() -> list[str]:
    """The command lines of README's first ```bash block after '## Find copies', as a user would
    type them: comments dropped, optional ``[...]`` parts left out."""
    text = README.read_text()
    section = text[text.index('## Find copies'):]
    block = section[section.index('```bash') + len('```bash'):]
    block = block[:block.index('```')]
    lines = [re.sub(r'\s\[[^]]*\]', '', line.split('#')[0]).strip() for line in block.splitlines()]
    return [line for line in lines if line]


def user_environment(root: Path, effnet_ckpt: Path, seed_onnx_cache) -> dict[str, str]:
    """A user's shell in ``root``: HOME there, the commands on PATH, and the 'published' weights already in the
    torch hub cache (synthetic weights of the published network under its file name: no network here)."""
    torch_home = root / 'torch'
    (torch_home / 'hub' / 'checkpoints').mkdir(parents=True)
    shutil.copy(effnet_ckpt, torch_home / 'hub' / 'checkpoints' / 'isc_ft_v107.pth.tar')
    seed_onnx_cache(torch_home)
    return {**os.environ, 'HOME': str(root / 'home'), 'TORCH_HOME': str(torch_home),
            'PATH': f'{BIN}{os.pathsep}{os.environ["PATH"]}', 'TOWHEE_ISC_WEIGHTS_URL': 'http://127.0.0.1:9/offline'}


@pytest.fixture(scope='module')
def workspace(tmp_path_factory, photos, effnet_ckpt, seed_onnx_cache):
    """The copy-detection set, a ~/Pictures with a few copies, and the 'published' weights already in
    the torch hub cache (synthetic weights of the published network under its file name: no network here)."""
    root = make_copy_detection_set(tmp_path_factory.mktemp('readme'), photos)
    pictures = root / 'home' / 'Pictures'
    pictures.mkdir(parents=True)
    for name in ('R000000', 'R000001'):
        shutil.copy(root / 'references' / f'{name}.jpg', pictures / f'{name}.jpg')
    photos[0].resize((300, 240)).save(pictures / 'astronaut_small.jpg', quality=85)
    photos[1].crop((10, 10, 400, 300)).save(pictures / 'cat_crop.png')
    return root, user_environment(root, effnet_ckpt, seed_onnx_cache)


def test_readme_block_is_what_this_test_expects():
    commands = [line.split()[1] for line in readme_workflow_lines()]
    assert all(line.startswith('towhee-isc ') for line in readme_workflow_lines())
    assert {'embed', 'index', 'search', 'evaluate', 'dedup'} <= set(commands)
    assert commands.index('embed') < commands.index('index') < commands.index('search') < commands.index('evaluate')


def test_readme_workflow_runs_as_written(workspace):
    root, env = workspace
    milvus_matches = None
    for line in readme_workflow_lines():
        result = subprocess.run(['bash', '-c', line], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (line, result.stderr[-3000:])
        assert 'Traceback' not in result.stderr and 'Warning' not in result.stderr, (line, result.stderr[-3000:])
        command, outputs = line.split()[1], re.findall(r'(?:-o|--report|--plot) (\S+)', line)
        for output in outputs:
            assert (root / output).is_file(), (line, output)
            if output.endswith('.html'):  # every image on the page is there to see, whatever the route
                page = html_pages.parse((root / output).read_text())
                cells = page.all('td') + page.all(cls='member')
                assert cells and all(len(cell.thumbnails) == 1 for cell in cells), (line, output)
        if command == 'embed':
            ids, vectors = read_descriptors(root / outputs[0])
            assert len(ids) == len(list((root / line.split()[2]).rglob('*.*'))) and vectors.shape[1] == 256
        elif command == 'search':
            rows = list(csv.DictReader(open(root / outputs[0])))
            assert rows and {r['query_id'] for r in rows} == {f'Q{i:05d}' for i in range(8)}
            found = {(r['query_id'], r['reference_id']): float(r['score']) for r in rows}
            if milvus_matches is None:
                milvus_matches = found  # the Milvus search comes first; the exact one must agree with it
            else:
                assert found.keys() == milvus_matches.keys()
                assert max(abs(found[k] - milvus_matches[k]) for k in found) < 1e-5
        elif command == 'evaluate':
            assert 'micro average precision' in result.stdout
        elif command == 'dedup':
            assert 'group(s) of near-duplicates' in result.stdout
    assert milvus_matches is not None


def readme_video_lines() -> list[str]:
    """The command lines of README's Videos excerpt (the ```bash block that begins `towhee-isc video embed refs/`),
    as written there, comments dropped."""
    text = README.read_text()
    start = text.index('```bash\ntowhee-isc video embed refs/') + len('```bash\n')
    return [line.split('  #')[0].strip() for line in text[start:text.index('```', start)].splitlines() if line.strip()]


def every_option(line: str) -> list[str]:
    """``line`` with each optional ``[...]`` part given, once for each choice of a ``{a,b}``."""
    line = re.sub(r'\[([^]]*)\]', r'\1', line)
    choice = re.search(r'\{([^}]*)\}', line)
    return [line[:choice.start()] + c + line[choice.end():] for c in choice.group(1).split(',')] if choice else [line]


@pytest.fixture(scope='module')
def video_workspace(tmp_path_factory, effnet_ckpt, seed_onnx_cache):
    """The folders README's Videos excerpt names (refs/, queries/, noise/) and ground_truth.csv: Q000001 holds
    R000001's seconds 1-7, rescaled and brightened, at its seconds 4-10; the 'published' weights in the torch hub
    (synthetic: random weights of the published network, which hardly tell such small frames apart)."""
    from towhee_isc.video.synthetic import Shot, edit, photos, render, write_video
    root = tmp_path_factory.mktemp('readme_videos')
    images = photos(['astronaut', 'coffee', 'rocket', 'retina', 'hubble_deep_field', 'immunohistochemistry',
                     'colorwheel', 'brick'])
    rng = np.random.default_rng(0)
    fps, size = 10, (64, 64)
    ref1 = render([Shot.random(rng, i, 2.5) for i in (0, 1, 2, 3)], images, fps, size)
    other = render([Shot.random(rng, i, 3) for i in (4, 5)], images, fps, size)
    for folder, name, frames in (('refs', 'R000001', ref1),
                                 ('refs', 'R000002', render([Shot.random(rng, 6, 6)], images, fps, size)),
                                 ('queries', 'Q000001', other[:40] + edit(ref1[10:70], scale=0.75, brightness=1.2)
                                  + other[40:]),
                                 ('noise', 'N000001', render([Shot.random(rng, 7, 5)], images, fps, size))):
        (root / folder).mkdir(exist_ok=True)
        write_video(root / folder / f'{name}.mp4', frames, fps)
    (root / 'ground_truth.csv').write_text('query_id,ref_id,query_start,query_end,ref_start,ref_end\n'
                                           'Q000001,R000001,4,10,1,7\n')
    return root, user_environment(root, effnet_ckpt, seed_onnx_cache)


def test_readme_videos_excerpt_runs_line_by_line(video_workspace):
    """Each line of README's Videos excerpt in its own shell, in README's order, as a user pastes it: with its
    optional parts left out, and with each given; a line pasted with its brackets gives one line and exit 2,
    writing nothing. (The --ray-address line needs a cluster: tests/test_ray.py runs `video embed --ray-address` against one.)"""
    root, env = video_workspace

    def run(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(['bash', '-c', line], cwd=root, env=env, capture_output=True, text=True, timeout=600)

    lines = [line for line in readme_video_lines() if '--ray-address' not in line]
    assert [line.split()[2] for line in lines] == ['embed', 'embed', 'embed', 'search', 'index', 'search',
                                                   'evaluate', 'dedup']
    for line in lines:
        if '[' in line:
            before = sorted(p.name for p in root.iterdir())
            pasted = run(line)
            errors = pasted.stderr.strip().splitlines()
            assert pasted.returncode == 2 and len(errors) == 1 and errors[0].startswith('error: '), (line, pasted.stderr)
            assert sorted(p.name for p in root.iterdir()) == before, line
        for variant in [re.sub(r'\s\[[^]]*\]', '', line), *(every_option(line) if '[' in line else [])]:
            result = run(variant)
            assert result.returncode == 0 and 'Traceback' not in result.stderr, (variant, result.stderr[-3000:])
            command = variant.split()[2]
            if command == 'embed':
                assert (root / re.search(r'-o (\S+)', variant).group(1)).is_file(), variant
            elif command == 'search':  # (what it finds: tests/test_video.py, on weights that tell these frames apart)
                assert (root / 'matches.csv').read_text().startswith(
                    'query_id,ref_id,query_start,query_end,ref_start,ref_end,score\n'), variant
            elif command == 'evaluate':
                assert ('descriptor' in result.stdout) == ('--descriptors' in variant), result.stdout
            elif command == 'dedup':
                assert isinstance(json.loads((root / 'groups.json').read_text()), list), variant
