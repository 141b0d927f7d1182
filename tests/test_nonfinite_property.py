"""Property: a non-finite or huge value affects exactly what the reference
says it affects.

Random programs (clear, ragged append, evict, then attend with random query
positions and windows, with and without softcap) with NaN, +-Inf and huge
values injected at random tokens, heads and channels of the keys and
values, for every store format (each hot dtype on a third of them). Each
hypothesis example is a batch of programs run by one `jit(vmap(...))`
program; every `attend` is compared with float64 softmax attention over
`materialize` at the same point: NaN and +-Inf exactly where the reference
has them, each (query, head) row within `RTOL` of its largest value
elsewhere, on every implementation.

Huge keys come at most once per program: two keys whose logits agree in
float32 but differ in float64 would make a difference that no float32
computation can reproduce (see docs/api.md, non-finite values). The same slot
sometimes holds a large key instead (logits a few hundred apart): then the
weights of other tokens underflow in float32 but not in float64, so an
infinite value among them must stay infinite (not 0 * Inf = NaN).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import kvjax
from kvjax import _formats
from tests import reference
from tests.test_reliability import assert_matches_reference

STORES = tuple(_formats.FORMATS)  # every store format
HOT = ("float32", "bfloat16", "float16")
IMPLEMENTATIONS = ("xla", None)
H, HQ, D = 2, 4, 16
STEPS, TOKENS, N_Q = 4, 6, 3
NO_WINDOW = 10**6
PROGRAMS_PER_EXAMPLE = 8
EXAMPLES = 17  # x 8 programs x 15 formats = 2,040 programs (8,160 attends)
SOFTCAP = 3.0
BAD_VALUES = (np.nan, np.inf, -np.inf)
HUGE_KEY = 1e30
LARGE_KEY = 400.0  # logits up to ~1e2 x |q|: gaps past float32's exp range (87)
HUGE_VALUES = (1e30, -1e30, 7e4)  # 7e4: finite in float32 / bfloat16, Inf in float16


def spec_for(store):
  return kvjax.CacheSpec(num_kv_heads=H, head_dim=D, capacity=20, tail=3,
                         migrate_batch=2, sinks=2,
                         hot_dtype=HOT[STORES.index(store) % 3], store=store)


@functools.lru_cache(maxsize=None)
def compiled(store):
  """jit(vmap(program)) for one store format: per step, clear (if asked),
  append, evict, then attend by every implementation and materialize."""
  spec = spec_for(store)

  def program(data):
    def step(cache, x):
      cache = jax.lax.cond(x["clear"], kvjax.clear, lambda c: c, cache)
      cache = kvjax.append(cache, x["k"], x["v"], x["n_valid"])
      cache = kvjax.evict(cache, x["evict"])
      outs = [kvjax.attend(cache, x["q"], q_pos=x["q_pos"], window=x["window"],
                           softcap=softcap, implementation=impl)
              for impl in IMPLEMENTATIONS for softcap in (None, SOFTCAP)]
      return cache, (jnp.stack(outs), kvjax.materialize(cache))
    return jax.lax.scan(step, kvjax.init(spec), data)[1]

  return jax.jit(jax.vmap(program))


injection = st.tuples(
    st.sampled_from(["k", "v"]), st.integers(0, STEPS - 1), st.integers(0, TOKENS - 1),
    st.integers(0, H - 1), st.integers(0, D - 1), st.integers(0, 5))

one_program = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**31 - 1),
    n_valid=st.lists(st.integers(0, TOKENS), min_size=STEPS, max_size=STEPS),
    evict=st.lists(st.sampled_from([0, 0, 0, 1, 3]), min_size=STEPS, max_size=STEPS),
    clear=st.lists(st.sampled_from([False, False, False, True]), min_size=STEPS,
                   max_size=STEPS),
    window=st.lists(st.sampled_from([NO_WINDOW, NO_WINDOW, 1, 2, 5]), min_size=STEPS,
                    max_size=STEPS),
    bad=st.lists(injection, max_size=4),
    huge_key=st.one_of(st.none(), injection),
))


def build(programs):
  """Arrays for a batch of drawn programs, and the host-side data each
  reference needs."""
  batch = []
  for prog in programs:
    rng = np.random.default_rng(prog["seed"])
    k = rng.normal(size=(STEPS, TOKENS, H, D)).astype(np.float32)
    v = rng.normal(size=(STEPS, TOKENS, H, D)).astype(np.float32)
    k[..., 3] += 1.5  # a larger channel, as real keys have
    for name, step, tok, head, ch, kind in prog["bad"]:
      target = k if name == "k" else v
      target[step, tok, head, ch] = (BAD_VALUES[kind % 3] if name == "k" or kind < 3
                                     else HUGE_VALUES[kind - 3])
    if prog["huge_key"] is not None:
      _, step, tok, head, ch, kind = prog["huge_key"]
      magnitude = LARGE_KEY if kind // 2 == 1 else HUGE_KEY
      k[step, tok, head, ch] = magnitude * (1 if kind % 2 else -1)
    q = rng.normal(size=(STEPS, N_Q, HQ, D)).astype(np.float32)
    # Query positions around the length after each step's append.
    length, q_pos = 0, np.zeros((STEPS, N_Q), np.int32)
    for s in range(STEPS):
      length = (0 if prog["clear"][s] else length) + prog["n_valid"][s]
      q_pos[s] = rng.integers(-1, length + 2, size=N_Q)
    batch.append(dict(k=k, v=v, q=q, q_pos=q_pos,
                      n_valid=np.int32(prog["n_valid"]), evict=np.int32(prog["evict"]),
                      clear=np.array(prog["clear"]), window=np.int32(prog["window"])))
  return {name: np.stack([b[name] for b in batch]) for name in batch[0]}


@pytest.mark.parametrize("store", STORES)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          database=None)
@given(programs=st.lists(one_program, min_size=PROGRAMS_PER_EXAMPLE,
                         max_size=PROGRAMS_PER_EXAMPLE))
def test_bad_values_affect_exactly_what_the_reference_says(store, programs):
  data = build(programs)
  outs, (k, v, pos, valid) = jax.device_get(compiled(store)(data))
  for b in range(PROGRAMS_PER_EXAMPLE):
    for s in range(STEPS):
      window = int(data["window"][b, s])
      for i, softcap in enumerate((None, SOFTCAP) * len(IMPLEMENTATIONS)):
        with np.errstate(invalid="ignore", over="ignore"):
          want = reference.attention(
              data["q"][b, s], k[b, s], v[b, s], pos[b, s], valid[b, s],
              data["q_pos"][b, s], softcap=softcap,
              window=None if window == NO_WINDOW else window)
        try:
          assert_matches_reference(outs[b, s, i], want)
        except AssertionError as e:
          impl = IMPLEMENTATIONS[i // 2]
          raise AssertionError(f"program {b} step {s} implementation={impl} "
                               f"softcap={softcap}: {e}") from e
