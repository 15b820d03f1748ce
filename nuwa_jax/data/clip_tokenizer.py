"""CLIP's byte-level BPE tokenizer (49408 ids), the text side of the CLIP-SIM metric.

Text is cleaned (ftfy.fix_text when ftfy is installed, HTML entities unescaped, runs of white
space collapsed, lower-cased), split into words, contractions, single digits and punctuation
runs, and every piece's UTF-8 bytes are merged by the ranked pairs of OpenAI's vocabulary file
`bpe_simple_vocab_16e6.txt.gz`. The file is not shipped here: it is read from the installed
`clip` package (found without importing it; `pip install --no-deps clip-anytorch`) or a path.
`tokenize` gives [N, 77] int32 rows: start 49406, the ids, end 49407, zeros.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from typing import Sequence

import numpy as np

try:
  import regex
except ImportError:  # needed only when text is tokenized; the error then says how to get it
  regex = None
try:
  import ftfy
except ImportError:  # optional, as in CLIP: only mojibake repair is lost without it
  ftfy = None

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
START_TEXT, END_TEXT = "<|startoftext|>", "<|endoftext|>"
SOT, EOT = 49406, 49407
CONTEXT_LENGTH = 77
# CLIP uses the first 48894 merges of the file: 256 byte symbols, their 256 word-final forms,
# the merges and the two markers make the 49408 ids of its token embedding.
NUM_MERGES = 49152 - 256 - 2
WORD_END = "</w>"
# Distinct words seen by one process are few (captions of a data set); the cap keeps a long
# evaluation over free text from growing the cache without bound.
_CACHE_LIMIT = 1 << 18

_PIECES = (r"<\|startoftext\|>|<\|endoftext\|>|'(?:s|t|re|ve|m|ll|d)"
           r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")


class TokenizerError(RuntimeError):
  """The vocabulary file or the `regex` package is missing, or a text is too long."""


def default_vocab_path() -> str:
  """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed `clip` package.

  Returns:
    The file's path.

  Raises:
    TokenizerError: the package or its vocabulary file is absent.
  """
  # find_spec locates the package without running its __init__ (which needs torchvision).
  try:
    spec = importlib.util.find_spec("clip")
  except (ImportError, ValueError):
    spec = None
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, VOCAB_FILE)
    if os.path.isfile(path):
      return path
  raise TokenizerError(
      f"CLIP's vocabulary {VOCAB_FILE} was not found: install the package that ships it with "
      "`pip install --no-deps clip-anytorch` (its code is not used), or pass its path")


def byte_symbols() -> list[tuple[int, str]]:
  """(byte, printable character) pairs in the order of the vocabulary's first 256 ids.

  Returns:
    Bytes that are printable Latin-1 characters stand for themselves and come first; the
    others (controls, space, NBSP, soft hyphen) follow in byte order as characters 256, 257...
  """
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(
      range(ord("®"), ord("ÿ") + 1))
  kept = sorted(printable)
  moved = [b for b in range(256) if b not in printable]
  return [(b, chr(b)) for b in kept] + [(b, chr(256 + n)) for n, b in enumerate(moved)]


def clean(text: str) -> str:
  """The text CLIP splits: repaired, unescaped, single-spaced, stripped and lower-cased.

  Args:
    text: any string.

  Returns:
    The cleaned string.
  """
  if ftfy is not None:
    text = ftfy.fix_text(text)
  # Twice, as CLIP does: captions scraped from the web are often escaped twice ("&amp;amp;").
  text = html.unescape(html.unescape(text)).strip()
  return _regex().sub(r"\s+", " ", text).strip().lower()


def _regex():
  if regex is None:
    raise TokenizerError("CLIP's tokenizer needs the `regex` package (pip install regex) for "
                         "its Unicode letter and number classes")
  return regex


class Tokenizer:
  """CLIP's BPE vocabulary: `encode` (text -> ids), `decode`, and `tokenize` (padded rows)."""

  def __init__(self, vocab_path: str | None = None):
    """Reads the merges.

    Args:
      vocab_path: `bpe_simple_vocab_16e6.txt.gz`; by default the installed `clip` package's.

    Raises:
      TokenizerError: the file is absent or not a CLIP vocabulary.
    """
    self.vocab_path = vocab_path or default_vocab_path()
    if not os.path.isfile(self.vocab_path):
      raise TokenizerError(f"{self.vocab_path}: no such vocabulary file (it ships with "
                           "`pip install --no-deps clip-anytorch`)")
    try:
      with gzip.open(self.vocab_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise TokenizerError(f"{self.vocab_path}: not a gzip'd BPE vocabulary ({e})") from None
    # The first line is a "#version" header.
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise TokenizerError(f"{self.vocab_path}: expected {NUM_MERGES} merge pairs after the "
                           "header line; is this CLIP's bpe_simple_vocab_16e6.txt.gz?")
    symbols = byte_symbols()
    self.byte_to_char = dict(symbols)
    self.char_to_byte = {c: b for b, c in symbols}
    pieces = [c for _, c in symbols]
    pieces += [c + WORD_END for c in pieces]
    pieces += ["".join(m) for m in merges]
    pieces += [START_TEXT, END_TEXT]
    self.ids = {p: i for i, p in enumerate(pieces)}
    self.pieces = pieces
    self.ranks = {m: r for r, m in enumerate(merges)}
    self.sot, self.eot = self.ids[START_TEXT], self.ids[END_TEXT]
    self._pattern = _regex().compile(_PIECES, regex.IGNORECASE)
    self._cache: dict[str, tuple[str, ...]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  def bpe(self, word: str) -> tuple[str, ...]:
    """Vocabulary pieces of one word (byte characters): the best-ranked pair merged first.

    Args:
      word: a piece of the split text, its bytes as `byte_symbols` characters.

    Returns:
      The merged pieces; the last one carries the end-of-word mark.
    """
    if word in (START_TEXT, END_TEXT):
      return (word,)
    hit = self._cache.get(word)
    if hit is not None:
      return hit
    parts = list(word[:-1]) + [word[-1] + WORD_END]
    while len(parts) > 1:
      best, best_rank = None, None
      for pair in zip(parts, parts[1:]):
        rank = self.ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best, best_rank = pair, rank
      if best is None:
        break
      # Every occurrence of the pair, scanning left to right without overlaps.
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    result = tuple(parts)
    if len(self._cache) >= _CACHE_LIMIT:
      self._cache.clear()
    self._cache[word] = result
    return result

  def encode(self, text: str) -> list[int]:
    """Token ids of a text, without the start / end markers.

    Args:
      text: any string.

    Returns:
      The ids.
    """
    out = []
    for piece in self._pattern.findall(clean(text)):
      chars = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
      out.extend(self.ids[p] for p in self.bpe(chars))
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ids (markers and padding ids included as they are; "</w>" becomes a space).

    Args:
      ids: token ids.

    Returns:
      The decoded string (invalid UTF-8 replaced).
    """
    chars = "".join(self.pieces[int(i)] for i in ids)
    words = []
    for chunk in chars.split(WORD_END):
      data = bytes(self.char_to_byte[c] for c in chunk)
      words.append(data.decode("utf-8", errors="replace"))
    return " ".join(words)

  def tokenize(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
               truncate: bool = True) -> np.ndarray:
    """Rows of start id, text ids, end id and zeros.

    Args:
      texts: one string or a list of them.
      context_length: row length (77 for every released CLIP).
      truncate: cut long texts to the row, ending it with the end id; False raises instead.

    Returns:
      int32 [len(texts), context_length].

    Raises:
      TokenizerError: a text longer than the row when `truncate` is False.
    """
    if isinstance(texts, str):
      texts = [texts]
    rows = np.zeros((len(texts), context_length), np.int32)
    for n, text in enumerate(texts):
      ids = [self.sot] + self.encode(text) + [self.eot]
      if len(ids) > context_length:
        if not truncate:
          raise TokenizerError(f"text {n} has {len(ids)} tokens, more than the context length "
                               f"{context_length}: {text[:60]!r}...")
        ids = ids[:context_length - 1] + [self.eot]
      rows[n, :len(ids)] = ids
    return rows


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str | None = None) -> Tokenizer:
  """The tokenizer of a vocabulary file, read once per process.

  Args:
    vocab_path: the file; by default the installed `clip` package's.

  Returns:
    A shared `Tokenizer`.
  """
  return Tokenizer(vocab_path)


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             truncate: bool = True, vocab_path: str | None = None) -> np.ndarray:
  """CLIP token rows of texts (see `Tokenizer.tokenize`).

  Args:
    texts: one string or a list of them.
    context_length: row length.
    truncate: cut long texts (ending with the end id) instead of raising.
    vocab_path: the vocabulary file; by default the installed `clip` package's.

  Returns:
    int32 [len(texts), context_length].
  """
  return get_tokenizer(vocab_path).tokenize(texts, context_length, truncate)
