"""Quality filters and near-duplicate signatures for preparation, from datatrove (the library FineWeb is built with).

Filters (config.data.filters, comma-separated, applied in that order; the first that rejects a document names
the drop in index.json):

  gopher_quality     Gopher's rules (Rae et al. 2021): 50+ words, mean word length 3-10, few symbols, bullets
                     and ellipses, 80% of words with a letter, 2+ English stop words. No upper length limit here:
                     a whole book may be one document.
  gopher_repetition  Gopher's repetition rules: duplicate lines/paragraphs, top n-grams, duplicated n-grams.
  c4_quality         C4's document rules with lines kept as they are (no line removal: the text is not edited):
                     drops documents with 'lorem ipsum', curly braces or a javascript/cookie-policy notice.
  fineweb_quality    FineWeb's rules: share of lines ending in punctuation, of short lines, of duplicated lines.

'auto' (the default) is none for code (the stdlib corpus: prose rules would throw code away), for whole-file
documents (a rule would keep or drop a whole book at once) and for TFDS datasets (curated already, and often
single sentences), and 'gopher_repetition' (drops only degenerate, repeated text) for documents that are parts
of files (config.data.document_separator) or Hugging Face rows. The stricter rules (gopher_quality needs 50+
words and English stop words) are for raw web text and are chosen explicitly.

Offline: datatrove's English word splitting uses NLTK's punkt data, a download. `RegexWordTokenizer` splits
words with a regular expression instead and is handed to every filter, so no filter downloads anything.

Terminal escape sequences (`remove_escape_sequences`, part of the normalisation every document goes through,
sources.clean): coloured text from a terminal, fortune files, logs, `ls --color` output hold ECMA-48 control
sequences that only a terminal reads. Each is removed whole, not only its ESC byte (which would leave `[32m` in
the text for the model to learn as words):

  CSI     ESC [, parameter bytes 0x30-0x3F, intermediate bytes 0x20-0x2F, one final byte 0x40-0x7E:
          colours and styles `ESC[1;32m` ... `ESC[m`, cursor moves `ESC[2J`, `ESC[?25l`
  string  OSC ESC ], and DCS ESC P, SOS ESC X, PM ESC ^, APC ESC _: everything up to BEL or ST (ESC \\):
          window titles `ESC]0;title BEL`, hyperlinks `ESC]8;;url ESC\\`; one never terminated ends with its line
  nF      ESC, intermediate bytes 0x20-0x2F, one final byte 0x30-0x7E: character sets `ESC(B`
  2-byte  ESC and one byte 0x30-0x7E: `ESC7` / `ESC8` (save / restore the cursor), `ESC=`, `ESCc` (reset)

A lone ESC (followed by anything else) is a control character and is removed as one. The 8-bit forms (C1
introducers such as U+009B) are not parsed: in decoded text those characters are far more often mojibake (UTF-8
read as Latin-1: '”' becomes 'â€\\x9d') than terminal output, and reading them as introducers would delete the
text after them; they are removed as control characters.

Near-duplicates: `MinHasher` gives each document the MinHash signature datatrove's stage 1 computes (word
5-grams of the simplified text, 14 bands x 8 hashes); preparation drops a document when a band matches an earlier
kept document's and the signatures agree on at least config.data.near_dedup_threshold of their hashes (the
estimated Jaccard similarity). For corpora beyond one machine's memory, datatrove's four MinHash stages on disk
do the same at cluster scale (see docs/data.md).
"""

from __future__ import annotations

import re

import numpy as np

from llm_jax.errors import UserError

# ECMA-48 escape sequences in their 7-bit form (ESC ...); see the module docstring.
_ESCAPE_SEQUENCES = re.compile(
    r'\x1b\[[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]'  # CSI
    r'|\x1b[\]PX^_][^\x07\x1b\n]*(?:\x07|\x1b\\)?'  # OSC, DCS, SOS, PM, APC
    r'|\x1b[\x20-\x2f]+[\x30-\x7e]'  # nF
    r'|\x1b[\x30-\x7e]')  # two-byte forms (Fp, Fe, Fs)
FILTER_NAMES = ('gopher_quality', 'gopher_repetition', 'c4_quality', 'fineweb_quality')
_PROSE_DEFAULT = ('gopher_repetition',)
# Scripts written without spaces between words: kana, CJK ideographs (unified, extension A, compatibility, the
# supplementary planes' extensions).
_UNSPACED = '\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f'
_SHINGLE_CHUNK = 20_000  # shingles hashed at once: bounds memory for documents as long as a book


class CleaningError(UserError, ValueError):
  """A cleaning option cannot be used; the message names the field."""


def _datatrove():
  try:
    import datatrove  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise CleaningError('config.data.filters / config.data.near_dedup need datatrove: pip install '
                        '"datatrove>=0.4,<0.11" (or the llm_jax[data] extra)') from None


def remove_escape_sequences(text: str) -> tuple[str, int]:
  """`text` without its terminal escape sequences (each removed whole), and how many there were."""
  if '\x1b' not in text:
    return text, 0
  return _ESCAPE_SEQUENCES.subn('', text)


