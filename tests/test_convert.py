"""Hugging Face interop: tiny random LlamaForCausalLM models (torch on CPU) against llm_jax after conversion.

Logits are compared with transformers' own forward pass (an independent implementation), so the tests check the
weight mapping, the rotary layout, GQA, rope_theta, rms_norm_eps and tied/untied heads, not convert against itself.
"""

import copy
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors.numpy import save_file  # noqa: E402

from llm_jax import checkpoint, config as config_lib, convert, storage, train  # noqa: E402

torch.set_num_threads(1)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=50000.0,
            initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
TOL = 1e-4


def make_hf_model(directory, seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**{**TINY, **overrides})
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(directory, safe_serialization=True)
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def our_model(workdir):
  config = config_lib.load_workdir_config(workdir)
  params, _ = checkpoint.load_params(workdir, train.abstract_params(config))
  return config, train.create_model(config), params


def our_logits(workdir, tokens):
  _, model, params = our_model(workdir)
  return np.asarray(model.apply({'params': params}, jnp.asarray(tokens)))


def random_tokens(seed=0, shape=(2, 24)):
  return np.random.default_rng(seed).integers(0, TINY['vocab_size'], shape)


@pytest.fixture(scope='module')
def untied(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('hf_untied'))
  return directory, make_hf_model(directory, seed=0)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_import_matches_transformers_logits(untied, tmp_path, scan_layers):
  hf_dir, model = untied
  workdir = str(tmp_path / 'work')
  config = convert.from_hf(hf_dir, workdir, scan_layers=scan_layers, dtype='float32')
  assert (config.model.num_kv_heads, config.model.rope_theta, config.model.norm_eps) == (2, 50000.0, 1e-5)
  assert not config.model.tie_embeddings and config.model.scan_layers == scan_layers
  tokens = random_tokens()
  diff = np.max(np.abs(our_logits(workdir, tokens) - hf_logits(model, tokens)))
  print(f'max abs logits difference (scan_layers={scan_layers}): {diff:.2e}')
  assert diff <= TOL
  _, meta = checkpoint.load_params(workdir, train.abstract_params(config))
  assert meta['step'] == 0 and meta['model']['d_model'] == 64


def test_import_tied_embeddings(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  model = make_hf_model(hf_dir, seed=1, tie_word_embeddings=True)
  workdir = str(tmp_path / 'work')
  config = convert.from_hf(hf_dir, workdir, scan_layers=False, dtype='float32')
  assert config.model.tie_embeddings
  tokens = random_tokens(1)
  assert np.max(np.abs(our_logits(workdir, tokens) - hf_logits(model, tokens))) <= TOL


def test_bfloat16_checkpoint_imports(untied, tmp_path):
  """Most LLaMA releases are bfloat16, which safetensors' numpy reader cannot represent."""
  _, model = untied
  hf_dir = str(tmp_path / 'hf_bf16')
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(hf_dir, safe_serialization=True)  # fixture untouched
  convert.from_hf(hf_dir, str(tmp_path / 'work'), scan_layers=True, dtype='float32')
  _, _, params = our_model(str(tmp_path / 'work'))
  expected = model.model.layers[1].self_attn.o_proj.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(params['layers']['attn']['o']['kernel'][1]).reshape(-1, 64).T, expected)


