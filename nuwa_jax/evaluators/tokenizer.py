"""Tokenizer quality on fixed held-out crops: PSNR, SSIM, rFID and codebook use.

PSNR and SSIM per picture on uint8 pixels (data range 255), averaged, overall and per dataset
(`psnr/<name>`); `codes_used` the share of the codebook that the held-out crops use and
`perplexity` of their code histogram; `rfid` the FID between the crops and their
reconstructions (FID Inception-v3 pool3, skipped without its weights).
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import numpy as np

from nuwa_jax.evaluators import image_quality, networks, statistics
from nuwa_jax.evaluators.common import Skipped


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


class Evaluator:
  NEEDS = ("reconstruct", "held_out", "num_codes")

  def __init__(self, reconstruct: Callable, held_out: Mapping[str, np.ndarray],
               num_codes: int, inception: str = ""):
    """reconstruct(state, images [N, H, W, 3] in [-1, 1]) -> (reconstructions, code indices);
    held_out: {dataset name: fixed crops in [-1, 1]}."""
    self.reconstruct, self.held_out, self.num_codes = reconstruct, dict(held_out), num_codes
    self.inception_path = inception
    self.last_reconstructions: dict[str, np.ndarray] = {}

  def run(self, state) -> Iterator[tuple[str, object]]:
    psnrs, ssims, codes, originals, recons = [], [], [], [], []
    for name, images in self.held_out.items():
      recon, indices = self.reconstruct(state, images)
      a, b = to_uint8(images), to_uint8(recon)
      p, s = image_quality.psnr(a, b, data_range=255), image_quality.ssim(a, b)
      if len(self.held_out) > 1:
        yield f"psnr/{name}", float(np.mean(p))
        yield f"ssim/{name}", float(np.mean(s))
      psnrs.append(p)
      ssims.append(s)
      codes.append(np.asarray(indices).reshape(-1))
      originals.append(a)
      recons.append(b)
      self.last_reconstructions[name] = np.asarray(recon)
    yield "psnr", float(np.mean(np.concatenate(psnrs)))
    yield "ssim", float(np.mean(np.concatenate(ssims)))
    used, perplexity = image_quality.codebook_usage(np.concatenate(codes), self.num_codes)
    yield "codes_used", used
    yield "perplexity", perplexity
    net = networks.load("inception", self.inception_path)
    if isinstance(net, Skipped):
      yield "rfid", net
      return
    real, fake = statistics.FeatureStats(), statistics.FeatureStats()
    real.update(np.asarray(net(np.concatenate(originals))["pool3"], np.float64))
    fake.update(np.asarray(net(np.concatenate(recons))["pool3"], np.float64))
    yield "rfid", statistics.fid_from_stats(real, fake)
