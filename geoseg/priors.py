"""Class-prior adaptation: re-estimate a scene's class mix from the model's own posteriors.

A model's posteriors carry the class mix of its training data.  Applied to a scene whose mix
differs (a city where it learned on farmland), it under-calls the classes that became common.
Saerens, Latinne & Decaestecker (2002, "Adjusting the outputs of a classifier to new a priori
probabilities: a simple procedure", Neural Computation 14) estimate the new priors without
labels by EM over the scene's posteriors and correct them by Bayes' rule:

    p'(c | x) ∝ p(c | x) · q(c) / p(c)      (p: training priors, q: the scene's)
    q(c) ← mean over the scene's pixels of p'(c | x)                (repeat to convergence)

``p`` is the model card's ``class_prior``: the mean posterior of the final weights over the
training region, as ``geoseg train`` writes it.  Using the model's own mean posterior there
(not the label frequencies) makes the procedure a no-op on data like the training data, even
for a model whose loss (class weights, Dice) shifted its posteriors.  The scene's posteriors
are sampled by :func:`geoseg.engine.sample_posteriors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geoseg.errors import ParameterError

__all__ = ["PriorEstimate", "em_priors", "reweight_probs"]

#: Floor for a prior, so a class the model never predicted cannot divide by zero.
_EPS = 1e-6


@dataclass(frozen=True)
class PriorEstimate:
    """Result of :func:`em_priors`: the scene's priors, the weights q / p, and how EM ended."""

    scene: np.ndarray
    weights: np.ndarray
    iterations: int
    converged: bool
    pixels: int


def em_priors(posteriors: np.ndarray, train_prior: np.ndarray, *, max_ratio: float | None = None, max_iter: int = 200,
              tol: float = 1e-6) -> PriorEstimate:
    """EM estimate of the class priors of the pixels whose posteriors are the rows of ``posteriors``.

    Args:
        posteriors: ``(N, C)`` probabilities of N pixels (rows summing to 1).
        train_prior: ``(C,)`` priors the posteriors reflect (the card's ``class_prior``).
        max_ratio: Hold every class's ratio scene / training prior within ``[1/max_ratio,
            max_ratio]`` at each iteration (clip, renormalise; None: unbounded). EM on posteriors
            that are not calibrated can run away on a rare class; this bounds how far it goes.
        max_iter: Most EM iterations.
        tol: Stop when no prior moves by more than this.

    Returns:
        A :class:`PriorEstimate`; its ``weights`` (q / p, for :func:`reweight_probs`) are all 1
        when there are no pixels.
    """
    post = np.asarray(posteriors, np.float64)
    p = np.asarray(train_prior, np.float64)
    if post.ndim != 2 or post.shape[1] != p.size:
        raise ParameterError(f"posteriors of shape {post.shape} do not match {p.size} training priors")
    p = np.maximum(p, _EPS)
    p = p / p.sum()
    if max_ratio is not None and max_ratio < 1:
        raise ParameterError(f"max_ratio {max_ratio}: use 1 or more (None: unbounded)")
    # a pixel whose posteriors are not finite (an fp16 overflow, an extreme input) says nothing about
    # the priors: one NaN made every weight NaN, and the whole mask the first class
    post = post[np.isfinite(post).all(axis=1)]
    if post.shape[0] == 0:
        return PriorEstimate(p.astype(np.float32), np.ones(p.size, np.float32), 0, True, 0)
    q = p.copy()
    converged = False
    it = 0
    n = post.shape[0]
    while it < max_iter:
        it += 1
        # the E step as two matrix-vector products: mean_n post[n] * w / (post[n] . w), without the
        # (N, C) temporaries (the same sums, in another order: equal within rounding)
        w = q / p
        inv = 1.0 / np.maximum(post @ w, 1e-30)
        q_new = np.maximum(w * (inv @ post) / n, _EPS)
        q_new /= q_new.sum()
        if max_ratio is not None:
            q_new = _bounded(q_new, p, max_ratio)
        step = float(np.abs(q_new - q).max())
        q = q_new
        if step < tol:
            converged = True
            break
    return PriorEstimate(q.astype(np.float32), (q / p).astype(np.float32), it, converged, int(post.shape[0]))


def _bounded(q: np.ndarray, p: np.ndarray, max_ratio: float) -> np.ndarray:
    """Clip q / p to [1/max_ratio, max_ratio] and renormalise, repeated until it holds."""
    lo, hi = p / max_ratio, p * max_ratio
    for _ in range(50):
        q = np.clip(q, lo, hi)
        q = q / q.sum()
        if (q >= lo * (1 - 1e-9)).all() and (q <= hi * (1 + 1e-9)).all():
            break
    return q


def reweight_probs(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Multiply CHW ``probs`` by per-class ``weights`` and renormalise each pixel (zeros stay zero)."""
    out = probs * np.asarray(weights, probs.dtype)[:, None, None]
    total = out.sum(axis=0)
    np.divide(out, total, out=out, where=total > 0)
    return out
