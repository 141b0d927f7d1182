"""The paged pool against a vmapped batch of padded caches, in one run.

    python benchmarks/bench_paged.py [--quick]

Ragged run: 16 sequences with lengths spread evenly from 100 to 8,000
tokens (q4 store, bfloat16 hot, 8 KV heads of 128, 32 query heads, pages of
64 tokens, 64-token tail) held in a `kvjax.paged` pool and in a
`vmap`ped batch of `KVCache`s padded to 8,192 tokens. Reported:
- memory in use by the pool (pages in use, partly filled ones whole, plus
  the hot buffers of the slots in use) over the bytes the same retained
  tokens occupy in unpadded caches (sink, tail and store bytes of each
  sequence's cache, measured by `kvjax.stats`), and the padded batch's
  allocated bytes over the pool's;
- decode attention (one query token per sequence) and a decode step
  (append one token to every sequence, then attend), pool over padded
  batch, timed in alternation (medians), through the default
  implementation (the C++ kernel on CPU) and the jnp path.
Prefix run: one 2,000-token system prompt prefilled once, forked to 16
sequences that each append a 200-token continuation: pages in use over
those of the prompt plus the continuations alone, and over the same
sequences without sharing (each prefilled in full).
Writes benchmarks/results/paged.json (paged_quick.json with --quick).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import paged
from _timing import interleaved, write

H, HQ, D, PAGE, TAIL = 8, 32, 128, 64, 64


def pool_spec(num_pages, max_seqs, max_pages, store):
  return kvjax.PagedSpec(num_kv_heads=H, head_dim=D, page_size=PAGE, num_pages=num_pages,
                         max_seqs=max_seqs, max_pages_per_seq=max_pages, tail=TAIL,
                         hot_dtype="bfloat16", store=store)


def fill(lengths, pspec, chunk, rng):
  """The pool and the padded batch, fed the same tokens in ragged chunks."""
  b = len(lengths)
  seq = jnp.arange(b, dtype=jnp.int32)
  pool = paged.init(pspec)
  caches = kvjax.init(pspec.cache_spec(), batch=b)
  pool_append = jax.jit(paged.append, donate_argnums=0)
  batch_append = jax.jit(jax.vmap(kvjax.append), donate_argnums=0)
  lengths = np.asarray(lengths)
  for start in range(0, int(lengths.max()), chunk):
    n_valid = np.clip(lengths - start, 0, chunk).astype(np.int32)
    x = jnp.asarray(rng.normal(size=(b, chunk, H, D)), jnp.float32)
    pool = pool_append(pool, seq, x, x, n_valid)
    caches = batch_append(caches, x, x, jnp.asarray(n_valid))
  paged.check(pool)
  kvjax.check(caches)
  return pool, caches


def retained_bytes(caches) -> int:
  """Bytes the retained tokens occupy in their tiers (unpadded)."""
  s = kvjax.stats(caches)
  return int(sum(np.sum(s[k]) for k in ("sink_bytes", "tail_bytes", "store_bytes")))


def ragged(args, rng):
  lengths = (np.linspace(100, 8000, 16).round().astype(int) if not args.quick
             else np.array([40, 100, 250, 400]))
  capacity = 8192 if not args.quick else 512
  max_pages = capacity // PAGE
  pages = int(sum(-(-n // PAGE) for n in lengths)) + len(lengths) * 2
  pspec = pool_spec(pages, len(lengths), max_pages, args.store)
  pool, caches = fill(lengths, pspec, 512 if not args.quick else 256, rng)
  st = paged.stats(pool)
  in_use = st["pages_in_use_bytes"] + st["hot_buffer_bytes"]
  unpadded = retained_bytes(caches)
  padded = kvjax.stats(caches)["allocated_bytes"]
  padded = int(np.sum(padded))
  b = len(lengths)
  seq = jnp.arange(b, dtype=jnp.int32)
  q = jnp.asarray(rng.normal(size=(b, 1, HQ, D)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(b, 1, H, D)), jnp.float32)

  def pool_attend(impl):
    f = jax.jit(lambda p, q: paged.attend(p, seq, q, implementation=impl))
    return lambda _, p, q: f(p, q)

  def batch_attend(impl):
    f = jax.jit(jax.vmap(lambda c, q: kvjax.attend(c, q, implementation=impl)))
    return lambda _, c, q: f(c, q)

  def pool_step(p, x, q):
    p = paged.append(p, seq, x, x)
    return p, paged.attend(p, seq, q)

  def batch_step(c, x, q):
    c = jax.vmap(kvjax.append)(c, x, x)
    return c, jax.vmap(kvjax.attend)(c, q)

  pool_step_d = jax.jit(pool_step, donate_argnums=0)
  batch_step_d = jax.jit(batch_step, donate_argnums=0)
  rounds, steps = (1, 2) if args.quick else (args.rounds, 10)
  t = interleaved({
      "pool_attend": (pool_attend(None), None, (pool, q)),
      "padded_attend": (batch_attend(None), None, (caches, q)),
      "pool_attend_jnp": (pool_attend("xla"), None, (pool, q)),
      "padded_attend_jnp": (batch_attend("xla"), None, (caches, q)),
  }, rounds=rounds, steps=steps)
  # Decode steps grow the sequences: a few, each state threaded through.
  t_step = interleaved({
      "pool_step": (lambda s, x, q: pool_step_d(s[0], x, q), (pool, None), (x, q)),
      "padded_step": (lambda s, x, q: batch_step_d(s[0], x, q), (caches, None), (x, q)),
  }, rounds=rounds, steps=min(steps, 20))
  return dict(
      lengths=lengths.tolist(), store=args.store, pool_stats=st,
      memory_in_use_bytes=in_use, unpadded_retained_bytes=unpadded,
      padded_allocated_bytes=padded,
      memory_in_use_over_unpadded=in_use / unpadded,
      padded_allocated_over_pool_in_use=padded / in_use,
      seconds={**t, **t_step},
      attend_speedup_pool_over_padded=t["padded_attend"] / t["pool_attend"],
      attend_speedup_pool_over_padded_jnp=t["padded_attend_jnp"] / t["pool_attend_jnp"],
      step_speedup_pool_over_padded=t_step["padded_step"] / t_step["pool_step"])


def prefix(args, rng):
  prompt, cont, n = (2000, 200, 16) if not args.quick else (150, 40, 3)
  max_pages = -(-(prompt + cont) // PAGE) + 1
  pspec = pool_spec((n + 1) * max_pages, n + 1, max_pages, args.store)
  append = jax.jit(paged.append, donate_argnums=0)
  x = jnp.asarray(rng.normal(size=(1, prompt, H, D)), jnp.float32)
  shared = append(paged.init(pspec), jnp.array([0], jnp.int32), x, x)
  index = paged.PrefixIndex(pspec)
  tokens = list(range(prompt))
  index.insert(shared, tokens, slot=0)
  y = jnp.asarray(rng.normal(size=(n, cont, H, D)), jnp.float32)
  for i in range(n):
    match = index.lookup(shared, tokens + [10**6 + i])
    assert match == (0, prompt), match
    shared = paged.fork(shared, match.slot, i + 1)
  shared = append(shared, jnp.arange(1, n + 1, dtype=jnp.int32), y, y)
  unshared = paged.init(pspec)
  for i in range(n):
    unshared = append(unshared, jnp.array([i + 1], jnp.int32), x, x)
  unshared = append(unshared, jnp.arange(1, n + 1, dtype=jnp.int32), y, y)
  paged.check(shared)
  paged.check(unshared)
  alone = -(-prompt // PAGE) + n * -(-cont // PAGE)
  used = paged.stats(shared)["pages_used"]
  return dict(prompt=prompt, continuation=cont, sequences=n, pages_shared_run=used,
              pages_prompt_plus_continuations_alone=alone,
              pages_unshared_run=paged.stats(unshared)["pages_used"],
              pages_over_alone=used / alone,
              unshared_over_shared=paged.stats(unshared)["pages_used"] / used)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  p.add_argument("--store", default="q4")
  p.add_argument("--rounds", type=int, default=7)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  print(f"kernel: {kvjax.backend_info()['isa']}")
  r = ragged(args, rng)
  print(f"ragged {len(r['lengths'])} sequences ({args.store}): memory in use / unpadded "
        f"{r['memory_in_use_over_unpadded']:.3f}, padded allocated / in use "
        f"{r['padded_allocated_over_pool_in_use']:.2f}; attend pool vs padded "
        f"{r['attend_speedup_pool_over_padded']:.2f}x (jnp path "
        f"{r['attend_speedup_pool_over_padded_jnp']:.2f}x), decode step "
        f"{r['step_speedup_pool_over_padded']:.2f}x")
  f = prefix(args, rng)
  print(f"prefix: pages in use {f['pages_shared_run']} / prompt + continuations alone "
        f"{f['pages_prompt_plus_continuations_alone']} = {f['pages_over_alone']:.3f}; "
        f"unshared {f['pages_unshared_run']} ({f['unshared_over_shared']:.2f}x)")
  ratios = {k: r[k] for k in ("memory_in_use_over_unpadded", "padded_allocated_over_pool_in_use",
                               "attend_speedup_pool_over_padded",
                               "attend_speedup_pool_over_padded_jnp",
                               "step_speedup_pool_over_padded")}
  ratios.update(prefix_pages_over_alone=f["pages_over_alone"],
                prefix_unshared_over_shared=f["unshared_over_shared"])
  write("paged_quick" if args.quick else "paged", dict(ratios=ratios, ragged=r, prefix=f))


if __name__ == "__main__":
  main()
