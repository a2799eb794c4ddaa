"""``video embed --ray-address``: one Ray task per video, the same vectors as the local run.

Each task decodes its video and embeds its frames in the operator's batches (``embed.embed_video``),
and hands back (vectors, intervals, why it could not be used); the driver saves each video as it
comes back (``storage.Parts``), so an interrupted run goes on where it stopped, as the local one
does. The cluster is joined as ``embed --ray-address`` joins it (``workflow.ray``: an address is
checked at once, a loopback head is joined on loopback).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def embed_one(path: str, isc_kwargs: dict[str, Any], fps: float, max_duration: float | None
              ) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The task: (vectors, intervals, '') of one video, or (None, None, why it cannot be used)."""
    from ..isc import Isc
    from ..workflow.ray import reserved_cpus
    from .embed import embed_video
    from .reader import VideoError
    cpus = reserved_cpus()  # the task's share of its node: for the network's threads and FFmpeg's
    op = Isc(**{**isc_kwargs, 'num_threads': isc_kwargs.get('num_threads') or cpus})
    try:
        features, intervals = embed_video(path, op, fps, max_duration, cpus)
    except VideoError as e:
        return None, None, str(e)
    return features, intervals, ''


def embed_on_ray(videos: Sequence[tuple[int, Path]], address: str, isc_kwargs: dict[str, Any], fps: float,
                 max_duration: float | None, cpus_per_task: float,
                 save: Callable[[int, np.ndarray | None, np.ndarray | None, str], None]) -> None:
    """Embed each (number, path) of ``videos`` in its own task and ``save(number, vectors, intervals,
    failure)`` each as it finishes (in any order). A task that fails otherwise (settings, weights, a
    lost node) fails the run; what was saved stays saved."""
    from ..workflow.ray import RayClusterError, _one_line, check_address, check_cpus_per_worker, connect, import_ray
    check_cpus_per_worker(cpus_per_task, '--cpus-per-task')  # Ray would run a task process per video at once
    address = check_address(address)  # a wrong address is said at once
    import_ray(quiet=True)
    ray, joined = connect(address)
    pending: dict = {}
    try:
        if cpus_per_task > ray.cluster_resources().get('CPU', 0):
            raise RayClusterError(f'a task of {cpus_per_task:g} CPU(s) does not fit in the Ray cluster '
                                  f"({ray.cluster_resources().get('CPU', 0):g} CPUs): ask for less")
        task = ray.remote(num_cpus=cpus_per_task, max_retries=1)(embed_one)
        pending = {task.remote(str(path), isc_kwargs, fps, max_duration): n for n, path in videos}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            n = pending.pop(ready)
            try:
                features, intervals, failure = ray.get(ready)
            except (ValueError, TypeError, OSError, ImportError):  # the operator's own errors, as they are
                raise
            except Exception as e:
                raise RayClusterError(f'a Ray task failed: {_one_line(e)}. The videos saved so far are kept: '
                                      'run the same command again to continue') from e
            save(n, features, intervals, failure)
    finally:
        for ref in pending:
            ray.cancel(ref)
        if joined:
            ray.shutdown()
