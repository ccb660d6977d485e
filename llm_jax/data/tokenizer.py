"""Tokenizers: two backends behind one interface, training on a text sample, loading, and the binding to a model.

  SentencePiece   a `.model` file (`Tokenizer`): what preparation trains by default (tokenizer_type bpe|unigram)
  Hugging Face    a `tokenizer.json` of the `tokenizers` library (`HFTokenizer`), with the `tokenizer_config.json`
                  (special tokens, chat template) and `chat_template.jinja` beside it when present: Llama 3,
                  Qwen2, Mistral releases; preparation trains a byte-level BPE one with tokenizer_type=byte_bpe

`load(path)` takes either file, or a directory holding one (tokenizer.model first, then tokenizer.json). Both
give `encode` (no BOS/EOS added, special tokens written in the text are recognised by the HF backend, as
transformers' fast tokenizers do with add_special_tokens=False), `encode_batch`, `decode` (special tokens
dropped), `vocab_size`, pad/eos/bos/unk ids (-1 when the tokenizer has none), `fingerprint`, `files` and
`chat_template` (the Jinja template, or None: SentencePiece never has one).

Text as model input. `encode` gives the pieces of a text only; what the model is given adds what the tokenizer
adds around a text (transformers' `tokenizer(text)`, add_special_tokens=True, the default there):

  encode_input(text)   input_prefix + encode(text) + input_suffix: a whole input (a document, a scored text)
  encode_prompt(text)  input_prefix + encode(text): a prompt the model continues (no EOS after it)
  input_prefix         ids before every input: [bos_id] where the tokenizer adds BOS, else empty
  input_suffix         ids after a whole input: [eos_id] where it adds EOS (rare: no Llama, Mistral or Qwen)
  add_bos, add_eos     whether they are non-empty

Every path that turns text into model input uses these (pre-training documents, generation prompts, the
harness, the built-in SFT template, plain-text preference prompts), so this module is the one place that decides.
A Hugging Face tokenizer.json adds what its post-processor adds for one sequence (a TemplateProcessing with
`<|begin_of_text|>` in Llama 3.x, `<s>` in Llama 2 and Mistral; transformers 5 follows the post-processor too,
and tokenizer_config.json's add_bos_token agrees with it in those releases). A SentencePiece model file and the
tokenizers preparation trains add nothing (documents are separated by EOS only). `load(path, add_bos=...)`
(config.data.add_bos, ADD_BOS_SETTINGS) keeps that ('tokenizer') or overrides the BOS: 'always' or 'never'.

Reserved ids, the same for every tokenizer this module trains:

  pad = 0   '<pad>'  never produced by `encode`; padding rows of a batch (segment id 0) use it
  eos = 1   '</s>'   ends every document in the token stream (`doc EOS doc EOS ...`)
  bos = 2   '<s>'    reserved; the data pipeline inserts it only with config.data.add_bos=always
  unk = 3   '<unk>'  never produced in practice: byte fallback spells unseen characters as UTF-8 bytes

followed by the 256 byte pieces '<0x00>'..'<0xFF>' and then the learned pieces. Trained tokenizers are lossless
on cleaned text: no normalisation, no dummy prefix, whitespace kept (runs of spaces become pieces, so Python
indentation is cheap), so `decode(encode(s)) == s`. Preparation trains them on runs of whole lines with their
newlines (preparation._tokenizer_sample), so a newline has a piece and merges with what ends a line (`:\n`, `)\n`,
`\n\n`); trained on single lines, as before 2026-12-04, the trainer never saw one and every newline was the byte
<0x0A>. Pieces stay cut at spaces (SentencePiece's split_by_whitespace): a newline cannot merge with the
indentation after it (SentencePiece lets no piece but an all-space one end in a space), and the indentation is
a piece of its own. On the README's corpus (the stdlib, vocabulary 2,048, the tiny preset's 600 steps): 0.340
tokens per byte and 1.58 bits per byte, against 0.357 and 1.61 with the single-line sample; pieces spanning
spaces (split_by_whitespace=False) gave 0.318 tokens per byte but 1.66 bits per byte, byte_bpe 0.325 and 1.63.

Character coverage (SentencePiece, config.data.tokenizer_character_coverage). Every character among the most
frequent ones that together make up `coverage` of the sample's characters gets a piece of its own; the rest are
spelled as UTF-8 bytes (byte fallback), so nothing is lost, only longer. A large alphabet (Chinese, Japanese,
Korean) can need more such pieces than the vocabulary has. 'auto' keeps 0.9995 (SentencePiece's advice for those
languages) when its characters fit, and otherwise the largest coverage whose characters fit: the most frequent
vocab_size - 260 characters get pieces (then there is no room left for multi-character pieces; a lower number
leaves some). A space always has a piece (SentencePiece writes it as U+2581, and as bytes it would decode as
that character, not as a space). SentencePiece itself accepts coverages of 0.98 to 1 only; for a lower one the characters beyond
the coverage are taken out of the sample here (each line is cut at them, so no piece spans one) and SentencePiece
is run with coverage 1, which is what it does itself with the characters outside its coverage.

A tokenizer loaded from a file carries its `fingerprint`: the sha256 of the model file (SentencePiece, or a
tokenizer.json alone), or of all its files (tokenizer.json + tokenizer_config.json + chat_template.jinja: the
special tokens and the template change what the model sees). Checkpoints and workdirs record it so that a model is
never used with a tokenizer it was not trained with. This module needs no TensorFlow; `tokenizers` is imported
only when an HF tokenizer is used or trained.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import hashlib
import io
import re
import shutil
import tempfile
import os
from typing import Iterable, Sequence

import sentencepiece as spm
from llm_jax import storage
from llm_jax.errors import UserError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SENTENCEPIECE_TYPES = ('bpe', 'unigram')  # trained with SentencePiece
HF_TYPES = ('byte_bpe',)  # trained with Hugging Face tokenizers: byte-level BPE (GPT-2 / Llama 3 style)
MODEL_TYPES = SENTENCEPIECE_TYPES + HF_TYPES
SENTENCEPIECE_FILE = 'tokenizer.model'
HF_FILE = 'tokenizer.json'
HF_CONFIG_FILE = 'tokenizer_config.json'  # special tokens and the chat template, beside tokenizer.json
HF_TEMPLATE_FILE = 'chat_template.jinja'  # the chat template in its own file (newer transformers)
SPECIAL_TOKENS = ('<pad>', '</s>', '<s>', '<unk>')  # ids 0-3 of every trained tokenizer, both backends
RESERVED_PIECES = len(SPECIAL_TOKENS) + 256  # the reserved and byte pieces before the learned ones
DEFAULT_COVERAGE = 0.9995  # character_coverage 'auto' keeps when the vocabulary allows it
SENTENCEPIECE_MIN_COVERAGE = 0.98  # SentencePiece refuses a lower character_coverage (see the module docstring)
MAX_SENTENCE_BYTES = 1 << 14  # longer sample lines are skipped by SentencePiece's trainer (max_sentence_length)
ADD_BOS_SETTINGS = ('tokenizer', 'always', 'never')  # config.data.add_bos: what `load` does with input_prefix


class TokenizerError(UserError, ValueError):
  """A tokenizer file is missing, unreadable, or does not match the model or workdir it is used with."""


def file_fingerprint(path: str) -> str:
  """sha256 of a file's bytes, as hex."""
  digest = hashlib.sha256()
  with storage.open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


