"""Preference pairs (config.data.source = preference_jsonl, preference_hf or preference_stdlib), for
model.objective=dpo. preference_stdlib makes pairs from the embedded corpus (`_stdlib_records`), for the tiny
preset and tests.

Records (TRL's two formats), one JSON object a line of the files of config.data.paths, or one row of the
Hugging Face dataset config.data.hf_path:

  {"prompt": "...", "chosen": "...", "rejected": "..."}                                    plain text
  {"prompt": [{"role": "user", "content": "..."}, ...],
   "chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", ...}]}   chat

Tokens. Plain text: the prompt and each completion are encoded on their own, the prompt after BOS where the
tokenizer adds one (`encode_prompt`, config.data.add_bos) and EOS ends each completion (as TRL adds them). Chat: prompt + completion is rendered as one conversation by the tokenizer's chat template (or the
built-in template of llm_jax.data.sft), and the completion is its assistant span with the end-of-turn token;
the prompt is everything before it (so it ends with the assistant header).

Length. A pair is two sequences, prompt + chosen and prompt + rejected, in one row; it fits when they have at
most seq_len + 2 tokens together (each sequence of n tokens gives n-1 targets). A longer pair is truncated as
TRL does: first the prompt keeps its last config.dpo.max_prompt_length tokens (0 = seq_len // 4), then, if still
too long, each completion keeps its first (seq_len + 2 - 2 * prompt) // 2 tokens. Truncated pairs are counted
(stats, printed by prepare).

Rows. Pairs are packed greedily into rows of seq_len in the order `default_rng([seed, split_id, epoch])
.permutation(N)`; pair k of a row is segments 2k-1 (chosen) and 2k (rejected), positions restart at 0 for each
sequence, the rest of a row is padding (segment 0). `loss_mask` is 1 on the targets that are completion tokens:
the prompt is masked out of the log-probabilities. Global batch k is rows [k*B, (k+1)*B) of the epochs' rows, a
pure function of (seed, k) (llm_jax.data.sft.SFTData, whose machinery this reuses).

Splits: a dataset's given eval split, else a held-out share of pairs (config.data.validation_fraction) chosen by
a stable hash of each pair's key (file:line, or split:row): a pair is never split. `open_split(...,
with_reference=True)` adds `ref_logps` to the batch (llm_jax.objectives.preference then uses it instead of a
reference forward), read from <prepared dir>/reference_logps/<split>.npz, which `store_reference` writes in one
pass before training (make_iterator adds it whenever config.dpo.precompute_ref applies).

Errors a user can cause are `PreferenceDataError`s naming file:line (or dataset row) and the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterator, Sequence

import numpy as np

from llm_jax import storage
from llm_jax.errors import ConfigError
from llm_jax.data import sft
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.data import hf_source

_SPLIT_IDS = {'train': 0, 'validation': 1}
FIELDS = ('prompt', 'chosen', 'rejected')


class PreferenceDataError(UserError, ValueError):
  """A record, file or field of a preference source is unusable; the message names it (file:line: reason)."""


class Pair:
  """The token sequences of one pair: prompt + chosen and prompt + rejected, with their completion masks."""

  def __init__(self, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, where: str, truncated: bool):
    self.prompt, self.chosen, self.rejected, self.where, self.truncated = prompt, chosen, rejected, where, truncated
    self.ref: tuple[np.ndarray, np.ndarray] | None = None  # reference log-probs of each sequence's targets

  def sequences(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(tokens, is completion)] of the chosen and the rejected sequence."""
    return [(np.concatenate([self.prompt, c]), np.concatenate([np.zeros(self.prompt.size, bool),
                                                               np.ones(c.size, bool)]))
            for c in (self.chosen, self.rejected)]

  @property
  def positions(self) -> int:  # row positions the pair takes (n-1 per sequence)
    return 2 * self.prompt.size + self.chosen.size + self.rejected.size - 2


# --- records -------------------------------------------------------------------------------------------------------

def _check_messages(value, field: str, where: str, assistant: bool) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise PreferenceDataError(f'{where}: "{field}" must be a string or a non-empty list of {{"role", "content"}}')
  for i, message in enumerate(value):
    if not isinstance(message, dict) or not isinstance(message.get('content'), str) or 'role' not in message:
      raise PreferenceDataError(f'{where}: {field}[{i}] must be an object with "role" and a string "content"')
    if message['role'] not in sft.ROLES:
      raise PreferenceDataError(f'{where}: {field}[{i}] has role {message["role"]!r}; expected one of '
                                f'{", ".join(sft.ROLES)}')
  if assistant and (len(value) != 1 or value[0]['role'] != 'assistant'):
    raise PreferenceDataError(f'{where}: "{field}" must be one assistant message')
  return value


