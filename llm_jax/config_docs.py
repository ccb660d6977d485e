"""Generates the config reference docs from llm_jax/config.py: `python -m llm_jax.config_docs [--check]`.

Two outputs: docs/configuration.md (all of it) and the logical-axis rules table of docs/architecture.md (the
block between RULES_BEGIN and RULES_END, rendered from config.DEFAULT_RULES; the prose around it is hand-written).

Every `c.<section>.<field> = value  # comment` line of `get_config()` becomes a table row (field, default,
comment) under its section. A field without a comment is an error (ConfigDocsError names it), so the reference
cannot silently miss a field; `--check` exits 1 when docs/configuration.md differs from what would be generated
(a test runs it), and likewise when the rules table in docs/architecture.md differs from config.DEFAULT_RULES.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import sys
import tokenize
from llm_jax import cli
from llm_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PATH = os.path.join(REPO, 'llm_jax', 'config.py')
DOC_PATH = os.path.join(REPO, 'docs', 'configuration.md')
ARCHITECTURE_PATH = os.path.join(REPO, 'docs', 'architecture.md')
RULES_BEGIN = '<!-- rules:begin (generated from config.DEFAULT_RULES by python -m llm_jax.config_docs) -->'
RULES_END = '<!-- rules:end -->'

SECTION_INTROS = {  # one line under each section heading; a section not listed here gets none
    'model': 'Architecture and numerics of the transformer (`llm_jax/model/`).',
    'data': 'Where the text comes from, how it is tokenized and batched (`llm_jax/data/`).',
    'train': 'Optimizer, schedule, logging and failure policy of the training loop (`llm_jax/optim.py`, `llm_jax/train.py`).',
    'eval': 'Periodic evaluation on the eval split.',
    'checkpoint': 'Orbax checkpoints under `<workdir>/checkpoints/` (`llm_jax/checkpoint.py`).',
    'mesh': 'Device mesh `(data, expert, fsdp, context, tensor)` and the logical-axis rules (see [architecture](architecture.md#logical-axis-rules)).',
    'lora': 'Low-rank adapters for fine-tuning (see [fine-tuning](finetune.md)).',
    'xla': 'XLA compiler options and GPU memory share, applied alike by training and the benchmark (`llm_jax/xla_options.py`, [performance](performance.md)).',
}


class ConfigDocsError(ValueError):
  """The config source cannot be documented: a field lacks its inline comment, or get_config() was not found."""


@dataclasses.dataclass(frozen=True)
class Field:
  section: str
  name: str
  default: str  # the source text of the value
  comment: str
  line: int


def _comments(source: str) -> dict[int, str]:
  """Line number -> the text of the comment on that line (without '#')."""
  out = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out[tok.start[0]] = tok.string.lstrip('#').strip()
  return out


def parse(source: str, filename: str = 'llm_jax/config.py') -> list[Field]:
  """The fields assigned in get_config(), in source order, each with its inline comment.

  Raises ConfigDocsError naming every `section.field` (with its line) that has no comment on its line.
  """
  tree = ast.parse(source, filename)
  functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'get_config']
  if not functions:
    raise ConfigDocsError(f'{filename}: no get_config() function')
  comments = _comments(source)
  fields, missing = [], []
  for node in ast.walk(functions[0]):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    target = node.targets[0]
    if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
            and isinstance(target.value.value, ast.Name)):
      continue  # `c.model = ml_collections.ConfigDict()` opens a section; it is not a field
    section, name = target.value.attr, target.attr
    comment = comments.get(node.end_lineno) or comments.get(node.lineno)
    if not comment:
      missing.append(f'{section}.{name} (line {node.lineno})')
      continue
    fields.append(Field(section, name, ast.get_source_segment(source, node.value), comment, node.lineno))
  if missing:
    raise ConfigDocsError(f'{filename}: config fields without an inline comment: {", ".join(missing)}. '
                          'Write `c.<section>.<field> = value  # what it does` (docs/configuration.md is built from it).')
  fields.sort(key=lambda f: f.line)
  return fields


def check_covers(fields: list[Field], config) -> None:
  """Raises ConfigDocsError if get_config() has a field the parsed lines do not (set in a loop, say)."""
  parsed = {(f.section, f.name) for f in fields}
  actual = {(section, name) for section, values in config.items() for name in values}
  if actual - parsed:
    names = ', '.join(f'{s}.{n}' for s, n in sorted(actual - parsed))
    raise ConfigDocsError(f'fields of get_config() not set by a `c.<section>.<field> = value  # comment` line: {names}')


def _cell(text: str) -> str:
  return text.replace('|', '\\|').replace('\n', ' ')


def render(fields: list[Field]) -> str:
  sections: dict[str, list[Field]] = {}
  for f in fields:
    sections.setdefault(f.section, []).append(f)
  lines = [
      '# Configuration reference',
      '',
      '<!-- Generated by `python -m llm_jax.config_docs` from the inline comments of llm_jax/config.py. '
      'Do not edit by hand: tests/test_docs.py fails when this file is stale. -->',
      '',
      'Every field is declared once in `llm_jax/config.py`; presets in `experiments/` change only what differs, and '
      'any field can be overridden on the command line: `--config.<section>.<field>=value` (configs are locked, so '
      'a misspelt name fails). `llm_jax.validation.validate()` rejects an inconsistent config before anything '
      'compiles, naming the field: each part checks the fields it implements, against its registry of names. A run '
      'writes its full config to `<workdir>/config.json`.',
      '',
      'Sections: ' + ', '.join(f'[`{s}`](#{s})' for s in sections) + '.',
  ]
  for section, rows in sections.items():
    lines += ['', f'## {section}', '']
    if section in SECTION_INTROS:
      lines += [SECTION_INTROS[section], '']
    lines += ['| field | default | description |', '| --- | --- | --- |']
    for f in rows:
      lines.append(f'| `{section}.{f.name}` | `{_cell(f.default)}` | {_cell(f.comment)} |')
  return '\n'.join(lines) + '\n'


def generate(config_path: str = CONFIG_PATH) -> str:
  """The Markdown reference for the config source at `config_path` (the base config by default)."""
  with open(config_path) as f:
    source = f.read()
  fields = parse(source, os.path.relpath(config_path, REPO))
  if os.path.abspath(config_path) == os.path.abspath(CONFIG_PATH):
    check_covers(fields, config_lib.get_config())
  return render(fields)


def _mesh_axes(target) -> str:
  if target is None:
    return 'replicated'
  targets = target if isinstance(target, (tuple, list)) else (target,)
  return ' × '.join(f'`{t}`' for t in targets)


def rules_table(rules) -> str:
  """Markdown table of (logical axis, kind, mesh axes) for a rules tuple like config.DEFAULT_RULES."""
  lines = ['| logical axis | names | sharded over mesh axes |', '| --- | --- | --- |']
  for name, target in rules:
    kind = 'activation' if name.startswith('act_') else 'parameter'
    lines.append(f'| `{name}` | {kind} | {_mesh_axes(target)} |')
  return '\n'.join(lines)


def with_rules_table(text: str, rules, path: str = 'docs/architecture.md') -> str:
  """`text` with the block between RULES_BEGIN and RULES_END replaced by rules_table(rules)."""
  if RULES_BEGIN not in text or RULES_END not in text:
    raise ConfigDocsError(f'{path}: no {RULES_BEGIN} ... {RULES_END} block for the rules table')
  head, rest = text.split(RULES_BEGIN, 1)
  _, tail = rest.split(RULES_END, 1)
  return f'{head}{RULES_BEGIN}\n{rules_table(rules)}\n{RULES_END}{tail}'


def outputs() -> dict[str, str]:
  """path -> the text it should have: the configuration reference and architecture.md with a current table."""
  with open(ARCHITECTURE_PATH) as f:
    architecture = f.read()
  return {DOC_PATH: generate(), ARCHITECTURE_PATH: with_rules_table(architecture, config_lib.DEFAULT_RULES)}


def stale() -> list[str]:
  """The generated files whose content differs from what `python -m llm_jax.config_docs` would write."""
  found = []
  for path, text in outputs().items():
    current = open(path).read() if os.path.exists(path) else None
    if current != text:
      found.append(path)
  return found


def _write_atomic(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _main() -> None:
  from absl import app, flags
  check = flags.DEFINE_bool('check', False, 'Exit 1 if a generated file is stale instead of rewriting it.')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    try:
      if check.value:
        paths = stale()
        if paths:
          sys.exit(f'error: stale: {", ".join(os.path.relpath(p, REPO) for p in paths)}; '
                   'regenerate with: python -m llm_jax.config_docs')
        print('docs/configuration.md and the rules table of docs/architecture.md are current')
        return
      for path, text in outputs().items():
        _write_atomic(path, text)
        print(f'wrote {os.path.relpath(path, REPO)}')
    except ConfigDocsError as e:
      sys.exit(f'error: {e}')

  cli.run(main)


if __name__ == '__main__':
  _main()
