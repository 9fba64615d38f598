"""Logging for rule scripts: to the rule's log file and the console, with clear error endings."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

log = logging.getLogger("eagleflow")
# How a job cancelled by SIGTERM starts its last log line (scripts/tools/failed_slides.py reads it).
STOPPED_PREFIX = "stopped by "


def setup_logging(log_path: str | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, if given, to `log_path` (Snakemake's `log:` file for the job)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)


class Terminated(BaseException):
    """SIGTERM arrived (Snakemake cancelling, a cluster time limit): unwind so cleanups run."""


_HANDLER_PID: list[int] = []


def _raise_terminated(signum: int, frame: object) -> None:
    if os.getpid() not in _HANDLER_PID:  # a forked worker (e.g. a DataLoader's): die as usual
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated(signal.Signals(signum).name)


def _fail(message: str) -> NoReturn:
    log.error(message)
    logging.shutdown()
    sys.exit(1)


def run_rule(log_path: str | None, func: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run a rule's function with logging; errors that explain themselves end without a traceback."""
    from eagleflow.errors import EagleflowError

    setup_logging(log_path)
    if threading.current_thread() is threading.main_thread():
        # Python's default SIGTERM action ends the process at once: temporaries stay behind.
        _HANDLER_PID[:] = [os.getpid()]
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return func(**kwargs)
    except EagleflowError as err:
        _fail(str(err))
    except Terminated as stop:
        log.error(
            "%s%s; outputs not finished were removed. Rerun the workflow to redo this job.",
            STOPPED_PREFIX,
            stop,
        )
        logging.shutdown()
        sys.exit(128 + signal.SIGTERM)
    except Exception:
        log.exception("unexpected error in %s", getattr(func, "__name__", func))
        logging.shutdown()
        raise