def parse_record(record, where: str) -> dict:
  """The validated prompt/chosen/rejected of one record (strings, or message lists for a chat)."""
  if not isinstance(record, dict):
    raise PreferenceDataError(f'{where}: expected an object with "prompt", "chosen" and "rejected"; got '
                              f'{type(record).__name__}')
  for field in FIELDS:
    if field not in record:
      raise PreferenceDataError(f'{where}: missing field "{field}" (a pair has "prompt", "chosen" and "rejected")')
  chat = not isinstance(record['prompt'], str)
  for field in FIELDS:
    value = record[field]
    if chat:
      _check_messages(value, field, where, assistant=field != 'prompt')
    elif not isinstance(value, str):
      raise PreferenceDataError(f'{where}: field "{field}" must be a string like "prompt" (plain text), got '
                                f'{type(value).__name__}')
  text = lambda v: v if isinstance(v, str) else v[0]['content']
  for field in ('chosen', 'rejected'):
    if not text(record[field]).strip():
      raise PreferenceDataError(f'{where}: empty "{field}" completion')
  return {field: record[field] for field in FIELDS}


def _chat_tokens(tokenizer, prompt: list, completion: list, where: str) -> tuple[list[int], list[int]]:
  """(prompt ids, completion ids) of a chat: the completion is the assistant span as the template renders it."""
  try:
    tokens, loss = sft.render(tokenizer, list(prompt) + list(completion))
  except UserError as e:
    raise PreferenceDataError(f'{where}: {e}') from None
  if not any(loss):
    raise PreferenceDataError(f'{where}: the chat template rendered no assistant tokens for the completion')
  first = loss.index(True)
  last = len(loss) - loss[::-1].index(True)
  return tokens[:first], tokens[first:last]


def tokenize(tokenizer, record: dict, where: str) -> tuple[list[int], list[int], list[int]]:
  """(prompt, chosen, rejected) token ids of a parsed record (module docstring)."""
  if isinstance(record['prompt'], str):
    encode = lambda text: list(tokenizer.encode(text))  # the prompt starts the input: BOS where the model expects it
    return tokenizer.encode_prompt(record['prompt']), encode(record['chosen']) + [tokenizer.eos_id], \
        encode(record['rejected']) + [tokenizer.eos_id]
  prompt, chosen = _chat_tokens(tokenizer, record['prompt'], record['chosen'], where)
  prompt_r, rejected = _chat_tokens(tokenizer, record['prompt'], record['rejected'], where)
  if prompt != prompt_r:
    raise PreferenceDataError(f'{where}: the chat template renders the prompt differently before "chosen" and '
                              f'"rejected"')
  return prompt, chosen, rejected


def fit(prompt: list[int], chosen: list[int], rejected: list[int], seq_len: int, max_prompt: int):
  """The pair cut to seq_len + 2 tokens (prompt first, then completions: TRL's order) and whether it was cut."""
  budget = seq_len + 2
  if 2 * len(prompt) + len(chosen) + len(rejected) <= budget:
    return prompt, chosen, rejected, False
  prompt = prompt[-max_prompt:] if len(prompt) > max_prompt else prompt
  if 2 * len(prompt) + len(chosen) + len(rejected) > budget:
    cap = (budget - 2 * len(prompt)) // 2  # >= seq_len // 4 + 1 > 0 (config.dpo.max_prompt_length < seq_len/2)
    chosen, rejected = chosen[:cap], rejected[:cap]
  return prompt, chosen, rejected, True


def make_pair(tokenizer, record, where: str, seq_len: int, max_prompt: int) -> Pair:
  prompt, chosen, rejected = tokenize(tokenizer, parse_record(record, where), where)
  if not prompt:
    raise PreferenceDataError(f'{where}: the prompt has no tokens (the first token of a sequence is never '
                              f'predicted, so the completion needs one before it)')
  prompt, chosen, rejected, cut = fit(prompt, chosen, rejected, seq_len, max_prompt)
  as_array = lambda ids: np.asarray(ids, np.int32)
  return Pair(as_array(prompt), as_array(chosen), as_array(rejected), where, cut)


# --- reading -------------------------------------------------------------------------------------------------------

def _jsonl_records(config) -> Iterator[tuple[object, str]]:
  for path in sft.jsonl_files(config.data.paths, 'data.paths'):
    for line, where in sft.jsonl_lines(path):
      try:
        yield json.loads(line), where
      except json.JSONDecodeError as e:
        raise PreferenceDataError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None


