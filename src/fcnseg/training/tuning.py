"""A small, budgeted search over training recipes with Optuna, stored on disk and resumable.

Each trial is one `fcnseg.training.trainer.train` run into ``OUT/trial_NNN`` with the learning rate, weight
decay, batch size, crop size and schedule its sampler (TPE, seeded) picked; the objective is the
final validation mIoU. The study lives in ``OUT/study.db`` (SQLite): running the same search again
continues it, resuming an interrupted trial from its ``last.pt``. At the end ``OUT/best.yaml`` holds
the best recipe as a config file for ``fcnseg train --config``, and ``OUT/trials.json`` every trial.

Optuna is an optional dependency (``pip install 'fcnseg[tune]'``), imported only when a search runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from fcnseg.errors import CheckpointError, DataError, FcnsegError, WeightsError
from fcnseg.training.config import CHOICES, TrainConfig

STUDY_NAME = "fcnseg-tune"
INSTALL_HINT = "pip install 'fcnseg[tune]'"
SEARCHED = ("lr", "weight_decay", "batch_size", "crop", "schedule")
# Fields that do not change what a trial computes: a resumed study may differ in these.
_IGNORED_ON_RESUME = {"out", "resume", "workers", "device", "checkpoint_every", "save_every", "extra"}


def import_optuna():
    """Returns the optuna module, or raises a FcnsegError that says how to install it."""
    try:
        import optuna
    except ImportError:
        raise FcnsegError(f"fcnseg tune needs Optuna, which is not installed: {INSTALL_HINT}") from None
    return optuna


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
        for name in ("lr", "weight_decay"):
            bounds = getattr(self, name)
            if bounds is not None and not (len(bounds) == 2 and 0 < bounds[0] < bounds[1]):
                raise FcnsegError(f"the {name} range must be LOW HIGH with 0 < LOW < HIGH, got {bounds}")
        if self.batch_size is not None and (not self.batch_size or min(self.batch_size) < 1):
            raise FcnsegError(f"batch sizes must be positive, got {self.batch_size}")
        if self.crop is not None and (not self.crop or min(min(c) for c in self.crop) < 1):
            raise FcnsegError(f"crops must be positive HxW sizes, got {self.crop}")
        if self.schedule is not None:
            unknown = [s for s in self.schedule if s not in CHOICES["schedule"]]
            if unknown or not self.schedule:
                raise FcnsegError(f"schedules must be among {', '.join(CHOICES['schedule'])}, got {self.schedule}")

    def searched(self) -> list[str]:
        return [name for name in SEARCHED if getattr(self, name) is not None]

    def describe(self) -> dict[str, Any]:
        """A JSON-able description, stored with the study so that a resumed search can be checked."""
        out: dict[str, Any] = {}
        for name in self.searched():
            value = getattr(self, name)
            if name in ("lr", "weight_decay"):
                out[name] = {"log_uniform": [float(v) for v in value]}
            elif name == "crop":
                out[name] = {"choices": [_crop_text(c) for c in value]}
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
            params["crop"] = _parse_crop(trial.suggest_categorical("crop", [_crop_text(c) for c in self.crop]))
        if self.schedule is not None:
            params["schedule"] = trial.suggest_categorical("schedule", list(self.schedule))
        return params


@dataclass
class TuneResult:
    """Where a search wrote its outputs and what it found (best_* are None without a finished trial)."""

    out_dir: Path
    study_path: Path
    finished_trials: int
    trials: list[dict[str, Any]]
    best_number: int | None
    best_miou: float | None
    best_params: dict[str, Any] | None
    best_yaml: Path | None


def tune(
    base: TrainConfig,
    out_dir: str | Path,
    *,
    trials: int,
    space: SearchSpace | None = None,
    timeout_minutes: float | None = None,
    iterations_per_trial: int | None = None,
    epochs_per_trial: int | None = None,
    pruning: bool = True,
    startup_trials: int = 5,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Runs or continues a search until the study holds ``trials`` finished trials.

    Args:
        base: the settings every trial starts from (dataset, model, ...); the searched fields are
            overwritten per trial, and its epochs/iterations are what ``best.yaml`` trains for.
        out_dir: holds study.db, trial_NNN/ run folders, trials.json and best.yaml.
        trials: total trials wanted that ran to an end (complete, pruned, or failed by an error of
            their recipe such as running out of memory), counting earlier runs of the search;
            interrupted trials are resumed and do not count until they end.
        space: what to vary (default: `SearchSpace()`).
        timeout_minutes: start no new trial after this long.
        iterations_per_trial: each trial's budget in optimiser steps (overrides base epochs/iterations).
        epochs_per_trial: each trial's budget in epochs, i.e. images seen (an alternative to iterations).
        pruning: stop a trial whose per-epoch mIoU is below the median of earlier trials at that epoch
            (Optuna's MedianPruner; not on the first epoch nor before ``startup_trials`` trials finished).
        startup_trials: random trials before TPE starts modelling (and before pruning starts).
        progress: show each trial's training progress bar.
        log: where progress lines go.

    Raises:
        FcnsegError: Optuna missing, another search running in ``out_dir``, a study there made with
            other settings, missing data or weights. A trial whose recipe raises another error (a
            batch larger than the data, out of memory, ...) is recorded as failed and the search goes
            on; a diverged trial scores mIoU 0.
    """
    optuna = import_optuna()
    from optuna.trial import TrialState

    space = space or SearchSpace()
    space.validate()
    if trials < 1:
        raise FcnsegError("--trials must be at least 1")
    if iterations_per_trial is not None and epochs_per_trial is not None:
        raise FcnsegError("give a trial budget in iterations or in epochs, not both")
    trial_base = dataclasses.replace(base, resume=False)
    if iterations_per_trial is not None:
        trial_base.iterations = iterations_per_trial
    if epochs_per_trial is not None:
        trial_base.epochs, trial_base.iterations = epochs_per_trial, None
    if (trial_base.iterations or trial_base.epochs) < 1:
        raise FcnsegError("the trial budget must be at least one iteration or epoch")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_path = out_dir / "study.db"
    with _exclusive_lock(out_dir / "tune.lock"):
        storage = optuna.storages.RDBStorage(f"sqlite:///{study_path.resolve()}")
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                                    load_if_exists=True)
        _check_same_search(study, space, trial_base)
        # Seeded by how many trials exist, so that a resumed search does not replay its first draws.
        study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials), n_startup_trials=startup_trials)
        study.pruner = (optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=1)
                        if pruning else optuna.pruners.NopPruner())
        _fail_stale_trials(study, storage, TrialState)
        for root, params in _interrupted_lineages(study, TrialState):
            study.enqueue_trial(params, user_attrs={"resume_of": root})
            log(f"trial {root} was interrupted: it resumes from {out_dir / _trial_dir_name(root) / 'last.pt'}")

        done = _finished_lineages(study, TrialState)
        remaining = trials - done
        if remaining > 0:
            log(f"study {study_path}: {done} finished trial(s), running {remaining} more "
                f"(searching {', '.join(space.searched()) or 'nothing'})")
            objective = _Objective(space, trial_base, out_dir, progress, log, optuna)
            study.optimize(objective, n_trials=remaining, catch=(_TrialError,),
                           timeout=timeout_minutes * 60 if timeout_minutes else None)
        else:
            log(f"study {study_path} already has {done} finished trial(s) (asked for {trials})")

        records = [_trial_record(t, out_dir) for t in study.get_trials(deepcopy=False)]
        (out_dir / "trials.json").write_text(json.dumps(records, indent=2))
        completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not completed:
            return TuneResult(out_dir, study_path, _finished_lineages(study, TrialState), records, None, None, None, None)
        best = max(completed, key=lambda t: (t.value, -t.number))
        best_params = _config_params(best.params)
        best_yaml = write_best_config(base, best_params, out_dir / "best.yaml", header=[
            f"fcnseg tune: the best of {len(completed)} complete trial(s) in {study_path}",
            f"trial {_root(best)}: val mIoU {best.value:.4f} with a budget of {_budget_text(trial_base)} "
            f"(exact trial settings: {out_dir / _trial_dir_name(_root(best)) / 'config.yaml'})",
            "tuned: " + ", ".join(f"{k}={_param_text(v)}" for k, v in best.params.items()),
            f"train with it: fcnseg train --config {out_dir / 'best.yaml'} --out runs/best",
        ])
        return TuneResult(out_dir, study_path, _finished_lineages(study, TrialState), records, _root(best),
                          float(best.value), best_params, best_yaml)


