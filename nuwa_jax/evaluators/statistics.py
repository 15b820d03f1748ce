"""Feature statistics and the distances built on them: FID, KID, Inception Score, intervals.

Pure numpy on the host, in float64; the networks that produce the features live elsewhere.
`FeatureStats` streams the mean and covariance of feature batches (exact in any merge order,
and across JAX processes with `allgather`); `frechet_distance` compares two Gaussians through
symmetric eigen-decompositions, so it stays finite for rank-deficient covariances;
`kernel_inception_distance` and `inception_score` follow the definitions torch-fidelity and
clean-fid use; `bootstrap_fid` resamples images (with all their tiles) for an interval.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from scipy import special


def _combine(n_a: int, mean_a: np.ndarray, m2_a: np.ndarray, n_b: int, mean_b: np.ndarray,
             m2_b: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
  """Chan et al.'s pairwise update of (count, mean, centred sum of outer products)."""
  if n_b == 0:
    return n_a, mean_a, m2_a
  if n_a == 0:
    return n_b, mean_b.copy(), m2_b.copy()
  n = n_a + n_b
  delta = mean_b - mean_a
  mean = mean_a + delta * (n_b / n)
  m2 = m2_a + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
  return n, mean, m2


def _as_matrix(features: Any, name: str = "features") -> np.ndarray:
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected an array [N, D], got shape {x.shape}.")
  if not np.isfinite(x).all():
    raise ValueError(f"{name}: contains NaN or inf.")
  return x


def _to_words(a: np.ndarray) -> np.ndarray:
  """The bytes of `a` as a flat uint32 array: JAX without x64 would round float64 and int64."""
  return np.ascontiguousarray(a).reshape(-1).view(np.uint32)


