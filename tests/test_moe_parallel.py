"""Expert parallelism on 8 fake CPU devices (tests/conftest.py): a mixture-of-experts model trained on the meshes
expert 4 x fsdp 2 and expert 2 x data 2 x tensor 2 gives the single-device losses, gradient norms and parameters
within float32 tolerance: losses, gradient norms and balance terms of 3 steps to rtol 1e-5, and every gradient of the
first step to rtol 1e-4 (atol 1e-6 * its largest entry: sums in another order), with the experts' weights split
over the expert axis."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm_jax import config as config_lib
from llm_jax import runtime, train
from llm_jax.data import synthetic

pytestmark = pytest.mark.slow  # three short trainings with their compiles


def moe_config(**mesh):
  """tests/test_train.py's tiny config of the mesh tests, made sparse."""
  c = config_lib.get_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32,
                 dtype='float32', attention='xla', ffn='moe', num_experts=4, experts_per_token=2, expert_ffn_dim=32,
                 router_z_loss_coef=1e-3)
  c.data.update(source='synthetic', seq_len=16, global_batch_size=8)
  c.train.update(steps=3, learning_rate=1e-2, warmup_steps=1, log_every=1)
  c.eval.update(every=0, steps=2)
  c.checkpoint.update(every=0, keep=3)
  c.mesh.update(dict(dict(data=1, expert=1, fsdp=1, tensor=1), **mesh))
  return c


def run(config, devices, steps=3):
  """(rows of loss, grad norm, balance term per step; the first step's gradients; the final state)."""
  trainer = train.Trainer(config, '/tmp/unused', devices)
  state = trainer.fresh_state()
  first = trainer.put(synthetic.make_batch(config, 'train', 0))

  @jax.jit
  def grads(params, batch):
    with runtime.sharding_context(trainer.mesh, trainer.rules):
      return jax.grad(lambda p: trainer.objective.loss(trainer.model, p, batch).total)(params)

  gradients = jax.device_get(grads(state.params, first))
  rows = []
  for k in range(steps):
    state, m = trainer.train_step(state, trainer.put(synthetic.make_batch(config, 'train', k)))
    rows.append([float(m['loss']), float(m['grad_norm']), float(m['aux/moe_balance'])])
  return np.array(rows), gradients, state


@pytest.mark.parametrize('mesh', [dict(expert=4, fsdp=2), dict(expert=2, data=2, tensor=2)])
def test_expert_parallel_meshes_give_the_single_device_run(mesh):
  assert len(jax.devices()) == 8, 'tests/conftest.py sets 8 fake CPU devices'
  reference, ref_grads, _ = run(moe_config(), jax.devices()[:1])
  rows, grads, state = run(moe_config(**mesh), jax.devices())
  np.testing.assert_allclose(rows, reference, rtol=1e-5, err_msg=str(mesh))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
  gate = state.params['layers']['mlp']['gate']  # ('layers', 'expert', 'embed', 'expert_mlp')
  fsdp = 'fsdp' if mesh.get('fsdp', 1) > 1 else None
  tensor = 'tensor' if mesh.get('tensor', 1) > 1 else None
  assert gate.sharding.spec == P(None, 'expert', 'fsdp', 'tensor'), gate.sharding.spec
  assert gate.addressable_shards[0].data.shape == (2, 4 // mesh['expert'], 32 // mesh.get('fsdp', 1),
                                                   32 // mesh.get('tensor', 1))
  del fsdp, tensor
