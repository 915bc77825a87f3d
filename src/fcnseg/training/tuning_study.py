"""What a tuning search varies, and the bookkeeping of its Optuna study on disk.

`SearchSpace` says which training settings a search draws and from where. The study lives in
``OUT/study.db`` (SQLite); a search that is run again continues it, so the study records its
search space and trial settings (a search with others is refused), marks trials that a killed
process left running as failed, and groups the attempts of a resumed trial into one lineage that
shares a run folder (``OUT/trial_NNN``). `fcnseg.training.tuning` runs the trials.

Optuna is imported by the caller (it is optional); the functions here take its module or its
``TrialState`` enum as arguments.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcnseg.errors import UsageError
from fcnseg.training.config import CHOICES, TrainConfig

STUDY_NAME = "fcnseg-tune"
SEARCHED = ("lr", "weight_decay", "batch_size", "crop", "schedule")
# Fields that do not change what a trial computes: a resumed study may differ in these.
_IGNORED_ON_RESUME = {"out", "resume", "workers", "device", "checkpoint_every", "save_every", "extra"}


@dataclass
class SearchSpace:
    """What a search varies; a field set to None is not searched (the base config's value is used).

    Attributes:
        lr: (low, high) of the log-uniform learning-rate range.
        weight_decay: (low, high) of the log-uniform weight-decay range.
        batch_size: batch sizes to choose from.
        crop: training crops (height, width) to choose from.
        schedule: learning-rate schedules to choose from ("constant", "poly", "cosine").
    """

    lr: tuple[float, float] | None = (1e-3, 1e-1)
    weight_decay: tuple[float, float] | None = (1e-5, 1e-3)
    batch_size: tuple[int, ...] | None = (4, 8, 16)
    crop: tuple[tuple[int, int], ...] | None = ((256, 352), (320, 480))
    schedule: tuple[str, ...] | None = ("poly", "cosine")

    def validate(self) -> None:
        """Raises UsageError for an empty or impossible range or choice, before any trial runs."""
        for name in ("lr", "weight_decay"):
            bounds = getattr(self, name)
            if bounds is not None and not (len(bounds) == 2 and 0 < bounds[0] < bounds[1]):
                raise UsageError(f"the {name} range must be LOW HIGH with 0 < LOW < HIGH, got {bounds}")
        if self.batch_size is not None and (not self.batch_size or min(self.batch_size) < 1):
            raise UsageError(f"batch sizes must be positive, got {self.batch_size}")
        if self.crop is not None and (not self.crop or min(min(c) for c in self.crop) < 1):
            raise UsageError(f"crops must be positive HxW sizes, got {self.crop}")
        if self.schedule is not None:
            unknown = [s for s in self.schedule if s not in CHOICES["schedule"]]
            if unknown or not self.schedule:
                raise UsageError(f"schedules must be among {', '.join(CHOICES['schedule'])}, got {self.schedule}")

    def searched(self) -> list[str]:
        """The names of the searched fields, in `SEARCHED` order."""
        return [name for name in SEARCHED if getattr(self, name) is not None]

    def describe(self) -> dict[str, Any]:
        """A JSON-able description, stored with the study so that a resumed search can be checked."""
        out: dict[str, Any] = {}
        for name in self.searched():
            value = getattr(self, name)
            if name in ("lr", "weight_decay"):
                out[name] = {"log_uniform": [float(v) for v in value]}
            elif name == "crop":
                out[name] = {"choices": [crop_text(c) for c in value]}
            else:
                out[name] = {"choices": list(value)}
        return out

    def suggest(self, trial) -> dict[str, Any]:
        """Draws one recipe from an Optuna trial: TrainConfig field values."""
        params: dict[str, Any] = {}
        if self.lr is not None:
            params["lr"] = trial.suggest_float("lr", *self.lr, log=True)
        if self.weight_decay is not None:
            params["weight_decay"] = trial.suggest_float("weight_decay", *self.weight_decay, log=True)
        if self.batch_size is not None:
            params["batch_size"] = trial.suggest_categorical("batch_size", list(self.batch_size))
        if self.crop is not None:
            # Categorical choices must be plain scalars: crops travel as "HxW" text.
            params["crop"] = parse_crop(trial.suggest_categorical("crop", [crop_text(c) for c in self.crop]))
        if self.schedule is not None:
            params["schedule"] = trial.suggest_categorical("schedule", list(self.schedule))
        return params


def open_study(optuna, study_path: Path, space: SearchSpace, trial_base: TrainConfig, *, seed: int,
               startup_trials: int, pruning: bool):
    """Creates or continues the study in ``study_path``, checked against this search's settings.

    The caller holds the folder's lock (`fcnseg.training.run_dir.prepare_study_folder`), so trials still
    marked running were cut short
    and are marked failed (`interrupted_lineages` then finds them).
    """
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_path.resolve()}")
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True)
    _check_same_search(study, space, trial_base)
    # Seeded by how many trials exist, so that a resumed search does not replay its first draws.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=startup_trials)
    study.pruner = (optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=1)
                    if pruning else optuna.pruners.NopPruner())
    _fail_stale_trials(study, storage, optuna.trial.TrialState)
    return study


def trial_dir_name(number: int) -> str:
    """The run folder of a trial lineage: ``trial_NNN``."""
    return f"trial_{number:03d}"


def lineage_root(trial) -> int:
    """The trial a retried trial continues (its run folder's number)."""
    return int(trial.user_attrs.get("resume_of", trial.number))


def crop_text(crop: tuple[int, int]) -> str:
    """A crop as the "HxW" text Optuna's categorical choices store."""
    return f"{int(crop[0])}x{int(crop[1])}"


def parse_crop(text: str) -> tuple[int, int]:
    """Inverse of `crop_text`."""
    height, width = str(text).split("x")
    return int(height), int(width)


def config_params(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's stored params as TrainConfig field values (crops back to tuples)."""
    return {k: parse_crop(v) if k == "crop" else v for k, v in params.items()}


def param_text(value: Any) -> str:
    """A param value for log lines: floats to three significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _comparable(config: TrainConfig, space: SearchSpace) -> dict[str, Any]:
    """The trial settings that must match for a study to continue: all but the searched and ignored ones."""
    ignored = _IGNORED_ON_RESUME | set(space.searched())
    return {k: v for k, v in config.to_plain_dict().items() if k not in ignored}


def _check_same_search(study, space: SearchSpace, trial_base: TrainConfig) -> None:
    """Stores the search's settings in a new study; refuses to continue one made with other settings."""
    settings = {"search_space": space.describe(), "trial_config": _comparable(trial_base, space)}
    settings = json.loads(json.dumps(settings))  # the JSON round trip the storage applies
    stored = {k: study.user_attrs.get(k) for k in settings}
    if all(v is None for v in stored.values()) and not study.trials:
        for key, value in settings.items():
            study.set_user_attr(key, value)
        return
    differences = []
    for key, value in settings.items():
        old = stored[key] or {}
        for name in sorted(set(old) | set(value)):
            if old.get(name) != value.get(name):
                differences.append(f"{name}: {old.get(name)!r} before, {value.get(name)!r} now")
    if differences:
        raise UsageError("this study was made with other settings (" + "; ".join(differences[:6]) +
                          "); replace it with --overwrite, or use another --out to start a new search")


def _fail_stale_trials(study, storage, TrialState) -> None:
    """Marks trials still running as failed: a killed process or a power loss left them so."""
    # We hold the folder's lock, so a trial still marked running was cut short (killed, power loss).
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def _lineages(study) -> dict[int, list]:
    """The study's trials grouped by the run folder they train in (a resumed trial joins its root's)."""
    lineages: dict[int, list] = {}
    for trial in study.get_trials(deepcopy=False):
        lineages.setdefault(lineage_root(trial), []).append(trial)
    return lineages


def interrupted_lineages(study, TrialState) -> list[tuple[int, dict[str, Any]]]:
    """(run number, params) of every trial whose latest attempt was interrupted (killed, Ctrl-C),
    not failed by its own error; queued ones are not repeated."""
    pending = []
    for root, attempts in sorted(_lineages(study).items()):
        latest = max(attempts, key=lambda t: t.number)
        if latest.state == TrialState.FAIL and "error" not in latest.user_attrs:
            pending.append((root, dict(latest.params)))
    return pending


def finished_lineages(study, TrialState) -> int:
    """Trials that ran to an end: complete, pruned, or failed by an error of their recipe."""
    def ended(trial) -> bool:
        return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
            trial.state == TrialState.FAIL and "error" in trial.user_attrs)

    return sum(any(ended(t) for t in attempts) for attempts in _lineages(study).values())


def trial_record(trial) -> dict[str, Any]:
    """One trial as ``trials.json`` lists it: state, mIoU, params, timing and what went wrong."""
    attrs = trial.user_attrs
    value = trial.value  # None unless complete; a pruned trial keeps its last reported mIoU below
    last_reported = None
    if trial.intermediate_values:
        step = max(trial.intermediate_values)
        last_reported = {"epoch": step, "miou": trial.intermediate_values[step]}
    return {
        "number": trial.number,
        "run": trial_dir_name(lineage_root(trial)),
        "state": trial.state.name.lower(),
        "miou": None if value is None or math.isnan(value) else float(value),
        "params": dict(trial.params),
        "pixel_acc": attrs.get("pixel_acc"),
        "train_seconds": attrs.get("train_seconds"),
        "last_reported": last_reported,
        "resume_of": attrs.get("resume_of"),
        "diverged": attrs.get("diverged"),
        "error": attrs.get("error"),
        "pruned_at_epoch": attrs.get("pruned_at_epoch"),
    }


__all__ = [
    "SEARCHED", "STUDY_NAME", "SearchSpace", "config_params", "crop_text", "finished_lineages",
    "interrupted_lineages", "lineage_root", "open_study", "param_text", "parse_crop", "trial_dir_name", "trial_record",
]