def _from_words(words: np.ndarray, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `_to_words` for a gathered [P, words] array; returns [P, *shape]."""
  words = np.ascontiguousarray(np.asarray(words, dtype=np.uint32))
  return words.view(dtype).reshape((words.shape[0],) + tuple(shape))


def _gather(a: np.ndarray) -> np.ndarray:
  """[P, *a.shape]: `a` from every process, bit-exact for any dtype."""
  return _from_words(multihost_utils.process_allgather(_to_words(a)), a.dtype, a.shape)


class FeatureStats:
  """Streaming mean and covariance of feature vectors, in float64.

  Keeps the count, the mean and the centred sum of outer products (Chan et al.'s pairwise
  update), so batches can be added and statistics merged in any order and tree shape with
  the same result as `np.mean` / `np.cov` of the concatenation up to float64 round-off.
  With `keep_features=True` the raw rows are kept as well (in `features_dtype`), for KID.
  """

  def __init__(self, dim: int | None = None, keep_features: bool = False,
               features_dtype: Any = np.float32):
    """Args:
      dim: feature width D; None to take it from the first batch.
      keep_features: also keep every row (KID needs them; FID does not).
      features_dtype: dtype of the kept rows (float32 halves the memory of float64 and is
        what Inception features are computed in).
    """
    if dim is not None and dim <= 0:
      raise ValueError(f"dim={dim}: expected a positive feature width.")
    self.dim = dim
    self.keep_features = keep_features
    self.features_dtype = np.dtype(features_dtype)
    self._count = 0
    self._mean = None if dim is None else np.zeros(dim)
    self._m2 = None if dim is None else np.zeros((dim, dim))
    self._features: list[np.ndarray] = []

  def _set_dim(self, dim: int, what: str) -> None:
    if self.dim is None:
      self.dim = dim
      self._mean, self._m2 = np.zeros(dim), np.zeros((dim, dim))
    elif dim != self.dim:
      raise ValueError(f"{what} has feature width {dim}, these statistics have {self.dim}.")

  def update(self, features: Any) -> FeatureStats:
    """Adds a batch of feature vectors.

    Args:
      features: [N, D] array (N may be 0); any float dtype, accumulated in float64.

    Returns:
      self.

    Raises:
      ValueError: not 2-D, a different D, or NaN/inf values.
    """
    x = _as_matrix(features)
    self._set_dim(x.shape[1], "The batch")
    if x.shape[0] == 0:
      return self
    batch_mean = x.mean(axis=0)
    centred = x - batch_mean
    self._count, self._mean, self._m2 = _combine(self._count, self._mean, self._m2,
                                                 x.shape[0], batch_mean, centred.T @ centred)
    if self.keep_features:
      self._features.append(x.astype(self.features_dtype))
    return self

  def merge(self, other: FeatureStats) -> FeatureStats:
    """Adds the samples summarised by `other` (left unchanged) to these statistics.

    Args:
      other: statistics of more samples of the same feature width.

    Returns:
      self.

    Raises:
      ValueError: a different D, or these keep features and `other` has samples but not
        their features.
    """
    if other.dim is None:
      return self
    self._set_dim(other.dim, "The merged statistics")
    if self.keep_features and other.count and not other.keep_features:
      raise ValueError("These statistics keep features; the merged ones do not have them.")
    self._count, self._mean, self._m2 = _combine(self._count, self._mean, self._m2,
                                                 other._count, other._mean, other._m2)
    if self.keep_features:
      # A list first: merging statistics into themselves must not see its own additions.
      self._features.extend([f.astype(self.features_dtype) for f in other._features])
    return self

  def copy(self) -> FeatureStats:
    """An independent copy."""
    out = FeatureStats(self.dim, self.keep_features, self.features_dtype)
    return out.merge(self)

  @property
  def count(self) -> int:
    """Number of feature vectors seen."""
    return self._count

  @property
  def mean(self) -> np.ndarray:
    """[D] float64 mean. Raises ValueError without samples."""
    if not self._count:
      raise ValueError("No samples: the mean is undefined.")
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    """[D, D] float64 unbiased covariance (ddof=1, as np.cov(rowvar=False)).

    Raises ValueError with fewer than two samples.
    """
    if self._count < 2:
      raise ValueError(f"{self._count} sample(s): the covariance needs at least 2.")
    return self._m2 / (self._count - 1)

  @property
  def features(self) -> np.ndarray:
    """[count, D] kept rows, in the order they were added. Raises ValueError if not kept."""
    if not self.keep_features:
      raise ValueError("These statistics were built with keep_features=False.")
    if not self._features:
      return np.zeros((0, self.dim or 0), self.features_dtype)
    if len(self._features) > 1:
      self._features = [np.concatenate(self._features)]
    return self._features[0]

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The sufficient statistics as numpy arrays, e.g. for `np.savez`.

    Returns:
      {"count": int64 scalar, "mean": [D], "m2": [D, D] centred sum of outer products}, and
      "features": [count, D] when they are kept.

    Raises:
      ValueError: the feature width is not known yet (nothing added and no `dim`).
    """
    if self.dim is None:
      raise ValueError("No feature width yet: give `dim` or add a batch first.")
    out = {"count": np.asarray(self._count, np.int64), "mean": self._mean.copy(),
           "m2": self._m2.copy()}
    if self.keep_features:
      out["features"] = self.features
    return out

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeatureStats:
    """Statistics from `to_arrays` output (a dict or an opened .npz file).

    Args:
      arrays: mapping with "count", "mean", "m2" and optionally "features".

    Returns:
      FeatureStats, keeping features if "features" is present.
    """
    mean = np.asarray(arrays["mean"], np.float64)
    m2 = np.asarray(arrays["m2"], np.float64)
    count = int(np.asarray(arrays["count"]))
    if mean.ndim != 1 or m2.shape != (mean.shape[0],) * 2 or count < 0:
      raise ValueError(f"Inconsistent statistics: mean {mean.shape}, m2 {m2.shape}, "
                       f"count {count}.")
    keep = "features" in arrays
    features = np.asarray(arrays["features"]) if keep else None
    out = cls(mean.shape[0], keep_features=keep,
              features_dtype=features.dtype if keep else np.float32)
    out._count, out._mean, out._m2 = count, mean.copy(), m2.copy()
    if keep:
      if features.shape != (count, mean.shape[0]):
        raise ValueError(f"features {features.shape}: expected {(count, mean.shape[0])}.")
      out._features = [features.copy()]
    return out

  @classmethod
  def from_mean_cov(cls, mean: Any, cov: Any, count: int) -> FeatureStats:
    """Statistics of `count` samples with a given mean and unbiased covariance.

    For reference statistics stored as (mu, sigma) elsewhere; `count` matters only when
    these are merged with others.

    Args:
      mean: [D]. cov: [D, D] (ddof=1). count: number of samples, at least 2.

    Returns:
      FeatureStats without kept features.
    """
    mean = np.asarray(mean, np.float64)
    cov = np.asarray(cov, np.float64)
    if mean.ndim != 1 or cov.shape != (mean.shape[0],) * 2:
      raise ValueError(f"mean {mean.shape} and cov {cov.shape}: expected [D] and [D, D].")
    if count < 2:
      raise ValueError(f"count={count}: a covariance needs at least 2 samples.")
    out = cls(mean.shape[0])
    out._count, out._mean, out._m2 = int(count), mean.copy(), cov * (count - 1)
    return out

  def allgather(self) -> FeatureStats:
    """Statistics of the samples of all JAX processes together (self is left unchanged).

    Every process must call it (a collective). Processes are merged in process order, so all
    of them get bit-identical totals; kept features come in process order too. The arrays go
    through `process_allgather` as raw 32-bit words, so float64 and int64 survive without
    jax_enable_x64. With one process this is a copy.

    Returns:
      FeatureStats with the totals.

    Raises:
      ValueError: processes disagree on the feature width or on keep_features.
    """
    if jax.process_count() == 1:
      return self.copy()
    kept_rows = self.features.shape[0] if self.keep_features else 0
    header = np.array([self._count, self.dim or 0, int(self.keep_features), kept_rows],
                      np.int64)
    headers = _gather(header)
    dims = sorted({int(d) for d in headers[:, 1] if d})
    keeps = {int(k) for k in headers[:, 2]}
    if len(dims) > 1 or len(keeps) > 1:
      raise ValueError(f"Processes disagree: feature widths {dims}, keep_features {keeps}.")
    if not dims:
      return self.copy()
    dim = dims[0]
    mean = self._mean if self._mean is not None else np.zeros(dim)
    m2 = self._m2 if self._m2 is not None else np.zeros((dim, dim))
    means, m2s = _gather(mean), _gather(m2)
    total = FeatureStats(dim, self.keep_features, self.features_dtype)
    for p in range(headers.shape[0]):
      total._count, total._mean, total._m2 = _combine(total._count, total._mean, total._m2,
                                                      int(headers[p, 0]), means[p], m2s[p])
    if self.keep_features:
      # process_allgather needs equal shapes: pad every process's rows to the longest.
      rows = int(headers[:, 3].max())
      padded = np.zeros((rows, dim), self.features_dtype)
      if kept_rows:
        padded[:kept_rows] = self.features
      gathered = _gather(padded)
      total._features = [np.concatenate([gathered[p, :int(headers[p, 3])]
                                         for p in range(headers.shape[0])])]
    return total

  def __repr__(self) -> str:
    return (f"FeatureStats(count={self._count}, dim={self.dim}, "
            f"keep_features={self.keep_features})")


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
  """Eigenvalues with round-off set to 0: negative ones, and positive ones below D eps max|w|.

  A zero eigenvalue comes out of `eigh` as +-1e-16 or so relative to the largest, and its
  square root (1e-8) would add up over the null space of a rank-deficient covariance.
  """
  tol = np.abs(w).max(initial=0.0) * w.shape[0] * np.finfo(np.float64).eps
  return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric matrix, round-off eigenvalues set to 0."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def _check_gaussian(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1:
    raise ValueError(f"mu{name}: expected a vector [D], got shape {mu.shape}.")
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"sigma{name}: expected [{mu.shape[0]}, {mu.shape[0]}] to match "
                     f"mu{name}, got shape {sigma.shape}.")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"mu{name} or sigma{name} contains NaN or inf.")
  return mu, (sigma + sigma.T) / 2


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), both square roots through
  `np.linalg.eigh` of symmetric matrices, eigenvalues below round-off (negative, or under
  D eps times the largest) set to 0.
  That is finite for rank-deficient covariances (fewer samples than dimensions), where a
  general matrix square root of S1 S2 is ill-conditioned. Inputs are symmetrised first.

  Args:
    mu1, mu2: [D] means. sigma1, sigma2: [D, D] covariances.

  Returns:
    The distance, clipped at 0 (round-off can take identical inputs a hair below).

  Raises:
    ValueError: shapes that do not match [D] and [D, D], or NaN/inf values.
  """
  mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
  mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise ValueError(f"mu1 {mu1.shape} and mu2 {mu2.shape}: different feature widths.")
  root1 = _psd_sqrt(sigma1)
  middle = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_covmean = np.sqrt(_clip_eigenvalues(eig)).sum()
  diff = mu1 - mu2
  value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean
  return float(max(value, 0.0))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
  """`frechet_distance` of two FeatureStats' means and covariances.

  Args:
    a, b: statistics with at least 2 samples each.

  Returns:
    The Fréchet distance (FID when the features are Inception pool features).
  """
  return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _features_of(x: Any, name: str) -> np.ndarray:
  if isinstance(x, FeatureStats):
    x = x.features
  return _as_matrix(x, name)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float,
                   coef0: float) -> float:
  """Unbiased MMD^2 of equal-size sets: k(x, x') and k(y, y') off the diagonal, all k(x, y)."""
  m = x.shape[0]
  k_xx = (gamma * (x @ x.T) + coef0) ** degree
  k_yy = (gamma * (y @ y.T) + coef0) ** degree
  k_xy = (gamma * (x @ y.T) + coef0) ** degree
  same = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(same - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(f1: Any, f2: Any, num_subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3,
                              gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: unbiased MMD^2 with a polynomial kernel, over random subsets.

  k(x, y) = (gamma x.y + coef0)^degree with gamma = 1/D by default. Each subset draws
  `m = min(subset_size, N1, N2)` rows of each set without replacement; its MMD^2 averages
  k over distinct pairs within a set and over all m^2 pairs across the sets (the estimator
  of Bińkowski et al. that torch-fidelity and clean-fid compute). Computed in float64.

  Args:
    f1, f2: [N1, D] and [N2, D] features (or FeatureStats with kept features).
    num_subsets: number of random subsets.
    subset_size: rows per subset, capped at the smaller set's size.
    degree, gamma, coef0: the polynomial kernel.
    seed: seed of `np.random.default_rng`; the same seed gives the same value.

  Returns:
    (mean, std) over the subsets; std with ddof=0, as torch-fidelity reports it.

  Raises:
    ValueError: different D, fewer than 2 rows in a set, or num_subsets < 1.
  """
  x, y = _features_of(f1, "f1"), _features_of(f2, "f2")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"f1 {x.shape} and f2 {y.shape}: different feature widths.")
  m = min(subset_size, x.shape[0], y.shape[0])
  if m < 2:
    raise ValueError(f"Subsets of {m} row(s): KID needs at least 2 per set.")
  if num_subsets < 1:
    raise ValueError(f"num_subsets={num_subsets}: expected at least 1.")
  gamma = 1.0 / x.shape[1] if gamma is None else float(gamma)
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for i in range(num_subsets):
    a = x[rng.choice(x.shape[0], m, replace=False)]
    b = y[rng.choice(y.shape[0], m, replace=False)]
    values[i] = _mmd2_unbiased(a, b, degree, gamma, coef0)
  return float(values.mean()), float(values.std())


