"""Errors the CLI turns into one line on stderr and an exit code (never a traceback)."""

from __future__ import annotations


class ProbeError(Exception):
    """A failure caused by the input (checkpoint, data, output folder): exit code 1."""

    exit_code = 1


class UsageError(ProbeError):
    """Impossible or conflicting options: exit code 2."""

    exit_code = 2


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM arrived: one line on stderr, exit 128 + the signal number, no report.

    A BaseException, like KeyboardInterrupt, so that `except Exception` never swallows it; raised by the
    handlers that `outlier_probe.interrupts.install` sets before anything heavy is imported.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        self.message = "terminated" if signum == signal.SIGTERM else "interrupted"
        super().__init__(self.message)
