"""The objective interface: what a training objective owns, and the door auxiliary losses come through.

An objective (one instance per run, built from the config by `llm_jax.objectives.make`) owns

  prepare(batch, step)               the batch the model and the loss see at train step `step` (pure jnp)
  count(batch)                       the step's normaliser: target tokens (LM), masked positions (MLM), answer
                                     tokens (SFT), preference pairs (DPO). Computed on the whole step's batch, so
                                     k accumulated microbatches give exactly the gradient of one step on the
                                     whole batch
  loss(model, params, batch, ref)    a `Loss` of one (micro)batch: `total` (the objective's own term) and
                                     `metrics` are sums, divided by `count` by the step; `aux` (the model's
                                     auxiliary terms) are sums over its tokens, divided by `tokens(batch)`
  eval_sums(model, params, batch, ref)   named sums of one eval batch (no gradient)
  eval_metrics(totals)               the eval row from the sums over the eval batches (`eval_` names)

The model is called as the Transformer is: `model.apply(variables, inputs, segment_ids, positions)` gives the
logits, and with `reduce=(reducer, extra)` the per-token values reducer(logits, extra) instead (`per_token`): the
losses take that form, so that the model can compute the logits in chunks (config.model.logits_chunks).

`ref` is the frozen reference an objective asks for with `reference_kind() == 'copy'` (a copy of the initial parameters
held in the TrainState, never in the optimizer) or `'lora_base'` (the base weights of a LoRA run, read from the
trained parameters with the adapters off: no second copy); None otherwise.

Auxiliary losses (`apply_with_aux`): a module adds a term to the loss with
`self.sow(AUX_COLLECTION, name, value)`, value a sum over the batch's real tokens (segment id > 0). The step
divides these by the real tokens of the whole step (`tokens`), not by the objective's `count`, so a term is a
mean per token whatever the objective divides its own loss by: a coefficient means the same under clm, mlm, SFT
and DPO (divided by DPO's pairs, a per-token sum would weigh about tokens-per-pair times more). Every sown term
is added to the differentiated value and reported as the metric `aux/<name>`; a model that sows nothing changes
nothing. A mixture-of-experts balance loss is such a term. Inside a scanned stack the collection must be one of
the scan's `variable_axes`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

AUX_COLLECTION = 'aux_loss'
EVAL_STEP = 2**31 - 1  # the `step` of eval steps (eval batch i is prepared at EVAL_STEP - i): one no run reaches


@dataclasses.dataclass(frozen=True)
class Loss:
  total: jax.Array  # the objective's term, summed over the (micro)batch; divided by the step's count
  metrics: dict[str, jax.Array]  # named sums, each divided by the step's count; 'loss' is always one
  aux: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # sown terms: sums over the real tokens

  def value(self, count, tokens) -> jax.Array:
    """What the step differentiates: total / count + each auxiliary term / tokens (the step's real tokens)."""
    return sum((term / tokens for term in self.aux.values()), self.total / count)

  def step_metrics(self, count, tokens) -> dict[str, jax.Array]:
    """The metrics divided by count, and the auxiliary terms divided by tokens as aux/<name>."""
    return dict({name: v / count for name, v in self.metrics.items()},
                **{f'aux/{name}': v / tokens for name, v in self.aux.items()})


class Objective:
  """Base class: see the module docstring. Subclasses register themselves with `llm_jax.objectives.register`."""
  name: ClassVar[str] = ''
  causal: ClassVar[bool] = True  # attention mask of the model it trains (mlm: bidirectional)
  train_metrics: ClassVar[tuple[str, ...]] = ()  # metrics written to train rows next to loss and grad_norm
  trains_on_pairs: ClassVar[bool] = False  # its batches are preference pairs (data.PAIR_SOURCES), else text
  learns_from_rollouts: ClassVar[bool] = False  # its batches are rollouts of prompts (data.PROMPT_SOURCES, llm_jax.rollout)

  def __init__(self, config):
    self.config = config

  @classmethod
  def check_config(cls, config) -> None:
    """The fields this objective reads; ConfigError naming the first bad one. Called before anything is built."""
    del config

  @classmethod
  def batch_fields(cls, config) -> dict[str, tuple[tuple[int, ...], object]]:
    """Batch arrays this objective reads beyond the text batch's (inputs, targets, segment_ids, positions,
    loss_mask): {name: (shape after the batch axis, dtype)}; the dry run compiles the step with them."""
    del config
    return {}

  def reference_kind(self) -> str | None:
    """None | 'copy' | 'lora_base': the frozen reference this objective needs under its config."""
    return None

  def prepare(self, batch: dict, step) -> dict:
    del step
    return batch

  def count(self, batch: dict) -> jax.Array:
    raise NotImplementedError

  def tokens(self, batch: dict) -> jax.Array:
    """The normaliser of the auxiliary terms: the real tokens (segment id > 0) of the whole step's batch, the
    tokens a mixture of experts routes, whatever `count` is."""
    return jnp.maximum(jnp.sum((batch['segment_ids'] > 0).astype(jnp.float32)), 1.0)

  def loss(self, model, params, batch: dict, reference=None) -> Loss:
    raise NotImplementedError

  def eval_sums(self, model, params, batch: dict, reference=None) -> dict[str, jax.Array]:
    raise NotImplementedError

  def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
    raise NotImplementedError


def apply_with_aux(model, params, batch: dict, reduce=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(logits, {name: summed auxiliary term}) of `model` on the batch; {} when the model sows nothing.
  With `reduce` (reducer, extra), the per-token values of the reducer instead of the logits (see `per_token`)."""
  logits, state = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'],
                              reduce=reduce, mutable=[AUX_COLLECTION])
  sown = state.get(AUX_COLLECTION, {})
  terms = {}
  for path, value in jax.tree_util.tree_leaves_with_path(sown):
    # a sown value is stored as a tuple (one entry per call); the name is the sow's, its module path dropped
    name = str(getattr(path[-2] if len(path) > 1 else path[-1], 'key', path[-1]))
    terms[name] = terms.get(name, jnp.zeros((), jnp.float32)) + jnp.sum(value).astype(jnp.float32)
  return logits, terms


def with_aux(total: jax.Array, metrics: dict[str, jax.Array], terms: dict[str, jax.Array]) -> Loss:
  """The Loss of the objective's total and metrics with the model's auxiliary terms (`Loss.value` adds them)."""
  return Loss(total, metrics, dict(terms))


def per_token(model, params, batch: dict, reducer, extra):
  """reducer(logits [B,C,V], extra [B,C,...]) over every token of the batch, without the aux terms: the model
  computes the logits in config.model.logits_chunks chunks (model/output_head.py), never all at once."""
  return model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'],
                     reduce=(reducer, extra))


def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position in float32: [B,T,V], [B,T] -> [B,T]."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]

