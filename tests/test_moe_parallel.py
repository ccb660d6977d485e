"""A mixture of experts on 8 fake CPU devices (tests/conftest.py), on the meshes expert 4 x fsdp 2,
expert 2 x data 2 x tensor 2 (expert parallelism) and data 8 (the default mesh: every expert on every device),
all running the experts inside shard_map (moe.sharded_experts):

- the layer: the shard_map path gives the single-device ragged path's output and gradients (input, routing
  weights, gate, up, down) in float32 to rtol 1e-5, atol 1e-6 * the largest entry (sums in another order); with
  each shard told the wrong first expert (a mutation) it does not;
- the model: training gives the single-device losses, gradient norms and parameters within float32 tolerance:
  losses, gradient norms and balance terms of 3 steps to rtol 1e-5, and every gradient of the first step to
  rtol 1e-4 (atol 1e-6 * its largest entry), with the experts' weights split over the expert axis;
- a token count that does not divide the shards is padded, and gives the single-device layer too;
- the work: on the default mesh the compiled train step's matmul FLOPs per device are exactly one eighth of the
  one-device step's on the same global batch, with no all-gather (routing and experts stay on each data shard);
  the negative control, the layer left to XLA's partitioner as before, all-gathers the routing and runs more."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from llm_jax import config as config_lib
from llm_jax import dry_run, hlo_analysis, runtime, train
from llm_jax.data import synthetic
from llm_jax.model import moe, partitioning

pytestmark = pytest.mark.slow  # three short trainings with their compiles

MESHES = [dict(expert=4, fsdp=2), dict(expert=2, data=2, tensor=2), dict(data=8)]


def make_mesh(**sizes):
  shape = [sizes.get(axis, 1) for axis in config_lib.MESH_AXES]
  return Mesh(np.array(jax.devices()).reshape(shape), config_lib.MESH_AXES)


def layer_case(tokens=64, d=16, f=24, num_experts=4, k=2):
  """Random float32 inputs of ragged_experts with real top-k routing."""
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (tokens, d))
  weights, experts, _ = moe.route(jax.random.normal(keys[1], (tokens, num_experts)), k, norm_topk=True)
  gate, up = (0.3 * jax.random.normal(key, (num_experts, d, f)) for key in keys[2:4])
  down = 0.3 * jax.random.normal(keys[4], (num_experts, f, d))
  probe = jax.random.normal(keys[5], (tokens, d))  # the loss <y, probe> reaches every output entry
  return experts, probe, (x, weights, gate, up, down)


def layer_value_and_grads(mesh, experts, probe, args):
  """ragged_experts' output and the gradients of <output, probe>, traced under the mesh (None: one device)."""

  def loss(x, weights, gate, up, down):
    y = moe.ragged_experts(x, experts, weights, gate, up, down)
    return jnp.sum(y * probe), y

  def run(*args):
    if mesh is None:
      return jax.grad(loss, argnums=range(5), has_aux=True)(*args)
    with partitioning.activation_sharding(mesh, config_lib.DEFAULT_RULES):
      return jax.grad(loss, argnums=range(5), has_aux=True)(*args)

  grads, y = jax.jit(run)(*args)
  return jax.device_get(y), jax.device_get(grads)


def assert_close(actual, expected, name=''):
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * float(np.abs(expected).max()), err_msg=name)


@pytest.mark.parametrize('mesh,tokens', [(mesh, 64) for mesh in MESHES] + [(dict(data=8), 61),
                                                                          (dict(expert=2, data=4), 30)], ids=str)
