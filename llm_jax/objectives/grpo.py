"""Group relative policy optimisation (GRPO) and its variants, as TRL's GRPOTrainer defines them (trl 1.16,
grpo_trainer.py `_compute_loss`).

Batch (made by the rollout stage, llm_jax.rollout): one completion a row, the prompt then the completion, padded
(segment 0) to data.seq_len. `loss_mask` is 1 on the targets that are completion tokens (0 on every target of a
truncated completion under config.grpo.mask_truncated_completions), `old_logps` [B,T] the log-probabilities of the
targets under the parameters the rollout sampled from (the old policy), `advantages` [B,1] the completion's advantage.

Per completion token t of row i, with temperature tau (config.grpo.temperature: the log-probs are of logits / tau,
as TRL's), m the loss mask, A_i the advantage, e_lo = config.grpo.epsilon, e_hi = config.grpo.epsilon_high (0 =
epsilon), b = config.grpo.beta, sg() a stopped gradient:

  token level      w_it = pi(t) / pi_old(t)                              (importance_sampling_level=token)
  sequence level   w_i  = exp(sum_t m (log pi - log pi_old) / sum_t m)   (importance_sampling_level=sequence: GSPO)
  the policy term p_it of config.grpo.loss_type:
    grpo bnpo dr_grpo dapo luspo   -min(w A_i, clip(w, 1 - e_lo, 1 + e_hi) A_i)          (PPO's clipped surrogate)
    cispo   -sg(min(w, e_hi)) A_i log pi(t)          (MiniMax-M1: the weight is capped, not the update; e_hi the cap)
    sapo    -(4 / s) sigmoid(s (w - 1)) A_i          (a soft gate; s = sapo_temperature_pos if A_i > 0, else _neg)
    vespo   -sg(phi_i) A_i log pi(t)                 (phi_i = exp(lam + k log W_i - lam W_i), W_i = the completion's
            whole ratio exp(sum_t m clip(log pi - log pi_old, -20, 20)) with log W_i clipped to [log 1e-8, 20]; k, lam
            = vespo_k_pos, vespo_lambda_pos if A_i >= 0, else the _neg pair; a NaN or infinite phi counts 0)
  l_it = p_it + b (exp(r - log pi) - (r - log pi) - 1)   r: the reference's log-prob (k3 estimator of the KL)
  the step's loss of config.grpo.loss_type:
  grpo, sapo             mean over rows of (sum_t m l / sum_t m)          (each completion weighs the same)
  bnpo                   sum m l / sum m over the step's batch            (each token weighs the same)
  dapo, cispo, vespo     the same as bnpo here: TRL divides by the generation batch's tokens, and a step here is one
                         generation batch (its accumulation steps give the gradient of the whole batch, llm_jax.train)
  dr_grpo                sum m l / (rows * config.grpo.max_completion_tokens)   (no length bias: Dr. GRPO)
  luspo                  mean over rows of sum_t m l                      (LUSPO: GSPO with each completion's term
                         scaled by its length)
luspo needs importance_sampling_level=sequence and vespo token (vespo makes its own sequence ratio): TRL warns about
the other level, check_config refuses it.

Metrics (TRL's names; METRICS[loss_type]): kl (the masked token mean of the k3 term; 0 without a reference), entropy
(masked token mean of the policy's entropy), and by loss type: clip_ratio/low_mean, clip_ratio/high_mean,
clip_ratio/region_mean (the clipped surrogate's: the share of tokens, or of completions at sequence level, whose ratio
is below 1 - e_lo with A < 0, above 1 + e_hi with A > 0, either), cispo_clip_ratio (ratio above the cap e_hi with
A > 0), vespo/phi_seq_mean (the mean over completions of phi); sapo logs no clip share, as TRL.

Normalisers over the whole step's batch are computed by `prepare` (on the step's batch, before microbatches) as
per-token weights, so `count` is 1 and k accumulated microbatches give exactly the step's gradient.

The reference (b > 0) is the policy's starting point, as DPO's (llm_jax.objectives.preference): a frozen copy of the
initial parameters (the init_from model), or the LoRA base with the adapters off.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from llm_jax.errors import check_choice, fail
from llm_jax.model import Transformer
from llm_jax.model import lora as lora_lib
from llm_jax.objectives import base
from llm_jax.objectives import preference
from llm_jax.objectives.registry import register

LOSS_TYPES = ('grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', 'luspo', 'vespo')  # config.grpo.loss_type (TRL's)
CLIPPED_SURROGATE = ('grpo', 'bnpo', 'dr_grpo', 'dapo', 'luspo')  # the loss types of PPO's clipped ratio
IMPORTANCE_LEVELS = ('token', 'sequence')  # config.grpo.importance_sampling_level (sequence: GSPO)
REWARD_SCALINGS = ('group', 'batch', 'none')  # config.grpo.scale_rewards (TRL's)
CLIP_METRICS = ('clip_ratio/low_mean', 'clip_ratio/high_mean', 'clip_ratio/region_mean')
# The step metrics of each loss type, as TRL logs them (written to train rows next to loss, with the rollout's)
METRICS = {**{kind: ('kl', 'entropy') + CLIP_METRICS for kind in CLIPPED_SURROGATE},
           'cispo': ('kl', 'entropy', 'cispo_clip_ratio'), 'sapo': ('kl', 'entropy'),
           'vespo': ('kl', 'entropy', 'vespo/phi_seq_mean')}
REQUIRED_LEVEL = {'luspo': 'sequence', 'vespo': 'token'}  # the importance_sampling_level a loss type is defined at


def epsilons(config_grpo) -> tuple[float, float]:
  """(epsilon_low, epsilon_high) of config.grpo (epsilon_high 0 = epsilon, TRL's None)."""
  return config_grpo.epsilon, config_grpo.epsilon_high or config_grpo.epsilon


def gamma_weights(config_grpo, log_ratio, mask, adv) -> jax.Array:
  """VESPO's phi [B,1] (module docstring) from the token log-ratios [B,T], without gradient (TRL's
  get_gamma_weights with no sampler correction)."""
  log_w = jnp.sum(jnp.clip(log_ratio, -20.0, 20.0) * mask, -1, keepdims=True)
  log_w = jnp.clip(log_w, math.log(1e-8), 20.0)  # TRL's bounds (its reference implementation's 1e-8 floor)
  positive = adv >= 0
  k = jnp.where(positive, config_grpo.vespo_k_pos, config_grpo.vespo_k_neg)
  lam = jnp.maximum(jnp.where(positive, config_grpo.vespo_lambda_pos, config_grpo.vespo_lambda_neg), 1e-4)
  phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))  # phi(1) = 1
  return jax.lax.stop_gradient(jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0))


