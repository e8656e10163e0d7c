"""Per-operator ONNX test vectors for capsule-onnx, with onnxruntime as the oracle.

Each case is a folder `<case>/` beside this script holding
  model.onnx                  a small model built with onnx.helper
  input_0.npy, input_1.npy    float32 inputs, in graph-input order
  output_0.npy, ...           onnxruntime's outputs (CPUExecutionProvider)
The Rust test `crates/onnx/tests/vectors.rs` walks the folders, imports each
model, runs it with capsule_engine::Model and compares.

Rebuild (deterministic: every case seeds its own generator from its name):
  /work/main/.venv/bin/python crates/onnx/tests/vectors/generate.py
Needs onnx, onnxruntime and numpy only.
"""

import os
import shutil
import zlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = []


def case(fn):
    CASES.append(fn)
    return fn


class Case:
    """A model under construction: inputs with data, initializers, nodes."""

    def __init__(self, name, opset=13, ir_version=None):
        self.name = name
        self.opset = opset
        self.ir_version = ir_version
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.inputs = []  # (value_info, array)
        self.inits = []
        self.nodes = []
        self.outputs = []
        self.inits_as_inputs = False

    def input(self, name, shape, dynamic_batch=True, data=None):
        arr = self.rng.standard_normal(shape).astype(np.float32) if data is None else data
        dims = ["N" if dynamic_batch and i == 0 else d for i, d in enumerate(shape)]
        self.inputs.append((helper.make_tensor_value_info(name, TensorProto.FLOAT, dims), arr))
        return name

    def init(self, name, arr):
        arr = np.asarray(arr)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, name, shape, scale=0.5):
        return self.init(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op, inputs, outputs, name="", **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def output(self, name):
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def write(self):
        graph_inputs = [vi for vi, _ in self.inputs]
        if self.inits_as_inputs:
            graph_inputs += [
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits
            ]
        graph = helper.make_graph(self.nodes, self.name, graph_inputs, self.outputs, self.inits)
        kwargs = {"opset_imports": [helper.make_opsetid("", self.opset)]}
        if self.ir_version is not None:
            kwargs["ir_version"] = self.ir_version
        model = helper.make_model(graph, producer_name="capsule-onnx generate.py", **kwargs)
        feeds = {vi.name: arr for vi, arr in self.inputs}
        outs = run(model, feeds)
        # Declare the outputs' shapes as exporters do (the checker wants them),
        # with a symbolic batch dimension when the inputs have one.
        dynamic = any(d.dim_param for vi, _ in self.inputs for d in vi.type.tensor_type.shape.dim)
        del model.graph.output[:]
        for out, arr in zip(self.outputs, outs):
            dims = ["N" if dynamic and i == 0 else d for i, d in enumerate(arr.shape)]
            model.graph.output.append(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, dims))
        if self.opset <= 17:  # onnx 1.12 knows operator schemas up to opset 17
            onnx.checker.check_model(model)
        data = model.SerializeToString()
        again = run(model, feeds)
        assert all(np.array_equal(a, b) for a, b in zip(outs, again)), self.name
        folder = os.path.join(HERE, self.name)
        os.makedirs(folder)
        with open(os.path.join(folder, "model.onnx"), "wb") as f:
            f.write(data)
        for i, (_, arr) in enumerate(self.inputs):
            np.save(os.path.join(folder, f"input_{i}.npy"), np.ascontiguousarray(arr, np.float32))
        for i, arr in enumerate(outs):
            assert arr.dtype == np.float32, (self.name, arr.dtype)
            np.save(os.path.join(folder, f"output_{i}.npy"), np.ascontiguousarray(arr))


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# ---------------------------------------------------------------- Conv


def conv_case(name, x_shape, w_shape, bias=True, opset=13, kernel_attr=True, **attrs):
    c = Case(name, opset)
    x = c.input("x", x_shape)
    w = c.weight("w", w_shape)
    ins = [x, w]
    if bias:
        ins.append(c.weight("b", [w_shape[0]]))
    if kernel_attr:
        attrs["kernel_shape"] = w_shape[2:]
    c.output(c.node("Conv", ins, ["y"], name="conv", **attrs))
    return c


@case
def conv_plain():
    return conv_case("conv_plain", [2, 3, 7, 7], [4, 3, 3, 3], kernel_attr=False)


