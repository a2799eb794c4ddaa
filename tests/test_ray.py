"""Embedding on Ray Data: the ``IscEmbedder`` API on an in-process Ray, and ``towhee-isc embed
--ray-address`` against a cluster started apart (``ray start --head``), both on loopback only, with two
actors. Results must equal the single-process embed. One Ray of each kind per module: Ray starts slowly."""
import builtins
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from commands import descendants, ray_head
from towhee_isc.workflow.cli import main as cli
from towhee_isc.workflow.descriptors import read_descriptors
from towhee_isc.workflow.ray import RayClusterError, plan_actors


# Token authentication as Ray 2.60 turns on by default, with a token of our own, so nothing is written
# to ~/.ray; no usage statistics are sent. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is not set for the commands:
# towhee-isc must keep a Ray on loopback there by itself. (README's `ray start` line sets it for the head.)
# Ray waits 30 s for its GCS server's port by default, which a loaded CI machine can exceed (towhee-isc's own
# local Ray waits 120 s; a `ray start` cluster takes it from its environment).
RAY_ENV = {'RAY_AUTH_MODE': 'token', 'RAY_AUTH_TOKEN': secrets.token_hex(16), 'RAY_USAGE_STATS_ENABLED': '0',
           'RAY_gcs_server_port_wait_time_s': '120'}
LOOPBACK_ONLY = {'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0'}  # for a Ray that a test script starts itself
README = Path(__file__).resolve().parents[1] / 'README.md'


def readme_ray_lines() -> list[str]:
    """README's one-machine Ray lines (the first ```bash block of its Ray section), comments dropped."""
    section = README.read_text().split('## Embedding on a Ray cluster', 1)[1]
    block = section[section.index('```bash') + len('```bash'):]
    return [line for line in block[:block.index('```')].splitlines() if line.strip() and not line.startswith('#')]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ray_env():
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope='module')
def ray_temp():
    """A short folder for Ray's sessions: its socket paths must stay under 108 bytes."""
    folder = tempfile.mkdtemp(prefix='ray', dir='/tmp')
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope='module')
def images(tmp_path_factory, photos) -> Path:
    """12 photos (sizes and orientations vary) and one file that is not an image."""
    folder = tmp_path_factory.mktemp('ray_images')
    for i in range(12):
        photo = photos[i % len(photos)].rotate(30 * i, expand=True)
        photo.save(folder / f'img{i:02d}.jpg', quality=90)
    (folder / 'broken.jpg').write_bytes(b'this is not a JPEG')
    return folder


@pytest.fixture(scope='module')
def single_process(images, small_ckpt, tmp_path_factory):
    """The single-process embed of ``images``: (ids, vectors), the reference for every Ray result."""
    out = tmp_path_factory.mktemp('single') / 'single.h5'
    assert cli(['embed', str(images), '-o', str(out), '--checkpoint', str(small_ckpt), '--device', 'cpu', '--quiet']) == 0
    return read_descriptors(out)


def test_readme_ray_lines_keep_the_head_on_loopback():
    export, start, embed = readme_ray_lines()
    assert export.startswith('export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=')
    assert start.startswith('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address 127.0.0.1 ')
    assert '--disable-usage-stats' in start and '--num-cpus 2' in start
    assert embed.startswith('towhee-isc embed ') and '--ray-address auto' in embed and '--actors 2' in embed


class Cluster(str):
    """A cluster's address (HOST:PORT), and its ``ray start --block`` process (``head``)."""

    def __new__(cls, address: str, head: subprocess.Popen):
        made = super().__new__(cls, address)
        made.head = head
        return made


@pytest.fixture(scope='module')
def cluster(ray_env, ray_temp):
    """A one-node Ray cluster of 2 CPUs started apart with README's `ray start` line (on a free port,
    blocking, its temporary folder ours); its address. Stopped by its PID (``ray start --block`` stops
    every process it started when it is terminated)."""
    port, temp = free_port(), ray_temp / 'cluster'
    temp.mkdir()
    words = shlex.split(readme_ray_lines()[1])
    env = dict(os.environ)
    while re.fullmatch(r'\w+=.*', words[0]):  # VAR=value before the command
        name, _, value = words.pop(0).partition('=')
        env[name] = value
    assert words[:2] == ['ray', 'start'] and words[words.index('--port') + 1] == '6379'
    words[words.index('--port') + 1] = str(port)
    with ray_head([*words[2:], '--include-dashboard=false', f'--dashboard-port={free_port()}',
                   f'--ray-client-server-port={free_port()}'], env, temp) as head:
        yield Cluster(f'127.0.0.1:{port}', head)