def token_terms(config_grpo, logps, old_logps, ref_logps, mask, advantages) -> dict[str, jax.Array]:
  """The per-token loss and the logged per-token values of one batch ([B,T] arrays; advantages [B]), module
  docstring.

  Returns loss [B,T] (or [B,1], broadcast over the tokens, for a sequence-level surrogate without beta), kl [B,T]
  or None, and the values of METRICS[loss_type] beyond kl and entropy (clip flags as floats): [B,T] averaged over
  the masked tokens, [B,1] (sequence level, vespo's phi) averaged over the completions."""
  low, high = epsilons(config_grpo)
  kind = config_grpo.loss_type
  adv = advantages.reshape(advantages.shape[0], 1)  # [B] or [B,1] (a batch's arrays are [B, ...] of rank >= 2)
  log_ratio = logps - old_logps
  if config_grpo.importance_sampling_level == 'token':
    log_weights = log_ratio
  else:
    log_weights = jnp.sum(log_ratio * mask, -1, keepdims=True) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
  coef_1 = jnp.exp(log_weights)
  logged = {}
  if kind in CLIPPED_SURROGATE:
    coef_2 = jnp.clip(coef_1, 1 - low, 1 + high)
    loss = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    is_low = (coef_1 < 1 - low) & (adv < 0)
    is_high = (coef_1 > 1 + high) & (adv > 0)
    for name, flag in zip(CLIP_METRICS, (is_low, is_high, is_low | is_high)):
      logged[name] = flag.astype(jnp.float32)
  elif kind == 'cispo':  # epsilon_high is the cap of the ratio itself here (TRL's; ScaleRL recommends 5)
    loss = -jax.lax.stop_gradient(jnp.minimum(coef_1, high)) * adv * logps
    logged['cispo_clip_ratio'] = ((coef_1 > high) & (adv > 0)).astype(jnp.float32)
  elif kind == 'sapo':
    temperature = jnp.where(adv > 0, config_grpo.sapo_temperature_pos, config_grpo.sapo_temperature_neg)
    loss = -jax.nn.sigmoid(temperature * (coef_1 - 1)) * 4 / temperature * adv
  elif kind == 'vespo':
    phi = gamma_weights(config_grpo, log_ratio, mask, adv)
    loss = -phi * adv * logps
    logged['vespo/phi_seq_mean'] = phi
  else:
    raise ValueError(f'config.grpo.loss_type: unknown value {kind!r}; expected one of {", ".join(LOSS_TYPES)}')
  kl = None
  if config_grpo.beta:
    delta = ref_logps - logps
    kl = jnp.exp(delta) - delta - 1
    loss = loss + config_grpo.beta * kl
  return dict(loss=loss, kl=kl, logged=logged)


