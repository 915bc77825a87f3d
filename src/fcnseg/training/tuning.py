"""A small, budgeted search over training recipes with Optuna, stored on disk and resumable.

Each trial is one `fcnseg.training.trainer.train` run into ``OUT/trial_NNN`` with the learning rate, weight
decay, batch size, crop size and schedule its sampler (TPE, seeded) picked; the objective is the
final validation mIoU. The study lives in ``OUT/study.db`` (SQLite): running the same search again
continues it, resuming an interrupted trial from its ``last.pt``. At the end ``OUT/best.yaml`` holds
the best recipe as a config file for ``fcnseg train --config``, and ``OUT/trials.json`` every trial.
The search space and the study's bookkeeping are in `fcnseg.training.tuning_study`; this module runs
the search and its trials.

Optuna is an optional dependency (``pip install 'fcnseg[tune]'``), imported only when a search runs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from fcnseg.errors import CheckpointError, DataError, UsageError, WeightsError
from fcnseg.training.config import TrainConfig
from fcnseg.training.run_dir import RunFolderError, prepare_study_folder
from fcnseg.training.tuning_study import (
    STUDY_NAME,
    SearchSpace,
    config_params,
    finished_lineages,
    interrupted_lineages,
    lineage_root,
    open_study,
    param_text,
    trial_dir_name,
    trial_record,
)

INSTALL_HINT = "pip install 'fcnseg[tune]'"


def import_optuna():
    """Returns the optuna module, or raises a UsageError (exit status 2) that says how to install it."""
    try:
        import optuna
    except ImportError:
        raise UsageError(f"fcnseg tune needs Optuna, which is not installed: {INSTALL_HINT}") from None
    return optuna


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
    overwrite: bool = False,
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
        progress: show each trial's training progress (a bar on a terminal, plain lines in a log).
        overwrite: remove the study in ``out_dir`` (study.db, trial folders' run files, trials.json,
            best.yaml) and start a new one; without it, a study there is continued.
        log: where progress lines go.

    Raises:
        FcnsegError: Optuna missing, another search running in ``out_dir`` (a `RunFolderError`), a
            study there made with other settings, missing data or weights. A trial whose recipe raises another error (a
            batch larger than the data, out of memory, ...) is recorded as failed and the search goes
            on; a diverged trial scores mIoU 0.
    """
    optuna = import_optuna()
    space = space or SearchSpace()
    space.validate()
    trial_base = _trial_base(base, trials, iterations_per_trial, epochs_per_trial)
    out_dir = Path(out_dir)
    study_path = out_dir / "study.db"
    with prepare_study_folder(out_dir, overwrite=overwrite, log=log):  # one search per folder, for its whole life
        study = open_study(optuna, study_path, space, trial_base, seed=base.seed, startup_trials=startup_trials,
                           pruning=pruning)
        done = _queue_interrupted(study, optuna, out_dir, log)
        remaining = trials - done
        if remaining > 0:
            log(f"study {study_path}: {done} finished trial(s), running {remaining} more "
                f"(searching {', '.join(space.searched()) or 'nothing'})")
            objective = _Objective(space, trial_base, out_dir, progress, log, optuna)
            study.optimize(objective, n_trials=remaining, catch=(_TrialError,),
                           timeout=timeout_minutes * 60 if timeout_minutes else None)
        else:
            log(f"study {study_path} already has {done} finished trial(s) (asked for {trials})")
        return _search_result(study, optuna, base, trial_base, out_dir, study_path)


def _trial_base(base: TrainConfig, trials: int, iterations_per_trial: int | None,
                epochs_per_trial: int | None) -> TrainConfig:
    """The settings every trial starts from: ``base`` with the trial budget, never resumed; checked."""
    if trials < 1:
        raise UsageError("--trials must be at least 1")
    if iterations_per_trial is not None and epochs_per_trial is not None:
        raise UsageError("give a trial budget in iterations or in epochs, not both")
    trial_base = dataclasses.replace(base, resume=False, overwrite=False)
    if iterations_per_trial is not None:
        trial_base.iterations = iterations_per_trial
    if epochs_per_trial is not None:
        trial_base.epochs, trial_base.iterations = epochs_per_trial, None
    if (trial_base.iterations or trial_base.epochs) < 1:
        raise UsageError("the trial budget must be at least one iteration or epoch")
    return trial_base


def _queue_interrupted(study, optuna, out_dir: Path, log: Callable[[str], None]) -> int:
    """Queues every interrupted trial to resume in its run folder; returns the trials that already ended."""
    TrialState = optuna.trial.TrialState
    for root, params in interrupted_lineages(study, TrialState):
        study.enqueue_trial(params, user_attrs={"resume_of": root})
        log(f"trial {root} was interrupted: it resumes from {out_dir / trial_dir_name(root) / 'last.pt'}")
    return finished_lineages(study, TrialState)


