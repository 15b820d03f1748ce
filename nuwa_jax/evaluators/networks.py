"""The metric networks (FID Inception-v3, CLIP, I3D) loaded once per weights file.

Each loader returns the network, or `Skipped` naming the missing file and how to make it
(`python -m nuwa_jax.tools.convert_*`), so an evaluation without weights still writes every
other metric. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import os

from nuwa_jax.evaluators.common import Skipped
from nuwa_jax.models import clip, i3d, inception

HOW = {
    "inception": "convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
                 "`python -m nuwa_jax.tools.convert_inception`",
    "clip": "convert OpenAI's ViT-B-32.pt with `python -m nuwa_jax.tools.convert_clip`",
    "i3d": "convert a Kinetics-400 I3D (i3d_pretrained_400.pt) with "
           "`python -m nuwa_jax.tools.convert_i3d`",
}


def _missing(kind: str, path: str) -> Skipped | None:
  if not path:
    return Skipped(f"no {kind} weights given ({HOW[kind]}, then set the path in the config)")
  if not os.path.isfile(path):
    return Skipped(f"{kind} weights {path} do not exist ({HOW[kind]})")
  return None


BATCH = {"inception": 16, "clip": 16, "i3d": 4}  # inputs per compiled call (padded)


@functools.lru_cache(maxsize=4)
def _inception(path: str):
  return inception.FIDInception.load(path, batch_size=BATCH["inception"])


@functools.lru_cache(maxsize=4)
def _clip(path: str):
  return clip.CLIPScorer.load(path, batch_size=BATCH["clip"])


@functools.lru_cache(maxsize=4)
def _i3d(path: str):
  return i3d.I3DFeatures.load(path, batch_size=BATCH["i3d"])


def load(kind: str, path: str):
  """The network of `kind` ('inception' | 'clip' | 'i3d') from `path`, or Skipped."""
  missing = _missing(kind, path)
  if missing:
    return missing
  return {"inception": _inception, "clip": _clip, "i3d": _i3d}[kind](os.path.abspath(path))
