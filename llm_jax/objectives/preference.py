"""Preference objectives on pairs of completions (DPO and its kin), as TRL defines them.

Batch (llm_jax.data.preference): rows of packed pairs. Pair k of a row is segments 2k-1 (the prompt and the chosen
completion) and 2k (the prompt and the rejected one), so a pair never crosses rows and attention never crosses
sequences. `loss_mask` is 1 on the targets that are completion tokens: the prompt is masked out. Optional
`ref_chosen` and `ref_rejected` [B, T//2] hold the reference's summed completion log-probs of each pair (slot k: pair k of the
row, as `pair_sums` lays them out), precomputed in one pass (config.dpo.precompute_ref); without them they are
computed here, from the frozen reference, without gradient.

Per pair: the sums of the completion targets' log-probabilities pi_c, pi_r (policy) and ref_c, ref_r (reference),
the completion lengths n_c, n_r, the log-ratios h_c = pi_c - ref_c, h_r = pi_r - ref_r, D = h_c - h_r, and with
b = config.dpo.beta, e = config.dpo.label_smoothing, g = config.dpo.simpo_gamma, s = log sigmoid:

  sigmoid  -s(bD)                                    DPO (Rafailov et al.), TRL's loss_type="sigmoid"
  cdpo     -(1-e) s(bD) - e s(-bD)                   conservative DPO (Mitchell): labels flipped with share e
  robust   (-(1-e) s(bD) + e s(-bD)) / (1-2e)        robust DPO (Chowdhury et al.), e in [0, 0.5)
  ipo      (h_c/n_c - h_r/n_r - 1/(2b))^2            IPO (Azar et al.), length-normalised as TRL does
  simpo    -(1-e) s(M) - e s(-M), M = b(pi_c/n_c - pi_r/n_r) - g   SimPO (Meng et al.): no reference

TRL's sigmoid loss no longer reads label_smoothing (trl 1.16: only robust, exo_pair and the aot losses do),
so cDPO, which older TRL computed as sigmoid with label_smoothing > 0, has its own name here and sigmoid takes no
label_smoothing. The loss of a step is the mean over its pairs. Rewards (TRL's metrics): b h_c and b h_r (simpo:
b pi_c/n_c and b pi_r/n_r); rewards/margins their difference, rewards/accuracies the share of pairs whose chosen reward is the
higher; logps/chosen and logps/rejected the policy's pi_c and pi_r.

The reference is the policy's starting point: a frozen copy of the initial parameters in the TrainState
(`reference_kind() == 'copy'`), or, in a LoRA run, the base weights with the adapters off ('lora_base'), read from
the trained parameters so that no second copy is held; with config.dpo.precompute_ref ('precomputed') its
sums come with the batch (`ref_chosen`, `ref_rejected`, computed once from the starting point by training) and
no reference is held at all.

The frozen copy only runs forward passes, in the compute dtype: it is held in config.model.dtype
(config.dpo.reference_dtype=compute, the default; `reference_params`) except the parameters the model computes
with in float32 whatever the compute dtype (FLOAT32_PARAMS: norm scales, the MoE router and shared-expert gate), so
its forward equals the one on param_dtype weights exactly; reference_dtype=param keeps model.param_dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.data import preference as preference_data
from llm_jax.errors import check_choice, fail
from llm_jax.model import Transformer
from llm_jax.model import lora as lora_lib
from llm_jax.objectives import base
from llm_jax.objectives.registry import register

LOSS_TYPES = ('sigmoid', 'cdpo', 'robust', 'ipo', 'simpo')
REFERENCE_DTYPES = ('compute', 'param')  # config.dpo.reference_dtype
# parameters the model computes with in float32 whatever model.dtype: RMSNorm scales (llm_jax.model.layers), the
# MoE router and shared-expert gate (llm_jax.model.moe); reference_params keeps them (any leaf under these names)
FLOAT32_PARAMS = ('scale', 'router', 'shared_gate')
# per-pair values averaged over a step's pairs, TRL's names
PAIR_METRICS = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies',
                'logps/chosen', 'logps/rejected')


def pair_sums(values: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) sums of `values` [B,T] over each pair's segments: [B,P] each, P = T//2 (a sequence covers
  at least one position, so a row holds at most T//2 pairs); padding (segment 0) is dropped."""
  rows, length = values.shape
  pairs = length // 2
  sums = jnp.zeros((rows, 2 * pairs + 1), jnp.float32)
  sums = sums.at[jnp.arange(rows)[:, None], segment_ids].add(values.astype(jnp.float32))
  return sums[:, 1::2], sums[:, 2::2]