@case
def conv_no_bias():
    return conv_case("conv_no_bias", [1, 3, 6, 6], [5, 3, 3, 3], bias=False, pads=[1, 1, 1, 1])


@case
def conv_stride2():
    return conv_case("conv_stride2", [2, 3, 9, 8], [4, 3, 3, 3], strides=[2, 2], pads=[1, 1, 1, 1])


@case
def conv_pads_asymmetric():
    return conv_case("conv_pads_asymmetric", [1, 2, 6, 5], [3, 2, 3, 3], pads=[0, 1, 2, 1])


@case
def conv_dilation2():
    return conv_case("conv_dilation2", [1, 2, 9, 9], [3, 2, 3, 3], dilations=[2, 2], pads=[2, 1, 2, 1])


@case
def conv_groups2():
    return conv_case("conv_groups2", [2, 4, 6, 6], [6, 2, 3, 3], group=2, pads=[1, 1, 1, 1])


@case
def conv_depthwise():
    return conv_case(
        "conv_depthwise", [1, 4, 7, 7], [4, 1, 3, 3], group=4, strides=[2, 2], pads=[1, 1, 1, 1]
    )


@case
def conv_depthwise_5x5():
    # EfficientNet's window: every depthwise Conv but 3x3 with one cell of padding
    # takes the engine's general depthwise path.
    return conv_case(
        "conv_depthwise_5x5", [1, 6, 14, 14], [6, 1, 5, 5], group=6, pads=[2, 2, 2, 2]
    )


@case
def conv_depthwise_5x5_stride2_asymmetric():
    return conv_case(
        "conv_depthwise_5x5_stride2_asymmetric",
        [2, 5, 15, 13],
        [5, 1, 5, 5],
        group=5,
        strides=[2, 2],
        pads=[2, 1, 1, 2],
    )


@case
def conv_depthwise_dilated():
    return conv_case(
        "conv_depthwise_dilated",
        [1, 3, 9, 10],
        [3, 1, 3, 3],
        group=3,
        dilations=[2, 2],
        pads=[2, 2, 2, 2],
    )


@case
def conv_depthwise_7x3_strides_1_2():
    return conv_case(
        "conv_depthwise_7x3_strides_1_2",
        [1, 4, 7, 9],
        [4, 1, 7, 3],
        group=4,
        strides=[1, 2],
        pads=[3, 1, 3, 1],
    )


@case
def conv_depthwise_unpadded_stride3():
    return conv_case(
        "conv_depthwise_unpadded_stride3", [1, 4, 11, 10], [4, 1, 3, 3], group=4, strides=[3, 3]
    )


@case
def conv_depthwise_5x5_sixteen_planes():
    # 20 channels onto 7x7 planes, batch 2: sixteen planes at a time where
    # they are channels of one image, one at a time for the rest.
    return conv_case(
        "conv_depthwise_5x5_sixteen_planes", [2, 20, 7, 7], [20, 1, 5, 5], group=20, pads=[2, 2, 2, 2]
    )


@case
def conv_depthwise_3x5_sixteen_planes_strided():
    return conv_case(
        "conv_depthwise_3x5_sixteen_planes_strided",
        [1, 16, 9, 11],
        [16, 1, 3, 5],
        group=16,
        strides=[2, 2],
        dilations=[1, 2],
        pads=[1, 3, 0, 2],
    )


@case
def conv_1x1():
    return conv_case("conv_1x1", [3, 5, 4, 4], [6, 5, 1, 1], opset=11)


@case
def conv_rect_kernel():
    return conv_case("conv_rect_kernel", [1, 2, 7, 6], [3, 2, 3, 1], strides=[2, 1], opset=17)


def conv_auto_pad(name, mode, strides):
    c = conv_case(name, [1, 2, 7, 8], [3, 2, 3, 3], auto_pad=mode, strides=strides)
    # A fixed input size, so that SAME padding with stride 2 can be computed.
    c.inputs[0] = (helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 8]), c.inputs[0][1])
    return c


@case
def conv_auto_pad_same_upper():
    return conv_auto_pad("conv_auto_pad_same_upper", "SAME_UPPER", [2, 2])


@case
def conv_auto_pad_same_lower():
    return conv_auto_pad("conv_auto_pad_same_lower", "SAME_LOWER", [2, 2])


