"""GRPO (llm_jax/objectives/grpo.py, llm_jax/rollout.py, llm_jax/rewards.py): the loss of every variant against
TRL's own GRPOTrainer._compute_loss (on shared logits, and end to end on a random transformers model exported to
ours), the rewards, and the loop (rollouts through the engine, exact resume)."""

import collections
import contextlib
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from llm_jax import objectives
from llm_jax.objectives import grpo as grpo_lib
from llm_jax.runtime import create_model, init_params_fn


# --- the loss against TRL -----------------------------------------------------------------------------------------

LOSS_FIELDS = ('sapo_temperature_pos', 'sapo_temperature_neg', 'vespo_k_pos', 'vespo_lambda_pos', 'vespo_k_neg',
               'vespo_lambda_neg')


def trl_args(config_grpo):
  """The GRPOConfig fields TRL's _compute_loss reads from self.args (config.grpo's, by TRL's names)."""
  return types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1,
                               **{k: config_grpo[k] for k in LOSS_FIELDS})


def loss_cases(config, betas):
  """A copy of config for every loss type at every importance_sampling_level it is defined at (luspo: sequence,
  vespo: token) and every beta; cispo caps the ratio at 1.2 (its epsilon_high), the others clip at [0.8, 1.28];
  the sapo and vespo fields off their defaults."""
  cases = []
  for loss_type in grpo_lib.LOSS_TYPES:
    for level in grpo_lib.IMPORTANCE_LEVELS:
      if grpo_lib.REQUIRED_LEVEL.get(loss_type, level) != level:
        continue
      for beta in betas:
        c = config.copy_and_resolve_references()
        c.grpo.update(loss_type=loss_type, importance_sampling_level=level, beta=beta, temperature=0.7,
                      epsilon=0.2, epsilon_high=1.2 if loss_type == 'cispo' else 0.28, sapo_temperature_pos=0.9,
                      sapo_temperature_neg=1.1, vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5,
                      vespo_lambda_neg=1.5)
        cases.append(c)
  return cases


def trl_self(config_grpo, forward=None):
  """A stand-in for a GRPOTrainer's `self` under config_grpo (one process, no accumulation, no vLLM, no entropy
  bonus or masks): the attributes _compute_loss reads, with `forward` as its _get_per_token_logps_and_entropies
  (None: TRL's own, on a model that has its fused LM head)."""
  from trl.trainer import grpo_trainer  # pylint: disable=g-import-not-at-top
  low, high = grpo_lib.epsilons(config_grpo)
  accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                      reduce=lambda x, reduction='sum': x, autocast=contextlib.nullcontext,
                                      is_main_process=True)
  fake = types.SimpleNamespace(
      get_gamma_weights=grpo_trainer.GRPOTrainer.get_gamma_weights, _get_per_token_logps_and_entropies=forward,
      top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      importance_sampling_level=config_grpo.importance_sampling_level, beta=config_grpo.beta,
      args=trl_args(config_grpo), loss_type=config_grpo.loss_type, epsilon_low=low, epsilon_high=high,
      use_vllm=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
      max_completion_length=config_grpo.max_completion_tokens, accelerator=accelerator,
      _entropy_bonus_enabled=False, aux_loss_enabled=False,
      _metrics={'train': collections.defaultdict(list), 'eval': collections.defaultdict(list)})
  if forward is None:
    own = grpo_trainer.GRPOTrainer._get_per_token_logps_and_entropies  # pylint: disable=protected-access
    fake._get_per_token_logps_and_entropies = functools.partial(own, fake)  # pylint: disable=protected-access
  return fake


def _trl_loss(config_grpo, logits, ref_logits, batch):
  """TRL 1.16's GRPOTrainer._compute_loss itself, on a stand-in `self` whose forward returns the log-probs and
  entropies of the given logits (float64 torch), one process, no accumulation. Returns (loss, logged metrics,
  gradient of the loss with respect to the logits)."""
  import torch  # pylint: disable=g-import-not-at-top
  from trl.trainer import grpo_trainer  # pylint: disable=g-import-not-at-top
  from trl.trainer.utils import entropy_from_logits  # pylint: disable=g-import-not-at-top

  t = lambda x: torch.tensor(np.asarray(x, np.float64))
  logits_t = t(logits).requires_grad_(True)
  targets = torch.tensor(np.asarray(batch['targets'], np.int64))
  mask = t(batch['loss_mask'])

  def logps_of(lg):
    scaled = lg / config_grpo.temperature
    return torch.gather(torch.log_softmax(scaled, -1), -1, targets[..., None])[..., 0], scaled

  def forward(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, compute_aux_loss=False, **kw):
    logps, scaled = logps_of(logits_t)
    return logps, entropy_from_logits(scaled), None

  fake = trl_self(config_grpo, forward)
  rows, length = mask.shape
  inputs = dict(prompt_ids=torch.zeros((rows, 0), dtype=torch.long), prompt_mask=torch.zeros((rows, 0)),
                completion_ids=targets, completion_mask=mask, advantages=t(batch['advantages']),
                old_per_token_logps=t(batch['old_logps']), num_items_in_batch=mask.sum())
  if config_grpo.beta:
    inputs['ref_per_token_logps'] = logps_of(t(ref_logits))[0]
  loss = grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)  # pylint: disable=protected-access
  loss.backward()
  logged = {k: v[0] for k, v in fake._metrics['train'].items()}  # pylint: disable=protected-access
  return float(loss.detach()), logged, logits_t.grad.numpy()


