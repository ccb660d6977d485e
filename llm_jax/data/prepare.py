"""Command line of the data preparation (the work is done by preparation.py):

    python -m llm_jax.data.prepare --config=experiments/tiny.py [--workdir=/tmp/tiny] [--config.data.max_docs=100]

From code call `llm_jax.data.prepare(config, workdir)`. Do not `import llm_jax.data.prepare`: importing a
submodule binds its name on the package, which would hide that function.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
from ml_collections import config_flags

from llm_jax.data import preparation

config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. experiments/tiny.py.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir: gets tokenizer.model and tokenizer.fingerprint; prepared data goes '
                    'to <workdir>/data unless config.data.prepared_dir is set.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  started = time.time()
  directory = preparation.output_dir(config, workdir)
  index = preparation.prepare(config, workdir)
  elapsed = time.time() - started
  print(f'{preparation.summary(index)}\n{"reused" if elapsed < index["seconds"] / 2 else "prepared"} '
        f'{directory} in {elapsed:.1f}s')


if __name__ == '__main__':
  app.run(main)