@case
def conv_auto_pad_same_stride1():
    # Dynamic batch: stride 1 needs no input size.
    return conv_case("conv_auto_pad_same_stride1", [2, 2, 5, 6], [3, 2, 3, 3], auto_pad="SAME_UPPER")


@case
def conv_auto_pad_valid():
    return conv_auto_pad("conv_auto_pad_valid", "VALID", [2, 1])


@case
def conv_depthwise_pointwise():
    """A MobileNet block: depthwise 3x3, ReLU6 (Clip), pointwise 1x1."""
    c = Case("conv_depthwise_pointwise", 13)
    x = c.input("x", [2, 4, 6, 6])
    dw = c.node("Conv", [x, c.weight("dw", [4, 1, 3, 3]), c.weight("dw_b", [4])], ["dw_out"],
                group=4, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    r = c.node("Clip", [dw, c.init("zero", np.float32(0)), c.init("six", np.float32(6))], ["r6"])
    c.output(c.node("Conv", [r, c.weight("pw", [8, 4, 1, 1])], ["y"], kernel_shape=[1, 1]))
    return c


# ---------------------------------------------------------------- Gemm / MatMul


def gemm_case(name, a_shape, b_shape, c_shape=None, opset=13, **attrs):
    c = Case(name, opset)
    ins = [c.input("a", a_shape), c.weight("b", b_shape)]
    if c_shape is not None:
        ins.append(c.weight("c", c_shape))
    c.output(c.node("Gemm", ins, ["y"], **attrs))
    return c


@case
def gemm_plain():
    return gemm_case("gemm_plain", [3, 5], [5, 4], [4])


@case
def gemm_trans_a():
    c = gemm_case("gemm_trans_a", [5, 3], [5, 4], [1, 4], transA=1)
    return c


@case
def gemm_trans_b():
    return gemm_case("gemm_trans_b", [3, 5], [4, 5], [4], transB=1)


@case
def gemm_alpha_beta_full_c():
    return gemm_case("gemm_alpha_beta_full_c", [3, 5], [5, 4], [3, 4], alpha=0.5, beta=2.0, opset=11)


@case
def gemm_c_column():
    return gemm_case("gemm_c_column", [3, 5], [4, 5], [3, 1], transB=1, beta=-1.0)


@case
def gemm_c_scalar():
    return gemm_case("gemm_c_scalar", [2, 5], [5, 4], [], transA=0, alpha=2.0)


@case
def gemm_no_c():
    return gemm_case("gemm_no_c", [3, 5], [4, 5], None, transB=1)


@case
def gemm_opset7():
    return gemm_case("gemm_opset7", [2, 3], [3, 4], [4], opset=7)


@case
def gemm_initializers_as_inputs():
    """IR version 3 listed initializers among the graph inputs."""
    c = Case("gemm_initializers_as_inputs", opset=8, ir_version=3)
    ins = [c.input("a", [2, 3]), c.weight("b", [4, 3]), c.weight("c", [4])]
    c.output(c.node("Gemm", ins, ["y"], transB=1))
    c.inits_as_inputs = True
    return c


@case
def matmul_2d():
    c = Case("matmul_2d")
    c.output(c.node("MatMul", [c.input("a", [3, 5]), c.weight("b", [5, 4])], ["y"]))
    return c


@case
def matmul_batched_broadcast():
    c = Case("matmul_batched_broadcast")
    c.output(c.node("MatMul", [c.input("a", [2, 1, 3, 4]), c.weight("b", [3, 4, 5])], ["y"]))
    return c


@case
def matmul_two_inputs():
    c = Case("matmul_two_inputs")
    a = c.input("a", [2, 3, 4])
    b = c.input("b", [2, 4, 2])
    c.output(c.node("MatMul", [a, b], ["y"]))
    return c


# ---------------------------------------------------------------- activations


def unary_case(name, op, opset=13, shape=(2, 3, 4)):
    c = Case(name, opset)
    c.output(c.node(op, [c.input("x", list(shape), data=None)], ["y"]))
    c.inputs[0] = (c.inputs[0][0], (c.inputs[0][1] * 3).astype(np.float32))
    return c


@case
def relu():
    return unary_case("relu", "Relu")


@case
def sigmoid():
    return unary_case("sigmoid", "Sigmoid")


@case
def sigmoid_wide_range():
    # Past where exp(-x) overflows or the result is subnormal, both ways.
    c = Case("sigmoid_wide_range")
    x = np.concatenate([np.linspace(-120, 120, 2401), [-1e30, 1e30, -88.5, 88.5, 0.0]])
    c.output(c.node("Sigmoid", [c.input("x", [1, x.size], data=x.astype(np.float32).reshape(1, -1))], ["y"]))
    return c


@case
def silu_after_conv():
    # EfficientNet's activation: the engine fuses the Sigmoid and the Mul.
    c = Case("silu_after_conv")
    x = c.input("x", [1, 3, 6, 6])
    y = c.node("Conv", [x, c.weight("w", [4, 3, 3, 3]), c.weight("b", [4])], ["y"], pads=[1, 1, 1, 1])
    s = c.node("Sigmoid", [y], ["s"])
    c.output(c.node("Mul", [y, s], ["z"]))
    return c


@case
def silu_sigmoid_first_and_shared():
    # Mul(sigmoid(x), x) on a graph input (fused, not in place), then a
    # Sigmoid that is also a graph output (not fused).
    c = Case("silu_sigmoid_first_and_shared")
    x = c.input("x", [2, 5, 7], data=None)
    c.inputs[0] = (c.inputs[0][0], (c.inputs[0][1] * 6).astype(np.float32))
    s = c.node("Sigmoid", [x], ["s"])
    m = c.node("Mul", [s, x], ["m"])
    t = c.node("Sigmoid", [m], ["t"])
    c.output(c.node("Mul", [m, t], ["z"]))
    c.output(t)
    return c


@case
def bn_statistics_through_identity():
    # PyTorch writes one initializer for equal tensors and Identity nodes for
    # the others: BatchNormalization then reads its mean and variance through them.
    c = Case("bn_statistics_through_identity")
    x = c.input("x", [2, 3, 4, 4])
    mean = c.node("Identity", [c.init("m0", np.zeros(3, np.float32))], ["m"])
    var = c.node("Identity", [c.init("v0", np.ones(3, np.float32))], ["v"])
    ins = [x, c.weight("scale", [3]), c.weight("bias", [3]), mean, var]
    c.output(c.node("BatchNormalization", ins, ["y"], epsilon=1e-5))
    return c


@case
def pad_nothing_before_avgpool():
    # DenseNet's transitions as PyTorch exports them: a Pad of no cells.
    c = Case("pad_nothing_before_avgpool")
    x = c.input("x", [1, 2, 6, 6])
    p = c.node("Pad", [x, c.init("pads", np.zeros(8, np.int64))], ["p"], mode="constant")
    c.output(c.node("AveragePool", [p], ["y"], kernel_shape=[2, 2], strides=[2, 2]))
    return c


@case
def pad_nothing_opset7():
    c = Case("pad_nothing_opset7", opset=7)
    x = c.input("x", [1, 2, 3, 3])
    c.output(c.node("Relu", [c.node("Pad", [x], ["p"], pads=[0] * 8)], ["y"]))
    return c


@case
def hard_sigmoid_attributes():
    c = Case("hard_sigmoid_attributes", opset=7)
    x = c.input("x", [2, 3, 4])
    c.inputs[0] = (c.inputs[0][0], (c.inputs[0][1] * 4).astype(np.float32))
    c.output(c.node("HardSigmoid", [x], ["y"], alpha=0.3, beta=0.4))
    return c


@case
def hard_swish_opset14():
    c = Case("hard_swish_opset14", opset=14)
    x = c.input("x", [2, 3, 4])
    c.inputs[0] = (c.inputs[0][0], (c.inputs[0][1] * 5).astype(np.float32))
    c.output(c.node("HardSwish", [x], ["y"]))
    return c


@case
def hard_swish_and_squeeze_excite():
    # MobileNetV3 as PyTorch exports it at opset 13: HardSwish as HardSigmoid
    # and Mul (fused by the engine), and a squeeze-excite gate, HardSigmoid of
    # another value broadcast over the planes (not fused).
    c = Case("hard_swish_and_squeeze_excite")
    x = c.input("x", [1, 4, 5, 5])
    c.inputs[0] = (c.inputs[0][0], (c.inputs[0][1] * 5).astype(np.float32))
    g = c.node("HardSigmoid", [x], ["g"], alpha=1.0 / 6, beta=0.5)
    h = c.node("Mul", [x, g], ["h"])
    pooled = c.node("GlobalAveragePool", [h], ["p"])
    se = c.node("Conv", [pooled, c.weight("w", [4, 4, 1, 1])], ["q"])
    gate = c.node("HardSigmoid", [se], ["r"], alpha=1.0 / 6, beta=0.5)
    c.output(c.node("Mul", [h, gate], ["y"]))
    return c


@case
def reduce_mean_spatial():
    # MNASNet's last pooling: the mean over H and W, dropped.
    c = Case("reduce_mean_spatial")
    x = c.input("x", [2, 3, 4, 5])
    c.output(c.node("ReduceMean", [x], ["y"], axes=[2, 3], keepdims=0))
    return c


@case
def reduce_mean_spatial_kept_opset18():
    c = Case("reduce_mean_spatial_kept_opset18", opset=18)
    x = c.input("x", [1, 3, 4, 4])
    c.output(c.node("ReduceMean", [x, c.init("axes", np.array([-1, -2], np.int64))], ["y"]))
    return c


@case
def tanh():
    return unary_case("tanh", "Tanh", opset=17)


@case
def relu_opset21():
    return unary_case("relu_opset21", "Relu", opset=21)


@case
def clip_inputs_opset13():
    c = Case("clip_inputs_opset13")
    x = c.input("x", [2, 3, 4])
    c.output(c.node("Clip", [x, c.init("lo", np.float32(-0.5)), c.init("hi", np.float32(0.7))], ["y"]))
    return c


@case
def clip_max_only_opset13():
    c = Case("clip_max_only_opset13")
    x = c.input("x", [2, 5])
    c.output(c.node("Clip", [x, "", c.init("hi", np.float32(0.3))], ["y"]))
    return c


@case
def clip_attributes_opset10():
    """Clip-6: bounds as attributes (opsets 6 to 10)."""
    c = Case("clip_attributes_opset10", opset=10)
    x = c.input("x", [2, 3, 4])
    c.output(c.node("Clip", [x], ["y"], min=0.0, max=6.0))
    c.inputs[0] = (c.inputs[0][0], (c.inputs[0][1] * 5).astype(np.float32))
    return c


# ---------------------------------------------------------------- pooling


def pool_case(name, op, x_shape, opset=13, **attrs):
    c = Case(name, opset)
    c.output(c.node(op, [c.input("x", x_shape)], ["y"], **attrs))
    return c


@case
def maxpool_plain():
    return pool_case("maxpool_plain", "MaxPool", [2, 3, 6, 6], kernel_shape=[2, 2], strides=[2, 2])


@case
def maxpool_pads():
    return pool_case("maxpool_pads", "MaxPool", [1, 2, 5, 5], kernel_shape=[3, 3], pads=[1, 1, 1, 1])


@case
def maxpool_stride_asymmetric_pads():
    return pool_case("maxpool_stride_asymmetric_pads", "MaxPool", [1, 2, 7, 6],
                     kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1])


