"""Training: the state, the pure train/eval steps, and the loop with its periodic actions.

  Trainer(config, workdir, devices)   the inference runtime (llm_jax.runtime: mesh, model, parameter shardings,
                                      eval_step, evaluate) plus the optimizer, the state shardings and train_step
  train_step(state, batch) -> (state, metrics)   jitted once, with shardings and the state donated
  Loop(trainer, manager, writer, state, hooks).run()   step, then the hooks that are due, in list order

Hooks are the loop's periodic actions (default_hooks: LogMetrics, SaveCheckpoint, Evaluate, GenerationTasks,
HarnessTasks, SaveOnPreemption). A hook is a `Hook` with a cadence `every` (or its own `due(loop, step)`), an action
`__call__(loop, step)` run after step `step` (steps done, 1-based) and `end(loop)` run once after the last step;
`every(n, fn)` makes one from a function. Adding one is one line in default_hooks, or
`train_and_evaluate(..., hooks=[every(10, fn)])`. Non-finite values are checked one step late (so checking never
stalls the device queue); a hook that reads or saves the state calls `loop.require_finite()` first. A hook ends
the run with `loop.stop(**result)` (preemption does).

An objective that learns from rollouts (grpo) gets its batches from the rollout stage (llm_jax.rollout: prompts ->
the serving engine on the current parameters -> rewards -> advantages) instead of the data iterator; the step, the
hooks, checkpoints and resume are this loop's, unchanged (an RL recipe is a rollout stage plus an objective).

The loop resumes from the latest complete checkpoint in the workdir, else initialises from
config.train.init_from, else from scratch; the data iterator starts at the restored step, so a resumed run
produces the same losses as an uninterrupted one. TensorFlow is never imported here (only the text data
sources use it), so training on the synthetic source runs where TensorFlow is absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax import data
from llm_jax import metrics as metrics_lib
from llm_jax import objectives
from llm_jax import optim
from llm_jax import profiling
from llm_jax import rollout as rollout_lib
from llm_jax import runtime as runtime_lib
from llm_jax import serving
from llm_jax import sharding
from llm_jax import storage
from llm_jax import tasks
from llm_jax import tracking
from llm_jax.model import lora as lora_lib
from llm_jax.model import moe
# re-exported: the model-building functions live with the inference runtime, which the Trainer builds on
from llm_jax.runtime import abstract_params, create_model, init_params_fn, make_eval_step, token_losses  # noqa: F401
from llm_jax.errors import UserError
from llm_jax.data import preference as preference_data


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # The frozen reference of an objective that needs one (dpo: a copy of the initial parameters), never in the
  # optimizer nor in checkpoints: a resume rebuilds it from its source (init_from, or the fresh initialisation).
  reference: Any = None


class NonFiniteError(UserError, FloatingPointError):
  """Loss or gradients became NaN/Inf; the message names the step."""


class IncompatibleCheckpointError(UserError, ValueError):
  """A checkpoint does not fit the model config or tokenizer it is loaded into; the message names the field."""


def state_init_fn(config, model, optimizer) -> Callable[[jax.Array], TrainState]:
  """rng -> boxed TrainState; the moments inherit the logical axis names of their parameters."""
  params_fn = init_params_fn(config, model)
  objective = objectives.make(config)
  keeps_copy = objective.reference_kind() == 'copy'

  def init_fn(rng):
    params = params_fn(rng)
    reference = objective.reference_params(params) if keeps_copy else None  # a fresh run's starting point
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      reference=reference)

  return init_fn


def loss_sum(params, batch, model) -> jax.Array:
  """Sum of masked token losses of the clm objective (tests and FLOP counts use it as the plain LM loss)."""
  logits = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'])
  return jnp.sum(token_losses(logits, batch['targets']) * batch['loss_mask'])


def _microbatches(batch, accum: int):
  """[B, T] -> [accum, B/accum, T], taking rows i::accum so each device keeps its own rows (no resharding)."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(config, model, optimizer, mesh=None, objective=None):
  """The pure step of `objective` (default: config.model.objective's, llm_jax.objectives). The loss is the
  objective's total divided by its count over the whole step (target tokens, or pairs), plus the model's
  auxiliary terms (MoE) divided by the step's real tokens (`objective.tokens`: a per-token mean under every
  objective), so accumulating k microbatches gives exactly the gradient of one step on the whole batch. Every
  metric the objective names is returned with the same division (clm: `loss` is the cross-entropy, `z_loss` the
  z-loss term), the auxiliary terms as aux/<name>."""
  objective = objective or objectives.make(config)
  accum = config.train.grad_accum_steps
  skip_nonfinite = config.train.nonfinite == 'skip'
  schedule = optim.make_schedule(config.train)
  rules = sharding.rules_of(config)

  def step(state: TrainState, batch):
    with runtime_lib.sharding_context(mesh, rules):
      batch = objective.prepare(batch, state.step)  # clm: as is; mlm: masking of (seed, step)
      count, tokens = objective.count(batch), objective.tokens(batch)

      def value(p, mb):  # (what is differentiated, the named metrics)
        out = objective.loss(model, p, mb, state.reference)
        return out.value(count, tokens), out.step_metrics(count, tokens)

      grad_fn = jax.value_and_grad(value, has_aux=True)
      if accum == 1:
        (_, parts), grads = grad_fn(state.params, batch)
      else:
        def body(carry, microbatch):
          parts_acc, grads_acc = carry
          (_, parts_mb), grads_mb = grad_fn(state.params, microbatch)
          return (jax.tree.map(jnp.add, parts_acc, parts_mb), jax.tree.map(jnp.add, grads_acc, grads_mb)), None
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], _microbatches(batch, accum)))
        no_parts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0][1])
        (parts, grads), _ = jax.lax.scan(body, (no_parts, zeros), _microbatches(batch, accum))
      if config.lora.rank:  # frozen base: no gradient (XLA drops its computation), parameters kept bit-identical
        trainable = lora_lib.trainable_mask(grads)
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
      # One pass over the gradients: per-leaf sums of squares give the global norm (logged, and reused by the
      # clip) and, only read by the host after a failure, which gradients are non-finite.
      squared = optim.squared_norms(grads)
      grad_norm = optim.norm_of(squared)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params, global_norm=grad_norm)
      learning_rate = schedule(state.step)  # a function of the step alone (optim module docstring)
      params = optax.apply_updates(state.params, jax.tree.map(lambda u: -learning_rate * u, updates))
      if config.lora.rank:
        params = jax.tree.map(lambda new, old, t: new if t else old, params, state.params, trainable)
      finite = jnp.isfinite(grad_norm)
      for part in parts.values():
        finite = finite & jnp.isfinite(part)
      if skip_nonfinite:  # keep the old state: the step counter still advances, so the data moves on
        keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
      # param_norm is not here: the loop computes it at log steps only (Trainer.param_norm).
      metrics = dict(parts, grad_norm=grad_norm, learning_rate=learning_rate, finite=finite,
                     target_tokens=count,  # the objective's count: target tokens, or pairs (dpo)
                     grad_squared_norms=jnp.stack(squared))  # [leaves], in leaf order
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


