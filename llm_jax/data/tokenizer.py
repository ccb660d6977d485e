"""SentencePiece tokenizer: training on a text sample, loading, and the binding to a model.

Reserved ids, the same for every tokenizer this module trains:

  pad = 0   '<pad>'  never produced by `encode`; padding rows of a batch (segment id 0) use it
  eos = 1   '</s>'   ends every document in the token stream (`doc EOS doc EOS ...`)
  bos = 2   '<s>'    reserved; the data pipeline does not insert it
  unk = 3   '<unk>'  never produced in practice: byte fallback spells unseen characters as UTF-8 bytes

followed by the 256 byte pieces '<0x00>'..'<0xFF>' and then the learned pieces. Trained tokenizers are lossless
on cleaned text: no normalisation, no dummy prefix, whitespace kept (runs of spaces become pieces, so Python
indentation is cheap), so `decode(encode(s)) == s`.

A tokenizer loaded from a file carries its `fingerprint`, the sha256 of the model file; checkpoints and workdirs
record it so that a model is never used with a tokenizer it was not trained with. This module needs no TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm
from llm_jax.errors import UserError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ('bpe', 'unigram')


class TokenizerError(UserError, ValueError):
  """A tokenizer file is missing, unreadable, or does not match the model or workdir it is used with."""


def file_fingerprint(path: str) -> str:
  """sha256 of a file's bytes, as hex."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