def weights(config_grpo, mask, segment_ids) -> dict[str, jax.Array]:
  """The step's normalisers as weights (module docstring): loss_weight [B,T] of config.grpo.loss_type,
  token_weight [B,T] (masked token means), row_weight [B] (means over completions)."""
  rows = jnp.maximum(jnp.sum(jnp.any(segment_ids > 0, -1).astype(jnp.float32)), 1.0)
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  kind = config_grpo.loss_type
  if kind in ('grpo', 'sapo'):
    loss_weight = mask / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0) / rows
  elif kind in ('bnpo', 'dapo', 'cispo', 'vespo'):
    loss_weight = mask / tokens
  elif kind == 'dr_grpo':
    loss_weight = mask / (rows * config_grpo.max_completion_tokens)
  elif kind == 'luspo':
    loss_weight = mask / rows
  else:
    raise ValueError(f'config.grpo.loss_type: unknown value {kind!r}; expected one of {", ".join(LOSS_TYPES)}')
  row_weight = jnp.any(segment_ids > 0, -1).astype(jnp.float32) / rows
  return dict(loss_weight=loss_weight, token_weight=mask / tokens, row_weight=row_weight)


def target_logps(temperature: float):
  """reducer(logits [B,C,V], targets [B,C]) -> log-probs [B,C] of the targets at the rollout's temperature."""
  return lambda logits, targets: base.target_logprobs(logits.astype(jnp.float32) / temperature, targets)


def token_values(temperature: float):
  """reducer(logits [B,C,V], targets [B,C]) -> {'logps', 'entropy'} per token at the rollout's temperature: all
  the loss takes from the logits, so the model can compute them in chunks (model.logits_chunks) and never hold
  the whole [B,T,V]. The entropy (TRL's entropy_from_logits, in float32) is a logged metric: no gradient."""

  def reducer(logits, targets):
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logps = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return dict(logps=logps, entropy=jax.lax.stop_gradient(-jnp.sum(jnp.exp(logprobs) * logprobs, axis=-1)))

  return reducer