class Preemption:
  """Tells the loop when to save and stop after SIGTERM or Ctrl-C, at a step boundary all processes agree on.

  One process: our own SIGTERM handler sets a flag. Several: JAX's preemption sync manager (started by
  jax.distributed.initialize) catches SIGTERM on any process and picks the same step for all of them;
  `reached(step)` must then be called at every step by every process.

  SIGINT (Ctrl-C) takes the same path: the first one saves at the next step boundary (main then exits with the
  conventional status 130); with several processes it is passed on to this process as SIGTERM, so the sync
  manager agrees on the step. A second SIGINT stops the process at once, without saving: orbax commits a
  checkpoint by renaming its temporary directory when it is complete, so a save cut short is never listed.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self._multi_process = jax.process_count() > 1
    self.signal_name = None  # 'SIGTERM' or 'SIGINT': what asked this process to stop

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    if not self._multi_process:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
    return self

  def uninstall(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _on_sigterm(self, signum, frame):
    self.signal_name = self.signal_name or 'SIGTERM'
    self._event.set()

  def _on_sigint(self, signum, frame):
    if self.signal_name == 'SIGINT':
      print('interrupted again: stopped at once, without saving (complete checkpoints are kept)',
            file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access  (no cleanup that could wait on a save)
    self.signal_name = 'SIGINT'
    if self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption sync manager picks the step for all processes
    else:
      self._event.set()

  def reached(self, step: int) -> bool:
    if self._multi_process:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()


def _tokenizer_fingerprint(workdir: str) -> str | None:
  path = storage.join(workdir, 'tokenizer.fingerprint')
  if storage.exists(path):
    return storage.read_text(path).strip()
  return None


def _check_compatible(meta: dict, config, workdir: str, where: str, resume: bool = False) -> None:
  """A checkpoint must match the model config and tokenizer it is loaded into; name what differs.

  On resume the LoRA rank must match too (init_from loads a base model into a LoRA run on purpose).
  """
  saved_model = meta.get('model') or {}
  saved_rank = (meta.get('lora') or {}).get('rank', 0)
  if resume and saved_rank != config.lora.rank:
    raise IncompatibleCheckpointError(f'config.lora.rank={config.lora.rank} but the checkpoint in {where} was trained with '
                     f'rank {saved_rank}')
  for key in config_lib.SHAPE_FIELDS + config_lib.FUNCTION_FIELDS:
    if key in saved_model and saved_model[key] != config.model[key]:
      raise IncompatibleCheckpointError(f'config.model.{key}={config.model[key]!r} but the checkpoint in {where} was trained with '
                       f'{saved_model[key]!r}')
  saved_fp, current_fp = meta.get('tokenizer_fingerprint'), _tokenizer_fingerprint(workdir)
  if saved_fp and current_fp and saved_fp != current_fp:
    raise IncompatibleCheckpointError(f'tokenizer mismatch: the checkpoint in {where} was trained with tokenizer {saved_fp[:16]}..., '
                     f'but {storage.join(workdir, "tokenizer.model")} is {current_fp[:16]}...')


def _meta(config, workdir) -> dict:
  return dict(model=config.model.to_dict(), lora=config.lora.to_dict(),
              tokenizer_fingerprint=_tokenizer_fingerprint(workdir),
              data_source=config.data.source, data_seed=config.data.seed)


@dataclasses.dataclass
class Trainer(runtime_lib.Runtime):
  """The inference runtime (mesh, model, parameter shardings, eval step; llm_jax.runtime) plus what training
  adds: optimizer, state shardings, the sharded initialiser and the compiled train step. Tests and jobs reuse it."""

  def __post_init__(self):
    super().__post_init__()
    # dpo: a frozen copy of the initial parameters rides in the TrainState (LoRA runs use the base instead)
    self.keeps_reference = self.objective.reference_kind() == 'copy'
    self.optimizer = optim.make_optimizer(  # LoRA: only the adapters train and have optimizer state
        self.config.train, trainable_mask=lora_lib.trainable_mask if self.config.lora.rank else None)
    self._init_fn = state_init_fn(self.config, self.model, self.optimizer)
    abstract_state = jax.eval_shape(self._init_fn, jax.random.key(0))
    self.state_shardings = sharding.logical_shardings(abstract_state, self.mesh, self.rules)
    # The one sharded initialiser: run by fresh_state, shape-evaluated by abstract_state.
    self._sharded_init = jax.jit(lambda rng: nn.unbox(self._init_fn(rng)), out_shardings=self.state_shardings)
    self.train_step = jax.jit(make_train_step(self.config, self.model, self.optimizer, self.mesh, self.objective),
                              in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                              donate_argnums=(0,), compiler_options=self.compiler_options)
    # Global norm of the parameters, for log steps only (the step itself does not spend a pass on it).
    self.param_norm = jax.jit(optax.tree.norm, out_shardings=sharding.replicated(self.mesh))
    # A mixture of experts: the share of top-k assignments each expert gets, per layer, on a batch; log steps only
    # (one forward pass of the last batch, like param_norm: the step spends nothing on it). None when dense.
    self.expert_load = None
    if self.config.model.ffn == 'moe':
      def load(params, batch):
        with runtime_lib.sharding_context(self.mesh, self.rules):
          return moe.expert_load(self.model, params, batch)
      self.expert_load = jax.jit(load, out_shardings=sharding.replicated(self.mesh))
    # '/'-joined names of the parameter leaves, in the order of the step's grad_squared_norms.
    self.param_names = [jax.tree_util.keystr(path, simple=True, separator='/')
                        for path, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_state.params))]

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the state, with its shardings: a restore target that allocates nothing."""
    # eval_shape of the sharded init itself: its outputs carry the shardings (also through optax's empty
    # MaskedNode subtrees of LoRA runs, where a plain tree.map over two trees would not line up).
    return jax.eval_shape(self._sharded_init, jax.random.key(0))

  def fresh_adapters(self):
    """Newly initialised LoRA adapters alone (as in fresh_state): the base initialisation is dead code to XLA,
    so no second copy of the base weights is ever made."""
    _, shardings = lora_lib.split(self.state_shardings.params)
    adapters_only = lambda rng: lora_lib.split(nn.unbox(self._init_fn(rng)).params)[1]
    return jax.jit(adapters_only, out_shardings=shardings)(jax.random.key(self.config.train.seed))

  def reference_of(self, params):
    """The frozen reference made from `params`: a distinct copy (the state is donated, so never an alias) in
    config.dpo.reference_dtype, in the reference's shardings."""
    return jax.jit(self.objective.reference_params, out_shardings=self.state_shardings.reference)(params)

  def fresh_state(self) -> TrainState:
    return self._sharded_init(jax.random.key(self.config.train.seed))