def _hf_records(config) -> Iterator[tuple[object, str, str]]:
  loaded = hf_source.load(config)
  for split, role in hf_source.splits(config):
    for row, record in enumerate(loaded[split]):
      yield record, f'{config.data.hf_path}[{split}][{row}]', role


STDLIB_PROMPT_LINES, STDLIB_COMPLETION_LINES = 6, 3  # a window of code: its head is the prompt, the rest the pair


def _swap_adjacent_words(line: str, rng) -> str:
  """`line` with one pair of neighbouring, different words swapped, among its first five words (so that it
  survives the truncation of long pairs); the same line when there is none."""
  words = line.split(' ')
  spots = [i for i in range(min(len(words) - 1, 4)) if words[i] and words[i + 1] and words[i] != words[i + 1]]
  if not spots:
    return line
  i = spots[int(rng.integers(len(spots)))]
  words[i], words[i + 1] = words[i + 1], words[i]
  return ' '.join(words)


def _stdlib_records(config) -> Iterator[tuple[object, str, str]]:
  """Pairs made from the embedded corpus (the interpreter's stdlib, as the stdlib text source): in each window
  of nine non-blank lines of a file, the first six are the prompt, the next three the chosen completion, and the
  same three lines lightly corrupted the rejected one: two neighbouring words of the first line that has them
  swapped (a seeded choice of each window's key), so that the two differ in a few tokens only."""
  size = STDLIB_PROMPT_LINES + STDLIB_COMPLETION_LINES
  made = 0
  for key, path in sources.stdlib_files():
    data = sources.read_bytes(path)
    if data is None:
      continue
    lines = [line for line in data.decode('utf-8', 'replace').splitlines() if line.strip()]
    for start in range(0, len(lines) - size + 1, size):
      window = lines[start:start + size]
      seed = int.from_bytes(hashlib.sha256(f'{key}:{start}'.encode()).digest()[:8], 'big')
      rng = np.random.default_rng(seed)
      chosen = window[STDLIB_PROMPT_LINES:]
      rejected = list(chosen)
      for i, line in enumerate(chosen):  # one swap, in the first line that has two words to swap
        rejected[i] = _swap_adjacent_words(line, rng)
        if rejected[i] != line:
          break
      else:
        continue
      yield (dict(prompt='\n'.join(window[:STDLIB_PROMPT_LINES]) + '\n', chosen='\n'.join(chosen),
                  rejected='\n'.join(rejected)), f'stdlib/{key}:{start + 1}', '')
      made += 1
      if config.data.max_docs and made >= config.data.max_docs:
        return


def read_pairs(config, tokenizer) -> tuple[dict[str, list[Pair]], dict]:
  """{'train': pairs, 'validation': pairs} and counts (records, truncated, per split)."""
  seq_len = config.data.seq_len
  max_prompt = config.dpo.max_prompt_length or seq_len // 4
  if config.data.source == 'preference_jsonl':
    records = ((record, where, '') for record, where in _jsonl_records(config))
  elif config.data.source == 'preference_stdlib':
    records = _stdlib_records(config)
  else:
    records = _hf_records(config)
  split = {'train': [], 'validation': []}
  for record, where, role in records:
    pair = make_pair(tokenizer, record, where, seq_len, max_prompt)
    split[role or sources.role_of(where, config.data.validation_fraction)].append(pair)
  stats = dict(records=sum(map(len, split.values())), truncated=sum(p.truncated for s in split.values() for p in s),
               train=len(split['train']), validation=len(split['validation']))
  for role, pairs in split.items():
    if not pairs:
      field = 'data.validation_fraction' if role == 'validation' else 'data.paths'
      raise PreferenceDataError(f'config.{field}: no {role} pairs among the {stats["records"]} records')
  return split, stats


# --- rows ----------------------------------------------------------------------------------------------------------

