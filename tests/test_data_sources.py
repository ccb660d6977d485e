"""Hugging Face datasets (offline: local parquet/JSON files, a save_to_disk folder) and weighted mixtures."""

import json
import os

import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax import data
from llm_jax.data import mixture
from llm_jax.data import preparation
from llm_jax.data import tokenizer as tokenizer_lib
from test_data_corpus import documents_of, make_config, prose, split_stream, trained_tokenizer

datasets = pytest.importorskip('datasets')


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')


@pytest.fixture(scope='module')
def texts():
  rng = np.random.default_rng(10)
  return [prose(rng) for _ in range(300)]


def hf_config(**fields):
  c = make_config('', filters='', **fields)
  c.data.source = 'hf_datasets'
  return c


def kept_texts(workdir, index):
  directory = os.path.join(workdir, 'data')
  tok = tokenizer_lib.load(os.path.join(directory, 'tokenizer.model'))
  return {role: [tok.decode(list(d)) for d in documents_of(split_stream(directory, index, role), tok.eos_id)]
          for role in ('train', 'validation')}


@pytest.mark.parametrize('loader, streaming', [('parquet', False), ('json', True)])
def test_local_files_through_load_dataset(tmp_path, texts, loader, streaming):
  dataset = datasets.Dataset.from_dict({'body': texts, 'id': list(range(len(texts)))})
  if loader == 'parquet':
    dataset.to_parquet(str(tmp_path / 'rows.parquet'))
    files = str(tmp_path / '*.parquet')
  else:
    (tmp_path / 'rows.jsonl').write_text(''.join(json.dumps({'body': t}) + '\n' for t in texts))
    files = str(tmp_path / 'rows.jsonl')
  config = hf_config(hf_path=loader, hf_data_files=files, hf_streaming=streaming, text_field='body',
                     validation_fraction=0.1)
  validation.validate(config, 1)
  index = preparation.prepare(config, str(tmp_path / 'work'), progress=False)
  kept = kept_texts(str(tmp_path / 'work'), index)
  assert sorted(kept['train'] + kept['validation']) == sorted(texts)  # every row once, no split overlap
  assert index['validation_holdout']['by'] == 'documents' and kept['validation']
  config.data.text_field = 'missing'
  with pytest.raises(preparation.sources.SourceError, match=r"config\.data\.text_field: 'missing' is not a "
                                                            r"column.*body"):
    preparation.prepare(config, str(tmp_path / 'other'), progress=False)


def test_save_to_disk_folder_keeps_its_splits(tmp_path, texts):
  folder = str(tmp_path / 'saved')
  datasets.DatasetDict({'train': datasets.Dataset.from_dict({'text': texts[:250]}),
                        'validation': datasets.Dataset.from_dict({'text': texts[250:]})}).save_to_disk(folder)
  index = preparation.prepare(hf_config(hf_path=folder), str(tmp_path / 'work'), progress=False)
  kept = kept_texts(str(tmp_path / 'work'), index)
  assert kept['train'] == texts[:250] and kept['validation'] == texts[250:]  # in row order
  assert index['validation_holdout']['description'] == "by the source's own splits"
  with pytest.raises(preparation.sources.SourceError, match=r'config\.data\.hf_path=.*nowhere.*cannot load'):
    preparation.prepare(hf_config(hf_path=str(tmp_path / 'nowhere')), str(tmp_path / 'w2'), progress=False)


def _prepared(tmp_path, name, tokenizer_path, count, seed):
  rng = np.random.default_rng(seed)
  (tmp_path / name).mkdir()
  for i in range(count):
    (tmp_path / name / f'{i}.txt').write_text(prose(rng, (10, 20)))
  config = make_config(str(tmp_path / name / '*.txt'), tokenizer_path=tokenizer_path, validation_fraction=0.1,
                       prepared_dir=str(tmp_path / f'{name}_prepared'))
  preparation.prepare(config, None, progress=False)
  return str(tmp_path / f'{name}_prepared')


def test_mixture_shares_purity_slices_and_errors(tmp_path):
  given = trained_tokenizer(tmp_path)
  a = _prepared(tmp_path, 'a', given, 40, 1)
  b = _prepared(tmp_path, 'b', given, 15, 2)
  config = make_config('', mixture=f'{a}:0.7,{b}:0.3')
  config.data.source = 'mixture'
  validation.validate(config, 1)
  mixed = mixture.open_mixture(config, 'train')
  batches = [mixed.batch(k) for k in range(1000)]
  rows = np.concatenate([batch['source'] for batch in batches])
  share = np.mean(rows == 0)
  assert abs(share - 0.7) < 0.01, share
  # Each row holds a window of the source it names (an independent read of that source's stream).
  streams = [np.concatenate(preparation.read_split_tokens(d, preparation.load_index(d), 'train')) for d in (a, b)]
  for k in (0, 3, 999):
    for row, source in enumerate(batches[k]['source']):
      tokens = np.append(batches[k]['inputs'][row], batches[k]['targets'][row, -1])
      text = streams[source].astype(np.int32)
      starts = np.flatnonzero(text[:-config.data.seq_len] == tokens[0])
      assert any(np.array_equal(text[s:s + tokens.size], tokens) for s in starts)
  # A pure function of (seed, k): a fresh object (a resumed run) gives the same batch 517; process slices
  # concatenate to the global batch.
  again = mixture.open_mixture(config, 'train').batch(517)
  np.testing.assert_array_equal(again['inputs'], batches[517]['inputs'])
  halves = [mixture.open_mixture(config, 'train').batch(517, p, 2) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h['inputs'] for h in halves]), batches[517]['inputs'])
  # The training iterator (llm_jax.data, as train.py calls it) serves the same batches from a resumed step.
  iterator = data.make_iterator(config, 'train', start_step=517)
  np.testing.assert_array_equal(next(iterator)['inputs'], batches[517]['inputs'])
  # The validation mixture exists too; another tokenizer and bad weights are errors naming the entries.
  assert mixture.open_mixture(config, 'validation').batch(0)['inputs'].shape == (8, 32)
  (tmp_path / 'tok').mkdir()
  other = _prepared(tmp_path, 'c', trained_tokenizer(tmp_path / 'tok', seed=9), 15, 3)
  config.data.mixture = f'{a}:1,{other}:1'
  with pytest.raises(mixture.MixtureError, match=rf'{other} was prepared with another tokenizer than {a}'):
    mixture.open_mixture(config)
  for spec, message in [(f'{a}:0', 'not a positive number'), (f'{a}:x', 'not a positive number'),
                        (f'{a}:-1', 'not a positive number'), (a, 'not PREPARED_DIR:WEIGHT'), ('', 'empty')]:
    config.data.mixture = spec
    with pytest.raises(config_lib.ConfigError, match=r'config\.data\.mixture: .*' + message):
      validation.validate(config, 1)


def test_mixture_quotas_are_exact_per_block():
  counts = mixture.quotas([0.7, 0.2, 0.1])
  assert counts.sum() == mixture.BLOCK_ROWS and list(counts) == [2867, 819, 410]
