"""DPO, IPO, robust DPO and SimPO (llm_jax.objectives.preference) against TRL on small random transformers models
converted with llm_jax.convert; the preference sources (llm_jax.data.preference: JSONL, Hugging Face datasets,
the stdlib pairs); training: a stopped and resumed run, config.dpo.precompute_ref (keyed, stored reference
log-probs, no reference in the state) and LoRA (the base is the reference, no second copy).

Parity: the same preference pairs give the same loss, rewards and gradient norm as TRL's losses on the HF model:
DPOTrainer._compute_loss (sigmoid, ipo, robust) and the experimental CPOTrainer's SimPO (cpo_loss on its
get_batch_logps, average log-probs, cpo_alpha = 0), float32 on CPU, within RTOL = 1e-5 relative (1e-6 absolute; measured: below 5e-7):
log-probs are sums over completions of float32 log-softmaxes computed in a different order.
"""

import glob
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
from llm_jax.objectives import preference as preference_objective  # noqa: E402

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


CASES = [('llama', 'sigmoid', 0.0), ('llama', 'ipo', 0.0), ('qwen2', 'robust', 0.2), ('qwen2', 'simpo', 0.1)]  # each loss once, each family twice


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


def test_long_pairs_are_truncated_per_sequence_prompt_first_and_counted(tmp_path, tokenizer_file, capsys):
  """Each sequence (prompt + one completion) gets dpo.max_length tokens, as TRL's max_length: the prompt keeps
  its end first (dpo.max_prompt_length), then the completions their beginning; the summary counts both."""
  fit = lambda prompt, chosen, rejected: preference.fit(prompt, chosen, rejected, 17, 8)
  assert fit(list(range(5)), [1] * 12, [2] * 3) == (list(range(5)), [1] * 12, [2] * 3, '')  # 17 tokens: whole
  assert fit(list(range(40)), [1, 2, 3], [4, 5]) == (list(range(32, 40)), [1, 2, 3], [4, 5], 'prompt')
  assert fit(list(range(40)), list(range(30)), [4, 5]) == (list(range(32, 40)), list(range(9)), [4, 5],
                                                           'prompt+completion')  # 17 - 8 = 9 each
  assert fit(list(range(6)), list(range(30)), [4]) == (list(range(6)), list(range(11)), [4], 'completion')
  long_prompt = ' '.join(['the quick brown fox'] * 10)
  records = ([dict(prompt=long_prompt, chosen='a b', rejected='c')] * 12
             + [dict(prompt='a b', chosen=' c', rejected=' d')] * 6
             + [dict(prompt='a b', chosen=long_prompt, rejected=' d')] * 6)
  c = preference_config(write(tmp_path / 'p.jsonl', records), tokenizer_file)
  assert preference.lengths(c) == (17, 8)  # data.seq_len // 2 + 1: two sequences fill a row of 32 positions
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  split, stats = preference.read_pairs(c, tokenizer_lib.load(tokenizer_file))
  assert (stats['truncated'], stats['truncated_prompt'], stats['truncated_completion']) == (18, 12, 6)
  pairs = [p for s in split.values() for p in s]
  assert all(p.prompt.size + max(p.chosen.size, p.rejected.size) <= 17 and p.positions <= 32 for p in pairs)
  capsys.readouterr()
  preference.prepare(c)
  assert capsys.readouterr().out == preference.summary(stats) + '\n'
  assert preference.summary(stats) == (
      f'preference pairs: {stats["train"]} train, {stats["validation"]} validation; 18 of 24 truncated to '
      f'dpo.max_length=17 tokens a sequence (12 with the prompt cut to its last dpo.max_prompt_length=8 tokens, 6 '
      f'with the completions cut)')
  from llm_jax import validation  # pylint: disable=g-import-not-at-top
  for field, value, message in [('max_length', 18, r'must be in \[0, 17\]'),
                                ('max_prompt_length', 17, r'must be in \[0, dpo.max_length\) = \[0, 17\)')]:
    bad = c.copy_and_resolve_references()
    bad.dpo[field] = value
    with pytest.raises(preference.ConfigError, match=rf'^config\.dpo\.{field}: {message}'):
      validation.validate(bad, 1)


