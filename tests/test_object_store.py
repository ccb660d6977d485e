"""gs:// and s3:// workdirs against real emulator servers on localhost (docs/storage.md).

A session fixture starts gcp-storage-emulator (tests/gcs_emulator.py) and moto's S3 server as processes on free
ports and points the clients at them through their standard settings only: STORAGE_EMULATOR_HOST (gcsfs),
TENSORSTORE_GCS_HTTP_URL (tensorstore's gcs driver, orbax's array writer), AWS_ENDPOINT_URL and the AWS_* keys
(s3fs/botocore and, through checkpoint._orbax_s3, tensorstore's s3 driver).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax import convert
from llm_jax import evaluate
from llm_jax import generate
from llm_jax import storage
from llm_jax import train
from llm_jax.data import pipeline
from llm_jax.data import preparation
from llm_jax.data import tokenizer as tokenizer_lib
from helpers import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_for(url: str, process, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'{url}: the emulator exited with status {process.returncode}')
    try:
      urllib.request.urlopen(url, timeout=1)
      return
    except urllib.error.HTTPError:
      return  # the server answers
    except OSError:
      time.sleep(0.2)
  raise RuntimeError(f'{url}: the emulator did not start within {timeout} s')


@pytest.fixture(scope='session')
def emulators(tmp_path_factory):
  """{'gs': bucket URL, 's3': bucket URL} on a GCS emulator and an S3 server started for this session."""
  logs = tmp_path_factory.mktemp('emulator_logs')
  gcs_port, s3_port = _free_port(), _free_port()
  gcs_url, s3_url = f'http://127.0.0.1:{gcs_port}', f'http://127.0.0.1:{s3_port}'
  processes = [
      subprocess.Popen([sys.executable, os.path.join(HERE, 'gcs_emulator.py'), 'start', '--host', '127.0.0.1',
                        '--port', str(gcs_port), '--in-memory', '-q'],
                       stdout=open(logs / 'gcs.log', 'w'), stderr=subprocess.STDOUT),
      subprocess.Popen([sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(s3_port)],
                       stdout=open(logs / 's3.log', 'w'), stderr=subprocess.STDOUT),
  ]
  env = dict(STORAGE_EMULATOR_HOST=gcs_url, TENSORSTORE_GCS_HTTP_URL=gcs_url,
             # gcsfs's hierarchical-namespace probe calls a control-plane API the emulator does not serve
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',
             AWS_ENDPOINT_URL=s3_url, AWS_ACCESS_KEY_ID='testing', AWS_SECRET_ACCESS_KEY='testing',
             AWS_REGION='us-east-1', AWS_DEFAULT_REGION='us-east-1')
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    _wait_for(gcs_url + '/', processes[0])
    _wait_for(s3_url + '/', processes[1])
    import fsspec
    fsspec.filesystem('gs').mkdir('llm-jax-test')
    fsspec.filesystem('s3').mkdir('llm-jax-test')
    yield {'gs': 'gs://llm-jax-test', 's3': 's3://llm-jax-test'}
  finally:
    for p in processes:
      p.terminate()
    for p in processes:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


SCHEMES = ['gs', 's3']


@pytest.mark.parametrize('scheme', SCHEMES)
def test_path_layer_round_trip_and_ranged_reads(emulators, scheme):
  root = storage.join(emulators[scheme], 'layer')
  data = bytes(range(256)) * 4
  storage.write_bytes(storage.join(root, 'a', 'blob.bin'), data)
  storage.write_json(storage.join(root, 'a', 'x.json'), {'b': 1, 'a': [1, 2]})
  assert storage.read_bytes(storage.join(root, 'a', 'blob.bin')) == data
  assert storage.read_range(storage.join(root, 'a', 'blob.bin'), 300, 17) == data[300:317]
  assert storage.size(storage.join(root, 'a', 'blob.bin')) == len(data)
  assert json.loads(storage.read_text(storage.join(root, 'a', 'x.json'))) == {'a': [1, 2], 'b': 1}
  assert storage.isdir(storage.join(root, 'a')) and storage.isfile(storage.join(root, 'a', 'x.json'))
  assert sorted(storage.listdir(storage.join(root, 'a'))) == ['blob.bin', 'x.json']
  assert storage.glob(storage.join(root, '**', '*.json')) == [storage.join(root, 'a', 'x.json')]
  storage.write_json(storage.join(root, 'a', 'x.json'), {'c': 3})  # replaced whole
  assert json.loads(storage.read_text(storage.join(root, 'a', 'x.json'))) == {'c': 3}
  storage.append_text(storage.join(root, 'a', 'log.jsonl'), '{"a": 1}\n')
  storage.append_text(storage.join(root, 'a', 'log.jsonl'), '{"a": 2}\n')
  assert storage.read_text(storage.join(root, 'a', 'log.jsonl')) == '{"a": 1}\n{"a": 2}\n'
  storage.check_writable(root)
  assert not storage.exists(storage.join(root, f'.write_probe_{os.getpid()}'))
  storage.rmtree(root)
  assert not storage.exists(storage.join(root, 'a', 'x.json'))


@pytest.mark.parametrize('scheme', SCHEMES)
def test_a_missing_bucket_is_one_error_naming_the_url_before_training(emulators, scheme, tmp_path):
  url = f'{scheme}://no-such-bucket-llm-jax/run'
  with pytest.raises(checkpoint.CheckpointError, match=f'{url}.*bucket does not exist'):
    train.train_and_evaluate(tiny_config(train=dict(steps=2)), url, jax.devices()[:1])


def _train_rows(workdir):
  rows = [json.loads(line) for line in storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines()]
  return {r['step']: r for r in rows if 'loss' in r}


STEPS = 6


def _config():
  return tiny_config(train=dict(steps=STEPS), checkpoint=dict(every=2, keep=2), eval=dict(every=0))


@pytest.fixture(scope='module')
def local_run(tmp_path_factory):
  """The uninterrupted run on a local workdir: what every bucket run must reproduce."""
  workdir = str(tmp_path_factory.mktemp('local') / 'run')
  train.train_and_evaluate(_config(), workdir, jax.devices()[:1])
  return workdir


@pytest.fixture(scope='module', params=SCHEMES)
def bucket_run(request, emulators):
  """The same job on a bucket workdir, stopped after step 3 (the path SIGTERM takes) and resumed."""
  workdir = storage.join(emulators[request.param], 'run')
  calls = {'n': 0}

  def preempt_at_3(self, step):
    calls['n'] += 1
    return calls['n'] == 3

  with pytest.MonkeyPatch.context() as m:
    m.setattr(train.Preemption, 'reached', preempt_at_3)
    result = train.train_and_evaluate(_config(), workdir, jax.devices()[:1])
  assert result['preempted'] and checkpoint.latest_step(workdir) == 3
  train.train_and_evaluate(_config(), workdir, jax.devices()[:1])
  return workdir


@pytest.mark.slow
def test_tiny_job_on_a_bucket_resumes_to_the_uninterrupted_losses(bucket_run, local_run):
  rows, reference = _train_rows(bucket_run), _train_rows(local_run)
  assert sorted(rows) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    for key in ('loss', 'grad_norm', 'param_norm', 'learning_rate'):
      assert rows[step][key] == reference[step][key], (bucket_run, step, key)
  names = storage.listdir(checkpoint.checkpoint_dir(bucket_run))
  assert sorted(n for n in names if n.isdigit()) == ['4', '6']  # keep=2, straight in the bucket
  assert storage.listdir(storage.join(bucket_run, 'tensorboard'))
  saved = json.loads(storage.read_text(storage.join(bucket_run, 'config.json')))
  assert saved['train']['steps'] == STEPS


def _params(workdir, step=None):
  return checkpoint.load_params(workdir, train.abstract_params(_config()), step)[0]


@pytest.mark.slow
def test_an_interrupted_save_leaves_the_last_good_checkpoint_usable(bucket_run, local_run):
  """A save cut short (no commit marker, arrays half written) is never listed, and the last complete
  checkpoint restores to the uninterrupted run's parameters (this test runs last: it damages step 6)."""
  step_6 = storage.join(checkpoint.checkpoint_dir(bucket_run), '6')
  for path in storage.glob(storage.join(step_6, '**', 'commit_success.txt')):
    storage.remove(path)
  storage.remove([p for p in storage.glob(storage.join(step_6, 'params', '**')) if storage.isfile(p)][0])
  assert checkpoint.latest_step(bucket_run) == 4
  restored, reference = _params(bucket_run), _params(local_run, 4)
  jax.tree.map(np.testing.assert_array_equal, restored, reference)


