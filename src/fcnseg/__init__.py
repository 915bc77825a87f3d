"""fcnseg: semantic segmentation with Fully Convolutional Networks on PyTorch."""
from fcnseg.errors import CheckpointError, DataError, FcnsegError, WeightsError
from fcnseg.models import (
    FCN,
    bilinear_kernel,
    build_model,
    fcn_mobilenet_v2,
    fcn_resnet18,
    fcn_resnet34,
    fcn_resnet50,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "__version__", "FCN", "bilinear_kernel", "build_model", "fcn_mobilenet_v2", "fcn_resnet18",
    "fcn_resnet34", "fcn_resnet50", "list_models", "FcnsegError", "DataError", "CheckpointError", "WeightsError",
]
