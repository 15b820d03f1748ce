"""Evaluation numerics: FID/KID/IS against closed forms, streaming statistics, tiling, PSNR."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest
from scipy import linalg

from conftest import REPO, subprocess_env
from nuwa_jax.evaluators import blocks, image_quality, statistics
from nuwa_jax.evaluators.statistics import FeatureStats


def random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


def random_orthogonal(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


# ------------------------------------------------------------------ Fréchet distance


def test_frechet_identical_gaussians_is_zero():
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=32), random_spd(rng, 32)
  assert abs(statistics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_one_dimensional_closed_form():
  m1, s1, m2, s2 = 0.3, 2.0, -1.2, 0.5
  got = statistics.frechet_distance([m1], [[s1 ** 2]], [m2], [[s2 ** 2]])
  np.testing.assert_allclose(got, (m1 - m2) ** 2 + (s1 - s2) ** 2, rtol=1e-12)


def test_frechet_diagonal_closed_form():
  rng = np.random.default_rng(1)
  m1, m2 = rng.normal(size=20), rng.normal(size=20)
  a, b = rng.uniform(0.1, 3.0, 20), rng.uniform(0.1, 3.0, 20)
  want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
  got = statistics.frechet_distance(m1, np.diag(a), m2, np.diag(b))
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_frechet_commuting_covariances_closed_form():
  rng = np.random.default_rng(2)
  d = 24
  q = random_orthogonal(rng, d)
  a, b = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
  got = statistics.frechet_distance(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T)
  np.testing.assert_allclose(got, want, rtol=1e-9)


def test_frechet_random_spd_matches_sqrtm_reference():
  rng = np.random.default_rng(3)
  for d in (5, 40):
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, scale=2.0)
    want = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(
        linalg.sqrtm(s1 @ s2)).real
    np.testing.assert_allclose(statistics.frechet_distance(m1, s1, m2, s2), want, rtol=1e-8)
    # Symmetric in its two arguments, as the distance is.
    np.testing.assert_allclose(statistics.frechet_distance(m2, s2, m1, s1), want, rtol=1e-8)


def test_frechet_rank_deficient_sample_covariances():
  """10 samples in 64 dims: covariances of rank 9, in different subspaces."""
  rng = np.random.default_rng(4)
  n, d = 10, 64
  x1, x2 = rng.normal(size=(n, d)), 0.5 * rng.normal(size=(n, d)) + 0.2
  s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
  got = statistics.frechet_distance(x1.mean(0), s1, x2.mean(0), s2)
  assert np.isfinite(got) and got >= 0
  # With S = Xc^T Xc / (n - 1), the eigenvalues of S1 S2 are those of M M^T with
  # M = Xc1 Xc2^T / (n - 1), so tr((S1 S2)^1/2) is M's nuclear norm: exact at any rank.
  c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
  nuclear = np.linalg.svd(c1 @ c2.T / (n - 1), compute_uv=False).sum()
  diff = x1.mean(0) - x2.mean(0)
  want = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * nuclear
  np.testing.assert_allclose(got, want, rtol=1e-8)


def test_frechet_covariances_in_a_common_subspace():
  """Rank-5 covariances in 64 dims equal the 5-dimensional problem they embed."""
  rng = np.random.default_rng(5)
  d, k = 64, 5
  u = random_orthogonal(rng, d)[:, :k]
  a, b = random_spd(rng, k), random_spd(rng, k, scale=3.0)
  m1, m2 = rng.normal(size=k), rng.normal(size=k)
  off = rng.normal(size=d)  # the same offset outside the subspace cancels in the means
  got = statistics.frechet_distance(u @ m1 + off, u @ a @ u.T, u @ m2 + off, u @ b @ u.T)
  want = ((m1 - m2) ** 2).sum() + np.trace(a) + np.trace(b) - 2 * np.trace(
      linalg.sqrtm(a @ b)).real
  assert np.isfinite(got) and got >= 0
  np.testing.assert_allclose(got, want, rtol=1e-8)


@pytest.mark.parametrize("args", [
    (np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)),  # mu not a vector
    (np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)),  # sigma does not match mu
    (np.zeros(3), np.zeros((3, 4)), np.zeros(3), np.eye(3)),  # sigma not square
    (np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)),  # different widths
    (np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3)),  # NaN
])
def test_frechet_rejects_bad_inputs(args):
  with pytest.raises(ValueError):
    statistics.frechet_distance(*args)


# ------------------------------------------------------------------ streaming statistics


def batches(rng, sizes=(7, 1, 0, 13, 2, 30, 5), d=6):
  # A large common offset: the mean/covariance update must not lose precision to it.
  return [rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + 100.0 for n in sizes]


def assert_matches(stats, data, rtol=1e-10):
  assert stats.count == data.shape[0]
  np.testing.assert_allclose(stats.mean, data.mean(axis=0), rtol=rtol, atol=0)
  want = np.cov(data, rowvar=False)
  np.testing.assert_allclose(stats.cov, want, rtol=rtol, atol=rtol * np.abs(want).max())


def tree_merge(parts):
  if len(parts) == 1:
    return parts[0].copy()
  half = len(parts) // 2
  return tree_merge(parts[:half]).merge(tree_merge(parts[half:]))


def test_feature_stats_equal_numpy_in_every_merge_order():
  rng = np.random.default_rng(6)
  data = batches(rng)
  everything = np.concatenate(data)
  per_batch = [FeatureStats().update(b) for b in data]

  sequential = FeatureStats()
  for b in data:
    sequential.update(b)
  assert_matches(sequential, everything)

  reverse = FeatureStats(dim=6)
  for s in reversed(per_batch):
    reverse.merge(s)
  assert_matches(reverse, np.concatenate(data[::-1]))

  assert_matches(tree_merge(per_batch), everything)
  order = rng.permutation(len(data))
  assert_matches(tree_merge([per_batch[i] for i in order]),
                 np.concatenate([data[i] for i in order]))
  # Left-deep, right-deep and balanced trees of the same batches agree with each other.
  right_deep = per_batch[-1].copy()
  for s in per_batch[-2::-1]:
    right_deep = s.copy().merge(right_deep)
  for other in (reverse, tree_merge(per_batch), right_deep):
    np.testing.assert_allclose(other.cov, sequential.cov, rtol=1e-11)
  # Merging statistics into themselves counts every sample twice.
  doubled = sequential.copy().merge(sequential)
  assert_matches(doubled, np.concatenate([everything, everything]))
  # `merge` leaves its argument alone.
  assert per_batch[0].count == 7


def test_feature_stats_round_trip_through_npz(tmp_path):
  rng = np.random.default_rng(7)
  data = batches(rng)
  for keep in (False, True):
    stats = FeatureStats(keep_features=keep, features_dtype=np.float64)
    for b in data:
      stats.update(b)
    path = tmp_path / f"stats_{keep}.npz"
    np.savez(path, **stats.to_arrays())
    with np.load(path) as f:
      loaded = FeatureStats.from_arrays(f)
    assert loaded.count == stats.count and loaded.keep_features == keep
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    if keep:
      np.testing.assert_array_equal(loaded.features, np.concatenate(data))
  # (mu, sigma) from elsewhere, e.g. precomputed reference statistics.
  ref = FeatureStats.from_mean_cov(stats.mean, stats.cov, stats.count)
  np.testing.assert_allclose(ref.cov, stats.cov, rtol=1e-14)


def test_feature_stats_keep_features_and_errors():
  rng = np.random.default_rng(8)
  data = batches(rng)
  kept = FeatureStats(keep_features=True)
  for b in data:
    kept.update(b)
  assert kept.features.dtype == np.float32 and kept.features.shape == (58, 6)
  np.testing.assert_allclose(kept.features, np.concatenate(data), rtol=1e-7)
  with pytest.raises(ValueError, match="do not have them"):
    kept.merge(FeatureStats().update(data[0]))
  with pytest.raises(ValueError, match="width"):
    kept.update(np.zeros((2, 5)))
  with pytest.raises(ValueError, match="NaN"):
    FeatureStats().update(np.full((2, 3), np.nan))
  with pytest.raises(ValueError, match="at least 2"):
    _ = FeatureStats().update(np.ones((1, 3))).cov
  with pytest.raises(ValueError, match="keep_features=False"):
    _ = FeatureStats().update(np.ones((2, 3))).features


def test_allgather_in_one_process_is_a_copy():
  rng = np.random.default_rng(9)
  stats = FeatureStats(keep_features=True).update(rng.normal(size=(5, 3)))
  total = stats.allgather()
  assert total is not stats and total.count == 5
  np.testing.assert_array_equal(total.cov, stats.cov)
  np.testing.assert_array_equal(total.features, stats.features)


ALLGATHER_WORKER = """
import sys
import jax
import numpy as np
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
from nuwa_jax.evaluators.statistics import FeatureStats
x = np.random.default_rng(0).normal(size=(10, 5)) + 3.0
stats = FeatureStats(keep_features=True, features_dtype=np.float64)
if pid == 0:
  stats.update(x[:7])
