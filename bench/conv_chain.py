"""Writes a chain of 3x3 Convs (padding 1, each followed by a Relu) as an ONNX
model, to time one layer shape in isolation with
`mlcapsule bench --model FILE --plain-only` or `bench/vs-onnxruntime`.

    .venv/bin/python bench/conv_chain.py --channels 512 --size 14 -o /tmp/c512_14.onnx

The weights are seeded random values (the same on every run); only their
shape matters for timing. Several Convs in a row (--count, default 3) keep
the input of each in cache as it would be inside a network.
"""

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def chain(channels: int, size: int, count: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights, nodes = [], []
    value = "x"
    for i in range(count):
        w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.05
        b = rng.standard_normal(channels).astype(np.float32) * 0.1
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [value, f"w{i}", f"b{i}"], [f"conv{i}"],
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        value = "y" if i == count - 1 else f"relu{i}"
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [value]))
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, f"conv3x3_chain_{channels}x{size}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, required=True, help="channels in and out of every Conv")
    parser.add_argument("--size", type=int, required=True, help="image height and width")
    parser.add_argument("--count", type=int, default=3, help="Convs in the chain (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True, help="where to write the .onnx file")
    args = parser.parse_args()
    onnx.save(chain(args.channels, args.size, args.count, args.seed), args.output)


if __name__ == "__main__":
    main()
