"""Logging for rule scripts: to the rule's log file and the console, with clear error endings."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

log = logging.getLogger("eagleflow")


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


def _fail(message: str) -> NoReturn:
    log.error(message)
    logging.shutdown()
    sys.exit(1)


def run_rule(log_path: str | None, func: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run a rule's function with logging; errors that explain themselves end without a traceback."""
    from eagleflow.errors import EagleflowError

    setup_logging(log_path)
    try:
        return func(**kwargs)
    except EagleflowError as err:
        _fail(str(err))
    except Exception:
        log.exception("unexpected error in %s", getattr(func, "__name__", func))
        logging.shutdown()
        raise
