"""Decode attention time against context length, per store format: the fused
C++ kernel and the jnp path over the same cache, against dense baselines.

    python benchmarks/bench_attend.py [--quick] [--contexts 1024,32768] [--formats q4,q8]

One query token, 32 query heads over 8 KV heads of 128 (GQA 4), bfloat16 hot
tier, 256-token tail. Baselines over the same number of tokens: dense
float32 and bfloat16 attention in plain jnp over head-major [8, T, 128] K and
V (XLA:CPU's fastest layout), and `jax.nn.dot_product_attention` (token-
major, float32). Every candidate of one context is timed in alternation in
one run (medians); ratios are baseline time / candidate time (> 1: faster).

Also measured in the same run:
- effective bandwidth: bytes of the cache a call reads (the retained tokens
  in their tiers: codes, scales, norms) per second, against a numpy read of a
  512 MiB array with one thread per core (each sums its part);
- a vmapped batch of 8 sequences at 8k tokens (one kernel call);
- a prefill chunk (128 queries at 8k tokens, causal): the kernel (which
  `attend` picks up to 1024 queries) against the jnp path.
Writes benchmarks/results/attend.json (attend_quick.json with --quick).
"""

import argparse
import concurrent.futures
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import _formats
from _timing import interleaved, write

H, HQ, D = 8, 32, 128
ALL_CONTEXTS = (1024, 4096, 8192, 16384, 32768, 131072)


