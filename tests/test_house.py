"""The house's rules, checked: the import graph runs the documented way (docs/architecture.md, "Import
direction") with no cycle, and every config field that names an implementation agrees with the registry that
implements the names (its comment, its default, its check)."""

import ast
import collections
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from llm_jax import config as config_lib
from llm_jax import config_docs
from llm_jax import data
from llm_jax import objectives
from llm_jax import optim
from llm_jax import validation
from llm_jax.data import cleaning, pipeline, sft, tokenizer as tokenizer_lib
from llm_jax.model import attention, context, layer_pattern, layers, moe, transformer
from llm_jax.objectives import grpo, preference
from llm_jax.model import TransformerConfig, Transformer

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'llm_jax'
JOBS = ('main', 'benchmark', 'dry_run', 'serve_dry_run', 'generate', 'evaluate', 'convert', 'plot', 'config_docs',
        'serve', 'openai_server')
# The import direction of docs/architecture.md, bottom first: a module imports only from its own layer or below
# (arrows inside a layer are allowed, cycles never). Packages count by their top-level name.
LAYERS = (
    ('errors',),
    ('storage',),  # the path layer
    ('config',),
    ('model', 'data', 'objectives', 'families', 'optim', 'checkpoint', 'metrics', 'sharding', 'targets',
     'hlo_analysis', 'profiling', 'xla_options', 'decoding', 'text_metrics', 'tracking', 'lora_io', 'platforms', 'cli',
     'rewards'),
    ('validation',),  # calls every part's check_config
    ('runtime', 'tasks'),
    ('workdir',),
    ('serving',),  # the paged engine: loads a workdir; generate, evaluate, the harness and RL decode through it
    ('harness', 'rollout'),  # lm-eval backend (the loop's hook uses it); RL rollouts (the loop's batches under grpo)
    ('train',),
    JOBS,
)
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


def _layer(module: str) -> int:
  top = module.split('.')[0]
  return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_import_graph_has_no_cycle_and_runs_the_documented_way():
  modules = _modules()
  ours, theirs = _imports(modules)
  assert _cycles(ours) == []
  for name in modules:
    imported = ours[name]
    if name:  # the package's own __init__ imports nothing
      upward = {m for m in imported if _layer(m) > _layer(name)}
      assert not upward, (name, upward)
    if name.startswith('model'):  # model/ imports only jax, flax, numpy and itself (and the error types)
      assert {m for m in imported if not m.startswith('model')} <= {'errors'}, name
      assert theirs[name] - MODEL_THIRD_PARTY <= _stdlib(theirs[name]), (name, theirs[name] - MODEL_THIRD_PARTY)
    if name.startswith('data'):  # data/ never imports the model, the objectives or the training layers
      assert not {m for m in imported if m.split('.')[0] in ('model', 'objectives', 'runtime', 'train')}, name
    if name == 'errors':
      assert not imported


def _stdlib(names) -> set:
  import sys
  return {n for n in names if n in sys.stdlib_module_names or n == '__future__'}


def _comment(field: str) -> str:
  with open(config_docs.CONFIG_PATH) as f:
    fields = {f'{x.section}.{x.name}': x for x in config_docs.parse(f.read())}
  return fields[field].comment


def _comment_choices(field: str) -> set:
  """The choices a config field's comment lists ('Kernel: auto | xla (...) | cudnn. auto: ...' -> {'auto', 'xla',
  'cudnn'}): the names joined by ' | ', each the first word of its part once parenthesised text is dropped (the
  first part's name follows its last ': '). A comma-separated field ('...: a,b,c.' or '...: a, b, c; ...') lists
  its names after the last ': ' before any ';'."""
  comment = re.sub(r'\([^()]*\)', '', _comment(field))
  if ' | ' not in comment:
    listed = comment.split(';')[0].rsplit(': ', 1)[-1]
    return {name.strip(' .') for name in listed.split(',')}
  parts = comment.split(' | ')
  first = parts[0].rsplit(': ', 1)[-1]
  return {part.split()[0].strip(' .:;,') for part in [first] + parts[1:]}


