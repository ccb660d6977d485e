"""Text-overlap metrics of generations against references, and the task files that hold the references.

  bleu(hypotheses, references)   corpus BLEU of sacrebleu (its default 13a tokenisation), 0..100
  rouge(hypotheses, references)  mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L of rouge-score, scaled to 0..100
  read_tasks(path)               a JSONL file of {"prompt": str, "reference": str} records

Both metrics are the reference implementations called as their authors intend, so numbers compare with
published ones; the only change is ROUGE's scale (x100, like BLEU). One reference per hypothesis.
"""

from __future__ import annotations

import json
from typing import Sequence
from llm_jax.errors import UserError
from llm_jax import storage

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')


class TaskFileError(UserError, ValueError):
  """A task file is missing or has a bad record; the message names the file and line."""


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references')
  if not hypotheses:
    raise ValueError('no hypotheses to score')


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """sacrebleu corpus BLEU (0..100) with one reference per hypothesis."""
  import sacrebleu
  _check_pairs(hypotheses, references)
  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean F1 (0..100) over the pairs of ROUGE-1, ROUGE-2 and ROUGE-L (rouge-score, no stemming)."""
  from rouge_score import rouge_scorer
  _check_pairs(hypotheses, references)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for hypothesis, reference in zip(hypotheses, references):
    scores = scorer.score(reference, hypothesis)  # (target, prediction)
    for name in ROUGE_TYPES:
      totals[name] += scores[name].fmeasure
  return {name: 100.0 * total / len(hypotheses) for name, total in totals.items()}


def scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """{'bleu', 'rouge1', 'rouge2', 'rougeL'}, all 0..100."""
  return dict(bleu=bleu(hypotheses, references), **rouge(hypotheses, references))


def read_tasks(path: str, max_records: int = 0) -> list[dict[str, str]]:
  """Records {prompt, reference} of a JSONL task file (blank lines skipped); at most max_records (0 = all).

  Raises TaskFileError naming the file, and the line of the first bad record.
  """
  try:
    lines = storage.read_text(path).replace('\r\n', '\n').split('\n')  # as readlines: only newlines split
  except OSError as e:
    raise TaskFileError(f'task file {path}: cannot read it ({e.strerror or e})') from None
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f'{path}:{number}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskFileError(f'{where}: not valid JSON ({e.msg})') from None
    if not isinstance(record, dict):
      raise TaskFileError(f'{where}: expected an object with "prompt" and "reference", got {type(record).__name__}')
    for field in ('prompt', 'reference'):
      if not isinstance(record.get(field), str):
        raise TaskFileError(f'{where}: field "{field}" must be a string')
    if not record['prompt']:
      raise TaskFileError(f'{where}: empty "prompt"')
    records.append(dict(prompt=record['prompt'], reference=record['reference']))
    if max_records and len(records) == max_records:
      break
  if not records:
    raise TaskFileError(f'task file {path}: no records')
  return records


def score_tasks(records: Sequence[dict[str, str]], completions: Sequence[str], num_samples: int = 0
                ) -> tuple[dict[str, float], list[dict[str, str]]]:
  """Scores completions of task records against their references.

  Returns ({'bleu', 'rouge1', 'rouge2', 'rougeL', 'examples'}, the first `num_samples` records with their
  'completion').
  """
  references = [record['reference'] for record in records]
  result = dict(scores(completions, references), examples=len(records))
  samples = [dict(record, completion=completion) for record, completion in zip(records[:num_samples], completions)]
  return result, samples