def test_a_bucket_checkpoint_restores_onto_another_device_count(bucket_run):
  """Elastic resume: the 1-device run's checkpoint, read straight from the bucket onto an 8-device FSDP mesh
  (runs after the damage test, which leaves step 4 as the last complete one; orbax caches what it listed)."""
  config = tiny_config(train=dict(steps=STEPS), mesh=dict(data=1, fsdp=8))
  mesh = train.Trainer(config, bucket_run, jax.devices()).mesh
  sharded = checkpoint.load_params(bucket_run, train.abstract_params(config, mesh=mesh), 4)[0]
  single = _params(bucket_run, 4)
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded))
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


# ---------------------------------------------------------------- a text job: prepared data, generate, evaluate, convert

def _text_config(corpus: str, tokenizer_path: str = ''):
  c = tiny_config(train=dict(steps=4), checkpoint=dict(every=0, keep=1, async_save=False), eval=dict(every=0))
  c.model.update(vocab_size=320, max_seq_len=64)
  c.data.update(source='text_files', paths=os.path.join(corpus, '*.txt'), seq_len=32, global_batch_size=4,
                min_doc_chars=1, tokenizer_path=tokenizer_path)
  return c


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  words = ('alpha', 'beta', 'gamma', 'delta', 'model', 'token', 'river', 'stone', 'light', 'sound', 'def', 'return')
  for i in range(40):
    (root / f'doc{i:02d}.txt').write_text('\n'.join(' '.join(rng.choice(words, size=8)) for _ in range(6)))
  tokenizer = root / 'tok.model'
  tokenizer.write_bytes(tokenizer_lib.train([(root / f'doc{i:02d}.txt').read_text() for i in range(40)], 320))
  return str(root)


