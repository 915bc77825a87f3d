"""``fcnseg train --backend jax``: a standard checkpoint that eval reads, exact resume, PyTorch's trajectory."""
from __future__ import annotations

import json

import pytest
import torch

from fcnseg.cli import build_parser, main
from fcnseg.cli.train import config_from_args
from fcnseg.data.synthetic import make_synthetic
from fcnseg.errors import OptionError
from fcnseg.jax_backend.train import check_jax_config, train_jax
from fcnseg.models.checkpoint import load_checkpoint, model_from_checkpoint
from fcnseg.training.callbacks import Callback
from fcnseg.training.config import TrainConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data"), num_classes=3, n=6, size=(64, 64), seed=0, progress=False)


def _train(root, out, *extra: str, callbacks=None) -> dict:
    """``fcnseg train ...`` (with ``callbacks``, the same options through `train_jax`)."""
    args = ["train", "--root", str(root), "--model", "fcn_resnet18", "--weights-backbone", "none", "--variant", "16s",
            "--crop", "64x64", "--batch-size", "2", "--lr", "0.01", "--weight-decay", "1e-3", "--amp", "none",
            "--workers", "0", "--seed", "0", "--out", str(out), "--no-progress", *extra]
    if callbacks is None:
        assert main(args) == 0
    else:
        parsed = build_parser().parse_args(args)
        train_jax(config_from_args(parsed), callbacks=callbacks, progress=False)
    return load_checkpoint(out / "last.pt")


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def jax_run(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "jax"
    return out, _train(root, out, "--backend", "jax", "--epochs", "2")


def test_checkpoint_is_standard_and_eval_reads_it(jax_run, tmp_path):
    out, checkpoint = jax_run
    assert checkpoint["backend"] == "jax" and checkpoint["global_step"] == 4  # 4 training pairs, batch 2
    model = model_from_checkpoint(checkpoint)  # strict load into the PyTorch FCN
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(checkpoint["state_dict"]["backbone.stage8.1.num_batches_tracked"]) == 4
    records = _records(out)
    assert [r["epoch"] for r in records] == [1, 2] and all("miou" in r for r in records)
    assert main(["eval", str(out / "last.pt"), "--amp", "none", "--no-progress", "--out", str(tmp_path / "e.json")]) == 0
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["miou"] <= 1


class _Interrupt(Exception):
    pass


class _StopAfterFirstEpoch(Callback):
    def on_epoch_end(self, state, record):
        raise _Interrupt  # after last.pt is written: as a run killed between epochs


def test_resume_continues_as_an_unbroken_run(root, jax_run, tmp_path):
    """Killed after epoch 1 and resumed: the weights an unbroken run ends with (JAX momentum restored)."""
    out = tmp_path / "resumed"
    with pytest.raises(_Interrupt):
        _train(root, out, "--backend", "jax", "--epochs", "2", callbacks=[_StopAfterFirstEpoch()])
    assert load_checkpoint(out / "last.pt")["global_step"] == 2
    resumed = _train(root, out, "--backend", "jax", "--epochs", "2", "--resume")
    unbroken = jax_run[1]
    for key, value in unbroken["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_loss_tracks_the_torch_backend(root, jax_run, tmp_path):
    """Same data, init and schedule: the first epoch's training loss as PyTorch's, the weights close."""
    torch_out = tmp_path / "torch"
    torch_checkpoint = _train(root, torch_out, "--backend", "torch", "--epochs", "2", "--no-channels-last")
    jax_records, torch_records = _records(jax_run[0]), _records(torch_out)
    assert jax_records[0]["train_loss"] == pytest.approx(torch_records[0]["train_loss"], rel=1e-3)
    assert [r["lr"] for r in jax_records] == pytest.approx([r["lr"] for r in torch_records])
    weight = "score32.weight"
    torch.testing.assert_close(jax_run[1]["state_dict"][weight], torch_checkpoint["state_dict"][weight],
                               rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("field,value,option", [("amp", "bf16", "--amp bf16"), ("cache_features", 2, "--cache-features"),
                                                ("device", "cuda", "--device cuda"), ("variant", "2s", "--variant 2s")])
def test_refused_options_are_named(field, value, option):
    config = TrainConfig(root="x", **{field: value})
    with pytest.raises(OptionError, match=option):
        check_jax_config(config)


def test_predict_cli_jax_writes_the_torch_masks(root, jax_run, tmp_path):
    """``fcnseg predict CKPT DIR --backend jax`` on a JAX-trained checkpoint: the masks ``--backend torch`` writes."""
    import numpy as np
    from PIL import Image

    checkpoint = str(jax_run[0] / "last.pt")
    for backend in ("torch", "jax"):
        assert main(["predict", checkpoint, str(root / "images"), "--out", str(tmp_path / backend), "--backend", backend,
                     "--amp", "none", "--no-progress"]) == 0
    masks = sorted(p.name for p in (tmp_path / "torch").glob("*.png") if "_" not in p.stem)
    assert len(masks) == 6
    for name in masks:
        expected = np.array(Image.open(tmp_path / "torch" / name))
        got = np.array(Image.open(tmp_path / "jax" / name))
        assert (got == expected).mean() >= 0.999, name


@pytest.mark.slow  # about 14 s (XLA compiles a new model); 4s parity and gradients run by default in test_models/test_step
def test_fcn4s_trains_with_the_jax_backend(root, tmp_path):
    checkpoint = _train(root, tmp_path / "jax4s", "--backend", "jax", "--iterations", "1", "--variant", "4s")
    assert checkpoint["model_kwargs"]["variant"] == "4s"
    model = model_from_checkpoint(checkpoint)  # the Flax parameters load back into the torch 4s strictly
    assert model.upsample_final.stride == 4 and torch.count_nonzero(model.score4.weight) > 0
