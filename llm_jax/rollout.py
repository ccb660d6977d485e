"""The rollout stage of learning from rewards (model.objective=grpo): the loop's batch source when the objective
learns from rollouts (llm_jax.train.Loop asks it for the batch of each step, with the current state).

Rollout r (train steps r * grpo.steps_per_rollout ... of it train on the same rollout; its log-probs are the old
policy of the clipped ratio):

  1. prompts    grpo.prompts_per_rollout records of the train split, a pure function of (data.seed, r)
                (llm_jax.data.prompts.batch_indices)
  2. sample     grpo.group_size completions of each through the serving engine (llm_jax.serving.Engine), on the
                very parameters being trained (Engine.set_params: no copy, no recompile; the engine lives as long
                as the run), seeded by (train.seed, r, prompt): a resumed run samples the same completions
  3. score      the reward functions (llm_jax.rewards), weighted and summed
  4. advantages reward minus its group's mean, divided by the group's (or the rollout's) standard deviation + 1e-4
                (grpo.scale_rewards), as TRL computes them; under grpo.dynamic_sampling, groups whose rewards are
                all equal are dropped and further prompts sampled (up to grpo.max_rollout_attempts rollouts)
  5. batch      one row a completion (prompt then completion, padded to data.seq_len), the completion's targets in
                loss_mask (none of a truncated one under grpo.mask_truncated_completions), advantages, and
                old_logps: a forward of the same parameters (the training model's, so the first step's ratio is 1)

With grpo.steps_per_rollout > 1 the rollout is kept in <workdir>/rollouts/current.npz, so a run resumed in the
middle of a rollout trains on the same one. Every grpo.log_samples_every rollouts, grpo.log_samples completions with
their rewards go to <workdir>/rollouts.jsonl. `metrics()` is the last rollout's row (reward, reward_std,
reward/<name>, advantage_std, completion_length, completion_length_max, truncated, zero_std_groups,
rollout_tokens_per_s); `evaluate(params)` scores greedy completions of the eval prompts (eval_reward, ...).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import rewards as rewards_lib
from llm_jax import runtime as runtime_lib
from llm_jax import sharding
from llm_jax import storage
from llm_jax.data import prompts as prompts_lib
from llm_jax.objectives import base
from llm_jax.serving import Engine, EngineConfig, SamplingParams

ROLLOUT_STREAM = 0x6c6a  # folded into the sampling seeds, apart from other uses of train.seed


def advantages_of(rewards: np.ndarray, group_size: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
  """(advantages [N], the std each was divided by [N]) of rewards [N] in groups of group_size (TRL's)."""
  grouped = rewards.reshape(-1, group_size)
  mean = np.repeat(grouped.mean(1), group_size)
  if scale == 'batch':
    std = np.full_like(rewards, rewards.std(ddof=1) if rewards.size > 1 else 0.0)
  else:
    std = np.repeat(grouped.std(1, ddof=1), group_size)
  advantages = rewards - mean
  if scale != 'none':
    advantages = advantages / (std + 1e-4)
  return advantages, std


class RolloutStage:
  """The batches of a GRPO run (module docstring): `batch(index, params)` for train step `index` (0-based)."""

  def __init__(self, trainer, workdir: str):
    self.trainer, self.config, self.workdir = trainer, trainer.config, workdir
    self.g = self.config.grpo
    self.tokenizer, self.prompts = prompts_lib.load(self.config, workdir)
    self.rewards = rewards_lib.make(self.config)
    self.seq_len = self.config.data.seq_len
    self.rows = self.g.prompts_per_rollout * self.g.group_size
    self.pad_id = max(self.tokenizer.pad_id, 0) if hasattr(self.tokenizer, 'pad_id') else 0
    self.engine = None
    self._current: tuple[int, dict] | None = None  # (rollout index, host batch)
    self._metrics: dict[str, float] = {}
    temperature = self.g.temperature

    def logps(params, batch):
      with runtime_lib.sharding_context(trainer.mesh, trainer.rules):
        logits = trainer.model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'])
        return base.target_logprobs(logits.astype(jnp.float32) / temperature, batch['targets'])

    self._logps = jax.jit(logps, in_shardings=(trainer.param_shardings, trainer.batch_sharding),
                          out_shardings=sharding.replicated(trainer.mesh))

  # --- the engine ---------------------------------------------------------------------------------------------------
  def _engine(self, params) -> Engine:
    if self.engine is None:
      page = 16
      rows = min(self.rows, 64)
      config = EngineConfig(page_size=page, num_pages=rows * -(-self.seq_len // page) + 2, max_seqs=rows,
                            max_queue=max(self.rows, len(self.prompts['validation']), self.g.eval_prompts) + 1,
                            max_model_len=self.seq_len)
      self.engine = Engine(self.trainer.model_config, params, self.tokenizer, config, self.trainer.mesh,
                           self.trainer.rules)
    else:
      self.engine.set_params(params)
    return self.engine

  def _sample(self, params, records, settings) -> list[list[tuple[list[int], bool]]]:
    """[(completion ids, truncated)] of each record's completions."""
    engine = self._engine(params)
    outs = engine.generate([list(r.ids) for r in records], settings)
    engine.set_params({})  # hold no reference to parameters the next train step donates
    return [[(list(c.token_ids), c.finish_reason == 'length') for c in out.outputs] for out in outs]

  # --- one rollout --------------------------------------------------------------------------------------------------
  def _sampling(self, record, seed: int, n: int, greedy: bool = False) -> SamplingParams:
    room = self.seq_len - len(record.ids)
    return SamplingParams(max_tokens=min(self.g.max_completion_tokens, room), n=n, seed=seed,
                          temperature=0.0 if greedy else self.g.temperature, top_p=self.g.top_p, top_k=self.g.top_k)

  def _groups(self, params, r: int, attempt: int):
    """The groups of one sampling round: records, completions, rewards per function."""
    train = self.prompts['train']
    index = r * self.g.max_rollout_attempts + attempt if self.g.dynamic_sampling else r
    records = [train[i] for i in prompts_lib.batch_indices(len(train), self.g.prompts_per_rollout,
                                                           self.config.data.seed, index)]
    seeds = [int(np.random.default_rng([self.config.train.seed, ROLLOUT_STREAM, index, i]).integers(2 ** 31))
             for i in range(len(records))]
    completions = self._sample(params, records, [self._sampling(rec, s, self.g.group_size)
                                                 for rec, s in zip(records, seeds)])
    groups = []
    for record, group in zip(records, completions):
      texts = [self._decode(ids) for ids, _ in group]
      scores = self.rewards([record.text] * len(group), texts, [record.fields] * len(group),
                            [len(ids) for ids, _ in group], [record.where] * len(group))
      groups.append(dict(record=record, completions=group, texts=texts, scores=scores))
    return groups

  def _decode(self, ids: list[int]) -> str:
    eos = self.tokenizer.eos_id
    return self.tokenizer.decode([t for t in ids if t != eos])

  def make(self, r: int, params) -> dict[str, np.ndarray]:
    """The host batch of rollout r on `params` (module docstring), and its metrics in `metrics()`."""
    start = time.perf_counter()
    kept, equal, generated = [], [], 0
    for attempt in range(self.g.max_rollout_attempts if self.g.dynamic_sampling else 1):
      for group in self._groups(params, r, attempt):
        generated += sum(len(ids) for ids, _ in group['completions'])
        total = self.rewards.total(group['scores'])
        if self.g.dynamic_sampling and np.allclose(total, total[0]):
          equal.append(group)
        else:
          kept.append(group)
      if len(kept) >= self.g.prompts_per_rollout:
        break
    groups = (kept + equal)[:self.g.prompts_per_rollout]
    elapsed = time.perf_counter() - start
    scores = np.concatenate([g['scores'] for g in groups])  # [N, F]
    total = self.rewards.total(scores)
    advantages, _ = advantages_of(total, self.g.group_size, self.g.scale_rewards)
    batch = self._rows(groups, advantages)
    batch['old_logps'] = np.asarray(jax.device_get(self._logps(params, self.trainer.put(self.mine(
        {k: batch[k] for k in ('inputs', 'targets', 'segment_ids', 'positions')})))), np.float32)
    lengths = np.asarray([len(ids) for g in groups for ids, _ in g['completions']])
    truncated = np.asarray([t for g in groups for _, t in g['completions']])
    grouped_std = total.reshape(-1, self.g.group_size).std(1)
    self._metrics = dict(reward=float(total.mean()), reward_std=float(total.std(ddof=1)),
                         advantage_std=float(advantages.std(ddof=1)), completion_length=float(lengths.mean()),
                         completion_length_max=int(lengths.max()), truncated=float(truncated.mean()),
                         zero_std_groups=float(np.mean(np.isclose(grouped_std, 0.0))),
                         rollout_tokens_per_s=generated / elapsed if elapsed > 0 else None)
    for j, name in enumerate(self.rewards.names):
      self._metrics[f'reward/{name}'] = float(scores[:, j].mean())
      self._metrics[f'reward/{name}_std'] = float(scores[:, j].std(ddof=1))
    every = self.g.log_samples_every
    if every and (r + 1) % every == 0 and jax.process_index() == 0:
      self._log_samples(r, groups, total, advantages)
    return batch

  def _rows(self, groups, advantages) -> dict[str, np.ndarray]:
    rows, length = self.rows, self.seq_len
    batch = dict(inputs=np.full((rows, length), self.pad_id, np.int32), targets=np.zeros((rows, length), np.int32),
                 segment_ids=np.zeros((rows, length), np.int32), positions=np.zeros((rows, length), np.int32),
                 loss_mask=np.zeros((rows, length), np.float32), advantages=np.asarray(advantages, np.float32)[:, None])
    i = 0
    for group in groups:
      prompt = list(group['record'].ids)
      for ids, truncated in group['completions']:
        full = (prompt + ids)[:length + 1]
        n = len(full) - 1
        batch['inputs'][i, :n] = full[:-1]
        batch['targets'][i, :n] = full[1:]
        batch['segment_ids'][i, :n] = 1
        batch['positions'][i, :n] = np.arange(n)
        if not (truncated and self.g.mask_truncated_completions):
          batch['loss_mask'][i, len(prompt) - 1:n] = 1.0
        i += 1
    return batch

  def _log_samples(self, r, groups, total, advantages) -> None:
    """grpo.log_samples completions of rollout r with their rewards, appended to <workdir>/rollouts.jsonl."""
    lines, k = [], 0
    for group in groups:
      for c, (text, (_, truncated)) in enumerate(zip(group['texts'], group['completions'])):
        if len(lines) < self.g.log_samples:
          lines.append(json.dumps(dict(
              rollout=r, where=group['record'].where, prompt=group['record'].text, completion=text,
              rewards=dict(zip(self.rewards.names, group['scores'][c].tolist())), reward=float(total[k]),
              advantage=float(advantages[k]), truncated=bool(truncated))))
        k += 1
    storage.append_text(storage.join(self.workdir, 'rollouts.jsonl'), ''.join(line + '\n' for line in lines))

  # --- what the loop calls ------------------------------------------------------------------------------------------
  def mine(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global batch (every process makes the whole rollout, with the same seeds; each
    feeds its slice, as the data iterators do)."""
    index, count = self.trainer.data_slice
    per = self.rows // count
    return {k: v[index * per:(index + 1) * per] for k, v in batch.items()}

  def start(self, step: int) -> None:
    """Before training from `step` (a resume): rollouts.jsonl keeps only the samples of rollouts this run will not
    log again (as metrics.jsonl drops the rows beyond the restored step)."""
    path = storage.join(self.workdir, 'rollouts.jsonl')
    if jax.process_index() or not step or not storage.exists(path):
      return
    spr = self.g.steps_per_rollout
    keep_below = step // spr + (1 if step % spr else 0)  # a rollout resumed inside is read back, not logged again
    lines = storage.read_text(path).splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)['rollout'] < keep_below]
    if len(kept) != len(lines):
      storage.write_text(path, ''.join(line + '\n' for line in kept))

  def _stored_path(self) -> str:
    return storage.join(self.workdir, 'rollouts', 'current.npz')

  def batch(self, index: int, params) -> dict[str, np.ndarray]:
    """The global host batch of train step `index` (0-based): rollout index // steps_per_rollout, made on `params` at
    its first step (or read back from the workdir after a resume inside it). The loop feeds `mine` of it."""
    r = index // self.g.steps_per_rollout
    if self._current is None or self._current[0] != r:
      batch = self._read(r) if index % self.g.steps_per_rollout else None
      if batch is None:
        batch = self.make(r, params)
        if self.g.steps_per_rollout > 1 and jax.process_index() == 0:
          self._write(r, batch)
      self._current = (r, batch)
    return self._current[1]

  def _write(self, r: int, batch) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, rollout=np.int64(r), metrics=np.asarray(json.dumps(self._metrics)), **batch)
    storage.write_bytes(self._stored_path(), buffer.getvalue())

  def _read(self, r: int) -> dict[str, np.ndarray] | None:
    path = self._stored_path()
    if not storage.exists(path):
      return None
    with np.load(io.BytesIO(storage.read_bytes(path))) as stored:
      if int(stored['rollout']) != r:
        return None
      self._metrics = json.loads(str(stored['metrics']))  # the rollout's own row, as logged before the stop
      return {k: stored[k] for k in stored.files if k not in ('rollout', 'metrics')}

  def metrics(self) -> dict[str, float]:
    return dict(self._metrics)

  def evaluate(self, params) -> dict[str, float]:
    """Greedy completions of the first grpo.eval_prompts prompts of the eval split (the train split's when it has
    none), scored: eval_reward and eval_reward/<name>."""
    records = (self.prompts['validation'] or self.prompts['train'])[:self.g.eval_prompts]
    completions = self._sample(params, records, [self._sampling(rec, 0, 1, greedy=True) for rec in records])
    texts = [self._decode(group[0][0]) for group in completions]
    scores = self.rewards([r.text for r in records], texts, [r.fields for r in records],
                          [len(group[0][0]) for group in completions], [r.where for r in records])
    row = dict(eval_reward=float(self.rewards.total(scores).mean()), eval_prompts=len(records))
    for j, name in enumerate(self.rewards.names):
      row[f'eval_reward/{name}'] = float(scores[:, j].mean())
    return row
