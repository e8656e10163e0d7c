#!/usr/bin/env python3
"""Regenerates shapiro.json: Shapiro-Wilk W and p from scipy.stats.shapiro.

Usage (scipy is not in the project's .venv; use a throwaway one):
    python3 -m venv /tmp/scipyenv && /tmp/scipyenv/bin/pip install scipy numpy
    /tmp/scipyenv/bin/python crates/defense/tests/vectors/make_shapiro.py

The seed is fixed, so the same scipy gives the same file. Samples are rounded to 4 decimals
before scipy sees them, so the JSON holds exactly the values that were tested and stays small.
crates/defense/tests/shapiro_scipy.rs checks W within 1e-6 and p within 1e-4 (relative).
"""

import json
import pathlib

import numpy as np
import scipy
from scipy import stats

SEED = 20240605
OUT = pathlib.Path(__file__).with_name("shapiro.json")


def samples(rng):
    """(name, values) pairs: sizes 3..5000, normal and clearly non-normal shapes."""
    yield "n3-spaced", [1.0, 2.0, 3.0]
    yield "n3-normal", rng.normal(size=3)
    yield "n3-skewed", [0.0, 0.01, 5.0]
    yield "n4-normal", rng.normal(size=4)
    yield "n5-uniform", rng.uniform(size=5)
    yield "n6-normal", rng.normal(size=6)
    yield "n7-exponential", rng.exponential(size=7)
    yield "n8-outlier", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    yield "n9-lognormal", rng.lognormal(size=9)
    yield "n10-normal", rng.normal(size=10)
    yield "n11-uniform", rng.uniform(size=11)
    yield "n12-normal", rng.normal(size=12)
    yield "n13-exponential", rng.exponential(size=13)
    yield "n20-t3", rng.standard_t(3, size=20)
    yield "n30-offset", 1e6 + rng.normal(size=30)
    yield "n50-normal", rng.normal(size=50)
    yield "n75-bimodal", np.concatenate([rng.normal(-2, 1, 40), rng.normal(2, 1, 35)])
    yield "n100-poisson-ties", rng.poisson(3, size=100).astype(float)
    yield "n150-uniform", rng.uniform(size=150)
    yield "n200-normal", rng.normal(5, 2, size=200)
    yield "n300-exponential", rng.exponential(size=300)
    yield "n500-normal", rng.normal(size=500)
    yield "n700-chi2-20", rng.chisquare(20, size=700)
    yield "n1000-normal", rng.normal(size=1000)
    yield "n1200-mixture", np.concatenate([rng.normal(0, 1, 1100), rng.normal(0, 0.05, 100)])
    yield "n1500-lognormal-mild", rng.lognormal(0, 0.1, size=1500)
    yield "n2000-normal", rng.normal(size=2000)
    yield "n3000-prada-like", np.abs(rng.normal(8, 1.5, size=3000))
    yield "n4000-uniform", rng.uniform(size=4000)
    yield "n5000-normal", rng.normal(size=5000)


def main():
    rng = np.random.default_rng(SEED)
    cases = []
    for name, values in samples(rng):
        x = np.round(np.asarray(values, dtype=np.float64), 4)
        res = stats.shapiro(x)
        cases.append(
            {
                "name": name,
                "w": float(res.statistic),
                "p": float(res.pvalue),
                "sample": [float(v) for v in x],
            }
        )
    doc = {
        "generator": "crates/defense/tests/vectors/make_shapiro.py",
        "scipy": scipy.__version__,
        "seed": SEED,
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {len(cases)} cases to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
