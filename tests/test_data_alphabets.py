"""Large alphabets and terminal text: a corpus of thousands of CJK characters with a 2048-piece vocabulary (the
character coverage is lowered, the rest is byte fallback), coloured text whose escape sequences are removed whole,
and bits per byte on multi-byte text. Every number is checked against a computation of its own."""

import collections
import math
import os
import re

import jax
import numpy as np
import pytest

from experiments import tiny
from llm_jax import evaluate, train
from llm_jax.data import cleaning, preparation, sources
from llm_jax.data import tokenizer as tokenizer_lib

ESC = '\x1b'
_CJK = [chr(0x4E00 + i) for i in range(3500)]  # 3,500 distinct characters of the CJK Unified Ideographs block
_PUNCTUATION = '，。；：！？'
_CDF = np.cumsum(1.0 / np.arange(1, len(_CJK) + 1)) / np.sum(1.0 / np.arange(1, len(_CJK) + 1))  # Zipf


def _poem(rng) -> str:
  """A few lines of Zipf-distributed characters, punctuation, and an indented attribution with spaces."""
  lines = []
  for _ in range(int(rng.integers(2, 5))):
    chars = np.searchsorted(_CDF, rng.random(int(rng.integers(5, 16))))
    lines.append(''.join(_CJK[i] for i in chars) + _PUNCTUATION[int(rng.integers(len(_PUNCTUATION)))])
  lines.append('      -- ' + ''.join(_CJK[i] for i in rng.integers(50, size=3)))
  return '\n'.join(lines)


def _fortune_file(path, documents, colour=False):
  """Documents separated by lines holding '%' (the fortune format), optionally coloured as terminals show them."""
  with open(path, 'w', encoding='utf-8') as f:
    for text in documents:
      if colour:
        body, attribution = text.rsplit('\n', 1)
        text = f'{ESC}[32m{body}{ESC}[m\n{ESC}[1;33m{attribution}{ESC}[0m{ESC}(B'
      f.write(text + '\n%\n')


def _config(paths, vocab_size=2048, **data):
  c = tiny.get_config()
  c.model.vocab_size = vocab_size
  c.data.source = 'text_files'
  c.data.paths = paths
  c.data.document_separator = '^%$'
  c.data.seq_len = 64
  c.data.global_batch_size = 4
  c.train.steps = 3
  c.train.log_every = 1
  c.eval.every = 3
  c.eval.steps = 2
  c.checkpoint.every = 3
  c.data.filters = ''  # the repetition rule would drop some generated documents; this is about the text
  for name, value in data.items():
    c.data[name] = value
  return c


@pytest.fixture(scope='module')
def cjk(tmp_path_factory):
  """2,500 generated poems in a fortune file, prepared with vocab_size=2048 (training them is the slow test)."""
  root = tmp_path_factory.mktemp('cjk')
  rng = np.random.default_rng(0)
  documents = [_poem(rng) for _ in range(2500)]
  _fortune_file(root / 'poems.txt', documents)
  config = _config(str(root / 'poems.txt'))
  workdir = str(root / 'work')
  index = preparation.prepare(config, workdir, progress=False)
  return dict(config=config, workdir=workdir, directory=os.path.join(workdir, 'data'), documents=documents,
              index=index)


def _spelled_as_bytes(tok, text) -> int:
  """Characters of `text` without a piece of their own (independent of the byte-token counting of preparation)."""
  return sum(tok._sp.piece_to_id('\u2581' if c == ' ' else c) == tok.unk_id for c in text)


