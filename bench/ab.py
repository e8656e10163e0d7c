"""Two builds of mlcapsule on the same ONNX files, alternated: which is quicker.

    cargo build --release -p mlcapsule && cp target/release/mlcapsule /tmp/mlc_a
    # ... change the engine, build again ...
    python3 bench/ab.py /tmp/mlc_a target/release/mlcapsule build/models/mobilenetv2.onnx
    python3 bench/ab.py A B MODEL --threads 1,2 --rounds 10
    python3 bench/ab.py A B MODEL --node 'features\\.2/'   # per-node sums, from --profile
    python3 bench/ab.py A B MODEL --threads 2 --mode sealed-streaming

On a shared machine the same binary can read 20-40 % apart from one minute to
the next, so comparing two runs made apart says little. Here each round runs A
then B (then B then A in the next round, so neither always goes first), back
to back, and the round's B/A ratio pairs two runs made seconds apart; the
median of those ratios is the figure to report, with their range. Each run is
`mlcapsule bench --model FILE --plain-only --json` (the median over its own
timed queries; with --mode sealed-*, that mode's median over plain's in the
same run, the `x` that `mlcapsule bench` prints, which cancels more of the
machine's drift than either median alone) or, with
--node, `--profile`'s per-node medians summed over the nodes whose names match
the regular expression.

At more than one thread each run also notes the core-to-core round trip before
and after it (`mlcapsule bench` measures it). When rounds ran with the threads'
cores near each other (every round trip from 40 to 150 ns: a shared cache) and
others far (every one over), on one core's two hardware threads (every one
under 40 ns) or mixed, each group gets a line of its own as well ("near",
"far", "smt", "mixed") with its count of rounds: on a machine whose host moves
the virtual CPUs, the placements time two threads very differently.

Standard library only: no virtual environment needed.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys


def run(binary: str, model: str, threads: int, node: str | None, mode: str) -> tuple[float, list[float]]:
    """One run's median latency in ms (the whole query, or the matching nodes), or
    for a sealed mode its ratio to plain's; and the core-to-core round trips in ns
    it noted before and after (none at one thread)."""
    args = [binary, "bench", "--model", model, "--threads", str(threads), "--json"]
    sealed = mode != "plain" and not node
    args += ["--profile"] if node else ["--mode", f"plain,{mode}" if sealed else mode]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{binary} failed on {model}:\n{out.stderr.strip()}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    trips = [float(ns) for ns in re.findall(r"round trip \w+: (\d+) ns", out.stderr)]
    if node:
        matched = [r["median_ms"] for r in rows if re.search(node, r["node"])]
        if not matched:
            sys.exit(f"no node of {model} matches {node!r}")
        return sum(matched), trips
    median = {r["mode"]: r["median_ms"] for r in rows}
    return (median[mode] / median["plain"] if sealed else median[mode]), trips


# Core-to-core round trips (ns) below this are cores that share a cache.
NEAR_NS = 150

# Round trips below this are the two hardware threads of one core.
SHARED_NS = 40


def placement(trips: list[float]) -> str:
    """A round's placement of its threads: "smt" (every round trip under
    SHARED_NS: one core's two hardware threads), "near" (every one from
    SHARED_NS to NEAR_NS: two cores sharing a cache), "far" (every one over)
    or "mixed"."""
    if all(t < SHARED_NS for t in trips):
        return "smt"
    if all(SHARED_NS <= t < NEAR_NS for t in trips):
        return "near"
    return "far" if all(t >= NEAR_NS for t in trips) else "mixed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", help="the reference build of mlcapsule")
    parser.add_argument("b", help="the build to compare with it")
    parser.add_argument("models", nargs="+", help="ONNX files")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts [1]")
    parser.add_argument("--rounds", type=int, default=8, help="alternated rounds [8]")
    parser.add_argument("--node", help="regular expression: sum these nodes' times instead")
    parser.add_argument(
        "--mode",
        default="plain",
        choices=["plain", "sealed-streaming", "sealed-cached"],
        help="the mode whose queries are timed; a sealed one as its ratio to plain [plain]",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    threads = [int(t) for t in args.threads.split(",")]

    unit = "x" if args.mode != "plain" and not args.node else "ms"
    print(f"{'model':<24} {'thr':>3} {'A ' + unit:>8} {'B ' + unit:>8} {'B/A':>6}  rounds' B/A")
    for model in args.models:
        for t in threads:
            rounds: list[tuple[float, float, str]] = []
            for r in range(args.rounds):
                order = ("a", "b") if r % 2 == 0 else ("b", "a")
                got = {w: run(getattr(args, w), model, t, args.node, args.mode) for w in order}
                trips = got["a"][1] + got["b"][1]
                rounds.append((got["a"][0], got["b"][0], placement(trips)))
            name = model.rsplit("/", 1)[-1]
            places = sorted({p for _, _, p in rounds})
            groups = [("", rounds)]
            if t > 1 and len(places) > 1:
                groups += [(f" {p}", [r for r in rounds if r[2] == p]) for p in places]
            for label, group in groups:
                ratios = [b / a for a, b, _ in group]
                print(
                    f"{(name + label):<24} {t:>3} {statistics.median(a for a, _, _ in group):>8.3f} "
                    f"{statistics.median(b for _, b, _ in group):>8.3f} "
                    f"{statistics.median(ratios):>6.3f}  {min(ratios):.3f}-{max(ratios):.3f}"
                    f"  ({len(group)})"
                )


if __name__ == "__main__":
    main()