def test_round_trip_and_transformers_loads_export(tmp_path):
  """llm_jax -> HF (sharded) -> llm_jax gives identical tensors; transformers gives our logits on the export."""
  config = config_lib.get_config()
  config.model.update(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=96,
                      max_seq_len=64, rope_theta=20000.0, dtype='float32', init_std=0.1)
  config.data.seq_len = 32
  model = train.create_model(config)
  params = jax.tree.map(np.asarray, nn.unbox(train.init_params_fn(config, model)(jax.random.key(3))))
  source = str(tmp_path / 'source')
  convert.write_workdir(config, params, source, dict(model=config.model.to_dict()))

  hf_dir = str(tmp_path / 'hf')
  files = convert.to_hf(source, hf_dir, max_shard_bytes=40_000)  # forces several shards + index
  assert convert.INDEX_FILE in files and len([f for f in files if f.endswith('.safetensors')]) > 1
  with open(os.path.join(hf_dir, 'config.json')) as f:
    assert json.load(f)['architectures'] == ['LlamaForCausalLM']

  hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  tokens = random_tokens(2)
  ours = np.asarray(model.apply({'params': params}, jnp.asarray(tokens)))
  assert np.max(np.abs(ours - hf_logits(hf_model, tokens))) <= TOL

  back = str(tmp_path / 'back')
  convert.from_hf(hf_dir, back, scan_layers=True, dtype='float32')
  _, _, restored = our_model(back)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), params)


def test_round_trip_tied_unscanned_bfloat16_export(tmp_path):
  config = config_lib.get_config()
  config.model.update(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=96,
                      max_seq_len=64, tie_embeddings=True, scan_layers=False, dtype='float32')
  config.data.seq_len = 32
  model = train.create_model(config)
  params = jax.tree.map(np.asarray, nn.unbox(train.init_params_fn(config, model)(jax.random.key(4))))
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), params)  # exactly representable
  source = str(tmp_path / 'source')
  convert.write_workdir(config, params, source, dict(model=config.model.to_dict()))
  hf_dir = str(tmp_path / 'hf')
  assert convert.to_hf(source, hf_dir, hf_dtype='bfloat16') == ['model.safetensors', 'config.json']
  back = str(tmp_path / 'back')
  assert convert.from_hf(hf_dir, back, scan_layers=False, dtype='float32').model.tie_embeddings
  _, _, restored = our_model(back)
  assert 'lm_head' not in restored
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), params)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_lora_workdir_exports_merged_weights(tmp_path, scan_layers):
  """A LoRA run exports W + A@B*alpha/r: transformers' logits on the export equal our model WITH its adapters
  (unmerged), and the export holds no adapter tensors."""
  from llm_jax.model import lora
  config = config_lib.get_config()
  config.model.update(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=96,
                      max_seq_len=64, dtype='float32', init_std=0.1, scan_layers=scan_layers)
  config.data.seq_len = 32
  config.lora.update(rank=4, alpha=8.0, targets='q,k,v,o,gate,up,down')
  model = train.create_model(config)
  params = jax.tree.map(np.asarray, nn.unbox(train.init_params_fn(config, model)(jax.random.key(5))))
  rng = np.random.default_rng(0)  # non-zero B: fresh adapters are zero and would make the test trivial
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(0, 0.2, x.shape).astype(x.dtype) if path[-1].key == 'lora_b' else x, params)
  source = str(tmp_path / 'lora')
  convert.write_workdir(config, params, source, dict(model=config.model.to_dict()))

  hf_dir = str(tmp_path / 'hf')
  convert.to_hf(source, hf_dir)
  hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  tokens = random_tokens(3)
  with_adapters = np.asarray(model.apply({'params': params}, jnp.asarray(tokens)))
  base_config = copy.deepcopy(config)
  base_config.lora.rank = 0
  base_only = np.asarray(train.create_model(base_config).apply({'params': lora.split(params)[0]}, tokens))
  assert np.max(np.abs(base_only - with_adapters)) > 1e-2  # the adapters matter
  assert np.max(np.abs(hf_logits(hf_model, tokens) - with_adapters)) <= TOL
  assert not any('lora' in name for name in hf_model.state_dict())


