"""experiments/decoder_probe.py: the decoder blocks replace the fine skips and start as they do, at zero."""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from fcnseg import build_model
from tests.conftest import REPO_ROOT  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
from decoder_probe import with_decoder  # noqa: E402


def test_fine_skips_get_decoder_blocks_that_start_at_zero():
    torch.manual_seed(0)
    plain = build_model("fcn_mobilenet_v2", variant="4s", num_classes=5, weights_backbone=None).eval()
    torch.manual_seed(0)
    decoded = with_decoder(build_model, 16)("fcn_mobilenet_v2", variant="4s", num_classes=5, weights_backbone=None)
    decoded.eval()
    for name, channels in (("score4", 24), ("score8", 32)):
        block = getattr(decoded, name)
        assert isinstance(block, nn.Sequential) and block[0].in_channels == channels and block[-1].out_channels == 5
    assert isinstance(decoded.score16, nn.Conv2d)  # the coarse skip stays a 1x1 score layer
    decoded.load_state_dict({**decoded.state_dict(), **{k: v for k, v in plain.state_dict().items()
                                                        if not k.startswith(("score4", "score8"))}})
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(decoded(image), plain(image))  # zero-initialised skips add nothing yet
    trained = copy.deepcopy(decoded)
    nn.init.normal_(trained.score4[-1].weight, std=0.1)
    with torch.no_grad():
        assert not torch.allclose(trained(image), plain(image))  # and they are in the computation
