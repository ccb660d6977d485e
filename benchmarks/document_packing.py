"""The two packings (config.data.packing) on a prepared split: documents each cuts, and the share of positions the
document packing fills (the rest is padding). docs/data.md's table is this script on the stdlib corpus:

  python -m llm_jax.data.prepare --config=experiments/tiny.py --workdir=/tmp/llm_jax_tiny
  PYTHONPATH=. python benchmarks/document_packing.py /tmp/llm_jax_tiny/data 2048 8192 65536
"""

import sys
import time

import numpy as np

from llm_jax.data import document_packing
from llm_jax.data import pipeline
from llm_jax.data import preparation


def main(directory: str, seq_lens: list[int]) -> None:
  index = preparation.load_index(directory)
  stream = pipeline.TokenStream(preparation.read_split_tokens(directory, index, 'train'))
  start = time.perf_counter()
  starts, lengths = document_packing.document_spans(stream, index['tokenizer']['eos_id'])
  print(f'{stream.num_tokens:,} tokens, {starts.size:,} documents (median {int(np.median(lengths)):,} tokens, '
        f'longest {int(lengths.max()):,}); found in {time.perf_counter() - start:.2f} s')
  last = starts + lengths - 2  # the last input token of each document's pairs
  for seq_len in seq_lens:
    # The stream packing's window w holds inputs [w*L, (w+1)*L): a document whose pairs straddle a multiple of L
    # is cut.
    cut_by_windows = int(np.sum((lengths > 1) & (starts // seq_len != last // seq_len)))
    start = time.perf_counter()
    plan = document_packing.EpochPlan(starts, lengths, seq_len, seed=0, split_id=0, epoch=0)
    took = time.perf_counter() - start
    print(f'seq_len {seq_len:,}: stream {(stream.num_tokens - 1) // seq_len:,} rows, {cut_by_windows:,} documents '
          f'cut | documents {plan.num_rows:,} rows, {int(np.sum(lengths - 1 > seq_len)):,} documents cut, '
          f'{100 * plan.fill:.1f}% of positions filled, packed in {took:.2f} s')


if __name__ == '__main__':
  main(sys.argv[1], [int(n) for n in sys.argv[2:]] or [2048])
