"""Routed backbones and multi-task heads, one call convention: ``model(x, task, train)``."""
from tr_jax.models.backbones import MLP, RoutedResNet, RoutedResNet18, RoutedVGG, SmallCNN
from tr_jax.models.base import MultiTaskModel, apply_all_tasks
from tr_jax.models.heads import MultiTaskHead

__all__ = ["MLP", "MultiTaskHead", "MultiTaskModel", "RoutedResNet", "RoutedResNet18",
           "RoutedVGG", "SmallCNN", "apply_all_tasks"]