@case
def maxpool_ceil_mode():
    return pool_case("maxpool_ceil_mode", "MaxPool", [1, 2, 8, 7], kernel_shape=[3, 3], strides=[2, 2],
                     ceil_mode=1)


@case
def maxpool_dilation2():
    return pool_case("maxpool_dilation2", "MaxPool", [1, 2, 8, 8], kernel_shape=[2, 2], dilations=[2, 2],
                     opset=12)


@case
def maxpool_same_upper():
    c = pool_case("maxpool_same_upper", "MaxPool", [1, 2, 7, 7], kernel_shape=[3, 3], strides=[2, 2],
                  auto_pad="SAME_UPPER")
    c.inputs[0] = (helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 7]), c.inputs[0][1])
    return c


@case
def maxpool_opset8():
    return pool_case("maxpool_opset8", "MaxPool", [1, 2, 6, 6], kernel_shape=[2, 2], strides=[2, 2], opset=8)


@case
def avgpool_exclude_pad():
    return pool_case("avgpool_exclude_pad", "AveragePool", [2, 2, 5, 5], kernel_shape=[3, 3],
                     pads=[1, 1, 1, 1], count_include_pad=0)


@case
def avgpool_include_pad():
    return pool_case("avgpool_include_pad", "AveragePool", [2, 2, 5, 5], kernel_shape=[3, 3],
                     strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)


