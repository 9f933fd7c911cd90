"""The console: the user's story on stderr; Ray's, Ray Data's and DeepSpeed's logs in files.

Every command prints its own story: a line when a stage starts (with counts), one line per epoch
with its metrics, and on long loops a periodic counter with rate and ETA (:class:`Progress`).
Worker processes never print to the terminal: ``runtime.init_ray`` starts Ray with
``log_to_driver=False`` (unless ``--verbose``), so their output stays in the Ray session's log
directory, named once at start. The lines of the story produced inside workers (the epoch lines of
Ray Train, rows scored by an actor pool) travel through a :class:`Relay` actor and are printed by
the driver.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import sys
import tempfile
import threading
import time

import ray

native_log: str | None = None  # where this process's native stderr and Ray's messages go (logs_to_file)
RAY_LOG_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"  # as Ray's own handlers


def say(line: str) -> None:
    """One line of the story (stderr, flushed: stdout carries results such as tables)."""
    print(line, file=sys.stderr, flush=True)


# Lines that are a library's log, not the story: Ray's pushed messages (e.g. its warning that many
# worker processes started) and DeepSpeed's INFO/WARNING lines (transformers imports DeepSpeed in the
# driver too, which then announces the accelerator it picked).
_LIBRARY_LOG = re.compile(r"\(raylet\)|^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING)\] \[\w+\.py:")


class _LogLines:
    """A line-buffered stdout: library log lines (:data:`_LIBRARY_LOG`) to the log file, the rest to
    the terminal."""

    def __init__(self, terminal, log):
        self.terminal, self.log, self.pending = terminal, log, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            (self.log if _LIBRARY_LOG.search(line) else self.terminal).write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.terminal, name)


def logs_to_file() -> str:
    """For the CLI's process: what native code writes to stderr (fd 2: Ray's C++ core worker, gloo,
    the processes Ray starts) and library log lines on stdout (Ray's pushed messages, DeepSpeed's)
    go to a log file, while Python's ``sys.stderr`` (the story, warnings, tracebacks) and the rest
    of ``sys.stdout`` (results) stay on the terminal. Returns the log's path."""
    global native_log
    fd, native_log = tempfile.mkstemp(prefix="puma-ray-", suffix=".log")
    os.close(fd)
    fd = os.open(native_log, os.O_WRONLY | os.O_APPEND)  # appends, as the log files opened on it below
    terminal = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, errors="backslashreplace")
    sys.stdout = _LogLines(sys.stdout, open(native_log, "a", buffering=1, errors="backslashreplace"))
    return native_log


def ray_logs_to_file() -> None:
    """Ray's Python loggers in this process write to :data:`native_log` instead of the terminal: Ray's
    (``ray``, which Ray Train and Ray Tune log through) and Ray Data's (``ray.data``, which has its own
    handlers and does not propagate). A Ray Data task that raises on a user mistake logs ERROR lines
    (the operator that failed, a stack-trace hint) before the command prints its one-line error:
    they stay in the log, as in Ray Data's own file in the session's logs. Without a native log (not
    the CLI's terminal session, or ``--verbose``) nothing changes."""
    if native_log is None:
        return
    to_file = logging.FileHandler(native_log, errors="backslashreplace")
    to_file.set_name("puma-ray-log")
    to_file.setFormatter(logging.Formatter(RAY_LOG_FORMAT))
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for handler in logger.handlers[:]:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)  # the terminal's
        if not any(h.get_name() == "puma-ray-log" for h in logger.handlers):
            logger.addHandler(to_file)


def listing(names, at_most: int = 8) -> str:
    """Names for a console line: all of them, or the first ``at_most`` and how many more."""
    names = list(names)
    if len(names) <= at_most:
        return ", ".join(names)
    return f"{', '.join(names[:at_most])} and {len(names) - at_most} more"