def test_imported_workdir_initialises_training(untied, tmp_path):
  """config.train.init_from = the imported workdir: the first step's loss is that of the imported weights."""
  from llm_jax.data import synthetic
  hf_dir, _ = untied
  imported = str(tmp_path / 'imported')
  convert.from_hf(hf_dir, imported, dtype='float32')
  config = config_lib.load_workdir_config(imported)
  config.data.update(seq_len=16, global_batch_size=2)
  config.train.update(steps=1, init_from=imported, log_every=1, warmup_steps=0)
  config.eval.update(every=0, steps=1)
  config.model.attention = 'xla'
  result = train.train_and_evaluate(config, str(tmp_path / 'finetune'), devices=jax.devices()[:1])
  batch = synthetic.make_batch(config, 'train', 0)  # packed documents: segment ids and positions, unlike HF
  _, model, params = our_model(imported)
  expected = train.loss_sum(params, jax.tree.map(jnp.asarray, batch), model) / batch['loss_mask'].sum()
  assert abs(result['loss'] - float(expected)) < 1e-5


def _greedy_recompute(model, params, prompt, steps):
  """Independent greedy loop: the full forward pass again at every step, argmax at the last real position.

  The sequence lives in a fixed-length buffer (compiled once); causal attention keeps the unused tail out."""
  @jax.jit
  def next_token(tokens, last):
    return jnp.argmax(model.apply({'params': params}, tokens)[0, last])

  tokens = np.zeros((1, len(prompt) + steps), np.int32)
  tokens[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + steps):
    tokens[0, i] = int(next_token(tokens, i - 1))
  return tokens[0, len(prompt):].tolist()


def _hf_greedy(model, prompt, steps):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(untied, tmp_path):
  """KV-cache decoding parity with the full forward is the generation tests' job (tests/test_decoding.py)."""
  hf_dir, hf_model = untied
  workdir = str(tmp_path / 'work')
  convert.from_hf(hf_dir, workdir, scan_layers=True, dtype='float32')
  _, model, params = our_model(workdir)
  prompt = random_tokens(5, (7,)).tolist()
  expected = _hf_greedy(hf_model, prompt, 20)
  assert len(expected) == 20
  assert _greedy_recompute(model, params, prompt, 20) == expected
  decoding = pytest.importorskip('llm_jax.decoding')
  cfg = model.cfg
  assert decoding.generate(cfg, params, [prompt], 20)[0] == expected


def test_tokenizer_is_imported_and_exported(untied, tmp_path):
  spm = pytest.importorskip('sentencepiece')
  hf_src, _ = untied
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  for name in ('config.json', 'model.safetensors'):
    (hf_dir / name).write_bytes(open(os.path.join(hf_src, name), 'rb').read())
  text = tmp_path / 'corpus.txt'
  text.write_text('\n'.join(f'line {i} of a tiny corpus about llamas and jax' for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(hf_dir / 'tokenizer'), vocab_size=60,
                                 model_type='bpe', minloglevel=2)
  workdir = str(tmp_path / 'work')
  config = convert.from_hf(str(hf_dir), workdir)
  fingerprint = hashlib.sha256((hf_dir / 'tokenizer.model').read_bytes()).hexdigest()
  assert open(os.path.join(workdir, 'tokenizer.fingerprint')).read().strip() == fingerprint
  assert config.data.tokenizer_path == os.path.join(workdir, 'tokenizer.model')
  _, meta = checkpoint.load_params(workdir, train.abstract_params(config))
  assert meta['tokenizer_fingerprint'] == fingerprint
  out = str(tmp_path / 'out')
  assert 'tokenizer.model' in convert.to_hf(workdir, out)
  hf_config = json.load(open(os.path.join(out, 'config.json')))
  sp = spm.SentencePieceProcessor(model_file=str(hf_dir / 'tokenizer.model'))
  assert (hf_config['bos_token_id'], hf_config['eos_token_id']) == (sp.bos_id(), sp.eos_id())


# ------------------------------------------------------------------------------------------------------ errors


def test_missing_files(untied, tmp_path):
  hf_src, _ = untied
  with pytest.raises(convert.ConversionError, match='config.json: missing'):
    convert.from_hf(str(tmp_path), str(tmp_path / 'w1'))
  (tmp_path / 'config.json').write_text(open(os.path.join(hf_src, 'config.json')).read())
  with pytest.raises(convert.ConversionError, match='neither model.safetensors nor model.safetensors.index.json'):
    convert.from_hf(str(tmp_path), str(tmp_path / 'w2'))
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {'model.norm.weight': 'model-00001-of-00002.safetensors'}}))
  with pytest.raises(convert.ConversionError, match='model-00001-of-00002.safetensors: missing'):
    convert.from_hf(str(tmp_path), str(tmp_path / 'w3'))
  with pytest.raises(FileNotFoundError, match='no such workdir'):
    convert.to_hf(str(tmp_path / 'nowhere'), str(tmp_path / 'out'))