@pytest.mark.parametrize('line,message', [
    ('{"prompt": "a", "chosen": "b"}', 'missing field "rejected"'),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', 'field "rejected" must be a string'),
    ('not json', 'not valid JSON'),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}', '"chosen" must start with an assistant message'),
    ('{"chosen": "same", "rejected": "same"}', '"chosen" and "rejected" are the same'),
    ('{"chosen": "x y", "rejected": [{"role": "assistant", "content": "c"}]}', 'both be texts or both lists'),
    ('{"chosen": "abc", "rejected": "xbc"}', 'no prompt'),
])
def test_malformed_rows_are_one_line_naming_file_and_line(tmp_path, tokenizer_file, line, message):
  good = '{"prompt": "a b", "chosen": "c", "rejected": "d"}'
  path = write(tmp_path / 'p.jsonl', [good, good, line])
  c = preference_config(path, tokenizer_file)
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(preference.PreferenceDataError, match=f'^{path}:3: .*{message}'):
    preference.read_pairs(c, tokenizer_lib.load(tokenizer_file))


def test_hf_datasets_plain_and_chat_with_given_or_held_out_splits(tmp_path, tokenizer_file):
  datasets = pytest.importorskip('datasets')
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load(tokenizer_file)
  plain = dict(prompt=['the quick brown', 'jumps over'] * 10, chosen=[' fox', ' the lazy dog'] * 10,
               rejected=[' dog', ' a b c'] * 10)
  datasets.Dataset.from_dict(plain).save_to_disk(str(tmp_path / 'plain'))  # one split: pairs held out by hash
  message = lambda role, text: [dict(role=role, content=text)]
  chat = lambda n: datasets.Dataset.from_dict(dict(prompt=[message('user', 'a b c')] * n,
                                                   chosen=[message('assistant', 'd e')] * n,
                                                   rejected=[message('assistant', 'g f')] * n))
  datasets.DatasetDict(train=chat(6), validation=chat(3)).save_to_disk(str(tmp_path / 'chat'))
  c = preference_config(tmp_path / 'unused', tokenizer_file, seq_len=64)
  c.data.update(source='preference_hf', hf_path=str(tmp_path / 'plain'), paths='')
  split, stats = preference.read_pairs(c, tok)
  assert stats['train'] + stats['validation'] == 20 and stats['validation'] > 0
  assert not {p.where for p in split['train']} & {p.where for p in split['validation']}
  first = next(p for s in split.values() for p in s if p.where == f'{tmp_path}/plain[train][0]')
  assert first.prompt.tolist() == tok.encode('the quick brown')
  assert first.chosen.tolist() == tok.encode(' fox') + [tok.eos_id]
  assert first.rejected.tolist() == tok.encode(' dog') + [tok.eos_id]

  c.data.hf_path = str(tmp_path / 'chat')
  split, stats = preference.read_pairs(c, tok)
  assert (stats['train'], stats['validation']) == (6, 3)  # the dataset's own splits
  assert split['validation'][0].where == f'{tmp_path}/chat[validation][0]'
  header = tok.encode('<|assistant|>\n')
  pair = split['train'][0]
  assert pair.prompt.tolist()[-len(header):] == header  # the prompt ends with the assistant header
  assert pair.chosen.tolist() != pair.rejected.tolist()
  rows = preference.pack(split['train'], c.data.seq_len, 0)
  assert (rows['loss_mask'] * (rows['segment_ids'] == 0)).sum() == 0

  bad = dict(plain, rejected=list(plain['rejected']))
  bad['rejected'][3] = '  '
  datasets.Dataset.from_dict(bad).save_to_disk(str(tmp_path / 'bad'))
  c.data.hf_path = str(tmp_path / 'bad')
  with pytest.raises(preference.PreferenceDataError, match=rf'^{tmp_path}/bad\[train\]\[3\]: empty "rejected"'):
    preference.read_pairs(c, tok)


# --- training: resume, precomputed reference, LoRA ------------------------------------------------------------------

WORDS = 'the quick brown fox jumps over lazy dog a b c d e f g'.split()


