"""notebooks/quickstart.ipynb runs top to bottom on CPU (a short run on a slice of the stdlib corpus)."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'quickstart.ipynb')


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  # The kernel inherits this environment: the repo on the path (so the install cell is skipped), one plain CPU
  # device (not the 8 fake ones of conftest), a short run on a few hundred stdlib files.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('LLM_JAX_NOTEBOOK_STEPS', '20')
  monkeypatch.setenv('LLM_JAX_NOTEBOOK_MAX_DOCS', '200')
  monkeypatch.setenv('LLM_JAX_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': REPO}})
  client.execute()

  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
  text = '\n'.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'runtime: CPU' in text
  assert 'llm_jax_repo' not in text  # the install cell was skipped: llm_jax came from this checkout
  assert 'validation tokens: loss' in text and 'unigram baseline' in text
  assert "=== 'def main('" in text
  assert any('image/png' in o.get('data', {}) for o in outputs if o.output_type == 'display_data'), \
      'the loss curve was not displayed'
  assert os.path.exists(tmp_path / 'workdir' / 'metrics.jsonl')


def test_notebook_is_stored_without_outputs():
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, 'strip outputs before committing the notebook'
