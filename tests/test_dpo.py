"""DPO, IPO, robust DPO and SimPO (llm_jax.objectives.preference) against TRL on small random transformers models
converted with llm_jax.convert, and the preference data source (llm_jax.data.preference).

Parity: the same preference pairs give the same loss, rewards and gradient norm as TRL's losses on the HF model:
DPOTrainer._compute_loss (sigmoid, ipo, robust) and the experimental CPOTrainer's SimPO (cpo_loss on its
get_batch_logps, average log-probs, cpo_alpha = 0), float32 on CPU, within RTOL = 1e-5 relative (1e-6 absolute; measured: below 5e-7):
log-probs are sums over completions of float32 log-softmaxes computed in a different order.
"""

import os
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
trl = pytest.importorskip('trl')

from llm_jax import checkpoint, convert, objectives, train  # noqa: E402
from llm_jax.data import preference  # noqa: E402

torch.set_num_threads(1)
RTOL, ATOL = 1e-5, 1e-6
VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)
FAMILIES = {'llama': ('LlamaConfig', 'LlamaForCausalLM'), 'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM')}


def hf_model(family, seed):
  config_cls, model_cls = FAMILIES[family]
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**BASE))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('.bias'):
        param.normal_(0.0, 0.5)
  return model


def imported(model, root):
  hf_dir, workdir = os.path.join(root, 'hf'), os.path.join(root, 'work')
  model.save_pretrained(hf_dir)
  config = convert.from_hf(hf_dir, workdir, dtype='float32')
  params, _ = checkpoint.load_params(workdir, train.abstract_params(config))
  return config, params


def pairs(seed=0, n=3):
  rng = np.random.default_rng(seed)
  ids = lambda lo, hi: rng.integers(2, VOCAB, int(rng.integers(lo, hi))).astype(np.int32)
  return [preference.Pair(ids(2, 6), ids(2, 7), ids(2, 7), f'pair {i}', False) for i in range(n)]


def trl_batch(pair_list):
  """TRL's concatenated layout: chosen rows then rejected rows, right-padded, completion_mask on completions."""
  sequences = [(p.prompt, c) for c in ('chosen', 'rejected') for p in pair_list]
  length = max(len(prompt) + len(getattr(p, side)) for p in pair_list for prompt, side in [(p.prompt, 'chosen'), (p.prompt, 'rejected')])
  ids = np.zeros((len(sequences), length), np.int64)
  attention, completion = np.zeros_like(ids), np.zeros_like(ids)
  for row, (p, side) in enumerate((p, side) for side in ('chosen', 'rejected') for p in pair_list):
    tokens = np.concatenate([p.prompt, getattr(p, side)])
    ids[row, :tokens.size], attention[row, :tokens.size] = tokens, 1
    completion[row, p.prompt.size:tokens.size] = 1
  return {k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=attention, completion_mask=completion).items()}


def trl_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.WordLevel({f'w{i}': i for i in range(VOCAB)}, unk_token='w0'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='w1', pad_token='w0')


def trl_dpo(policy, reference, batch, loss_type, beta, label_smoothing):
  """(loss, metrics, grad norm) of TRL's DPOTrainer loss on the HF models."""
  from datasets import Dataset  # pylint: disable=g-import-not-at-top
  args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
                       report_to=[], use_cpu=True, bf16=False)  # float32: no autocast of the models
  trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=trl_tokenizer(),
                           train_dataset=Dataset.from_dict(dict(prompt=['w3'], chosen=[' w4'], rejected=[' w5'])))
  policy.train()
  policy.zero_grad()
  loss = trainer._compute_loss(policy, batch, False)  # pylint: disable=protected-access
  loss.backward()
  metrics = {k: v[-1] for k, v in trainer._metrics['train'].items()}  # pylint: disable=protected-access
  return float(loss), metrics, _grad_norm(policy)