def _rollout_like_batch(rng, rows=6, length=12, vocab=64):
  """Rows of a prompt then a completion (completion targets in the loss), one row's completion masked out (a
  truncated one), one row of padding past its end; advantages of both signs; old log-probs off by up to 0.4."""
  inputs = rng.integers(3, vocab, (rows, length))
  targets = np.roll(inputs, -1, axis=1)
  prompt = rng.integers(2, 5, rows)
  ends = rng.integers(length - 3, length + 1, rows)
  position = np.arange(length)[None]
  mask = ((position >= prompt[:, None] - 1) & (position < ends[:, None] - 1)).astype(np.float32)
  mask[2] = 0.0  # a truncated completion under mask_truncated_completions
  segment_ids = (position < ends[:, None]).astype(np.int32)
  return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32), segment_ids=segment_ids,
              positions=np.broadcast_to(position, (rows, length)).astype(np.int32), loss_mask=mask,
              advantages=rng.normal(size=rows).astype(np.float32))


@pytest.fixture(scope='module')
def tiny_policy():
  config = tiny_config(model=dict(objective='grpo'), grpo=dict(group_size=2, prompts_per_rollout=3,
                                                                max_completion_tokens=8),
                       data=dict(global_batch_size=6))
  model = create_model(config)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  init = jax.jit(lambda key: nn.unbox(init_params_fn(config, model)(key)))
  return config, model, init(jax.random.key(0)), init(jax.random.key(1))


def test_loss_gradient_and_metrics_equal_trl_for_every_variant(tiny_policy):
  """For every loss_type, at token and sequence (GSPO) level, with and without beta: our loss, its gradient (with
  respect to the logits; the gradient of the parameters is the same chain) and the logged kl / entropy / clip
  fractions equal TRL's _compute_loss on the same logits, old log-probs, reference log-probs and advantages.
  Tolerance 1e-5 (our float32 against TRL in float64). The objective's loss on the parameters (model forward,
  reference forward) is checked against the same numbers once per beta."""
  config, model, params, reference = tiny_policy
  rng = np.random.default_rng(0)
  batch = _rollout_like_batch(rng)
  apply = jax.jit(lambda p: model.apply({'params': p}, batch['inputs'], batch['segment_ids'], batch['positions']))
  logits, ref_logits = np.asarray(apply(params)), np.asarray(apply(reference))
  scaled = jax.nn.log_softmax(logits.astype(np.float64) / 0.7, -1)
  logps = np.take_along_axis(np.asarray(scaled), batch['targets'][..., None], -1)[..., 0]
  batch['old_logps'] = (logps + rng.uniform(-0.4, 0.4, logps.shape)).astype(np.float32)
  ref_scaled = jax.nn.log_softmax(ref_logits.astype(np.float64) / 0.7, -1)
  ref_logps_all = np.take_along_axis(np.asarray(ref_scaled), batch['targets'][..., None], -1)[..., 0]
  cases = loss_cases(config, (0.0, 0.05))

  @jax.jit
  def ours_of(lg):  # every case in one compiled function: (sums, gradient of the loss by the logits) each
    out = []
    for c in cases:
      prepared = objectives.make(c).prepare({k: jnp.asarray(v) for k, v in batch.items()}, 0)
      ref_logps = jnp.asarray(ref_logps_all) if c.grpo.beta else None
      sums = lambda x: grpo_lib.sums_of(c.grpo, x, prepared, ref_logps)  # pylint: disable=cell-var-from-loop
      out.append((sums(lg), jax.grad(lambda x: sums(x)['loss'])(lg)))  # pylint: disable=cell-var-from-loop
    return out

  for c, (sums, grad) in zip(cases, ours_of(jnp.asarray(logits))):
    ours = {k: float(v) for k, v in sums.items()}
    g = c.grpo
    loss, logged, trl_grad = _trl_loss(g, logits, ref_logits, batch)
    where = f'{g.loss_type} {g.importance_sampling_level} beta={g.beta}'
    assert ours['loss'] == pytest.approx(loss, abs=1e-5, rel=1e-5), where
    np.testing.assert_allclose(np.asarray(grad), trl_grad, atol=1e-6, rtol=1e-5, err_msg=where)
    assert np.linalg.norm(trl_grad) > 1e-3, where  # the comparison compares something
    assert ours['entropy'] == pytest.approx(logged['entropy'], rel=1e-5), where
    assert set(logged) - {'clip_ratio/low_min', 'clip_ratio/high_max'} == set(grpo_lib.METRICS[g.loss_type]) - (
        set() if g.beta else {'kl'}), where  # what TRL logs is what we log (its min/max over processes aside)
    for name in grpo_lib.METRICS[g.loss_type][2:]:
      assert ours[name] == pytest.approx(logged[name], abs=1e-6), (where, name)
    if g.beta:
      assert ours['kl'] == pytest.approx(logged['kl'], rel=1e-5, abs=1e-7), where
      assert logged['kl'] > 0, where
    if g.importance_sampling_level == 'token':  # the old log-probs are off by up to 0.4: ratios leave [0.8, 1.28]
      assert logged.get('clip_ratio/region_mean', logged.get('cispo_clip_ratio', 1)) > 0, where
    if g.loss_type == 'vespo':  # the weights are neither all 0 nor all 1
      assert 0.05 < logged['vespo/phi_seq_mean'] < 0.95, where
    if g.loss_type == 'grpo' and g.importance_sampling_level == 'sequence':
      # the objective's own path on the parameters: policy forward, reference forward, the step's weights
      objective = objectives.make(c)
      prepared = objective.prepare({k: jnp.asarray(v) for k, v in batch.items()}, 0)
      out = jax.jit(lambda p, b, r: objective.loss(model, p, b, r).metrics)(  # pylint: disable=cell-var-from-loop
          params, prepared, reference if g.beta else None)
      assert float(out['loss']) == pytest.approx(loss, abs=1e-5, rel=1e-5), where
      assert float(out['kl']) == pytest.approx(ours['kl'], rel=1e-5, abs=1e-7), where


