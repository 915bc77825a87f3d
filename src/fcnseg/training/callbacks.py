"""Callbacks: user code the trainer calls after every optimiser step and after every epoch."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from fcnseg.training.state import RunState
from fcnseg.training.step import StepResult


class Callback:
    """Base class of training callbacks: override the hooks you need; the others do nothing.

    Both hooks run on every rank of a distributed run. They receive the live `RunState`: read it,
    do not change it. An exception a hook raises stops the run there; ``last.pt`` stays resumable.
    """

    def on_step_end(self, state: RunState, result: StepResult) -> None:
        """After each optimiser step (and its periodic checkpoint, if one was due).

        Args:
            state: the run state, ``global_step`` already counting this step.
            result: this step's mean loss and number of images (this rank's).
        """

    def on_epoch_end(self, state: RunState, record: dict[str, Any]) -> None:
        """After each epoch, once its checkpoint is written.

        Args:
            state: the run state, ``epoch`` already counting this epoch.
            record: a copy of the line appended to metrics.jsonl: epoch, iteration, train_loss, lr,
                time_s and, on evaluation epochs, val_loss, miou and the other metrics.
        """


class EpochEndFunction(Callback):
    """Adapts a plain ``function(record)``, the ``on_epoch_end=`` keyword of `fcnseg.training.train`."""

    def __init__(self, function: Callable[[dict[str, Any]], None]) -> None:
        self.function = function

    def on_epoch_end(self, state: RunState, record: dict[str, Any]) -> None:
        self.function(record)


class CallbackList:
    """Calls each hook of several callbacks in order; objects may define only some hooks."""

    def __init__(self, callbacks: Iterable[Any]) -> None:
        self.callbacks = list(callbacks)

    def on_step_end(self, state: RunState, result: StepResult) -> None:
        for callback in self.callbacks:
            if hasattr(callback, "on_step_end"):
                callback.on_step_end(state, result)

    def on_epoch_end(self, state: RunState, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            if hasattr(callback, "on_epoch_end"):
                callback.on_epoch_end(state, dict(record))  # a copy each: one callback cannot alter another's