def trl_simpo(policy, batch, beta, gamma, label_smoothing):
  """(loss, metrics, grad norm) of TRL's SimPO (experimental CPOTrainer.cpo_loss, loss_type=simpo, cpo_alpha=0)."""
  from trl.experimental.cpo import CPOTrainer  # pylint: disable=g-import-not-at-top
  policy.train()
  policy.zero_grad()
  labels = batch['input_ids'].masked_fill(batch['completion_mask'] == 0, -100)
  logits = policy(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
  logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
  chosen, rejected = logps.chunk(2)
  settings = types.SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type='simpo',
                                   label_smoothing=label_smoothing, accelerator=types.SimpleNamespace(device='cpu'))
  losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(settings, chosen, rejected)
  loss = losses.mean()
  loss.backward()
  metrics = {'rewards/chosen': float(chosen_rewards.mean()), 'rewards/rejected': float(rejected_rewards.mean()),
             'rewards/margins': float((chosen_rewards - rejected_rewards).mean()),
             'rewards/accuracies': float((chosen_rewards > rejected_rewards).float().mean())}
  return float(loss), metrics, _grad_norm(policy)


def _grad_norm(model):
  return float(torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in model.parameters() if p.grad is not None)))


def ours(config, params, reference, pair_list, seq_len=48):
  model = train.create_model(config)
  batch = {k: jnp.asarray(v) for k, v in preference.pack(pair_list, seq_len, pad_id=0).items()}
  assert batch['segment_ids'].max() >= 4, 'several pairs share a row'
  objective = objectives.make(config)
  count = objective.count(batch)

  def value(p):
    out = objective.loss(model, p, batch, reference)
    return out.total / count, {k: v / count for k, v in out.metrics.items()}

  (loss, metrics), grads = jax.jit(jax.value_and_grad(value, has_aux=True))(params)
  return float(loss), {k: float(v) for k, v in metrics.items()}, float(optax.global_norm(grads)), int(count)


CASES = [('llama', 'sigmoid', 0.0), ('llama', 'ipo', 0.0), ('llama', 'robust', 0.2), ('llama', 'simpo', 0.1),
         ('qwen2', 'sigmoid', 0.0)]


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  cache = {}

  def get(family):
    if family not in cache:
      root = tmp_path_factory.mktemp(family)
      policy, reference = hf_model(family, 0), hf_model(family, 1)  # a policy that has moved from its reference
      config, params = imported(policy, str(root / 'policy'))
      _, ref_params = imported(reference, str(root / 'reference'))
      cache[family] = policy, reference, config, params, ref_params
    return cache[family]
  return get


@pytest.mark.parametrize('family,loss_type,smoothing', CASES)
def test_loss_rewards_and_grad_norm_match_trl(models, family, loss_type, smoothing):
  policy, reference, config, params, ref_params = models(family)
  config = config.copy_and_resolve_references()
  config.model.objective = 'dpo'
  config.data.source = 'preference_jsonl'
  config.dpo.update(beta=0.5, loss_type=loss_type, label_smoothing=smoothing, simpo_gamma=0.3)
  pair_list = pairs()
  batch = trl_batch(pair_list)
  if loss_type == 'simpo':
    expected = trl_simpo(policy, batch, 0.5, 0.3, smoothing)
  else:
    expected = trl_dpo(policy, reference, batch, loss_type, 0.5, smoothing)
  loss, metrics, grad_norm, count = ours(config, params, ref_params, pair_list)
  assert count == len(pair_list)
  print(f'{family} {loss_type}: loss {loss:.6f} (TRL {expected[0]:.6f}), grad norm {grad_norm:.6f} '
        f'(TRL {expected[2]:.6f})')
  np.testing.assert_allclose(loss, expected[0], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad_norm, expected[2], rtol=RTOL, atol=ATOL)
  for name in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies'):
    np.testing.assert_allclose(metrics[name], expected[1][name], rtol=RTOL, atol=ATOL, err_msg=name)


# --- the preference source -------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tokenizer_file(tmp_path_factory):
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  lines = ['<|user|>', '<|assistant|>', 'the quick brown fox', 'jumps over the lazy dog', 'a b c d e f g'] * 40
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  path.write_bytes(tokenizer_lib.train(lines, 300))
  return str(path)