def _restore_or_init(trainer: Trainer, manager) -> TrainState:
  """Newest intact checkpoint in the workdir, else config.train.init_from, else fresh.

  A resume restores straight into the sharded shapes (nothing is initialised first), so it needs no more memory
  than the run itself. A damaged newest step is skipped with a warning (checkpoint.load_newest_intact) and moved
  to checkpoints.damaged/, so that this run can save that step again.
  """
  config, workdir = trainer.config, trainer.workdir
  if manager.all_steps():
    abstract = trainer.abstract_state()

    def load(step, meta):
      _check_compatible(meta, config, workdir, workdir, resume=True)
      try:
        return checkpoint.restore(manager, step, abstract.params, abstract.opt_state)
      except ValueError as e:
        if not checkpoint.is_structure_mismatch(e):
          raise  # a damaged file: the next older step is tried
        differs = checkpoint.mismatch_error(manager, step, abstract.params, e)
        raise IncompatibleCheckpointError(
            f'{checkpoint.checkpoint_dir(workdir)}/{step} does not fit the state this config builds (other '
            f'optimizer or LoRA settings, or a checkpoint from an older llm_jax): {str(differs).split(": ", 1)[1]}'
        ) from None

    step, restored, damaged = checkpoint.load_newest_intact(manager, load, workdir)
    checkpoint.set_aside(manager, workdir, damaged)
    print(f'resuming from {checkpoint.checkpoint_dir(workdir)}/{step}', flush=True)
    reference = None
    if trainer.keeps_reference:  # the run's starting point again, never a checkpoint of this run
      reference = trainer.reference_of(_initial_params(trainer) if config.train.init_from else
                                       trainer.fresh_state().params)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=restored['params'],
                      opt_state=restored['opt_state'], reference=reference)
  if not config.train.init_from:
    return trainer.fresh_state()
  params = _initial_params(trainer)
  opt_state = jax.jit(trainer.optimizer.init, out_shardings=trainer.state_shardings.opt_state)(params)
  reference = trainer.reference_of(params) if trainer.keeps_reference else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, reference=reference)


