"""SFT source: template and loss mask, packing, determinism, truncation, bad input; a made-up instruction set
learnt to >= 95% exact match by greedy generation; prompt targets provably outside the loss."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax import data
from llm_jax import train
from llm_jax.data import sft
from llm_jax.data import tokenizer as tokenizer_lib

LETTERS = list('abcdefghijklmnopqrstuvwxyz')


def lookup_table(n=16, seed=0):
  rng = np.random.default_rng(seed)
  keys = sorted({''.join(rng.choice(LETTERS, 3)) for _ in range(4 * n)})[:n]
  return {k: ''.join(rng.choice(LETTERS, 4)) for k in keys}


@pytest.fixture(scope='module')
def tokenizer_file(tmp_path_factory):
  lines = ['<|user|>', '<|assistant|>', '<|system|>'] + [f'lookup {k}' for k in lookup_table()]
  lines += list(lookup_table().values())
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  path.write_bytes(tokenizer_lib.train(lines * 20, 300))
  return str(path)


def write_jsonl(path, records):
  with open(path, 'w') as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) + '\n')
  return str(path)


def sft_config(paths, tokenizer_file, seq_len=64, batch=4):
  c = config_lib.get_config()
  c.model.vocab_size = 320
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.ffn_dim = 192
  c.model.max_seq_len = 128
  c.model.dtype = 'float32'
  c.data.source = 'sft_jsonl'
  c.data.paths = paths
  c.data.tokenizer_path = tokenizer_file
  c.data.seq_len = seq_len
  c.data.global_batch_size = batch
  c.checkpoint.async_save = False
  return c


def pairs_records(table):
  return [dict(prompt=f'lookup {k}', response=v) for k, v in table.items()]


def test_template_loss_only_on_responses_and_packing(tmp_path, tokenizer_file):
  table = lookup_table()
  path = write_jsonl(tmp_path / 'a.jsonl', pairs_records(table))
  c = sft_config(path, tokenizer_file)
  tok = tokenizer_lib.load(tokenizer_file)
  batch = next(data.make_iterator(c, 'train'))
  answers = set(table.values())
  rows_seen = 0
  for r in range(batch['inputs'].shape[0]):
    segs = batch['segment_ids'][r]
    assert segs.max() >= 2  # several examples per row
    for s in range(1, segs.max() + 1):
      where = segs == s
      assert np.array_equal(batch['positions'][r][where], np.arange(where.sum()))
      targets = batch['targets'][r][where & (batch['loss_mask'][r] > 0)]
      assert targets[-1] == tok.eos_id
      assert tok.decode(targets[:-1]) in answers  # the loss sees exactly the answer and its EOS
      prompt_text = tok.decode(batch['inputs'][r][where])
      assert prompt_text.startswith('<|user|>\nlookup ') and '<|assistant|>\n' in prompt_text
      rows_seen += 1
    assert np.all(batch['loss_mask'][r][segs == 0] == 0)
  assert rows_seen >= 4


def test_batches_pure_in_seed_and_step(tmp_path, tokenizer_file):
  path = write_jsonl(tmp_path / 'a.jsonl', pairs_records(lookup_table()))
  c = sft_config(path, tokenizer_file)
  it = data.make_iterator(c, 'train')
  batches = [next(it) for _ in range(12)]  # crosses epochs (16 records, ~2 per row, 4 rows a batch)
  resumed = next(data.make_iterator(c, 'train', start_step=9))
  for key in batches[9]:
    np.testing.assert_array_equal(batches[9][key], resumed[key])
  half = next(data.make_iterator(c, 'train', start_step=9, process_index=1, process_count=2))
  np.testing.assert_array_equal(half['inputs'], batches[9]['inputs'][2:])
  c.data.seed = 1
  assert not np.array_equal(next(data.make_iterator(c, 'train', start_step=9))['inputs'], batches[9]['inputs'])


def test_chat_messages_template(tmp_path, tokenizer_file):
  chat = dict(messages=[dict(role='system', content='be brief'), dict(role='user', content='lookup abc'),
                        dict(role='assistant', content='wxyz'), dict(role='user', content='again'),
                        dict(role='assistant', content='qq')])
  tok = tokenizer_lib.load(tokenizer_file)
  tokens, loss = sft.render(tok, sft.parse_record(json.dumps(chat), 'x:1'))
  tokens, loss = np.asarray(tokens), np.asarray(loss)
  counted = tokens[loss]
  eos_positions = np.flatnonzero(counted == tok.eos_id)
  assert len(eos_positions) == 2
  assert tok.decode(counted[:eos_positions[0]]) == 'wxyz'
  assert tok.decode(counted[eos_positions[0] + 1:eos_positions[1]]) == 'qq'
  assert tok.decode(tokens[~loss]) == '<|system|>\nbe brief\n<|user|>\nlookup abc\n<|assistant|>\n<|user|>\nagain\n' \
      '<|assistant|>\n'


@pytest.mark.parametrize('line, reason', [
    ('{"prompt": "a", "response": ', 'not valid JSON'),
    ('{"prompt": "a"}', 'missing field "response"'),
    ('{"response": "a"}', 'missing field "prompt"'),
    ('{"prompt": "a", "response": "  "}', 'empty response'),
    ('{"prompt": 3, "response": "x"}', 'field "prompt" must be a string'),
    ('[1, 2]', 'expected a JSON object'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', 'no assistant message'),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
     'empty assistant response'),
])
def test_bad_records_name_file_and_line(tmp_path, tokenizer_file, line, reason):
  path = write_jsonl(tmp_path / 'bad.jsonl', ['{"prompt": "p", "response": "r"}', '', line])
  c = sft_config(path, tokenizer_file)
  with pytest.raises(sft.SFTDataError) as error:
    data.prepare(c, str(tmp_path / 'work'))
  assert str(error.value).startswith(f'{path}:3: ') and reason in str(error.value)


def test_missing_files_and_tokenizer(tmp_path, tokenizer_file):
  c = sft_config(str(tmp_path / 'nothing*.jsonl'), tokenizer_file)
  with pytest.raises(sft.SFTDataError, match=r'config.data.paths: .* matches no file'):
    data.prepare(c, str(tmp_path / 'work'))
  path = write_jsonl(tmp_path / 'a.jsonl', pairs_records(lookup_table()))
  c = sft_config(path, '')
  with pytest.raises(sft.SFTDataError, match='config.data.tokenizer_path: sft_jsonl needs a tokenizer'):
    data.prepare(c, str(tmp_path / 'work'))
  # The workdir's tokenizer (e.g. written by convert or by the run being fine-tuned) is used when no path is set.
  c.train.init_from = str(tmp_path / 'pretrained')
  tokenizer_lib.bind_to_workdir(tokenizer_file, c.train.init_from)
  data.prepare(c, str(tmp_path / 'work'))
  assert os.path.exists(tmp_path / 'work' / 'tokenizer.model')


def test_truncation_policy(tmp_path, tokenizer_file):
  tok = tokenizer_lib.load(tokenizer_file)
  long_prompt = 'lookup ' + ' '.join(['abc'] * 60)
  path = write_jsonl(tmp_path / 'long.jsonl', [dict(prompt=long_prompt, response='wxyz'),
                                               dict(prompt='lookup abc', response='wxyz ' * 40)])
  c = sft_config(path, tokenizer_file, seq_len=32)
  examples, stats = sft.load_examples(c, 'train', tok)
  assert stats == dict(records=2, truncated=2, dropped=0)
  first, second = examples
  # Long prompt: the oldest context goes, the whole answer and its EOS stay.
  assert first.tokens.size == 33 and first.tokens[-1] == tok.eos_id
  assert tok.decode(first.tokens[first.loss]) == 'wxyz'
  assert tok.decode(first.tokens).endswith('abc abc\n<|assistant|>\nwxyz')
  # Answer longer than seq_len: one context token, then the head of the answer.
  assert second.tokens.size == 33 and not second.loss[0] and second.loss[1:].all()
  assert tok.decode(second.tokens[1:]).startswith('wxyz wxyz')
  c.data.sft_truncation = 'drop'
  with pytest.raises(sft.SFTDataError, match='no usable records'):
    sft.load_examples(c, 'train', tok)
  write_jsonl(tmp_path / 'short.jsonl', [dict(prompt='lookup abc', response='wxyz')])
  c.data.paths = f'{path},{tmp_path / "short.jsonl"}'
  assert sft.load_examples(c, 'train', tok)[1] == dict(records=3, truncated=0, dropped=2)
  c.data.paths = path
  c.data.sft_truncation = 'error'
  with pytest.raises(sft.SFTDataError, match=f'{path}:1: .* more than seq_len\\+1 = 33'):
    sft.load_examples(c, 'train', tok)


def test_prompt_targets_change_no_gradient(tmp_path, tokenizer_file):
  path = write_jsonl(tmp_path / 'a.jsonl', pairs_records(lookup_table()))
  c = sft_config(path, tokenizer_file)
  model = train.create_model(c)
  batch = {k: jnp.asarray(v) for k, v in next(data.make_iterator(c, 'train')).items()}
  params = model.init(jax.random.key(0), batch['inputs'])['params']
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = nn.unbox(params)
  grad = jax.jit(jax.grad(lambda p, b: train.loss_sum(p, b, model)))
  rng = np.random.default_rng(0)
  noise = jnp.asarray(rng.integers(0, 300, batch['targets'].shape), jnp.int32)
  prompt_changed = dict(batch, targets=jnp.where(batch['loss_mask'] > 0, batch['targets'], noise))
  assert int(jnp.sum(prompt_changed['targets'] != batch['targets'])) > 50
  for x, y in zip(jax.tree.leaves(grad(params, batch)), jax.tree.leaves(grad(params, prompt_changed))):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  answer_changed = dict(batch, targets=jnp.where(batch['loss_mask'] > 0, noise, batch['targets']))
  differs = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(grad(params, batch)),
                                                      jax.tree.leaves(grad(params, answer_changed)))]
  assert any(differs)


def greedy(model, params, prompts, eos_id, max_new, seq_len):
  """Full-forward argmax decoding (no cache): simple and independent of llm_jax.decoding."""
  n = len(prompts)
  tokens = np.zeros((n, seq_len), np.int32)
  lengths = np.array([len(p) for p in prompts])
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  forward = jax.jit(lambda t: model.apply({'params': params}, t))  # causal: later pads do not matter
  outputs = [[] for _ in range(n)]
  done = np.zeros(n, bool)
  for _ in range(max_new):
    logits = np.asarray(forward(jnp.asarray(tokens)))
    nxt = logits[np.arange(n), lengths - 1].argmax(-1)
    for i in range(n):
      if not done[i]:
        if nxt[i] == eos_id:
          done[i] = True
        else:
          outputs[i].append(int(nxt[i]))
          tokens[i, lengths[i]] = nxt[i]
          lengths[i] += 1
    if done.all():
      break
  return outputs


def test_instruction_set_learnt_by_greedy_generation(tmp_path, tokenizer_file):
  table = lookup_table(16)
  path = write_jsonl(tmp_path / 'train.jsonl', pairs_records(table))
  c = sft_config(path, tokenizer_file, seq_len=64, batch=8)
  c.train.steps = 150
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.0
  c.train.log_every = 50
  c.eval.every = 0
  c.eval.steps = 1
  c.checkpoint.every = 0
  workdir = str(tmp_path / 'run')
  last = train.train_and_evaluate(c, workdir, jax.devices()[:1])
  params, _ = checkpoint.load_params(workdir, train.abstract_params(c))
  tok = tokenizer_lib.load_from_workdir(workdir)
  keys = list(table)
  prompts = [sft.encode_prompt(tok, f'lookup {k}') for k in keys]
  outputs = greedy(train.create_model(c), params, prompts, tok.eos_id, max_new=10, seq_len=64)
  exact = np.mean([tok.decode(o) == table[k] for o, k in zip(outputs, keys)])
  assert exact >= 0.95, (exact, last, [tok.decode(o) for o in outputs])


def test_stdlib_records_need_no_files_and_hold_six_lines_asked_and_three_answered(tokenizer_file):
  """data.source=sft_stdlib (experiments/sft_tiny.py): each record is a window of nine non-blank lines of a stdlib
  file, read here independently; the splits are disjoint (data.validation_fraction by key) and the loss covers
  the answer only."""
  from llm_jax.data import sources
  records = list(sft.stdlib_records(40))
  assert len(records) == 40
  (messages, where), key = records[0], records[0][1].split('stdlib/', 1)[1].rsplit(':', 1)[0]
  path = dict(sources.stdlib_files())[key]
  lines = [line for line in open(path, encoding='utf-8', errors='replace').read().splitlines() if line.strip()]
  assert where == f'stdlib/{key}:1'
  assert messages == [dict(role='user', content='\n'.join(lines[:6])),
                      dict(role='assistant', content='\n'.join(lines[6:9]))]
  c = sft_config('', tokenizer_file, seq_len=512)
  c.data.update(source='sft_stdlib', max_docs=40, validation_fraction=0.25)
  train_examples, _ = sft.load_examples(c, 'train', tokenizer_lib.load(tokenizer_file))
  valid_examples, _ = sft.load_examples(c, 'validation', tokenizer_lib.load(tokenizer_file))
  assert {e.where for e in train_examples}.isdisjoint({e.where for e in valid_examples})
  assert len(train_examples) + len(valid_examples) == 40 and valid_examples
  tokenizer = tokenizer_lib.load(tokenizer_file)
  first = next(e for e in train_examples + valid_examples if e.where == where)
  answer = tokenizer.encode(messages[1]['content']) + [tokenizer.eos_id]
  assert first.tokens[first.loss].tolist() == answer  # the loss: exactly the answer and its EOS
  batch = next(data.make_iterator(c, 'train'))  # no data.paths: the source needs no files
  assert batch['inputs'].shape == (4, 512) and batch['loss_mask'].sum() > 0
