"""Model zoo: CIFAR/MNIST variants used by the papers, plus an ImageNet-shape ResNet-50."""

from sparsetrain.models._registry import create_model, list_models, model_entrypoint, register_model

__all__ = ["create_model", "list_models", "model_entrypoint", "register_model"]