def embed_command(address, images, out, ckpt, *extra) -> list[str]:
    return [sys.executable, '-m', 'towhee_isc', 'embed', str(images), '-o', str(out), '--checkpoint', str(ckpt),
            '--device', 'cpu', '--ray-address', address, *map(str, extra)]


def embed_on_cluster(address, images, out, ckpt, *extra, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(embed_command(address, images, out, ckpt, *extra), capture_output=True, text=True,
                          timeout=600, env=None if env is None else {**os.environ, **env})


RAY_DATA_SCRIPT = """
import json, sys
import numpy as np
import ray, ray.data
from towhee_isc.workflow.ray import IscEmbedder

images, checkpoint, temp = sys.argv[1:4]
ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
try:
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = 300  # fail, never hang
    settings = {'checkpoint_path': checkpoint, 'device': 'cpu'}
    # Two actors of half a CPU each leave one CPU for the read tasks: with whole CPUs they would
    # take both and Ray Data would wait forever for a CPU to read files with.
    files = ray.data.read_binary_files(images, include_paths=True)  # 'bytes' and 'path' columns
    from_bytes = files.map_batches(IscEmbedder, fn_constructor_kwargs=settings, batch_size=4,
                                   compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5).take_all()
    paths = ray.data.from_items([{'path': f'{images}/{name}'} for name in sorted(__import__('os').listdir(images))])
    from_paths = paths.map_batches(IscEmbedder, fn_constructor_kwargs=settings, batch_size=3,
                                   compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5).take_all()
finally:
    ray.shutdown()
print(json.dumps([[{**row, 'vector': np.asarray(row['vector']).tolist()} for row in rows]
                  for rows in (from_bytes, from_paths)]))
"""


def test_isc_embedder_maps_ray_data_batches_of_bytes_or_paths(ray_temp, images, small_ckpt, single_process):
    """A user's own Ray Data script, in its own process: read files or paths, map_batches(IscEmbedder)."""
    ids, want = single_process
    result = subprocess.run([sys.executable, '-c', RAY_DATA_SCRIPT, str(images), str(small_ckpt), str(ray_temp / 'local')],
                            env={**os.environ, **RAY_ENV, **LOOPBACK_ONLY}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for rows in json.loads(result.stdout.strip().splitlines()[-1]):
        assert sorted(rows[0]) == ['error', 'id', 'path', 'vector']  # image bytes are not carried along
        by_id = {row['id']: row for row in rows}
        assert sorted(by_id) == sorted(ids + ['broken'])
        assert 'broken.jpg' in by_id['broken']['error'] and np.isnan(np.array(by_id['broken']['vector'], float)).all()
        got = np.stack([by_id[i]['vector'] for i in ids])
        assert all(by_id[i]['error'] == '' for i in ids) and np.abs(got - want).max() < 1e-5


def test_embed_on_a_ray_cluster_equals_the_single_process_embed(cluster, images, small_ckpt, single_process, tmp_path,
                                                                monkeypatch):
    # README's command: --ray-address auto (here RAY_ADDRESS, as the head's temporary folder is ours),
    # and no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: the command keeps to the loopback head by itself.
    assert 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER' not in os.environ
    monkeypatch.setenv('RAY_ADDRESS', cluster)
    run = embed_on_cluster('auto', images, tmp_path / 'ray.h5', small_ckpt, '--actors', 2, '--chunk-size', 3,
                           env={'TOWHEE_ISC_PROGRESS': '1'})  # the bar, drawn into this pipe too
    assert run.returncode == 0, run.stderr
    ids, vectors = read_descriptors(tmp_path / 'ray.h5')
    assert ids == single_process[0] and np.abs(vectors - single_process[1]).max() < 1e-5
    assert 'wrote 12 descriptors' in run.stdout
    assert 'skipped 1 unreadable' in run.stderr and str(images / 'broken.jpg') in run.stderr
    assert 'embedding: 100%' in run.stderr  # the progress bar
    assert 'concurrent actors' not in run.stderr  # Ray Data's warning of more actors than blocks of work
    assert not (tmp_path / 'ray.h5.parts').exists()


def test_video_embed_on_a_ray_cluster_equals_the_local_run(cluster, small_ckpt, tmp_path):
    # One task per video: two short videos of photos and a file that is not a video, skipped and listed.
    from towhee_isc.video.embed import embed_videos
    from towhee_isc.video.storage import read_video_descriptors
    from towhee_isc.video.synthetic import Shot, photos, render, write_video
    from towhee_isc.workflow.embedding import Embedder
    rng, images = np.random.default_rng(0), photos(['astronaut', 'coffee', 'rocket'])
    folder = tmp_path / 'videos'
    folder.mkdir()
    for name, shots in (('A', [0, 1]), ('B', [2])):
        write_video(folder / f'{name}.mp4', render([Shot.random(rng, i, 2) for i in shots], images, 10, (64, 64)), 10)
    (folder / 'broken.mp4').write_text('not a video')
    embed_videos([folder], str(tmp_path / 'local.npz'), Embedder(checkpoint_path=small_ckpt, device='cpu'), quiet=True)
    run = subprocess.run([sys.executable, '-m', 'towhee_isc', 'video', 'embed', str(folder), '-o', str(tmp_path / 'ray.npz'),
                          '--checkpoint', str(small_ckpt), '--device', 'cpu', '--ray-address', cluster, '--quiet'],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert 'wrote 6 frame descriptors of 2 video(s)' in run.stdout and str(folder / 'broken.mp4') in run.stderr
    local, ray = read_video_descriptors(tmp_path / 'local.npz'), read_video_descriptors(tmp_path / 'ray.npz')
    assert ray.ids == local.ids == ['A', 'B'] and ray.model == local.model
    for mine, theirs in zip(ray.videos, local.videos):
        assert mine.timestamps.tolist() == theirs.timestamps.tolist()
        assert np.abs(mine.features - theirs.features).max() < 1e-5
    assert not (tmp_path / 'ray.npz.parts').exists()


def test_actors_that_do_not_fit_the_cluster_are_refused_not_waited_for(cluster, images, small_ckpt, tmp_path):
    run = embed_on_cluster(cluster, images, tmp_path / 'x.h5', small_ckpt, '--actors', 3)
    assert run.returncode == 2 and run.stderr.count('\n') == 1, run.stderr
    assert '3 actors of 1 CPU(s) and 0 GPU(s) do not fit in the Ray cluster (2 CPU(s), 0 GPU(s))' in run.stderr
    assert not (tmp_path / 'x.h5').exists() and not (tmp_path / 'x.h5.parts').exists()


def test_plan_actors_fills_the_cluster_by_default():
    assert plan_actors({'CPU': 16.0}, None, 4, 0) == 4
    assert plan_actors({'CPU': 16.0, 'GPU': 2.0}, None, 2, 1) == 2
    assert plan_actors({'CPU': 2.0}, None, 0.5, 0) == 4
    with pytest.raises(RayClusterError, match='use --actors 2 or less'):
        plan_actors({'CPU': 2.0}, 3, 1, 0)
    with pytest.raises(RayClusterError, match='not enough for one actor of 3 CPU'):
        plan_actors({'CPU': 2.0}, None, 3, 0)
    with pytest.raises(RayClusterError, match='not enough for one actor of 1 CPU.* and 1 GPU'):
        plan_actors({'CPU': 2.0}, None, 1, 1)
    # Fractions of a CPU would plan thousands of model-loading actors (2,000 on 2 CPUs at 0.001): at most 4 per CPU.
    assert plan_actors({'CPU': 2.0}, None, 0.25, 0) == 8
    for fraction in (0, 0.001, 0.2):
        with pytest.raises(ValueError, match=f'--cpus-per-actor must be at least 0.25 .*got {fraction:g}'):
            plan_actors({'CPU': 2.0}, None, fraction, 0)
    # video embed --ray-address: one task process per video at once; refused before the cluster is reached.
    from towhee_isc.video.ray import embed_on_ray
    with pytest.raises(ValueError, match='--cpus-per-task must be at least 0.25 .*got 0.001'):
        embed_on_ray([(0, Path('v.mkv'))], '127.0.0.1:1', {}, 1.0, None, 0.001, lambda *saved: None)


def one_line_error_soon(address: str, images, small_ckpt, tmp_path, env: dict | None = None) -> str:
    """``embed --ray-address ADDRESS`` fails with one line, not after Ray's ten minutes of retries (the
    limit only guards against that hang: the command's start-up, imports included, is most of the time,
    and a shared machine slows it)."""
    run = subprocess.run(embed_command(address, images, tmp_path / 'x.h5', small_ckpt), capture_output=True, text=True,
                         timeout=300, env={**os.environ, **(env or {})})
    assert run.returncode == 2 and run.stderr.startswith('error: ') and run.stderr.count('\n') == 1, run.stderr
    assert not (tmp_path / 'x.h5').exists()
    return run.stderr


def test_an_unreachable_cluster_is_one_line(ray_env, images, small_ckpt, tmp_path):
    assert 'Connection refused' in one_line_error_soon(f'127.0.0.1:{free_port()}', images, small_ckpt, tmp_path)
    # auto, where no head was started: RAY_ADDRESS names one that is gone
    assert 'cannot reach a Ray cluster' in one_line_error_soon('auto', images, small_ckpt, tmp_path,
                                                                {'RAY_ADDRESS': f'127.0.0.1:{free_port()}'})


def test_a_head_at_another_address_or_not_ray_is_one_line(cluster, images, small_ckpt, tmp_path):
    # The loopback head asked for at this machine's network address, where it does not listen.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(('8.8.8.8', 9))  # no packet is sent: this only picks the outgoing interface
            machine = s.getsockname()[0]
        except OSError:  # no network interface but loopback
            machine = '127.0.0.1'
    port = cluster.rpartition(':')[2]
    if machine != '127.0.0.1':
        assert 'cannot reach a Ray cluster' in one_line_error_soon(f'{machine}:{port}', images, small_ckpt, tmp_path)
    # Something that is not a Ray head listening at the address.
    with socket.socket() as listener:
        listener.bind(('127.0.0.1', 0))
        listener.listen()
        answer = threading.Thread(target=lambda: listener.accept()[0].sendall(b'HTTP/1.1 400 Bad Request\r\n\r\n'),
                                  daemon=True)
        answer.start()
        error = one_line_error_soon(f'127.0.0.1:{listener.getsockname()[1]}', images, small_ckpt, tmp_path)
    assert 'no Ray head answers' in error and 'something else listens there' in error


def test_without_ray_the_command_says_what_to_install(images, small_ckpt, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_ray(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == 'ray' or name.startswith('ray.')):  # not our own workflow.ray
            raise ImportError(f'No module named {name!r}')
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, '__import__', no_ray)
    code = cli(['embed', str(images), '-o', str(tmp_path / 'x.h5'), '--checkpoint', str(small_ckpt),
                '--ray-address', 'auto'])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: embedding on Ray needs Ray Data: pip install 'towhee-isc[ray]'\n"


def test_ray_options_need_ray_address(images, small_ckpt, tmp_path, capsys):
    assert cli(['embed', str(images), '-o', str(tmp_path / 'x.h5'), '--checkpoint', str(small_ckpt), '--actors', '2']) == 2
    assert '--actors, --cpus-per-actor and --gpus-per-actor need --ray-address' in capsys.readouterr().err


def saved_chunks(parts: Path) -> list[int]:
    return sorted(int(p.stem) for p in parts.glob('*.npz'))


def wait_for_chunks(parts: Path, more_than: int, driver: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while len(saved_chunks(parts)) <= more_than and driver.poll() is None and time.time() < deadline:
        time.sleep(0.02)


# This one comes last: it kills the module's cluster.

def test_embed_on_ray_continues_after_the_driver_dies_and_after_the_cluster_dies(cluster, images, small_ckpt,
                                                                                 single_process, tmp_path):
    """The driver is killed mid-run; the same command continues on the cluster, which is then killed
    (the head and every process of it): that ends the command with one line and exit 2 within seconds
    (not Ray's minute of C++ errors and exit 1), and the chunks saved are whole: the same embed, run
    again (here without Ray, no cluster being left), completes them, equal to the single-process embed."""
    out, parts = tmp_path / 'ray.h5', tmp_path / 'ray.h5.parts'
    driver = subprocess.Popen(embed_command(cluster, images, out, small_ckpt, '--actors', 1, '--chunk-size', 1, '--quiet'),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_chunks(parts, 0, driver)
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-run, with no chance to clean up
    driver.communicate()
    first = saved_chunks(parts)
    assert first and len(first) < 13 and not out.exists(), 'the run must be cut short to test resuming'

    driver = subprocess.Popen(embed_command(cluster, images, out, small_ckpt, '--actors', 1, '--chunk-size', 1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_chunks(parts, len(first), driver)  # it continued: a chunk more than the first run saved
    for pid in [cluster.head.pid, *descendants(cluster.head.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = time.time()
    _, err = driver.communicate(timeout=120)
    assert time.time() - killed < 60, 'the driver waited for Ray to give up'
    assert driver.returncode == 2 and err.count('\n') == 1 and err.startswith('error: '), err
    assert f"the Ray head at '{cluster}' stopped answering" in err and 'run the same command again' in err
    second = saved_chunks(parts)
    assert set(first) < set(second) and len(second) < 13 and not out.exists(), 'the run must be cut short again'

    assert cli(['embed', str(images), '-o', str(out), '--checkpoint', str(small_ckpt), '--device', 'cpu',
                '--chunk-size', '1', '--quiet']) == 0
    ids, vectors = read_descriptors(out)
    assert ids == single_process[0] and np.abs(vectors - single_process[1]).max() < 1e-5
    assert not parts.exists()
