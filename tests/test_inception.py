"""The Flax FID Inception-v3 and its converter against a pure-torch pytorch-fid look-alike.

The reference below has pytorch-fid's FIDInceptionV3 structure and state-dict key names, with
random weights and random batch-norm statistics; its state dict goes through the converter
command and the converted network must reproduce its pool3 features and logits.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from nuwa_jax.models import inception, weights
from nuwa_jax.tools import convert_common, convert_inception

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-4  # max abs difference, on features of unit scale (printed in the failure message)


class TorchConv(torch.nn.Module):

  def __init__(self, cin, cout, k=1, s=1, p=0):
    super().__init__()
    self.conv = torch.nn.Conv2d(cin, cout, k, s, p, bias=False)
    self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class TorchBlock(torch.nn.Module):
  """Named BasicConv2d layers; `run(x, *names)` applies some in sequence."""

  def __init__(self, **convs):
    super().__init__()
    for name, spec in convs.items():
      self.add_module(name, TorchConv(*spec))

  def run(self, x, *names):
    for name in names:
      x = getattr(self, name)(x)
    return x


def _avg(x):
  return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class BlockA(TorchBlock):

  def __init__(self, cin, pool):
    super().__init__(branch1x1=(cin, 64), branch5x5_1=(cin, 48), branch5x5_2=(48, 64, 5, 1, 2),
                     branch3x3dbl_1=(cin, 64), branch3x3dbl_2=(64, 96, 3, 1, 1),
                     branch3x3dbl_3=(96, 96, 3, 1, 1), branch_pool=(cin, pool))

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.run(x, "branch5x5_1", "branch5x5_2"),
                      self.run(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                      self.branch_pool(_avg(x))], 1)


class BlockB(TorchBlock):

  def __init__(self, cin):
    super().__init__(branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64),
                     branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 2))

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.run(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                      F.max_pool2d(x, 3, 2)], 1)


class BlockC(TorchBlock):

  def __init__(self, cin, c7):
    r, c = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    super().__init__(branch1x1=(cin, 192), branch7x7_1=(cin, c7), branch7x7_2=(c7, c7, *r),
                     branch7x7_3=(c7, 192, *c), branch7x7dbl_1=(cin, c7),
                     branch7x7dbl_2=(c7, c7, *c), branch7x7dbl_3=(c7, c7, *r),
                     branch7x7dbl_4=(c7, c7, *c), branch7x7dbl_5=(c7, 192, *r),
                     branch_pool=(cin, 192))

  def forward(self, x):
    dbl = [f"branch7x7dbl_{i}" for i in range(1, 6)]
    return torch.cat([self.branch1x1(x),
                      self.run(x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
                      self.run(x, *dbl), self.branch_pool(_avg(x))], 1)


class BlockD(TorchBlock):

  def __init__(self, cin):
    super().__init__(branch3x3_1=(cin, 192), branch3x3_2=(192, 320, 3, 2),
                     branch7x7x3_1=(cin, 192), branch7x7x3_2=(192, 192, (1, 7), 1, (0, 3)),
                     branch7x7x3_3=(192, 192, (7, 1), 1, (3, 0)),
                     branch7x7x3_4=(192, 192, 3, 2))

  def forward(self, x):
    return torch.cat([self.run(x, "branch3x3_1", "branch3x3_2"),
                      self.run(x, *[f"branch7x7x3_{i}" for i in range(1, 5)]),
                      F.max_pool2d(x, 3, 2)], 1)


class BlockE(TorchBlock):

  def __init__(self, cin, max_pool):
    r, c = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
    super().__init__(branch1x1=(cin, 320), branch3x3_1=(cin, 384), branch3x3_2a=(384, 384, *r),
                     branch3x3_2b=(384, 384, *c), branch3x3dbl_1=(cin, 448),
                     branch3x3dbl_2=(448, 384, 3, 1, 1), branch3x3dbl_3a=(384, 384, *r),
                     branch3x3dbl_3b=(384, 384, *c), branch_pool=(cin, 192))
    self.max_pool = max_pool

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.run(x, "branch3x3dbl_1", "branch3x3dbl_2")
    pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg(x)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                      self.branch_pool(pooled)], 1)


class TorchFIDInception(torch.nn.Module):
  """pytorch-fid's FIDInceptionV3 (no aux head, 1008 classes): (pool3, logits) of NCHW input."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = TorchConv(3, 32, 3, 2)
    self.Conv2d_2a_3x3 = TorchConv(32, 32, 3)
    self.Conv2d_2b_3x3 = TorchConv(32, 64, 3, 1, 1)
    self.Conv2d_3b_1x1 = TorchConv(64, 80)
    self.Conv2d_4a_3x3 = TorchConv(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
    self.Mixed_6a = BlockB(288)
    self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
    self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
    self.Mixed_7a = BlockD(768)
    self.Mixed_7b, self.Mixed_7c = BlockE(1280, False), BlockE(2048, True)
    self.fc = torch.nn.Linear(2048, 1008)

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
    x = F.max_pool2d(x, 3, 2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, "Mixed_" + name)(x)
    pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return pool3, self.fc(pool3)


def _reference():
  torch.manual_seed(0)
  model = TorchFIDInception().eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):  # He normal: activations stay at unit scale
        m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.7, 1.3)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model, its .pth state dict, the converted .npz, what the command printed)."""
  folder = tmp_path_factory.mktemp("inception")
  model = _reference()
  pth, npz = str(folder / "pt_inception.pth"), str(folder / "inception_fid.npz")
  torch.save(model.state_dict(), pth)
  return model, pth, npz


def test_converted_network_matches_torch(reference, capsys):
  model, pth, npz = reference
  assert convert_inception.main([f"--input={pth}", f"--out={npz}"]) == 0
  printed = capsys.readouterr().out
  net = inception.FIDInception.load(npz, batch_size=2)
  assert net.sha256 in printed and net.path == npz
  with open(npz + ".sha256", encoding="utf-8") as f:
    assert f.read().split()[0] == net.sha256
  # Trainable parameters: torchvision's 27,161,264 for Inception-v3, less its aux head's
  # 3,326,696, plus the fc's 8 extra classes (2049 each); the BN statistics are not counted.
  flat = weights.flatten(net.params)
  assert sum(v.size for k, v in flat.items()
             if not k.endswith(("/bn/mean", "/bn/var"))) == 27161264 - 3326696 + 8 * 2049

  images = np.random.default_rng(0).integers(0, 256, (3, 75, 75, 3), dtype=np.uint8)
  got = net(images, resize=False)  # 3 images in batches of 2: the last one is padded
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  with torch.no_grad():
    want = dict(zip(("pool3", "logits"), (t.numpy() for t in model(2 * x - 1))))
  for key, shape in (("pool3", (3, 2048)), ("logits", (3, 1008))):
    assert got[key].shape == shape and got[key].dtype == np.float32
    err, scale = np.abs(got[key] - want[key]).max(), np.abs(want[key]).max()
    assert 0.1 < scale < 100, (key, scale)  # non-degenerate random features
    assert err < TOL, f"{key}: max abs difference {err:.3g} (feature scale {scale:.3g})"
  # An image's features do not depend on its batch (one compiled shape, zero padding).
  single = net(images[2:], resize=False)
  np.testing.assert_array_equal(single["pool3"], got["pool3"][2:])
  assert net(images[:0], resize=False)["pool3"].shape == (0, 2048)


def test_preprocess_matches_pytorch_fid():
  images = np.random.default_rng(1).integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  want = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
  want = want.permute(0, 2, 3, 1).numpy()
  got = np.asarray(inception.preprocess(images))
  assert got.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # Shrinking takes the same path (two taps, no antialias), as in torch.
  big = np.random.default_rng(2).random((1, 320, 410, 3), dtype=np.float32)
  want = F.interpolate(torch.from_numpy(big).permute(0, 3, 1, 2), size=(299, 299),
                       mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(inception.resize_bilinear(big, 299)), want, atol=1e-6)


def test_converter_refuses_extra_missing_and_misshapen_keys(reference, tmp_path, capsys):
  model, _, _ = reference
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  extra = dict(state, **{"AuxLogits.fc.bias": np.zeros(1008, np.float32)})
  missing = {k: v for k, v in state.items() if k != "Mixed_6c.branch7x7dbl_4.bn.running_var"}
  bad = dict(state)
  bad["Mixed_7b.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)
  for broken, key in ((extra, "AuxLogits.fc.bias"),
                      (missing, "Mixed_6c.branch7x7dbl_4.bn.running_var"),
                      (bad, "Mixed_7b.branch3x3_2a.conv.weight")):
    with pytest.raises(convert_common.ConversionError, match=re.escape(key)):
      convert_inception.convert(broken, where="test")
  # The command: exit status 2, one line naming the file and the key, nothing written.
  src, out = str(tmp_path / "bad.npz"), str(tmp_path / "out.npz")
  np.savez(src, **missing)
  assert convert_inception.main([f"--input={src}", f"--out={out}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {src}: ") and "branch7x7dbl_4.bn.running_var" in err
  assert "\n" not in err and not os.path.exists(out)


def test_load_refuses_other_files(tmp_path):
  other = str(tmp_path / "clip.npz")
  weights.save({"w": np.zeros(3, np.float32)}, other, "nuwa_jax.clip.v1", {})
  with pytest.raises(weights.WeightsError, match="format"):
    inception.FIDInception.load(other)
  partial = str(tmp_path / "partial.npz")
  weights.save({"fc/bias": np.zeros(1008, np.float32)}, partial, inception.FORMAT,
               {"num_classes": 1008})
  with pytest.raises(weights.WeightsError, match="Conv2d_1a_3x3/conv/kernel"):
    inception.FIDInception.load(partial)
