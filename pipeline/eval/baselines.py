"""Attribution baselines that need no gradients: pixel-space similarity and random scores.

    neg_l2(q, i) = -||x_q - x_i||_2          cosine(q, i) = <x_q, x_i> / (||x_q|| ||x_i||)
    random(q, i) ~ N(0, 1), from default_rng([seed, q]) (independent of N's blocking)

Images are the float32 [-1, 1] tensors of ``data.open_dataset``. Legend: Q queries, N train rows.
"""

from __future__ import annotations

import numpy as np

from ..errors import EvalError

BASELINES = ("pixel_neg_l2", "pixel_cosine", "random")


def pixel_scores(queries_QD: np.ndarray, train_ND: np.ndarray, kind: str) -> np.ndarray:
    """(Q, N) float64 similarity of flattened images; larger = more similar."""
    q = np.asarray(queries_QD, dtype=np.float64).reshape(len(queries_QD), -1)
    t = np.asarray(train_ND, dtype=np.float64).reshape(len(train_ND), -1)
    if kind == "pixel_neg_l2":
        sq = (q * q).sum(1)[:, None] + (t * t).sum(1)[None, :] - 2.0 * q @ t.T
        return -np.sqrt(np.clip(sq, 0.0, None))
    if kind == "pixel_cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        tn = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        return qn @ tn.T
    raise EvalError(f"pixel baseline {kind!r} is unknown; choose pixel_neg_l2 or pixel_cosine")


def random_scores(num_queries: int, num_train: int, seed: int = 0) -> np.ndarray:
    """(Q, N) float64 standard normal scores, row q from its own seeded generator."""
    return np.stack([np.random.default_rng([seed, q]).standard_normal(num_train)
                     for q in range(num_queries)]) if num_queries else np.zeros((0, num_train))


def baseline_scores(kind: str, queries_QD: np.ndarray, train_ND: np.ndarray, seed: int = 0) -> np.ndarray:
    if kind == "random":
        return random_scores(len(queries_QD), len(train_ND), seed)
    return pixel_scores(queries_QD, train_ND, kind)
