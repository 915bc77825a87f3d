"""Exceptions that carry a message meant for the user.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class FcnsegError(Exception):
    """An error caused by input, files or environment, with a message that says how to fix it."""


class DataError(FcnsegError, ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class CheckpointError(FcnsegError, ValueError):
    """A checkpoint is truncated, foreign or does not match the model."""


class WeightsError(FcnsegError, RuntimeError):
    """Pretrained weights cannot be found, downloaded or loaded."""


class OptionError(FcnsegError, ValueError):
    """An option value is malformed (a ValueError too, so argparse reports it as a usage error)."""