else:  # fewer rows, in two batches
  stats.update(x[7:8]).update(x[8:])
np.savez(out, **stats.allgather().to_arrays())
"""


def test_allgather_across_two_processes(tmp_path):
  """Two JAX processes with 7 and 3 samples get the same, float64-exact totals."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = subprocess_env(devices=1)
  procs = [subprocess.Popen([sys.executable, "-c", ALLGATHER_WORKER, str(pid), str(port),
                             str(tmp_path / f"p{pid}.npz")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for pid in range(2)]
  try:
    outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  x = np.random.default_rng(0).normal(size=(10, 5)) + 3.0
  results = [FeatureStats.from_arrays(np.load(tmp_path / f"p{pid}.npz")) for pid in range(2)]
  for r in results:
    assert_matches(r, x, rtol=1e-13)
    np.testing.assert_array_equal(r.features, x)
  np.testing.assert_array_equal(results[0].cov, results[1].cov)


# ------------------------------------------------------------------ FID from statistics


def test_fid_from_stats_matches_frechet_of_numpy_moments():
  rng = np.random.default_rng(10)
  x, y = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) * 1.5 + 0.5
  a, b = FeatureStats().update(x), FeatureStats().update(y)
  want = statistics.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                                     np.cov(y, rowvar=False))
  np.testing.assert_allclose(statistics.fid_from_stats(a, b), want, rtol=1e-10)


