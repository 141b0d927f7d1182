"""Decode attention time against context length, per store format, and the
compiled temporary memory of `attend`.

    python benchmarks/bench_attend.py [--quick]

One query token, 32 query heads over 8 KV heads of 128 (GQA), bfloat16 hot
tier, at contexts 1k to 32k. The baseline is dense float32 attention in plain
jnp over a head-major [8, T, 128] K and V, the fastest layout on XLA:CPU.
Times are medians measured in alternation; the table prints each format's
time relative to the baseline. Memory: `jit(attend).lower(...).compile()
.memory_analysis().temp_size_in_bytes`, against the float32 size of K and V.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from _timing import interleaved, write

H, HQ, D = 8, 32, 128


def dense_attend(k, v, q):
  """Baseline: q [HQ, D], k and v [H, T, D] float32 -> [HQ, D]."""
  qg = q.reshape(H, HQ // H, D) / math.sqrt(D)
  s = jnp.einsum("hgd,htd->hgt", qg, k)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("hgt,htd->hgd", p, v).reshape(HQ, D)


def filled_cache(store, context, block_size):
  spec = kvjax.CacheSpec(num_kv_heads=H, head_dim=D, capacity=context,
                         tail=256, migrate_batch=64, store=store,
                         hot_dtype="bfloat16")
  cache = kvjax.init(spec)
  rng = np.random.default_rng(0)
  append = jax.jit(kvjax.append, donate_argnums=0)
  for start in range(0, context, 4096):
    n = min(4096, context - start)
    x = rng.normal(size=(n, H, D)).astype(np.float32)
    cache = append(cache, x, x)
  return cache


def temp_bytes(fn, *args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  p.add_argument("--block-size", type=int, default=1024)
  args = p.parse_args()
  contexts = [1024, 4096] if args.quick else [1024, 4096, 8192, 16384, 32768]
  formats = ["q4"] if args.quick else ["f32", "bf16", "q8", "q4", "turbo3.5"]
  rounds, steps = (2, 3) if args.quick else (5, 10)
  q = jnp.asarray(np.random.default_rng(1).normal(size=(1, HQ, D)), jnp.float32)
  attend = jax.jit(lambda c, q: kvjax.attend(c, q, block_size=args.block_size))
  dense = jax.jit(dense_attend)
  times, memory = {}, {}
  for context in contexts:
    kv = np.random.default_rng(0).normal(size=(H, context, D)).astype(np.float32)
    k, v = jnp.asarray(kv), jnp.asarray(kv)
    # State is unused: each step returns its inputs' output; keep it simple.
    candidates = {"dense_f32": (lambda s, k, v, q: dense(k, v, q[0]), None, (k, v, q))}
    caches = {s: filled_cache(s, context, args.block_size) for s in formats}
    for s in formats:
      candidates[s] = (lambda st, c, q: attend(c, q), None, (caches[s], q))
    t = interleaved(candidates, rounds=rounds, steps=steps)
    times[context] = t
    f32_kv_bytes = 2 * H * context * D * 4
    memory[context] = {s: temp_bytes(attend, caches[s], q) / f32_kv_bytes for s in formats}
    memory[context]["dense_f32"] = temp_bytes(dense, k, v, q[0]) / f32_kv_bytes
    gbps = f32_kv_bytes / t["dense_f32"] / 1e9
    print(f"context {context:6d}: dense f32 {t['dense_f32'] * 1e3:7.2f} ms ({gbps:.1f} GB/s); "
          + ", ".join(f"{s} {t[s] / t['dense_f32']:.2f}x" for s in formats)
          + " | temp/f32 KV: "
          + ", ".join(f"{s} {memory[context][s]:.3f}" for s in formats))
  ratios = {f"{s}_time_over_dense_f32_at_{c}": times[c][s] / times[c]["dense_f32"]
            for c in contexts for s in formats}
  write("attend_quick" if args.quick else "attend", dict(seconds=times, temp_over_f32_kv=memory, ratios=ratios,
                       block_size=args.block_size,
                       bars={"q4 temp_over_f32_kv at 32768 <=": 0.10}))


if __name__ == "__main__":
  main()