def varied_records(n=40, seed=0):
  rng = np.random.default_rng(seed)
  text = lambda lo, hi: ' '.join(rng.choice(WORDS, int(rng.integers(lo, hi))))
  return [dict(prompt=text(2, 5), chosen=' ' + text(1, 4), rejected=' ' + text(1, 4)) for _ in range(n)]


def training_config(tmp_path, tokenizer_file, **sections):
  c = preference_config(write(tmp_path / 'pairs.jsonl', varied_records()), tokenizer_file)
  c.model.update(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32, dtype='float32',
                 attention='xla')
  c.data.update(global_batch_size=4, validation_fraction=0.25)
  c.dpo.beta = 0.5
  c.train.update(steps=4, learning_rate=3e-3, warmup_steps=1, log_every=1)
  c.eval.update(every=4, steps=2)  # one eval, at the end (a run stopped earlier compiles none)
  c.checkpoint.update(every=0, keep=3)  # the interrupted run saves where it stops
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  for section, values in sections.items():
    c[section].update(values)
  return c


def rows_of(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r for r in rows if 'loss' in r}, {r['step']: r for r in rows if 'eval_loss' in r}


def run_interrupted(config, workdir, monkeypatch, resumed_config, at=2):
  """A run stopped after `at` steps (through the path SIGTERM takes), then resumed to the end with resumed_config."""
  calls = {'n': 0}

  def preempt(self, step):
    calls['n'] += 1
    return calls['n'] == at

  with monkeypatch.context() as m:
    m.setattr(train.Preemption, 'reached', preempt)
    assert train.train_and_evaluate(config, workdir, jax.devices()[:1])['preempted']
  assert checkpoint.latest_step(workdir) == at
  train.train_and_evaluate(resumed_config, workdir, jax.devices()[:1])


PAIR_KEYS = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies', 'grad_norm')
EVAL_KEYS = ('eval_loss', 'eval_rewards/chosen', 'eval_rewards/rejected', 'eval_rewards/margins',
             'eval_rewards/accuracies')
PRECOMPUTE_RTOL, PRECOMPUTE_ATOL = 1e-5, 1e-6  # float32; the pass packs the pairs into other rows than the batches
PRECOMPUTE_ULPS = 4  # rewards: beta times (policy - reference) log-prob sums; their float32 error is in ulps of the sums


def reward_atol(row, key, beta):
  """The absolute tolerance of a rewards/* entry. A reward is beta times a difference of two log-prob sums (and a
  margin the difference of two rewards), so the reference summed in other rows moves it by ulps of the sums (about
  42 here: 3.8e-6 an ulp), not by a fraction of the difference, which may be near zero."""
  prefix = 'eval_' if key.startswith('eval_') else ''
  largest = max(abs(row[f'{prefix}logps/chosen']), abs(row[f'{prefix}logps/rejected']))
  return max(PRECOMPUTE_ATOL, beta * PRECOMPUTE_ULPS * float(np.spacing(np.float32(largest))))