def dense_attend(k, v, q):
  """q [HQ, D]; k, v [H, T, D] (float32 or bfloat16) -> [HQ, D] float32."""
  qg = (q.reshape(H, HQ // H, D) / math.sqrt(D)).astype(k.dtype)
  s = jnp.einsum("hgd,htd->hgt", qg, k, preferred_element_type=jnp.float32)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("hgt,htd->hgd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).reshape(HQ, D)


def sdpa(k, v, q):
  """jax.nn.dot_product_attention over token-major [1, T, H, D]."""
  return jax.nn.dot_product_attention(q[None, None], k, v)[0, 0]


def filled_cache(store, context, batch=None):
  spec = kvjax.CacheSpec(num_kv_heads=H, head_dim=D, capacity=context, tail=256,
                         migrate_batch=64, store=store, hot_dtype="bfloat16")
  rng = np.random.default_rng(0)
  if batch is None:
    cache, append = kvjax.init(spec), jax.jit(kvjax.append, donate_argnums=0)
    for start in range(0, context, 4096):
      n = min(4096, context - start)
      x = rng.normal(size=(n, H, D)).astype(np.float32)
      cache = append(cache, x, x)
    return cache
  cache = kvjax.init(spec, batch=batch)
  append = jax.jit(jax.vmap(kvjax.append), donate_argnums=0)
  for start in range(0, context, 1024):
    x = rng.normal(size=(batch, 1024, H, D)).astype(np.float32)
    cache = append(cache, x, x)
  return cache


def read_bytes(cache) -> int:
  """Bytes of the retained tokens in their tiers (what one call reads)."""
  s = kvjax.stats(cache)
  total = lambda key: int(np.sum(s[key]))
  return total("sink_bytes") + total("tail_bytes") + total("store_bytes")


def numpy_read_gbps(threads: int, mib: int = 512) -> float:
  """GB/s of a numpy sum over a large array, one thread per core."""
  a = np.ones(mib * 2**20 // 4, np.float32)
  parts = np.array_split(a, threads)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    best = float("inf")
    for _ in range(5):
      start = time.perf_counter()
      list(pool.map(np.sum, parts))
      best = min(best, time.perf_counter() - start)
  return a.nbytes / best / 1e9


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  p.add_argument("--contexts", default="", help="comma-separated token counts")
  p.add_argument("--formats", default="", help="comma-separated store formats")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  contexts = ([int(c) for c in args.contexts.split(",")] if args.contexts
              else [1024] if args.quick else list(ALL_CONTEXTS))
  formats = (args.formats.split(",") if args.formats
             else ["q4", "turbo3.5"] if args.quick else list(_formats.FORMATS))
  rounds, steps = (2, 3) if args.quick else (args.rounds, 10)
  threads = os.cpu_count() or 1
  numpy_gbps = numpy_read_gbps(threads, 64 if args.quick else 512)
  print(f"numpy read, {threads} threads: {numpy_gbps:.1f} GB/s; kernel: "
        f"{kvjax.backend_info()['isa']}")
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, HQ, D)), jnp.float32)
  kernel = jax.jit(lambda c, q: kvjax.attend(c, q))
  jnp_path = jax.jit(lambda c, q: kvjax.attend(c, q, implementation="xla"))
  dense, sdpa_fn = jax.jit(dense_attend), jax.jit(sdpa)
  results = {}
  for context in contexts:
    kv = rng.normal(size=(H, context, D)).astype(np.float32)
    k32, k16 = jnp.asarray(kv), jnp.asarray(kv, jnp.bfloat16)
    token_major = jnp.asarray(np.swapaxes(kv, 0, 1)[None])
    candidates = {
        "dense_f32": (lambda _, k, q: dense(k, k, q[0]), None, (k32, q)),
        "dense_bf16": (lambda _, k, q: dense(k, k, q[0]), None, (k16, q)),
        "dot_product_attention": (lambda _, k, q: sdpa_fn(k, k, q[0]), None, (token_major, q)),
    }
    caches, nbytes = {}, {}
    for store in formats:
      caches[store] = filled_cache(store, context)
      nbytes[store] = read_bytes(caches[store])
      candidates[store] = (lambda _, c, q: kernel(c, q), None, (caches[store], q))
      if context <= 32768 or store in ("q4", "f32"):  # the jnp path is slow
        candidates[store + "/jnp"] = (lambda _, c, q: jnp_path(c, q), None, (caches[store], q))
    t = interleaved(candidates, rounds=rounds, steps=steps)
    base = t["dense_f32"]
    row = {"seconds": t,
           "speedup_over_dense_f32": {k: base / v for k, v in t.items()},
           "kernel_gbps": {s: nbytes[s] / t[s] / 1e9 for s in formats},
           "kernel_bandwidth_over_numpy": {s: nbytes[s] / t[s] / 1e9 / numpy_gbps for s in formats},
           "cache_bytes": nbytes}
    results[context] = row
    print(f"context {context:6d}: dense f32 {base * 1e3:7.2f} ms | " + ", ".join(
        f"{s} {base / t[s]:.2f}x ({row['kernel_gbps'][s]:.1f} GB/s)" for s in formats)
        + " | jnp path: " + ", ".join(f"{s} {base / t[s + '/jnp']:.2f}x" for s in formats
                                      if s + "/jnp" in t)
        + f" | bf16 {base / t['dense_bf16']:.2f}x, sdpa {base / t['dot_product_attention']:.2f}x")
    del caches, candidates

  # A vmapped batch of 8 sequences, and a prefill chunk, at 8k (2k quick).
  context = 1024 if args.quick else 8192
  batch = 8
  kvb = jnp.asarray(rng.normal(size=(batch, H, context, D)), jnp.float32)
  qb = jnp.asarray(rng.normal(size=(batch, 1, HQ, D)), jnp.float32)
  dense_b = jax.jit(jax.vmap(dense_attend))
  batched = {"dense_f32": (lambda _, k, q: dense_b(k, k, q[:, 0]), None, (kvb, qb))}
  kernel_b = jax.jit(jax.vmap(lambda c, q: kvjax.attend(c, q)))
  for store in formats[:4] if args.quick else ("f32", "bf16", "q8", "q4", "turbo4", "turbo3.5"):
    c = filled_cache(store, context, batch)
    batched[store] = (lambda _, c, q: kernel_b(c, q), None, (c, qb))
  tb = interleaved(batched, rounds=rounds, steps=steps)
  batch_row = {"context": context, "batch": batch, "seconds": tb,
               "speedup_over_dense_f32": {k: tb["dense_f32"] / v for k, v in tb.items()}}
  print(f"batch {batch} x {context}: " + ", ".join(
      f"{k} {v:.2f}x" for k, v in batch_row["speedup_over_dense_f32"].items()))

  chunk = 128
  prefill = {}
  qc = jnp.asarray(rng.normal(size=(chunk, HQ, D)), jnp.float32)
  pos = jnp.arange(context - chunk, context, dtype=jnp.int32)
  kernel_chunk = jax.jit(lambda c, q: kvjax.attend(c, q, q_pos=pos))
  jnp_chunk = jax.jit(lambda c, q: kvjax.attend(c, q, q_pos=pos, implementation="xla"))
  for store in ("q4",) if args.quick else ("f32", "q4", "turbo3.5"):
    c = filled_cache(store, context)
    prefill[store + "/kernel"] = (lambda _, c, q: kernel_chunk(c, q), None, (c, qc))
    prefill[store + "/jnp"] = (lambda _, c, q: jnp_chunk(c, q), None, (c, qc))
  tp = interleaved(prefill, rounds=rounds, steps=max(2, steps // 3))
  print(f"prefill chunk of {chunk} at {context}: " + ", ".join(
      f"{k} {chunk / v:.0f} tok/s" for k, v in tp.items()))

  write("attend_quick" if args.quick else "attend", dict(
      contexts=results, batch=batch_row, prefill_seconds=tp, numpy_read_gbps=numpy_gbps,
      threads=threads, isa=kvjax.backend_info()["isa"],
      ratios={f"{s}_over_dense_f32_at_{c}": r["speedup_over_dense_f32"][s]
              for c, r in results.items() for s in formats},
      bars=bars(results)))


def bars(results) -> dict:
  """The decode-attention issue's bars at 32k tokens, where measured."""
  row = results.get(32768)
  if row is None:
    return {}
  speed, bandwidth = row["speedup_over_dense_f32"], row["kernel_bandwidth_over_numpy"]
  want = {"q4": 5.0, "q8": 3.0, "turbo3.5": 4.0, "turbo4": 4.0, "f32": 1.0, "bf16": 1.0}
  out = {f"{s} >= {x}x dense f32": speed[s] >= x for s, x in want.items() if s in speed}
  out.update({f"{s} bandwidth >= 0.5 numpy": bandwidth[s] >= 0.5
              for s in ("q4", "q8") if s in bandwidth})
  return out


if __name__ == "__main__":
  main()
