"""I3D (nuwa_jax.models.i3d) and its converter against a pure-torch InceptionI3d written here.

The reference has pytorch-i3d's key names and wiring at an eighth of the widths (cheap at
224x224 with 16 frames) and random weights and batch-norm statistics; its state dict goes
through the converter's command line and the features must agree within 1e-4.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from nuwa_jax.models import i3d, weights  # pylint: disable=wrong-import-position
from nuwa_jax.tools import convert_i3d  # pylint: disable=wrong-import-position

DIVISOR = 8
TOL = 1e-4


def _pads(sizes, kernel, stride):
  """F.pad argument (last axis first) of TF SAME padding, written from its definition."""
  out = []
  for size, k, s in reversed(list(zip(sizes, kernel, stride))):
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    out += [total // 2, total - total // 2]
  return out


class TorchUnit(torch.nn.Module):

  def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), logits=False):
    super().__init__()
    self.kernel, self.stride, self.is_logits = kernel, stride, logits
    self.conv3d = torch.nn.Conv3d(cin, cout, kernel, stride, padding=0, bias=logits)
    if not logits:
      self.bn = torch.nn.BatchNorm3d(cout, eps=0.001, momentum=0.01)

  def forward(self, x):
    x = self.conv3d(F.pad(x, _pads(x.shape[2:], self.kernel, self.stride)))
    return x if self.is_logits else F.relu(self.bn(x))


class TorchPool(torch.nn.MaxPool3d):

  def forward(self, x):
    return super().forward(F.pad(x, _pads(x.shape[2:], self.kernel_size, self.stride)))


class TorchInception(torch.nn.Module):

  def __init__(self, cin, w):
    super().__init__()
    self.b0 = TorchUnit(cin, w[0])
    self.b1a, self.b1b = TorchUnit(cin, w[1]), TorchUnit(w[1], w[2], (3, 3, 3))
    self.b2a, self.b2b = TorchUnit(cin, w[3]), TorchUnit(w[3], w[4], (3, 3, 3))
    self.b3a, self.b3b = TorchPool((3, 3, 3), (1, 1, 1)), TorchUnit(cin, w[5])
    self.width = w[0] + w[2] + w[4] + w[5]

  def forward(self, x):
    return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                      self.b3b(self.b3a(x))], dim=1)


class TorchI3D(torch.nn.Module):
  """InceptionI3d's layers under its key names; forward returns (time-mean logits, pool)."""

  def __init__(self, config):
    super().__init__()
    s1, s2, s3 = config["stem_widths"]
    self.order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3",
                  "MaxPool3d_3a_3x3", "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b",
                  "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2",
                  "Mixed_5b", "Mixed_5c"]
    self.Conv3d_1a_7x7 = TorchUnit(3, s1, (7, 7, 7), (2, 2, 2))
    self.MaxPool3d_2a_3x3 = TorchPool((1, 3, 3), (1, 2, 2))
    self.Conv3d_2b_1x1 = TorchUnit(s1, s2)
    self.Conv3d_2c_3x3 = TorchUnit(s2, s3, (3, 3, 3))
    self.MaxPool3d_3a_3x3 = TorchPool((1, 3, 3), (1, 2, 2))
    self.MaxPool3d_4a_3x3 = TorchPool((3, 3, 3), (2, 2, 2))
    self.MaxPool3d_5a_2x2 = TorchPool((2, 2, 2), (2, 2, 2))
    cin = s3
    for name, w in zip(i3d.MIXED_NAMES, config["mixed_widths"]):
      setattr(self, name, TorchInception(cin, w))
      cin = getattr(self, name).width
    self.avg_pool = torch.nn.AvgPool3d((2, 7, 7), (1, 1, 1))
    self.logits = TorchUnit(cin, config["num_classes"], logits=True)

  def forward(self, x):
    for name in self.order:
      x = getattr(self, name)(x)
    pooled = self.avg_pool(x)
    logits = self.logits(pooled).squeeze(3).squeeze(3)
    return logits.mean(2), pooled.squeeze(3).squeeze(3).mean(2)


