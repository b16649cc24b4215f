"""Parameter shapes of the models the benchmarks time (written out, so no model library is needed)."""

from __future__ import annotations

import math


def resnet50_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The 161 parameter tensors of ResNet-50 (He et al. 2016), torchvision's order: 25.6M parameters."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if block == 0:
                shapes += [(4 * width, in_channels, 1, 1), (4 * width,), (4 * width,)]
            in_channels = 4 * width
    return shapes + [(num_classes, 2048), (num_classes,)]


def vit_b16_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The 152 parameter tensors of ViT-B/16 at 224x224 (Dosovitskiy et al. 2021): 86.6M parameters."""
    dim, mlp, tokens = 768, 3072, 197
    shapes: list[tuple[int, ...]] = [(1, 1, dim), (dim, 3, 16, 16), (dim,), (1, tokens, dim)]
    for _ in range(12):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return shapes + [(dim,), (dim,), (num_classes, dim), (num_classes,)]


PARAM_SETS = {
    "resnet50": resnet50_shapes,
    "vit_b16": vit_b16_shapes,
    "many_small": lambda: [(4096,)] * 2000,
    "few_large": lambda: [(64 * 2**20,)] * 4,
}


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)