class _ModelInput:
  """What both backends add around a text given to the model (module docstring, "Text as model input")."""
  input_prefix: tuple[int, ...] = ()  # ids before every model input (BOS where the tokenizer adds it)
  input_suffix: tuple[int, ...] = ()  # ids after a whole model input (EOS where the tokenizer adds it)

  @property
  def add_bos(self) -> bool:
    return bool(self.input_prefix)

  @property
  def add_eos(self) -> bool:
    return bool(self.input_suffix)

  def encode_input(self, text: str) -> list[int]:
    """The ids of `text` as a whole model input: input_prefix + encode(text) + input_suffix (what transformers'
    `tokenizer(text)` gives)."""
    return [*self.input_prefix, *self.encode(text), *self.input_suffix]

  def encode_prompt(self, text: str) -> list[int]:
    """The ids of a prompt the model continues: input_prefix + encode(text) (no EOS: the model continues it)."""
    return [*self.input_prefix, *self.encode(text)]

  def apply_add_bos(self, setting: str, field: str = 'config.data.add_bos'):
    """Sets input_prefix by `setting` (ADD_BOS_SETTINGS): 'tokenizer' keeps the tokenizer's own, 'always' is
    [bos_id], 'never' empty. Returns self."""
    if setting not in ADD_BOS_SETTINGS:
      raise TokenizerError(f'{field}: unknown value {setting!r}; expected one of {", ".join(ADD_BOS_SETTINGS)}')
    if setting == 'always':
      if self.bos_id < 0:
        raise TokenizerError(f'{field}: always, but tokenizer {self.path or "<in memory>"} has no BOS token')
      self.input_prefix = (self.bos_id,)
    elif setting == 'never':
      self.input_prefix = ()
    return self


