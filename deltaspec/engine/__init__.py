"""Delta → Spectrum: the spectral engine.

- :mod:`~deltaspec.engine.spectrum` — the public ``spectrum()`` and the one route choice
  (factored / dense), device and dtype resolution;
- :mod:`~deltaspec.engine.kernels` — the solvers (QR + core SVD for factored deltas, float64 Gram +
  symmetric eigensolver for dense ones, vectors, fallbacks);
- :mod:`~deltaspec.engine.subspace` — top-k eigenvectors by subspace iteration;
- :mod:`~deltaspec.engine.relative` — base-relative kernels (W's decompositions, intruder cosines);
- :mod:`~deltaspec.engine.memory` — the memory guard, page release, peak RSS;
- :mod:`~deltaspec.engine.pipeline` — the streaming pipeline (read-ahead on a worker, batched solves).
"""