def pair_losses(config_dpo, policy_c, policy_r, ref_c, ref_r, n_c, n_r) -> dict[str, jax.Array]:
  """Per-pair loss and rewards ([P] or [B,P] arrays) of config.dpo.loss_type (module docstring)."""
  beta, smoothing, kind = config_dpo.beta, config_dpo.label_smoothing, config_dpo.loss_type
  log_sigmoid = jax.nn.log_sigmoid
  if kind == 'simpo':
    chosen, rejected = beta * policy_c / n_c, beta * policy_r / n_r
    margin = chosen - rejected - config_dpo.simpo_gamma
    loss = -(1 - smoothing) * log_sigmoid(margin) - smoothing * log_sigmoid(-margin)
  else:
    h_c, h_r = policy_c - ref_c, policy_r - ref_r
    chosen, rejected = beta * h_c, beta * h_r
    delta = beta * (h_c - h_r)
    if kind == 'sigmoid':
      loss = -log_sigmoid(delta)
    elif kind == 'cdpo':
      loss = -(1 - smoothing) * log_sigmoid(delta) - smoothing * log_sigmoid(-delta)
    elif kind == 'robust':
      loss = (-(1 - smoothing) * log_sigmoid(delta) + smoothing * log_sigmoid(-delta)) / (1 - 2 * smoothing)
    elif kind == 'ipo':
      loss = jnp.square(h_c / n_c - h_r / n_r - 1 / (2 * beta))
    else:
      raise ValueError(f'config.dpo.loss_type: unknown value {kind!r}; expected one of {", ".join(LOSS_TYPES)}')
  return {'loss': loss, 'rewards/chosen': chosen, 'rewards/rejected': rejected,
          'rewards/margins': chosen - rejected, 'rewards/accuracies': (chosen > rejected).astype(jnp.float32),
          'logps/chosen': policy_c, 'logps/rejected': policy_r}


