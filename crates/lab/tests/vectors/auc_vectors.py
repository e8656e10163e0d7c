"""Writes auc.txt: ROC AUC test vectors computed by scikit-learn's roc_auc_score.

Run with a throwaway venv (not a project dependency):
    python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn
    /tmp/skl/bin/python crates/lab/tests/vectors/auc_vectors.py > crates/lab/tests/vectors/auc.txt

Format (age-style): `name:`, `labels:`, `scores:`, `auc:` lines, a blank line between cases.
Scores are written with repr() so the Rust side reads the exact float64 values.
"""
import numpy as np
import sklearn
from sklearn.metrics import roc_auc_score

rng = np.random.default_rng(20240611)
cases = []
# Separable, inverted, all tied, small hand case with ties.
cases.append(("separable", [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]))
cases.append(("inverted", [1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]))
cases.append(("all-tied", [0, 1, 0, 1, 1], [0.5] * 5))
cases.append(("ties", [0, 1, 1, 0, 1, 0, 1], [0.3, 0.3, 0.7, 0.7, 0.9, 0.1, 0.3]))
# Gaussian scores with a shift, some rounded to create many ties.
for name, n, shift, decimals in [("gauss-200", 200, 0.8, None), ("gauss-rounded-500", 500, 0.5, 1),
                                  ("gauss-1000", 1000, 0.2, None), ("saturated", 300, 3.0, 2)]:
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + shift * y
    if decimals is not None:
        s = np.round(s, decimals)
    if name == "saturated":
        s = np.minimum(1.0, 1.0 / (1.0 + np.exp(-4 * s)))
        s = np.round(s, 2)
    cases.append((name, y.tolist(), s.tolist()))

print(f"# roc_auc_score, scikit-learn {sklearn.__version__}, numpy {np.__version__}")
print()
for name, y, s in cases:
    print(f"name: {name}")
    print("labels: " + " ".join(str(int(v)) for v in y))
    print("scores: " + " ".join(repr(float(v)) for v in s))
    print(f"auc: {roc_auc_score(y, s)!r}")
    print()
