"""Per-image reconstruction quality (PSNR, SSIM) and codebook usage, for tokenizer evals.

Host-side numpy (SSIM through scikit-image). Images are uint8 in [0, 255] or floats with an
explicit data range (2.0 for [-1, 1]); the last three axes are [H, W, C] and every leading
axis indexes images, so a batch [N, H, W, C] gives N values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage import metrics


def _pair(a: Any, b: Any, data_range: float | None) -> tuple[np.ndarray, np.ndarray, float]:
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"Shapes differ: {a.shape} and {b.shape}.")
  if a.ndim < 3:
    raise ValueError(f"Expected images [..., H, W, C], got shape {a.shape}.")
  if data_range is None:
    if a.dtype != np.uint8 or b.dtype != np.uint8:
      raise ValueError(f"data_range is needed for {a.dtype}/{b.dtype} images (255 is assumed "
                       "only for uint8; 2.0 for floats in [-1, 1]).")
    data_range = 255.0
  if data_range <= 0:
    raise ValueError(f"data_range={data_range}: expected a positive value.")
  return a.astype(np.float64), b.astype(np.float64), float(data_range)


def psnr(a: Any, b: Any, data_range: float | None = None) -> np.ndarray:
  """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE), in dB.

  Args:
    a, b: images [..., H, W, C] of one shape; uint8 or float.
    data_range: max - min of the pixel scale; None means 255 and requires uint8 inputs.

  Returns:
    float64 array of shape a.shape[:-3]; +inf where the images are identical (no cap, so
    means over images should be taken over finite values or reported with the count of
    exact copies).
  """
  a, b, data_range = _pair(a, b, data_range)
  mse = ((a - b) ** 2).mean(axis=(-3, -2, -1))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range ** 2 / mse)


def ssim(a: Any, b: Any, data_range: float | None = None,
         gaussian_weights: bool = True) -> np.ndarray:
  """Structural similarity per image (mean SSIM over pixels and channels).

  `skimage.metrics.structural_similarity` with channel_axis=-1 and the data range given
  explicitly. With gaussian_weights (the default) it uses the settings of Wang et al. 2004:
  an 11x11 Gaussian window of sigma 1.5 and population covariances; without, skimage's
  defaults (7x7 uniform window, sample covariances).

  Args:
    a, b: images [..., H, W, C] of one shape (H, W at least the window size).
    data_range: as in `psnr`.
    gaussian_weights: Wang et al.'s window (True) or skimage's default window.

  Returns:
    float64 array of shape a.shape[:-3]; 1.0 for identical images.
  """
  a, b, data_range = _pair(a, b, data_range)
  kwargs = dict(channel_axis=-1, data_range=data_range)
  if gaussian_weights:
    kwargs.update(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
  lead = a.shape[:-3]
  flat_a, flat_b = a.reshape((-1,) + a.shape[-3:]), b.reshape((-1,) + b.shape[-3:])
  values = [metrics.structural_similarity(x, y, **kwargs) for x, y in zip(flat_a, flat_b)]
  return np.asarray(values, np.float64).reshape(lead)


def codebook_usage(indices: Any, num_codes: int) -> tuple[float, float]:
  """How much of a VQ codebook a set of token indices uses.

  Args:
    indices: integer token indices of any shape, each in [0, num_codes).
    num_codes: codebook size.

  Returns:
    (share of the codes used at least once, perplexity exp(H) of the empirical code
    distribution with H in nats: num_codes for uniform use, 1 for a single code).

  Raises:
    ValueError: no indices, non-integer indices, or indices outside [0, num_codes).
  """
  idx = np.asarray(indices).reshape(-1)
  if num_codes < 1:
    raise ValueError(f"num_codes={num_codes}: expected at least 1.")
  if idx.size == 0:
    raise ValueError("No indices.")
  if not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"indices: expected integers, got {idx.dtype}.")
  if idx.min() < 0 or idx.max() >= num_codes:
    raise ValueError(f"indices in [{idx.min()}, {idx.max()}]: outside [0, {num_codes}).")
  counts = np.bincount(idx, minlength=num_codes)
  p = counts[counts > 0] / idx.size
  entropy = -(p * np.log(p)).sum()
  return float((counts > 0).sum() / num_codes), float(np.exp(entropy))