def test_shard_map_dispatch_gives_the_single_device_layer(mesh, tokens, monkeypatch):
  experts, probe, args = layer_case(tokens)
  y_ref, grads_ref = layer_value_and_grads(None, experts, probe, args)
  calls = []
  dispatch = moe.sharded_experts
  monkeypatch.setattr(moe, 'sharded_experts', lambda *a: calls.append(1) or dispatch(*a))
  y, grads = layer_value_and_grads(make_mesh(**mesh), experts, probe, args)
  assert calls, 'the mesh did not take the shard_map path'
  assert_close(y, y_ref)
  for name, g, g_ref in zip(('x', 'weights', 'gate', 'up', 'down'), grads, grads_ref):
    assert_close(g, g_ref, name)
  if mesh.get('expert', 1) > 1:  # a mutation the comparison must catch: every shard believes it holds expert 0..
    monkeypatch.setattr(moe, '_first_local_expert', lambda axes, count: 0)
    y_wrong, _ = layer_value_and_grads(make_mesh(**mesh), experts, probe, args)
    assert not np.allclose(y_wrong, y_ref, rtol=1e-5, atol=1e-6 * float(np.abs(y_ref).max()))


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
      return jax.grad(lambda p: trainer.objective.loss(trainer.model, p, batch).value(1.0, 1.0))(params)

  gradients = jax.device_get(grads(state.params, first))
  rows = []
  for k in range(steps):
    state, m = trainer.train_step(state, trainer.put(synthetic.make_batch(config, 'train', k)))
    rows.append([float(m['loss']), float(m['grad_norm']), float(m['aux/moe_balance'])])
  return np.array(rows), gradients, state


@pytest.mark.parametrize('mesh', MESHES, ids=str)
def test_expert_parallel_meshes_give_the_single_device_run(mesh, monkeypatch):
  assert len(jax.devices()) == 8, 'tests/conftest.py sets 8 fake CPU devices'
  reference, ref_grads, _ = run(moe_config(), jax.devices()[:1])
  calls = []
  dispatch = moe.sharded_experts
  monkeypatch.setattr(moe, 'sharded_experts', lambda *a: calls.append(1) or dispatch(*a))
  rows, grads, state = run(moe_config(**mesh), jax.devices())
  assert calls, 'the mesh did not take the shard_map token dispatch'
  np.testing.assert_allclose(rows, reference, rtol=1e-5, err_msg=str(mesh))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
  gate = state.params['layers']['mlp']['gate']  # ('layers', 'expert', 'embed', 'expert_mlp')
  fsdp = 'fsdp' if mesh.get('fsdp', 1) > 1 else None
  tensor = 'tensor' if mesh.get('tensor', 1) > 1 else None
  assert gate.sharding.spec == P(None, 'expert', ('fsdp', 'context'), 'tensor'), gate.sharding.spec
  assert gate.addressable_shards[0].data.shape == (2, 4 // mesh.get('expert', 1), 32 // mesh.get('fsdp', 1),
                                                   32 // mesh.get('tensor', 1))
  del fsdp, tensor


def step_stats(config, devices):
  """hlo_analysis of the compiled train step (per device: matmul FLOPs over every loop trip, collectives)."""
  trainer = train.Trainer(config, '/tmp/unused', devices)
  lowered = trainer.train_step.lower(trainer.abstract_state(), dry_run.abstract_batch(config, trainer.mesh))
  return hlo_analysis.analyze(lowered.compile())


def test_default_mesh_runs_one_eighth_of_the_work_per_device(monkeypatch):
  """The default mesh (data 8, expert 1), 8 rows of 16 tokens: each device's compiled step multiplies exactly one
  eighth of what the one-device step does, and its only collectives are all-reduces (the gradients, the balance
  loss's [E] sums). Before (the control): the top_k and argsort over the sharded token axis were all-gathered and
  every device ran the experts on all tokens."""
  one = step_stats(moe_config(), jax.devices()[:1])
  eight = step_stats(moe_config(data=8), jax.devices())
  assert eight['matmul_flops'] == one['matmul_flops'] / 8, (eight['matmul_flops'], one['matmul_flops'])
  assert set(eight['collectives']) == {'all-reduce'}, eight['collectives']
  monkeypatch.setattr(moe, 'active', lambda: None)  # the layer ignores the mesh: XLA's partitioner alone
  replicated = step_stats(moe_config(data=8), jax.devices())
  assert 'all-gather' in replicated['collectives']
  assert replicated['matmul_flops'] > 2 * eight['matmul_flops']