# ------------------------------------------------------------------ KID


def brute_force_mmd2(x, y, degree=3, gamma=None, coef0=1.0):
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  k = lambda u, v: (gamma * u @ v + coef0) ** degree  # noqa: E731
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_equals_brute_force_mmd_with_one_subset_of_everything():
  rng = np.random.default_rng(11)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.7
  mean, std = statistics.kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
  np.testing.assert_allclose(mean, brute_force_mmd2(x, y), rtol=1e-12)
  assert std == 0.0
  mean, _ = statistics.kernel_inception_distance(x, y, num_subsets=3, subset_size=6,
                                                 degree=2, gamma=0.5, coef0=2.0)
  np.testing.assert_allclose(mean, brute_force_mmd2(x, y, 2, 0.5, 2.0), rtol=1e-12)


def test_kid_is_unbiased_and_positive_for_shifted_sets():
  rng = np.random.default_rng(12)
  # Unbiased: over many independent pairs of sets from one distribution the mean is 0 within
  # its standard error (a biased V-statistic would sit well above).
  values = [statistics.kernel_inception_distance(rng.normal(size=(40, 8)),
                                                 rng.normal(size=(40, 8)), num_subsets=1)[0]
            for _ in range(300)]
  assert abs(np.mean(values)) < 4 * np.std(values) / np.sqrt(len(values))
  same = statistics.kernel_inception_distance(rng.normal(size=(400, 8)),
                                              rng.normal(size=(400, 8)), num_subsets=20,
                                              subset_size=200)
  shifted = statistics.kernel_inception_distance(rng.normal(size=(400, 8)),
                                                 rng.normal(size=(400, 8)) + 0.5,
                                                 num_subsets=20, subset_size=200)
  assert shifted[0] > 5 * shifted[1] > 0
  assert abs(same[0]) < 0.05 * shifted[0]
  assert abs(same[0]) < 3 * same[1]


def test_kid_is_deterministic_for_a_seed_and_caps_the_subset_size():
  rng = np.random.default_rng(13)
  x, y = rng.normal(size=(30, 4)), rng.normal(size=(45, 4)) + 0.3
  a = statistics.kernel_inception_distance(x, y, num_subsets=10, seed=3)
  assert a == statistics.kernel_inception_distance(x, y, num_subsets=10, seed=3)
  assert a != statistics.kernel_inception_distance(x, y, num_subsets=10, seed=4)
  kept = FeatureStats(keep_features=True, features_dtype=np.float64).update(x)
  assert a == statistics.kernel_inception_distance(kept, y, num_subsets=10, seed=3)
  with pytest.raises(ValueError, match="widths"):
    statistics.kernel_inception_distance(x, y[:, :3])


# ------------------------------------------------------------------ Inception Score


def test_inception_score_uniform_and_one_hot():
  mean, std = statistics.inception_score(np.zeros((100, 1008)), splits=10)
  np.testing.assert_allclose([mean, std], [1.0, 0.0], atol=1e-12)
  c = 10
  one_hot = np.where(np.arange(100)[:, None] % c == np.arange(c), 1e3, 0.0)
  mean, std = statistics.inception_score(one_hot, splits=10)
  np.testing.assert_allclose([mean, std], [c, 0.0], atol=1e-9)
  # -inf logits (probability exactly 0) are handled as 0 log 0 = 0.
  mean, _ = statistics.inception_score(np.where(one_hot > 0, 0.0, -np.inf), splits=5)
  np.testing.assert_allclose(mean, c, rtol=1e-12)


