"""Progress of long steps, in one place: every step that can take long on a large input (embedding,
search, dedup, index uploads, the NES augmentation, evaluate on large CSVs, the benchmarks) counts its
work through :class:`Progress`, which draws one tqdm line on stderr: done/total, elapsed, the rate and
an estimate of the time left.

The line is drawn only where someone watches it: stderr is a terminal and the command was not given
``--quiet`` (:func:`set_quiet`). Steps that are usually quick draw it only once they have taken
``DELAY`` seconds, so a small job prints nothing. ``TOWHEE_ISC_PROGRESS=1`` draws every step's line,
from its start, wherever stderr goes (a log file, a pipe, a test); ``TOWHEE_ISC_PROGRESS=0`` none.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time

DELAY = 2.0  # seconds before the line of a step that is usually quick appears
_quiet = False


def set_quiet(quiet: bool) -> None:
    """No progress lines from now on in this process (the commands' ``--quiet``)."""
    global _quiet
    _quiet = bool(quiet)


def shown(quiet: bool = False) -> bool:
    """Whether progress lines are drawn: not ``quiet`` (nor :func:`set_quiet`), and stderr a terminal
    unless ``TOWHEE_ISC_PROGRESS`` says otherwise."""
    if quiet or _quiet:
        return False
    setting = os.environ.get('TOWHEE_ISC_PROGRESS', '')
    if setting in ('0', '1'):
        return setting == '1'
    return sys.stderr.isatty()


class Progress:
    """``total`` units of work, counted with :meth:`advance`; ``rate`` is the units done by this run
    per second since it started, and the line shows that same rate (so a summary printed from ``rate``
    agrees with the bar). Use it as a context manager, or call :meth:`close`.

    ``total=None``: one step that cannot be counted (a single library call); the line then says what
    runs and for how long, redrawn every second.
    """

    def __init__(self, total: int | None, description: str, unit: str = 'it', quiet: bool = False,
                 delay: float = DELAY, scale: bool = False):
        if os.environ.get('TOWHEE_ISC_PROGRESS') == '1':
            delay = 0
        self.total, self.unit, self.delay, self.scale = total, unit, delay, scale  # scale: 1.2M rather than 1234567
        self.done = self.earlier = 0  # units done, and of those, done by an earlier run (resumed)
        self.started = time.perf_counter()
        self.ended: float | None = None
        self._bar = None
        self._ticking: threading.Event | None = None
        if not shown(quiet):
            return
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the workflow; the operator works without it
            return
        # tqdm's own rate would count resumed units and smooth them; ours is in the postfix.
        layout = ('{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]' if total is not None
                  else '{desc} [{elapsed}]')
        self._bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, delay=delay, bar_format=layout,
                         dynamic_ncols=True, unit_scale=scale)
        if total is None:
            self._ticking = threading.Event()
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        """Redraw the line of an uncounted step every second (the step's library call holds no Python loop)."""
        while not self._ticking.wait(1.0):
            if time.perf_counter() - self.started >= self.delay:
                self._bar.refresh()

    @property
    def rate(self) -> float:
        """Units done by this run (not resumed ones) per second, up to now or to :meth:`close`."""
        seconds = (self.ended or time.perf_counter()) - self.started
        return (self.done - self.earlier) / seconds if seconds > 0 else 0.0

    def left(self) -> float | None:
        """Estimated seconds to go, or None when unknown."""
        rate = self.rate
        if self.total is None or rate <= 0:
            return None
        return (self.total - self.done) / rate

    def advance(self, n: int = 1, earlier: bool = False) -> None:
        """``n`` more units are done; ``earlier``: by an earlier run (resumed), so not in the rate."""
        self.done += n
        if earlier:
            self.earlier += n
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(n)

    def _postfix(self) -> str:
        text = f'{_scaled(self.rate) if self.scale else f"{self.rate:.2f} "}{self.unit}/s'
        left = self.left()
        if left is not None and math.isfinite(left) and self.done < (self.total or 0):
            text += f', ~{_clock(left)} left'
        return text

    def close(self) -> None:
        if self.ended is not None:
            return
        self.ended = time.perf_counter()
        if self._ticking is not None:
            self._ticking.set()
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.close()

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60:02d}:{rest % 60:02d}'


def _scaled(value: float) -> str:
    """``1.23 M`` for 1234567 (SI prefixes, as tqdm's ``unit_scale`` counts)."""
    for prefix in ('', 'k', 'M', 'G'):
        if abs(value) < 999.5:
            return f'{value:.3g} {prefix}'
        value /= 1000
    return f'{value:.3g} T'