class Tokenizer(_ModelInput):
  """A loaded SentencePiece model (adds no BOS/EOS of its own). Use `load(path)` to make one."""
  kind = 'sentencepiece'
  file_name = SENTENCEPIECE_FILE  # its name in a workdir or prepared directory
  chat_template = None

  def __init__(self, model_proto: bytes, path: str = ''):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.path = path
    self.files = {SENTENCEPIECE_FILE: path} if path else {}  # name in a workdir -> source file
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()
    self.vocab_size = self._sp.vocab_size()
    self.pad_id, self.eos_id, self.bos_id, self.unk_id = (
        self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id())
    self.eos_token = self._sp.id_to_piece(self.eos_id) if self.eos_id >= 0 else None
    self.bos_token = self._sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """`encode` of each text, on `num_threads` C++ threads (0 = all cores)."""
    return self._sp.encode(list(texts), out_type=int, num_threads=num_threads or -1)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad, eos and bos ids are dropped."""
    return self._sp.decode([int(i) for i in ids])

  def token_byte_lengths(self):
    """[vocab_size] int64 numpy array: UTF-8 bytes each id spells (byte pieces 1, control and unknown pieces 0, a
    U+2581 a space). Bits per byte divide by their sum over the scored targets."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    lengths = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        lengths[i] = 1
      elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
        lengths[i] = len(self._sp.id_to_piece(i).replace(SPACE, ' ').encode('utf-8'))
    return lengths

  def byte_fallback_starts(self):
    """[vocab_size] bool numpy array: True for the byte pieces that begin a character (an ASCII byte or a UTF-8
    lead byte, not a continuation byte 0x80-0xBF). Their count in `encode(text)` is the number of characters of
    `text` spelled as bytes."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    starts = np.zeros(self.vocab_size, bool)
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        starts[i] = not 0x80 <= int(self._sp.id_to_piece(i)[3:5], 16) <= 0xBF  # '<0xAB>'
    return starts

  def __repr__(self):
    return f'Tokenizer({self.path or "<in memory>"}, vocab_size={self.vocab_size}, sha256={self.fingerprint[:12]})'


def _read_json(path: str) -> dict:
  import json
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise TokenizerError(f'tokenizer {path}: cannot read it as JSON ({e})') from None
  if not isinstance(value, dict):
    raise TokenizerError(f'tokenizer {path}: expected a JSON object')
  return value


def _token_text(value) -> str | None:
  """A special token of tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


def _template_text(value) -> str | None:
  """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (the 'default' one)."""
  if isinstance(value, list):
    named = {t.get('name'): t.get('template') for t in value if isinstance(t, dict)}
    return named.get('default')
  return value if isinstance(value, str) else None


# Special tokens looked up by name when tokenizer_config.json does not say (trained ones, bare tokenizer.json).
_EOS_NAMES = ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>')
_BOS_NAMES = ('<s>', '<|begin_of_text|>', '<bos>')
_PAD_NAMES = ('<pad>', '<|pad|>', '<|finetune_right_pad_id|>')
_UNK_NAMES = ('<unk>',)


