"""`class_map` against numpy's argmax: the same classes, ties to the lower class, any layout."""
import numpy as np
import pytest
import torch

from fcnseg.ops.argmax import class_map


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_class_map_is_numpy_argmax_with_ties_to_the_lower_class(dtype, channels_last):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 9, 11, generator=generator).round(decimals=1).to(dtype)  # rounding makes ties
    logits[:, 4] = logits[:, 2]                                                          # and whole tied planes
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    expected = np.argmax(logits.float().numpy(), axis=1)
    assert (logits[:, 2] == logits[:, 4]).all() and (expected != 4).all()
    got = class_map(logits)
    assert got.dtype == torch.int64 and got.shape == (3, 9, 11)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_class_map_of_one_image_along_dim_0():
    logits = torch.randn(5, 6, 8, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(class_map(logits, 0).numpy(), np.argmax(logits.numpy(), axis=0))
