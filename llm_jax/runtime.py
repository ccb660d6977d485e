"""The inference runtime: a model on a device mesh, its parameter shardings and its jitted scoring and decoding,
without an optimizer or a train step. The `train.Trainer` builds on it (adding the optimizer, the state and the
train step); generate, evaluate, the lm-evaluation-harness backend and the decode benchmark use it alone, through
`llm_jax.workdir.load_workdir`, which adds a workdir's parameters and tokenizer.

  Runtime(config, workdir, devices)        mesh, rules, model, param_shardings, batch_sharding, data_slice
    .abstract_params()                     ShapeDtypeStructs with shardings: a restore target that allocates nothing
    .eval_step(params, batch, index=0, reference=None)   the objective's named sums of one batch, jitted
    .evaluate(params, num_batches=None, reference=None)  the objective's eval row (clm: eval_loss, eval_perplexity, ...)
    .token_logprobs(params, inputs, targets, segment_ids, positions)
                                           log p(target) and "target is the argmax" per position, jitted
    .put(batch), .iterator(split, start_step)         this process's slice of a global batch onto the mesh

Building one compiles nothing: the steps are jitted lazily on first use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import validation
from llm_jax import data
from llm_jax import decoding
from llm_jax import objectives
from llm_jax import sharding
from llm_jax import xla_options
from llm_jax.model import Transformer, TransformerConfig
from llm_jax.model import attention
from llm_jax.model.partitioning import activation_sharding


def create_model(config, decode: bool = False, platform: str = '') -> Transformer:
  """The model of `config`; `platform` ('tpu', 'gpu', 'cpu') is what config.model.attention='auto' resolves for
  ('' = the default backend): a Runtime passes its mesh's."""
  cfg = dataclasses.replace(TransformerConfig.from_config(config), platform=platform)
  return Transformer(cfg, decode=decode)


def _dummy_tokens(config):
  return jnp.zeros((1, min(config.data.seq_len, config.model.max_seq_len)), jnp.int32)


def init_params_fn(config, model: Transformer) -> Callable[[jax.Array], Any]:
  """rng -> boxed parameters (with logical axis names)."""
  return lambda rng: model.init(rng, _dummy_tokens(config))['params']


def abstract_params(config, model=None, mesh=None) -> Any:
  """ShapeDtypeStructs of the parameters (with shardings when a mesh is given); allocates nothing."""
  model = model or create_model(config)
  boxed = jax.eval_shape(init_params_fn(config, model), jax.random.key(0))
  shapes = nn.unbox(boxed)
  if mesh is None:
    return shapes
  shardings = sharding.logical_shardings(boxed, mesh, sharding.rules_of(config))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


token_losses = objectives.token_losses  # re-exported: the clm loss per token lives with its objective


def sharding_context(mesh, rules):
  """Activation sharding constraints on `mesh` (nothing when mesh is None)."""
  return activation_sharding(mesh, rules) if mesh is not None else contextlib.nullcontext()


def make_eval_step(config, model, mesh=None, objective=None):
  """(params, batch, index, reference=None) -> the objective's named sums of one eval batch (clm/mlm: loss,
  tokens, correct; mlm counts masked positions only). `index` is the eval batch's number: mlm masks each eval
  batch differently, but the same in every evaluation."""
  objective = objective or objectives.make(config)
  rules = sharding.rules_of(config)

  def step(params, batch, index=0, reference=None):
    with sharding_context(mesh, rules):
      batch = objective.prepare(batch, objectives.EVAL_STEP - index)
      return objective.eval_sums(model, params, batch, reference)

  return step


def make_token_logprobs(config, model, mesh=None):
  """(params, inputs, targets, segment_ids, positions) [B,T] -> (log p(target) [B,T] float32, target is the
  argmax [B,T] bool): what lm-evaluation-harness asks of a model (loglikelihood and is_greedy)."""
  rules = sharding.rules_of(config)

  def step(params, inputs, targets, segment_ids, positions):
    with sharding_context(mesh, rules):
      logits = model.apply({'params': params}, inputs, segment_ids, positions).astype(jnp.float32)
      logprobs = jax.nn.log_softmax(logits, axis=-1)
      target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
      return target_logprobs, jnp.argmax(logprobs, axis=-1) == targets

  return step