def _edited_checkpoint(hf_src, directory, edit):
  """A copy of the HF checkpoint whose tensors dict went through `edit`."""
  os.makedirs(directory)
  with open(os.path.join(hf_src, 'config.json')) as f:
    open(os.path.join(directory, 'config.json'), 'w').write(f.read())
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(hf_src, 'model.safetensors'))
  edit(tensors)
  save_file(tensors, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
  return str(directory)


def test_missing_tensor(untied, tmp_path):
  hf_dir = _edited_checkpoint(untied[0], tmp_path / 'hf', lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(convert.ConversionError, match='tensor model.layers.1.mlp.up_proj.weight is missing'):
    convert.from_hf(hf_dir, str(tmp_path / 'work'))


def test_shape_mismatch(untied, tmp_path):
  def edit(tensors):
    tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((64, 64), np.float32)
  hf_dir = _edited_checkpoint(untied[0], tmp_path / 'hf', edit)
  with pytest.raises(convert.ConversionError,
                     match=r'tensor model.layers.0.self_attn.k_proj.weight has shape \[64, 64\], expected \[32, 64\]'):
    convert.from_hf(hf_dir, str(tmp_path / 'work'))


def test_unexpected_tensor(untied, tmp_path):
  def edit(tensors):
    tensors['model.layers.0.self_attn.q_proj.bias'] = np.zeros((64,), np.float32)
  hf_dir = _edited_checkpoint(untied[0], tmp_path / 'hf', edit)
  with pytest.raises(convert.ConversionError, match='q_proj.bias is not part of a LlamaForCausalLM model'):
    convert.from_hf(hf_dir, str(tmp_path / 'work'))


@pytest.mark.parametrize('edit, field', [
    ({'model_type': 'gemma'}, 'model_type'),
    ({'architectures': ['LlamaForSequenceClassification']}, 'architectures'),
    ({'rope_parameters': {'rope_type': 'longrope', 'rope_theta': 5e5, 'factor': 8.0}}, "rope_parameters: rope "
     "scaling of type 'longrope'"),
    ({'rope_scaling': {'type': 'dynamic', 'factor': 2.0}, 'rope_parameters': None},
     "rope_scaling: rope scaling of type 'dynamic'"),
    ({'attention_bias': True}, 'attention_bias'),
    ({'mlp_bias': True}, 'mlp_bias'),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
    ({'head_dim': 31}, 'head_dim'),  # an explicit even head_dim imports (tests/test_hf_patterns.py); odd: no RoPE
])
def test_unsupported_fields_are_refused(untied, tmp_path, edit, field):
  with open(os.path.join(untied[0], 'config.json')) as f:
    hf = json.load(f)
  hf.update(edit)
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  with pytest.raises(convert.ConversionError, match=f'config.json: {field}'):
    convert.from_hf(str(tmp_path), str(tmp_path / 'work'))


def test_export_refuses_mlm_models(tmp_path):
  config = config_lib.get_config()
  config.model.update(vocab_size=128, d_model=64, num_layers=1, num_heads=4, num_kv_heads=4, ffn_dim=96,
                      max_seq_len=64, objective='mlm')
  os.makedirs(tmp_path / 'w')
  storage.write_json(str(tmp_path / 'w' / 'config.json'), json.loads(config.to_json_best_effort()))
  with pytest.raises(convert.ConversionError, match="config.model.objective='mlm'"):
    convert.to_hf(str(tmp_path / 'w'), str(tmp_path / 'hf'))
