"""The trainer's loss wiring: each loss for thin classes reaches the step, the fused CE + Dice
optimises the unfused loss's value, and the chapter's recipes refuse them."""
from __future__ import annotations

import pytest
import torch

from fcnseg.training.config import resolve_config
from fcnseg.training.trainer import train
from tests.training.helpers import Recorder, Squares, user_config


@pytest.mark.parametrize("loss", ["ohem", "ce+lovasz"])
def test_a_loss_for_thin_classes_trains_on_the_full_resolution_logits(loss, tmp_path, monkeypatch):
    import fcnseg.training.loss as training_loss_module
    from fcnseg.ops.losses import training_loss

    calls = []

    def recording(logits, target, name, **kwargs):
        value = training_loss(logits, target, name, **kwargs)
        calls.append((name, tuple(logits.shape), tuple(target.shape), value.item()))
        return value

    monkeypatch.setattr(training_loss_module, "training_loss", recording)
    recorder = Recorder()
    losses = []
    recorder.on_step_end = lambda state, result: losses.append(result.loss)
    train(user_config(tmp_path / "run", loss=loss, iterations=2), train_dataset=Squares(8, seed=0),
          val_dataset=Squares(4, seed=1), callbacks=[recorder], progress=False)
    assert [c[0] for c in calls] == [loss, loss]  # every step, this loss
    assert all(c[1] == (4, 2, 48, 64) and c[2] == (4, 48, 64) for c in calls)
    assert losses == pytest.approx([c[3] for c in calls])  # the step optimised and logged that value


def test_ce_plus_dice_trains_fused_and_optimises_the_unfused_losss_value(tmp_path, monkeypatch):
    import fcnseg.training.loss as training_loss_module
    from fcnseg.ops.losses import training_loss
    from fcnseg.training.loss import fcn_cross_entropy

    calls = []

    def recording(model, image, target, **kwargs):
        value = fcn_cross_entropy(model, image, target, **kwargs)
        with torch.no_grad():  # BatchNorm in train mode: the same batch statistics as the fused forward
            expected = training_loss(model(image), target, "ce+dice")
        calls.append((kwargs.get("dice"), value.item(), expected.item()))
        return value

    monkeypatch.setattr(training_loss_module, "fcn_cross_entropy", recording)
    recorder = Recorder()
    losses = []
    recorder.on_step_end = lambda state, result: losses.append(result.loss)
    train(user_config(tmp_path / "run", loss="ce+dice", iterations=2), train_dataset=Squares(8, seed=0),
          val_dataset=Squares(4, seed=1), callbacks=[recorder], progress=False)
    assert [c[0] for c in calls] == [True, True]
    assert [c[1] for c in calls] == pytest.approx([c[2] for c in calls], rel=1e-5)
    assert losses == pytest.approx([c[1] for c in calls])


def test_a_loss_for_thin_classes_is_refused_with_the_chapters_recipe():
    from fcnseg.errors import OptionError

    with pytest.raises(OptionError, match="--loss lovasz cannot be used here: the chapter's recipes"):
        resolve_config({"loss": "lovasz", "root": "x"}, recipe="d2l")