@case
def avgpool_ceil_mode():
    return pool_case("avgpool_ceil_mode", "AveragePool", [1, 2, 7, 8], kernel_shape=[3, 3],
                     strides=[2, 2], pads=[0, 0, 1, 0], ceil_mode=1)


@case
def avgpool_opset7():
    return pool_case("avgpool_opset7", "AveragePool", [1, 2, 6, 6], kernel_shape=[2, 2], strides=[2, 2],
                     opset=7)


@case
def global_average_pool():
    return pool_case("global_average_pool", "GlobalAveragePool", [3, 4, 5, 6])


# ---------------------------------------------------------------- arithmetic


@case
def add_broadcast_constant():
    c = Case("add_broadcast_constant")
    c.output(c.node("Add", [c.input("x", [2, 3, 4, 5]), c.weight("k", [3, 1, 1])], ["y"]))
    return c


@case
def sub_broadcast_inputs():
    c = Case("sub_broadcast_inputs")
    c.output(c.node("Sub", [c.input("x", [2, 3, 4]), c.input("z", [4], dynamic_batch=False)], ["y"]))
    return c


@case
def mul_broadcast_bidirectional():
    c = Case("mul_broadcast_bidirectional")
    a = c.input("a", [2, 1, 4, 1])
    b = c.input("b", [3, 1, 5], dynamic_batch=False)
    c.output(c.node("Mul", [a, b], ["y"]))
    return c