def preference_config(path, tokenizer_file, seq_len=32):
  from llm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.get_config()
  c.model.update(objective='dpo', vocab_size=320, max_seq_len=128)
  c.data.update(source='preference_jsonl', paths=str(path), tokenizer_path=tokenizer_file, seq_len=seq_len,
                global_batch_size=2, validation_fraction=0.3)
  return c


def write(path, lines):
  import json  # pylint: disable=g-import-not-at-top
  path.write_text('\n'.join(line if isinstance(line, str) else json.dumps(line) for line in lines) + '\n')
  return path


def test_pairs_plain_and_chat_are_masked_packed_and_split_by_pair(tmp_path, tokenizer_file):
  records = [dict(prompt='the quick brown', chosen=' fox', rejected=' dog')] * 12 + [
      dict(prompt=[dict(role='user', content='a b c')], chosen=[dict(role='assistant', content='d e')],
           rejected=[dict(role='assistant', content='g f')])] * 12
  c = preference_config(write(tmp_path / 'p.jsonl', records), tokenizer_file, seq_len=64)
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load(tokenizer_file)
  split, stats = preference.read_pairs(c, tok)
  assert stats['train'] + stats['validation'] == 24 and stats['validation'] > 0 and stats['truncated'] == 0
  where = {p.where for p in split['train']}
  assert not where & {p.where for p in split['validation']}  # a pair is in one split
  plain = next(p for p in split['train'] + split['validation'] if p.where.endswith(':1'))
  assert plain.prompt.tolist() == tok.encode('the quick brown')
  assert plain.chosen.tolist() == tok.encode(' fox') + [tok.eos_id]
  rows = preference.pack(split['train'], c.data.seq_len, 0)
  for r in range(rows['inputs'].shape[0]):
    segments = rows['segment_ids'][r]
    assert segments.max() % 2 == 0  # whole pairs only: chosen 2k-1 and rejected 2k in the same row
    for s in range(1, segments.max() + 1):
      mask = rows['loss_mask'][r][segments == s]
      assert 0 < mask.sum() < mask.size  # prompt targets masked out, completion targets in
  chat = next(p for p in split['train'] + split['validation'] if p.where.endswith(':13'))
  assert chat.prompt.tolist()[-len(tok.encode('<|assistant|>\n')):] == tok.encode('<|assistant|>\n')


def test_long_pairs_are_truncated_prompt_first_and_counted(tmp_path, tokenizer_file):
  long_prompt = ' '.join(['the quick brown fox'] * 10)
  c = preference_config(write(tmp_path / 'p.jsonl', [dict(prompt=long_prompt, chosen='jumps over', rejected='a b')] * 12),
                        tokenizer_file)
  prompt, chosen, rejected, cut = preference.fit(list(range(40)), [1, 2, 3], [4, 5], c.data.seq_len, 8)
  assert cut and prompt == list(range(32, 40)) and chosen == [1, 2, 3] and rejected == [4, 5]
  prompt, chosen, rejected, cut = preference.fit(list(range(40)), list(range(30)), [4, 5], c.data.seq_len, 8)
  assert prompt == list(range(32, 40)) and chosen == list(range(9)) and rejected == [4, 5]  # (34 - 16) // 2 = 9
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  split, stats = preference.read_pairs(c, tokenizer_lib.load(tokenizer_file))
  assert stats['truncated'] == 12
  assert all(p.positions <= c.data.seq_len for s in split.values() for p in s)


@pytest.mark.parametrize('line,message', [
    ('{"prompt": "a", "chosen": "b"}', 'missing field "rejected"'),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', 'field "rejected" must be a string'),
    ('not json', 'not valid JSON'),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}', '"chosen" must be one assistant message'),
])
def test_malformed_rows_are_one_line_naming_file_and_line(tmp_path, tokenizer_file, line, message):
  good = '{"prompt": "a b", "chosen": "c", "rejected": "d"}'
  path = write(tmp_path / 'p.jsonl', [good, good, line])
  c = preference_config(path, tokenizer_file)
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(preference.PreferenceDataError, match=f'^{path}:3: .*{message}'):
    preference.read_pairs(c, tokenizer_lib.load(tokenizer_file))