def _precompute_reference(trainer: Trainer, state: TrainState) -> None:
  """config.dpo.precompute_ref: the reference's summed completion log-probs of every pair (chosen, rejected),
  computed once from the run's starting point (this state's parameters at step 0; on a resume init_from or the
  fresh initialisation again, and only when the stored ones are missing or keyed to another reference or other
  pairs) and stored beside the prepared data (llm_jax.data.preference.store_reference); the batches then carry
  them and the state holds no reference."""
  config = trainer.config
  source = config.train.init_from
  reference = dict(init_from=storage.absolute(source) if source else None,
                   step=checkpoint.latest_step(source) if source else None,
                   seed=None if source else config.train.seed, model=config.model.to_dict(),
                   adapters=config.train.init_from_adapters if source else None)  # merged or kept: other starts
  start: list = []

  def forward(rows):
    if not start:
      start.append(state.params if int(state.step) == 0 else
                   _initial_params(trainer) if source else trainer.fresh_state().params)
    index, count = trainer.data_slice
    per = rows['inputs'].shape[0] // count  # this process's rows of the global chunk, as `put` expects
    mine = {k: v[index * per:(index + 1) * per] for k, v in rows.items()}
    return trainer.token_logprobs(start[0], mine['inputs'], mine['targets'], mine['segment_ids'],
                                  mine['positions'])[0]

  done = preference_data.store_reference(config, trainer.workdir, reference, forward,
                                         write=jax.process_index() == 0)
  _sync_processes('llm_jax_reference_logps')
  print('reference log-probs (config.dpo.precompute_ref): ' +
        ', '.join(f'{split} {how}' for split, how in done.items()), flush=True)


def _source_lora(meta: dict, source: str) -> dict:
  """The LoRA settings the init_from checkpoint was saved with: its meta's (a training run records them), else its
  workdir's config.json (a workdir written by convert), else none."""
  if meta.get('lora'):
    return dict(meta['lora'])
  try:
    return config_lib.load_workdir_config(source).lora.to_dict()
  except FileNotFoundError:
    return dict(rank=0)


