"""The decode-attention kernel against float64 attention over `materialize`.

Shared by tests/test_attention_kernel.py (in process, the best variant) and
run in a subprocess per variant (the variant is chosen once per process):

  KVJAX_ISA=avx2 python -m tests.attention_check

Prints one JSON line with each case's relative error (max-norm error over the
reference's max norm) and exits non-zero if any exceeds TOLERANCE or puts a
NaN or Inf where the reference has none.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import numpy as np

import kvjax
from kvjax import _formats
from tests import reference

TOLERANCE = 5e-5
HOT = ("float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=None)
def filled(store, *, head_dim, hot_dtype, capacity=160, tail=8, migrate_batch=8,
           sinks=2, heads=2, n=300, evict=0, seed=0) -> kvjax.KVCache:
  """A cache whose store ring has wrapped (n > capacity), keys with an offset
  and a large channel as real keys have."""
  spec = kvjax.CacheSpec(num_kv_heads=heads, head_dim=head_dim, capacity=capacity,
                         tail=tail, migrate_batch=migrate_batch, sinks=sinks,
                         hot_dtype=hot_dtype, store=store)
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(n, heads, head_dim)).astype(np.float32) + 0.5
  k[..., 3] *= 6
  v = rng.normal(size=(n, heads, head_dim)).astype(np.float32)
  # One program (one compile) per spec.
  return jax.jit(lambda k, v: kvjax.evict(kvjax.append(kvjax.init(spec), k, v), evict))(k, v)


def reference_attend(cache, q, q_pos, *, materialized=None, **kw):
  """float64 attention over `materialize(cache)` (or its given result)."""
  k, v, pos, valid = (np.asarray(a) for a in materialized or kvjax.materialize(cache))
  return reference.attention(q, k, v, pos, valid, np.asarray(q_pos), **kw)


def relative_error(got, want) -> float:
  got = np.asarray(got, np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# (n_q, GQA group, window, softcap, scale): decode, speculative decoding,
# small chunks; every option traced, so each query shape compiles once.
OPTIONS = [
    (1, 4, None, None, None),
    (1, 4, 7, 4.0, 0.3),
    (16, 1, None, None, None),
    (16, 1, 40, 2.5, None),
    (3, 3, 20, None, 0.2),
]

# Every store format at D = 64 (the variants' vector paths: q4's and the
# split formats' halves read repeated words) and the main ones at 128 (whole
# 16-word blocks) and 16 (the split formats fall back to the scalar run).
CASES = ([(store, 64) for store in _formats.FORMATS] +
         [(store, 128) for store in ("f32", "bf16", "q8", "q4", "turbo4", "turbo3.5",
                                     "turbo3", "turbo2p")] +
         [(store, 16) for store in ("f16", "q4", "turbo2.5", "turbo1p")] +
         # Keys and values in different formats: each pass with its own
         # decoder, lanes (prod formats: 2D) and channel order (split formats).
         [(("q8", "q4"), 128), (("q4", "q8"), 64), (("bf16", "turbo3.5"), 64),
          (("turbo3.5", "f16"), 64), (("q8", "turbo2p"), 64), (("turbo1p", "q4"), 16)])


def case_groups(pairs=CASES):
  """For each (store, head_dim), hot dtypes in turn: a list of (name, cache,
  q, q_pos, kwargs), one per option, all on the same cache."""
  for i, (store, d) in enumerate(pairs):
    hot = HOT[i % 3]
    cache = filled(store, head_dim=d, hot_dtype=hot, evict=5 * (i % 4), seed=i)
    length = int(cache.length)
    rng = np.random.default_rng(100 + i)
    group = []
    for n_q, heads_per_kv, window, softcap, scale in OPTIONS:
      q = rng.normal(size=(n_q, 2 * heads_per_kv, d)).astype(np.float32)
      q_pos = np.sort(rng.integers(length - 60, length, n_q)).astype(np.int32)
      kw = {k: v for k, v in dict(window=window, softcap=softcap, scale=scale).items()
            if v is not None}
      name = store if isinstance(store, str) else "/".join(store)
      group.append((f"{name}/D{d}/{hot}/nq{n_q}/g{heads_per_kv}/{sorted(kw)}",
                    cache, q, q_pos, kw))
    yield group


def cases(pairs=CASES):
  """(name, cache, q, q_pos, kwargs): `case_groups`, one option at a time."""
  for group in case_groups(pairs):
    yield from group


_ATTEND = jax.jit(lambda c, q, p, w, s, sc, impl: kvjax.attend(
    c, q, q_pos=p, window=w, softcap=s, scale=sc, implementation=impl),
    static_argnames="impl")


def attend(cache, q, q_pos, kw, impl):
  """One compile per cache and query shape: the options are traced."""
  return _ATTEND(cache, q, q_pos, kw.get("window"), kw.get("softcap"),
                 kw.get("scale"), impl=impl)


@functools.partial(jax.jit, static_argnames="impl")
def _materialize_and_attend(cache, queries, impl):
  return kvjax.materialize(cache), [
      kvjax.attend(cache, q, q_pos=p, window=w, softcap=s, scale=sc, implementation=impl)
      for q, p, w, s, sc in queries]


def materialize_and_attend(group, impl):
  """`materialize` of a case group's cache and every option's attend, in one
  program: one compile per cache instead of six (which options are None is
  static, their values traced)."""
  return _materialize_and_attend(
      group[0][1], [(q, p, kw.get("window"), kw.get("softcap"), kw.get("scale"))
                    for _, _, q, p, kw in group], impl=impl)


def errors(impl="ffi", pairs=CASES) -> dict:
  out = {}
  for group in case_groups(pairs):
    materialized, got = materialize_and_attend(group, impl)
    for (name, cache, q, q_pos, options), result in zip(group, got):
      want = reference_attend(cache, q, q_pos, materialized=materialized, **options)
      out[name] = relative_error(result, want)
  return out


def main() -> int:
  result = errors()
  worst = max(result.values())
  print(json.dumps({"isa": kvjax.backend_info()["isa"], "cases": len(result),
                    "worst": worst,
                    "failed": {k: v for k, v in result.items() if not v <= TOLERANCE}}))
  return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
  sys.exit(main())