class HFTokenizer(_ModelInput):
  """A Hugging Face `tokenizers` tokenizer (tokenizer.json), with tokenizer_config.json / chat_template.jinja
  beside it when present; it adds around an input what its post-processor adds. Use `load(path)` to make one."""
  kind = 'hf'
  file_name = HF_FILE

  def __init__(self, path: str):
    import tokenizers  # lazily: only HF tokenizers need the library
    directory = os.path.dirname(os.path.abspath(path))
    self.path = path
    self.files = {HF_FILE: path}
    for name in (HF_CONFIG_FILE, HF_TEMPLATE_FILE):
      if os.path.isfile(os.path.join(directory, name)):
        self.files[name] = os.path.join(directory, name)
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception on a malformed file
      raise TokenizerError(f'tokenizer {path}: not a Hugging Face tokenizer.json ({e})') from None
    self.config = _read_json(self.files[HF_CONFIG_FILE]) if HF_CONFIG_FILE in self.files else {}
    digest = hashlib.sha256()
    for name in sorted(self.files):  # tokenizer.json alone: the sha256 of that file, like a SentencePiece model
      with open(self.files[name], 'rb') as f:
        data = f.read()
      if len(self.files) > 1:
        digest.update(f'{name}\0{len(data)}\0'.encode())
      digest.update(data)
    self.fingerprint = digest.hexdigest()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_token = self._special('eos_token', _EOS_NAMES)
    self.bos_token = self._special('bos_token', _BOS_NAMES)
    pad_token = self._special('pad_token', _PAD_NAMES)
    unk_token = self._special('unk_token', _UNK_NAMES)
    self.eos_id, self.bos_id, self.pad_id, self.unk_id = (
        self._id(t) for t in (self.eos_token, self.bos_token, pad_token, unk_token))
    self.chat_template = _template_text(self.config.get('chat_template'))
    if HF_TEMPLATE_FILE in self.files:
      with open(self.files[HF_TEMPLATE_FILE], encoding='utf-8') as f:
        self.chat_template = f.read()
    self.input_prefix, self.input_suffix = self._added_around()

  def _added_around(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids before, ids after) that the post-processor adds to one sequence (add_special_tokens=True)."""
    plain = self._tok.encode('a', add_special_tokens=False).ids
    full = self._tok.encode('a', add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
      if full[start:start + len(plain)] == plain:
        return tuple(full[:start]), tuple(full[start + len(plain):])
    return (), ()  # not expected: a post-processor that changes the text's own ids; add nothing

  def _special(self, key: str, names: Sequence[str]) -> str | None:
    if key in self.config:
      return _token_text(self.config[key])
    return next((name for name in names if self._tok.token_to_id(name) is not None), None)

  def _id(self, token: str | None) -> int:
    token_id = self._tok.token_to_id(token) if token is not None else None
    return -1 if token_id is None else token_id

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without added BOS/EOS (special tokens written in the text are recognised)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode` and each token's (start, end) character span in `text`."""
    encoding = self._tok.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """`encode` of each text (the library parallelises over its own thread pool; num_threads is unused)."""
    del num_threads
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def token_byte_lengths(self):
    """[vocab_size] int64 numpy array: UTF-8 bytes each id spells. Special tokens (BOS, EOS, chat markers) 0; a
    byte-level vocabulary (its decoder is ByteLevel: Llama 3, Qwen2, GPT-2) one byte per character of the token;
    otherwise (SentencePiece-style: Llama 2, Mistral) a byte piece <0xNN> 1, U+2581 a space (a dummy prefix space
    the Metaspace pre-tokenizer adds is counted too)."""
    import json  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    special = {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}
    byte_level = '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get('decoder'))
    lengths = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      token = self._tok.id_to_token(i)
      if token is None or i in special:
        continue
      if byte_level:
        lengths[i] = len(token)  # each character stands for one byte
      elif re.fullmatch(r'<0x[0-9A-Fa-f]{2}>', token):
        lengths[i] = 1
      else:
        lengths[i] = len(token.replace(SPACE, ' ').encode('utf-8'))
    return lengths

  def decode_token(self, token_id: int) -> str | None:
    """The token string of one id (None for -1)."""
    return self._tok.id_to_token(token_id) if token_id >= 0 else None

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens (pad, eos, bos, chat markers) are dropped."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __repr__(self):
    return (f'HFTokenizer({self.path}, vocab_size={self.vocab_size}, sha256={self.fingerprint[:12]}, '
            f'chat_template={"yes" if self.chat_template else "no"}, add_bos={self.add_bos}, add_eos={self.add_eos})')