def test_a_stopped_run_resumed_with_a_precomputed_reference_gives_the_uninterrupted_metrics(
    tmp_path, tokenizer_file, monkeypatch, capsys):
  """A DPO run (reference: a frozen copy of the fresh initialisation) stopped at step 2 and resumed gives the
  uninterrupted run's rows. The resume turns config.dpo.precompute_ref on (the reference is never checkpointed, so
  the checkpoint is the same): it finds no stored log-probs and computes them from the starting point, not from
  the trained parameters, and its rows equal the per-step reference's within 1e-5 relative (1e-6 absolute; rewards
  within 4 float32 ulps of their log-prob sums, times beta: reward_atol)."""
  config = training_config(tmp_path, tokenizer_file)
  precomputed = config.copy_and_resolve_references()
  precomputed.dpo.precompute_ref = True
  trainer = train.Trainer(precomputed, str(tmp_path / 'unused'), jax.devices()[:1])
  assert trainer.objective.reference_kind() == 'precomputed' and not trainer.keeps_reference
  assert trainer.abstract_state().reference is None  # no reference copy in the state
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, straight, jax.devices()[:1])
  capsys.readouterr()
  run_interrupted(config, resumed, monkeypatch, precomputed)
  assert 'reference log-probs (config.dpo.precompute_ref): train computed, validation computed' in (
      capsys.readouterr().out)  # reused when valid: test_stored_reference_is_keyed_...
  stored = [np.load(path) for path in sorted(glob.glob(os.path.join(preference.reference_dir(config, resumed), '*')))]
  assert [s.shape[1] for s in stored] == [2, 2] and all((s < 0).all() for s in stored)  # train, validation
  (a, a_eval), (b, b_eval) = rows_of(straight), rows_of(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4] and sorted(a_eval) == sorted(b_eval) == [4]
  np.testing.assert_allclose(a[1]['loss'], np.log(2), rtol=1e-6)  # step 0: the policy is the reference
  assert a[1]['rewards/margins'] == 0 and a[4]['rewards/margins'] != 0  # then the policy moves
  for key in PAIR_KEYS:
    assert a[2][key] == b[2][key], key  # before the stop: the same run
  worst = 0.0
  for step, key in [(s, k) for s in (3, 4) for k in PAIR_KEYS] + [(4, k) for k in EVAL_KEYS]:
    row_a, row_b = (a_eval[step], b_eval[step]) if key.startswith('eval_') else (a[step], b[step])
    x, y = row_a[key], row_b[key]
    worst = max(worst, abs(x - y) / max(abs(x), 1e-6))
    atol = reward_atol(row_a, key, config.dpo.beta) if 'rewards/' in key and 'accuracies' not in key else (
        PRECOMPUTE_ATOL)
    np.testing.assert_allclose(y, x, rtol=PRECOMPUTE_RTOL, atol=atol, err_msg=f'step {step} {key}')
  print(f'resumed with precompute_ref vs uninterrupted: largest relative difference {worst:.1e}')


def test_stored_reference_is_keyed_by_reference_and_pairs_and_written_atomically(tmp_path, tokenizer_file):
  config = training_config(tmp_path, tokenizer_file, dpo=dict(precompute_ref=True))
  workdir = str(tmp_path / 'w')
  calls = []

  def forward(rows):  # a stand-in reference: the log-prob of a target is -(its token id + position) / 100
    calls.append(rows['inputs'].shape)
    return -(rows['targets'] + rows['positions']) / 100.0

  ref = dict(init_from='/runs/a', step=10)
  stored = lambda: sorted(os.listdir(preference.reference_dir(config, workdir)))
  assert preference.store_reference(config, workdir, ref, forward) == dict(train='computed', validation='computed')
  assert {shape for shape in calls} == {(4, config.data.seq_len)}  # global batches, the last padded
  first = stored()
  assert [name.split('-')[0] for name in first] == ['train', 'validation'] and all(n.endswith('.npy') for n in first)
  sums = np.load(os.path.join(preference.reference_dir(config, workdir), first[0]))
  assert sums.shape == (len(preference.open_split(config, 'train', workdir).examples), 2)  # two numbers a pair
  calls.clear()
  assert preference.store_reference(config, workdir, ref, forward) == dict(train='reused', validation='reused')
  assert not calls
  assert preference.store_reference(config, workdir, dict(ref, step=20), forward)['train'] == 'computed'
  assert len(stored()) == 2 and not set(stored()) & set(first)  # the other reference's files are gone
  split = preference.open_split(config, 'train', workdir, with_reference=True)
  assert isinstance(split.reference, np.memmap)  # read per batch, never loaded whole
  for step in range(3):  # each batch's sums are the stand-in's log-probs summed over its pairs' completions
    batch = split.batch(step)
    expected = preference_objective.pair_sums(-(batch['targets'] + batch['positions']) / 100.0 * batch['loss_mask'],
                                              batch['segment_ids'])
    np.testing.assert_allclose(batch['ref_chosen'], expected[0], rtol=1e-6)
    np.testing.assert_allclose(batch['ref_rejected'], expected[1], rtol=1e-6)
    assert (batch['ref_chosen'] < 0).sum() == (expected[0] < 0).sum() > 0
  write(tmp_path / 'pairs.jsonl', varied_records(seed=1))  # other pairs: never read back silently
  with pytest.raises(preference.PreferenceDataError, match=r'train-\*.npy: computed for other pairs'):
    preference.open_split(config, 'train', workdir, with_reference=True)
  assert preference.store_reference(config, workdir, dict(ref, step=20), forward)['train'] == 'computed'


