"""Null models beside the democracy verdict: the singular values an update would have if the method
had done nothing special.

- :func:`random_values` — (a) a random update of the same shape and structural rank (i.i.d.
  Gaussian factors B·A, or a dense Gaussian matrix at full rank): what shape and rank alone give;
- :func:`projected_values` — (b) the rank-matched projection of a full fine-tune's own update,
  ΔW·AᵀA with a fresh Kaiming-uniform A (a = √5, as LoRA and MultiLoRA initialise A) of the
  adapter's rank: full fine-tuning's update seen through a random rank-r input subspace;
- :func:`equalised_values` — (c) a MultiLoRA update with the same factors and equalised |sᵢ|
  (each |sᵢ| replaced by their mean over i, signs kept): what the spread of the learned scalings
  adds or removes.

Every draw is seeded (``seed`` and the module name), so a report is reproducible. Pure numpy
(the σ of a factored product come from the torch-free QR + core SVD); no pandas or matplotlib.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from deltaspec.engine.host import factored_values


def rng_for(seed: int, name: str = "") -> np.random.Generator:
    """A generator seeded by ``seed`` and ``name`` (a module name): one stream per module.

    >>> float(rng_for(0, "q").random()) == float(rng_for(0, "q").random())
    True
    """
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def kaiming_uniform(rows: int, fan_in: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, fan_in) matrix as ``nn.init.kaiming_uniform_(w, a=√5)`` draws it: U(±1/√fan_in).

    >>> w = kaiming_uniform(4, 100, np.random.default_rng(0))
    >>> w.shape, bool(np.abs(w).max() <= 0.1)
    ((4, 100), True)
    """
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=(rows, fan_in))


def random_values(shape: tuple[int, int], rank: int, seed: int = 0, name: str = "") -> np.ndarray:
    """σ of a random (out, in) update of structural rank ``rank``: Gaussian B·A, or a dense
    Gaussian matrix when ``rank`` ≥ min(out, in). Length min(out, in), descending.

    >>> s = random_values((8, 6), 2, seed=1)
    >>> s.shape, int((s > 1e-9).sum())
    ((6,), 2)
    """
    m, n = shape
    rng = rng_for(seed, name)
    if rank >= min(m, n):
        return np.linalg.svd(rng.standard_normal((m, n)), compute_uv=False)
    return factored_values(rng.standard_normal((m, rank)), rng.standard_normal((rank, n)))


def projected_values(dense: np.ndarray, rank: int, seed: int = 0, name: str = "") -> np.ndarray:
    """σ of ΔW·AᵀA, A a fresh (rank, in) Kaiming-uniform matrix: the update restricted to a random
    rank-``rank`` input subspace. Length min(out, in), descending, at most ``rank`` non-zero.

    >>> w = np.random.default_rng(0).standard_normal((10, 12))
    >>> int((projected_values(w, 3) > 1e-9).sum())
    3
    """
    dw = np.asarray(dense, dtype=np.float64)
    a = kaiming_uniform(rank, dw.shape[1], rng_for(seed, name))
    return factored_values(dw @ a.T, a)


def equalise(scalings: np.ndarray) -> np.ndarray:
    """The scalings with each |sᵢ| replaced by the mean of |sᵢ| over i (axis 0), signs kept.

    >>> equalise(np.array([1.0, -3.0])).tolist()
    [2.0, -2.0]
    """
    s = np.asarray(scalings, dtype=np.float64)
    sign = np.where(s < 0, -1.0, 1.0)
    return sign * np.abs(s).mean(axis=0, keepdims=True)


def equalised_values(a: np.ndarray, b: np.ndarray, scalings: np.ndarray,
                     scale: float = 1.0) -> np.ndarray:
    """σ of Σᵢ s̄ᵢ·Bᵢ·Aᵢ·scale with equalised scalings (:func:`equalise`).

    Args:
        a: (n, r, in) stacked Aᵢ; b: (n, out, r) stacked Bᵢ; scalings: (n,) or (n, out) sᵢ;
        scale: α/r.

    >>> a, b = np.ones((2, 1, 3)), np.ones((2, 4, 1))
    >>> round(float(equalised_values(a, b, np.array([1.0, 3.0]))[0]), 6) == round(4 * 12**0.5, 6)
    True
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, r, d_in = a.shape
    d_out = b.shape[1]
    s = equalise(np.asarray(scalings, np.float64).reshape(n, -1))[:, :, None]  # (n, 1|out, 1)
    b_cat = (b * s * scale).transpose(1, 0, 2).reshape(d_out, n * r)
    return factored_values(b_cat, a.reshape(n * r, d_in))


def scaling_spread(scalings: np.ndarray) -> float:
    """Coefficient of variation of |sᵢ| over i (0: equal scalings), averaged over rows.

    >>> scaling_spread(np.array([2.0, 2.0])), round(scaling_spread(np.array([1.0, 3.0])), 3)
    (0.0, 0.5)
    """
    s = np.abs(np.asarray(scalings, np.float64))
    s = s.reshape(s.shape[0], -1)
    mean = s.mean(axis=0)
    cv = np.divide(s.std(axis=0), mean, out=np.zeros_like(mean), where=mean > 0)
    return float(cv.mean())


__all__ = ["equalise", "equalised_values", "kaiming_uniform", "projected_values",
           "random_values", "rng_for", "scaling_spread"]
