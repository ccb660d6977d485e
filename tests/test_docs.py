"""Docs stay true: the configuration reference and the rules table are current, a field without a comment fails,
every CLI answers --help listing its flags, and the how-tos link to files that exist."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from llm_jax import config as config_lib
from llm_jax import config_docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, 'docs')
FIX = 'run `python -m llm_jax.config_docs` and commit docs/'

CLI_MODULES = ['llm_jax.main', 'llm_jax.plot', 'llm_jax.config_docs', 'llm_jax.data.prepare', 'llm_jax.generate',
               'llm_jax.evaluate', 'llm_jax.convert', 'llm_jax.benchmark', 'llm_jax.serve_dry_run', 'llm_jax.serve']


def test_configuration_reference_is_current():
  with open(config_docs.DOC_PATH) as f:
    assert f.read() == config_docs.generate(), f'docs/configuration.md is stale: {FIX}'


def test_reference_documents_every_field_of_the_base_config():
  with open(config_docs.DOC_PATH) as f:
    text = f.read()
  for section, values in config_lib.get_config().items():
    for name in values:
      assert f'| `{section}.{name}` |' in text, f'{section}.{name} missing from docs/configuration.md: {FIX}'


def test_a_field_without_a_comment_fails():
  with open(config_docs.CONFIG_PATH) as f:
    source = f.read()
  line = "  c.train.beta2 = 0.95  # AdamW beta2.\n"
  assert line in source, 'pick another field for this test'
  fields = config_docs.parse(source)
  assert ('train', 'beta2') in {(f.section, f.name) for f in fields}
  with pytest.raises(config_docs.ConfigDocsError, match=r'train\.beta2 \(line \d+\)'):
    config_docs.parse(source.replace(line, "  c.train.beta2 = 0.95\n"))
  # A comment on a line of its own above the field does not count either: the reference reads the field's line.
  with pytest.raises(config_docs.ConfigDocsError, match=r'train\.beta2'):
    config_docs.parse(source.replace(line, "  # AdamW beta2.\n  c.train.beta2 = 0.95\n"))


def test_a_new_field_without_a_comment_fails_and_with_one_gets_a_row():
  with open(config_docs.CONFIG_PATH) as f:
    source = f.read()
  anchor = "  c.train.beta2 = 0.95  # AdamW beta2.\n"
  with pytest.raises(config_docs.ConfigDocsError, match=r'train\.new_knob'):
    config_docs.parse(source.replace(anchor, anchor + "  c.train.new_knob = 3\n"))
  fields = config_docs.parse(source.replace(anchor, anchor + "  c.train.new_knob = 3  # A | B choice.\n"))
  assert '| `train.new_knob` | `3` | A \\| B choice. |' in config_docs.render(fields)


def test_a_field_the_parser_cannot_see_is_reported():
  fields = config_docs.parse(open(config_docs.CONFIG_PATH).read())
  config = config_lib.get_config()
  config_docs.check_covers(fields, config)
  config.train.unlisted = 1
  with pytest.raises(config_docs.ConfigDocsError, match=r'train\.unlisted'):
    config_docs.check_covers(fields, config)


def test_rules_table_in_architecture_is_current():
  with open(config_docs.ARCHITECTURE_PATH) as f:
    text = f.read()
  assert text == config_docs.with_rules_table(text, config_lib.DEFAULT_RULES), \
      f'the rules table of docs/architecture.md differs from config.DEFAULT_RULES: {FIX}'
  for name, _ in config_lib.DEFAULT_RULES:
    assert f'| `{name}` |' in text
  changed = (('vocab', 'fsdp'),) + config_lib.DEFAULT_RULES[1:]
  assert config_docs.with_rules_table(text, changed) != text  # the check would notice an edit of the table


def test_check_flag_reports_current_docs():
  result = subprocess.run([sys.executable, '-m', 'llm_jax.config_docs', '--check'], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def _defined_flags(module: str) -> list[str]:
  path = importlib.util.find_spec(module).origin
  with open(path) as f:
    source = f.read()
  return re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source)


def test_every_cli_answers_help_listing_its_flags():
  modules = [m for m in CLI_MODULES if importlib.util.find_spec(m) is not None]
  assert {'llm_jax.main', 'llm_jax.plot', 'llm_jax.config_docs'} <= set(modules)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = {m: subprocess.Popen([sys.executable, '-m', m, '--help'], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for m in modules}
  for module, proc in procs.items():
    out, _ = proc.communicate(timeout=300)
    # absl's --help prints the usage and exits 1 by design (absl.app.HelpFlag); anything else is a failure.
    assert proc.returncode in (0, 1) and 'Try --helpfull' in out and 'Traceback' not in out, \
        f'{module} --help exited {proc.returncode}:\n{out[-2000:]}'
    names = _defined_flags(module)
    assert names, f'{module}: no DEFINE_* flags found'
    for name in names:
      assert re.search(rf'--(\[no\])?{name}\b', out), f'{module} --help does not list --{name}:\n{out[-2000:]}'


HOWTOS = ['architecture', 'configuration', 'pretrain', 'resume', 'finetune', 'convert', 'generate', 'evaluate',
          'benchmark', 'multihost', 'serving']


def test_every_howto_exists_and_its_local_links_resolve():
  for name in HOWTOS:
    assert os.path.exists(os.path.join(DOCS, f'{name}.md')), f'docs/{name}.md missing'
  for name in os.listdir(DOCS):
    if not name.endswith('.md'):
      continue
    with open(os.path.join(DOCS, name)) as f:
      text = f.read()
    for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text):
      if '://' in target:
        continue
      if target == 'performance.md':  # written with the benchmark issue
        continue
      assert os.path.exists(os.path.normpath(os.path.join(DOCS, target))), f'docs/{name} links to missing {target}'
