"""The comparison behind bench/vs-onnxruntime (run that script, not this file).

For each model, batch size and thread count: onnxruntime times the model in
this process, `mlcapsule bench --plain-only --json` times it in a child
process, and the two take turns for several rounds so that a busy machine
slows both alike. Each round gives a median per engine; the table shows the
median of those medians and their ratio. Outputs are compared once per
model and batch size through `mlcapsule run --output`.

At two threads or more, our runs note the core-to-core round trip before and
after (bench/README.md). When rounds ran in more than one placement of the
threads (cores near, sharing a cache; far; one core's two hardware threads;
mixed), each placement also gets a row of its own, from its rounds only, as
bench/ab.py does: the placements time two threads of either engine very
differently.

With --cut, each model is first split at the named tensors into consecutive
pieces (onnx.utils.extract_model), and each piece is compared on its own:
whole queries of the pieces show where a network's gap lies, which per-node
profiles (each engine's own, of nodes timed inside the network) did not show
reliably on this project's 2-core VM.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

from ab import placement

DEFAULT_MODELS = ["build/models/mobilenetv2.onnx", "build/models/resnet18.onnx", "build/models/vgg16.onnx"]
TOLERANCE = 1e-4


# onnxruntime's graph optimisation levels, by the name --ort-optimization takes. "all"
# (the default, as onnxruntime's own) includes its layout transforms: on x86 the
# NCHWc transform, which reorders Conv weights into blocks of 8 or 16 channels once,
# when the session is made, and keeps activations in that layout between nodes.
# "extended" stops short of them.
OPTIMIZATION = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
}


def session(path, threads, optimization):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION[optimization]
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def fixed_batch(sess):
    """The batch size the model's first input declares, or None if it is free."""
    shape = sess.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) else None


def input_for(sess, batch):
    info = sess.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in info.shape[1:]]
    return info.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


# Seconds each engine runs queries before it times them: `mlcapsule bench` warms up
# each configuration as long (its WARM_UP), since this VM's second core takes tens
# of ms to come up to speed.
WARM_UP = 0.25


def time_ort(sess, feed, runs):
    warm = time.perf_counter()
    while time.perf_counter() - warm < WARM_UP:
        sess.run(None, feed)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_ours(mlcapsule, path, threads, batch, runs):
    out = subprocess.run(
        [mlcapsule, "bench", "--model", path, "--threads", str(threads), "--batch", str(batch),
         "--runs", str(runs), "--plain-only", "--json"],
        capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{path}: `mlcapsule bench` failed:\n{out.stderr.strip()}")
    line = json.loads(out.stdout.strip().splitlines()[-1])
    trips = [int(ns) for ns in re.findall(r"round trip \w+: (\d+) ns", out.stderr)]
    return line["median_ms"], trips


def machine(mlcapsule):
    """The machine line `mlcapsule bench` opens its reports with (CPU, cores, kernels)."""
    out = subprocess.run([mlcapsule, "bench", "--quick", "--mode", "plain", "--only", "dense"],
                         capture_output=True, text=True)
    return next((line for line in out.stdout.splitlines() if line.startswith("note: machine:")),
                "note: machine: unknown (mlcapsule bench did not say)")


def check_outputs(mlcapsule, path, sess, name, x):
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = os.path.join(tmp, "x.npy"), os.path.join(tmp, "y.npy")
        np.save(inp, x)
        done = subprocess.run([mlcapsule, "run", path, inp, "--output", outp], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{path}: `mlcapsule run` failed on an input of shape {list(x.shape)}:\n{done.stderr.strip()}")
        ours = np.load(outp)
    ref = sess.run(None, {name: x})[0]
    if ours.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1.0)))


def pieces(path, cuts, tmp):
    """`path` split at the tensors `cuts` into consecutive models in `tmp`."""
    import onnx
    import onnx.shape_inference
    import onnx.utils

    # Shapes of the intermediate tensors, which extract_model needs at the cuts.
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path))
    graph = inferred.graph
    produced = {o for node in graph.node for o in node.output}
    missing = [c for c in cuts if c not in produced]
    if missing:
        sys.exit(f"{path}: no node computes {', '.join(missing)}; name tensors of this model after --cut")
    weights = {i.name for i in graph.initializer}
    first = next(i.name for i in graph.input if i.name not in weights)
    bounds = [first, *cuts, graph.output[0].name]
    model = os.path.splitext(os.path.basename(path))[0]
    whole = os.path.join(tmp, f"{model}.onnx")
    onnx.save(inferred, whole)
    out = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        piece = os.path.join(tmp, f"{model}-{i}.onnx")
        onnx.utils.extract_model(whole, piece, [start], [end])
        out.append(piece)
    return out


