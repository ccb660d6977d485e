"""The house's rules, checked: the import graph runs the documented way (docs/architecture.md, "Import
direction") with no cycle, and every list of choices in config.py is the registry it names."""

import ast
import collections
import pathlib

import jax
import jax.numpy as jnp

from llm_jax import config as config_lib
from llm_jax import config_docs
from llm_jax import data
from llm_jax import objectives
from llm_jax import optim
from llm_jax.model import attention, layers, transformer
from llm_jax.model import TransformerConfig, Transformer

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'llm_jax'
JOBS = {'main', 'benchmark', 'dry_run', 'generate', 'evaluate', 'convert', 'plot', 'config_docs'}  # harness: also a backend the training loop's hook uses
# config.validate still reaches into these parts for their own checks (the one upward arrow left: validation
# should move to the parts, issue 21); a new one fails the test.
CONFIG_UPWARD = {'data.cleaning', 'data.mixture', 'data.tokenizer', 'model.moe', 'profiling', 'storage', 'xla_options'}
MODEL_THIRD_PARTY = {'jax', 'flax', 'numpy'}


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in PACKAGE.rglob('*.py'):
    name = '.'.join(path.relative_to(PACKAGE).with_suffix('').parts)
    found[name[:-len('.__init__')] if name.endswith('.__init__') else ('' if name == '__init__' else name)] = path
  return found


def _imports(modules) -> tuple[dict[str, set], dict[str, set]]:
  """(llm_jax modules each module imports, top-level third-party packages it imports), at any depth (imports
  inside functions count: they hide the graph, not change it). `from pkg import sub` is an arrow to pkg.sub."""
  ours, theirs = collections.defaultdict(set), collections.defaultdict(set)
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}'[8:] in modules else node.module
                   for a in node.names]
      else:
        continue
      for target in targets:
        if target == 'llm_jax' or target.startswith('llm_jax.'):
          if target[8:] != name:
            ours[name].add(target[8:])
        else:
          theirs[name].add(target.split('.')[0])
  return ours, theirs


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in list(graph):
    if v not in index:
      visit(v)
  return found


def test_import_graph_has_no_cycle_and_runs_the_documented_way():
  modules = _modules()
  ours, theirs = _imports(modules)
  assert _cycles(ours) == []
  for name in modules:
    imported = ours[name]
    if name.startswith('model'):  # model/ imports only jax, flax, numpy and itself (and the error types)
      assert {m for m in imported if not m.startswith('model')} <= {'errors'}, name
      assert theirs[name] - MODEL_THIRD_PARTY <= _stdlib(theirs[name]), (name, theirs[name] - MODEL_THIRD_PARTY)
    if name.startswith('data'):  # data/ never imports the model, the objectives or the training layers
      assert not {m for m in imported if m.split('.')[0] in ('model', 'objectives', 'runtime', 'train')}, name
    if name.split('.')[0] not in JOBS:  # below the jobs, nothing imports a job or train
      assert not {m for m in imported if m.split('.')[0] in JOBS}, name
      if name != 'train':
        assert 'train' not in imported, name
    if name == 'config':
      assert imported <= {'errors'} | CONFIG_UPWARD, imported - {'errors'} - CONFIG_UPWARD
    if name == 'errors':
      assert not imported


def _stdlib(names) -> set:
  import sys
  return {n for n in names if n in sys.stdlib_module_names or n == '__future__'}


def _comment_choices(field: str) -> set:
  """The choices a config field's comment lists ('Kernel: auto | xla | cudnn. auto: ...' -> {'auto', 'xla',
  'cudnn'}): the names joined by ' | ', each the first word of its part."""
  with open(config_docs.CONFIG_PATH) as f:
    fields = {f'{x.section}.{x.name}': x for x in config_docs.parse(f.read())}
  comment = fields[field].comment
  parts = comment.split(' | ')
  first = parts[0].rsplit(' ', 1)[-1]  # 'Attention kernel: auto' -> 'auto'
  return {first.strip(' .:;,')} | {p.split(' ')[0].strip(' .:;,()') for p in parts[1:]}


def test_every_choice_list_is_its_registry():
  assert set(config_lib.ATTENTION_KINDS) == {'auto'} | set(attention.KERNELS)
  assert config_lib.REMAT_POLICIES == tuple(transformer.REMAT_POLICIES)
  assert config_lib.ROPE_SCALINGS == layers.ROPE_SCALINGS
  assert config_lib.SCHEDULES == tuple(optim.DECAYS)
  assert config_lib.WSD_SHAPES == tuple(optim.WSD_SHAPES)
  assert config_lib.OBJECTIVES == objectives.names()
  assert config_lib.DATA_SOURCES == tuple(data._SOURCES)
  # The comments users read (and docs/configuration.md) list the same names.
  for field, choices in (('model.attention', config_lib.ATTENTION_KINDS), ('model.remat', config_lib.REMAT_POLICIES),
                         ('train.schedule', config_lib.SCHEDULES), ('model.rope_scaling', config_lib.ROPE_SCALINGS),
                         ('train.wsd_decay_shape', config_lib.WSD_SHAPES), ('data.source', config_lib.DATA_SOURCES)):
    assert _comment_choices(field) == set(choices), field


def test_lora_targets_are_the_models_projections():
  """Every name lora.targets accepts is a projection that gets an adapter, and every projection is a name."""
  cfg = TransformerConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=2, num_kv_heads=2, ffn_dim=8,
                          max_seq_len=4, scan_layers=False, lora_rank=1, lora_targets=config_lib.LORA_TARGETS)
  params = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']
  adapted = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, 'key', k)) for k in path if not str(getattr(k, 'key', k)).startswith('.')]  # boxes
    if keys[-1].startswith('lora'):
      adapted.add(keys[-2])
  assert adapted == set(config_lib.LORA_TARGETS)