def filter_names(config) -> tuple[str, ...]:
  """The filters config.data.filters selects, 'auto' resolved for the source (see the module docstring)."""
  d = config.data
  if d.filters != 'auto':
    names = tuple(n.strip() for n in d.filters.split(',') if n.strip())
    for name in names:
      if name not in FILTER_NAMES:
        raise CleaningError(f'config.data.filters: unknown filter {name!r}; expected some of '
                            f'{", ".join(FILTER_NAMES)}')
    return names
  if d.source == 'hf_datasets' or (d.source == 'text_files' and d.document_separator):
    return _PROSE_DEFAULT
  return ()


def _word_tokenizer_class():
  from datatrove.utils.word_tokenizers import WordTokenizer  # pylint: disable=g-import-not-at-top

  class RegexWordTokenizer(WordTokenizer):
    """Words and punctuation runs by a regular expression; sentences end at . ! ? followed by a space. Chinese
    and Japanese are written without spaces: each of their characters is a word (else a whole line would be one
    word, and the repetition rules, which weigh n-grams of words by their characters, would drop most
    documents)."""

    _WORDS = re.compile(rf'[{_UNSPACED}]|[^\W{_UNSPACED}]+(?:[\'’][^\W{_UNSPACED}]+)*|[^\w\s]+')
    _SENTENCE_ENDS = re.compile(r'(?<=[.!?])\s+')

    def __init__(self):
      super().__init__('en')

    def word_tokenize(self, text: str) -> list[str]:
      return self._WORDS.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
      return [s for s in self._SENTENCE_ENDS.split(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
      spans, start = [], 0
      for match in self._SENTENCE_ENDS.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
      if start < len(text):
        spans.append((start, len(text)))
      return spans

  return RegexWordTokenizer


class Filters:
  """The selected datatrove filters, applied in order: `rejection(text)` is None (kept) or the filter's name."""

  def __init__(self, names: tuple[str, ...]):
    self.names = names
    self._filters = []
    if not names:
      return
    _datatrove()
    from datatrove.pipeline import filters as dt  # pylint: disable=g-import-not-at-top

    words = _word_tokenizer_class()()
    make = {
        'gopher_quality': lambda: dt.GopherQualityFilter(max_doc_words=None, language=words),
        'gopher_repetition': lambda: dt.GopherRepetitionFilter(language=words),
        'c4_quality': lambda: dt.C4QualityFilter(filter_no_terminal_punct=False, split_paragraph=True,
                                                 remove_citations=False, min_num_sentences=-1,
                                                 min_words_per_line=-1, max_word_length=-1, language=words),
        'fineweb_quality': lambda: dt.FineWebQualityFilter(language=words),
    }
    self._filters = [(name, make[name]()) for name in names]

  def rejection(self, text: str) -> str | None:
    if not self._filters:
      return None
    from datatrove.data import Document  # pylint: disable=g-import-not-at-top
    doc = Document(text=text, id='')
    for name, step in self._filters:
      result = step.filter(doc)
      kept = result[0] if isinstance(result, tuple) else result
      if not kept:
        return name
      if doc.text != text:  # a filter that edits the text (C4 line removal) must not: we keep text as it is
        doc.text = text
    return None


class MinHasher:
  """datatrove's MinHash signature of a document (uint64 [bands * rows]); None when it has fewer than n words."""

  def __init__(self):
    _datatrove()
    from datatrove.pipeline.dedup.minhash import MinhashConfig  # pylint: disable=g-import-not-at-top
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature  # pylint: disable=g-import-not-at-top
    from datatrove.utils.hashing import HashConfig  # pylint: disable=g-import-not-at-top

    # sha1 shingle hashes: datatrove 0.10's xxhash path passes str to xxhash 4, which wants bytes.
    self.config = MinhashConfig(hash_config=HashConfig(hash_fc='sha1', precision=64))
    # The output folder is never written: only the signature functions of stage 1 are used.
    self._stage = MinhashDedupSignature(output_folder='/nonexistent-llm-jax-minhash', config=self.config,
                                        language=_word_tokenizer_class()())
    self.bands, self.rows = self.config.num_buckets, self.config.hashes_per_bucket

  def signature(self, text: str) -> np.ndarray | None:
    shingles = self._stage.get_shingles(text)
    if not shingles.size:
      return None
    parts = [np.concatenate(self._stage.get_signature(shingles[i:i + _SHINGLE_CHUNK]))
             for i in range(0, shingles.shape[0], _SHINGLE_CHUNK)]
    return np.min(np.stack(parts), axis=0).astype(np.uint64)


def near_duplicates(signatures: list[np.ndarray | None], bands: int, threshold: float) -> list[bool]:
  """For documents in priority order: True for each one that has an earlier kept document sharing a band whose
  signature agrees on at least `threshold` of its hashes (it is dropped, so it is never anyone's twin)."""
  buckets: dict[tuple[int, bytes], list[int]] = {}
  dropped = [False] * len(signatures)
  for i, sig in enumerate(signatures):
    if sig is None:
      continue
    keys = [(b, part.tobytes()) for b, part in enumerate(np.split(sig, bands))]
    candidates = {j for key in keys for j in buckets.get(key, ())}
    if any(np.mean(signatures[j] == sig) >= threshold for j in sorted(candidates)):
      dropped[i] = True
      continue
    for key in keys:
      buckets.setdefault(key, []).append(i)
  return dropped