def _initial_params(trainer: Trainer):
  """The parameters of config.train.init_from's newest intact checkpoint, as this run's tree.

  A source without adapters loads as it is (a LoRA run adds fresh zero-B adapters). A source with adapters (a LoRA
  run) is restored with them, then, by config.train.init_from_adapters: `merge` folds them into the weights
  (W + A.B.alpha/rank, lora.merge; a LoRA run adds fresh adapters), `keep` starts this LoRA run from them (same
  rank, alpha and targets). A checkpoint whose tree still differs is one error naming the leaves that differ.
  """
  config, workdir = trainer.config, trainer.workdir
  source = config.train.init_from
  if checkpoint.latest_step(source) is None:
    raise IncompatibleCheckpointError(f'config.train.init_from: {source} has no complete checkpoint')
  run_like = trainer.abstract_state().params
  base_like, _ = lora_lib.split(run_like)
  found = {}

  def check(meta):
    _check_compatible(meta, config, workdir, source)
    found.update(lora=_source_lora(meta, source))
    saved = found['lora']
    if not saved.get('rank') or config.train.init_from_adapters != 'keep':
      return
    for field in ('rank', 'alpha', 'targets'):
      if saved.get(field) != config.lora[field]:
        raise IncompatibleCheckpointError(
            f'config.train.init_from_adapters=keep: config.lora.{field}={config.lora[field]!r} but the adapters in '
            f'{source} have {field} {saved.get(field)!r}; set it so, or use merge')

  def like(meta):
    saved = found['lora']
    if not saved.get('rank'):
      return base_like
    if config.train.init_from_adapters == 'keep':
      return run_like
    source_config = config.copy_and_resolve_references()
    source_config.lora.update(rank=saved['rank'], alpha=saved['alpha'], targets=saved['targets'])
    return runtime_lib.abstract_params(source_config, mesh=trainer.mesh)

  # load_params skips a damaged newest step of the source with a warning, as a resume does
  try:
    params, meta = checkpoint.load_params(source, like, check_meta=check)
  except checkpoint.StructureMismatchError as e:
    raise IncompatibleCheckpointError(f'config.train.init_from: {e}') from None
  saved, how = found['lora'], ''
  if saved.get('rank') and config.train.init_from_adapters == 'merge':
    base_shardings, _ = lora_lib.split(trainer.state_shardings.params)
    rank, alpha = saved['rank'], saved['alpha']
    params = jax.jit(lambda p: lora_lib.merge(p, alpha, rank), out_shardings=base_shardings)(params)
    how = f', its rank-{rank} adapters merged into the weights'
  elif saved.get('rank'):
    how = f', continuing its rank-{saved["rank"]} adapters'
  if config.lora.rank and not (saved.get('rank') and config.train.init_from_adapters == 'keep'):
    params = lora_lib.combine(params, trainer.fresh_adapters())  # fresh (zero-B) adapters on that base
  print(f'initialised parameters from {source} (step {meta.get("step")}{how})', flush=True)
  return params


def _check_workdir_path(workdir: str) -> str:
  """A local path (made absolute) or a gs:// / s3:// URL (docs/storage.md); other schemes are refused."""
  if '://' in workdir and not storage.is_url(workdir):
    raise config_lib.ConfigError(f'--workdir={workdir}: unknown URL scheme; use a local path, gs://bucket/... or '
                                 f's3://bucket/...')
  return storage.absolute(workdir)