class Tokenizer:
  """A loaded SentencePiece model. Use `load(path)` to make one."""

  def __init__(self, model_proto: bytes, path: str = ''):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.path = path
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()
    self.vocab_size = self._sp.vocab_size()
    self.pad_id, self.eos_id, self.bos_id, self.unk_id = (
        self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id())

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """`encode` of each text, on `num_threads` C++ threads (0 = all cores)."""
    return self._sp.encode(list(texts), out_type=int, num_threads=num_threads or -1)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad, eos and bos ids are dropped."""
    return self._sp.decode([int(i) for i in ids])

  def __repr__(self):
    return f'Tokenizer({self.path or "<in memory>"}, vocab_size={self.vocab_size}, sha256={self.fingerprint[:12]})'


def load(path: str) -> Tokenizer:
  """Loads a SentencePiece model file; the error names the file when it is missing or not a model."""
  try:
    with open(path, 'rb') as f:
      proto = f.read()
  except OSError as e:
    raise TokenizerError(f'tokenizer {path}: cannot read it ({e.strerror})') from None
  try:
    return Tokenizer(proto, path)
  except RuntimeError as e:
    raise TokenizerError(f'tokenizer {path}: not a SentencePiece model ({e})') from None


def train(sentences: Iterable[str], vocab_size: int, model_type: str = 'bpe', num_threads: int = 1,
          max_sentences: int = 2_000_000) -> bytes:
  """Trains a tokenizer with the reserved ids above on `sentences` (e.g. the lines of a sample of the corpus).

  Returns the serialized model. `vocab_size` is an upper bound: when the sample has fewer distinct pieces, the
  model is smaller (hard_vocab_limit=False), which `check_vocab` accepts.
  """
  if model_type not in MODEL_TYPES:
    raise TokenizerError(f'config.data.tokenizer_type: unknown value {model_type!r}; expected one of '
                         f'{", ".join(MODEL_TYPES)}')
  model = io.BytesIO()
  spm.set_random_generator_seed(0)  # sentence sampling and unigram EM are then reproducible
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID, byte_fallback=True,
        # Lossless on code: keep every space and newline, do not rewrite characters.
        normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
        hard_vocab_limit=False, max_sentence_length=1 << 14, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, num_threads=max(1, num_threads), minloglevel=2)
  except RuntimeError as e:
    if 'Vocabulary size is smaller than required_chars' not in str(e):
      raise
    needed = str(e).split(' vs ')[-1].split('.')[0]
    raise TokenizerError(f'config.model.vocab_size: {vocab_size} is too small for this corpus: its characters '
                         f'and the {4 + 256} reserved and byte pieces need at least {needed}') from None
  return model.getvalue()


def check_vocab(config, tokenizer: Tokenizer) -> None:
  """config.model.vocab_size must be at least the tokenizer's size.

  Larger is allowed (the extra embedding rows are never used as inputs or targets) so that the vocabulary can be
  padded to a multiple of 128 for the matmul units, and so that a tokenizer trained with
  hard_vocab_limit=False on a small corpus (fewer pieces than asked for) still fits the configured model.
  """
  if config.model.vocab_size < tokenizer.vocab_size:
    raise TokenizerError(f'config.model.vocab_size: {config.model.vocab_size} is smaller than the '
                         f'{tokenizer.vocab_size} pieces of tokenizer {tokenizer.path or "<in memory>"}')


# --- the tokenizer of a workdir ------------------------------------------------------------------------------------

WORKDIR_MODEL = 'tokenizer.model'  # <workdir>/tokenizer.model: the tokenizer the workdir's model is trained with
WORKDIR_FINGERPRINT = 'tokenizer.fingerprint'  # <workdir>/tokenizer.fingerprint: its sha256, one line


def check_fingerprint(tokenizer: Tokenizer, expected: str, expected_from: str) -> None:
  """Raises TokenizerError naming both sides when `tokenizer` is not the one `expected_from` (a checkpoint, a
  workdir file) was made with."""
  if tokenizer.fingerprint != expected:
    raise TokenizerError(f'tokenizer mismatch: {tokenizer.path or "<in memory>"} has sha256 '
                         f'{tokenizer.fingerprint} but {expected_from} records {expected}; a model must be '
                         f'used with the tokenizer it was trained with (use a new workdir for a new tokenizer)')


def check_workdir(workdir: str, tokenizer: Tokenizer) -> None:
  """Raises TokenizerError naming both files when `workdir` already holds a different tokenizer."""
  fingerprint_path = os.path.join(workdir, WORKDIR_FINGERPRINT)
  model_path = os.path.join(workdir, WORKDIR_MODEL)
  if os.path.exists(fingerprint_path):
    with open(fingerprint_path) as f:
      check_fingerprint(tokenizer, f.read().strip(), fingerprint_path)
  elif os.path.exists(model_path):
    check_fingerprint(tokenizer, file_fingerprint(model_path), model_path)


def bind_to_workdir(tokenizer_path: str, workdir: str) -> Tokenizer:
  """Copies the tokenizer into `workdir` with its fingerprint, or checks that the one already there is the same.

  A workdir holds one model, so a different tokenizer there is an error naming both files and fingerprints.
  Both files are written atomically (temp file + rename).
  """
  tokenizer = load(tokenizer_path)
  check_workdir(workdir, tokenizer)
  model_path = os.path.join(workdir, WORKDIR_MODEL)
  fingerprint_path = os.path.join(workdir, WORKDIR_FINGERPRINT)
  os.makedirs(workdir, exist_ok=True)
  if not os.path.exists(model_path):
    with open(tokenizer_path, 'rb') as f:
      _write_atomically(model_path, f.read())
  if not os.path.exists(fingerprint_path):
    _write_atomically(fingerprint_path, (tokenizer.fingerprint + '\n').encode())
  return tokenizer


def load_from_workdir(workdir: str) -> Tokenizer:
  """The workdir's tokenizer, checked against its recorded fingerprint."""
  tokenizer = load(os.path.join(workdir, WORKDIR_MODEL))
  fingerprint_path = os.path.join(workdir, WORKDIR_FINGERPRINT)
  if os.path.exists(fingerprint_path):
    with open(fingerprint_path) as f:
      check_fingerprint(tokenizer, f.read().strip(), fingerprint_path)
  return tokenizer


def _write_atomically(path: str, data: bytes) -> None:
  temporary = f'{path}.tmp-{os.getpid()}'
  try:
    with open(temporary, 'wb') as f:
      f.write(data)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
