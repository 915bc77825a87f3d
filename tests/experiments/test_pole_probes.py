"""experiments/pole_probes.py on synthetic scenes: the class prior against a count by hand, the plain
probe against `fcnseg.evaluation.evaluate_checkpoint` on the same holdout, and logit adjustment's pull
towards the rarest class."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data.synthetic import make_synthetic
from fcnseg.evaluation import evaluate_checkpoint
from fcnseg.models.checkpoint import load_checkpoint
from tests.conftest import REPO_ROOT, random_scores_checkpoint  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
from pole_probes import class_prior, main, probe  # noqa: E402


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("scenes") / "data", num_classes=3, n=10, size=(40, 56), seed=1,
                          progress=False)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    return random_scores_checkpoint(tmp_path_factory.mktemp("ck") / "model.pt")


def test_class_prior_is_each_class_share_of_the_labelled_pixels():
    masks = [np.array([[0, 0, 2], [IGNORE_INDEX, 2, 2]]), np.array([[1, IGNORE_INDEX, 0]])]
    dataset = [(None, torch.from_numpy(m).long()) for m in masks]
    counts = np.array([3, 1, 3, 0], dtype=float)  # by hand: class 3 never occurs
    np.testing.assert_allclose(class_prior(dataset, [0, 1], 4).numpy(), counts / counts.sum())
    np.testing.assert_allclose(class_prior(dataset, [1], 4).numpy(), [0.5, 0.5, 0, 0])


def test_plain_probe_equals_fcnseg_eval_on_the_holdout(scenes, checkpoint_path):
    matrices = probe(load_checkpoint(checkpoint_path), scenes, 0.2, [1.0], [0.0, 1e6], dataset_name="folder", amp="none")
    report = evaluate_checkpoint(checkpoint_path, "folder", scenes, "train", holdout=0.2, amp="none", progress=False)
    plain = matrices[1.0, 0.0].matrix.cpu().numpy()
    np.testing.assert_array_equal(plain, report.confusion.matrix.cpu().numpy())
    assert (plain.sum(0) > 0).sum() >= 2  # the random model predicts more than one class
    # A huge tau leaves the prior alone to decide: every pixel goes to the rarest class of the training images.
    adjusted = matrices[1.0, 1e6].matrix.cpu().numpy()
    assert (adjusted.sum(0) > 0).sum() == 1 and adjusted.sum() == plain.sum()


def test_main_prints_one_line_per_scale_and_tau(scenes, checkpoint_path, capsys, monkeypatch):
    import pole_probes

    monkeypatch.setattr(pole_probes, "SHOWN", ("striped disc",))
    real = pole_probes.probe
    monkeypatch.setattr(pole_probes, "probe", lambda *a, **k: real(*a, **k, dataset_name="folder", amp="none"))
    assert main([str(checkpoint_path), "--root", str(scenes), "--scales", "1", "2", "--taus", "0", "0.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["scale 1 tau 0", "scale 1 tau 0.5", "scale 2 tau 0", "scale 2 tau 0.5"]
    assert all("mIoU" in line and "striped disc" in line for line in lines)


def test_a_missing_checkpoint_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "absent.pt")])
    assert exit_info.value.code == 2 and f"checkpoint not found: {tmp_path / 'absent.pt'}" in capsys.readouterr().err
