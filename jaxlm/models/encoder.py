"""The bidirectional encoder (BERT): the shared trunk with attention that is not causal.

Every position sees every position of its own segment: of its document in a packed row, and never
padding (segment id 0), so a packed document gives the same outputs as alone and padding changes
nothing. Logits are over the vocabulary at every position (masked-token prediction, objectives/mlm.py).
"""

import jax

from jaxlm.models.layers import Mask, attention_mask
from jaxlm.models.transformer import Trunk, default_positions


class Encoder(Trunk):
  """Token ids (B, T) -> logits (B, T, V) of the token at each position, from both sides."""

  family = "encoder"

  def __call__(self, tokens_BxT: jax.Array, dropout_key: jax.Array | None = None, *,
               segment_ids_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None):
    t = tokens_BxT.shape[1]
    if positions_BxT is None:
      positions_BxT = default_positions(t)
    mask = Mask(attention_mask(t, segment_ids_BxT, causal=False), segment_ids_BxT, causal=False)
    return self.forward(tokens_BxT, mask, positions_BxT, dropout_key)[0]
