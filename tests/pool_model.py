"""A plain-Python model of the paged pool's allocation, written from
docs/serving.md (not from kvjax's code): which sequence holds which logical
page, shared or not, how many pages are free, what is refused.

Pages are named by the model itself (fresh integers); `assert_matches`
checks that kvjax's physical page ids are a consistent renaming of them and
that kvjax's accounting invariants hold.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np


class PoolModel:

  def __init__(self, spec):
    self.spec = spec
    self.pages = {s: [] for s in range(spec.max_seqs)}  # slot -> model page ids
    self.length = [0] * spec.max_seqs
    self.refused = [0] * spec.max_seqs
    self._ids = itertools.count()

  def _pages_for(self, length):
    nonsink = max(length - self.spec.sinks, 0)
    return -(-nonsink // self.spec.page_size)

  def used(self):
    return {p for pages in self.pages.values() for p in pages}

  def free_count(self):
    return self.spec.num_pages - len(self.used())

  def append(self, seq, n_valid):
    """Returns the slots that appended (first come, first served)."""
    free = self.free_count()
    done = []
    for s, n in zip(seq, n_valid):
      new = self.length[s] + n
      need = self._pages_for(new) - self._pages_for(self.length[s])
      if new - self.spec.sinks > self.spec.max_tokens or need > free:
        self.refused[s] += n
        continue
      free -= need
      self.pages[s] += [next(self._ids) for _ in range(need)]
      self.length[s] = new
      if n:
        done.append(s)
    return done

  def free(self, seq):
    for s in seq:
      self.pages[s] = []
      self.length[s] = 0
      self.refused[s] = 0

  def fork(self, src, dst):
    """Returns whether the fork was served."""
    size = self.spec.page_size
    nonsink = max(self.length[src] - self.spec.sinks, 0)
    full, partial = divmod(nonsink, size)
    if self.length[dst] or self.pages[dst] or (partial and self.free_count() < 1):
      self.refused[dst] += self.length[src]
      return False
    self.pages[dst] = self.pages[src][:full] + ([next(self._ids)] if partial else [])
    self.length[dst] = self.length[src]
    return True

  def assert_matches(self, pool):
    """kvjax's pool state equals the model's, up to the names of pages, and
    its own accounting is consistent."""
    spec = self.spec
    got = jax.device_get(dict(table=pool.page_table, ref=pool.ref_count,
                              free=pool.free_pages, free_count=pool.free_count,
                              length=pool.length, refused=pool.refused))
    table, ref = np.asarray(got["table"]), np.asarray(got["ref"])
    assert np.asarray(got["length"]).tolist() == self.length
    assert np.asarray(got["refused"]).tolist() == self.refused
    renaming = {}
    for s in range(spec.max_seqs):
      held = table[s][table[s] < spec.num_pages].tolist()
      assert held == table[s][:len(held)].tolist(), f"slot {s}: holes in its page table"
      assert len(held) == len(self.pages[s]), (s, held, self.pages[s])
      for model_id, page in zip(self.pages[s], held):
        assert renaming.setdefault(model_id, page) == page, "a logical page in two pages"
    assert len(set(renaming.values())) == len(renaming), "two logical pages in one page"
    # Reference counts are exactly the page-table entries pointing at a page.
    counts = np.bincount(table[table < spec.num_pages], minlength=spec.num_pages)
    np.testing.assert_array_equal(ref, counts)
    free_count = int(got["free_count"])
    free = np.asarray(got["free"])[:free_count]
    assert len(set(free.tolist())) == free_count, "a page twice on the free list"
    assert np.all(ref[free] == 0), "a free page is owned"
    assert free_count + int(np.sum(ref > 0)) == spec.num_pages, "a page leaked"
    assert free_count == self.free_count()