def tokenizer_file(path: str) -> str | None:
  """The tokenizer file `path` names: itself when a file, else the directory's tokenizer.model or tokenizer.json
  (in that order); None when there is none."""
  if storage.isdir(path):
    for name in (SENTENCEPIECE_FILE, HF_FILE):
      if storage.isfile(storage.join(path, name)):
        return storage.join(path, name)
    return None
  return path if storage.isfile(path) else None


def _local_copy(path: str) -> str:
  """A tokenizer file in a bucket, downloaded with its Hugging Face companions into a temporary directory kept
  for the process (SentencePiece and tokenizers read local files; the loaded tokenizer's `files` point there)."""
  directory = tempfile.mkdtemp(prefix='llm_jax-tokenizer-')
  atexit.register(shutil.rmtree, directory, True)
  for name in (storage.basename(path), HF_CONFIG_FILE, HF_TEMPLATE_FILE):
    source = storage.join(storage.dirname(path), name)
    if name == storage.basename(path) or (path.endswith('.json') and storage.isfile(source)):
      storage.copy(source, os.path.join(directory, name))
  return os.path.join(directory, storage.basename(path))


def load(path: str, add_bos: str = 'tokenizer') -> Tokenizer | HFTokenizer:
  """Loads a tokenizer: a SentencePiece model file, a tokenizer.json, or a directory holding one. The error
  names the file when it is missing or not a tokenizer. `add_bos` (config.data.add_bos, ADD_BOS_SETTINGS): the
  tokenizer's own BOS behaviour, or 'always' / 'never' (see `_ModelInput.apply_add_bos`)."""
  return _load(path).apply_add_bos(add_bos)


def _load(path: str) -> Tokenizer | HFTokenizer:
  found = tokenizer_file(path)
  if storage.isdir(path) and found is None:
    raise TokenizerError(f'tokenizer {path}: the directory has neither {SENTENCEPIECE_FILE} nor {HF_FILE}')
  path = found or path
  if storage.is_url(path):
    if not found:
      raise TokenizerError(f'tokenizer {path}: cannot read it (No such file or directory)')
    path = _local_copy(path)
  if path.endswith('.json'):
    if not os.path.isfile(path):
      raise TokenizerError(f'tokenizer {path}: cannot read it (No such file or directory)')
    return HFTokenizer(path)
  try:
    with open(path, 'rb') as f:
      proto = f.read()
  except OSError as e:
    raise TokenizerError(f'tokenizer {path}: cannot read it ({e.strerror})') from None
  try:
    return Tokenizer(proto, path)
  except RuntimeError as e:
    raise TokenizerError(f'tokenizer {path}: not a SentencePiece model ({e})') from None


