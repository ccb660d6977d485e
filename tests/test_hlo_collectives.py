"""llm_jax.hlo_analysis on collectives: TPU's all-reduce-scatter fusions counted as reduce-scatters, group sizes in
the three forms XLA prints them, the bytes each device sends, the largest sources, and the side-by-side table.

The module below is written in the form a TPU compile prints (trimmed from a v5p dump of our context-parallel step):
a kCustom fusion whose all-reduce the root dynamic-slices, a plain reduce-scatter of the same gradient (which must
send the same bytes), an all-gather with iota groups, an all-reduce over one axis of a mesh-form group.
"""

import pytest

from llm_jax import hlo_analysis

MODULE = '''HloModule jit_step, is_scheduled=true, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: bf16[4096,8]) -> bf16[1024,8] {
  %input.1 = bf16[4096,8]{1,0} parameter(0)
  %all-reduce.1 = bf16[4096,8]{1,0} all-reduce(%input.1), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  %partition-id.1 = u32[] partition-id()
  %constant.1 = u32[] constant(1024)
  %multiply.1 = u32[] multiply(%partition-id.1, %constant.1)
  %constant.2 = u32[] constant(0)
  ROOT %dynamic-slice.1 = bf16[1024,8]{1,0} dynamic-slice(%all-reduce.1, %multiply.1, %constant.2), dynamic_slice_sizes={1024,8}
}

ENTRY %main (p0: bf16[4096,8], p1: bf16[1024,8], p2: f32[256]) -> (bf16[1024,8], bf16[1024,8], bf16[4096,8], f32[256]) {
  %p0 = bf16[4096,8]{1,0} parameter(0)
  %p1 = bf16[1024,8]{1,0} parameter(1)
  %p2 = f32[256]{0} parameter(2)
  %fusion.1 = bf16[1024,8]{1,0} fusion(%p0), kind=kCustom, calls=%all-reduce-scatter.1, metadata={op_name="jit(step)/transpose(jvp(Transformer))/mlp/up/dot_general"}
  %reduce-scatter.1 = bf16[1024,8]{1,0} reduce-scatter(%p0), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add, metadata={op_name="jit(step)/transpose(jvp(Transformer))/mlp/gate/dot_general"}
  %all-gather.1 = bf16[4096,8]{1,0} all-gather(%p1), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}, use_global_device_ids=true
  %all-reduce.2 = f32[256]{0} all-reduce(%p2), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(step)/norm/reduce_sum"}
  ROOT %t = (bf16[1024,8]{1,0}, bf16[1024,8]{1,0}, bf16[4096,8]{1,0}, f32[256]{0}) tuple(%fusion.1, %reduce-scatter.1, %all-gather.1, %all-reduce.2)
}
'''

GRADIENT = 4096 * 8 * 2  # bytes of the bf16[4096,8] a device reduces and scatters


def test_collectives_by_kind_with_the_bytes_each_device_sends():
  summary = hlo_analysis.analyze_text(MODULE).summary()['collectives']
  assert set(summary) == {'reduce-scatter', 'all-gather', 'all-reduce'}  # the fusion's all-reduce is not one
  scatter = summary['reduce-scatter']
  assert (scatter['count'], scatter['fused'], scatter['bytes']) == (2, 1, 2 * 1024 * 8 * 2)
  assert scatter['sent_bytes'] == 2 * GRADIENT * 3 / 4  # fused or not: (n-1)/n of the gradient, n = 4
  assert summary['all-gather']['sent_bytes'] == GRADIENT * 3 / 4  # iota groups [1,4]: n = 4
  assert summary['all-reduce']['sent_bytes'] == 2 * 256 * 4 * 1 / 2  # one mesh axis of 2: n = 2
  sources = [source['op'] for source in scatter['top_sources']]
  assert sorted(sources) == ['transpose(jvp(Transformer))/mlp/gate/dot_general',
                             'transpose(jvp(Transformer))/mlp/up/dot_general']


@pytest.mark.parametrize('attributes,size', [
    ('replica_groups={{0,1},{2,3}}, dimensions={0}', 2),
    ('replica_groups=[2,4]<=[8], dimensions={0}', 4),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=1] {'axis_1','axis_2'}, dimensions={1}", 4),
    ('channel_id=3, dimensions={0}', 8),  # no groups: every partition
])
def test_group_sizes_in_each_form(attributes, size):
  assert hlo_analysis._group_size(attributes, 8) == size


def test_table_of_two_steps_side_by_side(tmp_path, capsys):
  path = tmp_path / 'step.txt'
  path.write_text(MODULE)
  hlo_analysis.main([f'ours={path}', f'theirs={path}'])
  out = capsys.readouterr().out
  assert '| collective | ours: count / result GiB / sent GiB | theirs: count / result GiB / sent GiB |' in out
  assert '| reduce-scatter | 2 (1 fused) / 0.00 / 0.00 | 2 (1 fused) / 0.00 / 0.00 |' in out
  assert 'mlp/up/dot_general' in out
