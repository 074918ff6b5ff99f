"""The model zoo: mdistiller's CIFAR architectures under mdistiller's names, and torchvision's
ImageNet ResNets and MobileNetV2 under ``tv_<torchvision name>`` (:mod:`kdtune.models.torchvision_models`),
and mdistiller's ImageNet ``MobileNetV1`` (:mod:`kdtune.models.mobilenetv1`).

State-dict keys and shapes match mdistiller's definitions, so its published
teacher checkpoints load strictly. Every model maps an image batch to
``(logits, features)``; see :class:`kdtune.models.base.Features`.
"""
from __future__ import annotations

from torch import nn

# Importing the model modules runs their ``@MODELS.register`` decorators.
from kdtune.models import (  # noqa: F401
    mobilenetv1,
    mobilenetv2,
    resnet,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    torchvision_models,
    vgg,
    wrn,
)
from kdtune.models.base import MODELS, Features, StagedModel

__all__ = ["MODELS", "Features", "StagedModel", "build_model"]


def build_model(name: str, *, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """Build a registered model; unknown names raise ``kdtune.registry.UnknownNameError``."""
    from kdtune.plugins import load_plugins

    load_plugins()
    return MODELS.build(name, num_classes=num_classes, in_channels=in_channels)