@case
def div_broadcast_constant_first():
    c = Case("div_broadcast_constant_first", opset=7)
    k = c.init("k", np.linspace(1, 2, 3, dtype=np.float32).reshape(1, 3, 1, 1))
    x = c.input("x", [2, 3, 2, 2], data=np.random.default_rng(7).uniform(1, 3, [2, 3, 2, 2]).astype(np.float32))
    c.output(c.node("Div", [k, x], ["y"]))
    return c


@case
def sum_three_inputs():
    c = Case("sum_three_inputs", opset=8)
    a = c.input("a", [2, 3, 4])
    b = c.input("b", [4], dynamic_batch=False)
    c.output(c.node("Sum", [a, b, c.weight("k", [3, 1])], ["y"]))
    return c


@case
def constant_of_shape():
    c = Case("constant_of_shape", opset=9)
    x = c.input("x", [2, 3])
    c.node("ConstantOfShape", [c.init("shape", np.array([3], np.int64))], ["k"],
           value=numpy_helper.from_array(np.array([0.25], np.float32)))
    c.output(c.node("Mul", [x, "k"], ["y"]))
    return c


# ---------------------------------------------------------------- layout


@case
def concat_axis1():
    c = Case("concat_axis1")
    c.output(c.node("Concat", [c.input("a", [2, 3, 4]), c.input("b", [2, 1, 4])], ["y"], axis=1))
    return c


@case
def concat_negative_axis():
    c = Case("concat_negative_axis", opset=11)
    a = c.input("a", [2, 3, 2])
    k = c.weight("k", [2, 3, 1])
    b = c.input("b", [2, 3, 3])
    c.output(c.node("Concat", [a, k, b], ["y"], axis=-1))
    return c


def flatten_case(name, axis):
    c = Case(name)
    c.output(c.node("Flatten", [c.input("x", [2, 3, 2, 2])], ["y"], axis=axis))
    return c


@case
def flatten_axis0():
    return flatten_case("flatten_axis0", 0)


@case
def flatten_axis1():
    return flatten_case("flatten_axis1", 1)


@case
def flatten_axis2():
    return flatten_case("flatten_axis2", 2)


@case
def reshape_zero_minus_one():
    c = Case("reshape_zero_minus_one")
    x = c.input("x", [2, 3, 4])
    c.output(c.node("Reshape", [x, c.init("shape", np.array([0, -1], dtype=np.int64))], ["y"]))
    return c


@case
def reshape_minus_one_first():
    c = Case("reshape_minus_one_first", opset=14)
    x = c.input("x", [2, 3, 4])
    c.output(c.node("Reshape", [x, c.init("shape", np.array([-1, 2, 0], dtype=np.int64))], ["y"]))
    return c