def test_dpo_with_lora_starts_at_ln2_with_the_base_as_reference_and_no_copy(tmp_path, tokenizer_file):
  """The reference of a LoRA run is the base with the adapters off, read from the trained parameters: the state
  holds one copy of the base weights (no reference, optimizer moments of the adapters only), the loss at the start
  (B = 0) is ln 2, and once the adapters move the reference is still the base."""
  from llm_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  config = training_config(tmp_path, tokenizer_file, lora=dict(rank=2))
  trainer = train.Trainer(config, str(tmp_path / 'w'), jax.devices()[:1])
  assert trainer.objective.reference_kind() == 'lora_base' and not trainer.keeps_reference
  state = trainer.abstract_state()  # shapes only
  assert state.reference is None
  base, adapters = lora_lib.split(state.params)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert size(base) == size(train.abstract_params(training_config(tmp_path, tokenizer_file)))
  assert size(state) == size(base) + size(adapters) + size(state.opt_state) + 1  # + step: no second base
  assert size(state.opt_state) < 3 * size(adapters) + 8  # moments of the adapters only

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = jax.jit(lambda key: nn.unbox(train.init_params_fn(config, trainer.model)(key)))(jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in next(trainer.iterator('train', 0)).items()}
  objective, rank0 = trainer.objective, train.create_model(training_config(tmp_path, tokenizer_file))
  logprobs = lambda model, p: objectives.base.target_logprobs(
      model.apply({'params': p}, batch['inputs'], batch['segment_ids'], batch['positions']), batch['targets'])

  @jax.jit
  def both(p):  # the objective's metrics, and the same sums against the base model (rank 0 on the base weights)
    base_sums = preference_objective.pair_sums(logprobs(rank0, lora_lib.split(p)[0]) * batch['loss_mask'],
                                               batch['segment_ids'])
    independent = objective.pair_sums_of(logprobs(trainer.model, p), base_sums, batch)
    return objective.loss(trainer.model, p, batch).metrics, independent

  count = float(objective.count(batch))
  start, _ = both(params)
  np.testing.assert_allclose(float(start['loss']) / count, np.log(2), rtol=1e-6)  # B = 0: the policy is the base
  assert float(start['rewards/margins']) == 0
  base_params, adapter_params = lora_lib.split(params)
  after, expected = both(lora_lib.combine(base_params, jax.tree.map(lambda x: x + 0.3, adapter_params)))
  assert float(after['rewards/margins']) != 0  # the adapters moved: the reference stayed the base
  for key in ('loss', 'rewards/chosen', 'rewards/rejected'):
    np.testing.assert_allclose(float(after[key]), float(expected[key]), rtol=1e-5, atol=1e-6, err_msg=key)


def test_stdlib_pairs_differ_by_two_neighbouring_words_of_the_first_line_that_has_them():
  from llm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.get_config()
  c.data.max_docs = 50
  records = list(preference._stdlib_records(c))  # pylint: disable=protected-access
  assert len(records) == 50 and len({where for _, where, _ in records}) == 50
  for record, where, _ in records:
    assert record['prompt'].count('\n') == preference.STDLIB_PROMPT_LINES
    chosen, rejected = record['chosen'].split('\n'), record['rejected'].split('\n')
    assert len(chosen) == len(rejected) == preference.STDLIB_COMPLETION_LINES
    changed = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
    assert len(changed) == 1, where  # one line, the first that has two different neighbouring words
    a, b = chosen[changed[0]].split(' '), rejected[changed[0]].split(' ')
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert len(diff) == 2 and diff[1] == diff[0] + 1 and diff[1] <= 4, where
    assert (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]]) and sorted(a) == sorted(b)


