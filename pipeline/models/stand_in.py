"""A stand-in for a team's ImageNet checkpoint of a large variant, where no published weights can be downloaded.

What decides INT8's cost is the architecture, and what decides its accuracy is how far the quantization noise
moves the logits against their margins. Weights as initialised have neither a trained net's residual branches
(layer scales at 1e-6 switch every block off) nor its margins (a random head's logits are nearly equal, so any
noise flips the top-1, and agreement says nothing). So: the initialised weights, layer scales at `GAMMA` (a
trained ConvNeXt's sit around 0.1-1), and a 1,000-class head fitted on the data's classes the way a linear probe
is, each class's row its mean pooled feature less the mean over all classes (nearest class mean), scaled to
`MARGIN` logits between the classes' means; every other class gets the bias `OTHER_BIAS`, as a trained head's
rows do for images of classes it does not see. Its predictions on real images are then a classifier's, with a
classifier's margins.
"""
from __future__ import annotations

import torch

from convnext_deploy.pipeline.models.convnext import ConvNeXt, create_model

GAMMA = 0.1
MARGIN = 8.0  # logits between two classes' mean features, like a trained head's confident predictions
OTHER_BIAS = -20.0


def pooled_features(model: ConvNeXt, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """The head's input: the final norm of the globally pooled features."""
    with torch.no_grad():
        return torch.cat([model.head.norm(model.forward_features(images[i:i + batch]).mean((2, 3)))
                          for i in range(0, len(images), batch)])


def stand_in(variant: str, images: torch.Tensor, labels: torch.Tensor, class_index: list[int],
             num_classes: int = 1000, seed: int = 0) -> ConvNeXt:
    """`variant` as initialised (seed), layer scales at GAMMA, and its head fitted on `images` (N, 3, H, W,
    preprocessed) of `labels` (0…len(class_index)-1), class k at output `class_index[k]`."""
    torch.manual_seed(seed)
    model = create_model(variant, num_classes=num_classes).eval()
    with torch.no_grad():
        for stage in model.stages:
            for block in stage.blocks:
                block.gamma.fill_(GAMMA)
        feats = pooled_features(model, images)
        means = torch.stack([feats[labels == k].mean(0) for k in range(len(class_index))])
        centre = means.mean(0)
        rows = means - centre
        spread = (rows @ rows.T).diagonal().mean()  # a class mean's logit above the centre's, before scaling
        weight = rows * (MARGIN / spread)
        fc = model.head.fc
        fc.weight.zero_()
        fc.bias.fill_(OTHER_BIAS)
        for k, c in enumerate(class_index):
            fc.weight[c] = weight[k]
            fc.bias[c] = -(weight[k] @ centre)
    return model
