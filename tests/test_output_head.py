"""The output head in chunks (config.model.logits_chunks; llm_jax/model/output_head.py).

- the losses (clm plain and with z-loss, mlm) and every gradient of the chunked head equal the whole logits' (float32:
  loss rtol 1e-6, gradients rtol 1e-5 and atol 1e-6 of the largest entry: only the order of the sums differs), untied
  and tied heads, with the final-logit soft-cap;
- the per-token log-probs DPO and its kin take (also in chunks that do not divide the sequence: padded), and the eval
  sums (loss, argmax hits), equal the whole logits';
- on meshes (context with fsdp, load-balanced; context with tensor and data; a tied head; load-balanced whole
  logits) the loss and gradients equal one device's whole ones;
- the HLO: the per-device temporaries of the loss-and-gradient step fall with the chunks (a large vocabulary, where
  the logits are the largest activations);
- validation: logits_chunks below 1, and a sequence that does not split into chunks x context, name the field.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import dry_run, runtime, validation
from llm_jax.data import synthetic
from llm_jax.objectives import base
from helpers import tiny_config_with

SEQ = 48
config_of = tiny_config_with(model=dict(max_seq_len=SEQ), data=dict(seq_len=SEQ, global_batch_size=4),
                             mesh=dict(data=1, fsdp=1, tensor=1))


def _loss_and_grads(config, devices):
  """Loss and gradients of the train step's objective on synthetic batch 0 (packed documents), the parameters
  made once from seed 0 on one device and placed on the config's mesh."""
  model = runtime.create_model(config)
  host_params = jax.device_get(nn.unbox(jax.jit(runtime.init_params_fn(config, model))(jax.random.key(0))))
  rt = runtime.Runtime(config, '/tmp/unused', devices)
  params = jax.device_put(host_params, rt.param_shardings)
  batch = rt.put(synthetic.make_batch(config, 'train', 0))

  @jax.jit
  def value_and_grads(params, batch):
    with runtime.sharding_context(rt.mesh, rt.rules):
      prepared = rt.objective.prepare(batch, 0)
      count, tokens = rt.objective.count(prepared), rt.objective.tokens(prepared)
      return jax.value_and_grad(lambda p: rt.objective.loss(rt.model, p, prepared).value(count, tokens))(params)

  loss, grads = value_and_grads(params, batch)
  return float(loss), jax.device_get(grads)


def _assert_same(got, want):
  (got_loss, got_grads), (want_loss, want_grads) = got, want
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()), err_msg=jax.tree_util.keystr(path))


CASES = [  # (model fields, train fields, chunks)
    (dict(), dict(), 4),
    (dict(tie_embeddings=True, final_logit_softcap=5.0), dict(z_loss=1e-2), 3),
    (dict(objective='mlm'), dict(), 6),
]


@functools.cache
def _whole_on_one_device():
  """The default tiny model's loss and gradients with the logits whole, on one device: the reference of most cases."""
  return _loss_and_grads(config_of(), jax.devices()[:1])


@pytest.mark.parametrize('model,train_fields,chunks', CASES, ids=str)
def test_chunked_losses_and_gradients_equal_the_whole_logits(model, train_fields, chunks):
  whole = (_whole_on_one_device() if not model and not train_fields else
           _loss_and_grads(config_of(model=model, train=train_fields), jax.devices()[:1]))
  chunked = _loss_and_grads(config_of(model=dict(model, logits_chunks=chunks), train=train_fields), jax.devices()[:1])
  _assert_same(chunked, whole)
  assert whole[0] > 1.0  # a real loss (vocabulary 64: about log 64 at initialisation)