def sums_of(config_grpo, logits, batch, ref_logps) -> dict[str, jax.Array]:
  """The weighted sums of one (micro)batch from the policy's logits [B,T,V] (loss and METRICS[loss_type]); weights
  from `prepare`. The tests take its gradient with respect to the logits against TRL's."""
  return sums_from(config_grpo, token_values(config_grpo.temperature)(logits, batch['targets']), batch, ref_logps)


def sums_from(config_grpo, values, batch, ref_logps) -> dict[str, jax.Array]:
  """`sums_of` from the per-token values of `token_values` (what the objective's loss gets from the model)."""
  logps = values['logps']
  mask = batch['loss_mask']
  terms = token_terms(config_grpo, logps, batch['old_logps'], ref_logps, mask, batch['advantages'])
  token_w, row_w = batch['token_weight'], batch['row_weight']
  per_token = terms['loss'] * jnp.ones_like(mask)  # sequence level: [B,1] broadcast over the tokens
  out = dict(loss=jnp.sum(per_token * batch['loss_weight']),
             entropy=jnp.sum(values['entropy'] * token_w),
             kl=jnp.zeros((), jnp.float32) if terms['kl'] is None else jax.lax.stop_gradient(
                 jnp.sum(terms['kl'] * token_w)))
  for name, value in terms['logged'].items():  # one value a completion: their mean; else the masked token mean
    total = jnp.sum(value[:, 0] * row_w) if value.shape[-1] == 1 else jnp.sum(value * token_w)
    out[name] = jax.lax.stop_gradient(total)
  return out


