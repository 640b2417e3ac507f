"""What libraries print about a failed save that heft reports itself, in one line.

When a save fails (a full disk, say), orbax raises the error in the thread that waits for the save,
where heft turns it into one line; but on the way the libraries print echoes of it, each with a
traceback, at moments heft does not choose (some at exit):
- orbax logs the failure from each of its background threads (three tracebacks);
- orbax closes its event loop while tensorstore writes are still pending, and tensorstore reports each
  one that completes later as an unraisable "Event loop is closed";
- the other parallel writes that failed are garbage-collected unretrieved, and asyncio logs "Task
  exception was never retrieved" for each.
`failed_save_echoes()` drops exactly these; everything else still prints. Savers call it
(train/checkpoint/) so that every verb that writes a checkpoint is covered.
"""

import logging
import sys

from heft.data import paths


class _OrbaxErrorsRaisedAnyway(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class _OrphanedNoSpace(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and "never retrieved" in str(record.msg) and paths.no_space(error))


def _closed_loops_dropped(default_hook):
    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        default_hook(unraisable)

    hook.heft_quiet = True
    return hook


_orbax, _orphaned = _OrbaxErrorsRaisedAnyway(), _OrphanedNoSpace()


def failed_save_echoes() -> None:
    """Installs the three filters (idempotent)."""
    for logger, f in ((logging.getLogger("absl"), _orbax), (logging.getLogger("asyncio"), _orphaned)):
        if f not in logger.filters:
            logger.addFilter(f)
    if not getattr(sys.unraisablehook, "heft_quiet", False):
        sys.unraisablehook = _closed_loops_dropped(sys.unraisablehook)
