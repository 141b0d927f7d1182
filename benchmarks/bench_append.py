"""Append step time against capacity, and against a bare in-place row write.

    python benchmarks/bench_append.py [--quick]

One token (8 heads x 128, bfloat16 hot tier) appended under jit with the
cache donated, at capacities 1k to 64k, per store format; the baseline is a
donated one-row `dynamic_update_slice` into a float32 [8, capacity, 128]
buffer of the same width. Then the same batched: `vmap` over 8 caches
against a row write into each of 8 buffers. Ratios are of medians measured
in alternation.
"""

import argparse

import jax
import jax.numpy as jnp

import kvjax
from _timing import interleaved, write


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  args = p.parse_args()
  capacities = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
  formats = (["q4", "turbo3.5"] if args.quick else
             ["f32", "bf16", "q8", "q4", "turbo4", "turbo3.5", "turbo2.5", "turbo3p"])
  rounds, steps = (2, 20) if args.quick else (7, 300)
  h, d = 8, 128
  k = jnp.ones((1, h, d), jnp.float32)
  append = jax.jit(kvjax.append, donate_argnums=0)
  write_row = jax.jit(
      lambda buf, row, i: jax.lax.dynamic_update_slice(buf, row, (0, i, 0)),
      donate_argnums=0)
  results = {}
  for capacity in capacities:
    candidates = {"bare_row_write": (write_row, jnp.zeros((h, capacity, d)),
                                     (jnp.ones((h, 1, d)), jnp.int32(capacity // 2)))}
    for store in formats:
      spec = kvjax.CacheSpec(num_kv_heads=h, head_dim=d, capacity=capacity,
                             tail=256, migrate_batch=64, store=store,
                             hot_dtype="bfloat16")
      candidates[store] = (append, kvjax.init(spec), (k, k))
    times = interleaved(candidates, rounds=rounds, steps=steps)
    results[capacity] = times
    print(f"capacity {capacity:6d}: bare row write {times['bare_row_write'] * 1e6:7.1f} us; "
          + ", ".join(f"{s} {times[s] / times['bare_row_write']:.1f}x" for s in formats))
  # Batched: vmap over 8 caches, against a row write into each of 8 buffers.
  batch, capacity = 8, capacities[-1] // 4
  kb = jnp.ones((batch, 1, h, d), jnp.float32)
  append_b = jax.jit(jax.vmap(kvjax.append), donate_argnums=0)
  write_rows = jax.jit(jax.vmap(
      lambda buf, row, i: jax.lax.dynamic_update_slice(buf, row, (0, i, 0)),
      in_axes=(0, None, None)), donate_argnums=0)
  candidates = {"bare_row_write": (write_rows, jnp.zeros((batch, h, capacity, d)),
                                   (jnp.ones((h, 1, d)), jnp.int32(capacity // 2)))}
  for store in formats:
    spec = kvjax.CacheSpec(num_kv_heads=h, head_dim=d, capacity=capacity, tail=256,
                           migrate_batch=64, store=store, hot_dtype="bfloat16")
    candidates[store] = (append_b, kvjax.init(spec, batch=batch), (kb, kb))
  batched = interleaved(candidates, rounds=rounds, steps=steps)
  print(f"vmap over {batch} caches of {capacity}: bare row writes "
        f"{batched['bare_row_write'] * 1e6:7.1f} us; "
        + ", ".join(f"{s} {batched[s] / batched['bare_row_write']:.1f}x" for s in formats))
  lo, hi = capacities[0], capacities[-1]
  ratios = {
      f"{s}_step_{hi}_over_{lo}": results[hi][s] / results[lo][s] for s in formats}
  ratios.update({f"{s}_step_over_bare_write_at_{hi}": results[hi][s] / results[hi]["bare_row_write"]
                 for s in formats})
  ratios.update({f"{s}_vmap{batch}_step_over_bare_writes": batched[s] / batched["bare_row_write"]
                 for s in formats})
  results[f"vmap{batch}_capacity{capacity}"] = batched
  for name, value in ratios.items():
    print(f"{name}: {value:.2f}")
  write("append_quick" if args.quick else "append", dict(seconds_per_step=results, ratios=ratios,
                       bars={"q4_step_65536_over_1024 <=": 1.3,
                             "q4_step_over_bare_write_at_65536 <=": 15,
                             "turbo3.5_step_over_bare_write_at_65536 <=": 15,
                             "turbo3.5_vmap8_step_over_bare_writes <=": 15}))


if __name__ == "__main__":
  main()