def inception_score(logits: Any, splits: int = 10,
                    seed: int | None = None) -> tuple[float, float]:
  """Inception Score: per split exp(mean_x KL(p(y|x) || p(y))), in float64.

  p(y|x) is the softmax of the given logits over every class given: for the 1008-way head of
  the TF Inception graph all 1008 logits are used (the extra ones no ImageNet class maps to
  included), as torch-fidelity does. p(y) is the mean of p(y|x) over the split.

  Args:
    logits: [N, C] classifier logits.
    splits: number of splits, each of N // splits or so items (contiguous chunks
      `[i * N // splits, (i + 1) * N // splits)`).
    seed: None keeps the given order (the original implementation's splits); an int
      permutes the items first with `np.random.default_rng(seed)` (torch-fidelity shuffles).

  Returns:
    (mean, std) of the per-split scores; std with ddof=0.

  Raises:
    ValueError: not 2-D, NaN logits, or fewer items than splits.
  """
  z = np.asarray(logits, np.float64)
  if z.ndim != 2:
    raise ValueError(f"logits: expected [N, C], got shape {z.shape}.")
  if np.isnan(z).any():
    raise ValueError("logits contain NaN.")
  n = z.shape[0]
  if splits < 1 or n < splits:
    raise ValueError(f"{n} items in {splits} splits: expected 1 <= splits <= N.")
  log_p = z - special.logsumexp(z, axis=1, keepdims=True)
  p = np.exp(log_p)
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  scores = np.empty(splits)
  for k in range(splits):
    part = order[k * n // splits:(k + 1) * n // splits]
    pk, log_pk = p[part], log_p[part]
    py = pk.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
      # 0 log 0 = 0: classes with p = 0 contribute nothing (and would give NaN otherwise).
      terms = np.where(pk > 0, pk * (log_pk - np.log(py)), 0.0)
    scores[k] = np.exp(terms.sum(axis=1).mean())
  return float(scores.mean()), float(scores.std())


def percentile_interval(samples: Any, level: float = 0.95) -> tuple[float, float]:
  """Central `level` interval of bootstrap samples (NaN samples ignored).

  Args:
    samples: 1-D values of a statistic over resamples.
    level: coverage in (0, 1).

  Returns:
    (low, high) quantiles at (1 - level) / 2 and (1 + level) / 2.
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"level={level}: expected a value in (0, 1).")
  low, high = np.nanquantile(np.asarray(samples, np.float64),
                             [(1.0 - level) / 2, (1.0 + level) / 2])
  return float(low), float(high)


def _tile_moments(features_per_image: Sequence[Any], dim: int | None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of every tile of every image."""
  stats = FeatureStats(dim)
  for f in features_per_image:
    stats.update(f)
  return stats.mean, stats.cov


def bootstrap_fid_samples(features_per_image: Sequence[Any], reference: FeatureStats,
                          num_resamples: int = 200, seed: int = 0) -> np.ndarray:
  """FID against fixed reference statistics, over bootstrap resamples of the images.

  Resample r draws `n = len(features_per_image)` image indices with replacement,
  `rng.integers(0, n, size=n)` with one `rng = np.random.default_rng(seed)` for all
  resamples in order, and computes the FID of all tiles of the drawn images (an image drawn
  twice counts twice), exactly as if their features were concatenated. The reference is
  held fixed. Each resample costs one weighted Gram matrix of the transformed features and
  one `eigvalsh`: the reference's square root B and the features times B are computed once,
  and tr((B S B)^1/2) is read off the eigenvalues of the smaller Gram of the weighted rows.
  This replaces a D x D outer-product sum per image, which would not fit in memory for
  Inception features (D = 2048) and thousands of images.

  Args:
    features_per_image: one [t_i, D] array per image (t_i >= 0 tiles).
    reference: statistics of the reference set (at least 2 samples).
    num_resamples: number of resamples.
    seed: seed of the resampling.

  Returns:
    [num_resamples] float64 FID values; NaN for a resample with fewer than 2 tiles.

  Raises:
    ValueError: fewer than 2 images, or feature widths that differ from the reference.
  """
  n_images = len(features_per_image)
  if n_images < 2:
    raise ValueError(f"{n_images} image(s): bootstrapping needs at least 2.")
  dim = reference.dim
  blocks = [_as_matrix(f, f"features_per_image[{i}]") for i, f in enumerate(features_per_image)]
  for i, b in enumerate(blocks):
    if b.shape[1] != dim:
      raise ValueError(f"features_per_image[{i}] has width {b.shape[1]}, the reference {dim}.")
  x = np.concatenate(blocks)
  image_of_row = np.repeat(np.arange(n_images), [b.shape[0] for b in blocks])
  mu_ref, sigma_ref = _check_gaussian(reference.mean, reference.cov, "_ref")
  root_ref = _psd_sqrt(sigma_ref)
  z = x @ root_ref
  trace_ref = np.trace(sigma_ref)
  rng = np.random.default_rng(seed)
  out = np.empty(num_resamples)
  for r in range(num_resamples):
    multiplicity = np.bincount(rng.integers(0, n_images, size=n_images), minlength=n_images)
    w_rows = multiplicity[image_of_row].astype(np.float64)
    rows = w_rows > 0
    w, n = w_rows[rows], w_rows.sum()
    if n < 2:
      out[r] = np.nan
      continue
    xr = x[rows]
    mu = w @ xr / n
    centred = xr - mu
    trace_s = w @ np.einsum("ij,ij->i", centred, centred) / (n - 1)
    # Rows of sqrt(w / (n - 1)) (x - mu) B: their Gram's nonzero eigenvalues are B S B's.
    y = (z[rows] - mu @ root_ref) * np.sqrt(w / (n - 1))[:, None]
    gram = y @ y.T if y.shape[0] < y.shape[1] else y.T @ y
    trace_covmean = np.sqrt(_clip_eigenvalues(np.linalg.eigvalsh(gram))).sum()
    diff = mu - mu_ref
    out[r] = max(diff @ diff + trace_s + trace_ref - 2.0 * trace_covmean, 0.0)
  return out


def bootstrap_fid(features_per_image: Sequence[Any], reference: FeatureStats,
                  num_resamples: int = 200, seed: int = 0, level: float = 0.95,
                  method: str = "percentile") -> tuple[float, float]:
  """Bootstrap interval of FID, resampling images (see `bootstrap_fid_samples`).

  FID is biased upwards by roughly a constant over the number of tiles, and a resample's
  duplicates lower its effective count (about 63% of the images are distinct), so resampled
  values sit above the point estimate. With thousands of tiles against D = 2048 the shift
  exceeds the spread and a plain percentile interval no longer contains the point estimate.
  method="centred" moves the resampled values so their median is the point estimate: the
  interval then shows the variability due to which images were drawn, not the bias (which
  runs with equal tile counts share).

  Args:
    features_per_image: one [t_i, D] array of tile features per image.
    reference: fixed reference statistics.
    num_resamples, seed: of the resampling.
    level: coverage of the interval.
    method: "percentile" (quantiles of the resampled values) or "centred".

  Returns:
    (low, high).
  """
  if method not in ("percentile", "centred"):
    raise ValueError(f"method={method!r}: expected 'percentile' or 'centred'.")
  samples = bootstrap_fid_samples(features_per_image, reference, num_resamples, seed)
  if method == "centred":
    point = frechet_distance(*_tile_moments(features_per_image, reference.dim),
                             reference.mean, reference.cov)
    samples = samples - np.nanmedian(samples) + point
  return percentile_interval(samples, level)