def test_cjk_corpus_with_a_small_vocabulary_prepares_and_round_trips(cjk):
  documents, index = cjk['documents'], cjk['index']
  assert len(set(''.join(documents)) & set(_CJK)) > 3000  # far more characters than the 2048 pieces
  tok = tokenizer_lib.load(os.path.join(cjk['directory'], 'tokenizer.model'))
  assert tok.vocab_size == 2048
  for text in documents[:200] + ['罕見字 𠀀𠀁 (CJK Extension B) and ASCII  ', '\n'.join(documents[-3:])]:
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text

  # Coverage: the share of the tokenizer sample's characters (here all train text, newlines included) that the
  # 2048 - 260 most frequent characters make up, counted here (a space is U+2581 to SentencePiece; spaces are
  # frequent here).
  info = index['tokenizer']
  train_docs = [d for d in _documents_in_shards(cjk['directory'], index, 'train')]
  counts = collections.Counter(''.join(train_docs))
  top = sorted(counts.values(), reverse=True)[:2048 - tokenizer_lib.RESERVED_PIECES]
  assert info['character_coverage_setting'] == 'auto'
  assert info['character_coverage'] == pytest.approx(sum(top) / sum(counts.values()), rel=1e-9)
  assert 0.8 < info['character_coverage'] < 0.9995
  assert info['character_pieces'] == 2048 - tokenizer_lib.RESERVED_PIECES
  assert info['pieces_for_default_coverage'] > 2048

  # Byte share: characters with no piece of their own, counted by looking each one up in the vocabulary.
  splits = index['splits'].values()
  text = ''.join(d for role in ('train', 'validation') for d in _documents_in_shards(cjk['directory'], index, role))
  assert sum(s['tokenized_chars'] for s in splits) == len(text)
  assert sum(s['byte_fallback_chars'] for s in splits) == _spelled_as_bytes(tok, text)
  share = _spelled_as_bytes(tok, text) / len(text)
  assert 0.01 < share < 0.3
  report = preparation.report(index)
  assert f'tokenizer character coverage {info["character_coverage"]:.4f} (auto, lowered from 0.9995' in report
  assert f'{100 * share:.2f}% of the text\'s characters' in report


def _documents_in_shards(directory, index, role):
  tok = tokenizer_lib.load(os.path.join(directory, 'tokenizer.model'))
  stream = np.concatenate(preparation.read_split_tokens(directory, index, role))
  ends = np.flatnonzero(stream == tok.eos_id)
  return [tok.decode(doc) for doc in np.split(stream, ends + 1)[:-1]]


def test_byte_lengths_of_tokens_are_the_utf8_bytes_of_multibyte_text(cjk):
  """Bits per byte divide the loss by `evaluate.token_byte_lengths` of the targets: for characters that are pieces
  (3 bytes each here), merged pieces and byte fallback alike they sum to the UTF-8 bytes of the text, and a window
  cut inside a byte-fallback character counts the bytes it holds."""
  tok = tokenizer_lib.load(os.path.join(cjk['directory'], 'tokenizer.model'))
  lengths = evaluate.token_byte_lengths(tok)
  for role in ('train', 'validation'):
    stream = np.concatenate(preparation.read_split_tokens(cjk['directory'], cjk['index'], role))
    text = ''.join(_documents_in_shards(cjk['directory'], cjk['index'], role))
    assert int(lengths[stream[stream != tok.eos_id]].sum()) == len(text.encode('utf-8'))
  rare = '𠀀 罕'  # a 4-byte and a 3-byte character without pieces: bytes
  ids = tok.encode(rare)
  assert len(ids) > 3 and int(lengths[ids[:2]].sum()) == 2
  assert int(lengths[ids].sum()) == len(rare.encode('utf-8'))


@pytest.mark.slow
def test_cjk_corpus_with_a_small_vocabulary_trains_and_reports_bits_per_byte(cjk):
  result = train.train_and_evaluate(cjk['config'], cjk['workdir'], devices=jax.devices()[:1])
  assert math.isfinite(result['loss']) and result['step'] == 3
  ppl = evaluate.run(cjk['workdir'], {'eval.steps': 1}, split='validation', task_file='',
                     devices=jax.devices()[:1])['perplexity']
  assert ppl['bytes'] > 1.5 * ppl['tokens']  # CJK: 3 bytes a character with a piece
  assert ppl['bits_per_byte'] == pytest.approx(ppl['loss'] * ppl['tokens'] / math.log(2) / ppl['bytes'])
  assert ppl['perplexity'] == pytest.approx(math.exp(ppl['loss']))