# Every config field whose value names an implementation -> the registry that implements the names (declared
# once, where the implementation is; config.py holds only the run's own NONFINITE_POLICIES, WANDB_MODES and
# INIT_FROM_ADAPTERS).
REGISTRIES = {
    'model.attention': attention.CHOICES,
    'model.dtype': transformer.DTYPES,
    'model.rope_scaling': layers.ROPE_SCALINGS,
    'model.attention_pattern': layer_pattern.LAYER_KINDS,
    'model.norm': layers.NORMS,
    'model.mlp_activation': layers.MLP_ACTIVATIONS,
    'model.remat': transformer.REMAT_POLICIES,
    'model.ffn': moe.FFN_KINDS,
    'model.moe_compute': moe.EXPERT_COMPUTE,
    'mesh.context_exchange': context.EXCHANGES,
    'model.objective': objectives.REGISTRY,
    'dpo.loss_type': preference.LOSS_TYPES,
    'dpo.reference_dtype': preference.REFERENCE_DTYPES,
    'grpo.loss_type': grpo.LOSS_TYPES,
    'grpo.importance_sampling_level': grpo.IMPORTANCE_LEVELS,
    'grpo.scale_rewards': grpo.REWARD_SCALINGS,
    'data.source': data.SOURCES,
    'data.packing': pipeline.PACKINGS,
    'data.sft_truncation': sft.TRUNCATIONS,
    'data.add_bos': tokenizer_lib.ADD_BOS_SETTINGS,
    'data.filters': cleaning.FILTER_NAMES,
    'train.schedule': optim.DECAYS,
    'train.wsd_decay_shape': optim.WSD_SHAPES,
    'train.moments_dtype': optim.MOMENTS_DTYPES,
    'train.nonfinite': config_lib.NONFINITE_POLICIES,
    'train.init_from_adapters': config_lib.INIT_FROM_ADAPTERS,
    'tracking.wandb_mode': config_lib.WANDB_MODES,
    'lora.targets': transformer.LORA_TARGETS,
}
# What else a field's check needs to be reached (the wsd shape is read only by schedule=wsd, ...).
_CONTEXT = {'train.wsd_decay_shape': {'train.schedule': 'wsd'},
            'dpo.loss_type': {'model.objective': 'dpo', 'data.source': 'preference_stdlib'},
            'dpo.reference_dtype': {'model.objective': 'dpo', 'data.source': 'preference_stdlib'},
            'lora.targets': {'lora.rank': 4},
            **{f'grpo.{name}': {'model.objective': 'grpo', 'data.source': 'prompts_jsonl'}
               for name in ('loss_type', 'importance_sampling_level', 'scale_rewards')}}


@pytest.mark.parametrize('field', sorted(REGISTRIES))
def test_every_choice_field_agrees_with_its_registry(field):
  """The field's comment (and so docs/configuration.md) lists exactly the registry's names, its default is one of
  them, and validation refuses a name that is not, naming the field."""
  registry = tuple(REGISTRIES[field])
  assert _comment_choices(field) == set(registry), field
  config = config_lib.get_config()
  section, name = field.split('.')
  for value in str(config[section][name]).split(','):
    assert value == 'auto' and field == 'data.filters' or value in registry, (field, value)
  for key, value in _CONTEXT.get(field, {}).items():
    config[key.split('.')[0]][key.split('.')[1]] = value
  config[section][name] = 'no_such_name'
  with pytest.raises(config_lib.ConfigError, match=rf'^config\.{field}: '):
    validation.validate(config, 1)


def test_lora_targets_are_the_models_projections():
  """Every name lora.targets accepts is a projection that gets an adapter, and every projection is a name."""
  cfg = TransformerConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=2, num_kv_heads=2, ffn_dim=8,
                          max_seq_len=4, scan_layers=False, lora_rank=1, lora_targets=transformer.LORA_TARGETS)
  params = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']
  adapted = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, 'key', k)) for k in path if not str(getattr(k, 'key', k)).startswith('.')]  # boxes
    if keys[-1].startswith('lora'):
      adapted.add(keys[-2])
  assert adapted == set(transformer.LORA_TARGETS)
