"""Errors the CLI turns into one line on stderr and an exit code (never a traceback)."""

from __future__ import annotations


class ProbeError(Exception):
    """A failure caused by the input (checkpoint, data, output folder): exit code 1."""

    exit_code = 1


class UsageError(ProbeError):
    """Impossible or conflicting options: exit code 2."""

    exit_code = 2