def test_per_token_logprobs_and_eval_sums_equal_the_whole_logits():
  """What DPO and its kin take (target log-probs per token) and clm's eval sums, through the chunked head; the
  log-probs also in 5 chunks, which 48 tokens do not fill (padded to 50, the padding's values dropped: the
  validation asks a training run for chunks that divide, the model takes any length)."""
  whole_rt, chunked_rt = (runtime.Runtime(config_of(model=dict(logits_chunks=n)), '/tmp/unused', jax.devices()[:1])
                          for n in (1, 4))
  params = nn.unbox(jax.jit(runtime.init_params_fn(whole_rt.config, whole_rt.model))(jax.random.key(1)))
  batch = jax.tree.map(jnp.asarray, synthetic.make_batch(whole_rt.config, 'train', 0))
  logits = whole_rt.model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'])
  want = base.target_logprobs(logits, batch['targets'])
  for model in (chunked_rt.model, runtime.create_model(config_of(model=dict(logits_chunks=5)))):
    got = jax.jit(lambda p, m=model: base.per_token(m, p, batch, base.target_logprobs, batch['targets']))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  sums = [jax.jit(lambda p, rt=rt: rt.objective.eval_sums(rt.model, p, batch))(params) for rt in (whole_rt, chunked_rt)]
  np.testing.assert_allclose(sums[1]['loss'], sums[0]['loss'], rtol=1e-6)
  assert float(sums[1]['correct']) == float(sums[0]['correct'])
  assert float(sums[1]['tokens']) == float(sums[0]['tokens']) > 0


MESH_CASES = [  # (mesh, load balance, chunks, tied head): the chunk loop runs manual over the batch and sequence
    (dict(context=2, fsdp=2), True, 2, False),  # axes (the head's weight gathered over fsdp x context inside it),
    (dict(context=2, tensor=2, data=2), False, 3, False),  # the vocabulary's tensor axis automatic
    (dict(context=2, fsdp=2), False, 4, True),  # the tied embedding [V, D] as the head: gathered on its other axis
    (dict(context=4), True, 1, False),  # whole logits, the per-token values taken out of the layout
]


@pytest.mark.parametrize('mesh,balance,chunks,tied', MESH_CASES, ids=str)
def test_chunked_head_on_a_mesh_equals_one_device(mesh, balance, chunks, tied):
  want = (_loss_and_grads(config_of(model=dict(tie_embeddings=True)), jax.devices()[:1]) if tied else
          _whole_on_one_device())
  config = config_of(model=dict(logits_chunks=chunks, tie_embeddings=tied),
                     mesh=dict(mesh, context_exchange='all_gather', context_load_balance=balance))
  _assert_same(_loss_and_grads(config, jax.devices()[:int(np.prod(list(mesh.values())))]), want)


def _step_temporaries(chunks: int) -> int:
  """Per-device temporary bytes of the compiled loss-and-gradient step of one layer with a 8192-id vocabulary,
  one sequence of 512 tokens (the float32 logits: 16 MiB per copy)."""
  config = config_of(model=dict(vocab_size=8192, num_layers=1, max_seq_len=512, logits_chunks=chunks),
                     data=dict(seq_len=512, global_batch_size=1))
  rt = runtime.Runtime(config, '/tmp/unused', jax.devices()[:1])

  def grads(params, batch):
    return jax.grad(lambda p: rt.objective.loss(rt.model, p, batch).value(1.0, 1.0))(params)

  lowered = jax.jit(grads).lower(rt.abstract_params(), dry_run.abstract_batch(config, rt.mesh))
  return lowered.compile().memory_analysis().temp_size_in_bytes


def test_per_device_temporaries_fall_with_the_chunks():
  """Measured 41.5 MiB whole, 16.5 MiB in 8 chunks: the model's other temporaries (16.5 MiB with a 64-id
  vocabulary); the whole logits cost more than one float32 copy of [512, 8192]."""
  whole, chunked = (_step_temporaries(c) for c in (1, 8))
  assert whole - chunked > 512 * 8192 * 4, (whole, chunked)


@pytest.mark.parametrize('chunks,mesh,seq_len,message', [
    (0, {}, SEQ, r'must be >= 1'),
    (5, dict(context=2), SEQ, r'data.seq_len = 48 does not split into logits_chunks \* mesh.context = 5\*2'),
])
def test_bad_chunk_counts_name_the_field(chunks, mesh, seq_len, message):
  config = config_of(model=dict(logits_chunks=chunks), mesh=mesh, data=dict(seq_len=seq_len))
  with pytest.raises(config_lib.ConfigError, match=rf'^config\.model\.logits_chunks: {message}'):
    validation.validate(config, 2)
