"""EleutherAI's lm-evaluation-harness on a workdir's checkpoint (HellaSwag, ARC, MMLU, ... or local task YAMLs).

  python -m llm_jax.harness --workdir=W --tasks=T1[,T2] [--include_path=DIR] [--num_fewshot=K] [--limit=N]
      [--batch_size=B] [--output_path=F] [--step=S]

prints lm_eval's `results` dict as JSON on stdout (and writes the whole lm_eval output to --output_path when
given). `LlmJaxLM` is an `lm_eval.api.model.LM` (a TemplateLM), registered in lm_eval's model registry as
`llm_jax` when this module is imported, so `lm_eval.simple_evaluate(model='llm_jax', model_args='workdir=W')`
works too. lm_eval is imported here only: `import llm_jax.train` never needs it (pip extra `eval`).

It follows the conventions of lm_eval's own `hf` backend (with its default add_bos_token=None: the tokenizer's
own behaviour), so the same checkpoint exported with `python -m llm_jax.convert to_hf` scores the same there:

  tok_encode             a text as the tokenizer makes model input (`encode_input`: BOS first where the tokenizer
                         adds one, config.data.add_bos), as transformers' tokenizer(text); plain pieces with
                         add_special_tokens=False, or when the text already starts with the prefix token's text
  prefix token           BOS where the tokenizer adds one (what lm_eval uses: the tokenizer's BOS), else EOS (the
                         document boundary llm_jax trains with; a SentencePiece run has a BOS piece it never
                         trained on, so pass prefix_token_id=<eos id> to hf to compare)
  loglikelihood          context and continuation are encoded together and split at the context's tokens;
                         an empty context is conditioned on the prefix token; inputs keep their last
                         max_length = model.max_seq_len tokens; is_greedy = every continuation token is the argmax
  loglikelihood_rolling  lm_eval's disjoint rolling windows of max_length tokens of tok_encode(document) after
                         the prefix token (as lm_eval does, a BOS-adding tokenizer's document then starts with BOS
                         too, and its first window scores BOS after BOS)
  generate_until         greedy decoding on the serving engine (llm_jax.serving) of at most max_gen_toks tokens (256 unless
                         the task says), ending at EOS, cut at the first stop sequence (`until`); the context
                         keeps its last max_length - max_gen_toks tokens; do_sample/temperature sample instead

Requests are scored `batch_size` at a time, sorted by length and right-padded to a multiple of 16 tokens (few
compiled shapes), rows sharded over the local devices (the runtime's mesh). One process.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llm_jax import serving
from llm_jax.errors import UserError
from llm_jax import objectives
from llm_jax import platforms
from llm_jax import storage
from llm_jax import workdir as workdir_lib
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import exit_on_user_error

LENGTH_BUCKET = 16  # scoring batches are right-padded to a multiple of this many tokens


class HarnessError(UserError, ValueError):
  """A harness request that cannot be served (no tokenizer, a model that cannot score); names the setting."""


def _bucket(length: int, cap: int) -> int:
  return min(-(-length // LENGTH_BUCKET) * LENGTH_BUCKET, cap)


@register_model('llm_jax')
class LlmJaxLM(TemplateLM):
  """lm_eval model on an llm_jax checkpoint. Build it from a workdir (`workdir=`, optionally `step=`) or from a
  `llm_jax.workdir.LoadedModel` (`loaded=`, e.g. the training loop's current parameters)."""

  def __init__(self, workdir: str | None = None, loaded=None, step: int | None = None, batch_size: int | str = 16,
               max_gen_toks: int = 256, max_length: int | None = None, devices=None, **unused):
    super().__init__()
    if loaded is None:
      if not workdir:
        raise HarnessError('llm_jax harness: pass workdir=<a training workdir>')
      loaded = workdir_lib.load_workdir(workdir, step=None if step in (None, '') else int(step), devices=devices)
    if loaded.tokenizer is None:
      raise HarnessError('llm_jax harness: the workdir has no tokenizer (a run on data.source=synthetic cannot read '
                         'text)')
    if not objectives.REGISTRY[loaded.config.model.objective].causal:
      raise HarnessError(f'config.model.objective={loaded.config.model.objective!r}: the harness scores causal (clm) '
                         f'models only')
    self.loaded = loaded
    self.runtime, self.params, self.tokenizer_ = loaded.runtime, loaded.params, loaded.tokenizer
    self.batch_size = 16 if batch_size in (None, 'auto') else int(str(batch_size).split(':')[0])
    self.max_gen_toks = int(max_gen_toks)
    self.max_length = int(max_length) if max_length else loaded.config.model.max_seq_len

  # --- tokenization (TemplateLM) ---

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_.eos_id

  @property
  def prefix_token_id(self) -> int:
    """What an empty context and each rolling window are conditioned on: BOS where the tokenizer adds one."""
    return self.tokenizer_.input_prefix[-1] if self.tokenizer_.add_bos else self.tokenizer_.eos_id

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """`string` as model input (lm_eval hf's tok_encode with add_bos_token unset): what the tokenizer adds around a
    text unless add_special_tokens=False or the text already starts with the prefix token's text."""
    del kwargs
    if add_special_tokens is None:
      prefix = self.tokenizer_.bos_token if self.tokenizer_.add_bos else self.tokenizer_.eos_token
      add_special_tokens = not (prefix and string.startswith(prefix))
    return self.tokenizer_.encode_input(string) if add_special_tokens else self.tokenizer_.encode(string)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer_.decode([t for t in tokens if t != self.eot_token_id])

  # --- scoring ---

  def _score(self, sequences: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(context tokens, continuation tokens) -> (sum of log p of the continuation, all of it greedy)."""
    rows = self.runtime.row_multiple
    batch_rows = -(-self.batch_size // rows) * rows
    prepared = []
    for context, continuation in sequences:
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      prepared.append((whole[:-1], whole[1:], len(continuation)))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: list[Any] = [None] * len(prepared)
    for start in range(0, len(order), batch_rows):
      chunk = order[start:start + batch_rows]
      width = _bucket(max(len(prepared[i][0]) for i in chunk), self.max_length)
      inputs = np.zeros((batch_rows, width), np.int32)
      targets = np.zeros((batch_rows, width), np.int32)
      segment_ids = np.zeros((batch_rows, width), np.int32)
      segment_ids[len(chunk):] = 1  # filler rows: a (never read) one-token-id document, so no row is all padding
      for row, i in enumerate(chunk):
        x, y, _ = prepared[i]
        inputs[row, :len(x)], targets[row, :len(y)], segment_ids[row, :len(x)] = x, y, 1
      logprobs, greedy = self.runtime.token_logprobs(self.params, inputs, targets, segment_ids)
      for row, i in enumerate(chunk):
        n, scored = len(prepared[i][0]), prepared[i][2]
        results[i] = (float(np.sum(logprobs[row, n - scored:n], dtype=np.float64)),
                      bool(np.all(greedy[row, n - scored:n])))
    return results

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    results = self._score([(context, continuation) for _, context, continuation in requests])
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    from lm_eval import utils as lm_utils
    windows, owner = [], []
    for index, request in enumerate(requests):
      (string,) = request.args
      for window in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                       prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1):
        windows.append(lm_utils.make_disjoint_window(window))
        owner.append(index)
    totals = [0.0] * len(requests)
    for index, (logprob, _) in zip(owner, self._score(windows)):
      totals[index] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', (request.args[0],), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from lm_eval.models import utils as model_utils
    results: list[Any] = [None] * len(requests)
    groups: dict[str, list[int]] = {}  # requests with the same generation settings are batched together
    for index, request in enumerate(requests):
      groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
    for indices in groups.values():
      kwargs = model_utils.normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
      until = model_utils.handle_stop_sequences(kwargs.pop('until', None), eos=None)
      max_gen_toks = int(kwargs.pop('max_gen_toks'))
      if max_gen_toks >= self.max_length:
        raise HarnessError(f'max_gen_toks={max_gen_toks} leaves no room for a context in max_length='
                           f'{self.max_length} (model.max_seq_len)')
      sampling = serving.SamplingParams(temperature=float(kwargs.get('temperature') or 0.0) if kwargs.get('do_sample')
                                        else 0.0, top_k=int(kwargs.get('top_k') or 0),
                                        top_p=float(kwargs.get('top_p') or 1.0), seed=0)
      contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
                  for i in indices]
      # one engine for the whole group: continuous batching keeps its rows full whatever the lengths
      new = serving.generate_ids(self.runtime.model_config, self.params, contexts, max_gen_toks, sampling,
                                 eos_id=self.eot_token_id, vocab_limit=self.tokenizer_.vocab_size,
                                 mesh=self.runtime.mesh, rules=self.runtime.rules)
      for i, tokens in zip(indices, new):
        text = model_utils.postprocess_generated_text(self.tok_decode(tokens), until, None)
        results[i] = text
        self.cache_hook.add_partial('generate_until', requests[i].args, text)
    return results


def evaluate(lm: LlmJaxLM, tasks: Sequence[str], include_path: str | None = None, num_fewshot: int | None = None,
             limit: int | float | None = None, log_samples: bool = False) -> dict[str, Any]:
  """lm_eval.simple_evaluate on `lm` for `tasks` (names, or local YAMLs found under include_path)."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  for path in [include_path] if include_path else []:
    if not os.path.isdir(path):
      raise FileNotFoundError(f'--include_path {path}: no such directory')
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise HarnessError(f'--tasks: unknown task(s) {", ".join(unknown)}' +
                       (f' (not in lm_eval nor under {include_path})' if include_path else
                        ' (pass --include_path for local task YAMLs)'))
  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                 task_manager=manager, log_samples=log_samples, bootstrap_iters=0)


def scalar_metrics(results: dict[str, Any]) -> dict[str, float]:
  """{'harness/<task>/<metric>': value} of the numeric results (the training loop logs these)."""
  row = {}
  for task, metrics in results.get('results', {}).items():
    for name, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and '_stderr' not in name:
        row[f'harness/{task}/{name.split(",")[0]}'] = float(value)
  return row


def loop_row(runtime, params, workdir: str, step: int) -> dict[str, Any]:
  """The training loop's harness row (config.eval.harness_tasks on the current parameters): {step, harness/...}."""
  e = runtime.config.eval
  tokenizer = tokenizer_lib.load_from_workdir(workdir, runtime.config.data.add_bos)
  loaded = workdir_lib.LoadedModel(runtime=runtime, params=params, tokenizer=tokenizer, step=step)
  tasks = [t.strip() for t in e.harness_tasks.split(',') if t.strip()]
  output = evaluate(LlmJaxLM(loaded=loaded), tasks, e.harness_include_path or None, limit=e.harness_limit or None)
  return dict(step=step, **scalar_metrics(output))


def run(workdir: str, tasks: Sequence[str], include_path: str | None = None, num_fewshot: int | None = None,
        limit: int | float | None = None, batch_size: int = 16, output_path: str | None = None, step=None,
        devices=None) -> dict[str, Any]:
  """Scores the workdir's checkpoint on `tasks`; returns lm_eval's output (its `results` dict is what main prints)."""
  lm = LlmJaxLM(workdir=workdir, step=step, batch_size=batch_size, devices=devices)
  output = evaluate(lm, tasks, include_path, num_fewshot, limit, log_samples=bool(output_path))
  if output_path:
    storage.write_json(output_path, json.loads(json.dumps(output, default=str)))
  return output


def _main():
  from absl import app, flags

  workdir = flags.DEFINE_string('workdir', None, 'Training workdir: its latest checkpoint and tokenizer are scored.')
  tasks = flags.DEFINE_list('tasks', None, 'lm_eval task names, comma-separated (e.g. hellaswag,arc_easy).')
  include_path = flags.DEFINE_string('include_path', None, 'Directory of extra task YAMLs (local tasks).')
  num_fewshot = flags.DEFINE_integer('num_fewshot', None, 'Few-shot examples per prompt (default: the task\'s).')
  limit = flags.DEFINE_float('limit', None, 'Score only the first N documents of each task (< 1: a fraction).')
  batch_size = flags.DEFINE_integer('batch_size', 16, 'Requests scored or decoded at once.')
  output_path = flags.DEFINE_string('output_path', None, 'Write lm_eval\'s whole output (results, configs, '
                                    'samples) as JSON here.')
  step = flags.DEFINE_integer('step', None, 'Checkpoint step to score (default: the latest).')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not workdir.value or not tasks.value:
      raise app.UsageError('--workdir and --tasks are required')
    limit_value = limit.value
    if limit_value is not None and limit_value >= 1:
      limit_value = int(limit_value)
    with exit_on_user_error():
      output = run(workdir.value, tasks.value, include_path.value, num_fewshot.value, limit_value, batch_size.value,
                   output_path.value, step.value)
    print(json.dumps(output['results'], indent=2, sort_keys=True, default=str))

  platforms.quiet_start()  # what cli.run does first (see llm_jax/platforms.py)
  app.run(main)


if __name__ == '__main__':
  _main()
