"""``--log-file``: a job's log appended to a file, with the library's warnings and how the job ended.

:func:`job_log` wraps a job; :func:`logged` makes the job's ``echo`` write its lines there too (the
console keeps them as they were); ``job_logger.info`` logs a line to the file only.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import time
from pathlib import Path

from fedlora_ext.data.quantized import LIBRARY_LOGGERS
from fedlora_ext.errors import RunError

LOG_FILE = "run.log"  # the name run_folder.py knows: a log inside the run folder goes with the run (--overwrite)
# the job's own lines (what it prints): to the log file only, the console has them from echo
job_logger = logging.getLogger("fedlora_ext.job")
job_logger.setLevel(logging.INFO)
job_logger.propagate = False


class LogFormatter(logging.Formatter):
    """Every line of a record stamped, ``2025-06-01 12:00:03.125 WARNING fedlora_ext.simulation: round 1: ...``;
    the job's own lines without the logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.created))}.{int(record.msecs):03d}"
        who = "" if record.name == job_logger.name else f"{record.name}: "
        return "\n".join(f"{stamp} {record.levelname:<7} {who}{line}" for line in text.splitlines() or [""])


@contextlib.contextmanager
def job_log(path: str | Path | None, *, run_folder: str | Path | None = None):
    """With a ``path``: the job's log appended there while the block runs, then the handler removed.
    It holds what the job prints (``echo`` wrapped by :func:`logged`), the warnings of the library's
    loggers (``fedlora_ext.*``: failed clients, rejected updates, budget refusals; bitsandbytes') and, when the block
    raises, the error (a traceback for an unexpected one) or the interruption. A relative ``path`` is
    relative to the cwd; its folder must exist, or be ``run_folder`` (the job creates it). The file is
    opened at the first line (after the job has claimed its folder, so ``--overwrite`` of a run folder
    holding ``run.log`` starts the log afresh) and reopened if removed. The console is unchanged."""
    if path is None:
        yield
        return
    given, path = Path(path), Path(path).absolute()
    if path.is_dir():
        raise ValueError(f"--log-file {given} is a folder; give a file, e.g. {given / LOG_FILE}")
    if not path.parent.is_dir() and not (run_folder is not None and path.parent == Path(run_folder).absolute()):
        raise ValueError(f"--log-file {given}: no folder {given.parent} (create it first, or log into the run "
                         "folder: --log-file RUN_DIR/run.log)")
    handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(LogFormatter())
    library = logging.getLogger("fedlora_ext")
    # the clients' own log (training loss and steps, which a private client never sends): the file only
    clients = logging.getLogger("fedlora_ext.client")
    added = [(library, handler), (job_logger, handler), (library, _LastResort(handler)), (clients, handler)]
    # the quantisation stack's warnings (kept off the console by fedlora_ext.data.quantized) go to the file
    added += [(logging.getLogger(name), handler) for name in LIBRARY_LOGGERS]
    for logger, each in added:
        logger.addHandler(each)
    before = clients.level, clients.propagate
    clients.setLevel(logging.INFO)
    clients.propagate = False
    try:
        yield
    except BaseException as error:
        if path.parent.is_dir():  # else the job failed before creating the run folder it logs into
            _log_end(error)
        raise
    finally:
        for logger, each in added:
            logger.removeHandler(each)
        clients.setLevel(before[0])
        clients.propagate = before[1]
        handler.close()


class _LastResort(logging.Handler):
    """What ``logging.lastResort`` does without our file handler: a library warning that no other handler
    takes (none configured; opacus, once imported, adds one to the root) still reaches stderr as before."""

    def __init__(self, ours: logging.Handler) -> None:
        super().__init__(logging.WARNING)
        self.ours = (ours, self)

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        while logger is not None:
            if any(h not in self.ours for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        if logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


def _log_end(error: BaseException) -> None:
    if isinstance(error, KeyboardInterrupt):
        job_logger.warning(f"fedlora: {getattr(error, 'message', 'interrupted')}")
        return
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    expected = isinstance(error, (ValueError, FileNotFoundError, KeyError, OSError, RunError))  # the CLI's one line
    job_logger.error(f"fedlora: error: {message}", exc_info=None if expected else error)


def logged(echo):
    """``echo`` that also sends each of its lines to the log (:func:`job_log`; nowhere without one)."""
    if getattr(echo, "logs", False):
        return echo

    def echo_and_log(text="") -> None:
        echo(text)
        job_logger.info(str(text))

    echo_and_log.logs = True
    return echo_and_log