@pytest.mark.parametrize('coverage, message', [
    ('0.9995', r'config\.model\.vocab_size: 2048 is too small for this corpus at '
               r'config\.data\.tokenizer_character_coverage=0\.9995: .* need at least \d+; raise '
               r'config\.model\.vocab_size or lower the coverage'),
])
def test_an_explicit_coverage_that_cannot_fit_is_one_error_naming_both_fields(coverage, message):
  rng = np.random.default_rng(1)
  lines = [line for _ in range(800) for line in _poem(rng).split('\n')]
  with pytest.raises(tokenizer_lib.TokenizerError, match=message):
    tokenizer_lib.train(lines, 2048, character_coverage=coverage)


def test_explicit_coverages_choose_the_characters_by_frequency():
  """Below SentencePiece's 0.98 the characters are chosen here; at or above it SentencePiece chooses: both give
  pieces to the most frequent characters that make up the coverage, and both round-trip."""
  rng = np.random.default_rng(2)
  lines = [line for _ in range(800) for line in _poem(rng).split('\n')]
  counts = collections.Counter(''.join(lines).replace(' ', '\u2581'))
  ranked = sorted(counts.values(), reverse=True)
  for coverage in ('0.9', '0.5'):
    trained = tokenizer_lib.train_detailed(lines, 2048, character_coverage=coverage)
    needed = next(k for k in range(len(ranked) + 1) if sum(ranked[:k]) >= float(coverage) * sum(ranked))
    assert trained.character_pieces == needed  # spaces are among the most frequent here
    assert trained.character_coverage == pytest.approx(sum(ranked[:needed]) / sum(ranked))
    assert trained.sample_byte_share == pytest.approx(1 - trained.character_coverage)
    tok = tokenizer_lib.Tokenizer(trained.model)
    assert tokenizer_lib.RESERVED_PIECES + needed < tok.vocab_size <= 2048  # room left for multi-character pieces
    assert all(tok.decode(tok.encode(line)) == line for line in lines[:100])
  trained = tokenizer_lib.train_detailed(lines, 4500, character_coverage='0.99')
  assert trained.character_coverage == 0.99
  assert trained.character_pieces == next(k for k in range(len(ranked) + 1)
                                          if sum(ranked[:k]) >= np.float32(0.99) * sum(ranked))


def test_a_space_always_has_a_piece():
  """A sample without spaces (SentencePiece would spell a later space as the bytes of U+2581 and decode it as
  that character) still gives a tokenizer that round-trips spaces."""
  lines = [''.join(_CJK[(i * 7 + j) % 40] for j in range(12)) for i in range(400)]
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.train(lines, 400))
  assert tok.decode(tok.encode('一 丁  七')) == '一 丁  七'


def test_coverage_field_is_validated():
  from llm_jax import config as config_lib
  from llm_jax import validation
  c = config_lib.get_config()
  c.data.tokenizer_character_coverage = '0.98'
  validation.validate(c, 1)
  for bad in ('most', '0', '1.5'):
    c.data.tokenizer_character_coverage = bad
    with pytest.raises(config_lib.ConfigError, match=r'config\.data\.tokenizer_character_coverage: .*auto'):
      validation.validate(c, 1)


# --- terminal escape sequences -----------------------------------------------------------------------------------

