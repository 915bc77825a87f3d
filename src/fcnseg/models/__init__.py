"""FCN models: torchvision bodies, score layers and transposed-convolution upsamplers."""
from fcnseg.models.backbones import BACKBONES, Backbone, build_backbone, load_weights_file
from fcnseg.models.fcn import (
    FCN,
    MODEL_BUILDERS,
    VARIANTS,
    build_model,
    fcn_mobilenet_v2,
    fcn_resnet18,
    fcn_resnet34,
    fcn_resnet50,
    list_models,
    pad_to_multiple,
)
from fcnseg.models.inference_form import fold_batchnorm, inference_form
from fcnseg.models.upsample import UPSAMPLER_CHOICES, TransposedConvUpsampler, bilinear_kernel

__all__ = [
    "BACKBONES", "Backbone", "build_backbone", "load_weights_file", "FCN", "MODEL_BUILDERS", "VARIANTS",
    "build_model", "fcn_mobilenet_v2", "fcn_resnet18", "fcn_resnet34", "fcn_resnet50", "list_models",
    "pad_to_multiple", "fold_batchnorm", "inference_form", "UPSAMPLER_CHOICES", "TransposedConvUpsampler", "bilinear_kernel",
]
