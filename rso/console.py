"""What a user's console shows: one line per stage from this project, progress bars, warnings
and errors; the INFO chatter of third-party libraries (Beam's type-hint notes, vLLM's engine
set-up, one transformers or vLLM line per weight tensor) only with ``--verbose``.

Call :func:`configure` once, first thing in a command, before vLLM is imported (vLLM reads its
log level from ``VLLM_LOGGING_LEVEL`` when it is first imported).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from collections.abc import Iterator

OUR_LOGGERS = ("rso", "rso_cli", "beam_pipelines", "trainer", "deploy")
# Libraries that log at INFO (or warn once per weight) during normal operation.
CHATTY_LOGGERS = ("py.warnings", "apache_beam", "vllm", "transformers", "torch", "urllib3",
                  "absl", "filelock", "datasets", "huggingface_hub", "google", "gcsfs", "fsspec",
                  "numba", "jax", "tensorflow", "matplotlib", "PIL", "asyncio")
# The command whose lines the pipeline's shared code logs: rso generate, or rso select running
# the same stages on a candidate store.
_COMMAND = contextvars.ContextVar("rso_command", default="rso.generate")


def command_log() -> logging.Logger:
    """The logger of the running command (``rso.generate`` unless :func:`command` says
    otherwise): code shared by several commands logs through it."""
    return logging.getLogger(_COMMAND.get())


@contextlib.contextmanager
def command(name: str) -> Iterator[None]:
    """Within the block, :func:`command_log` is ``logging.getLogger(name)``."""
    token = _COMMAND.set(name)
    try:
        yield
    finally:
        _COMMAND.reset(token)


FORMAT = "%(asctime)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``timeout``, ``kill``), raised in the main thread by
    :func:`raise_on_sigterm`'s handler so that it unwinds like Ctrl-C: every ``finally`` runs
    (a staged output discarded, the output's lock released). Its text starts with
    ``KeyboardInterrupt`` so that Beam's re-raise of it reads as an interruption too."""

    def __init__(self) -> None:
        super().__init__("KeyboardInterrupt (SIGTERM)")


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread, unless the process
    already handles SIGTERM (an embedding program's handler is kept) or this is not the main
    thread. The trainers replace it with their own while they train (save a checkpoint and
    stop: :func:`trainer.checkpoint.run_preemptible`)."""
    import signal
    import threading

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, handler)


def interrupted(error: BaseException | None) -> bool:
    """Whether ``error`` is Ctrl-C or SIGTERM: a KeyboardInterrupt (:class:`Terminated`
    included), or an error raised because of one (Beam's runner re-raises it as
    ``RuntimeError: KeyboardInterrupt [while running 'Stage']`` while handling it, and logs
    that at ERROR with its traceback)."""
    return _interruption(error) is not None


def terminated(error: BaseException | None) -> bool:
    """Whether the interruption ``error`` (:func:`interrupted`) was SIGTERM."""
    found = _interruption(error)
    return found is not None and "SIGTERM" in str(found)


def _interruption(error: BaseException | None) -> BaseException | None:
    seen: set[int] = set()
    e = error
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt) or str(e).startswith("KeyboardInterrupt"):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _not_an_interruption(record: logging.LogRecord) -> bool:
    """Handler filter: a library's log of Ctrl-C with its traceback is dropped (the `rso`
    command says ``interrupted`` in one line instead)."""
    return not (record.exc_info and interrupted(record.exc_info[1]))


class TqdmHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: a log line printed while a
    progress bar is open lands above the bar, which is then redrawn, instead of inside it
    (tqdm's documented way to print beside bars; it writes plainly when no bar is open)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def configure(verbose: bool = False) -> None:
    """Logging for a command line run: our loggers at INFO, the root at WARNING (or INFO
    everywhere with ``verbose``); third-party loggers at ERROR unless ``verbose``.

    Environment defaults (``setdefault``: a user's own setting wins): ``VLLM_LOGGING_LEVEL``,
    ``TRANSFORMERS_VERBOSITY`` and ``TRANSFORMERS_NO_ADVISORY_WARNINGS`` quiet those libraries in
    subprocesses and Beam workers too.
    """
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10 warnings (NUMA binding...)
        # torch's Python loggers carry their own handler, set up at import from TORCH_LOGS (so
        # in vLLM's engine process too): "-all" = the "torch" logger at ERROR ("Triton not
        # available"). Never "": torch 2.x fails to import with an empty TORCH_LOGS.
        os.environ.setdefault("TORCH_LOGS", "-all")
    # Python warnings (FutureWarning, DeprecationWarning from libraries) go through logging, to
    # the "py.warnings" logger: shown with --verbose, hidden otherwise.
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not root.handlers:
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        handler.addFilter(_not_an_interruption)
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        try:  # transformers' own verbosity and its per-call progress bars (weight loading)
            import transformers.utils.logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


@contextlib.contextmanager
def details_hidden(hidden: bool, loggers: tuple[str, ...] = ("rso.generate", "rso.select")
                   ) -> Iterator[None]:
    """Within the block, the INFO lines of the pipeline commands that a command runs inside
    itself (`rso demo`, `rso evaluate`: each nested run's Beam counters, counts and per-stage
    cost table, a dozen lines per run, all in the run's ``manifest.json`` and in ``rso
    inspect``) are hidden when ``hidden``; their warnings and errors, and the per-batch
    decoding lines, are not."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    if hidden:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def help_text(doc: str | None) -> str:
    """A module docstring as a command's ``--help`` shows it: Sphinx cross-references
    (``:func:`~a.b.c```) as their names (``c``; the whole path without ``~``) and ````literals````
    in single backticks, as the README writes them; a line's closing ``::`` as ``:``."""
    text = re.sub(r":[a-z]+:`(~?)([^`]+)`",
                  lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", doc or "")
    return re.sub(r"::$", ":", text.replace("``", "`"), flags=re.M)  # "::" opens an RST block


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 candidate"``, ``"16 candidates"``: ``n`` and the noun in its number (``plural``
    when adding ``s`` is wrong)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


class ProgressBar:
    """A progress bar over ``total`` units (None: unknown) on a terminal, tqdm's; anywhere else
    (stderr redirected to a file, CI, a parent process's pipe) the same text as a log line on
    ``logger`` at most every ``every_s`` seconds and once at the end, e.g. ``train:  16% 5/32
    [00:40<03:36, 0.12step/s, loss=0.6931]``. tqdm redraws its bar with ``\\r`` frames, which a
    log file keeps as one long line with the log lines written meanwhile inside it; tqdm's own
    ``disable=None`` (off when not a TTY) would leave a redirected run with no progress at all.
    The text is tqdm's (its ``format_meter``, ``ncols=0``: no bar glyphs), so both show the
    same rate and time left. ``enabled=False``: nothing at all (``--no-progress``)."""

    def __init__(self, total: int | None, *, desc: str, unit: str, initial: int = 0,
                 enabled: bool = True, every_s: float = 60.0,
                 logger: logging.Logger | None = None):
        import sys
        import time

        from tqdm.auto import tqdm

        self._clock = time.monotonic
        self._lines = enabled and not sys.stderr.isatty()
        self._devnull = open(os.devnull, "w") if self._lines else None
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                         disable=not enabled, dynamic_ncols=not self._lines,
                         **({"file": self._devnull, "ncols": 0} if self._lines else {}))
        self._every_s, self._log = every_s, logger or logging.getLogger("rso.progress")
        self._logged_at, self._logged_n = self._clock(), initial

    def set_postfix(self, **values: str) -> None:
        """Values shown after the rate (e.g. ``loss="0.6931"``), from the next refresh."""
        self._bar.set_postfix(refresh=False, **values)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        if self._lines and self._clock() - self._logged_at >= self._every_s:
            self._write()

    def _write(self) -> None:
        self._log.info("%s", str(self._bar))  # now: a record is formatted when emitted
        self._logged_at, self._logged_n = self._clock(), self._bar.n

    def close(self) -> None:
        if self._lines and self._bar.n != self._logged_n:
            self._write()  # where it ended
        self._bar.close()
        if self._devnull is not None:
            self._devnull.close()