# --- record formats: TRL's maybe_extract_prompt, column mapping ------------------------------------------------------

def _m(role, text):
  return dict(role=role, content=text)


FORMAT_RECORDS = [
    # implicit prompt, conversations (Anthropic HH / trl-lib/ultrafeedback_binarized as messages)
    dict(chosen=[_m('user', 'a b c'), _m('assistant', 'd e')], rejected=[_m('user', 'a b c'), _m('assistant', 'g f')]),
    # implicit prompt, multi-turn: the earlier assistant turn belongs to the prompt
    dict(chosen=[_m('user', 'a'), _m('assistant', 'b c'), _m('user', 'd'), _m('assistant', 'e f')],
         rejected=[_m('user', 'a'), _m('assistant', 'b c'), _m('user', 'd'), _m('assistant', 'g')]),
    # implicit prompt, plain text (Anthropic HH as text): the space before the split goes to the completions
    dict(chosen='\n\nHuman: the quick brown fox\n\nAssistant: jumps over', rejected='\n\nHuman: the quick brown '
         'fox\n\nAssistant: a b c'),
    dict(chosen='the quick brown fox jumps', rejected='the quick brown dog'),
    # one completion a prefix of the other: TRL's loop ends one item short
    dict(chosen='the quick brown fox', rejected='the quick brown fox jumps'),
    # a text prompt beside whole conversations (HuggingFaceH4/ultrafeedback_binarized): taken from them
    dict(prompt='a b c', chosen=[_m('user', 'a b c'), _m('assistant', 'd e')],
         rejected=[_m('user', 'a b c'), _m('assistant', 'g f')]),
    # explicit prompts of the completions' kind: kept
    dict(prompt='the quick', chosen=' brown', rejected=' lazy'),
    dict(prompt=[_m('user', 'a b')], chosen=[_m('assistant', 'c')], rejected=[_m('assistant', 'd')]),
]


def test_records_parse_as_trls_maybe_extract_prompt(tmp_path, tokenizer_file):
  """Implicit prompts (text and conversations), text prompts beside conversations and explicit prompts give the
  prompt, chosen and rejected of TRL's maybe_extract_prompt (trl is the reference), and then tokens: the prompt's
  tokens then each completion's, the completion of a multi-turn chat being its last assistant turn."""
  from trl.data_utils import maybe_extract_prompt  # pylint: disable=g-import-not-at-top
  for i, record in enumerate(FORMAT_RECORDS):
    expected = maybe_extract_prompt(dict(record))
    assert preference.normalize(dict(record), f'record {i}') == {k: expected[k] for k in preference.FIELDS}, i
  c = preference_config(write(tmp_path / 'p.jsonl', FORMAT_RECORDS * 3), tokenizer_file, seq_len=128)
  from llm_jax.data import sft, tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load(tokenizer_file)
  split, stats = preference.read_pairs(c, tok)
  assert stats['records'] == 3 * len(FORMAT_RECORDS) and stats['truncated'] == 0
  by_line = {int(p.where.rsplit(':', 1)[1]): p for s in split.values() for p in s}
  multi = by_line[2]  # the multi-turn chat: rendered whole, the completion is the last assistant turn and its end
  tokens, loss = sft.render(tok, FORMAT_RECORDS[1]['chosen'])
  spans = [i for i, counts in enumerate(loss) if counts and not (i and loss[i - 1])]  # assistant spans' starts
  end = len(loss) - loss[::-1].index(True)
  assert len(spans) == 2 and sum(loss[:spans[1]]) > 0  # the prompt holds an assistant turn too
  assert multi.prompt.tolist() == tokens[:spans[1]] and multi.chosen.tolist() == tokens[spans[1]:end]
  text = by_line[3]  # plain text: prompt up to the split, completions from the space before it, EOS after
  assert text.prompt.tolist() == tok.encode('\n\nHuman: the quick brown fox\n\nAssistant:')
  assert text.chosen.tolist() == tok.encode(' jumps over') + [tok.eos_id]
  with_prompt = by_line[6]  # the text prompt beside conversations: the user turn of the conversations
  assert with_prompt.prompt.tolist() == by_line[1].prompt.tolist()
  # a text prompt beside assistant-only conversations (TRL would keep an empty prompt): the user message
  lone = dict(prompt='a b c', chosen=[_m('assistant', 'd e')], rejected=[_m('assistant', 'g f')])
  assert preference.normalize(lone, 'x') == dict(prompt=[_m('user', 'a b c')], chosen=lone['chosen'],
                                                 rejected=lone['rejected'])