@pytest.mark.parametrize('raw, clean, count', [
    (f'{ESC}[32mgreen{ESC}[m plain', 'green plain', 2),  # CSI: SGR colour and reset
    (f'{ESC}[1;38;5;208mbold orange{ESC}[0m', 'bold orange', 2),
    (f'{ESC}[2J{ESC}[H{ESC}[?25lscreen{ESC}[?25h', 'screen', 4),  # clear, home, cursor hide / show
    (f'{ESC}]0;window title\x07text', 'text', 1),  # OSC ended by BEL
    (f'{ESC}]8;;https://example.com{ESC}\\link{ESC}]8;;{ESC}\\', 'link', 2),  # OSC 8 hyperlink ended by ST
    (f'{ESC}P1$r0m{ESC}\\after', 'after', 1),  # DCS
    (f'{ESC}(Bcharset{ESC})0', 'charset', 2),  # nF: character set designation
    (f'{ESC}7saved{ESC}8 {ESC}=keypad{ESC}>', 'saved keypad', 4),  # two-byte forms
    (f'{ESC}]2;never ended\nnext line', '\nnext line', 1),  # an unterminated string ends with its line
    (f'lone {ESC}\u00e9 escape', f'lone {ESC}\u00e9 escape', 0),  # not a sequence: ESC is left to the control rule
    ('code: a[32m] = x[0]; "\\x1b[0m"', 'code: a[32m] = x[0]; "\\x1b[0m"', 0),  # brackets without ESC stay
])
def test_escape_sequences_are_removed_whole(raw, clean, count):
  assert cleaning.remove_escape_sequences(raw) == (clean, count)
  assert sources.clean_counted(raw) == (sources.clean(clean), count)
  assert ESC not in sources.clean(raw)


def test_coloured_text_loses_its_escape_sequences_and_keeps_its_words(tmp_path):
  rng = np.random.default_rng(3)
  words = ('light', 'river', 'stone', 'moon', 'frost', 'bed', 'home', 'bright', 'ground', 'head')
  documents = [' '.join(rng.choice(words, size=int(rng.integers(6, 14)))) + '\n      -- ' + str(rng.choice(words))
               for _ in range(300)]
  _fortune_file(tmp_path / 'colour.txt', documents, colour=True)
  raw = (tmp_path / 'colour.txt').read_text()
  assert raw.count(f'{ESC}[') == 4 * len(documents)
  config = _config(str(tmp_path / 'colour.txt'), vocab_size=400)
  config.data.prepared_dir = str(tmp_path / 'prepared')
  index = preparation.prepare(config, None, progress=False)
  got = sorted(_documents_in_shards(config.data.prepared_dir, index, 'train') +
               _documents_in_shards(config.data.prepared_dir, index, 'validation'))
  assert got == sorted(set(documents))  # every word kept, no '[32m' or '(B' left (duplicates dropped)
  removed = [s['escape_sequences'] for s in index['splits'].values()]
  assert sum(removed) == 5 * len(documents)  # 5 a document, duplicates included (they are read, then dropped)
  reported = re.findall(r'removed ([\d,]+) terminal escape sequences', preparation.report(index))
  assert sorted(int(n.replace(',', '')) for n in reported) == sorted(n for n in removed if n)


def test_quality_rules_see_each_cjk_character_as_a_word():
  """Chinese is written without spaces: split on spaces a line is one word, and the repetition rule (n-grams of
  words weighed by their characters) drops nearly every document; with a word per character it keeps poems."""
  words = cleaning._word_tokenizer_class()().word_tokenize("床前明月光，疑是地上霜。 don't stop ひらがな 한국어")
  assert words == ['床', '前', '明', '月', '光', '，', '疑', '是', '地', '上', '霜', '。', "don't", 'stop',
                   'ひ', 'ら', 'が', 'な', '한국어']  # Korean is written with spaces: its words stay whole
  rng = np.random.default_rng(7)
  poems = ['\n'.join(_poem(rng) for _ in range(3)) for _ in range(30)]
  repetition = cleaning.Filters(('gopher_repetition',))
  assert all(repetition.rejection(poem) is None for poem in poems)
  assert repetition.rejection('\n'.join(['床前明月光，疑是地上霜。'] * 6)) == 'gopher_repetition'
