"""What a person sees in the terminal while `dtlab train`, `run` and `sweep` work.

dtlab's own lines (progress, what was kept or moved, where the report is, the closing table) go to
the terminal; everything the libraries print (Ray's driver, controller and worker logs, lm-eval's
progress bars, warnings) goes to `output.log` in the output directory once there is one, unless
`--verbose` asks to see it. Progress comes from the runs' own records: a thread on the driver
follows each active run's `metrics.jsonl`, so the same display serves runs in this process,
runs in Ray workers and a sweep's trials. On a terminal it is one live line per run (rich);
elsewhere (CI, a pipe) plain lines, at most one per run every `DTLAB_PROGRESS_SECONDS` (30 s).

dtlab's modules say things through Python's `logging` (the `dtlab` logger and its children); while a
command runs, `ConsoleHandler` puts those lines on the `Console`: INFO and above for the person at the
terminal (a line logged with `extra=RESULT` to stdout), DEBUG as detail (`note`). No Ray here: the
sweep's Tune callback (`sweep.py`) reports trial states to `Console`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dtlab.analysis.rundir import METRICS, diverged_reason

LOG_NAME = "output.log"  # what the libraries printed, in the output directory
RESULT = {"result": True}  # `log.info(line, extra=RESULT)`: a result, to stdout


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None


def clock(seconds: float) -> str:
    """1:02:03 or 2:03."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Watch:
    """One run being followed: its records read so far and what they say."""

    run_dir: Path
    label: str
    total: int | None = None
    step: int = 0
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    first: tuple[float, int] | None = None  # (time, step) when progress was first seen
    offset: int = 0
    last_line: float = 0.0
    last_step: int = 0  # the step the last plain line showed
    sinks: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    status: str = "running"
    errors: list[str] = field(default_factory=list)  # what the sinks raised (said in output.log)
    total_mtime: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)  # the display thread and `unfollow` both poll

    def poll(self) -> None:
        """Read the records written since the last poll (a resume rewrites the file: read it again)."""
        with self.lock:
            self._poll()

    def _poll(self) -> None:
        try:  # run.json is rewritten when training starts (a resume may change the total)
            mtime = (self.run_dir / "run.json").stat().st_mtime
        except OSError:
            mtime = 0.0
        if mtime != self.total_mtime:
            self.total, self.total_mtime = _total_steps(self.run_dir) or self.total, mtime
        path = self.run_dir / METRICS
        try:
            size = path.stat().st_size
        except OSError:
            return
        if size < self.offset:
            self.offset = 0
        if size == self.offset:
            return
        with path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                self.take(record)
        if self.first is None:  # the rate counts from here (a resumed run's old records come at once)
            self.first = (time.monotonic(), self.step)

    def take(self, record: dict[str, Any]) -> None:
        if record.get("kind", "train") == "train":
            self.loss, self.tokens_per_s = record.get("loss"), record.get("tokens_per_s")
        elif record.get("kind") == "eval":
            self.val_loss = record.get("val_loss")
        self.step = max(self.step, int(record.get("step") or 0))
        for sink in self.sinks:  # a sink (tracking) failing stops neither the display nor the run
            try:
                sink(record)
            except Exception as err:
                self.errors.append(f"{type(err).__name__}: {err}")

    def eta(self) -> float:
        if not self.total or self.first is None or self.step <= self.first[1]:
            return math.nan
        rate = (time.monotonic() - self.first[0]) / (self.step - self.first[1])
        return rate * max(0, self.total - self.step)

    def fields(self) -> str:
        parts = [f"loss {self.loss:.4f}" if isinstance(self.loss, (int, float)) else "",
                 f"val {self.val_loss:.4f}" if isinstance(self.val_loss, (int, float)) else "",
                 f"{self.tokens_per_s:,.0f} tok/s" if isinstance(self.tokens_per_s, (int, float)) else ""]
        return " | ".join(p for p in parts if p)

    def line(self) -> str:
        total = self.total or "?"
        pct = f" ({100 * self.step / self.total:.0f}%)" if self.total else ""
        rest = self.fields()
        eta = self.eta()
        return (f"{self.label}: step {self.step}/{total}{pct}" + (f" | {rest}" if rest else "") +
                (f" | ETA {clock(eta)}" if math.isfinite(eta) else ""))


def _seconds(text: str | None) -> float:
    if not text:
        return 30.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"DTLAB_PROGRESS_SECONDS={text!r}: expected a number of seconds >= 0")
    return value


def _total_steps(run_dir: Path) -> int | None:
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    total = (info.get("training") or {}).get("total_steps") if isinstance(info, dict) else None
    return int(total) if isinstance(total, int) else None