HF_VOCAB = 96


def _hf_llama(seed):
  """A small random transformers LlamaForCausalLM (2 layers, hidden 32), float32."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=None,
      eos_token_id=None, pad_token_id=None))


def _exported(model, root):
  """The HF model saved and imported into an llm_jax workdir by our converter: (config, params)."""
  from llm_jax import checkpoint, convert, train  # pylint: disable=g-import-not-at-top
  model.save_pretrained(os.path.join(root, 'hf'))
  config = convert.from_hf(os.path.join(root, 'hf'), os.path.join(root, 'work'), dtype='float32')
  params, _ = checkpoint.load_params(os.path.join(root, 'work'), train.abstract_params(config))
  return config, params


def test_every_loss_type_on_an_exported_transformers_model_equals_trl(tmp_path):
  """Issue 30's parity, end to end: a random transformers Llama (policy) and another (reference) imported with our
  converter; the same completions (2 prompts x 3, one truncated and masked), advantages, old log-probs (the
  policy's, off by up to 0.4) and, with beta, reference log-probs. For every loss type at every level it is defined
  at (token and GSPO's sequence), beta 0 and 0.04: TRL's GRPOTrainer._compute_loss on the torch model (its own
  fused LM head at temperature 0.7 and _get_per_token_logps_and_entropies, float32) against our batch (the rollout
  stage's rows), our model and our loss, float32 both.

  Tolerances: the loss rtol 1e-5 or atol 1e-6 (it sums terms of size ~1 that cancel down to ~1e-3: float32 rounding
  is absolute there), the gradient norm over all parameters, entropy and kl rtol 1e-5, the logged clip shares and
  vespo's phi mean 1e-6 (the same flags). Measured (loaded CPU): the loss uses at most 0.19 of its tolerance (2.9e-6
  on a loss of 2.3, 1.9e-7 on one of 2.5e-3), grad norm 5.6e-7 and kl 1.8e-7 relative.

  Our gradient is the chain rule through one compiled pullback of the model (not a compile per case); the
  objective's own loss and gradient on the parameters (policy and reference forwards) are checked once against the
  same numbers."""
  import optax  # pylint: disable=g-import-not-at-top
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from trl.trainer import grpo_trainer  # pylint: disable=g-import-not-at-top
  from trl.trainer.utils import add_fused_lm_head  # pylint: disable=g-import-not-at-top
  from llm_jax import rollout  # pylint: disable=g-import-not-at-top
  from llm_jax.data.prompts import Prompt  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  policy, reference = _hf_llama(0), _hf_llama(1)  # a policy that has moved away from its reference
  config, params = _exported(policy, str(tmp_path / 'policy'))
  _, ref_params = _exported(reference, str(tmp_path / 'reference'))
  temperature, prompt_len, completion_len, group = 0.7, 4, 8, 3
  for hf in (policy, reference):
    add_fused_lm_head(hf, temperature=temperature, outputs=('log_probs', 'entropy'))  # as GRPOTrainer's __init__
  config.model.objective = 'grpo'
  config.data.update(source='prompts_jsonl', seq_len=16, global_batch_size=2 * group)
  config.grpo.update(group_size=group, prompts_per_rollout=2, max_completion_tokens=completion_len,
                     mask_truncated_completions=True)

  # the completions (equal prompt lengths: TRL left-pads prompts and its model does not shift positions for pads)
  rng = np.random.default_rng(0)
  lengths = [[5, 8, 3], [8, 6, 7]]  # the second group's 8 is cut at max_completion_tokens (truncated)
  groups = [dict(record=Prompt(tuple(rng.integers(2, HF_VOCAB, prompt_len).tolist()), f'p{i}', {}, f'f:{i}'),
                 completions=[(rng.integers(2, HF_VOCAB, n).tolist(), i == 1 and n == completion_len)
                              for n in lengths[i]]) for i in range(2)]
  rewards = rng.normal(size=2 * group)
  advantages, _ = rollout.advantages_of(rewards, group, 'group')
  stage = object.__new__(rollout.RolloutStage)
  stage.g, stage.rows, stage.seq_len, stage.pad_id = config.grpo, 2 * group, config.data.seq_len, 0
  batch = stage._rows(groups, advantages)  # pylint: disable=protected-access  (the rollout stage's own rows)

  # TRL's inputs: prompt ids, right-padded completion ids, the completion mask zeroed on the truncated completion
  completion_ids = np.zeros((2 * group, completion_len), np.int64)
  completion_mask = np.zeros((2 * group, completion_len), np.float32)
  for i, (ids, truncated) in enumerate(c for g in groups for c in g['completions']):
    completion_ids[i, :len(ids)] = ids
    completion_mask[i, :len(ids)] = 0.0 if truncated else 1.0
  prompt_ids = torch.tensor([list(g['record'].ids) for g in groups for _ in range(group)])
  inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids),
                completion_ids=torch.tensor(completion_ids), completion_mask=torch.tensor(completion_mask),
                advantages=torch.tensor(advantages, dtype=torch.float32),
                num_items_in_batch=torch.tensor(completion_mask.sum()))
  attention = torch.cat([inputs['prompt_mask'], (torch.tensor(completion_ids) > 0).long()], 1)
  per_token = trl_self(config.grpo)._get_per_token_logps_and_entropies  # pylint: disable=protected-access
  with torch.no_grad():
    current, _, _ = per_token(policy, torch.cat([prompt_ids, inputs['completion_ids']], 1), attention, completion_len)
    ref_logps, _, _ = per_token(reference, torch.cat([prompt_ids, inputs['completion_ids']], 1), attention,
                                completion_len)
  old = (current.numpy() + rng.uniform(-0.4, 0.4, current.shape)).astype(np.float32)
  inputs['old_per_token_logps'] = torch.tensor(old)
  batch['old_logps'] = np.zeros(batch['targets'].shape, np.float32)
  batch['old_logps'][:, prompt_len - 1:prompt_len - 1 + completion_len] = old  # target t of TRL's column t
  assert batch['loss_mask'].sum() == completion_mask.sum() and batch['loss_mask'][3].sum() == 0

  # ours: the model's pullback compiled once; every case's loss sums and gradient by the logits in one function
  model = create_model(config)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  apply = lambda p: model.apply({'params': p}, jbatch['inputs'], jbatch['segment_ids'], jbatch['positions'])
  logits = jax.jit(apply)(params)
  pullback = jax.jit(lambda p, cotangent: jax.vjp(apply, p)[1](cotangent)[0])
  cases = loss_cases(config, (0.0, 0.04))
  objective = objectives.make(cases[-1])  # beta > 0: the reference's log-probs by our reference path
  ours_ref = jax.jit(lambda p, r: objective.reference_logps(model, p, jbatch, r))(params, ref_params)

  @jax.jit
  def ours_of(lg):
    out = []
    for c in cases:
      prepared = objectives.make(c).prepare(jbatch, 0)
      ref = ours_ref if c.grpo.beta else None
      sums = lambda x: grpo_lib.sums_of(c.grpo, x, prepared, ref)  # pylint: disable=cell-var-from-loop
      out.append((sums(lg), jax.grad(lambda x: sums(x)['loss'])(lg)))  # pylint: disable=cell-var-from-loop
    return out

  worst = collections.defaultdict(float)
  for c, (sums, dlogits) in zip(cases, ours_of(logits)):
    g = c.grpo
    where = f'{g.loss_type} {g.importance_sampling_level} beta={g.beta}'
    fake = trl_self(g)
    case_inputs = dict(inputs, ref_per_token_logps=ref_logps) if g.beta else inputs
    policy.zero_grad()
    loss = grpo_trainer.GRPOTrainer._compute_loss(fake, policy, case_inputs)  # pylint: disable=protected-access
    loss.backward()
    trl_norm = float(torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in policy.parameters())))
    logged = {k: v[0] for k, v in fake._metrics['train'].items()}  # pylint: disable=protected-access
    ours = {k: float(v) for k, v in sums.items()}
    norm = float(optax.global_norm(pullback(params, dlogits)))
    for name, value, expected, atol in (('loss', ours['loss'], float(loss.detach()), 1e-6),
                                        ('grad_norm', norm, trl_norm, 0.0),
                                        ('entropy', ours['entropy'], logged['entropy'], 0.0),
                                        ('kl', ours['kl'], logged.get('kl', 0.0), 0.0)):
      worst[name] = max(worst[name], abs(value - expected) / max(1e-5 * abs(expected) + atol, 1e-12))
      assert value == pytest.approx(expected, rel=1e-5, abs=atol), (where, name)
    assert trl_norm > 1e-3, where  # the comparison compares something
    for name in grpo_lib.METRICS[g.loss_type][2:]:
      assert ours[name] == pytest.approx(logged[name], abs=1e-6), (where, name)
    if g.loss_type == 'dapo' and g.importance_sampling_level == 'token':  # the ratios do leave the clip range
      assert 0 < logged['clip_ratio/region_mean'] < 1, where
    if g.loss_type == 'dapo' and g.importance_sampling_level == 'sequence' and g.beta:
      # the objective's own loss and gradient on the parameters (policy forward, reference forward, its weights)
      obj = objectives.make(c)
      prepared = obj.prepare(jbatch, 0)
      total = lambda p: obj.loss(model, p, prepared, ref_params).total  # pylint: disable=cell-var-from-loop
      value, grads = jax.jit(jax.value_and_grad(total))(params)
      assert float(value) == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6), where
      assert float(optax.global_norm(grads)) == pytest.approx(trl_norm, rel=1e-5), where
  print('largest share of the tolerance used:', {k: f'{v:.2f}' for k, v in worst.items()})


def test_loss_types_refuse_the_level_and_fields_they_are_not_defined_at():
  """luspo is defined at sequence level and vespo at token level (TRL warns, we refuse), cispo's epsilon_high is its
  ratio cap (unset it would cap at epsilon), the sapo and vespo fields are positive: one line naming the field."""
  from llm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from llm_jax import validation  # pylint: disable=g-import-not-at-top
  for grpo, message in ((dict(loss_type='luspo'), r"^config\.grpo\.importance_sampling_level: 'token', but "
                                                 r"grpo\.loss_type=luspo needs 'sequence'"),
                        (dict(loss_type='vespo', importance_sampling_level='sequence'),
                         r"^config\.grpo\.importance_sampling_level: 'sequence', but grpo\.loss_type=vespo needs "
                         r"'token'"),
                        (dict(loss_type='cispo'), r'^config\.grpo\.epsilon_high: 0\.0: under grpo\.loss_type=cispo it '
                                                  r'is the cap of the ratio itself'),
                        (dict(loss_type='sapo', sapo_temperature_neg=0.0),
                         r'^config\.grpo\.sapo_temperature_neg: must be positive'),
                        (dict(loss_type='vespo', vespo_k_pos=-1.0), r'^config\.grpo\.vespo_k_pos: must be >= 0')):
    c = tiny_config(model=dict(objective='grpo'), data=dict(source='prompts_jsonl', global_batch_size=8))
    c.grpo.update(max_completion_tokens=8, **grpo)
    with pytest.raises(config_lib.ConfigError, match=message):
      validation.validate(c, 1)
  for loss_type, level in (('luspo', 'sequence'), ('vespo', 'token'), ('sapo', 'sequence')):
    c = tiny_config(model=dict(objective='grpo'), data=dict(source='prompts_jsonl', global_batch_size=8))
    c.grpo.update(max_completion_tokens=8, loss_type=loss_type, importance_sampling_level=level)
    validation.validate(c, 1)
  c.grpo.update(loss_type='cispo', epsilon_high=5.0)
  validation.validate(c, 1)


# --- the loop: rollouts through the engine, rewards, exact resume ---------------------------------------------------

REWARD_FILE = '''
def share_of_a(prompts, completions, **fields):
  return [sum(ch == 'a' for ch in c) / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope='module')
def prompt_files(tmp_path_factory):
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('grpo')
  lines = ['a b c d e f g', 'the answer is 12', 'what is 3 + 4 ? #### 7', 'a a a b b'] * 40
  (root / 'tok.model').write_bytes(tokenizer_lib.train(lines, 300))
  records = [dict(prompt=f'what is {i} + {i % 3} ?', answer=f'#### {i + i % 3}') for i in range(12)]
  records.append(dict(prompt=[dict(role='user', content='say a')], answer='a'))
  (root / 'prompts.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  (root / 'reward.py').write_text(REWARD_FILE)
  return root


def grpo_config(root, **grpo):
  """The tiny config of the reward and prompt tests: the fixture's prompts (text and chat) and rewards."""
  c = tiny_config(model=dict(objective='grpo', vocab_size=320, max_seq_len=64),
                  data=dict(source='prompts_jsonl', paths=str(root / 'prompts.jsonl'),
                            tokenizer_path=str(root / 'tok.model'), seq_len=48, global_batch_size=8,
                            validation_fraction=0.2))
  c.grpo.update(dict(group_size=4, prompts_per_rollout=2, max_completion_tokens=8,
                     rewards=f'exact_answer,length,{root / "reward.py"}:share_of_a', reward_weights='1,0.1,1'), **grpo)
  return c


def preset_config():
  """experiments/grpo_tiny.py on a smaller rollout (2 prompts x 4 completions), 4 steps of 2 a rollout, with a
  KL term, two rewards and a checkpoint every 2 steps."""
  from llm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_experiment('grpo_tiny')
  c.data.global_batch_size = 8
  c.grpo.update(group_size=4, prompts_per_rollout=2, steps_per_rollout=2, beta=0.04, log_samples_every=1,
                log_samples=3, eval_prompts=2, rewards=f'length,{c.grpo.rewards}', reward_weights='0.1,1')
  c.train.update(steps=4, log_every=1)
  c.eval.every = 0
  c.checkpoint.update(every=2, async_save=False)
  return c


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_grpo_run_logs_rollouts_and_resumes_exactly(tmp_path):
  """A GRPO run (rollouts through the engine, 2 steps a rollout, KL to the reference) writes the rollout metrics
  and samples; interrupted after step 2 and resumed, it reproduces the uninterrupted run's losses and rewards."""
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  whole = str(tmp_path / 'whole')
  one = jax.devices()[:1]  # as a user runs the preset (the suite's 8 fake devices only slow the tiny steps down)
  train.train_and_evaluate(preset_config(), whole, one)
  rows = [r for r in _rows(whole) if 'loss' in r]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for key in ('reward', 'reward_std', 'reward/letter_share', 'reward/length', 'advantage_std', 'kl', 'entropy',
              'clip_ratio/region_mean', 'completion_length', 'completion_length_max', 'truncated',
              'rollout_tokens_per_s'):
    assert key in rows[-1], key
  assert rows[0]['kl'] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
  assert rows[2]['kl'] > 0  # after two updates it is not
  assert rows[0]['clip_ratio/region_mean'] == 0.0  # the first step of a rollout: ratio 1
  assert 'eval_reward' in _rows(whole)[-1]
  samples = [json.loads(line) for line in open(os.path.join(whole, 'rollouts.jsonl'))]
  assert len(samples) == 2 * 3 and set(samples[0]['rewards']) == {'length', 'letter_share'}
  part = str(tmp_path / 'part')
  interrupted = preset_config()
  interrupted.checkpoint.every = 1
  train.train_and_evaluate(interrupted, part, one, hooks=[train.every(3, lambda loop, step: loop.stop())])
  # resumed from step 3, inside rollout 2 (steps 3 and 4): its batch is read back from the workdir
  train.train_and_evaluate(preset_config(), part, one)
  resumed = [r for r in _rows(part) if 'loss' in r]
  for a, b in zip(rows, resumed):
    assert (a['step'], a['loss'], a['reward'], a['completion_length']) == (b['step'], b['loss'], b['reward'],
                                                                           b['completion_length'])
  assert len(resumed) == 4
  # the samples too: the resumed run's rollouts.jsonl reads as the uninterrupted run's
  assert open(os.path.join(part, 'rollouts.jsonl')).read() == open(os.path.join(whole, 'rollouts.jsonl')).read()



# --- rewards, prompts and their errors (no model) --------------------------------------------------------------------

def test_final_answer_extractors_and_builtin_rewards():
  from llm_jax import rewards  # pylint: disable=g-import-not-at-top
  assert rewards.final_answer('so 3 + 4 = 7 and then #### 1,234.') == '1234'
  assert rewards.final_answer(r'thus \boxed{\frac{1}{2}} is it') == r'\frac{1}{2}'
  assert rewards.final_answer('first 3 then 42') == '42'
  assert rewards.final_answer('no number') is None
  c = tiny_config(model=dict(objective='grpo'), data=dict(source='prompts_jsonl'))
  c.grpo.update(rewards='exact_answer,format,length', reward_weights='1,0.5,2', format_regex=r'\d+',
                max_completion_tokens=8)
  scorer = rewards.make(c)
  got = scorer(['q', 'q', 'q'], ['it is 7', '7', 'eight'], [dict(answer='#### 7')] * 3, [3, 1, 2], ['a:1'] * 3)
  np.testing.assert_allclose(got, [[1, 0, -3 / 8], [1, 1, -1 / 8], [0, 0, -2 / 8]])
  np.testing.assert_allclose(scorer.total(got), [1 - 0.75, 1.5 - 0.25, -0.5])


def test_advantages_are_trls():
  """Group, batch and no scaling as TRL computes them (its nanstd is the unbiased std, + 1e-4)."""
  from llm_jax import rollout  # pylint: disable=g-import-not-at-top
  rewards = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
  adv, _ = rollout.advantages_of(rewards, 4, 'group')
  np.testing.assert_allclose(adv[:4], (rewards[:4] - 0.25) / (np.std(rewards[:4], ddof=1) + 1e-4))
  np.testing.assert_allclose(adv[4:], 0.0)  # an equal group gives no signal
  adv, _ = rollout.advantages_of(rewards, 4, 'batch')
  np.testing.assert_allclose(adv[:4], (rewards[:4] - 0.25) / (np.std(rewards, ddof=1) + 1e-4))
  adv, _ = rollout.advantages_of(rewards, 4, 'none')
  np.testing.assert_allclose(adv, rewards - np.repeat([0.25, 2.0], 4))


BAD_REWARDS = '''
import time
def raises(prompts, completions, **fields):
  raise KeyError('oops')
def text(prompts, completions, **fields):
  return ['1.0' for _ in completions]
def short(prompts, completions, **fields):
  return [1.0]
def slow(prompts, completions, **fields):
  time.sleep(5)
  return [0.0 for _ in completions]
'''


def test_bad_reward_function_and_prompt_data_are_one_clear_error(tmp_path, prompt_files):
  from llm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from llm_jax import rewards, validation  # pylint: disable=g-import-not-at-top
  from llm_jax.data import prompts  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'bad.py'
  path.write_text(BAD_REWARDS)
  c = grpo_config(prompt_files)
  call = lambda scorer: scorer(['p', 'q'], ['x', 'y'], [dict(answer='1'), dict(answer='2')], [1, 1],
                               ['f.jsonl:1', 'f.jsonl:2'])
  for name, message in (('raises', r'reward .*bad\.py:raises raised KeyError: .oops. \(on the rollout of f\.jsonl:1'),
                        ('text', r"reward .*:text returned '1\.0' for the completion of f\.jsonl:1; a reward is a "
                                 r'finite number'),
                        ('short', r'reward .*:short returned 1 values for 2 completions'),
                        ('slow', r'reward .*:slow: took more than config\.grpo\.reward_timeout=0\.2 s')):
    c.grpo.update(rewards=f'{path}:{name}', reward_weights='', reward_timeout=0.2)
    with pytest.raises(rewards.RewardError, match=message):
      call(rewards.make(c))
  c.grpo.rewards = f'{path}:missing'
  with pytest.raises(rewards.RewardError, match=r'config\.grpo\.rewards: .*bad\.py:missing.: .* has no function'):
    rewards.make(c)
  c.grpo.update(rewards='exact_answer,length', reward_weights='1')
  with pytest.raises(config_lib.ConfigError, match=r'^config\.grpo\.reward_weights: 1 weights for 2 rewards'):
    validation.validate(c, 1)
  c.grpo.update(rewards='exact_answer', reward_weights='')
  c.data.source = 'synthetic'
  with pytest.raises(config_lib.ConfigError, match=r'^config\.data\.source: .synthetic.: model\.objective=grpo '
                                                   r'samples completions of prompts'):
    validation.validate(c, 1)
  # a dataset without the named column, and a prompt longer than the context: the record named
  c = grpo_config(prompt_files)
  c.data.prompt_columns = 'prompt=question'
  with pytest.raises(prompts.PromptDataError, match=r'prompts\.jsonl:1: no column "question" \(data\.prompt_columns '
                                                    r'maps prompt=question\); the record has prompt, answer'):
    prompts.load(c)
  c = grpo_config(prompt_files)
  c.data.seq_len, c.grpo.max_completion_tokens = 20, 8
  with pytest.raises(prompts.PromptDataError, match=r'prompts\.jsonl:13: the prompt has 26 tokens; data\.seq_len=20 '
                                                    r'- grpo\.max_completion_tokens=8 leaves 12'):
    prompts.load(c)


def test_dynamic_sampling_drops_equal_groups_and_refills_from_further_prompts():
  """DAPO's dynamic sampling: groups whose rewards are all equal are dropped and the next sampling round's groups
  fill the batch; after grpo.max_rollout_attempts rounds equal groups fill what is left. (The stage's sampling is
  replaced by groups of given rewards; its batch assembly, advantages and metrics are the real ones.)"""
  from llm_jax import rollout, rewards  # pylint: disable=g-import-not-at-top
  from llm_jax.data.prompts import Prompt  # pylint: disable=g-import-not-at-top
  c = tiny_config(model=dict(objective='grpo'), data=dict(source='prompts_jsonl', seq_len=16))
  c.grpo.update(group_size=2, prompts_per_rollout=2, max_completion_tokens=4, dynamic_sampling=True,
                max_rollout_attempts=3, rewards='length', log_samples_every=0)
  stage = object.__new__(rollout.RolloutStage)
  stage.config, stage.g, stage.rows, stage.seq_len, stage.pad_id = c, c.grpo, 4, 16, 0
  stage.rewards = rewards.make(c)
  stage.trainer = types.SimpleNamespace(put=lambda b: b, data_slice=(0, 1))
  stage._logps = lambda params, b: np.zeros(b['inputs'].shape, np.float32)  # pylint: disable=protected-access
  rounds = {0: [[0.0, 0.0], [1.0, 0.0]], 1: [[0.5, 0.5], [0.25, 0.75]], 2: [[1.0, 1.0]]}
  calls = []

  def groups(params, r, attempt):
    calls.append(attempt)
    return [dict(record=Prompt((1, 2), f'p{attempt}{i}', {}, f'f:{attempt}{i}'), completions=[([3], False)] * 2,
                 texts=['x'] * 2, scores=np.asarray(s)[:, None]) for i, s in enumerate(rounds[attempt])]

  stage._groups = groups  # pylint: disable=protected-access
  batch = stage.make(0, None)
  assert calls == [0, 1]  # the second round filled the batch
  a, b = 0.5 / (np.sqrt(0.5) + 1e-4), 0.25 / (np.sqrt(0.125) + 1e-4)  # deviation / (unbiased std + 1e-4)
  np.testing.assert_allclose(batch['advantages'][:, 0], [a, -a, -b, b], rtol=1e-6)
  assert stage.metrics()['zero_std_groups'] == 0.0
  rounds[1] = [[0.5, 0.5]]
  calls.clear()
  batch = stage.make(1, None)
  assert calls == [0, 1, 2]  # never enough: the kept group, then the first equal one
  np.testing.assert_allclose(batch['advantages'][:, 0], [a, -a, 0, 0], rtol=1e-6)
  assert stage.metrics()['zero_std_groups'] == 0.5


def test_grpo_step_on_one_device_equals_fsdp_by_tensor_mesh(tmp_path, tiny_policy):
  """The same GRPO step (with the KL to the reference copy) on 1 device and on a 4 x 2 fsdp x tensor mesh of fake
  CPU devices, the latter also with the output head in 4 chunks (the policy's and the reference's log-probs and the
  entropy per chunk, model.logits_chunks): the same loss, kl, entropy and gradient norm (float32 reduction order:
  1e-5)."""
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  batch = _rollout_like_batch(rng, rows=8, length=16)
  batch['advantages'] = batch['advantages'][:, None]
  batch['old_logps'] = rng.uniform(-5, -3, batch['targets'].shape).astype(np.float32)
  results = []
  for mesh, devices, chunks in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], 1),
                                (dict(data=1, fsdp=4, tensor=2), jax.devices()[:8], 1),
                                (dict(data=1, fsdp=4, tensor=2), jax.devices()[:8], 4)):
    c = tiny_config(model=dict(objective='grpo', logits_chunks=chunks),
                    data=dict(source='prompts_jsonl', global_batch_size=8), mesh=mesh)
    c.grpo.update(group_size=4, prompts_per_rollout=2, max_completion_tokens=8, beta=0.1, loss_type='grpo')
    trainer = train.Trainer(c, str(tmp_path), devices)
    params = jax.tree.map(jnp.copy, tiny_policy[2])  # the same tiny model's parameters (no init to compile); a
    # copy, as the step donates its state
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=trainer.optimizer.init(params),
                             reference=jax.tree.map(jnp.copy, params))
    state = jax.device_put(state, trainer.state_shardings)
    _, metrics = trainer.train_step(state, trainer.put(batch))
    results.append({k: float(metrics[k]) for k in ('loss', 'kl', 'grad_norm', 'entropy')})
  for other in results[1:]:
    for key in results[0]:
      assert other[key] == pytest.approx(results[0][key], rel=1e-5, abs=1e-7), key
  assert results[0]['kl'] == 0.0 and results[0]['grad_norm'] > 0  # the reference is the starting point


