"""Exceptions that carry a message meant for the user, and the exit status the CLI gives each.

The CLI prints these without a traceback and exits with the error's `exit_status`; anything else is a
bug and keeps its traceback. Two kinds, because they call for different fixes:

- a usage error (`UsageError`, `OptionError`): what was typed is wrong (an option value, a path
  that does not exist or is the wrong kind, a config file's contents); fixing the command line
  fixes it. Exit status 2, as argparse gives its own usage errors.
- any other `FcnsegError`: a failure at run time (a corrupt image found while training, a diverged
  loss, a checkpoint whose content cannot be read). Exit status 1.

Ctrl-C exits 130 (128 + SIGINT), as shells report it; a closed output pipe (``fcnseg info | head``)
ends the command quietly with 141 (128 + SIGPIPE), as a process killed by that signal reports.
"""
from __future__ import annotations

USAGE_EXIT_STATUS = 2
FAILURE_EXIT_STATUS = 1
INTERRUPTED_EXIT_STATUS = 130
BROKEN_PIPE_EXIT_STATUS = 141


class FcnsegError(Exception):
    """An error caused by input, files or environment, with a message that says how to fix it."""

    exit_status: int = FAILURE_EXIT_STATUS


class UsageError(FcnsegError, ValueError):
    """What was typed is wrong: an option, a path given, a config file's contents (exit status 2)."""

    exit_status = USAGE_EXIT_STATUS


class DataError(FcnsegError, ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class CheckpointError(FcnsegError, ValueError):
    """A checkpoint is truncated, foreign or does not match the model."""


class WeightsError(FcnsegError, RuntimeError):
    """Pretrained weights cannot be found, downloaded or loaded."""


class OptionError(UsageError):
    """An option value is malformed (a ValueError too, so argparse reports it as a usage error)."""