class Console:
    """The command's terminal. `say` shows a line; `note` shows it only with `--verbose` (it goes to
    `output.log` otherwise); `capture(folder)` sends everything else printed from then on, this
    process's and its children's, to `folder/output.log`; `follow(run_dir)` shows a run's progress."""

    def __init__(self, verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                 live: bool | None = None, interval: float | None = None, stop_ray: bool = False) -> None:
        self.verbose, self.stop_ray = verbose, stop_ray
        self._out, self._err = out, err  # None: whatever sys.stdout / sys.stderr are when written to
        self.live = (not verbose and _isatty(self.err)) if live is None else live
        self.interval = interval if interval is not None else _seconds(os.environ.get("DTLAB_PROGRESS_SECONDS"))
        self._saved: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._watches: dict[str, Watch] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._progress = None  # rich's Progress while live lines are shown
        self._tasks: dict[str, Any] = {}
        self.header: Callable[[], str] | None = None  # a sweep's summary line

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    # ---- lines ------------------------------------------------------------------------------------
    def say(self, line: str, result: bool = False) -> None:
        """A line for the person at the terminal (to stdout when it is a result, else stderr)."""
        with self._lock:
            if self._progress is not None:
                self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                stream = self.out if result else self.err
                stream.write(line + "\n")
                stream.flush()
        if self._saved is not None:
            self._log(line)

    __call__ = say

    def note(self, line: str) -> None:
        """Detail: on the terminal with --verbose, in output.log otherwise."""
        if self.verbose:
            self.say(line)
        elif self._saved is not None:
            self._log(line)

    def _log(self, line: str) -> None:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass

    # ---- library output to a file -------------------------------------------------------------------
    def capture(self, folder: str | os.PathLike) -> None:
        """From now on, what anything else prints (file descriptors 1 and 2 included, so Ray's
        processes and forked children too) goes to `folder/output.log`. No-op with --verbose or
        when already capturing."""
        if self.verbose or self._saved is not None:
            return
        self._stop_live()  # a live display drawn on the terminal stream is redrawn on the kept one
        path = Path(folder) / LOG_NAME
        log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        log.write(f"---- dtlab {' '.join(sys.argv[1:])} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        saved: dict[str, Any] = {"stdout": sys.stdout, "stderr": sys.stderr, "log": log, "fds": {}}
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for name in ("out", "err"):  # our terminal streams keep pointing at the terminal
            stream, saved[f"own_{name}"] = getattr(self, name), getattr(self, f"_{name}")
            fd = _fileno(stream)
            if fd in (1, 2):
                stream.flush()
                stream = open(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                              errors="replace")
                saved[f"dup_{name}"] = stream
            setattr(self, f"_{name}", stream)
        for fd in (1, 2):
            try:
                saved["fds"][fd] = os.dup(fd)
                os.dup2(log.fileno(), fd)
            except OSError:
                saved["fds"].pop(fd, None)
        sys.stdout = sys.stderr = log
        self._saved = saved

    def release(self) -> None:
        """Undo `capture`: the process's output goes where it went before."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, dup in saved["fds"].items():
            os.dup2(dup, fd)
            os.close(dup)
        sys.stdout, sys.stderr = saved["stdout"], saved["stderr"]
        for name in ("out", "err"):
            if f"dup_{name}" in saved:
                saved[f"dup_{name}"].close()
            setattr(self, f"_{name}", saved[f"own_{name}"])
        saved["log"].close()

    # ---- progress ------------------------------------------------------------------------------------
    def follow(self, key: str, run_dir: str | os.PathLike, label: str | None = None,
               sinks: list[Callable[[dict[str, Any]], None]] | None = None) -> Watch:
        """Start showing the progress of the run in `run_dir` (its records as they are written)."""
        watch = Watch(Path(run_dir), label or Path(run_dir).name, sinks=list(sinks or []))
        with self._lock:
            self._watches[key] = watch
            if self.live:
                self._start_live()
                self._tasks[key] = self._progress.add_task(watch.label, total=None, fields="starting")
            else:
                self.say(f"{watch.label}: started ({watch.run_dir})")
                watch.last_line = time.monotonic()
        self._ensure_thread()
        return watch

    def unfollow(self, key: str, status: str | Callable[[Watch], str] = "finished") -> Watch | None:
        """Stop following a run: read its last records, then one closing line for it. `status` may be
        a function of the run's last state (a sweep's trial that ended early was stopped)."""
        with self._lock:
            watch = self._watches.pop(key, None)
        if watch is None:
            return None
        watch.poll()
        status = status(watch) if callable(status) else status
        watch.status = status
        elapsed = clock(time.monotonic() - watch.started)
        val = f" | val_loss {watch.val_loss:.4f}" if isinstance(watch.val_loss, (int, float)) else ""
        text = f"{watch.label}: {status} at step {watch.step}/{watch.total or '?'}{val} | {elapsed}"
        with self._lock:
            if self.live and key in self._tasks:
                self._progress.update(self._tasks.pop(key), total=watch.total or watch.step or 1,
                                      completed=watch.step, fields=f"{status}{val} | {elapsed}")
                if not self._watches and self.header is None:
                    self._stop_live()  # its last state stays on the screen; what follows prints below
            else:
                self.say(text)
        return watch

    @contextmanager
    def following(self, run_dir: str | os.PathLike, label: str | None = None,
                  sinks: list[Callable[[dict[str, Any]], None]] | None = None) -> Iterator[Watch]:
        key = str(run_dir)
        watch = self.follow(key, run_dir, label, sinks)
        status = "failed"
        try:
            yield watch
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self.unfollow(key, lambda w: "diverged" if status == "failed" and diverged_reason(w.run_dir) else status)

    def _start_live(self) -> None:
        if self._progress is not None:
            return
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        term = RichConsole(file=self.err, force_terminal=True)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                  TextColumn("{task.fields[fields]}"), console=term, refresh_per_second=4,
                                  redirect_stdout=False, redirect_stderr=False)
        self._progress.start()

    def _stop_live(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._tasks = None, {}

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="dtlab-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.tick()

    def tick(self) -> None:
        """Read every followed run's new records and update the display."""
        with self._lock:
            watches = list(self._watches.items())
        now = time.monotonic()
        for key, watch in watches:
            try:
                watch.poll()
            except OSError as err:  # a records file being replaced: read it next time
                self.note(f"progress of {watch.label}: {err}")
            while watch.errors:
                self.note(f"tracking of {watch.label} failed: {watch.errors.pop(0)}")
            with self._lock:
                if key not in self._watches:
                    continue
                if self.live and key in self._tasks:
                    eta = watch.eta()
                    rest = " | ".join(p for p in (watch.fields(), f"ETA {clock(eta)}" if math.isfinite(eta) else "")
                                      if p)
                    self._progress.update(self._tasks[key], total=watch.total, completed=watch.step, fields=rest)
                elif not self.live and now - watch.last_line >= self.interval and watch.step != watch.last_step:
                    watch.last_line, watch.last_step = now, watch.step
                    self.say(watch.line())
        if self.header is not None and self.live:
            with self._lock:
                self._start_live()
                if "__header__" not in self._tasks:
                    self._tasks["__header__"] = self._progress.add_task("", total=None, fields="")
                self._progress.update(self._tasks["__header__"], description=self.header(), fields="")

    def close(self) -> None:
        """Stop the display (its last state stays on the screen) and give the output back, whatever
        fails on the way."""
        try:
            self._close()
        finally:
            self.release()

    def end_display(self) -> None:
        """The live lines stop here (a sweep's header too): what follows prints below them."""
        with self._lock:
            if self._progress is not None and self.header is not None and "__header__" in self._tasks:
                self._progress.update(self._tasks["__header__"], description=self.header())
            self.header = None
            self._stop_live()

    def _close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for key in list(self._watches):  # a run nobody ended: finished, or it did not end on its own
                self.unfollow(key, lambda w: "finished" if w.total and w.step >= w.total else "interrupted")
            if self._progress is not None and self.header is not None and "__header__" in self._tasks:
                self._progress.update(self._tasks["__header__"], description=self.header())
            self._stop_live()
        if self.stop_ray and "ray" in sys.modules:  # while its goodbyes still go to output.log
            import ray

            if ray.is_initialized():
                ray.shutdown()


class ConsoleHandler(logging.Handler):
    """The `dtlab` log on the command's console: INFO and above as lines for the person (results to
    stdout), DEBUG as detail (the terminal with --verbose, output.log otherwise)."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.DEBUG)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
            if record.levelno >= logging.INFO:
                self.console.say(line, result=bool(getattr(record, "result", False)))
            else:
                self.console.note(line)
        except Exception:
            self.handleError(record)


_current: Console | None = None


def current() -> Console:
    """The command's console (a plain one, printing everything, where no command set one up)."""
    global _current
    if _current is None:
        _current = Console(verbose=True)
    return _current


@contextmanager
def console(verbose: bool = False, **kwargs: Any) -> Iterator[Console]:
    """Set up the command's console, with the `dtlab` log on it; restores the output (and the log's
    handlers) when the command ends."""
    global _current
    previous, _current = _current, Console(verbose=verbose, **kwargs)
    logger = logging.getLogger("dtlab")
    handler, level, propagate = ConsoleHandler(_current), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # once on the console, not again through the root logger
    try:
        yield _current
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        try:
            _current.close()
        finally:
            _current = previous