class _TrialError(Exception):
    """A trial's recipe raised an error; Optuna records the trial as failed and goes on."""


class _Objective:
    """One trial: draw a recipe, train it (resuming an interrupted one), report per-epoch mIoU."""

    def __init__(self, space: SearchSpace, trial_base: TrainConfig, out_dir: Path, progress: bool,
                 log: Callable[[str], None], optuna) -> None:
        self.space, self.trial_base, self.out_dir = space, trial_base, out_dir
        self.progress, self.log, self.optuna = progress, log, optuna

    def __call__(self, trial) -> float:
        from fcnseg.training.step import TrainingDiverged
        from fcnseg.training.trainer import train

        params = self.space.suggest(trial)
        root = trial.user_attrs.get("resume_of", trial.number)
        run_dir = self.out_dir / _trial_dir_name(root)
        config = dataclasses.replace(self.trial_base, **params, out=str(run_dir), resume=root != trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        self.log(f"trial {root}: " + ", ".join(f"{k}={_param_text(v)}" for k, v in trial.params.items()))

        def report(record: dict[str, Any]) -> None:
            if "miou" not in record:
                return
            trial.report(record["miou"], step=record["epoch"])
            last = (record["iteration"] >= config.iterations if config.iterations else record["epoch"] >= config.epochs)
            if not last and trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", record["epoch"])
                trial.set_user_attr("train_seconds", record["time_s"])
                self.log(f"trial {root}: pruned after epoch {record['epoch']} (mIoU {record['miou']:.4f})")
                raise self.optuna.TrialPruned(f"mIoU {record['miou']:.4f} at epoch {record['epoch']}")

        finished = run_dir / "metrics.json"
        if config.resume and finished.exists():
            # Killed after its run ended but before the study recorded it: nothing left to train.
            return self._score(trial, root, json.loads(finished.read_text()), _train_seconds(run_dir))
        tic = time.perf_counter()
        try:
            result = train(config, progress=self.progress, on_epoch_end=report)
        except TrainingDiverged as err:
            # Worst score instead of a failure: the sampler learns that this region diverges.
            trial.set_user_attr("diverged", str(err))
            trial.set_user_attr("train_seconds", round(time.perf_counter() - tic, 1))
            self.log(f"trial {root}: diverged ({err}); scored mIoU 0")
            return 0.0
        except (DataError, WeightsError, CheckpointError, self.optuna.TrialPruned):
            raise  # missing data or weights stop the search; pruning is Optuna's business
        except Exception as err:
            # This recipe cannot run (a batch larger than the training split, out of memory, a crop
            # too small for the model, ...): the trial fails and the search goes on, never resumed.
            message = f"{type(err).__name__}: {err}"
            trial.set_user_attr("error", message)
            self.log(f"trial {root}: failed: {message}")
            raise _TrialError(message) from err
        return self._score(trial, root, result.final_metrics or {}, result.train_seconds)

    def _score(self, trial, root: int, metrics: dict[str, Any], seconds: float) -> float:
        miou = float(metrics.get("miou", 0.0))
        trial.set_user_attr("train_seconds", round(seconds, 1))
        trial.set_user_attr("pixel_acc", metrics.get("pixel_acc"))
        self.log(f"trial {root}: val mIoU {miou:.4f} (pixel acc {metrics.get('pixel_acc', 0.0):.4f}) in {seconds:.0f} s")
        return miou


def _train_seconds(run_dir: Path) -> float:
    """Training time of a finished run, from the last line of its metrics.jsonl."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return float(json.loads(lines[-1])["time_s"])
    except (OSError, IndexError, KeyError, ValueError):
        return 0.0


def write_best_config(base: TrainConfig, params: dict[str, Any], path: str | Path, header: list[str] = ()) -> Path:
    """Writes ``base`` with ``params`` applied as a YAML config for ``fcnseg train --config``.

    The run folder and resume flag are left out, so that ``--out`` decides where the run goes.
    """
    from fcnseg.training.trainer import _plain

    values = _plain(dataclasses.replace(base, **params).to_dict())
    for key in ("out", "resume", "extra"):
        values.pop(key, None)
    path = Path(path)
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(values, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _trial_dir_name(number: int) -> str:
    return f"trial_{number:03d}"


def _root(trial) -> int:
    """The trial a retried trial continues (its run folder's number)."""
    return int(trial.user_attrs.get("resume_of", trial.number))


def _crop_text(crop: tuple[int, int]) -> str:
    return f"{int(crop[0])}x{int(crop[1])}"


def _parse_crop(text: str) -> tuple[int, int]:
    height, width = str(text).split("x")
    return int(height), int(width)


def _config_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: _parse_crop(v) if k == "crop" else v for k, v in params.items()}


def _param_text(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _budget_text(config: TrainConfig) -> str:
    return f"{config.iterations} iterations" if config.iterations else f"{config.epochs} epochs"


def _comparable(config: TrainConfig, space: SearchSpace) -> dict[str, Any]:
    from fcnseg.training.trainer import _plain

    ignored = _IGNORED_ON_RESUME | set(space.searched())
    return {k: v for k, v in _plain(config.to_dict()).items() if k not in ignored}


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
        raise FcnsegError("this study was made with other settings (" + "; ".join(differences[:6]) +
                          "); use another --out to start a new search")


def _fail_stale_trials(study, storage, TrialState) -> None:
    # We hold the folder's lock, so a trial still marked running was cut short (killed, power loss).
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def _lineages(study) -> dict[int, list]:
    lineages: dict[int, list] = {}
    for trial in study.get_trials(deepcopy=False):
        lineages.setdefault(_root(trial), []).append(trial)
    return lineages


def _interrupted_lineages(study, TrialState) -> list[tuple[int, dict[str, Any]]]:
    """(run number, params) of every trial whose latest attempt was interrupted (killed, Ctrl-C),
    not failed by its own error; queued ones are not repeated."""
    pending = []
    for root, attempts in sorted(_lineages(study).items()):
        latest = max(attempts, key=lambda t: t.number)
        if latest.state == TrialState.FAIL and "error" not in latest.user_attrs:
            pending.append((root, dict(latest.params)))
    return pending


def _finished_lineages(study, TrialState) -> int:
    """Trials that ran to an end: complete, pruned, or failed by an error of their recipe."""
    def ended(trial) -> bool:
        return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
            trial.state == TrialState.FAIL and "error" in trial.user_attrs)

    return sum(any(ended(t) for t in attempts) for attempts in _lineages(study).values())


def _trial_record(trial, out_dir: Path) -> dict[str, Any]:
    attrs = trial.user_attrs
    value = trial.value  # None unless complete; a pruned trial keeps its last reported mIoU below
    last_reported = None
    if trial.intermediate_values:
        step = max(trial.intermediate_values)
        last_reported = {"epoch": step, "miou": trial.intermediate_values[step]}
    return {
        "number": trial.number,
        "run": _trial_dir_name(_root(trial)),
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


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (POSIX); one search per folder at a time."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; do not run two searches on one folder there
        yield
        return
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FcnsegError(f"another fcnseg tune is running on {path.parent}; wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
