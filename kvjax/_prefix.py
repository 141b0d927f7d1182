"""A host-side index of prompts cached in a paged pool, for prefix reuse.

A *holder* is a slot whose whole content is a known token sequence (a
system prompt, a previous request's prompt). Each holder is indexed by the
chained hashes of its full pages (page `i`'s hash covers its tokens and page
`i - 1`'s hash, as vLLM's prefix cache does; the sinks seed the chain), so a
lookup walks a new prompt's full pages and only compares tokens with the
holders it reaches. A match is then checked exactly, token for token, and
against the pool (the holder's length and the number of times its slot was
freed), so a stale or colliding entry is never reused: reusing the wrong KV
is worse than recomputing.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Sequence

import jax
import numpy as np

from kvjax import _pool
from kvjax._pool import PagedCache


class _Holder(NamedTuple):
  tokens: tuple
  generation: int


class PrefixMatch(NamedTuple):
  """A cached prefix: `fork(pool, slot, dst)` then append `tokens[length:]`."""
  slot: int
  length: int


class PrefixIndex:
  """Prompts held in a pool's slots, found by their full pages' hashes.

    index = kvjax.paged.PrefixIndex(pspec)
    index.insert(pool, system_prompt, slot=0)   # slot 0 holds exactly these tokens
    match = index.lookup(pool, request_tokens)  # PrefixMatch or None
    if match:
      pool = kvjax.paged.fork(pool, match.slot, dst)
      ... append request_tokens[match.length:] to dst ...
  """

  def __init__(self, spec):
    self.spec = spec
    self._holders: dict[int, _Holder] = {}
    self._by_hash: dict[bytes, set[int]] = {}  # chain hash -> holder slots

  def _chain(self, tokens: Sequence[int]):
    """The chained hash after the sinks and after each full page."""
    sinks, size = self.spec.sinks, self.spec.page_size
    h = hashlib.sha256(np.asarray(tokens[:sinks], np.int64).tobytes()).digest()
    out = [h]
    for start in range(sinks, len(tokens) - size + 1, size):
      h = hashlib.sha256(h + np.asarray(tokens[start:start + size], np.int64).tobytes()).digest()
      out.append(h)
    return out

  def insert(self, pool: PagedCache, tokens: Sequence[int], slot: int) -> None:
    """Registers `slot` as holding exactly `tokens` (its whole content).

    Raises:
      ValueError: the slot's length in `pool` is not `len(tokens)`.
    """
    _pool.require_pool(pool, "PrefixIndex.insert")
    tokens = tuple(int(t) for t in tokens)
    length, generation = self._slot_state(pool, slot)
    if length != len(tokens) or not tokens:
      raise ValueError(f"tokens: slot {slot} holds {length} tokens, got {len(tokens)} "
                       "(a holder is registered with its whole, non-empty content)")
    self.remove(slot)
    self._holders[slot] = _Holder(tokens, generation)
    self._by_hash.setdefault(self._chain(tokens)[-1], set()).add(slot)

  def remove(self, slot: int) -> None:
    """Forgets `slot` (call it before appending to or freeing a holder; a
    lookup also skips holders whose slot changed)."""
    holder = self._holders.pop(slot, None)
    if holder is not None:
      self._by_hash[self._chain(holder.tokens)[-1]].discard(slot)

  def lookup(self, pool: PagedCache, tokens: Sequence[int]) -> PrefixMatch | None:
    """The longest held prompt that is a proper prefix of `tokens` (at least
    one token is left to run, whose logits the caller needs), or None."""
    _pool.require_pool(pool, "PrefixIndex.lookup")
    tokens = tuple(int(t) for t in tokens)
    best = None
    for h in self._chain(tokens[:-1]):  # every full-page depth a holder can end at
      for slot in self._by_hash.get(h, ()):
        holder = self._holders[slot]
        n = len(holder.tokens)
        if (n < len(tokens) and tokens[:n] == holder.tokens
            and self._slot_state(pool, slot) == (n, holder.generation)
            and (best is None or n > best.length)):
          best = PrefixMatch(slot, n)
    return best

  @staticmethod
  def _slot_state(pool, slot):
    length, generation = jax.device_get((pool.length[slot], pool.generation[slot]))
    return int(length), int(generation)

  def __len__(self):
    return len(self._holders)
