"""The paged pool (docs/serving.md): a stateful model-based test of random
append / fork / free / attend / materialize programs against the plain
allocation model in `pool_model.py` and against `KVCache`s fed the same
tokens; every store format's equivalence; in-place operation under
donation; argument errors."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvjax
from kvjax import paged
from kvjax._formats import FORMATS
from tests.pool_model import PoolModel

# Small, so that pages run out and page tables fill up often.
SPEC = kvjax.PagedSpec(num_kv_heads=2, head_dim=8, page_size=4, num_pages=24,
                       max_seqs=6, max_pages_per_seq=8, tail=3, sinks=1,
                       hot_dtype="bfloat16", store="q4")
BATCH, CHUNK = 3, 6  # append: 3 sequences, up to 6 tokens each (static shapes)


def tokens(seed, shape):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * rng.uniform(0.1, 3.0)).astype(np.float32)


def assert_attend_matches(pool, caches, seq, q, implementation=None):
  out = np.asarray(paged.attend(pool, np.asarray(seq, np.int32), q,
                                implementation=implementation))
  for b, s in enumerate(seq):
    want = np.asarray(kvjax.attend(caches[s], q[b], implementation=implementation))
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=f"slot {s}")


def assert_materialize_matches(pool, cache, s):
  got = paged.materialize(pool, s)
  want = kvjax.materialize(cache)
  for name, a, b in zip(("k", "v", "pos", "valid"), got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"slot {s} {name}")


class PoolMachine(RuleBasedStateMachine):
  """Every step runs on kvjax's pool, on the allocation model and on one
  `KVCache` per slot; the invariant compares the first two after every
  step, rules compare the pool's values with the caches'."""

  @initialize()
  def start(self):
    self.pool = paged.init(SPEC)
    self.model = PoolModel(SPEC)
    self.empty = kvjax.init(SPEC.cache_spec())
    self.caches = [self.empty] * SPEC.max_seqs

  appends = dict(seq=st.permutations(range(SPEC.max_seqs)),
                 n_valid=st.lists(st.integers(0, CHUNK), min_size=BATCH, max_size=BATCH),
                 seed=st.integers(0, 2**32 - 1))

  # Two rules, so appends are drawn twice as often as the others and pools fill up.
  @rule(**appends)
  def append(self, seq, n_valid, seed):
    self._append(seq, n_valid, seed)

  @rule(**appends)
  def append_more(self, seq, n_valid, seed):
    self._append(seq, n_valid, seed)

  def _append(self, seq, n_valid, seed):
    seq = seq[:BATCH]
    k = tokens(seed, (BATCH, CHUNK, SPEC.num_kv_heads, SPEC.head_dim))
    v = tokens(seed + 1, k.shape)
    others = {s: self.caches[s] for s in range(SPEC.max_seqs) if s not in seq}
    self.pool = paged.append(self.pool, np.asarray(seq, np.int32), k, v,
                             np.asarray(n_valid, np.int32))
    done = self.model.append(seq, n_valid)
    for b, s in enumerate(seq):
      if s in done:
        self.caches[s] = kvjax.append(self.caches[s], k[b], v[b], jnp.int32(n_valid[b]))
    assert all(self.caches[s] is c for s, c in others.items())

  @rule(seq=st.lists(st.integers(0, SPEC.max_seqs - 1), min_size=1, max_size=2,
                     unique=True))
  def free(self, seq):
    self.pool = paged.free(self.pool, np.asarray(seq, np.int32))
    self.model.free(seq)
    for s in seq:
      self.caches[s] = self.empty

  @rule(src=st.integers(0, SPEC.max_seqs - 1), dst=st.integers(0, SPEC.max_seqs - 1))
  def fork(self, src, dst):
    if src == dst:
      return
    self.pool = paged.fork(self.pool, src, dst)
    if self.model.fork(src, dst):
      self.caches[dst] = self.caches[src]

  @rule(seq=st.permutations(range(SPEC.max_seqs)), seed=st.integers(0, 2**32 - 1),
        implementation=st.sampled_from([None, "xla"]))
  def attend(self, seq, seed, implementation):
    q = tokens(seed, (BATCH, 1, 2 * SPEC.num_kv_heads, SPEC.head_dim))
    assert_attend_matches(self.pool, self.caches, seq[:BATCH], q, implementation)

  @rule(s=st.integers(0, SPEC.max_seqs - 1))
  def materialize(self, s):
    assert_materialize_matches(self.pool, self.caches[s], s)

  @invariant()
  def accounting(self):
    self.model.assert_matches(self.pool)


# 60 programs of up to 120 steps: thousands of operations, each followed by
# the accounting check (sized to the test budget).
TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=60, stateful_step_count=120, deadline=None,
                             derandomize=True)


# Every store format: ragged appends crossing pages, a fork of a sequence
# with a partly filled page, appends to both after it, a free, a refused
# append; then materialize (bit-identical) and attend (1e-5) on every slot.
FORMAT_SPEC = dict(num_kv_heads=2, head_dim=16, page_size=4, num_pages=14, max_seqs=4,
                   max_pages_per_seq=6, tail=2, sinks=1)
STORES = list(FORMATS) + [("q8", "q4"), ("q4", "turbo3.5")]


@pytest.mark.parametrize("store", STORES, ids=str)
def test_every_format_equals_its_kvcache(store):
  spec = kvjax.PagedSpec(**FORMAT_SPEC, hot_dtype="float16" if store == "bf16" else "bfloat16",
                         store=store)
  pool, model = paged.init(spec), PoolModel(spec)
  caches = [kvjax.init(spec.cache_spec())] * spec.max_seqs
  shape = (3, 7, spec.num_kv_heads, spec.head_dim)

  def append(seq, n_valid, seed):
    nonlocal pool
    k, v = tokens(seed, shape), tokens(seed + 1, shape)
    k[0, 0, 0, :3] = [40.0, -0.01, 7.0]  # an outlier channel, tiny values
    pool = paged.append(pool, np.asarray(seq, np.int32), k, v, np.asarray(n_valid, np.int32))
    done = model.append(seq, n_valid)
    for b, s in enumerate(seq):
      if s in done:
        caches[s] = kvjax.append(caches[s], k[b], v[b], jnp.int32(n_valid[b]))

  append([0, 1, 2], [7, 3, 0], 1)
  append([2, 0, 1], [5, 6, 1], 2)
  pool = paged.fork(pool, 0, 3)  # slot 0 holds 13 tokens: a partly filled page
  model.fork(0, 3)
  caches[3] = caches[0]
  append([3, 0, 2], [2, 7, 4], 3)
  pool = paged.free(pool, np.asarray([1], np.int32))
  model.free([1])
  caches[1] = kvjax.init(spec.cache_spec())
  append([1, 3, 0], [7, 7, 7], 4)  # slot 0 reaches 27 > 1 + 24 tokens: refused
  model.assert_matches(pool)
  assert paged.stats(pool)["refused_tokens"][0] == 7
  with pytest.raises(OverflowError, match=r"sequences \[0\]"):
    paged.check(pool)
  for s in range(spec.max_seqs):
    assert_materialize_matches(pool, caches[s], s)
  # Accounting from the arrays, against the caches' and an independent count.
  st = paged.stats(pool)
  want_bits = kvjax.stats(caches[3])["store_bits_per_value"]
  assert st["store_bits_per_value"] == want_bits
  assert st["pages_in_use_bytes"] == st["pages_used"] * st["page_bytes"]
  assert st["allocated_bytes"] == sum(x.nbytes for x in jax.tree.leaves(pool))
  rows = {(int(p), r) for s in range(spec.max_seqs)
          for j in range(max(st["length"][s] - spec.sinks, 0))
          for p, r in [(np.asarray(pool.page_table)[s, j // spec.page_size], j % spec.page_size)]}
  per_row = 2 * spec.num_kv_heads * spec.head_dim * want_bits / 8
  assert st["store_bytes"] == len(rows) * per_row
  assert st["pages_shared"] == int(np.sum(np.asarray(pool.ref_count) > 1)) >= 1
  q = tokens(5, (spec.max_seqs, 2, 2 * spec.num_kv_heads, spec.head_dim))
  # The default (on CPU the kernel through the page tables), and for a few
  # formats the jnp path (its page loop does not depend on the format).
  for implementation in (None, "xla") if store in ("q4", "turbo3.5", ("q8", "q4")) else (None,):
    assert_attend_matches(pool, caches, list(range(spec.max_seqs)), q, implementation)


def _compiled(fn, pool, *args):
  return jax.jit(fn, donate_argnums=0).lower(pool, *args).compile()


@pytest.mark.parametrize("op", ["append", "fork", "free"])
def test_operations_are_in_place_and_do_not_grow_with_the_pool(op):
  """Under donation an operation's temporary memory does not grow with the
  number of pages, and the HLO copies no page buffer."""
  temps = []
  for num_pages in (256, 4096):
    spec = kvjax.PagedSpec(num_kv_heads=8, head_dim=128, page_size=64,
                           num_pages=num_pages, max_seqs=16, max_pages_per_seq=64,
                           store="q4")
    pool = jax.eval_shape(lambda: paged.init(spec))
    seq = jax.ShapeDtypeStruct((4,), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    if op == "append":
      k = jax.ShapeDtypeStruct((4, 1, 8, 128), jnp.float32)
      compiled = _compiled(paged.append, pool, seq, k, k, seq)
    elif op == "fork":
      compiled = _compiled(paged.fork, pool, scalar, scalar)
    else:
      compiled = _compiled(paged.free, pool, seq)
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
    copies = [line for line in compiled.as_text().splitlines()
              if " copy(" in line and f"u8[{num_pages},8,64,64]" in line]
    assert not copies, copies
  assert temps[1] <= temps[0] + 64 * 1024, temps


def test_bad_arguments_name_the_argument():
  pool = paged.init(SPEC)
  k = np.zeros((2, 1, SPEC.num_kv_heads, SPEC.head_dim), np.float32)
  cases = [
      (lambda: paged.init(SPEC.cache_spec()), "pspec: expected a kvjax.PagedSpec"),
      (lambda: paged.append(kvjax.init(SPEC.cache_spec()), [0, 1], k, k), "pool: expected"),
      (lambda: paged.append(pool, [0, 0], k, k), "seq: slot ids must be distinct"),
      (lambda: paged.append(pool, [0, 6], k, k), r"seq: slot ids must be in \[0, max_seqs=6\)"),
      (lambda: paged.append(pool, [0], k, k), r"k: expected shape \[B=1"),
      (lambda: paged.append(pool, [0, 1], k, k[:, :, :1]), "k: expected shape|v: expected"),
      (lambda: paged.append(pool, [0, 1], k, k, [1.0, 2.0]), "n_valid: expected int32"),
      (lambda: paged.append(pool, np.float32([0, 1]), k, k), "seq: expected an int32 array"),
      (lambda: paged.fork(pool, 1, 1), "dst: expected a slot other than src"),
      (lambda: paged.fork(pool, [1], 2), "src: expected an int32 scalar"),
      (lambda: paged.attend(pool, [0, 1], k[:, :, :1]), "q: expected shape"),
      (lambda: paged.attend(pool, [0, 1], k, q_pos=[0, 1]), r"q_pos: expected int32 \[2, 1\]"),
      (lambda: paged.attend(pool, [0, 1], k, window=0), "window: expected an int >= 1"),
      (lambda: paged.materialize(pool, 9), r"seq: slot ids must be in"),
      (lambda: kvjax.PagedSpec(2, 8, page_size=0), "PagedSpec.page_size"),
      (lambda: kvjax.PagedSpec(2, 8, store="q5"), "PagedSpec.store"),
      (lambda: kvjax.PagedSpec(2, 8, page_size=4, tail=8, max_pages_per_seq=2),
       "PagedSpec.max_pages_per_seq: must hold tail"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()


def test_traced_bad_slot_ids_are_ignored_and_surfaced():
  """Under jit a repeated or out-of-range slot id cannot raise: that entry
  is ignored (the other sequences append), counted, and `check` raises."""
  pool = paged.init(SPEC)
  k = tokens(0, (3, 2, SPEC.num_kv_heads, SPEC.head_dim))
  pool = jax.jit(paged.append)(pool, jnp.array([0, 0, 9], jnp.int32), k, k,
                               jnp.array([2, 2, 2], jnp.int32))
  st = paged.stats(pool)
  assert st["bad_slot_ids"] == 3 and st["length"] == [0] * SPEC.max_seqs
  pool = jax.jit(paged.append)(pool, jnp.array([1, 2, 9], jnp.int32), k, k,
                               jnp.array([2, 1, 2], jnp.int32))
  assert paged.stats(pool)["length"][:3] == [0, 2, 1]
  with pytest.raises(IndexError, match="slot ids"):
    paged.check(pool)
  out = jax.jit(paged.attend)(pool, jnp.array([1, 7], jnp.int32), k[:2, :1])
  assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))


def test_a_freed_sequences_nan_never_reaches_the_next_owner_of_its_pages():
  """NaN and Inf in one sequence make only its own rows non-finite; once it
  is freed, the sequence that gets its pages (rows past its end still hold
  the NaN codes) attends as a fresh KVCache does, on both paths."""
  pool = paged.init(SPEC)
  k = tokens(1, (2, 6, SPEC.num_kv_heads, SPEC.head_dim))
  v = tokens(2, k.shape)
  # Positions 3 and 2 of slot 0: rows 2 and 1 of its first page (one sink).
  k[0, 3, 1, 3], v[0, 2, 0, 0] = np.nan, np.inf
  pool = paged.append(pool, np.array([0, 1], np.int32), k, v)
  q = tokens(3, (2, 1, 2 * SPEC.num_kv_heads, SPEC.head_dim))
  for implementation in (None, "xla"):
    out = np.asarray(paged.attend(pool, np.array([0, 1], np.int32), q,
                                  implementation=implementation))
    assert np.isnan(out[0]).any() and np.isfinite(out[1]).all()
  # Slot 2 takes both freed pages (the free list is a stack): slot 0's first
  # page becomes its second, where only row 0 is rewritten; rows 1 and 2
  # still hold the Inf and NaN codes, past slot 2's end.
  first_page = int(np.asarray(pool.page_table)[0, 0])
  pool = paged.free(pool, np.array([0], np.int32))
  fresh = kvjax.init(SPEC.cache_spec())
  x = tokens(4, (1, 6, SPEC.num_kv_heads, SPEC.head_dim))
  pool = paged.append(pool, np.array([2], np.int32), x, x)
  fresh = kvjax.append(fresh, x[0], x[0])
  assert int(np.asarray(pool.page_table)[2, 1]) == first_page
  for implementation in (None, "xla"):
    assert_attend_matches(pool, [None, None, fresh], [2], q[:1], implementation)
  assert_materialize_matches(pool, fresh, 2)


def test_prefix_index_reuses_only_what_the_pool_still_holds():
  """A lookup finds the longest held prompt that prefixes a request, token
  for token; after the holder is appended to, freed or refilled, or when the
  tokens differ inside a page, it finds nothing rather than the wrong KV."""
  pool = paged.init(SPEC)
  index = paged.PrefixIndex(SPEC)
  x = tokens(0, (2, CHUNK, SPEC.num_kv_heads, SPEC.head_dim))
  pool = paged.append(pool, np.array([0, 1], np.int32), x, x, np.array([6, 4], np.int32))
  prompt, short = [5, 6, 7, 8, 9, 10], [5, 6, 7, 8]
  index.insert(pool, prompt, slot=0)
  index.insert(pool, short, slot=1)
  with pytest.raises(ValueError, match="slot 0 holds 6 tokens"):
    index.insert(pool, prompt[:5], slot=0)
  assert index.lookup(pool, prompt + [1, 2]) == paged.PrefixMatch(0, 6)
  assert index.lookup(pool, prompt) == paged.PrefixMatch(1, 4)   # a proper prefix only
  assert index.lookup(pool, [5, 6, 7, 0, 9, 10, 11]) is None    # differs inside a page
  assert index.lookup(pool, [5, 6, 7, 8, 0]) == paged.PrefixMatch(1, 4)
  pool = paged.append(pool, np.array([0, 2], np.int32), x, x, np.array([1, 0], np.int32))
  assert index.lookup(pool, prompt + [1, 2]) == paged.PrefixMatch(1, 4)  # slot 0 grew
  pool = paged.free(pool, np.array([1], np.int32))
  pool = paged.append(pool, np.array([1, 2], np.int32), x, x, np.array([4, 0], np.int32))
  assert index.lookup(pool, [5, 6, 7, 8, 0]) is None  # freed, refilled: another sequence
  index.remove(1)
  assert len(index) == 1


def test_save_and_load_a_pool_bit_for_bit(tmp_path):
  """A saved pool loads with every leaf bit-identical (pages, page tables,
  free list, reference counts, counters), appends on as the original does,
  and a wrong spec is a clear error."""
  pool = paged.init(SPEC)
  x = tokens(7, (3, CHUNK, SPEC.num_kv_heads, SPEC.head_dim))
  pool = paged.append(pool, np.array([0, 1, 2], np.int32), x, x, np.array([6, 3, 5], np.int32))
  pool = paged.fork(pool, 0, 4)
  pool = paged.free(pool, np.array([1], np.int32))
  path = tmp_path / "pool.kvjax"
  kvjax.save(path, pool, metadata={"model": "test"})
  loaded = kvjax.load(path, spec=SPEC, metadata={"model": "test"})
  assert isinstance(loaded, paged.PagedCache) and loaded.spec == SPEC
  for a, b in zip(jax.tree.leaves(pool), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  seq = np.array([4, 0, 3], np.int32)
  after = [paged.append(p, seq, x, x, np.array([2, 6, 1], np.int32)) for p in (pool, loaded)]
  for a, b in zip(jax.tree.leaves(after[0]), jax.tree.leaves(after[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = kvjax.PagedSpec(**{**SPEC.__dict__, "store": "q8"})
  with pytest.raises(kvjax.CacheFileError, match="store='q4' \\(spec= has 'q8'\\)"):
    kvjax.load(path, spec=other)
  with pytest.raises(ValueError, match="expected a kvjax.PagedSpec"):
    kvjax.load(path, spec=SPEC.cache_spec())
