"""fcnseg's JAX edition: the FCN in Flax, weights both ways with PyTorch, a "jax" inference engine, and
``fcnseg train --backend jax`` (docs/JAX.md). Needs the optional extra ``fcnseg[jax]``; nothing outside
this package and the CLI's train command imports it, so the PyTorch path never needs JAX installed.

Modules: `models` (Flax FCN-32s/16s/8s, ResNet-18/34/50 and MobileNetV2 bodies), `convert` (state
dicts <-> Flax variables), `engine` (the inference engine), `step` (loss, gradients, optimisers),
`train` (the training run).
"""
