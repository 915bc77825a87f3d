"""Reruns the tables of docs/RESULTS.md (the chapter's exercises on CamVid) end to end.

    python experiments/run.py q1 [q2 ...|all] [--quick] [--out DIR] [--bodies resnet18 mobilenet_v2]
                              [--budget q|recommended]

q1 upsampler (FCN-32s), q2 skips (32s/16s/8s), q3 pretrained vs random body and frozen vs fine-tuned,
q4 `fcnseg tune` search (scored on a holdout of train) and its best recipe, q5 whole-image vs
sliding-window prediction with and without flip, q6 options for thin classes (losses, crops, scales,
FCN-4s, test-time augmentation) scored on a holdout of train, q7 the recipe chosen from q6, trained
with the recommended budget on all of train, 2 seeds, reported on val. Every number comes from
`fcnseg train` / `fcnseg eval` / `fcnseg tune` with fixed seeds; runs shared by several tables
(Q1's bilinear FCN-32s is Q2's 32s row, ...) are trained once. Each table is written to
OUT/qN/table.md and table.json, and all tables so far to OUT/RESULTS.md.
Interrupted? Run the same command again: finished runs are skipped, cut ones resumed.
See experiments/README.md for the settings and the expected times.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recommended  # noqa: E402
import thin_classes  # noqa: E402
from repo_paths import repo_relative, shared_data_dir  # noqa: E402
from runner import ExperimentError, Runner, TrainRun  # noqa: E402
from settings import BODIES, FULL, QUICK, RECORDS, UPSAMPLERS, Settings, hardware  # noqa: E402
from tables import Row, format_seconds, write_table  # noqa: E402

TABLES = ("q1", "q2", "q3", "q4", "q5", "q6", "q7")


class Experiments:
    """Builds the fcnseg commands of each table, runs them through a Runner and writes the tables."""

    def __init__(self, settings: Settings, runner: Runner, root: Path, weights: Path, bodies: list[str], *,
                 selection_bodies: list[str] | None = None, budget: str = "q") -> None:
        self.s, self.runner, self.root, self.weights, self.bodies = settings, runner, root, weights, bodies
        # Q6 (and the choices Q7 makes from it): MobileNetV2 unless --bodies names the bodies.
        self.selection_bodies, self.budget = selection_bodies or ["mobilenet_v2"], budget
        self.selections: dict[str, thin_classes.Selection] = {}  # Q6's runs per body, made once for Q6 and Q7

    # -- command pieces -----------------------------------------------------------------------
    def common(self, *, searched: bool = True, eval_every: int | None = None, settings: Settings | None = None,
               seed: int = 0) -> list[str]:
        """Data, recipe and run options shared by every training run (of ``settings``, default the
        table settings); `fcnseg tune` gets them without the searched ones (it would otherwise hold
        them fixed)."""
        s = settings or self.s
        args = ["--dataset", "camvid", "--root", str(self.root),
                "--scale-range", *s.scale_range, "--hflip", "true", "--optimizer", "sgd", "--momentum", "0.9"]
        if searched:
            args += ["--crop", s.crop, "--batch-size", str(s.batch_size), "--lr", s.lr,
                     "--weight-decay", s.weight_decay, "--schedule", s.schedule]
        if s.warmup_iters:
            args += ["--warmup-iters", str(s.warmup_iters)]
        args += ["--iterations", str(s.iterations)] if s.iterations else ["--epochs", str(s.epochs)]
        args += ["--eval-every", str(eval_every or s.eval_every), "--seed", str(seed), "--workers", str(s.workers),
                 "--no-progress", *s.hardware_args]
        if s.max_val_images:
            args += ["--max-val-images", str(s.max_val_images)]
        return args

    def model(self, body: str, *, variant: str = "8s", upsampler: str = "bilinear", pretrained: bool | None = None,
              frozen: bool = False) -> tuple[str, list[str], str]:
        """(run name, model options, row label). ResNet-18 is always random init here (its ImageNet
        weights cannot be downloaded); MobileNetV2 is ImageNet-initialised unless told otherwise."""
        spec = BODIES[body]
        if pretrained is None:
            pretrained = body == "mobilenet_v2"
        init = "imagenet" if pretrained else "random"
        args = ["--model", spec.model, "--variant", variant, "--upsampler", upsampler,
                "--weights-backbone", str(self.weights) if pretrained else "none"]
        if frozen:
            args += ["--freeze-backbone", "true"]
        name = f"{body}-{init}-{variant}-{upsampler}" + ("-frozen" if frozen else "")
        label = f"{spec.name} ({'ImageNet' if pretrained else 'random init'})"
        return name, args, label

    def train(self, body: str, **model_options) -> tuple[TrainRun | None, str]:
        name, args, label = self.model(body, **model_options)
        return self.runner.train(name, args + self.common()), label

    # -- tables -------------------------------------------------------------------------------
    def q1(self) -> None:
        rows = []
        for body in self.bodies:
            for upsampler, text in UPSAMPLERS.items():
                run, label = self.train(body, variant="32s", upsampler=upsampler)
                rows.append(self.row(run, f"{label}, FCN-32s, {text}"))
        self.write("q1", "Q1. Upsampler of FCN-32s: bilinear-initialised (learned) vs Xavier vs fixed bilinear", rows,
                   notes=["The chapter initialises the transposed convolution with a bilinear kernel and learns it; "
                          "exercise 1 asks what Xavier initialisation does. 'Fixed' keeps the bilinear kernel frozen."])

    def q2(self) -> None:
        rows = []
        for body in self.bodies:
            for variant in ("32s", "16s", "8s"):
                run, label = self.train(body, variant=variant)
                rows.append(self.row(run, f"{label}, FCN-{variant}"))
        self.write("q2", "Q2. Skip connections: FCN-32s vs FCN-16s vs FCN-8s", rows,
                   notes=["Upsampler: bilinear init, learned. 16s and 8s add the stride-16 and stride-8 score "
                          "layers, initialised at zero as in the paper."])

    def q3(self) -> None:
        rows = []
        for pretrained in (True, False):
            for frozen in (False, True):
                run, label = self.train("mobilenet_v2", pretrained=pretrained, frozen=frozen)
                rows.append(self.row(run, f"{label}, FCN-8s, body {'frozen' if frozen else 'fine-tuned'}"))
        if "resnet18" in self.bodies:
            run, label = self.train("resnet18")
            rows.append(self.row(run, f"{label}, FCN-8s, body fine-tuned (reference)"))
        self.write("q3", "Q3. Pretrained vs random body (MobileNetV2), frozen vs fine-tuned", rows,
                   notes=[f"ImageNet weights: {self.weights.name} (torchvision's MobileNetV2 features). "
                          "Frozen: the body stays in eval mode (BatchNorm statistics included) and only the "
                          "score layers and upsamplers learn."])

    def q4(self) -> None:
        s = self.s
        name, model_args, label = self.model("mobilenet_v2")
        # Scored on a holdout of train (a new study: the first one, scored on val, lives in q4/tune).
        study_dir = self.runner.out / "q4" / "tune-holdout"
        # The trials evaluate every epoch so that the median pruner can stop poor ones early.
        tune_args = [*model_args, *self.common(searched=False, eval_every=1), "--holdout", s.holdout,
                     "--trials", str(s.tune_trials), *s.tune_budget, *s.tune_space]
        best_yaml = self.runner.tune(tune_args, study_dir)
        default = self.runner.train(name, model_args + self.common())
        # best.yaml holds the whole recipe (budget included); validation as sparse as the other runs.
        tuned_args = ["--config", str(study_dir / "best.yaml"), "--eval-every", str(s.eval_every), "--no-progress"]
        if best_yaml is not None and not best_yaml.exists():
            raise ExperimentError(f"fcnseg tune wrote no {best_yaml}: no trial completed")
        tuned = self.runner.train(f"{name}-tuned-holdout", tuned_args,
                                  inputs={"best.yaml": best_yaml} if best_yaml is not None else None)
        if default is None or tuned is None:
            return
        tuned_params = _recipe_text(tuned.config)
        rows = [self.row(default, f"{label}, FCN-8s, default recipe ({_recipe_text(default.config)})"),
                self.row(tuned, f"{label}, FCN-8s, tuned recipe ({tuned_params})")]
        trials = json.loads((study_dir / "trials.json").read_text())
        self.write("q4", "Q4. A budgeted search (fcnseg tune) and the best recipe it finds", rows,
                   notes=[f"Search: {len(trials)} trial(s) of Optuna's TPE sampler (seed 0), "
                          f"{_budget_words(s.tune_budget)} per trial, each trained on the other "
                          f"{100 - round(100 * float(s.holdout))}% of train and scored by its final mIoU on a "
                          f"{float(s.holdout):.0%} holdout of train (`--holdout {s.holdout}`: runs of consecutive "
                          "frames, never trained on by the trials), never on val; median pruning on per-epoch "
                          f"holdout mIoU; fcnseg tune options: {' '.join(s.tune_space)}.",
                          "The best recipe (best.yaml, which sets holdout 0) is then trained on all of train "
                          "with the full budget and reported on val once, like the default row: val chose nothing."],
                   extra_markdown=_trials_markdown(trials, "holdout mIoU"))

    def q5(self) -> None:
        rows = []
        for body in self.bodies:
            run, label = self.train(body)
            name = self.model(body)[0]
            checkpoint = self.runner.out / "runs" / name / "last.pt"
            for mode in ("whole", "sliding"):
                for flip in (False, True):
                    key = mode + ("-flip" if flip else "")
                    args = ["--dataset", "camvid", "--root", str(self.root), "--split", "val", "--mode", mode,
                            "--batch-size", "4", "--amp", self.s.eval_amp, "--workers", str(self.s.workers)]
                    if flip:
                        args.append("--flip")
                    if self.s.max_val_images:
                        args += ["--max-images", str(self.s.max_val_images)]
                    report = self.runner.evaluate(f"{name} {key}", checkpoint, args,
                                                  self.runner.out / "runs" / name / "eval" / f"{key}.json")
                    if report is None:
                        continue
                    text = ("one padded pass" if mode == "whole" else "sliding window, logits averaged") + \
                           (" + flip" if flip else "")
                    rows.append(Row(f"{label}, FCN-8s: {text}", report.report, report.report.get("seconds"),
                                    str(report.path), report.command))
        crop = self.s.crop
        self.write("q5", "Q5. Whole-image prediction: one padded pass vs sliding window, with and without flip", rows,
                   time_label="eval time",
                   notes=["Checkpoints: the FCN-8s runs of Q2 (last.pt). Whole: the image padded to a multiple of "
                          f"32, one forward pass, logits cropped back. Sliding: windows of the training crop ({crop}), "
                          "stride two thirds of it, the last window moved back to the image edge, logits averaged "
                          "where windows overlap. Flip: logits of the image and of its mirror image averaged.",
                          "Eval time: wall time of fcnseg eval's prediction loop over the split (batch 4; model "
                          "loading excluded). The whole-image row without flip repeats the training run's final "
                          "validation, so it should equal that run's metrics.json up to float rounding."])

    def q6(self) -> None:
        thin_classes.q6(self)

    def q7(self) -> None:
        recommended.q7(self)

    # -- output -------------------------------------------------------------------------------
    def row(self, run: TrainRun | None, label: str) -> Row | None:
        if run is None:
            return None
        return Row(label, run.metrics, run.train_seconds, str(run.run_dir), run.command)

    def write(self, key: str, title: str, rows: list[Row | None], *, time_label: str = "train time",
              notes: list[str] = (), extra_markdown: str = "", extra_tables: list = ()) -> None:
        rows = [r for r in rows if r is not None]
        if not rows:  # dry run
            return
        settings = self.settings_summary(rows)
        md, js = write_table(self.runner.out / key, key, title, self.caption(settings), rows, time_label=time_label,
                             settings=settings, notes=notes, extra_markdown=extra_markdown, extra_tables=extra_tables)
        print(md.read_text())
        print(f"wrote {md} and {js}")
        write_summary(self.runner.out)

    def settings_summary(self, rows: list[Row]) -> dict:
        first_run = next((Path(r.run) for r in rows if (Path(r.run) / "config.yaml").exists()), None)
        if first_run is None:  # Q5: the report sits in RUN_DIR/eval/
            first_run = Path(rows[0].run).parent.parent
        import yaml

        config = yaml.safe_load((first_run / "config.yaml").read_text())
        records = [json.loads(line) for line in (first_run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return {
            "settings": self.s.name, "dataset": "CamVid (SegNet tutorial split)", **self.scored_images(config),
            "crop": "x".join(map(str, config["crop"])), "scale_range": config["scale_range"],
            "epochs": records[-1]["epoch"] if records else None, "iterations": records[-1]["iteration"] if records else None,
            "batch_size": config["batch_size"], "optimizer": config["optimizer"], "momentum": config["momentum"],
            "lr": config["lr"], "weight_decay": config["weight_decay"], "schedule": config["schedule"],
            "warmup_iters": config.get("warmup_iters", 0), "amp": config["amp"], "seed": config["seed"],
            "hardware": hardware(),
        }

    def scored_images(self, config: dict) -> dict:
        """What a run was scored on: val, or (``config["holdout"]``) the images held out of train."""
        from PIL import Image

        from fcnseg.data import build_dataset
        from fcnseg.data.splits import holdout_split

        holdout = config.get("holdout") or 0
        split = build_dataset("camvid", self.root, config.get("train_split", "train") if holdout else "val")
        indices = holdout_split(len(split), holdout)[1] if holdout else range(len(split))
        with Image.open(split.image_paths[indices[0]]) as im:
            size = f"{im.height}x{im.width}"
        n = min(len(indices), config.get("max_val_images") or len(indices))
        return {"val_images": n, "val_size": size, "holdout": holdout, "split_images": len(split),
                "held_out": len(indices) if holdout else 0}

    def caption(self, st: dict) -> str:
        scale = f"random scale {st['scale_range'][0]}-{st['scale_range'][1]}, " if st["scale_range"] else ""
        quick = "**Quick check only: these numbers mean nothing.** " if st["settings"] == "quick" else ""
        scored = f"CamVid val, {st['val_images']} images at {st['val_size']}"
        if st.get("holdout"):
            scored = (f"CamVid train holdout (`--holdout {st['holdout']:g}`), {st['val_images']} of the "
                      f"{st['held_out']} images held out of the {st['split_images']} training images (runs of "
                      f"consecutive frames; the runs train on the other {st['split_images'] - st['held_out']}; val "
                      f"never read), at {st['val_size']}")
        warmup = f", {_plural(st['warmup_iters'], 'warm-up step')}" if st.get("warmup_iters") else ""
        return (f"{quick}{scored} (void excluded), whole-image "
                f"prediction unless stated. Training: {_plural(st['epochs'], 'epoch')} ({_plural(st['iterations'], 'iteration')}) on "
                f"{st['crop']} crops ({scale}horizontal flip), batch {st['batch_size']}, SGD momentum "
                f"{st['momentum']}, lr {st['lr']} {st['schedule']}{warmup}, weight decay {st['weight_decay']}, seed "
                f"{st['seed']}, unless the row says otherwise. Hardware: {st['hardware']}. IoU and accuracies in %; "
                "train time is the wall-clock training time in metrics.jsonl (periodic validation included).")


def _plural(count: int | None, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _budget_words(budget: tuple[str, ...]) -> str:
    """("--epochs-per-trial", "3") -> "3 epochs"."""
    option, value = budget
    return _plural(int(value), "epoch" if "epochs" in option else "iteration")


def _recipe_text(config: dict) -> str:
    return (f"lr {config['lr']:.3g}, wd {config['weight_decay']:.2g}, batch {config['batch_size']}, "
            f"crop {'x'.join(map(str, config['crop']))}, {config['schedule']}")


def _trials_markdown(trials: list[dict], score: str = "mIoU") -> str:
    lines = [f"Trials ({score} at the trial budget; a pruned trial shows the {score} it was stopped at, a diverged "
             "one scores 0):", "",
             f"| trial | state | {score} | lr | weight decay | batch | crop | schedule | train time |",
             "|---:|:---|---:|---:|---:|---:|:---|:---|---:|"]
    for t in sorted(trials, key=lambda t: t["number"]):
        p = t["params"]
        if t["miou"] is not None:
            miou = f"{100 * t['miou']:.1f}"
        elif t.get("last_reported"):
            miou = f"({100 * t['last_reported']['miou']:.1f})"
        else:
            miou = "–"
        lr = f"{p['lr']:.3g}" if "lr" in p else "–"
        wd = f"{p['weight_decay']:.2g}" if "weight_decay" in p else "–"
        state = "diverged (NaN loss)" if t.get("diverged") else t["state"]
        lines.append(f"| {t['number']} | {state} | {miou} | {lr} | {wd} | {p.get('batch_size', '–')} | "
                     f"{p.get('crop', '–')} | {p.get('schedule', '–')} | {format_seconds(t.get('train_seconds'))} |")
    return "\n".join(lines)


def write_summary(out: Path) -> Path:
    """OUT/RESULTS.md: every table written so far, in order."""
    parts = [f"# Experiment tables ({repo_relative(str(out))})", ""]
    for key in TABLES:
        table = out / key / "table.md"
        if table.exists():
            parts += [table.read_text(), ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(parts))
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("tables", nargs="+", choices=(*TABLES, "all"), help="which tables to (re)make")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (2 iterations, 64x96 crops, 2 val images) to check the plumbing in seconds")
    parser.add_argument("--out", help=f"experiments folder (default {FULL.out}; with --quick {QUICK.out})")
    parser.add_argument("--root", type=Path, help="CamVid folder (default: $FCNSEG_SHARED_DATA/camvid or ../shared/data/camvid)")
    parser.add_argument("--weights", type=Path, help="MobileNetV2 ImageNet features state dict "
                        "(default: the shared data's weights/mobilenet_v2_imagenet_features.pth)")
    parser.add_argument("--bodies", nargs="+", choices=tuple(BODIES),
                        help=f"bodies for Q1, Q2, Q5, Q7 and Q3's reference row (default {' '.join(FULL.bodies)}; "
                             f"with --quick {' '.join(QUICK.bodies)}); Q6 runs MobileNetV2 only unless given")
    parser.add_argument("--budget", choices=("q", "recommended"), default="q",
                        help="Q6's training budget: the Q settings (15 epochs of 256x352 crops, default) or the "
                             "recommended run's (3600 steps of 360x480 crops, about 52 min per MobileNetV2 row)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help=f"Q7's seeds (default {' '.join(map(str, FULL.seeds))})")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {FULL.epochs}; not with --quick)")
    parser.add_argument("--trials", type=int, help=f"Q4 search trials (default {FULL.tune_trials})")
    parser.add_argument("--launcher", choices=("subprocess", "inprocess"),
                        help="run fcnseg as `python -m fcnseg` subprocesses (default) or through fcnseg.cli.main "
                             "in this process (default with --quick: saves the start-up time of each command)")
    parser.add_argument("--records", metavar="DIR",
                        help="keep each finished training run's metrics and config (no checkpoint) in DIR, and take "
                             f"runs found there instead of training them again (default {repo_relative(str(RECORDS))} for the full "
                             "settings, none with --quick; 'none' turns it off)")
    parser.add_argument("--dry-run", action="store_true", help="print the fcnseg commands only")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.epochs:
        if args.quick:
            parser.error("--epochs does not apply to --quick (which trains 2 iterations)")
        settings = replace(settings, epochs=args.epochs)
    if args.trials:
        settings = replace(settings, tune_trials=args.trials)
    if args.seeds:
        settings = replace(settings, seeds=tuple(dict.fromkeys(args.seeds)))
    data = shared_data_dir()
    root = (args.root or data / "camvid").resolve()
    weights = (args.weights or data / "weights" / "mobilenet_v2_imagenet_features.pth").resolve()
    for path, what in ((root, "CamVid (--root)"), (weights, "MobileNetV2 weights (--weights)")):
        if not path.exists() and not args.dry_run:
            parser.error(f"{what} not found at {path}")
    records = args.records or (None if args.quick else str(RECORDS))
    runner = Runner(args.out or settings.out, launcher=args.launcher or settings.launcher, dry_run=args.dry_run,
                    records=None if records in (None, "none") else records)
    experiments = Experiments(settings, runner, root, weights, list(args.bodies or settings.bodies),
                              selection_bodies=args.bodies, budget=args.budget)
    tables = TABLES if "all" in args.tables else [t for t in TABLES if t in args.tables]
    try:
        for key in tables:
            print(f"=== {key} ({settings.name} settings, {runner.out}) ===")
            getattr(experiments, key)()
    except ExperimentError as err:
        print(f"experiments: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
