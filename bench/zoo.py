#!/usr/bin/env python3
"""Export torchvision architectures beyond the three reference models to ONNX, for
`bench/zoo` (our engine against onnxruntime on each).

Writes build/zoo/NAME.onnx (not committed): opset 13, input 'input' [N,3,224,224]
float32 with a dynamic batch axis, output 'output' [N,1000]. The weights are
torchvision's random initialisation (seed 0: no pretrained weights can be
downloaded here), with each BatchNormalization's running statistics then set from
the batch statistics of a forward pass on a fixed random batch, so that every
layer's activations have about unit scale and the logits are not vanishingly
small: on the raw initialisation EfficientNet-B0's logits were about 1e-20, and
comparing such outputs with onnxruntime's checks nothing.

A model whose file exists is skipped unless --force.

Usage: .venv/bin/python bench/zoo.py [--out DIR] [--force] [NAME ...]
"""

import argparse
from pathlib import Path

import torch
import torchvision

# Architectures our engine imports (ShuffleNet computes its reshapes at run time,
# ConvNeXt needs LayerNorm and Transpose, Inception-v3 pads before its pools).
MODELS = [
    "alexnet",
    "squeezenet1_1",
    "googlenet",
    "resnet50",
    "resnext50_32x4d",
    "densenet121",
    "regnet_y_400mf",
    "mnasnet1_0",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
]


def calibrated(name):
    """The architecture, random weights, BatchNormalization statistics from one batch."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    net = getattr(torchvision.models, name)(weights=None, **kwargs)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    return net.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/zoo")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("names", nargs="*", default=MODELS, metavar="NAME")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        path = out / f"{name}.onnx"
        if path.exists() and not args.force:
            continue
        net = calibrated(name)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
        torch.onnx.export(
            net,
            x,
            str(path),
            opset_version=13,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
        with torch.no_grad():
            scale = net(x).abs().max().item()
        print(f"{path}: largest logit {scale:.3g}")


if __name__ == "__main__":
    main()