def row(label, threads, batch, rounds):
    """A table row: each engine's median over `rounds` (onnxruntime ms, ours ms, ...)
    and the ratio of those medians, then the lowest and highest ratio of a round."""
    o = statistics.median(r[0] for r in rounds)
    u = statistics.median(r[1] for r in rounds)
    per_round = [ours / theirs for theirs, ours, *_ in rounds]
    spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
    return f"{label} {threads:>3} {batch:>5} {o:>15.2f} {u:>10.2f} {u / o:>9.2f} {spread:>11}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="ONNX files [default: build/models/{mobilenetv2,resnet18,vgg16}.onnx, those present]")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts [1,2]")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes [1,8]")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per case [5]")
    p.add_argument("--seconds", type=float, default=1.0, help="time each engine spends per round [1.0]")
    p.add_argument("--mlcapsule", default="target/release/mlcapsule")
    p.add_argument("--ort-optimization", choices=sorted(OPTIMIZATION), default="all",
                   help="onnxruntime's graph optimisation level; 'extended' leaves out its "
                        "layout transforms (NCHWc) [all]")
    p.add_argument("--cut", action="append", default=[], metavar="TENSOR",
                   help="split each model at this tensor, in graph order (repeat for more pieces), "
                        "and compare the pieces; e.g. ResNet-18's stages end at "
                        "/layer1/layer1.1/relu_1/Relu_output_0 and likewise for layer2-4")
    args = p.parse_args()
    models = args.models or [m for m in DEFAULT_MODELS if os.path.exists(m)]
    if not models:
        sys.exit("no models: run scripts/models.sh, or name ONNX files")
    if args.cut:
        tmp = tempfile.TemporaryDirectory()  # removed when main returns
        models = [piece for m in models for piece in pieces(m, args.cut, tmp.name)]
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]

    print(machine(args.mlcapsule))
    print(f"onnxruntime {ort.__version__} (graph optimisation: {args.ort_optimization}), "
          f"{args.rounds} alternating rounds per case; ms are medians; "
          "rounds: the lowest and highest ours/ort of a single round")
    print(f"{'model':<17} {'thr':>3} {'batch':>5} {'onnxruntime ms':>15} {'ours ms':>10} {'ours/ort':>9} "
          f"{'rounds':>11}  outputs")
    failed = False
    for path in models:
        model = os.path.splitext(os.path.basename(path))[0]
        declared = fixed_batch(session(path, 1, args.ort_optimization))
        for batch in batches:
            if declared is not None and declared != batch:
                print(f"{model:<17} {'':>3} {batch:>5}  skipped: the model's input has a fixed batch "
                      f"size of {declared}", flush=True)
                continue
            checked = None
            for t in threads:
                sess = session(path, t, args.ort_optimization)
                name, x = input_for(sess, batch)
                feed = {name: x}
                if checked is None:
                    checked = check_outputs(args.mlcapsule, path, sess, name, x)
                    failed |= not checked <= TOLERANCE
                sess.run(None, feed)
                start = time.perf_counter()
                sess.run(None, feed)
                once = (time.perf_counter() - start) * 1e3
                runs = max(3, min(50, int(args.seconds * 1e3 / max(once, 1e-3))))
                ort_ms, ours_ms, trips = [], [], []
                for r in range(args.rounds):
                    # Alternate which engine goes first.
                    order = [0, 1] if r % 2 == 0 else [1, 0]
                    for which in order:
                        if which == 0:
                            ort_ms.append(time_ort(sess, feed, runs))
                        else:
                            ms, noted = time_ours(args.mlcapsule, path, t, batch, runs)
                            ours_ms.append(ms)
                            trips.append(noted)
                verdict = f"max rel err {checked:.1e} {'ok' if checked <= TOLERANCE else 'FAIL'}"
                noted = [ns for round_trips in trips for ns in round_trips]
                # Where the threads' cores were (bench/README.md): a shared cache or not.
                cores = f"  core round trip {min(noted)}-{max(noted)} ns" if noted else ""
                rounds = list(zip(ort_ms, ours_ms, trips))
                print(row(f"{model:<17}", t, batch, rounds) + f"  {verdict}{cores}", flush=True)
                # Rounds in each placement apart, when they differ (as bench/ab.py does).
                places = sorted({placement(r[2]) for r in rounds if r[2]})
                if len(places) > 1:
                    for place in places:
                        group = [r for r in rounds if r[2] and placement(r[2]) == place]
                        count = f"{len(group)} round" + ("s" if len(group) > 1 else "")
                        print(row(f"{model + ' ' + place:<17}", t, batch, group) + f"  ({count})",
                              flush=True)
                del sess
    if failed:
        sys.exit(f"outputs differ from onnxruntime by more than {TOLERANCE}")


if __name__ == "__main__":
    main()