@case
def constant_nodes():
    """Constant nodes feeding Reshape's shape, Clip's bounds and an Add."""
    c = Case("constant_nodes")
    x = c.input("x", [2, 6])
    c.node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, 2, 3], np.int64)))
    c.node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(-0.25, np.float32)))
    c.node("Constant", [], ["k"], value=numpy_helper.from_array(np.full([3], 0.5, np.float32)))
    r = c.node("Reshape", [x, "shape"], ["r"])
    cl = c.node("Clip", [r, "lo"], ["cl"])
    c.output(c.node("Add", [cl, "k"], ["y"]))
    return c


# ---------------------------------------------------------------- softmax


@case
def softmax_opset13_axis1():
    c = Case("softmax_opset13_axis1")
    c.output(c.node("Softmax", [c.input("x", [2, 5, 3])], ["y"], axis=1))
    return c


@case
def softmax_opset11_2d():
    c = Case("softmax_opset11_2d", opset=11)
    c.output(c.node("Softmax", [c.input("x", [3, 10])], ["y"]))
    return c


@case
def softmax_opset11_last_axis():
    c = Case("softmax_opset11_last_axis", opset=11)
    c.output(c.node("Softmax", [c.input("x", [2, 3, 4])], ["y"], axis=2))
    return c


@case
def softmax_opset11_flattening():
    """Pre-13 semantics over [3, 4] at axis 1: imported as Flatten, Softmax, Reshape."""
    c = Case("softmax_opset11_flattening", opset=11)
    c.output(c.node("Softmax", [c.input("x", [2, 3, 4])], ["y"], axis=1))
    return c


# ---------------------------------------------------------------- dropout / identity


@case
def dropout_opset13():
    c = Case("dropout_opset13")
    x = c.input("x", [2, 4])
    d = c.node("Dropout", [x, c.init("ratio", np.float32(0.3))], ["d", "mask"])
    c.output(c.node("Relu", [d], ["y"]))
    return c


@case
def dropout_opset10_output():
    c = Case("dropout_opset10_output", opset=10)
    x = c.input("x", [2, 4])
    s = c.node("Sigmoid", [x], ["s"])
    c.output(c.node("Dropout", [s], ["y"], ratio=0.5))
    return c


@case
def identity_chain():
    c = Case("identity_chain")
    x = c.input("x", [2, 3])
    i = c.node("Identity", [x], ["i"])
    t = c.node("Tanh", [i], ["t"])
    c.output(c.node("Identity", [t], ["y"]))
    return c


@case
def two_outputs():
    c = Case("two_outputs")
    x = c.input("x", [2, 3])
    c.output(c.node("Sigmoid", [x], ["s"]))
    c.output(c.node("Relu", [x], ["r"]))
    return c


# ---------------------------------------------------------------- batch normalization


def bn_params(c, prefix, channels):
    return [
        c.init(f"{prefix}_gamma", c.rng.uniform(0.5, 1.5, channels).astype(np.float32)),
        c.init(f"{prefix}_beta", (c.rng.standard_normal(channels) * 0.3).astype(np.float32)),
        c.init(f"{prefix}_mean", (c.rng.standard_normal(channels) * 0.3).astype(np.float32)),
        c.init(f"{prefix}_var", c.rng.uniform(0.5, 2.0, channels).astype(np.float32)),
    ]


@case
def conv_bn_folded():
    c = Case("conv_bn_folded")
    x = c.input("x", [2, 3, 6, 6])
    y = c.node("Conv", [x, c.weight("w", [4, 3, 3, 3]), c.weight("b", [4])], ["conv_out"], pads=[1, 1, 1, 1])
    c.output(c.node("BatchNormalization", [y] + bn_params(c, "bn", 4), ["y"], epsilon=1e-3))
    return c


@case
def conv_no_bias_bn_folded_opset9():
    c = Case("conv_no_bias_bn_folded_opset9", opset=9)
    x = c.input("x", [1, 2, 5, 5])
    y = c.node("Conv", [x, c.weight("w", [3, 2, 3, 3])], ["conv_out"], strides=[2, 2])
    c.output(c.node("BatchNormalization", [y] + bn_params(c, "bn", 3), ["y"]))
    return c