def duration(seconds: float) -> str:
    """``8 s``, ``2 min 10 s``, ``1 h 05 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """A periodic counter: ``rewrite: 480,000/1,600,000 users (30%), 9,650 users/s, ETA 1 min 56 s``.

    Prints at most every ``every`` seconds, so a loop shorter than that prints nothing; ``close``
    prints a last line only when a periodic one was printed (the reader then sees the end) and it
    was not already the end."""

    def __init__(self, label: str, total: int | None = None, unit: str = "rows", every: float = 5.0):
        self.label = label
        self.total = total
        self.unit = unit
        self.every = every
        self.done = 0
        self.detail = ""
        self.t0 = time.monotonic()
        self.last = self.t0
        self.printed: int | None = None  # the count on the last line printed

    def add(self, n: int, detail: str | None = None) -> None:
        """Count ``n`` more units done (``detail``: text shown after the rate, e.g. counts by reason)."""
        self.update(self.done + n, detail=detail)

    def update(self, done: int, elapsed: float | None = None, detail: str | None = None) -> None:
        """Set the count (``elapsed``: seconds since the work began, when it began elsewhere)."""
        self.done = done
        self.detail = self.detail if detail is None else detail
        if elapsed is not None:
            self.t0 = time.monotonic() - elapsed
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.printed = done
            say(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.1f} {self.unit}/s" if rate < 10 else f", {rate:,.0f} {self.unit}/s"
        if self.total and 0 < self.done < self.total:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return f"{text}; {self.detail}" if self.detail else text

    def close(self) -> float:
        """Ends the counter; returns the seconds it ran."""
        if self.printed is not None and self.printed != self.done:
            say(self.line())
        return time.monotonic() - self.t0


@ray.remote(num_cpus=0)
class _RelayActor:
    """Holds what workers send until the driver takes it."""

    def __init__(self):
        self.items: list[tuple] = []

    def put(self, item: tuple) -> None:
        self.items.append(item)

    def take(self) -> list[tuple]:
        items, self.items = self.items, []
        return items


@dataclasses.dataclass(frozen=True)
class RelayHandle:
    """What a worker holds (in its config) to reach one :class:`Relay`: the job's relay actor and the
    relay's token. Items carry the token, so one that arrives after its relay closed is dropped by
    the next relay instead of showing up in another stage's story."""

    actor: object
    token: int

    def send(self, item: tuple, wait: bool = False) -> None:
        """Sends ``item``; with ``wait``, returns once the actor holds it and everything this
        process sent before it (Ray runs one caller's calls to an actor in order)."""
        ref = self.actor.put.remote((self.token, *item))
        if wait:
            ray.get(ref)


class Relay:
    """Driver side of the worker -> terminal channel. ``with Relay() as relay:`` give
    ``relay.handle`` to workers (in their config); they call :func:`tell` and :class:`RemoteProgress`,
    and a driver thread prints their lines and progress counters twice a second."""

    def __enter__(self) -> Relay:
        self.handle = RelayHandle(_relay_actor(), next(_tokens))
        self.counters: dict[str, Progress] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._drain()

    def _drain(self) -> None:
        for token, kind, label, *rest in ray.get(self.handle.actor.take.remote()):
            if token != self.handle.token:  # a late item from an earlier relay
                continue
            if kind == "line":
                say(label)
                continue
            done, total, unit, elapsed = rest
            counter = self.counters.setdefault(label, Progress(label, total, unit))
            if kind == "add":
                counter.add(done)
            elif total and done >= total:  # finished: the sender's own line says so
                del self.counters[label]
            else:
                counter.update(done, elapsed)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()  # the counters end here: the caller's own line reports the result


_relays: dict[str, object] = {}  # Ray job id -> this process's relay actor
_tokens = itertools.count()


def _relay_actor():
    """This process's relay actor, started once per Ray job (an actor is a process: seconds to start)
    and shared by its stages one after another; it ends with the job."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _relays:
        _relays.clear()
        _relays[job] = _RelayActor.remote()
    return _relays[job]


def tell(handle: RelayHandle | None, line: str) -> None:
    """Inside a worker: print ``line`` on the driver's console (here, without a relay). Returns once
    the relay holds the line, so a worker's last line is never lost to its stage ending."""
    if handle is None:
        say(line)
    else:
        handle.send(("line", line), wait=True)


class RemoteProgress:
    """Inside a worker: a :class:`Progress` counter shown by the driver, sent at most every
    ``every`` seconds. ``update(done)`` when this worker is the only sender (the whole count);
    ``add(n)`` when several workers add to one counter (e.g. an actor pool's rows). ``close()``
    sends what is pending and waits until the relay holds it."""

    def __init__(
        self, handle: RelayHandle | None, label: str, total: int | None = None, unit: str = "rows", every: float = 5.0
    ):
        self.handle = handle
        self.label = label
        self.total = total
        self.unit = unit
        self.every = every
        self.t0 = time.monotonic()
        self.last = self.t0
        self.pending = 0

    def _due(self, final: bool) -> bool:
        now = time.monotonic()
        if self.handle is None or not (final or now - self.last >= self.every):
            return False
        self.last = now
        return True

    def update(self, done: int) -> None:
        if self._due(done == self.total):
            elapsed = time.monotonic() - self.t0
            self.handle.send(("set", self.label, done, self.total, self.unit, elapsed))

    def add(self, n: int) -> None:
        self.pending += n
        if self._due(False):
            self.flush()

    def flush(self) -> None:
        if self.handle is not None and self.pending:
            self.handle.send(("add", self.label, self.pending, self.total, self.unit, None))
            self.pending = 0

    def close(self) -> None:
        if self.handle is not None:  # waits even with nothing pending: earlier sends went unawaited
            self.handle.send(("add", self.label, self.pending, self.total, self.unit, None), wait=True)
            self.pending = 0