@dataclasses.dataclass
class Runtime:
  """A model on a mesh with its parameter shardings and jitted eval / scoring steps (no optimizer)."""
  config: Any
  workdir: str
  devices: list | None = None
  validated: bool = False  # the caller already ran config.validate for these devices (train_and_evaluate does)

  def __post_init__(self):
    devices = list(self.devices if self.devices is not None else jax.devices())
    if not self.validated:
      validation.validate(self.config, len(devices))
    self.mesh = sharding.make_mesh(self.config, devices)
    self.rules = sharding.rules_of(self.config)
    # Kernels are chosen for the mesh's devices, which an ahead-of-time compile takes from a target, not the host.
    self.model = create_model(self.config, platform=attention.platform_of(self.mesh.devices.flat))
    self.model_config = self.model.cfg
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    # (index, count): the slice of every global batch this process feeds (one process: the whole batch)
    self.data_slice = sharding.process_batch_slice(self.mesh, self.config.data.global_batch_size)
    boxed = jax.eval_shape(init_params_fn(self.config, self.model), jax.random.key(0))
    self.param_shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
    replicated = sharding.replicated(self.mesh)
    self.compiler_options = xla_options.compiler_options(self.config)  # config.xla.options, per jit
    self.objective = objectives.make(self.config)
    # the reference (dpo without LoRA) is sharded like the parameters; None (no leaves) otherwise
    reference_shardings = self.param_shardings if self.objective.reference_kind() == 'copy' else None
    eval_step = jax.jit(make_eval_step(self.config, self.model, self.mesh, self.objective),
                        in_shardings=(self.param_shardings, self.batch_sharding, replicated, reference_shardings),
                        out_shardings=replicated, compiler_options=self.compiler_options)
    self.eval_step = lambda params, batch, index=0, reference=None: eval_step(params, batch, jnp.int32(index),
                                                                               reference)
    self._token_logprobs = jax.jit(make_token_logprobs(self.config, self.model, self.mesh),
                                   in_shardings=(self.param_shardings,) + (self.batch_sharding,) * 4,
                                   out_shardings=replicated)

  def abstract_params(self) -> Any:
    """ShapeDtypeStructs of the parameters with their shardings: a restore target that allocates nothing."""
    return abstract_params(self.config, self.model, self.mesh)

  def put(self, batch) -> dict[str, jax.Array]:
    return sharding.put_batch(batch, self.mesh, self.data_slice[1])

  def iterator(self, split: str, start_step: int):
    """This process's slices of batches start_step, start_step + 1, ... of `split`."""
    return data.make_iterator(self.config, split, start_step, *self.data_slice, self.workdir)

  def evaluate(self, params, num_batches: int | None = None, reference=None) -> dict[str, float]:
    """The objective's eval row over the first `eval.steps` batches of the eval split (clm/mlm: eval_loss,
    eval_perplexity, eval_tokens, eval_accuracy; dpo: eval_loss, eval_rewards/..., eval_pairs)."""
    num_batches = num_batches or self.config.eval.steps
    iterator = self.iterator(self.config.data.eval_split, 0)
    totals: dict[str, float] = {}
    for index, batch in zip(range(num_batches), iterator):
      sums = jax.device_get(self.eval_step(params, self.put(batch), index, reference))
      for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + float(value)
    return self.objective.eval_metrics(totals)

  @property
  def row_multiple(self) -> int:
    """Rows of a scoring batch must be a multiple of this (the mesh's data * expert * fsdp: the batch axes)."""
    return math.prod(self.mesh.shape[axis] for axis in sharding.BATCH_AXES)

  def token_logprobs(self, params, inputs, targets, segment_ids=None, positions=None):
    """Host arrays [B,T] (B a multiple of row_multiple) -> numpy (log p(target), is argmax) [B,T]. One process
    (the rows are this process's, as with `put`; the outputs are the global batch's).

    segment_ids default to 1 everywhere (one document a row), positions to 0..T-1.
    """
    inputs = np.asarray(inputs, np.int32)
    if segment_ids is None:
      segment_ids = np.ones_like(inputs)
    if positions is None:
      positions = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
    batch = self.put(dict(inputs=inputs, targets=np.asarray(targets, np.int32),
                          segment_ids=np.asarray(segment_ids, np.int32), positions=np.asarray(positions, np.int32)))
    logprobs, greedy = self._token_logprobs(params, batch['inputs'], batch['targets'], batch['segment_ids'],
                                            batch['positions'])
    return np.asarray(jax.device_get(logprobs)), np.asarray(jax.device_get(greedy))