@case
def gemm_bn_folded():
    """torch Linear (Gemm transB=1) followed by BatchNorm1d."""
    c = Case("gemm_bn_folded", opset=15)
    x = c.input("x", [3, 5])
    y = c.node("Gemm", [x, c.weight("w", [4, 5]), c.weight("b", [4])], ["fc_out"], transB=1, beta=0.5)
    c.output(c.node("BatchNormalization", [y] + bn_params(c, "bn", 4), ["y"]))
    return c


@case
def bn_standalone():
    c = Case("bn_standalone")
    x = c.input("x", [2, 3, 4, 4])
    c.output(c.node("BatchNormalization", [x] + bn_params(c, "bn", 3), ["y"]))
    return c


@case
def bn_after_shared_conv():
    """The conv output is also read elsewhere, so the BN cannot be folded."""
    c = Case("bn_after_shared_conv")
    x = c.input("x", [1, 2, 4, 4])
    y = c.node("Conv", [x, c.weight("w", [3, 2, 1, 1])], ["conv_out"])
    bn = c.node("BatchNormalization", [y] + bn_params(c, "bn", 3), ["bn_out"])
    c.output(c.node("Add", [bn, y], ["y"]))
    return c


@case
def bn_opset7():
    c = Case("bn_opset7", opset=7)
    x = c.input("x", [2, 3, 2, 2])
    y = c.node("Conv", [x, c.weight("w", [3, 3, 1, 1])], ["conv_out"])
    c.output(c.node("BatchNormalization", [y] + bn_params(c, "bn", 3), ["y"]))
    return c


@case
def bn_rank2_standalone():
    c = Case("bn_rank2_standalone", opset=14)
    x = c.input("x", [3, 4])
    c.output(c.node("BatchNormalization", [x] + bn_params(c, "bn", 4), ["y"]))
    return c


@case
def resnet_block():
    """conv-bn-relu-conv-bn, plus the skip connection, relu; then a pooled head."""
    c = Case("resnet_block")
    x = c.input("x", [2, 4, 6, 6])
    h = c.node("Conv", [x, c.weight("w1", [4, 4, 3, 3], 0.3)], ["c1"], pads=[1, 1, 1, 1])
    h = c.node("BatchNormalization", [h] + bn_params(c, "bn1", 4), ["b1"])
    h = c.node("Relu", [h], ["r1"])
    h = c.node("Conv", [h, c.weight("w2", [4, 4, 3, 3], 0.3)], ["c2"], pads=[1, 1, 1, 1])
    h = c.node("BatchNormalization", [h] + bn_params(c, "bn2", 4), ["b2"])
    h = c.node("Add", [h, x], ["sum"])
    h = c.node("Relu", [h], ["r2"])
    h = c.node("GlobalAveragePool", [h], ["gap"])
    h = c.node("Flatten", [h], ["flat"])
    c.output(c.node("Gemm", [h, c.weight("fc", [3, 4]), c.weight("fc_b", [3])], ["y"], transB=1))
    return c


# ---------------------------------------------------------------- a small CNN


def chain(name, batch):
    c = Case(name)
    x = c.input("image", [batch, 3, 8, 8])
    h = c.node("Conv", [x, c.weight("conv1.weight", [4, 3, 3, 3]), c.weight("conv1.bias", [4])], ["c1"],
               name="conv1", pads=[1, 1, 1, 1])
    h = c.node("BatchNormalization", [h] + bn_params(c, "bn1", 4), ["b1"], name="bn1")
    h = c.node("Relu", [h], ["r1"], name="relu1")
    h = c.node("MaxPool", [h], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2])
    h = c.node("Flatten", [h], ["f"], name="flatten")
    h = c.node("Gemm", [h, c.weight("fc.weight", [5, 64], 0.2), c.weight("fc.bias", [5])], ["logits"],
               name="fc", transB=1)
    c.output(c.node("Softmax", [h], ["probs"], name="softmax", axis=1))
    return c


@case
def chain_batch1():
    return chain("chain_batch1", 1)


@case
def chain_batch3():
    return chain("chain_batch3", 3)


def main():
    for entry in os.listdir(HERE):
        path = os.path.join(HERE, entry)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.onnx")):
            shutil.rmtree(path)
    names = set()
    for fn in CASES:
        c = fn()
        assert c.name == fn.__name__ and c.name not in names, c.name
        names.add(c.name)
        c.write()
    total = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(HERE) for f in fs
    )
    print(f"{len(CASES)} cases, {total} bytes")


if __name__ == "__main__":
    main()