def test_inception_score_splits():
  c = 8
  uniform = np.zeros((40, c))
  one_hot = np.where(np.arange(40)[:, None] % c == np.arange(c), 1e3, 0.0)
  mean, std = statistics.inception_score(np.concatenate([uniform, one_hot]), splits=2)
  np.testing.assert_allclose([mean, std], [(1 + c) / 2, (c - 1) / 2], rtol=1e-9)
  # A seed shuffles the items before splitting: both halves mixed, the scores move.
  shuffled, _ = statistics.inception_score(np.concatenate([uniform, one_hot]), splits=2, seed=0)
  assert shuffled != mean
  with pytest.raises(ValueError):
    statistics.inception_score(np.zeros((3, c)), splits=4)


# ------------------------------------------------------------------ bootstrap


def tiles_per_image(rng, n_images, tiles=3, d=4, shift=0.3):
  return [rng.normal(size=(tiles, d)) + shift for _ in range(n_images)]


def test_bootstrap_resample_equals_fid_of_concatenated_tiles():
  rng = np.random.default_rng(14)
  images = tiles_per_image(rng, 12) + [np.zeros((0, 4))]  # an image without tiles is allowed
  reference = FeatureStats().update(rng.normal(size=(500, 4)))
  samples = statistics.bootstrap_fid_samples(images, reference, num_resamples=3, seed=5)
  draw = np.random.default_rng(5)
  for value in samples:
    idx = draw.integers(0, len(images), size=len(images))
    stats = FeatureStats().update(np.concatenate([images[i] for i in idx]))
    np.testing.assert_allclose(value, statistics.fid_from_stats(stats, reference), rtol=1e-9)


def test_bootstrap_interval_contains_the_estimate_and_narrows():
  rng = np.random.default_rng(15)
  reference = FeatureStats().update(rng.normal(size=(4000, 4)))
  widths = []
  for n_images in (40, 640):
    images = tiles_per_image(rng, n_images)
    point = statistics.fid_from_stats(FeatureStats().update(np.concatenate(images)),
                                      reference)
    low, high = statistics.bootstrap_fid(images, reference, num_resamples=100, seed=0)
    assert low <= point <= high
    widths.append(high - low)
  assert widths[1] < 0.5 * widths[0]


def test_centred_bootstrap_when_the_small_sample_bias_dominates():
  """Few tiles for the width: resampled FIDs sit above the estimate; centred keeps it."""
  rng = np.random.default_rng(16)
  reference = FeatureStats().update(rng.normal(size=(4000, 32)))
  images = tiles_per_image(rng, 30, tiles=2, d=32, shift=0.1)
  point = statistics.fid_from_stats(FeatureStats().update(np.concatenate(images)), reference)
  low, high = statistics.bootstrap_fid(images, reference, num_resamples=50)
  assert point < low
  c_low, c_high = statistics.bootstrap_fid(images, reference, num_resamples=50,
                                           method="centred")
  assert c_low <= point <= c_high
  np.testing.assert_allclose(c_high - c_low, high - low, rtol=1e-9)


# ------------------------------------------------------------------ Block-FID tiling


def test_tile_counts_and_partial_tiles_dropped():
  rng = np.random.default_rng(16)
  image = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
  assert blocks.tile_blocks(image, (64, 64)).shape == (16, 64, 64, 3)
  ragged = rng.integers(0, 256, size=(250, 270, 3), dtype=np.uint8)
  tiles = blocks.tile_blocks(ragged, (64, 64))
  assert tiles.shape == (3 * 4, 64, 64, 3) and tiles.dtype == np.uint8
  assert blocks.count_blocks(250, 270, (64, 64)) == 12
  # Row-major from the top-left corner: tile (1, 2) is rows 64:128, columns 128:192.
  np.testing.assert_array_equal(tiles[1 * 4 + 2], ragged[64:128, 128:192])
  np.testing.assert_array_equal(blocks.block_positions(250, 270, (64, 64))[6], [64, 128])
  assert blocks.tile_blocks(ragged, (48, 100)).shape == (5 * 2, 48, 100, 3)
  assert blocks.tile_blocks(ragged, (300, 64)).shape == (0, 300, 64, 3)


