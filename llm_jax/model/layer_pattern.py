"""Per-layer attention patterns: which attention each layer has, as data (config.model.attention_pattern).

A pattern is a comma-separated list of layer kinds, the first layer's first, repeated over the layers: layer i has
kind i % len(pattern). A kind is

  global          the whole causal context (model.sliding_window, when set, windows it: Mistral's one window)
  sliding:W       a sliding window of W tokens (the query and the W-1 keys before it)

and either may end in `@THETA`: this layer's RoPE base, unscaled (model.rope_scaling is for the other kinds). Gemma 3
is `sliding:1024@10000` five times then `global` (model.rope_theta 1e6 with its linear scaling); Gemma 2
`sliding:4096,global`.

Every attention kernel reads the layer's window (xla, splash, cuDNN, the decoding cache, the paged kernels), and
nn.scan runs over groups of one repeat of the pattern (transformer.Transformer; `layer_location` says where each
layer's parameters live).
"""

from __future__ import annotations

import dataclasses

LAYER_KINDS = ('global', 'sliding')  # config.model.attention_pattern: the kinds a layer may have


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """One layer's attention: its window (0 = global) and its own RoPE base (0 = the model's Rope)."""
  window: int = 0
  rope_theta: float = 0.0


def parse_pattern(text: str) -> tuple[LayerKind, ...]:
  """'sliding:1024@10000,global' -> (LayerKind(1024, 10000.0), LayerKind(0, 0.0)); ValueError saying what is
  wrong with which kind."""
  kinds = []
  for part in (p.strip() for p in text.split(',')):
    spec, _, theta = part.partition('@')
    name, _, window = spec.partition(':')
    if name not in LAYER_KINDS:
      raise ValueError(f'{part!r}: unknown layer kind {name!r}; expected one of {", ".join(LAYER_KINDS)}')
    if (name == 'sliding') != bool(window):
      raise ValueError(f'{part!r}: ' + ('sliding needs its window, as sliding:WINDOW' if name == 'sliding'
                                        else 'global takes no window'))
    try:
      size = int(window) if window else 0
      base = float(theta) if theta else 0.0
    except ValueError:
      raise ValueError(f'{part!r}: the window must be an integer and the RoPE base (after @) a number') from None
    if name == 'sliding' and size <= 0:
      raise ValueError(f'{part!r}: the window must be positive')
    if theta and base <= 0:
      raise ValueError(f'{part!r}: the RoPE base must be positive')
    kinds.append(LayerKind(size, base))
  return tuple(kinds)


def kind_of_layer(pattern: tuple[LayerKind, ...], layer: int) -> LayerKind:
  return pattern[layer % len(pattern)]


def layer_location(model_config, layer: int) -> tuple[tuple[str, ...], int | None]:
  """(path of layer `layer`'s subtree in the params, its index on the leading axis or None) for a config.model or
  TransformerConfig. Unrolled: layers_{i}. Scanned with one kind: layers, index i. Scanned with a pattern of P
  kinds: the groups layers/block_{i % P}, index i // P, and the layers after the last whole group unrolled."""
  if not model_config.scan_layers:
    return (f'layers_{layer}',), None
  period = len(parse_pattern(getattr(model_config, 'attention_pattern', 'global')))
  if period == 1:
    return ('layers',), layer
  if layer >= model_config.num_layers // period * period:
    return (f'layers_{layer}',), None
  return ('layers', f'block_{layer % period}'), layer // period