def trained_file_name(model_type: str) -> str:
  """The file name of a tokenizer `train` makes with this model type."""
  return HF_FILE if model_type in HF_TYPES else SENTENCEPIECE_FILE


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained tokenizer and how its characters were chosen (SentencePiece; the coverage fields are None for
  byte_bpe, whose pieces are all bytes)."""
  model: bytes  # the serialized model: a SentencePiece model, or a tokenizer.json for byte_bpe
  character_coverage: float | None = None  # the coverage used (share of the sample's characters with pieces)
  coverage_setting: str | None = None  # config.data.tokenizer_character_coverage as given ('auto' or a number)
  sample_characters: int | None = None  # distinct characters of the sample
  character_pieces: int | None = None  # of them, those with a piece of their own in the trained vocabulary
  sample_byte_share: float | None = None  # share of the sample's characters spelled as bytes by the tokenizer
  pieces_for_default: int | None = None  # pieces (reserved, bytes, characters) DEFAULT_COVERAGE would need


def train(sentences: Iterable[str], vocab_size: int, model_type: str = 'bpe', num_threads: int = 1,
          max_sentences: int = 2_000_000, character_coverage: str | float = 'auto') -> bytes:
  """Trains a tokenizer with the reserved ids above on `sentences` (e.g. the lines of a sample of the corpus).

  Returns the serialized model: a SentencePiece model (bpe, unigram) or a tokenizer.json (byte_bpe; see
  `trained_file_name`). `vocab_size` is an upper bound: when the sample has fewer distinct pieces, the model is
  smaller (hard_vocab_limit=False), which `check_vocab` accepts. `character_coverage`: 'auto' or a number in
  (0, 1] (see the module docstring); `train_detailed` also says what it came to.
  """
  return train_detailed(sentences, vocab_size, model_type, num_threads, max_sentences, character_coverage).model


def parse_coverage(value: str | float) -> float | None:
  """config.data.tokenizer_character_coverage as a number, None for 'auto'; the error names the field."""
  if isinstance(value, str) and value.strip().lower() == 'auto':
    return None
  try:
    coverage = float(value)
  except (TypeError, ValueError):
    coverage = float('nan')
  if not 0.0 < coverage <= 1.0:
    raise TokenizerError(f'config.data.tokenizer_character_coverage: {value!r} is neither \'auto\' nor a number '
                         f'in (0, 1]')
  return coverage


def train_detailed(sentences: Iterable[str], vocab_size: int, model_type: str = 'bpe', num_threads: int = 1,
                   max_sentences: int = 2_000_000, character_coverage: str | float = 'auto') -> Trained:
  """`train`, with the character coverage it used and the share of the sample's characters that became bytes."""
  if model_type not in MODEL_TYPES:
    raise TokenizerError(f'config.data.tokenizer_type: unknown value {model_type!r}; expected one of '
                         f'{", ".join(MODEL_TYPES)}')
  if model_type == 'byte_bpe':
    return Trained(train_byte_bpe(sentences, vocab_size, max_sentences))
  setting = str(character_coverage)
  requested = parse_coverage(character_coverage)  # None: auto
  sentences = [s for s in sentences if len(s) * 4 <= MAX_SENTENCE_BYTES or len(s.encode()) <= MAX_SENTENCE_BYTES]
  chars = _CharacterCounts(sentences)
  room = vocab_size - RESERVED_PIECES  # pieces left for characters (and merges)
  if room < 1:
    raise TokenizerError(f'config.model.vocab_size: {vocab_size} is too small for a SentencePiece tokenizer: its '
                         f'{len(SPECIAL_TOKENS)} reserved and 256 byte pieces leave no room for learned pieces; use '
                         f'at least {RESERVED_PIECES + 1} (more for the corpus\'s characters to have pieces)')

  def too_small(needed: int) -> TokenizerError:
    return TokenizerError(f'config.model.vocab_size: {vocab_size} is too small for this corpus at '
                          f'config.data.tokenizer_character_coverage={setting}: its characters and the '
                          f'{RESERVED_PIECES} reserved and byte pieces need at least {needed}; raise '
                          f'config.model.vocab_size or lower the coverage (\'auto\' lowers it until they fit)')

  def train(sample: list[str], coverage: float) -> bytes:
    return _train_sentencepiece(sample, vocab_size, model_type, num_threads, max_sentences, coverage)

  model, keep = None, room  # without a model yet: the `keep` most frequent characters get pieces
  if requested is None:
    if RESERVED_PIECES + chars.required(DEFAULT_COVERAGE) <= vocab_size:
      coverage = DEFAULT_COVERAGE
      try:
        model = train(sentences, coverage)
      except _TooManyCharacters:  # SentencePiece sampled the lines and counted otherwise: choose them here
        pass
  elif requested >= SENTENCEPIECE_MIN_COVERAGE:
    coverage = requested
    try:
      model = train(sentences, coverage)
    except _TooManyCharacters as e:
      raise too_small(e.needed) from None
  else:
    keep = chars.required(requested)
    if keep > room:
      raise too_small(RESERVED_PIECES + keep)
  if model is None:
    chosen = chars.chosen(keep)
    coverage = chars.covered(chosen)
    try:
      model = train(chars.cut_at_rare(sentences, chosen), 1.0)
    except _TooManyCharacters as e:  # not expected: the cut sample has at most `keep` distinct characters
      raise too_small(e.needed) from None
  sp = spm.SentencePieceProcessor(model_proto=model)
  with_piece = [c for c in chars.order if sp.piece_to_id(c) != sp.unk_id()]
  as_bytes = chars.total - sum(chars.counts[c] for c in with_piece)
  return Trained(model, coverage, setting, chars.distinct, len(with_piece), as_bytes / max(chars.total, 1),
                 RESERVED_PIECES + chars.required(DEFAULT_COVERAGE))


