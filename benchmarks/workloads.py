"""Benchmark workloads: lists of parameter shapes, derived from the architectures by hand.

torchvision / transformers are not needed: the shapes below follow the published models
(torch layout: conv weights are (out, in, kh, kw), linear weights (out, in)) and the
self-checks at the bottom pin the tensor counts and totals.
"""

from __future__ import annotations

from math import prod

import numpy as np

Shape = tuple


def resnet50_shapes() -> list[Shape]:
    """The 161 trainable tensors of torchvision's ResNet-50 (25,557,032 parameters), in
    ``model.parameters()`` order: conv1, bn1, four stages of bottlenecks, fc."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks, _stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        out_ch = width * 4
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),        # conv1 + bn1 (1x1 reduce)
                       (width, width, 3, 3), (width,), (width,),        # conv2 + bn2 (3x3)
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]     # conv3 + bn3 (1x1 expand)
            if b == 0:                                                   # downsample: 1x1 conv + bn
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def bert_base_shapes() -> list[Shape]:
    """The 199 trainable tensors of BERT-base uncased with its pooler (109,482,240 parameters):
    embeddings (word 30522, position 512, token type 2, LayerNorm), 12 encoder layers
    (Q, K, V, attention output, LayerNorm, intermediate 3072, output, LayerNorm), pooler."""
    hidden, inter, vocab, positions, types = 768, 3072, 30522, 512, 2
    shapes: list[Shape] = [(vocab, hidden), (positions, hidden), (types, hidden), (hidden,), (hidden,)]
    for _ in range(12):
        for _qkv in range(3):
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,)]      # attention output + LN
        shapes += [(inter, hidden), (inter,), (hidden, inter), (hidden,)]  # intermediate + output
        shapes += [(hidden,), (hidden,)]                                    # output LN
    shapes += [(hidden, hidden), (hidden,)]                                 # pooler
    return shapes


def small_shapes(count: int = 2000, low: int = 1, high: int = 4096, seed: int = 0) -> list[Shape]:
    """``count`` 1-D tensors of ``low..high`` elements (uniform, seeded)."""
    rng = np.random.default_rng(seed)
    return [(int(n),) for n in rng.integers(low, high + 1, count)]


def numel(shapes: list[Shape]) -> int:
    """Total element count of a shape list."""
    return int(sum(prod(s) for s in shapes))


#: name -> (description, shapes). Sizes are elements of float32.
WORKLOADS: dict = {
    "big64M": ("one 64M-element tensor (DRAM)", [(64 * 2**20,)]),
    "resnet50": ("ResNet-50 parameters: 161 tensors, 25.6M", resnet50_shapes()),
    "bert_base": ("BERT-base parameters: 199 tensors, 109.5M", bert_base_shapes()),
    "small2000": ("2,000 tensors of 1..4096 elements (seed 0)", small_shapes()),
    "flat2000": ("the 2,000 small tensors' elements as one flat tensor", [(numel(small_shapes()),)]),
    "cache64K": ("one 64K-element tensor (in L2)", [(65536,)]),
}

assert len(resnet50_shapes()) == 161 and numel(resnet50_shapes()) == 25_557_032
assert len(bert_base_shapes()) == 199 and numel(bert_base_shapes()) == 109_482_240