def test_prompts_hf_maps_gsm8k_style_columns_and_names_a_missing_one(tmp_path, prompt_files):
  """prompts_hf on a local JSON dataset with GSM8K's columns (question, answer): data.prompt_columns maps question
  onto prompt, answer goes to the rewards as it is; the held-out share is stable; a column the mapping names but the
  dataset lacks is one line naming the row."""
  from llm_jax.data import prompts  # pylint: disable=g-import-not-at-top
  rows = [dict(question=f'what is {i} + 1 ?', answer=f'{i} + 1 = {i + 1}\n#### {i + 1}') for i in range(10)]
  path = tmp_path / 'gsm.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  c = grpo_config(prompt_files)
  c.data.update(source='prompts_hf', hf_path='json', hf_data_files=str(path), prompt_columns='prompt=question',
                validation_fraction=0.3)
  tokenizer, split = prompts.load(c)
  records = split['train'] + split['validation']
  assert len(records) == 10 and 0 < len(split['validation']) < 10
  first = next(r for r in records if r.text == 'what is 0 + 1 ?')
  assert first.fields == dict(answer='0 + 1 = 1\n#### 1') and first.where.startswith('json[train][')
  assert list(first.ids) == tokenizer.encode_prompt('what is 0 + 1 ?')
  from llm_jax import rewards  # pylint: disable=g-import-not-at-top
  assert rewards.make(c)(['q'], ['so it is 1'], [first.fields], [3], [first.where])[0, 0] == 1.0  # exact_answer
  c.data.prompt_columns = 'prompt=problem'
  with pytest.raises(prompts.PromptDataError, match=r'^json\[train\]\[0\]: no column "problem" \(data\.prompt_columns '
                                                    r'maps prompt=problem\); the record has question, answer'):
    prompts.load(c)
