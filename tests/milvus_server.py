"""A real Milvus standalone server for the tests, from PyPI's ``milvus`` package (2.3.5, installed by the
test extra): started in a temporary folder, reached at 127.0.0.1 only, stopped by its PID.

The package renders its ``milvus.yaml`` from a template; ``MilvusServerConfig.set('<section>.<key>', value)``
patches a key of that template (``milvus-server --extra-config`` does the same). Left empty, each
component's ``ip:`` is the machine's first network address, which the components announce to each other;
we set them all to 127.0.0.1. Milvus 2.3 has no setting for the address its gRPC ports listen on (they
listen on all interfaces): the server is announced and reached at 127.0.0.1 only, runs with
authentication on, and lives only as long as the test session. Its embedded etcd is given loopback URLs
and free ports of its own (through ``ETCD_CONFIG_PATH``), so two test sessions on one machine do not
collide on etcd's fixed default ports.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = '127.0.0.1'
COMPONENTS = ('rootCoord', 'proxy', 'queryCoord', 'queryNode', 'indexNode', 'dataCoord', 'dataNode')
TOKEN = 'root:Milvus'  # the default root user of a new server with authentication on


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class MilvusServerProcess:
    """``start()`` launches ``milvus run standalone`` from the package's binaries and waits until it is
    healthy; ``stop()`` ends it by PID (SIGTERM, then SIGKILL) and removes its folder."""

    def __init__(self, folder: Path, authentication: bool = True):
        self.folder, self.authentication = Path(folder), authentication
        self.process: subprocess.Popen | None = None
        self.port = self.health_port = 0

    @property
    def uri(self) -> str:
        return f'http://{LOOPBACK}:{self.port}'

    @property
    def token(self) -> str | None:
        return TOKEN if self.authentication else None

    def start(self, timeout: float = 120.0) -> None:
        import milvus
        config = milvus.MilvusServerConfig(data_dir=str(self.folder))
        for component in COMPONENTS:
            config.set(f'{component}.ip', LOOPBACK)
        config.set('authorization_enabled', self.authentication)
        for key, (kind, _) in list(config.configurable_items.items()):
            if key.endswith('_port') and kind is int:  # resolve() tries its defaults first (19530, 2379, ...):
                config.set(key, free_port())       # two servers starting at once took the same ones
        config.resolve()  # picks free ports (tried on 127.0.0.1) and writes configs/milvus.yaml
        self.port = int(config.get('proxy_port'))
        etcd_port, peer_port, self.health_port = int(config.get('etcd_port')), free_port(), free_port()
        etcd = self.folder / 'configs' / 'embedEtcd.yaml'
        etcd.write_text(f'listen-client-urls: http://{LOOPBACK}:{etcd_port}\n'
                        f'advertise-client-urls: http://{LOOPBACK}:{etcd_port}\n'
                        f'listen-peer-urls: http://{LOOPBACK}:{peer_port}\n'
                        f'initial-advertise-peer-urls: http://{LOOPBACK}:{peer_port}\n'
                        f'initial-cluster: default=http://{LOOPBACK}:{peer_port}\n')
        # The package's own unpacking of its binaries (MilvusServer.start does it too, but also chdirs
        # this process and picks the health port itself).
        milvus._initialize_data_files(str(self.folder))
        binaries = self.folder / 'bin'
        env = {**os.environ, 'DEPLOY_MODE': 'STANDALONE', 'METRICS_PORT': str(self.health_port),
               'MILVUS_RUN_DIR': str(self.folder / 'run'), 'ETCD_CONFIG_PATH': str(etcd),
               'LD_LIBRARY_PATH': ':'.join(filter(None, [str(binaries), os.environ.get('LD_LIBRARY_PATH')]))}
        log = open(self.folder / 'logs' / 'milvus-stdout.log', 'w')
        self.process = subprocess.Popen([str(binaries / 'milvus'), 'run', 'standalone'], cwd=self.folder, env=env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()  # the child has its own copy
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f'http://{LOOPBACK}:{self.health_port}/healthz'
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'Milvus exited with {self.process.returncode}; see {self.folder}/logs')
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if b'OK' in reply.read():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop(remove=False)
        raise TimeoutError(f'Milvus was not healthy after {timeout:.0f} s; see {self.folder}/logs')

    def stop(self, remove: bool = True) -> None:
        if self.process is not None and self.process.poll() is None:
            # A server whose data is thrown away next needs no graceful stop (it takes 15-30 s).
            os.kill(self.process.pid, signal.SIGKILL if remove else signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:  # Milvus's graceful stop can take half a minute
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        self.process = None
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