@register
class GRPO(base.Objective):
  """GRPO and its variants (config.grpo.loss_type, importance_sampling_level) on rollouts of the engine."""
  name = 'grpo'
  learns_from_rollouts = True  # its batches come from llm_jax.rollout, not from config.data's iterator

  @property
  def train_metrics(self):  # what TRL logs for this loss type
    return METRICS[self.config.grpo.loss_type]

  @classmethod
  def check_config(cls, config):
    g = config.grpo
    check_choice('grpo.loss_type', g.loss_type, LOSS_TYPES)
    check_choice('grpo.importance_sampling_level', g.importance_sampling_level, IMPORTANCE_LEVELS)
    check_choice('grpo.scale_rewards', g.scale_rewards, REWARD_SCALINGS)
    check_choice('dpo.reference_dtype', config.dpo.reference_dtype, preference.REFERENCE_DTYPES)
    for field in ('group_size', 'prompts_per_rollout', 'steps_per_rollout', 'max_completion_tokens'):
      if g[field] <= 0:
        fail(f'grpo.{field}', f'must be positive, got {g[field]}')
    if g.group_size < 2:
      fail('grpo.group_size', f'a group needs at least 2 completions to compare (its advantages are relative), got '
           f'{g.group_size}')
    if g.beta < 0:
      fail('grpo.beta', f'must be >= 0 (0 = no reference, no KL term), got {g.beta}')
    if not 0 < g.epsilon < 1:
      fail('grpo.epsilon', f'must be in (0, 1), got {g.epsilon}')
    if g.epsilon_high < 0:
      fail('grpo.epsilon_high', f'must be >= 0 (0 = grpo.epsilon), got {g.epsilon_high}')
    level = REQUIRED_LEVEL.get(g.loss_type)
    if level and g.importance_sampling_level != level:
      why = ('luspo is GSPO with length-scaled completions: its ratio is one a completion' if g.loss_type == 'luspo'
             else 'vespo makes its own sequence ratio from the token ratios')
      fail('grpo.importance_sampling_level', f'{g.importance_sampling_level!r}, but grpo.loss_type={g.loss_type} '
           f'needs {level!r} ({why})')
    if g.loss_type == 'cispo' and g.epsilon_high < 1:
      fail('grpo.epsilon_high', f'{g.epsilon_high}: under grpo.loss_type=cispo it is the cap of the ratio itself '
           f'(ScaleRL recommends 5.0; 0 would mean grpo.epsilon); a cap below 1 shrinks every on-policy token')
    for field in ('sapo_temperature_pos', 'sapo_temperature_neg', 'vespo_lambda_pos', 'vespo_lambda_neg'):
      if g[field] <= 0:
        fail(f'grpo.{field}', f'must be positive, got {g[field]}')
    for field in ('vespo_k_pos', 'vespo_k_neg'):
      if g[field] < 0:
        fail(f'grpo.{field}', f'must be >= 0 (the power of the ratio in the weight), got {g[field]}')
    if not 0.0 < g.temperature <= 100.0:
      fail('grpo.temperature', f'must be in (0, 100] (the loss divides the logits by it), got {g.temperature}')
    if not 0.0 < g.top_p <= 1.0:
      fail('grpo.top_p', f'must be in (0, 1], got {g.top_p}')
    if g.top_k < 0:
      fail('grpo.top_k', f'must be >= 0 (0 = no limit), got {g.top_k}')
    rollout = g.prompts_per_rollout * g.group_size
    if config.data.global_batch_size != rollout:
      fail('data.global_batch_size', f'{config.data.global_batch_size}, but a GRPO step trains on one rollout: '
           f'grpo.prompts_per_rollout * grpo.group_size = {g.prompts_per_rollout} * {g.group_size} = {rollout} '
           f'completions')
    if g.max_completion_tokens >= config.data.seq_len:
      fail('grpo.max_completion_tokens', f'{g.max_completion_tokens} leaves no room for a prompt in data.seq_len='
           f'{config.data.seq_len} (a row holds the prompt and one completion)')

  @classmethod
  def batch_fields(cls, config):
    return dict(old_logps=((config.data.seq_len,), jnp.float32), advantages=((1,), jnp.float32))

  def reference_kind(self):
    if not self.config.grpo.beta:
      return None
    keeps_adapters = self.config.train.init_from_adapters == 'keep'
    return 'lora_base' if self.config.lora.rank and not keeps_adapters else 'copy'

  def reference_params(self, params):
    """The frozen copy of a 'copy' reference (in config.dpo.reference_dtype, as DPO's)."""
    return preference.reference_params(self.config, params)

  def prepare(self, batch, step):
    del step
    return dict(batch, **weights(self.config.grpo, batch['loss_mask'], batch['segment_ids']))

  def count(self, batch):
    return jnp.ones((), jnp.float32)  # prepare's weights already divide by the step's normalisers

  def reference_logps(self, model, params, batch, reference):
    """log-probs [B,T] of the targets under the reference at the rollout's temperature (no gradient); None when
    config.grpo.beta is 0."""
    kind = self.reference_kind()
    if kind is None:
      return None
    if kind == 'lora_base':  # the same weights with the adapters off: a rank-0 model on the base tree
      model = Transformer(dataclasses.replace(model.cfg, lora_rank=0, lora_targets=()), decode=model.decode)
      reference = lora_lib.split(params)[0]
    reference = jax.lax.stop_gradient(reference)
    logps = base.per_token(model, reference, batch, target_logps(self.config.grpo.temperature), batch['targets'])
    return jax.lax.stop_gradient(logps)

  def loss(self, model, params, batch, reference=None):
    values, aux = base.apply_with_aux(model, params, batch,
                                      reduce=(token_values(self.config.grpo.temperature), batch['targets']))
    sums = sums_from(self.config.grpo, values, batch, self.reference_logps(model, params, batch, reference))
    return base.with_aux(sums['loss'], sums, aux)

  def eval_sums(self, model, params, batch, reference=None):
    raise NotImplementedError('grpo evaluates by rollouts on the eval prompts (llm_jax.rollout.RolloutStage.evaluate)')

  def eval_metrics(self, totals):
    raise NotImplementedError('grpo evaluates by rollouts on the eval prompts (llm_jax.rollout.RolloutStage.evaluate)')