SPACE = '\u2581'  # SentencePiece's piece for a space ('▁'); always given a piece, see _train_sentencepiece


class _CharacterCounts:
  """The characters of a sample as SentencePiece's trainer counts them (a space is SPACE), most frequent first
  (ties by code point), and its rule for the characters a coverage requires."""

  def __init__(self, sentences: list[str]):
    import numpy as np  # pylint: disable=g-import-not-at-top
    counts = collections.Counter()
    for start in range(0, len(sentences), 100_000):
      counts.update(''.join(sentences[start:start + 100_000]))
    if ' ' in counts:
      counts[SPACE] += counts.pop(' ')
    self.counts = counts
    self.order = sorted(counts, key=lambda c: (-counts[c], c))
    self.distinct, self.total = len(self.order), sum(counts.values())
    self._cumulative = np.cumsum([counts[c] for c in self.order], dtype=np.int64)

  def required(self, coverage: float) -> int:
    """Characters SentencePiece gives pieces at `coverage`: it adds the most frequent ones while those added so
    far cover less than `coverage` (a float32 there) of the sample; and SPACE (required_chars) if not among them."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    before = np.concatenate([[0], self._cumulative[:-1]]) / max(self.total, 1)
    reached = np.flatnonzero(before >= float(np.float32(coverage)))
    count = int(reached[0]) if reached.size else self.distinct
    return count + (SPACE not in self.order[:count])

  def chosen(self, keep: int) -> list[str]:
    """The `keep` (at least 1) characters that get pieces: the most frequent ones, SPACE always among them."""
    top = self.order[:keep]
    return top if SPACE in top else top[:keep - 1] + [SPACE]

  def covered(self, chosen: list[str]) -> float:
    """Share of the sample's characters that are `chosen`."""
    return sum(self.counts[c] for c in chosen) / self.total if self.total else 0.0

  def cut_at_rare(self, sentences: list[str], chosen: list[str]) -> list[str]:
    """The sentences cut at every character not `chosen` (which are dropped)."""
    rare = sorted(set(self.order) - set(chosen))  # SPACE is always chosen
    if not rare:
      return sentences
    pattern = re.compile('[' + ''.join(re.escape(c) for c in rare) + ']+')
    return [part for s in sentences for part in pattern.split(s) if part]


class _TooManyCharacters(Exception):
  """SentencePiece's trainer found that the characters a coverage requires do not fit the vocabulary."""

  def __init__(self, needed: int):
    super().__init__(needed)
    self.needed = needed  # pieces they and the reserved and byte pieces need


def _train_sentencepiece(sentences: list[str], vocab_size: int, model_type: str, num_threads: int,
                         max_sentences: int, coverage: float) -> bytes:
  """A SentencePiece model; _TooManyCharacters when the characters `coverage` requires do not fit."""
  model = io.BytesIO()
  spm.set_random_generator_seed(0)  # sentence sampling and unigram EM are then reproducible
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID, byte_fallback=True,
        # Lossless on code: keep every space and newline, do not rewrite characters.
        normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=coverage,
        # A space always has a piece: a space spelled as bytes would decode as the bytes of U+2581, not ' '.
        required_chars=SPACE,
        hard_vocab_limit=False, max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, num_threads=max(1, num_threads), minloglevel=2)
  except RuntimeError as e:
    if 'Vocabulary size is smaller than required_chars' not in str(e):
      raise
    raise _TooManyCharacters(int(str(e).split(' vs ')[-1].split('.')[0])) from None
  return model.getvalue()


def train_byte_bpe(sentences: Iterable[str], vocab_size: int, max_sentences: int = 2_000_000) -> bytes:
  """A byte-level BPE tokenizer.json (the Llama 3 / GPT-2 kind) trained with Hugging Face `tokenizers`.

  Ids 0-3 are <pad>, </s>, <s>, <unk> (as SentencePiece's), then the 256 byte symbols, then the merges. Lossless
  (every string is bytes; no prefix space, no normalisation), so `decode(encode(s)) == s`.
  """
  import itertools
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  minimum = len(SPECIAL_TOKENS) + 256
  if vocab_size < minimum:
    raise TokenizerError(f'config.model.vocab_size: {vocab_size} is too small for a byte-level BPE tokenizer: its '
                         f'{len(SPECIAL_TOKENS)} reserved and 256 byte pieces need at least {minimum}')
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
  tokenizer.train_from_iterator(itertools.islice(iter(sentences), max_sentences), trainer=trainer)
  return tokenizer.to_str().encode('utf-8')


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

