"""Rewards of completions (model.objective=grpo): a registry of built-ins and user functions, weighted and summed.

A reward function is called once per rollout as f(prompts, completions, **fields) -> one number per completion:
prompts and completions are lists (the record's prompt, text or messages; the completion's text), and each of the
records' other fields (answer, ...) comes as a list of the same length, as TRL calls its reward functions. Built-ins
(config.grpo.rewards):

  exact_answer   1.0 when the completion's final answer equals the record's (config.grpo.answer_field), else 0.0.
                 The final answer of a text (`final_answer`): what follows the last '####' (GSM8K), else the
                 content of the last \\boxed{...} (MATH), else the last number; compared after stripping spaces,
                 a trailing period and thousands commas
  format         1.0 when the whole completion matches config.grpo.format_regex (re.fullmatch, DOTALL), else 0.0
  length         -(completion tokens) / grpo.max_completion_tokens: a penalty on length

A user function is named `module:function` (imported) or `path/to/file.py:function` (loaded from the file), and
logged under its function's name (reward/<function>). It runs
in a worker thread with config.grpo.reward_timeout seconds for the rollout; a function that raises, runs out of
time, returns the wrong count or a value that is not a number is one RewardError naming it (and the record, for a
bad value). `make(config)` gives the run's `Rewards`: names, weights, and __call__ -> per-function rewards [N, F].
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import math
import numbers
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from llm_jax.errors import UserError, fail


class RewardError(UserError, RuntimeError):
  """A reward function failed; the message names it (and the record)."""


_BOXED = re.compile(r'\\boxed\s*\{')
_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


def _last_boxed(text: str) -> str | None:
  """The content of the last \\boxed{...}, braces balanced; None when there is none."""
  starts = [m.end() for m in _BOXED.finditer(text)]
  if not starts:
    return None
  depth, start = 1, starts[-1]
  for i in range(start, len(text)):
    depth += {'{': 1, '}': -1}.get(text[i], 0)
    if depth == 0:
      return text[start:i]
  return None


def _normal(answer: str) -> str:
  answer = answer.strip().rstrip('.').strip()
  if _NUMBER.fullmatch(answer):
    answer = answer.replace(',', '')
  return answer


def final_answer(text: str) -> str | None:
  """The final answer of a text: after the last '####', else the last \\boxed{}, else the last number."""
  if '####' in text:
    return _normal(text.rsplit('####', 1)[1].strip().splitlines()[0] if text.rsplit('####', 1)[1].strip() else '')
  boxed = _last_boxed(text)
  if boxed is not None:
    return _normal(boxed)
  numbers_found = _NUMBER.findall(text)
  return _normal(numbers_found[-1]) if numbers_found else None


def exact_answer(config):
  field = config.grpo.answer_field

  def reward(prompts, completions, **fields):
    if field not in fields:
      raise RewardError(f'exact_answer: the records have no "{field}" field (config.grpo.answer_field); they have '
                        f'{", ".join(fields) or "none"}')
    out = []
    for completion, answer in zip(completions, fields[field]):
      expected = final_answer(str(answer))
      out.append(float(expected is not None and final_answer(completion) == expected))
    return out
  return reward


def format_reward(config):
  pattern = re.compile(config.grpo.format_regex, re.DOTALL)
  return lambda prompts, completions, **fields: [float(bool(pattern.fullmatch(c))) for c in completions]


def length_penalty(config):
  limit = config.grpo.max_completion_tokens
  return lambda prompts, completions, completion_tokens=(), **fields: [-n / limit for n in completion_tokens]


BUILTINS: dict[str, Callable[[Any], Callable]] = {  # name -> factory(config) -> reward function
    'exact_answer': exact_answer,
    'format': format_reward,
    'length': length_penalty,
}


def load_function(name: str) -> Callable:
  """A user reward `module:function` or `path/to/file.py:function`; RewardError naming it when it cannot load."""
  target, sep, attribute = name.rpartition(':')
  if not sep or not target or not attribute:
    raise RewardError(f'config.grpo.rewards: {name!r} is neither a built-in ({", ".join(BUILTINS)}) nor '
                      f'module:function or path.py:function')
  try:
    if target.endswith('.py'):
      if not os.path.exists(target):
        raise RewardError(f'config.grpo.rewards: {name!r}: {target} does not exist')
      spec = importlib.util.spec_from_file_location(f'llm_jax_reward_{os.path.basename(target)[:-3]}', target)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
    else:
      module = importlib.import_module(target)
  except RewardError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the user's module: its import error, named)
    raise RewardError(f'config.grpo.rewards: {name!r}: importing {target} failed: {type(e).__name__}: {e}') from None
  function = getattr(module, attribute, None)
  if not callable(function):
    raise RewardError(f'config.grpo.rewards: {name!r}: {target} has no function {attribute!r}')
  return function


def parse(config) -> tuple[list[str], list[float]]:
  """(names, weights) of config.grpo.rewards and reward_weights; ConfigError naming the field."""
  names = [n.strip() for n in config.grpo.rewards.split(',') if n.strip()]
  if not names:
    fail('grpo.rewards', 'empty: name at least one reward function')
  for name in names:
    if name not in BUILTINS and ':' not in name:
      fail('grpo.rewards', f'{name!r} is neither a built-in ({", ".join(BUILTINS)}) nor module:function or '
           f'path.py:function')
  if config.grpo.reward_weights:
    try:
      weights = [float(w) for w in config.grpo.reward_weights.split(',')]
    except ValueError:
      fail('grpo.reward_weights', f'{config.grpo.reward_weights!r} is not comma-separated numbers')
    if len(weights) != len(names):
      fail('grpo.reward_weights', f'{len(weights)} weights for {len(names)} rewards ({", ".join(names)})')
  else:
    weights = [1.0] * len(names)
  if 'format' in names:
    try:
      re.compile(config.grpo.format_regex)
    except re.error as e:
      fail('grpo.format_regex', f'{config.grpo.format_regex!r} is not a regular expression ({e})')
    if not config.grpo.format_regex:
      fail('grpo.format_regex', 'empty, but grpo.rewards has format')
  if config.grpo.reward_timeout <= 0:
    fail('grpo.reward_timeout', f'must be positive, got {config.grpo.reward_timeout}')
  return names, weights


def short_names(specs: Sequence[str]) -> list[str]:
  """The names rewards are logged under (reward/<name>): a built-in's, a user function's own name (the part after
  the last ':'), or its whole spec where two would share a name."""
  short = [s.rpartition(':')[2] if ':' in s else s for s in specs]
  return [n if short.count(n) == 1 else s for n, s in zip(short, specs)]


def check_config(config) -> None:
  parse(config)


class Rewards:
  """The run's reward functions: `names`, `weights`, and __call__(prompts, completions, fields, tokens) -> [N, F]."""

  def __init__(self, config):
    self.specs, self.weights = parse(config)
    self.functions = [BUILTINS[n](config) if n in BUILTINS else load_function(n) for n in self.specs]
    self.names = short_names(self.specs)
    self.timeout = config.grpo.reward_timeout
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='llm_jax_reward')

  def __call__(self, prompts: Sequence, completions: Sequence[str], fields: Sequence[dict],
               completion_tokens: Sequence[int], wheres: Sequence[str]) -> np.ndarray:
    keys = sorted({k for f in fields for k in f})
    columns = {k: [f.get(k) for f in fields] for k in keys}
    columns['completion_tokens'] = list(completion_tokens)
    out = np.zeros((len(completions), len(self.functions)), np.float64)
    for j, (name, function) in enumerate(zip(self.specs, self.functions)):  # errors name the whole spec
      future = self._pool.submit(function, list(prompts), list(completions), **columns)
      try:
        values = future.result(timeout=self.timeout)
      except concurrent.futures.TimeoutError:
        raise RewardError(f'reward {name}: took more than config.grpo.reward_timeout={self.timeout} s for '
                          f'{len(completions)} completions') from None
      except RewardError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (the user's function: its error, named)
        raise RewardError(f'reward {name} raised {type(e).__name__}: {e} (on the rollout of {wheres[0]}, ...)') from None
      values = list(values) if values is not None else []
      if len(values) != len(completions):
        raise RewardError(f'reward {name} returned {len(values)} values for {len(completions)} completions')
      for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
          raise RewardError(f'reward {name} returned {value!r} for the completion of {wheres[i]}; a reward is a '
                            f'finite number')
        out[i, j] = float(value)
    return out

  def total(self, per_function: np.ndarray) -> np.ndarray:
    return per_function @ np.asarray(self.weights, np.float64)


def make(config) -> Rewards:
  return Rewards(config)
