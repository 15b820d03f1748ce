"""CLIP: the BPE tokenizer against CLIP's own, the converter against a torch CLIP, file checks."""

from __future__ import annotations

import importlib.util
import math
import os
from collections import OrderedDict

import numpy as np
import pytest

from nuwa_jax.data import clip_tokenizer
from nuwa_jax.models import clip
from nuwa_jax.models import weights
from nuwa_jax.tools import convert_clip
from nuwa_jax.tools.convert_common import ConversionError

# Two heads in each tower, so the head split of in_proj is exercised.
TINY = clip.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
                       vision_patch_size=8, context_length=16, vocab_size=100,
                       transformer_width=128, transformer_heads=2, transformer_layers=2)

TEXTS = [
    "a diagram",
    "A photo of a DOG, running on the beach!!!",
    "It's 2023; isn't it? We'll see, they've said, I'm sure you'd agree.",
    "numbers: 3.14159, 1,000,000 and 42nd",
    "  lots   of\twhite\n\nspace  ",
    "HTML &amp;amp; entities &lt;b&gt;bold&lt;/b&gt;",
    "Café naïve Straße ÀÉÎÕÜ",
    "東京タワーの夜景",
    "emoji 🐶🚀 and symbols ©®™ — “quotes” …",
    "mojibake cafÃ©",
    "punctuation... ?!?! (brackets) [square] {curly} #hash @at",
    "a very long caption " * 30,
    "",
]


def _reference_tokenizer():
  """CLIP's own simple_tokenizer.py, loaded by path (its package __init__ needs torchvision)."""
  try:
    vocab = clip_tokenizer.default_vocab_path()
  except clip_tokenizer.TokenizerError:
    pytest.skip("the clip package's files are not installed")
  path = os.path.join(os.path.dirname(vocab), "simple_tokenizer.py")
  if not os.path.isfile(path):
    pytest.skip("clip/simple_tokenizer.py is not installed")
  pytest.importorskip("ftfy")
  spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer(vocab)


def _ours():
  try:
    return clip_tokenizer.get_tokenizer()
  except clip_tokenizer.TokenizerError:
    pytest.skip("CLIP's vocabulary file is not installed")


def test_tokenizer_matches_clips_own():
  ref, ours = _reference_tokenizer(), _ours()
  rows = ours.tokenize(TEXTS)
  assert rows.dtype == np.int32 and rows.shape == (len(TEXTS), 77)
  for text, row in zip(TEXTS, rows):
    ids = ref.encode(text)
    assert ours.encode(text) == ids, text
    want = ([49406] + ids + [49407])[:77]
    want[-1] = 49407
    assert row.tolist() == want + [0] * (77 - len(want)), text
    assert ours.decode(ids) == ref.decode(ids)
  assert rows[TEXTS.index("a very long caption " * 30), -1] == 49407


def test_tokenizer_known_ids():
  rows = _ours().tokenize(["a diagram", "a dog", "a cat"], context_length=6)
  np.testing.assert_array_equal(rows, [[49406, 320, 22697, 49407, 0, 0],
                                       [49406, 320, 1929, 49407, 0, 0],
                                       [49406, 320, 2368, 49407, 0, 0]])
  # Digits are single tokens ("2", "0", "2", "3"); "'s" is split from "it".
  assert clip_tokenizer.tokenize("It's 2023")[0, :9].tolist() == [
      49406, 585, 568, 273, 271, 273, 274, 49407, 0]
  with pytest.raises(clip_tokenizer.TokenizerError, match="more than the context length"):
    clip_tokenizer.tokenize("word " * 80, truncate=False)