def _randomise(model, seed):
  """He-normal convs and random running statistics, so the comparison is not of tiny numbers."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      if name.endswith("conv3d.weight"):
        fan_in = math.prod(p.shape[1:])
        p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / fan_in))
      elif name.endswith(("bn.weight", "bn.running_var")):
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
      elif name.endswith(("bn.bias", "bn.running_mean", "conv3d.bias")):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
  return model.eval()


def _torch_features(model, videos):
  """TATS-style FVD input: shorter side to 224 (bilinear), centre crop, [-1, 1]."""
  x = torch.from_numpy(videos).float() / 127.5 - 1.0  # N T H W C
  n, t, h, w, _ = x.shape
  short = min(h, w)
  size = (224 if h == short else -(-h * 224 // short), 224 if w == short else -(-w * 224 // short))
  x = F.interpolate(x.permute(0, 1, 4, 2, 3).reshape(n * t, 3, h, w), size=size,
                    mode="bilinear", align_corners=False)
  top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
  x = x[:, :, top:top + 224, left:left + 224].reshape(n, t, 3, 224, 224).permute(0, 2, 1, 3, 4)
  with torch.no_grad():
    logits, pool = model(x.contiguous())
  return {"logits": logits.numpy(), "pool": pool.numpy()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch.manual_seed(0)
  config = i3d.narrow_config(DIVISOR)
  model = _randomise(TorchI3D(config), seed=1)
  folder = tmp_path_factory.mktemp("i3d")
  src, out = str(folder / "i3d_pretrained_400.pt"), str(folder / "i3d.npz")
  torch.save(model.state_dict(), src)
  assert convert_i3d.main([f"--input={src}", f"--out={out}"]) == 0
  feats = i3d.I3DFeatures.load(out, batch_size=2)
  return model, feats, src, out, folder


def _videos(n, t, h=112, w=144, seed=0):
  # Smooth random content (a low-resolution noise upsampled) plus noise, like real frames.
  rng = np.random.default_rng(seed)
  low = rng.uniform(0, 255, (n, t, -(-h // 8), -(-w // 8), 3))
  big = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)[:, :, :h, :w]
  return np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)


def test_matches_torch_reference(setup):
  model, feats, _, out, _ = setup
  videos = _videos(2, 16)
  got, want = feats(videos), _torch_features(model, videos)
  assert got["logits"].shape == (2, 400) and got["pool"].shape == (2, feats.pool_width)
  assert np.std(want["logits"]) > 0.3  # outputs of a sane size, not vanished activations
  for k in ("logits", "pool"):
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=TOL, err_msg=k)
  assert feats.path == out and feats.sha256 == weights.file_sha256(out)
  with open(out + ".sha256", encoding="utf-8") as f:
    assert f.read().split()[0] == feats.sha256
  # Results do not depend on how many videos one call gets.
  one = feats(videos[1:])
  np.testing.assert_allclose(one["logits"], got["logits"][1:], rtol=0, atol=1e-5)


def test_short_clip_is_stretched_to_16_frames(setup):
  model, feats, _, _, _ = setup
  assert i3d.clip_frames(8).tolist() == [i // 2 for i in range(16)]
  assert i3d.clip_frames(9).tolist() == list(range(9))
  with pytest.raises(ValueError, match="at least 9"):
    jax.eval_shape(feats.module.apply, {"params": feats.params},
                   jax.ShapeDtypeStruct((1, 8, 224, 224, 3), np.float32))
  clip = _videos(1, 8, seed=3)
  got = feats(clip)
  want = _torch_features(model, np.repeat(clip, 2, axis=1))
  for k in ("logits", "pool"):
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=TOL, err_msg=k)


def test_resize_matches_torch_interpolate():
  videos = _videos(1, 2, 250, 330, seed=4)
  got = np.asarray(i3d.preprocess(videos))
  x = torch.from_numpy(videos[0]).float().permute(0, 3, 1, 2) / 127.5 - 1.0
  x = F.interpolate(x, size=(224, -(-330 * 224 // 250)), mode="bilinear", align_corners=False)
  left = (x.shape[-1] - 224) // 2
  want = x[..., left:left + 224].permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)


def test_random_features_share_the_compiled_network(setup):
  _, feats, _, _, _ = setup
  rand = i3d.I3DFeatures.random(0, i3d.narrow_config(DIVISOR), batch_size=2)
  out = rand(_videos(1, 16, seed=5))
  assert np.all(np.isfinite(out["logits"])) and 0.1 < np.std(out["logits"]) < 100
  assert rand.sha256 == "" and set(out) == {"logits", "pool"}


def _state(setup):
  return {k: v.numpy() for k, v in setup[0].state_dict().items()}


def test_converter_refuses_extra_missing_and_misshapen_keys(setup):
  state = _state(setup)
  flat, config = convert_i3d.convert({"module." + k: v for k, v in state.items()})
  assert config == i3d.narrow_config(DIVISOR) and "Mixed_5c/b3b/bn/var" in flat
  with pytest.raises(convert_i3d.ConversionError, match="Mixed_4c.b9.conv3d.weight"):
    convert_i3d.convert({**state, "Mixed_4c.b9.conv3d.weight": np.zeros(3)})
  missing = dict(state)
  del missing["Mixed_4d.b2a.bn.running_var"]
  with pytest.raises(convert_i3d.ConversionError, match="Mixed_4d.b2a.bn.running_var"):
    convert_i3d.convert(missing)
  wrong = dict(state)
  wrong["Mixed_3c.b1b.conv3d.weight"] = np.zeros((16, 16, 3, 3, 1), np.float32)
  with pytest.raises(convert_i3d.ConversionError, match="Mixed_3c.b1b.conv3d.weight"):
    convert_i3d.convert(wrong)
  wrong = dict(state)
  wrong["Mixed_5b.b0.bn.bias"] = np.zeros(7, np.float32)
  with pytest.raises(convert_i3d.ConversionError, match="Mixed_5b.b0.bn.bias"):
    convert_i3d.convert(wrong)


def test_command_exits_2_with_one_error_line(setup, capsys):
  folder = setup[4]
  state = _state(setup)
  del state["logits.conv3d.bias"]
  bad = str(folder / "bad.npz")
  np.savez(bad, **state)
  assert convert_i3d.main([f"--input={bad}", f"--out={folder / 'x.npz'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {bad}: ") and "logits.conv3d.bias" in err
  assert "\n" not in err and not (folder / "x.npz").exists()
  assert convert_i3d.main([f"--input={folder / 'none.pt'}", f"--out={folder / 'x.npz'}"]) == 2


def test_load_refuses_another_format(setup):
  _, _, _, out, folder = setup
  flat, config, _ = weights.read(out, i3d.FORMAT)
  other = str(folder / "other.npz")
  weights.save(flat, other, "nuwa_jax.inception.v1", config)
  with pytest.raises(weights.WeightsError, match="format"):
    i3d.I3DFeatures.load(other)
  del flat["Mixed_4b/b0/bn/mean"]
  weights.save(flat, other, i3d.FORMAT, config)
  with pytest.raises(weights.WeightsError, match="Mixed_4b/b0/bn/mean"):
    i3d.I3DFeatures.load(other)
