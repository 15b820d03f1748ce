"""FID, KID and Inception Score of generated pictures against held-out real ones.

Features: pool3 (2048) of the FID Inception-v3 (pytorch-fid's network and preprocessing:
bilinear resize to 299 without antialiasing, [-1, 1]); IS from its 1008-way logits. The
reference is `num_samples` held-out pictures of `dataset` at the same size, cut by
`data.references.fit`. Keys: fid, kid, kid_std, is, is_std, and the protocol (num_samples,
step-independent settings) as `protocol/*` numbers; the reference key is in the run's row.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from nuwa_jax.evaluators import networks, statistics
from nuwa_jax.evaluators.common import Skipped
from nuwa_jax.evaluators.sampling import TEXT_TASKS, SampleSpec, gather_rows, share


class SampleEvaluator:
  """Shared set-up of the evaluators that draw samples: spec, counts, the reference data."""
  NEEDS = ("samples", "references")

  def __init__(self, samples, references_, task: str, dataset: str, num_samples: int,
               seed: int, save_samples: int, spec_kw: dict):
    if num_samples < 2:
      raise ValueError(f"num_samples={num_samples}: expected >= 2")
    self.samples, self.refs = samples, references_
    self.dataset, self.num_samples, self.save_count = dataset, int(num_samples), save_samples
    self.spec = SampleSpec(task=task, seed=seed, **spec_kw)
    self.protocol = {"num_samples": self.num_samples, "seed": seed}

  def held_out(self):
    return self.refs.held_out(self.dataset)

  def draw(self, state, name: str, given=None):
    """This process's share of the samples (captions / given pictures from the held-out set)."""
    ids = share(self.num_samples)
    captions = None
    if self.spec.task in TEXT_TASKS:
      captions = self.held_out().captions(self.num_samples)
      captions = [captions[i] for i in ids]
    drawn = self.samples(getattr(state, "params", state), self.spec, ids, captions,
                         None if given is None else given[ids])
    self.samples.save(name, drawn, self.save_count)
    return drawn, captions


class Evaluator(SampleEvaluator):
  NEEDS = ("samples", "references")

  def __init__(self, samples, references, task: str = "unconditional", dataset: str = "",
               num_samples: int = 64, height: int = 0, width: int = 0, seed: int = 0,
               guidance: float = 1.0, top_k: int = 0, temperature: float = 1.0,
               inception: str = "", kid_subset: int = 1000, is_splits: int = 10,
               save_samples: int = 8):
    super().__init__(samples, references, task, dataset, num_samples, seed, save_samples,
                     dict(height=height, width=width, guidance=guidance, top_k=top_k,
                          temperature=temperature))
    self.inception_path, self.kid_subset, self.is_splits = inception, kid_subset, is_splits

  def run(self, state) -> Iterator[tuple[str, object]]:
    net = networks.load("inception", self.inception_path)
    if isinstance(net, Skipped):
      yield "fid", net
      return
    height, width = self.samples.size(self.spec)
    drawn, _ = self.draw(state, f"fid_{self.spec.task}")
    feats = net(drawn.pixels)
    pool3 = gather_rows(np.asarray(feats["pool3"], np.float64))
    logits = gather_rows(np.asarray(feats["logits"], np.float64))
    ref, ref_feats, _ = self.refs.features(self.dataset, net, "pool3", self.num_samples,
                                           (height, width))
    fake = statistics.FeatureStats()
    fake.update(pool3)
    yield "fid", statistics.fid_from_stats(fake, ref)
    kid, kid_std = statistics.kernel_inception_distance(
        pool3, ref_feats, subset_size=min(self.kid_subset, len(pool3), len(ref_feats)))
    yield "kid", kid
    yield "kid_std", kid_std
    is_mean, is_std = statistics.inception_score(logits, splits=min(self.is_splits,
                                                                    len(logits)))
    yield "is", is_mean
    yield "is_std", is_std
    yield "num_samples", len(pool3)