@pytest.mark.parametrize('scheme', SCHEMES)
def test_prepared_data_in_a_bucket_gives_the_same_batches_by_ranged_reads(emulators, scheme, corpus, tmp_path,
                                                                          monkeypatch):
  config = _text_config(corpus, os.path.join(corpus, 'tok.model'))
  local = _text_config(corpus, os.path.join(corpus, 'tok.model'))  # the same preparation on a local disk
  local.data.prepared_dir = str(tmp_path / 'data')
  config.data.prepared_dir = storage.join(emulators[scheme], 'prepared')
  for c in (local, config):
    preparation.prepare(c, progress=False)
  assert storage.exists(storage.join(config.data.prepared_dir, 'index.json'))
  reads = []
  original = storage.read_ranges
  monkeypatch.setattr(storage, 'read_ranges', lambda *a: reads.append(len(a[0])) or original(*a))
  remote, reference = pipeline.open_split(config, 'train'), pipeline.open_split(local, 'train')
  for step in (0, 1, 7, 50):
    a, b = remote.batch(step, 1, 2), reference.batch(step, 1, 2)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{scheme} batch {step} {key}')
  # each batch: one concurrent set of ranged reads for its own windows (2 rows here, 3 if one crosses a shard)
  assert len(reads) == 4 and all(n <= 3 for n in reads), reads


@pytest.fixture(scope='module')
def text_run(emulators, corpus):
  """The text job end to end on gs://: preparation (tokenizer trained) into <workdir>/data, training, checkpoint."""
  workdir = storage.join(emulators['gs'], 'text')
  train.train_and_evaluate(_text_config(corpus), workdir, jax.devices()[:1])
  return workdir


@pytest.mark.slow
def test_text_job_on_a_bucket_and_generate_and_evaluate_read_it(text_run):
  for name in ('config.json', 'metrics.jsonl', 'tokenizer.model', 'tokenizer.fingerprint', 'data/index.json'):
    assert storage.exists(storage.join(text_run, name)), name
  assert checkpoint.latest_step(text_run) == 4
  completions = generate.run(text_run, ['alpha beta'], max_new_tokens=4, temperature=0.0, devices=jax.devices()[:1])
  assert len(completions) == 1 and isinstance(completions[0], str)
  result = evaluate.run(text_run, devices=jax.devices()[:1])
  assert result['output'] == storage.join(text_run, 'eval', 'step_4_validation.json')
  saved = json.loads(storage.read_text(result['output']))
  assert saved['step'] == 4 and np.isfinite(saved['perplexity']['loss'])


@pytest.mark.slow
def test_convert_to_hf_and_back_with_bucket_folders(emulators, text_run):
  hf_dir, imported = storage.join(emulators['s3'], 'hf'), storage.join(emulators['gs'], 'imported')
  written = convert.to_hf(text_run, hf_dir)
  assert sorted(storage.listdir(hf_dir)) == sorted(written)
  convert.from_hf(hf_dir, imported, dtype='float32')
  config = config_lib.load_workdir_config(text_run)
  like = train.abstract_params(config)
  original = checkpoint.load_params(text_run, like)[0]
  back = checkpoint.load_params(imported, like)[0]
  jax.tree.map(np.testing.assert_array_equal, back, original)
