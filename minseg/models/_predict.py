"""The wrapper every model's predict() runs under: inference leaves the model exactly as it found it."""
from __future__ import annotations

import functools

import torch


def inference(predict):
    """Run predict(self, images) in eval mode under torch.no_grad, then put every submodule back in the mode it
    was in. A model left in train mode would otherwise predict with batch statistics and update BatchNorm's
    running statistics: predicting must not change the model."""

    @functools.wraps(predict)
    def run(self: torch.nn.Module, images):
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                return predict(self, images)
        finally:
            for module, training in modes:
                module.training = training

    return run