def pack(pairs: Sequence[Pair], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Greedy packing of whole pairs into rows of seq_len (module docstring); `ref_logps` when the pairs have it."""
  rows: list[list[Pair]] = [[]]
  used = 0
  for pair in pairs:
    if used + pair.positions > seq_len and rows[-1]:
      rows.append([])
      used = 0
    rows[-1].append(pair)
    used += pair.positions
  with_ref = all(pair.ref is not None for pair in pairs)
  keys = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask') + (('ref_logps',) if with_ref else ())
  out = {k: np.zeros((len(rows), seq_len), np.float32 if k in ('loss_mask', 'ref_logps') else np.int32)
         for k in keys}
  out['inputs'][:] = pad_id
  out['targets'][:] = pad_id
  for r, row in enumerate(rows):
    start, segment = 0, 0
    for pair in row:
      for side, (tokens, completion) in enumerate(pair.sequences()):
        n, segment = tokens.size - 1, segment + 1
        span = slice(start, start + n)
        out['inputs'][r, span] = tokens[:-1]
        out['targets'][r, span] = tokens[1:]
        out['segment_ids'][r, span] = segment
        out['positions'][r, span] = np.arange(n)
        out['loss_mask'][r, span] = completion[1:]
        if with_ref:
          out['ref_logps'][r, span] = pair.ref[side]
        start += n
  return out


class PreferenceData(sft.SFTData):
  """A split's pairs and their rows, addressed as a pure function of (seed, row index)."""

  def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng([self.seed, self.split_id, epoch]).permutation(len(self.examples))
    return pack([self.examples[i] for i in order], self.seq_len, self.pad_id)


# --- the source interface (llm_jax.data registry) -----------------------------------------------------------------

_CACHE: dict[tuple, tuple[dict[str, list[Pair]], dict]] = {}


def _role(config, split: str) -> str:
  if split in ('train', config.data.train_split):
    return 'train'
  if split in ('validation', 'eval', config.data.eval_split):
    return 'validation'
  raise ConfigError(f'unknown split {split!r}; expected train or validation')


def _input_key(config) -> tuple:
  d = config.data
  if d.source == 'preference_jsonl':
    files = sft.jsonl_files(d.paths, 'data.paths')
    return tuple((f, os.path.getmtime(f), os.path.getsize(f)) for f in files)
  if d.source == 'preference_stdlib':
    return (d.max_docs,)
  return (d.hf_path, d.hf_name, d.hf_data_files, d.train_split, d.eval_split)


def load_pairs(config, tokenizer) -> tuple[dict[str, list[Pair]], dict]:
  """Both splits' pairs, cached per (inputs, tokenizer, seq_len, max prompt, validation share)."""
  key = (config.data.source, _input_key(config), tokenizer.fingerprint, tokenizer.input_prefix, config.data.seq_len,
         config.dpo.max_prompt_length, config.data.validation_fraction)
  if key not in _CACHE:
    _CACHE[key] = read_pairs(config, tokenizer)
  return _CACHE[key]


def uses_stored_reference(config) -> bool:
  """config.dpo.precompute_ref with a loss that has a reference (simpo has none)."""
  return config.model.objective == 'dpo' and bool(config.dpo.precompute_ref) and config.dpo.loss_type != 'simpo'


def reference_file(config, workdir: str | None, role: str) -> str:
  """Where precomputed reference log-probs of a split live (config.dpo.precompute_ref): beside the prepared data."""
  directory = config.data.prepared_dir or storage.join(workdir or '.', 'data')
  return storage.join(directory, 'reference_logps', f'{role}.npz')


def pairs_key(pairs: Sequence[Pair]) -> str:
  """sha256 of the pairs' tokens in order (prompt, chosen, rejected each with its length): any change of the
  records, the tokenizer, seq_len or truncation changes it."""
  digest = hashlib.sha256()
  for pair in pairs:
    for ids in (pair.prompt, pair.chosen, pair.rejected):
      digest.update(np.int64(ids.size).tobytes())
      digest.update(np.ascontiguousarray(ids, np.int32).tobytes())
  return digest.hexdigest()


def reference_key(reference: dict) -> str:
  """sha256 of the reference's description (its checkpoint and step, or seed, and the model fields)."""
  return hashlib.sha256(json.dumps(reference, sort_keys=True, default=str).encode()).hexdigest()


def _read_stored(path: str) -> dict | None:
  if not storage.exists(path):
    return None
  with np.load(io.BytesIO(storage.read_bytes(path))) as stored:
    return {k: stored[k] for k in stored.files}


def attach_reference(pairs: Sequence[Pair], flat: np.ndarray) -> None:
  """Splits `flat` (every pair's chosen then rejected targets, in pair order) onto the pairs."""
  offset = 0
  for pair in pairs:
    sides = []
    for tokens, _ in pair.sequences():
      sides.append(flat[offset:offset + tokens.size - 1])
      offset += tokens.size - 1
    pair.ref = tuple(sides)
  if offset != flat.size:
    raise PreferenceDataError(f'{flat.size} stored reference log-probs for {offset} targets: the pairs changed '
                              f'since they were computed; delete reference_logps/ to recompute')


def store_reference(config, workdir: str | None, reference: dict, forward, write: bool = True) -> dict[str, str]:
  """config.dpo.precompute_ref: the reference log-probs of every target of each split's pairs, in one pass.

  `reference` describes the reference model (keyed with the pairs' tokens: a stored file of another reference or
  other pairs is recomputed, never reused); `forward(rows)` maps packed rows [R,T] (R = data.global_batch_size,
  padding rows at the end of the last chunk) to log p_ref(target) [R,T] without gradient; it is only called when
  a split must be (re)computed. The pairs are packed in their own order, so the flat array of a split is every
  pair's chosen then rejected targets (`attach_reference`). Each split is one .npz (log-probs and both keys),
  written atomically (temporary name, then rename) by the process with `write`. Returns {split: 'computed' |
  'reused'}.
  """
  tokenizer = _tokenizer(config, workdir)
  pairs_by_role, _ = load_pairs(config, tokenizer)
  ref_key = reference_key(reference)
  pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
  chunk = config.data.global_batch_size
  done = {}
  for role, pairs in pairs_by_role.items():
    path, data_key = reference_file(config, workdir, role), pairs_key(pairs)
    stored = _read_stored(path)
    if stored is not None and str(stored['pairs_key']) == data_key and str(stored['reference_key']) == ref_key:
      done[role] = 'reused'
      continue
    rows = pack(pairs, config.data.seq_len, pad_id)
    count = rows['inputs'].shape[0]
    parts = []
    for first in range(0, count, chunk):
      part = {k: rows[k][first:first + chunk] for k in ('inputs', 'targets', 'segment_ids', 'positions')}
      real = part['inputs'].shape[0]
      if real < chunk:  # padding rows (segment 0) fill the last chunk
        part = {k: np.concatenate([v, np.full((chunk - real,) + v.shape[1:], pad_id if k in ('inputs', 'targets')
                                              else 0, v.dtype)]) for k, v in part.items()}
      logps = np.asarray(forward(part), np.float32)[:real]
      parts.append(logps[part['segment_ids'][:real] > 0])  # row-major: pair by pair, chosen then rejected
    flat = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
    attach_reference([Pair(p.prompt, p.chosen, p.rejected, p.where, p.truncated) for p in pairs], flat)  # sizes
    if write:
      buffer = io.BytesIO()
      np.savez(buffer, logps=flat, pairs_key=np.asarray(data_key), reference_key=np.asarray(ref_key))
      storage.write_bytes(path, buffer.getvalue())
    done[role] = 'computed'
  return done


def _tokenizer(config, workdir):
  return sft._tokenizer(config, workdir)  # pylint: disable=protected-access  (the same lookup as SFT)


def prepare(config, workdir: str | None = None) -> None:
  """Checks every record (errors name file:line), prints the counts and binds the tokenizer to the workdir."""
  tokenizer = _tokenizer(config, workdir)
  _, stats = load_pairs(config, tokenizer)
  print(f'preference pairs: {stats["train"]} train, {stats["validation"]} validation, {stats["truncated"]} '
        f'truncated to data.seq_len={config.data.seq_len}', flush=True)
  if workdir:
    tokenizer_lib.bind_to_workdir(tokenizer.path, workdir)


def open_split(config, split: str = 'train', workdir: str | None = None, with_reference: bool = False):
  tokenizer = _tokenizer(config, workdir)
  role = _role(config, split)
  pairs_by_role, stats = load_pairs(config, tokenizer)
  pairs = [Pair(p.prompt, p.chosen, p.rejected, p.where, p.truncated) for p in pairs_by_role[role]]
  if with_reference:  # reference log-probs computed once and stored (store_reference, run by training)
    path = reference_file(config, workdir, role)
    stored = _read_stored(path)
    if stored is None:
      raise PreferenceDataError(f'{path}: missing; config.dpo.precompute_ref reads the reference log-probs that '
                                f'training computes before its first step')
    if str(stored['pairs_key']) != pairs_key(pairs_by_role[role]):
      raise PreferenceDataError(f'{path}: computed for other pairs (the records, tokenizer or data.seq_len '
                                f'changed); a training run recomputes it')
    attach_reference(pairs, stored['logps'])
  pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
  return PreferenceData(pairs, config.data.seq_len, config.data.global_batch_size, config.data.seed,
                        _SPLIT_IDS[role], pad_id, stats)


def make_iterator(config, split: str = 'train', start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, workdir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Batches start_step, start_step+1, ... of `split` (this process's rows), endless. No TensorFlow."""
  split_data = open_split(config, split, workdir, with_reference=uses_stored_reference(config))
  step = start_step
  while True:
    yield split_data.batch(step, process_index, process_count)
    step += 1