def train_and_evaluate(config, workdir: str, devices=None, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
  """Trains config.train.steps steps in `workdir` (resuming if it has checkpoints). Returns the last metrics.

  `hooks` run after the built-in ones (default_hooks) at every step where they are due.
  """
  workdir = _check_workdir_path(workdir)
  validation.validate(config, len(devices) if devices is not None else jax.device_count())  # before any work
  is_writer = jax.process_index() == 0
  if is_writer:
    checkpoint.check_writable(workdir)
    data.prepare(config, workdir)  # process 0 prepares; the others then find it done and only verify
  _sync_processes('llm_jax_prepared')
  if not is_writer:
    data.prepare(config, workdir)
  for field in ('task_file', 'harness_tasks'):
    if config.eval[field] and not (config.data.tokenizer_path or _tokenizer_fingerprint(workdir)):
      raise config_lib.ConfigError(f'config.eval.{field}: generation and harness tasks need a tokenizer, and '
                                   f'neither config.data.tokenizer_path nor the workdir has one')
  trainer = Trainer(config, workdir, devices, validated=True)  # validated above, before any work
  manager = checkpoint.make_manager(workdir, config.checkpoint.keep, config.checkpoint.async_save)
  writer = None
  preemption = Preemption().install()
  try:
    state = _restore_or_init(trainer, manager)
    if trainer.objective.reference_kind() == 'precomputed':
      _precompute_reference(trainer, state)
    # Only now, and only when this run trains: a refused resume, or a run with nothing left to do, leaves the
    # workdir's config.json describing the run that made its checkpoints.
    if is_writer and int(state.step) < config.train.steps:
      storage.write_json(storage.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))
    # rows of an earlier attempt beyond the restored step go: metrics.jsonl reads as one uninterrupted run
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_writer, start_step=int(state.step))
    writer = tracking.wrap(writer, config, workdir)  # + Weights & Biases when config.tracking.wandb_project is set
    return Loop(trainer, manager, writer, state, default_hooks(config, preemption) + list(hooks)).run()
  finally:
    preemption.uninstall()
    checkpoint.wait(manager)
    manager.close()
    if writer is not None:
      writer.close()


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Hook:
  """A periodic action of the training loop (the interface every hook implements; see the module docstring).

  `every`: run after each step whose number (steps done, 1-based) is a multiple of it; 0 = never periodically.
  Override `due` for another cadence, `__call__` for the action, `end` for what runs once after the last step.
  A hook that reads or saves the state calls `loop.require_finite()` first.
  """
  every: int = 0

  def due(self, loop: 'Loop', step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def __call__(self, loop: 'Loop', step: int) -> None:
    pass

  def end(self, loop: 'Loop') -> None:
    pass


class _FunctionHook(Hook):

  def __init__(self, n, fn, at_end):
    self.every, self._fn, self._at_end = n, fn, at_end

  def __call__(self, loop, step):
    self._fn(loop, step)

  def end(self, loop):
    if self._at_end is not None:
      self._at_end(loop)


def every(n: int, fn: Callable[['Loop', int], None], at_end: Callable[['Loop'], None] | None = None) -> Hook:
  """A hook from a function: fn(loop, step) after every n-th step, at_end(loop) once after the last step
  (Levanter's add_hook(fn, every=n))."""
  return _FunctionHook(n, fn, at_end)


class LogMetrics(Hook):
  """Every train.log_every steps and at the last step: a train row to metrics.jsonl (the row `loop.last`)."""

  def __init__(self, config):
    self.every = config.train.log_every
    self._nonfinite_skip = config.train.nonfinite == 'skip'
    self._z_loss = bool(config.train.z_loss)

  def due(self, loop, step):
    return step % self.every == 0 or step == loop.total_steps

  def __call__(self, loop, step):
    values = loop.step_metrics()
    tokens_per_s = loop.take_tokens_per_s()
    loop.last = dict(step=step, loss=float(values['loss']), learning_rate=float(values['learning_rate']),
                     grad_norm=float(values['grad_norm']),
                     param_norm=float(loop.trainer.param_norm(loop.state.params)),  # not in the step: log steps only
                     tokens_per_s=tokens_per_s, mfu=loop.mfu(tokens_per_s) if tokens_per_s else None)
    if self._z_loss:
      loop.last['z_loss'] = float(values['z_loss'])
    for name in loop.trainer.objective.train_metrics:  # dpo: rewards/chosen, rewards/accuracies, ...
      loop.last[name] = float(values[name])
    if loop.rollouts is not None:  # grpo: the last rollout's rewards, lengths, rollout_tokens_per_s (llm_jax.rollout)
      loop.last.update(loop.rollouts.metrics())
    for name in sorted(k for k in values if k.startswith('aux/')):  # terms the model sows (objectives.base)
      loop.last[name] = float(values[name])
    if loop.trainer.expert_load is not None:
      # [num_layers][num_experts], each row sums to 1 (balanced: 1/num_experts each; a starved expert: 0)
      load = np.asarray(loop.trainer.expert_load(loop.state.params, loop.last_batch))
      loop.last['expert_load'] = np.round(load, 4).tolist()
      loop.last['expert_load_min'], loop.last['expert_load_max'] = float(load.min()), float(load.max())
    if self._nonfinite_skip:
      loop.last['skipped_steps'] = loop.monitor.skipped_total
    loop.writer.write(loop.last)


class SaveCheckpoint(Hook):
  """Every checkpoint.every steps an (async) orbax checkpoint; at the end one of the last step if missing."""

  def __init__(self, config):
    self.every = config.checkpoint.every
    self.saved_step = None  # the step saved last by this run (so preemption does not save it twice)

  def __call__(self, loop, step):
    self.save(loop, step)

  def save(self, loop, step: int, force: bool = False) -> None:
    loop.require_finite()  # never save a non-finite state
    checkpoint.save(loop.manager, step, loop.state.params, loop.state.opt_state, loop.meta, force=force)
    self.saved_step = step

  def end(self, loop):
    if loop.manager.latest_step() != loop.total_steps:
      self.save(loop, loop.total_steps, force=True)


class Evaluate(Hook):
  """Every eval.every steps (not at the last: `end` does that) and at the end: an eval row (eval_loss, ...)."""

  def __init__(self, config):
    self.every = config.eval.every

  def due(self, loop, step):
    return super().due(loop, step) and step != loop.total_steps

  def __call__(self, loop, step):
    loop.require_finite()
    loop.writer.write(dict(step=step, **loop.evaluate()))

  def end(self, loop):
    row = dict(step=loop.total_steps, **loop.evaluate())
    loop.writer.write(row)
    loop.last.update(row)


class GenerationTasks(Evaluate):
  """At each evaluation: greedy completions of eval.task_file scored by BLEU/ROUGE (tasks.generation_tasks)."""

  def __call__(self, loop, step):
    loop.require_finite()
    trainer = loop.trainer

    def complete(texts, encode, tokenizer):  # the serving engine on the parameters being trained, no copy
      return serving.complete(trainer.model_config, loop.state.params, tokenizer, texts,
                              loop.config.eval.max_new_tokens, encode=encode, mesh=trainer.mesh, rules=trainer.rules)

    tasks.generation_tasks(loop.config, loop.workdir, step, loop.writer, complete)

  def end(self, loop):
    self(loop, loop.total_steps)


class HarnessTasks(Evaluate):
  """At each evaluation: lm-evaluation-harness tasks (eval.harness_tasks) on the current parameters, one row of
  harness/<task>/<metric> values (llm_jax.harness; lm_eval is imported only when this hook is configured)."""

  def __call__(self, loop, step):
    loop.require_finite()
    from llm_jax import harness  # pylint: disable=g-import-not-at-top
    loop.writer.write(harness.loop_row(loop.trainer, loop.state.params, loop.workdir, step))

  def end(self, loop):
    self(loop, loop.total_steps)


class SaveOnPreemption(Hook):
  """After SIGTERM or a first Ctrl-C: save at the step all processes agree on (unless that step was just saved)
  and stop; the result says which signal (`signal`), so that main exits 0 after SIGTERM and 130 after SIGINT."""

  def __init__(self, preemption: 'Preemption', saver: SaveCheckpoint):
    self.preemption, self.saver = preemption, saver

  def due(self, loop, step):
    return True  # Preemption.reached must be called at every step by every process

  def __call__(self, loop, step):
    if not self.preemption.reached(step):
      return
    if self.saver.saved_step != step:
      self.saver.save(loop, step, force=True)
    checkpoint.wait(loop.manager)
    name = self.preemption.signal_name or 'SIGTERM'  # another process's SIGTERM: the sync manager's step
    print(f'{name}: saved step {step} to {checkpoint.checkpoint_dir(loop.workdir)}; exiting', flush=True)
    loop.stop(preempted=True, signal=name)


class Profile(Hook):
  """config.train.profile_steps 'FIRST,LAST': a jax.profiler trace of those steps in <workdir>/profile/
  (llm_jax.profiling.ProfileWindow: started after step FIRST-1, stopped after step LAST)."""

  def __init__(self, config):
    self._steps = profiling.parse_steps(config.train.profile_steps)
    self._window = None

  def due(self, loop, step):
    if self._window is None:
      self._window = profiling.ProfileWindow(*self._steps, storage.join(loop.workdir, 'profile'))
    return self._window.due(step)

  def __call__(self, loop, step):
    self._window.after_step(step, loop.state)

  def end(self, loop):
    if self._window is not None:
      self._window.close()


def default_hooks(config, preemption: 'Preemption') -> list[Hook]:
  """The loop's periodic actions, in the order they run after a step: save before evaluating, so an
  evaluation that fails cannot cost the checkpoint; the profiler window after those (its trace holds the steps,
  not the other hooks' work of the step before); preemption last (it stops the run)."""
  saver = SaveCheckpoint(config)
  hooks = [LogMetrics(config), saver, Evaluate(config)]
  if config.eval.task_file:
    hooks.append(GenerationTasks(config))
  if config.eval.harness_tasks:
    hooks.append(HarnessTasks(config))
  if config.train.profile_steps:
    hooks.append(Profile(config))
  hooks.append(SaveOnPreemption(preemption, saver))
  return hooks


class Loop:
  """The training loop: run the step, then the hooks that are due. What hooks may read and call:

    config, workdir, trainer, manager, writer, meta, total_steps   the run
    state                  the TrainState after the step (its params may be donated by the next step: use now)
    last                   the last train row written (returned by train_and_evaluate, with the final eval row)
    monitor                the NonFiniteMonitor
    require_finite()       checks the step's non-finite flag now (normally checked one step late)
    step_metrics()         the step's metrics on the host (checked for non-finite values)
    take_tokens_per_s()    tokens/s since the last call (the first step, with compilation, is excluded; rollouts
                           are not counted: they report their own rollout_tokens_per_s)
    rollouts               the rollout stage (llm_jax.rollout.RolloutStage) of an objective that learns from
                           rollouts (grpo), the source of its batches; None otherwise
    evaluate()             the eval row of the current parameters (grpo: rewards of greedy completions of the eval
                           prompts)
    stop(**result)         end the run after this step's hooks; `result` is merged into the returned dict
  """

  def __init__(self, trainer: Trainer, manager, writer, state: TrainState, hooks: list[Hook]):
    self.trainer, self.manager, self.writer, self.state = trainer, manager, writer, state
    self.config, self.workdir = trainer.config, trainer.workdir
    self.hooks = list(hooks)
    self.total_steps = self.config.train.steps
    self.meta = _meta(self.config, self.workdir)
    self.monitor = NonFiniteMonitor(self.config.train, trainer.param_names)
    self.last = dict(step=int(state.step))
    self._tokens_per_step = self.config.data.global_batch_size * self.config.data.seq_len
    self._flops_per_token = metrics_lib.flops_per_token(self.config.model, self.config.data.seq_len)
    self._pending = None  # (step index, metrics) of a step whose non-finite flag is not checked yet
    self._index, self._metrics = None, None  # the last step's index (0-based batch number) and metrics
    self.last_batch: dict = {}  # the last step's batch (on device)
    self._interval_start, self._interval_steps = None, 0
    self._stopped = None
    # An RL recipe is a rollout stage plus an objective: the stage makes each step's batch from the current
    # parameters (llm_jax.rollout), everything else (step, hooks, checkpoints, resume) is this loop.
    self.rollouts = (rollout_lib.RolloutStage(trainer, self.workdir) if trainer.objective.learns_from_rollouts
                     else None)
    self._excluded = 0.0  # seconds of the current interval spent in rollouts

  def evaluate(self) -> dict[str, Any]:
    if self.rollouts is not None:
      return self.rollouts.evaluate(self.state.params)
    return self.trainer.evaluate(self.state.params, reference=self.state.reference)

  def _next_batch(self, iterator, index: int):
    if self.rollouts is None:
      return next(iterator)
    start = time.perf_counter()
    batch = self.rollouts.mine(self.rollouts.batch(index, self.state.params))  # this process's rows, as iterators
    self._excluded += time.perf_counter() - start
    return batch

  def add_hook(self, hook: Hook) -> None:
    self.hooks.append(hook)

  def require_finite(self) -> None:
    if self._pending is not None:
      self.monitor.check(*self._pending)
      self._pending = None

  def step_metrics(self) -> dict[str, Any]:
    values = jax.device_get(self._metrics)
    self.monitor.check(self._index, values)
    self._pending = None
    return values

  def take_tokens_per_s(self) -> float | None:
    elapsed = time.perf_counter() - self._interval_start - self._excluded
    steps = self._interval_steps
    self._interval_start, self._interval_steps, self._excluded = time.perf_counter(), 0, 0.0
    return steps * self._tokens_per_step / elapsed if steps else None

  def mfu(self, tokens_per_s: float) -> float | None:
    return metrics_lib.mfu(tokens_per_s, self._flops_per_token, self.trainer.mesh.size)

  def stop(self, **result) -> None:
    self._stopped = result

  def run(self) -> dict[str, Any]:
    start = int(self.state.step)
    iterator = None
    if self.rollouts is None:
      iterator = self.trainer.iterator(self.config.data.train_split, start)
    else:
      self.rollouts.start(start)
    for index in range(start, self.total_steps):
      batch = self.trainer.put(self._next_batch(iterator, index))
      self.state, self._metrics = self.trainer.train_step(self.state, batch)
      self.last_batch = batch  # the batch the metrics are of (LogMetrics' expert load reads it)
      self.require_finite()  # the previous step's flag, read while this step runs
      self._index, self._pending = index, (index, self._metrics)
      if self._interval_start is None:  # the first step includes compilation: time from its end
        jax.block_until_ready(self._metrics)
        self._interval_start, self._excluded = time.perf_counter(), 0.0
      else:
        self._interval_steps += 1
      for hook in self.hooks:
        if hook.due(self, index + 1):
          hook(self, index + 1)
      if self._stopped is not None:
        return dict(self.last, **self._stopped)
    self.require_finite()
    if start < self.total_steps or self.manager.latest_step() != self.total_steps:
      for hook in self.hooks:
        hook.end(self)
    return self.last


class NonFiniteMonitor:
  """Stops the run (policy 'stop') or counts skipped updates (policy 'skip') when loss or gradients are NaN/Inf.

  The step itself computes a `finite` flag (and, under 'skip', keeps the old state); the host checks the flag
  one step late so that checking never stalls the device queue.
  """

  def __init__(self, train_config, param_names=None):
    self.param_names = param_names  # names of the leaves of grad_squared_norms
    self.policy = train_config.nonfinite
    self.max_skips = train_config.max_nonfinite_skips
    self.skips_in_a_row = 0
    self.skipped_total = 0

  def check(self, step: int, step_metrics) -> None:
    if bool(jax.device_get(step_metrics['finite'])):
      self.skips_in_a_row = 0
      return
    loss, grad_norm = (float(jax.device_get(step_metrics[k])) for k in ('loss', 'grad_norm'))
    if self.policy == 'stop':
      squared = np.asarray(jax.device_get(step_metrics['grad_squared_norms']))
      names = self.param_names or [f'leaf {i}' for i in range(len(squared))]
      # a leaf's sum of squares is non-finite iff one of its gradients is (or its norm overflows float32)
      bad = [name for name, value in zip(names, squared) if not np.isfinite(value)]
      listed = ', '.join(bad[:8]) + (f' and {len(bad) - 8} more' if len(bad) > 8 else '')
      raise NonFiniteError(f'non-finite values at step {step + 1} (train batch {step}): loss={loss}, '
                           f'grad_norm={grad_norm}; non-finite gradients: {listed or "none"} '
                           f'(config.train.nonfinite=stop)')
    self.skips_in_a_row += 1
    self.skipped_total += 1
    if self.skips_in_a_row > self.max_skips:
      raise NonFiniteError(f'non-finite values at step {step + 1}: {self.skips_in_a_row} updates in a row were '
                           f'skipped, more than config.train.max_nonfinite_skips={self.max_skips}')