WORKDIR_MODEL = SENTENCEPIECE_FILE  # <workdir>/tokenizer.model or tokenizer.json (+ its config): the workdir's tokenizer
WORKDIR_FINGERPRINT = 'tokenizer.fingerprint'  # <workdir>/tokenizer.fingerprint: its sha256, one line


def check_fingerprint(tokenizer: Tokenizer, expected: str, expected_from: str) -> None:
  """Raises TokenizerError naming both sides when `tokenizer` is not the one `expected_from` (a checkpoint, a
  workdir file) was made with."""
  if tokenizer.fingerprint != expected:
    raise TokenizerError(f'tokenizer mismatch: {tokenizer.path or "<in memory>"} has sha256 '
                         f'{tokenizer.fingerprint} but {expected_from} records {expected}; a model must be '
                         f'used with the tokenizer it was trained with (use a new workdir for a new tokenizer)')


def workdir_tokenizer(workdir: str) -> str | None:
  """<workdir>/tokenizer.model or <workdir>/tokenizer.json, whichever it has; None when neither."""
  return tokenizer_file(workdir) if workdir and storage.isdir(workdir) else None


def check_workdir(workdir: str, tokenizer: Tokenizer | HFTokenizer) -> None:
  """Raises TokenizerError naming both files when `workdir` already holds a different tokenizer."""
  fingerprint_path = storage.join(workdir, WORKDIR_FINGERPRINT)
  model_path = workdir_tokenizer(workdir)
  if storage.exists(fingerprint_path):
    check_fingerprint(tokenizer, storage.read_text(fingerprint_path).strip(), fingerprint_path)
  elif model_path:
    check_fingerprint(tokenizer, load(model_path).fingerprint, model_path)


def bind_to_workdir(tokenizer_path: str, workdir: str) -> Tokenizer | HFTokenizer:
  """Copies the tokenizer (every file of it, under its workdir name) into `workdir` with its fingerprint, or
  checks that the one already there is the same.

  A workdir holds one model, so a different tokenizer there is an error naming both files and fingerprints.
  Every file is written atomically (temp file + rename).
  """
  tokenizer = load(tokenizer_path)
  check_workdir(workdir, tokenizer)
  storage.makedirs(workdir)
  for name, source in tokenizer.files.items():
    target = storage.join(workdir, name)
    if not storage.exists(target):
      _write_atomically(target, storage.read_bytes(source))
  fingerprint_path = storage.join(workdir, WORKDIR_FINGERPRINT)
  if not storage.exists(fingerprint_path):
    _write_atomically(fingerprint_path, (tokenizer.fingerprint + '\n').encode())
  return tokenizer


def copy_files(tokenizer: Tokenizer | HFTokenizer, directory: str) -> list[str]:
  """Copies the tokenizer's files into `directory` under their canonical names; returns the names."""
  storage.makedirs(directory)
  for name, source in tokenizer.files.items():
    if storage.absolute(source) != storage.absolute(storage.join(directory, name)):
      _write_atomically(storage.join(directory, name), storage.read_bytes(source))
  return list(tokenizer.files)


def load_from_workdir(workdir: str, add_bos: str = 'tokenizer') -> Tokenizer | HFTokenizer:
  """The workdir's tokenizer, checked against its recorded fingerprint; `add_bos` as in `load` (pass the
  workdir's config.data.add_bos)."""
  tokenizer = load(workdir_tokenizer(workdir) or storage.join(workdir, WORKDIR_MODEL), add_bos)
  fingerprint_path = storage.join(workdir, WORKDIR_FINGERPRINT)
  if storage.exists(fingerprint_path):
    check_fingerprint(tokenizer, storage.read_text(fingerprint_path).strip(), fingerprint_path)
  return tokenizer


def _write_atomically(path: str, data: bytes) -> None:
  """Temporary file + rename locally, one PUT in a bucket (storage.write_bytes)."""
  storage.write_bytes(path, data)
