"""config.xla options reach the compiled step; config.train.profile_steps writes a profiler trace."""

import glob
import os

import jax
import pytest

from llm_jax import benchmark
from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax import profiling
from llm_jax import train
from llm_jax import xla_options
from llm_jax.data import synthetic


def tiny_config(**sections):
  c = config_lib.get_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32,
                 dtype='float32', attention='xla')
  c.data.update(source='synthetic', seq_len=16, global_batch_size=4)
  c.train.update(steps=4, learning_rate=1e-2, warmup_steps=1, log_every=2)
  c.eval.update(every=0, steps=1)
  c.checkpoint.update(every=0)
  for section, values in sections.items():
    c[section].update(values)
  return c


def test_parse_options_takes_xla_flags_syntax_and_names_the_field():
  assert xla_options.parse_options('--xla_gpu_enable_latency_hiding_scheduler=true xla_gpu_enable_triton_gemm=0 '
                                   '--xla_gpu_enable_command_buffer=FUSION,CUBLAS --xla_x=') == {
      'xla_gpu_enable_latency_hiding_scheduler': True, 'xla_gpu_enable_triton_gemm': False,
      'xla_gpu_enable_command_buffer': 'FUSION,CUBLAS', 'xla_x': ''}
  with pytest.raises(config_lib.ConfigError, match='config.xla.options'):
    validation.validate(tiny_config(xla=dict(options='latency_hiding')), 1)
  with pytest.raises(config_lib.ConfigError, match='config.train.profile_steps'):
    validation.validate(tiny_config(train=dict(profile_steps='8,5')), 1)
  with pytest.raises(config_lib.ConfigError, match='step 1 compiles'):
    profiling.parse_steps('1,2')
  assert profiling.parse_steps('5,8') == (5, 8) and profiling.parse_steps('3') == (3, 3)


def test_config_xla_options_reach_the_compiled_train_step(tmp_path):
  """An option with a visible effect on a CPU (an HLO dump) set in config.xla.options, beside GPU options that a
  CPU compile accepts and ignores: the Trainer's step compiles with them."""
  dump = tmp_path / 'dump'
  config = tiny_config(xla=dict(options=f'--xla_dump_to={dump} --xla_dump_hlo_as_text=true '
                                        '--xla_gpu_enable_latency_hiding_scheduler=true'))
  trainer = train.Trainer(config, str(tmp_path), jax.devices()[:1])
  state = trainer.fresh_state()
  trainer.train_step(state, trainer.put(synthetic.make_batch(config, 'train', 0)))
  dumped = [os.path.basename(p) for p in glob.glob(str(dump / '*'))]
  assert any('jit_step' in name for name in dumped), dumped[:10]


def _trace_files(directory):
  return glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '*.xplane.pb')), \
      glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '*.trace.json.gz'))


def test_profile_steps_write_a_trace_in_training_and_the_benchmark(tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(train=dict(profile_steps='2,3')), str(workdir), jax.devices()[:1])
  xplane, perfetto = _trace_files(str(workdir / 'profile'))
  assert xplane and perfetto, os.listdir(workdir)
  profile_dir = str(tmp_path / 'bench' / 'profile')
  benchmark.run(tiny_config(train=dict(profile_steps='2,2')), steps=2, warmup=1, devices=jax.devices()[:1],
                profile_dir=profile_dir)
  assert all(_trace_files(profile_dir))