def test_generated_region_in_an_outpainting_layout():
  """Left half given: tiles wholly inside it are left out, tiles straddling it are kept."""
  image = np.zeros((128, 256, 3), np.uint8)
  given = np.zeros((128, 256), bool)
  given[:, :128] = True
  # 48-px tiles: columns start at 0, 48, 96, 144, 192; 96:144 straddles the boundary.
  positions = blocks.block_positions(128, 256, (48, 48), given, "generated")
  assert sorted({int(x) for x in positions[:, 1]}) == [96, 144, 192]
  assert blocks.tile_blocks(image, (48, 48), given, "generated").shape[0] == 2 * 3
  assert blocks.count_blocks(128, 256, (48, 48), given, "generated") == 6
  assert blocks.count_blocks(128, 256, (48, 48), given, "all") == 2 * 5
  assert blocks.count_blocks(128, 256, (64, 64), given, "generated") == 2 * 2
  # Nothing given: every whole tile counts as generated.
  assert blocks.count_blocks(128, 256, (64, 64), None, "generated") == 8
  with pytest.raises(ValueError, match="mask"):
    blocks.tile_blocks(image, (48, 48), given[:, :100])
  with pytest.raises(ValueError, match="region"):
    blocks.tile_blocks(image, (48, 48), given, "middle")


def test_video_tiles_and_block_spec():
  video = np.arange(3 * 32 * 48 * 3, dtype=np.int64).reshape(3, 32, 48, 3).astype(np.uint8)
  tiles = blocks.tile_video_blocks(video, (16, 16))
  assert tiles.shape == (3 * 2 * 3, 16, 16, 3)
  np.testing.assert_array_equal(tiles[6], video[1, :16, :16])
  given = np.zeros((3, 32, 48), bool)
  given[0] = True  # first frame given (prediction): its tiles are left out
  assert blocks.tile_video_blocks(video, (16, 16), given).shape[0] == 2 * 2 * 3
  spec = blocks.BlockSpec(block=(16, 16), region="generated")
  assert spec.as_dict() == {"block_height": 16, "block_width": 16, "region": "generated",
                            "anchor": "top-left", "stride_height": 16, "stride_width": 16,
                            "partial_tiles": "dropped"}
  assert spec.count(32, 48, given[0]) == 0 and spec.tile_video(video, given).shape[0] == 12
  with pytest.raises(ValueError):
    blocks.BlockSpec(block=(16, 16), stride=(8, 8))


# ------------------------------------------------------------------ PSNR, SSIM, codebook


def test_psnr_identical_and_constant_offset():
  rng = np.random.default_rng(17)
  a = rng.integers(0, 246, size=(2, 16, 16, 3), dtype=np.uint8)
  np.testing.assert_array_equal(image_quality.psnr(a, a), [np.inf, np.inf])
  got = image_quality.psnr(a, a + np.uint8(10))
  np.testing.assert_allclose(got, 20 * np.log10(255 / 10), rtol=1e-12)
  x = a / 127.5 - 1.0
  np.testing.assert_allclose(image_quality.psnr(x, x + 0.1, data_range=2.0),
                             20 * np.log10(2.0 / 0.1), rtol=1e-10)
  with pytest.raises(ValueError, match="data_range"):
    image_quality.psnr(x, x)


def test_ssim_per_image():
  rng = np.random.default_rng(18)
  a = rng.integers(0, 256, size=(3, 24, 24, 3), dtype=np.uint8)
  np.testing.assert_allclose(image_quality.ssim(a, a), 1.0, rtol=1e-12)
  noisy = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
  noisier = np.clip(a + rng.normal(0, 60, a.shape), 0, 255).astype(np.uint8)
  values = image_quality.ssim(a, noisy)
  assert values.shape == (3,)
  assert np.all(values < 0.99) and np.all(image_quality.ssim(a, noisier) < values)
  # The same images on another scale, with the matching data range, score the same.
  np.testing.assert_allclose(image_quality.ssim(a / 255.0, noisy / 255.0, data_range=1.0),
                             values, rtol=1e-10)


def test_codebook_usage():
  share, perplexity = image_quality.codebook_usage(np.array([[0, 0], [1, 1]]), num_codes=4)
  np.testing.assert_allclose([share, perplexity], [0.5, 2.0], rtol=1e-12)
  share, perplexity = image_quality.codebook_usage(np.arange(64) % 16, num_codes=16)
  np.testing.assert_allclose([share, perplexity], [1.0, 16.0], rtol=1e-12)
  # Skewed use: perplexity is exp of the entropy, below the number of codes used.
  share, perplexity = image_quality.codebook_usage([0, 0, 0, 1], num_codes=8)
  p = np.array([0.75, 0.25])
  np.testing.assert_allclose(perplexity, np.exp(-(p * np.log(p)).sum()), rtol=1e-12)
  with pytest.raises(ValueError):
    image_quality.codebook_usage([0, 8], num_codes=8)