@register
class DPO(base.Objective):
  """Direct preference optimisation and its kin (config.dpo.loss_type) on preference pairs."""
  name = 'dpo'
  train_metrics = PAIR_METRICS[1:]
  trains_on_pairs = True

  @classmethod
  def check_config(cls, config):
    p = config.dpo
    check_choice('dpo.loss_type', p.loss_type, LOSS_TYPES)
    if p.beta <= 0:
      fail('dpo.beta', f'must be positive, got {p.beta}')
    check_choice('dpo.reference_dtype', p.reference_dtype, REFERENCE_DTYPES)
    if p.loss_type == 'sigmoid' and p.label_smoothing:
      fail('dpo.label_smoothing', f'{p.label_smoothing} with loss_type=sigmoid: plain DPO takes none (TRL\'s sigmoid '
           f'ignores it); conservative DPO is loss_type=cdpo')
    limit = 0.5 if p.loss_type in ('robust', 'cdpo') else 1.0
    if not 0.0 <= p.label_smoothing < limit:
      fail('dpo.label_smoothing', f'must be in [0, {limit}) for loss_type={p.loss_type}, got {p.label_smoothing}')
    preference_data.lengths(config)  # dpo.max_length, dpo.max_prompt_length against data.seq_len

  def reference_kind(self):
    if self.config.dpo.loss_type == 'simpo':
      return None
    if self.config.dpo.precompute_ref:  # the batches carry the sums (llm_jax.data.preference.store_reference)
      return 'precomputed'
    # LoRA: the base with the adapters off, unless init_from's adapters are kept (the start is base + adapters)
    keeps_adapters = self.config.train.init_from_adapters == 'keep'
    return 'lora_base' if self.config.lora.rank and not keeps_adapters else 'copy'

  def reference_params(self, params):
    """The frozen copy of a 'copy' reference (reference_params: in config.dpo.reference_dtype)."""
    return reference_params(self.config, params)

  def _valid(self, batch):
    """[B,P] True where the pair exists (both completions have a target in the loss)."""
    n_c, n_r = pair_sums(batch['loss_mask'], batch['segment_ids'])
    return (n_c > 0) & (n_r > 0), n_c, n_r

  def count(self, batch):
    valid, _, _ = self._valid(batch)
    return jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)

  def reference_sums(self, model, params, batch, reference):
    """(chosen, rejected) [B,P] sums of the reference's completion log-probs (no gradient): the batch's
    precomputed ones, else a forward of the reference; None when the loss needs no reference (simpo)."""
    if 'ref_chosen' in batch:
      return batch['ref_chosen'], batch['ref_rejected']
    kind = self.reference_kind()
    if kind is None:
      return None
    if kind == 'precomputed':
      raise ValueError('config.dpo.precompute_ref: the batch has no ref_chosen/ref_rejected (the preference source '
                       'adds them from the reference_logps/ that training stores before its first step)')
    if kind == 'lora_base':  # the same weights with the adapters off: a rank-0 model on the base tree
      model = Transformer(dataclasses.replace(model.cfg, lora_rank=0, lora_targets=()), decode=model.decode)
      reference = lora_lib.split(params)[0]
    reference = jax.lax.stop_gradient(reference)
    logprobs = jax.lax.stop_gradient(base.per_token(model, reference, batch, base.target_logprobs, batch['targets']))
    return pair_sums(logprobs * batch['loss_mask'], batch['segment_ids'])

  def pair_sums_of(self, logprobs, ref_sums, batch) -> dict[str, jax.Array]:
    """Sums over the batch's pairs of the per-pair metrics (PAIR_METRICS); ref_sums: (chosen, rejected) [B,P]."""
    valid, n_c, n_r = self._valid(batch)
    mask, segments = batch['loss_mask'], batch['segment_ids']
    policy_c, policy_r = pair_sums(logprobs * mask, segments)
    if ref_sums is None:
      ref_c = ref_r = jnp.zeros_like(policy_c)
    else:
      ref_c, ref_r = ref_sums
    safe = lambda n: jnp.maximum(n, 1.0)  # padding pairs (n = 0) are masked out below
    terms = pair_losses(self.config.dpo, policy_c, policy_r, ref_c, ref_r, safe(n_c), safe(n_r))
    return {name: jnp.sum(jnp.where(valid, value, 0.0)) for name, value in terms.items()}

  def loss(self, model, params, batch, reference=None):
    logprobs, aux = base.apply_with_aux(model, params, batch, reduce=(base.target_logprobs, batch['targets']))
    ref_sums = self.reference_sums(model, params, batch, reference)
    sums = self.pair_sums_of(logprobs, ref_sums, batch)
    return base.with_aux(sums['loss'], sums, aux)

  def eval_sums(self, model, params, batch, reference=None):
    logprobs = base.per_token(model, params, batch, base.target_logprobs, batch['targets'])
    ref_sums = self.reference_sums(model, params, batch, reference)
    sums = self.pair_sums_of(logprobs, ref_sums, batch)
    valid, _, _ = self._valid(batch)
    return dict(sums, pairs=jnp.sum(valid.astype(jnp.float32)))

  def eval_metrics(self, totals):
    pairs = max(totals['pairs'], 1.0)
    return dict({f'eval_{name}': totals[name] / pairs for name in PAIR_METRICS}, eval_pairs=totals['pairs'])


def reference_params(config, params):
  """The frozen reference of a 'copy' run: a copy of `params` in config.dpo.reference_dtype (compute:
  config.model.dtype for every leaf the model casts to it anyway, all but FLOAT32_PARAMS, so the forward is the
  same). Boxed (nn.Partitioned) leaves keep their axis names."""
  if config.dpo.reference_dtype == 'param':
    return jax.tree.map(jnp.copy, params)
  dtype = jnp.dtype(config.model.dtype)

  def cast(path, leaf):
    names = {str(getattr(key, 'key', key)) for key in path}
    keep = names & set(FLOAT32_PARAMS) or not jnp.issubdtype(leaf.dtype, jnp.floating)
    return jnp.copy(leaf) if keep else leaf.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, params)