def test_few_records_hold_out_their_tail_when_hashing_leaves_a_split_empty():
  """The split is by a hash of each record's file:line, so for a handful of records it depends on the directory's
  name; when the hash gives no validation (or no train) pair, the last validation_fraction of the records is the
  validation split instead, and the prepare line says so. Given splits, or a fraction of 0, are kept as they are."""
  from llm_jax.data import sources  # pylint: disable=g-import-not-at-top
  keys = [f'/d/p.jsonl:{i}' for i in range(200)]
  train_keys = [k for k in keys if sources.role_of(k, 0.3) == 'train'][:10]
  mixed = train_keys[:8] + [k for k in keys if sources.role_of(k, 0.3) == 'validation'][:2]
  split_pairs = preference._split  # pylint: disable=protected-access
  rows = [(i, key, '') for i, key in enumerate(train_keys)]  # the index stands in for the pair
  split, tail = split_pairs(rows, 0.3)
  assert tail and split == {'train': list(range(7)), 'validation': [7, 8, 9]}
  split, tail = split_pairs([(i, key, '') for i, key in enumerate(mixed)], 0.3)
  assert not tail and split == {'train': list(range(8)), 'validation': [8, 9]}
  assert split_pairs(rows[:2], 0.01)[0] == {'train': [0], 'validation': [1]}
  for given, fraction in (('train', 0.3), ('', 0.0)):
    split, tail = split_pairs([(i, k, given) for i, k in enumerate(train_keys)], fraction)
    assert not tail and split['validation'] == []
  stats = dict(train=7, validation=3, held_out_tail=True, truncated=0, records=10, max_length=8, max_prompt_length=4,
               truncated_prompt=0, truncated_completion=0)
  assert '3 validation (the last records: hashing held out none)' in preference.summary(stats)


def test_column_mapping_for_hf_datasets(tmp_path, tokenizer_file):
  """data.preference_columns maps a dataset's own column names (here HH-style implicit prompts under other
  names); a missing column names the column and the row, a bad spec is a ConfigError naming the field."""
  datasets = pytest.importorskip('datasets')
  from llm_jax import validation  # pylint: disable=g-import-not-at-top
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load(tokenizer_file)
  rows = dict(good=['the quick brown fox'] * 10, bad=['the quick brown dog'] * 10, prompt=['ignored'] * 10)
  datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / 'hh'))
  c = preference_config(tmp_path / 'unused', tokenizer_file, seq_len=64)
  c.data.update(source='preference_hf', hf_path=str(tmp_path / 'hh'), paths='',
                preference_columns='chosen=good, rejected=bad')
  validation.validate(c, 1)
  split, stats = preference.read_pairs(c, tok)
  assert stats['records'] == 10
  pair = split['train'][0]  # the prompt column is a text like the completions: TRL keeps it (maybe_extract_prompt)
  assert pair.prompt.tolist() == tok.encode('ignored')
  assert pair.chosen.tolist() == tok.encode('the quick brown fox') + [tok.eos_id]
  c.data.preference_columns = 'chosen=good,rejected=bad,prompt=question'
  with pytest.raises(preference.PreferenceDataError, match=r'\[train\]\[0\]: no column "question" \(data.preference_'
                     r'columns maps prompt=question\); the record has good, bad, prompt'):
    preference.read_pairs(c, tok)
  for spec in ('chosen:good', 'answer=good', 'chosen=good,chosen=bad'):
    c.data.preference_columns = spec
    with pytest.raises(preference.ConfigError, match=r'^config\.data\.preference_columns: '):
      validation.validate(c, 1)


# --- cDPO, the reference's dtype -------------------------------------------------------------------------------------