def test_tokenizer_missing_vocabulary(monkeypatch, tmp_path):
  monkeypatch.setattr(clip_tokenizer.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(clip_tokenizer.TokenizerError, match="pip install --no-deps clip-anytorch"):
    clip_tokenizer.default_vocab_path()
  with pytest.raises(clip_tokenizer.TokenizerError, match="clip-anytorch"):
    clip_tokenizer.Tokenizer(str(tmp_path / "absent.txt.gz"))


def _torch_clip(config: clip.CLIPConfig, seed: int):
  """A randomly initialised pure-torch ViT CLIP with OpenAI's parameter names."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class QuickGELU(nn.Module):
    def forward(self, x):
      return x * torch.sigmoid(1.702 * x)

  class Block(nn.Module):
    def __init__(self, width, heads, mask):
      super().__init__()
      self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
      self.attn = nn.MultiheadAttention(width, heads)
      self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                           c_proj=nn.Linear(4 * width, width)))
      self.mask = mask  # a plain attribute: not part of the state dict

    def forward(self, x):  # [L, B, W]
      h = self.ln_1(x)
      x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.mask)[0]
      return x + self.mlp(self.ln_2(x))

  class Stack(nn.Module):
    def __init__(self, width, heads, layers, mask=None):
      super().__init__()
      self.resblocks = nn.Sequential(*[Block(width, heads, mask) for _ in range(layers)])

    def forward(self, x):  # [B, L, W]
      return self.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)

  class Visual(nn.Module):
    def __init__(self, c):
      super().__init__()
      w, p = c.vision_width, c.vision_patch_size
      self.conv1 = nn.Conv2d(3, w, p, stride=p, bias=False)
      self.class_embedding = nn.Parameter(torch.randn(w))
      self.positional_embedding = nn.Parameter(torch.randn(c.grid ** 2 + 1, w))
      self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
      self.transformer = Stack(w, c.vision_heads, c.vision_layers)
      self.proj = nn.Parameter(torch.randn(w, c.embed_dim))

    def forward(self, x):  # [B, 3, R, R]
      x = self.conv1(x).flatten(2).transpose(1, 2)
      cls = self.class_embedding.expand(x.shape[0], 1, -1)
      x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding)
      return self.ln_post(self.transformer(x)[:, 0]) @ self.proj

  class TorchCLIP(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.visual = Visual(c)
      mask = torch.full((c.context_length,) * 2, float("-inf")).triu(1)
      self.transformer = Stack(c.transformer_width, c.transformer_heads,
                               c.transformer_layers, mask)
      self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
      self.positional_embedding = nn.Parameter(torch.randn(c.context_length,
                                                           c.transformer_width))
      self.ln_final = nn.LayerNorm(c.transformer_width)
      self.text_projection = nn.Parameter(torch.randn(c.transformer_width, c.embed_dim))
      self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
      # As in OpenAI's TorchScript files.
      self.register_buffer("input_resolution", torch.tensor(c.image_resolution))
      self.register_buffer("context_length", torch.tensor(c.context_length))
      self.register_buffer("vocab_size", torch.tensor(c.vocab_size))

    def forward(self, pixels, ids):
      x = self.transformer(self.token_embedding(ids) + self.positional_embedding)
      x = self.ln_final(x)[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection
      return self.visual(pixels), x

  torch.manual_seed(seed)
  model = TorchCLIP(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:  # unit-variance activations; biases and norms off their defaults
        p.normal_(0.0, (p.numel() / p.shape[0]) ** -0.5)
      elif p.ndim == 1:
        p.normal_(1.0 if ".ln_" in f".{name}" and name.endswith("weight") else 0.0, 0.1)
  return model


def _inputs(config, n=5, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, config.image_resolution, config.image_resolution, 3),
                        dtype=np.uint8)
  ids = np.zeros((n, config.context_length), np.int32)
  for i, length in enumerate(rng.integers(2, config.context_length + 1, n)):
    ids[i, 0] = config.vocab_size - 2  # start, then the end id (the vocabulary's last)
    ids[i, 1:length - 1] = rng.integers(1, config.vocab_size - 2, length - 2)
    ids[i, length - 1] = config.vocab_size - 1
  return images, ids


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# Tracing torch's attention warns about its shape checks; torch.jit is deprecated but is what
# OpenAI's files are.
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean",
                            "ignore:`torch.jit.:DeprecationWarning")
def test_converter_matches_torch_clip(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  model = _torch_clip(TINY, seed=0)
  images, ids = _inputs(TINY)
  pixels = np.stack([clip.preprocess(im, TINY.image_resolution) for im in images])
  with torch.no_grad():
    want_img, want_txt = (_unit(t.numpy()) for t in model(
        torch.from_numpy(pixels.transpose(0, 3, 1, 2)).contiguous(),
        torch.from_numpy(ids).long()))

  pt, out = str(tmp_path / "tiny.pt"), str(tmp_path / "tiny.npz")
  torch.save(model.state_dict(), pt)
  assert convert_clip.main([f"--input={pt}", f"--out={out}"]) == 0
  scorer = clip.CLIPScorer.load(out, batch_size=2)  # 5 rows: three calls, the last padded
  assert scorer.config == TINY and scorer.path == out
  printed = capsys.readouterr().out
  assert f"sha256 {scorer.sha256}" in printed
  with open(out + ".sha256", encoding="utf-8") as f:
    assert f.read().split()[0] == scorer.sha256

  img, txt = scorer.image_features(images), scorer.token_features(ids)
  np.testing.assert_allclose(img, want_img, atol=1e-4, rtol=0)
  np.testing.assert_allclose(txt, want_txt, atol=1e-4, rtol=0)
  # A row's features do not depend on how many rows come with it.
  np.testing.assert_allclose(scorer.image_features(images[2:3]), img[2:3], atol=1e-6, rtol=0)
  # ... nor on zero columns after the end token (the row cut there is padded back).
  end = int(ids[3].argmax()) + 1
  np.testing.assert_allclose(scorer.token_features(ids[3:4, :end]), txt[3:4], atol=1e-6, rtol=0)
  # Images of other sizes are resized and cropped to the input resolution.
  assert scorer.image_features([images[0][:, :20], np.zeros((50, 40, 3), np.uint8)]).shape == (
      2, TINY.embed_dim)

  # The same weights as a TorchScript archive (OpenAI's file type) convert identically.
  traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.ones(1, 16).long()),
                           check_trace=False)
  jit_pt, jit_out = str(tmp_path / "tiny_jit.pt"), str(tmp_path / "tiny_jit.npz")
  torch.jit.save(traced, jit_pt)
  assert convert_clip.main([f"--input={jit_pt}", f"--out={jit_out}"]) == 0
  a, _, _ = weights.read(out, clip.FORMAT)
  b, config, _ = weights.read(jit_out, clip.FORMAT)
  assert config == TINY.to_dict() and sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _state(seed=0):
  return {k: v.numpy() for k, v in _torch_clip(TINY, seed).state_dict().items()}


def test_converter_refuses_bad_keys(tmp_path, capsys):
  pytest.importorskip("torch")
  state = _state()
  flat, config = convert_clip.convert(state)
  assert config == TINY.to_dict()

  extra = dict(state, **{"visual.unexpected": np.zeros(3, np.float32)})
  with pytest.raises(ConversionError, match="unused keys.*visual.unexpected"):
    convert_clip.convert(extra)
  gone = "transformer.resblocks.1.mlp.c_proj.bias"
  with pytest.raises(ConversionError, match=f"missing key '{gone}'"):
    convert_clip.convert({k: v for k, v in state.items() if k != gone})
  bent = "visual.transformer.resblocks.0.attn.out_proj.weight"
  with pytest.raises(ConversionError, match=rf"{bent} has shape \(128, 129\)"):
    convert_clip.convert(dict(state, **{bent: np.zeros((128, 129), np.float32)}))
  resnet = {k: v for k, v in state.items() if not k.startswith("visual.")}
  resnet["visual.layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(ConversionError, match="ResNet CLIP"):
    convert_clip.convert(resnet)

  bad = str(tmp_path / "bad.npz")
  np.savez(bad, **extra)
  assert convert_clip.main([f"--input={bad}", f"--out={tmp_path / 'x.npz'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {bad}: ") and "visual.unexpected" in err
  assert err.count("\n") == 1 and not os.path.exists(tmp_path / "x.npz")


def test_load_refuses_other_files(tmp_path):
  other = str(tmp_path / "lpips.npz")
  weights.save({"lin/0/kernel": np.ones(3, np.float32)}, other, "nuwa_jax.lpips.v1", {})
  with pytest.raises(weights.WeightsError, match="expected 'nuwa_jax.clip.v1'"):
    clip.CLIPScorer.load(other)
  small = clip.CLIPConfig(embed_dim=8, image_resolution=16, vision_layers=1, vision_width=64,
                          vision_patch_size=8, context_length=8, vocab_size=20,
                          transformer_width=64, transformer_heads=1, transformer_layers=1)
  flat = weights.flatten(clip.CLIPScorer.random(0, small).params)
  del flat["text/resblocks_0/c_fc/bias"]
  short = str(tmp_path / "short.npz")
  weights.save(flat, short, clip.FORMAT, small.to_dict())
  with pytest.raises(weights.WeightsError, match="missing.*text/resblocks_0/c_fc/bias"):
    clip.CLIPScorer.load(short)


def test_random_scorer_with_real_tokenizer(tmp_path):
  _ours()
  config = clip.CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64,
                           vision_patch_size=16, context_length=77, vocab_size=49408,
                           transformer_width=64, transformer_heads=1, transformer_layers=1)
  scorer = clip.CLIPScorer.random(3, config, batch_size=4)
  path = str(tmp_path / "random.npz")
  digest = scorer.save(path)
  loaded = clip.CLIPScorer.load(path, batch_size=3)
  assert loaded.sha256 == digest and loaded.config == config
  images, _ = _inputs(config, n=3)
  texts = ["a red square", "two dogs", "It's a long, long caption " * 10]
  sim = loaded.clip_sim(images, texts)
  want = np.sum(scorer.image_features(images) * scorer.text_features(texts), -1)
  assert sim.shape == (3,) and np.all(np.abs(sim) <= 1 + 1e-6)
  np.testing.assert_allclose(sim, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(loaded.text_features(texts[:1]), axis=-1), 1.0,
                             atol=1e-5)