def _search_result(study, optuna, base: TrainConfig, trial_base: TrainConfig, out_dir: Path,
                   study_path: Path) -> TuneResult:
    """Writes ``trials.json`` and, with a complete trial, ``best.yaml``; returns what the search found."""
    TrialState = optuna.trial.TrialState
    records = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    (out_dir / "trials.json").write_text(json.dumps(records, indent=2))
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not completed:
        return TuneResult(out_dir, study_path, finished_lineages(study, TrialState), records, None, None, None, None)
    best = max(completed, key=lambda t: (t.value, -t.number))
    best_params = config_params(best.params)
    best_yaml = write_best_config(base, best_params, out_dir / "best.yaml", header=[
        f"fcnseg tune: the best of {len(completed)} complete trial(s) in {study_path}",
        f"trial {lineage_root(best)}: {_scored_on(base)} mIoU {best.value:.4f} with a budget of {_budget_text(trial_base)} "
        f"(exact trial settings: {out_dir / trial_dir_name(lineage_root(best)) / 'config.yaml'})",
        "tuned: " + ", ".join(f"{k}={param_text(v)}" for k, v in best.params.items()),
        f"train with it: fcnseg train --config {out_dir / 'best.yaml'} --out runs/best",
    ])
    return TuneResult(out_dir, study_path, finished_lineages(study, TrialState), records, lineage_root(best),
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
        """Trains the trial's recipe and returns its final val mIoU (0 for a diverged run)."""
        from fcnseg.training.step import TrainingDiverged
        from fcnseg.training.trainer import train

        params = self.space.suggest(trial)
        root = trial.user_attrs.get("resume_of", trial.number)
        run_dir = self.out_dir / trial_dir_name(root)
        config = dataclasses.replace(self.trial_base, **params, out=str(run_dir), resume=root != trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        self.log(f"trial {root}: " + ", ".join(f"{k}={param_text(v)}" for k, v in trial.params.items()))
        finished = run_dir / "metrics.json"
        if config.resume and finished.exists():
            # Killed after its run ended but before the study recorded it: nothing left to train.
            return self._score(trial, root, json.loads(finished.read_text()), _train_seconds(run_dir))
        tic = time.perf_counter()
        try:
            result = train(config, progress=self.progress, on_epoch_end=self._reporter(trial, root, config))
        except TrainingDiverged as err:
            # Worst score instead of a failure: the sampler learns that this region diverges.
            trial.set_user_attr("diverged", str(err))
            trial.set_user_attr("train_seconds", round(time.perf_counter() - tic, 1))
            self.log(f"trial {root}: diverged ({err}); scored mIoU 0")
            return 0.0
        except (DataError, WeightsError, CheckpointError, RunFolderError, self.optuna.TrialPruned):
            raise  # missing data or weights, or a trial folder in use, stop the search; pruning is Optuna's business
        except Exception as err:
            # This recipe cannot run (a batch larger than the training split, out of memory, a crop
            # too small for the model, ...): the trial fails and the search goes on, never resumed.
            message = f"{type(err).__name__}: {err}"
            trial.set_user_attr("error", message)
            self.log(f"trial {root}: failed: {message}")
            raise _TrialError(message) from err
        return self._score(trial, root, result.final_metrics or {}, result.train_seconds)

    def _reporter(self, trial, root: int, config: TrainConfig) -> Callable[[dict[str, Any]], None]:
        """The trainer's ``on_epoch_end``: reports each epoch's mIoU, and prunes the trial when Optuna says so."""
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

        return report

    def _score(self, trial, root: int, metrics: dict[str, Any], seconds: float) -> float:
        """Records a finished run's metrics on the trial and returns its mIoU."""
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

    The run folder, resume and overwrite flags are left out, so that ``--out`` decides where the run
    goes and a tuned recipe never replaces a run by itself; ``holdout`` is 0, so the recipe trains on
    all of the training split.
    """
    # A recipe chosen on a holdout is then trained on the whole training split (and reported on val).
    values = dataclasses.replace(base, **params, holdout=0.0, holdout_groups="").to_plain_dict()
    for key in ("out", "resume", "overwrite", "extra"):
        values.pop(key, None)
    path = Path(path)
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(values, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _scored_on(config: TrainConfig) -> str:
    """What the trials were scored on, for best.yaml's header."""
    if config.holdout:
        whole = f", whole groups of {config.holdout_groups!r}" if config.holdout_groups else ""
        return f"holdout ({config.holdout:g} of {config.train_split!r}{whole}, not trained on)"
    return f"{config.val_split!r}"


def _budget_text(config: TrainConfig) -> str:
    """A trial budget for best.yaml's header: "N iterations" or "N epochs"."""
    return f"{config.iterations} iterations" if config.iterations else f"{config.epochs} epochs"


__all__ = ["INSTALL_HINT", "STUDY_NAME", "SearchSpace", "TuneResult", "import_optuna", "tune", "write_best_config"]