def test_cdpo_is_the_label_smoothed_sigmoid_of_trl_and_sigmoid_takes_no_smoothing(models):
  """cDPO with share e of flipped labels is (1-e) times TRL's sigmoid loss plus e times TRL's sigmoid loss on the
  pairs with chosen and rejected swapped (TRL's sigmoid itself no longer reads label_smoothing, trl 1.16);
  loss_type=sigmoid with label_smoothing > 0 is refused, naming the field."""
  policy, reference, config, params, ref_params = models('llama')
  config = config.copy_and_resolve_references()
  config.model.objective = 'dpo'
  config.data.source = 'preference_jsonl'
  config.dpo.update(beta=0.5, loss_type='cdpo', label_smoothing=0.2)
  pair_list = pairs()
  swapped = [preference.Pair(p.prompt, p.rejected, p.chosen, p.where, '') for p in pair_list]
  straight = trl_dpo(policy, reference, trl_batch(pair_list), 'sigmoid', 0.5, 0.0)
  flipped = trl_dpo(policy, reference, trl_batch(swapped), 'sigmoid', 0.5, 0.0)
  loss, metrics, _, _ = ours(config, params, ref_params, pair_list)
  expected = 0.8 * straight[0] + 0.2 * flipped[0]
  print(f'cdpo: loss {loss:.6f}, TRL (1-e) sigmoid + e sigmoid(swapped) {expected:.6f}')
  np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics['rewards/margins'], straight[1]['rewards/margins'], rtol=RTOL, atol=ATOL)
  from llm_jax import validation  # pylint: disable=g-import-not-at-top
  config.dpo.loss_type = 'sigmoid'
  with pytest.raises(preference.ConfigError, match=r'^config\.dpo\.label_smoothing: 0.2 with loss_type=sigmoid: '
                     r'.*loss_type=cdpo'):
    validation.validate(config, 1)


def test_the_reference_copy_is_held_in_the_compute_dtype_and_gives_the_same_forward(tmp_path, tokenizer_file):
  """dpo.reference_dtype=compute (default): the frozen copy in the train state is bfloat16 where the model computes
  in bfloat16 (every matrix, here with MoE experts, a shared expert, q/k norms and scanned layers) and float32
  where it computes in float32 whatever the compute dtype (norm scales, router, shared-expert gate), so its logits
  equal those of the float32 parameters exactly; reference_dtype=param keeps float32."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from llm_jax import optim  # pylint: disable=g-import-not-at-top
  config = training_config(tmp_path, tokenizer_file)
  config.model.update(dtype='bfloat16', ffn='moe', num_experts=4, experts_per_token=2, expert_ffn_dim=16,
                      shared_expert_ffn_dim=16, qk_norm=True, scan_layers=True, num_layers=2)
  model = train.create_model(config)
  held = lambda c: jax.eval_shape(train.state_init_fn(c, model, optim.make_optimizer(c.train)),
                                  jax.random.key(0)).reference
  dtypes = {jax.tree_util.keystr(path, simple=True, separator='/'): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(held(config)))}
  kept = {name for name, dtype in dtypes.items() if dtype == jnp.float32}
  assert all(name.endswith('/scale') or '/router/' in name or '/shared_gate/' in name for name in kept)
  assert {'q_norm', 'final_norm', 'router', 'shared_gate'} <= {part for name in kept for part in name.split('/')}
  assert {dtypes[name] for name in dtypes.keys() - kept} == {jnp.dtype(jnp.bfloat16)}
  rng = np.random.default_rng(0)  # random float32 parameters of the model's shapes (no compiled initialiser)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), jnp.float32),
                        nn.unbox(train.abstract_params(config)))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 2, config.model.vocab_size)
  forward = jax.jit(lambda p: model.apply({'params': p}, tokens, jnp.ones_like(tokens),
                                          jnp.broadcast_to(jnp.arange(16), tokens.shape)))
  reference = objectives.make(config).reference_params(params)
  np.testing.assert_array_equal(np.asarray(forward(reference)), np.asarray(forward(params)))
  config.dpo.reference_dtype = 'param'
  assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(held(config)))} == {jnp.dtype(jnp.float32)}
