"""Sharded caches against one device, on 8 simulated CPU devices.

Run in a subprocess (the device count is fixed when jax starts):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_check

Prints one JSON line: per case, whether every leaf and result is
bit-identical to the unsharded run, the attention outputs' largest
difference, bytes per device against the total, and the collectives and
copies of cache-sized arrays in the compiled decode step (append one token,
attend). `tests/test_sharding.py` asserts on it; so does the two-process
run (`--process-id`), where each process checks the shards it holds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kvjax
from kvjax import _formats
from kvjax.models import llama

B, H, D, HQ = 8, 8, 32, 16
CAPACITY = 96  # store_slots = 94: no other axis of these programs has that size
# (batch_axis, head_axis) on the ("data", "model") = 2 x 4 mesh: 8 shards each.
LAYOUTS = {"batch": (("data", "model"), None), "head": (None, ("data", "model")),
           "2d": ("data", "model")}
# Each kind of store the kernels read (raw f32 and bf16, affine q8 and q4,
# TurboQuant whole, split and prod), in pairs of key and value formats, over
# the three layouts (the test budget: a case is three compiles on 8 devices,
# ~7 s on two cores); attend's jnp path too for JNP_PATH (both of its
# decoders). `--every`: every format alone and two pairs in every layout (~3 min).
CASES = [(("f32", "q8"), "2d"), (("bf16", "turbo2p"), "batch"), ("turbo3.5", "head"),
         (("q4", "turbo4"), "2d")]
JNP_PATH = ("turbo3.5", ("q4", "turbo4"))
MIXED = [("q8", "q4"), ("bf16", "turbo3.5")]
COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute",
               "reduce-scatter")
COPIES = ("copy", "dynamic-slice")


def make_mesh():
  return jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def spec_for(store) -> kvjax.CacheSpec:
  return kvjax.CacheSpec(num_kv_heads=H, head_dim=D, capacity=CAPACITY, tail=8,
                         migrate_batch=8, sinks=2, store=store)


def tokens(seed, n):
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(B, n, H, D)).astype(np.float32) + 0.3
  v = rng.normal(size=(B, n, H, D)).astype(np.float32)
  q = rng.normal(size=(B, 2, HQ, D)).astype(np.float32)
  return k, v, q


def transforms(cache, k, v, q, implementations=("ffi",)):
  """Every cache transform: a prefill that wraps the store ring, migrate,
  evict, more tokens, attend (the kernel; with "xla", the jnp path too),
  materialize, clear."""
  vm = jax.vmap
  cache = vm(kvjax.append)(cache, k[:, :100], v[:, :100])
  cache = vm(kvjax.migrate)(cache)
  cache = vm(lambda c: kvjax.evict(c, 3))(cache)
  cache = vm(kvjax.append)(cache, k[:, 100:], v[:, 100:])
  pos = jnp.asarray([104, 106], jnp.int32)
  outs = [vm(lambda c, q, i=impl: kvjax.attend(c, q, q_pos=pos, implementation=i))(cache, q)
          for impl in implementations]
  return cache, outs, vm(kvjax.materialize)(cache), vm(kvjax.clear)(cache)


def one_step(x, sharding):
  """The abstract input of one decode step (one token per sequence)."""
  return jax.ShapeDtypeStruct((x.shape[0], 1, *x.shape[2:]), x.dtype, sharding=sharding)


def decode_step(cache, k, v, q):
  cache = jax.vmap(kvjax.append)(cache, k, v)
  return cache, jax.vmap(lambda c, q: kvjax.attend(c, q))(cache, q)


def big_ops(hlo: str, marker: int, min_elements: int = 256) -> list[str]:
  """Collectives, copies and slices of cache-sized arrays: a result with an
  axis of the cache's store slots (or a pool's pages), `marker`, which no
  other array of these programs has, and at least `min_elements`."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= (.+?) (%s)(-start)?\(" % "|".join(COLLECTIVES + COPIES), line)
    if not m:
      continue
    for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
      sizes = [int(n) for n in dims.split(",") if n]
      if marker in sizes and np.prod(sizes) >= min_elements:
        found.append(line.strip()[:200])
  return found


def collectives(hlo: str) -> int:
  return sum(len(re.findall(r" %s(-start)?\(" % op, hlo)) for op in COLLECTIVES)


def local(tree):
  """Each leaf's shards held here, as (index, numpy) pairs."""
  return [[(s.index, np.asarray(s.data)) for s in x.addressable_shards]
          for x in jax.tree.leaves(tree)]


def shards_match(sharded, want) -> bool:
  """Every shard this process holds equals that slice of `want`."""
  return len(jax.tree.leaves(sharded)) == len(jax.tree.leaves(want)) and all(np.array_equal(data, np.asarray(w)[index], equal_nan=True)
             for shards, w in zip(local(sharded), jax.tree.leaves(want))
             for index, data in shards)


def max_difference(sharded, want) -> float:
  """The largest |difference| over the shards this process holds."""
  return max(float(np.max(np.abs(data - np.asarray(w)[index]), initial=0.0))
             for shards, w in zip(local(sharded), jax.tree.leaves(want))
             for index, data in shards)


def place(x, sharding):
  """A host array as a global array (each process makes its own shards)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def per_device_bytes(tree) -> tuple[int, int]:
  leaves = jax.tree.leaves(tree)
  device = leaves[0].addressable_shards[0].device
  mine = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)
  return mine, sum(x.nbytes for x in leaves)


# One trace per format, sharded or not.
TRANSFORMS = jax.jit(transforms, static_argnames="implementations")


def check_cache(store, layout, mesh, jnp_path=False, detector=False) -> dict:
  """Every transform on a sharded batch against one device, and the compiled
  decode step (donated, in and out shardings); with `jnp_path`, attend's jnp
  path too (its partitioning is XLA's)."""
  spec = spec_for(store)
  batch_axis, head_axis = LAYOUTS[layout]
  k, v, q = tokens(len(str(store)), 110)
  empty = kvjax.init(spec, batch=B)
  implementations = ("ffi", "xla") if jnp_path else ("ffi",)
  want = TRANSFORMS(empty, k, v, q, implementations)
  shardings = kvjax.cache_sharding(empty, mesh, batch_axis=batch_axis, head_axis=head_axis)
  rows = NamedSharding(mesh, P(batch_axis, None, head_axis, None))
  args = (kvjax.shard(empty, mesh, batch_axis=batch_axis, head_axis=head_axis),
          *(place(x, rows) for x in (k, v, q)))
  compiled = TRANSFORMS.lower(*args, implementations).compile()
  mine, total = per_device_bytes(args[0])  # as kvjax.shard placed it
  cache, outs, materialized, cleared = compiled(*args)
  scale = float(np.abs(np.asarray(want[1])).max())
  result = dict(
      cache=shards_match(cache, want[0]), materialize=shards_match(materialized, want[2]),
      clear=shards_match(cleared, want[3]),
      attend=[shards_match(o, w) for o, w in zip(outs, want[1])],
      attend_relative_difference=max_difference(outs, want[1]) / scale,
      bytes_per_device=mine, bytes_total=total)
  cache = jax.device_put(cache, shardings)  # the step's input sharding
  run = jax.jit(decode_step, in_shardings=(shardings, rows, rows, rows),
                out_shardings=(shardings, rows), donate_argnums=0)
  hlo = run.lower(cache, *(one_step(x, rows) for x in (k, v, q))).compile().as_text()
  result.update(step_big_ops=big_ops(hlo, spec.store_slots),
                step_collectives=collectives(hlo),
                step_kernel_calls=hlo.count('custom_call_target="kvjax_'))
  if detector:  # It finds what a step returning the cache replicated gathers.
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), shardings)
    gathering = jax.jit(decode_step, in_shardings=(shardings, rows, rows, rows),
                        out_shardings=(replicated, rows)).lower(
                            cache, k[:, :1], v[:, :1], q[:, :1]).compile().as_text()
    result.update(gathering_step_big_ops=len(big_ops(gathering, spec.store_slots)))
  return result


def check_paged(store, mesh) -> dict:
  """A head-sharded pool: ragged appends, a fork, a free, attend."""
  pspec = kvjax.PagedSpec(num_kv_heads=H, head_dim=D, page_size=16, num_pages=40,
                          max_seqs=4, max_pages_per_seq=8, sinks=2, tail=8, store=store)
  k, v, q = tokens(7, 37)  # 37 tokens: no axis of 40 but the pages'
  seq = jnp.arange(4, dtype=jnp.int32)
  n_valid = jnp.asarray([37, 17, 33, 5], jnp.int32)

  def program(pool, k, v, q):
    pool = kvjax.paged.append(pool, seq, k[:4], v[:4], n_valid)
    pool = kvjax.paged.free(pool, seq[3:])
    pool = kvjax.paged.fork(pool, 0, 3)
    pool = kvjax.paged.append(pool, seq, k[4:, :3], v[4:, :3])
    return pool, kvjax.paged.attend(pool, seq, q[:4, :1])

  want = jax.jit(program)(kvjax.paged.init(pspec), k, v, q)
  empty = kvjax.paged.init(pspec)
  shardings = kvjax.cache_sharding(empty, mesh, head_axis="model")
  rows = NamedSharding(mesh, P(None, None, "model", None))
  run = jax.jit(program, in_shardings=(shardings, rows, rows, rows),
                out_shardings=(shardings, rows), donate_argnums=0)
  args = tuple(place(x, rows) for x in (k, v, q))
  hlo = run.lower(empty, *args).compile().as_text()
  pool, out = run(kvjax.shard(empty, mesh, head_axis="model"), *args)
  mine, total = per_device_bytes((pool.pages_k, pool.pages_v))
  return dict(pool=shards_match(pool, want[0]), attend=shards_match(out, want[1]),
              page_bytes_per_device=mine, page_bytes_total=total,
              big_ops=big_ops(hlo, pspec.num_pages))


def check_model(mesh, layout) -> dict:
  """Greedy decoding of the demo's model (random weights) over a sharded
  batch of whole-model caches, against one device."""
  batch_axis, head_axis = LAYOUTS[layout]
  config = llama.LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=4,
                             head_dim=16, ffn_dim=96)
  params = llama.random_params(config, jax.random.key(1))
  specs = [llama.cache_spec(config, capacity=48, tail=4, migrate_batch=4, sinks=2,
                            store=s) for s in ("q8", "q4")]  # two runs of layers
  prompt = jax.random.randint(jax.random.key(2), (B, 8), 0, config.vocab_size)

  def decode(caches, prompt):
    forward = jax.vmap(lambda c, t: llama.forward(params, config, c, t))
    logits, caches = forward(caches, prompt)
    token = jnp.argmax(logits[:, -1], -1)

    def step(carry, _):
      caches, token = carry
      logits, caches = forward(caches, token[:, None])
      nxt = jnp.argmax(logits[:, -1], -1)
      return (caches, nxt), (nxt, logits[:, -1])

    (caches, _), (generated, logits) = jax.lax.scan(step, (caches, token), None, length=4)
    return caches, generated.T, logits

  empty = llama.init_caches(config, specs, batch=B)
  want = jax.jit(decode)(empty, prompt)
  shardings = kvjax.cache_sharding(empty, mesh, batch_axis=batch_axis, head_axis=head_axis)
  sequences = NamedSharding(mesh, P(batch_axis))
  run = jax.jit(decode, in_shardings=(shardings, sequences),
                out_shardings=(shardings, None, None), donate_argnums=0)
  caches, generated, logits = run(
      kvjax.shard(empty, mesh, batch_axis=batch_axis, head_axis=head_axis),
      place(np.asarray(prompt), sequences))
  return dict(tokens=shards_match(generated, want[1]),
              logits_relative_difference=max_difference(logits, want[2]) / float(
                  np.abs(want[2]).max()),
              caches=shards_match(caches, want[0]))


def errors(mesh) -> dict:
  """The message of each bad call (or None when it does not raise)."""
  spec = spec_for("q4")
  bad = {
      "heads": lambda: kvjax.cache_sharding(kvjax.init(
          kvjax.CacheSpec(num_kv_heads=2, head_dim=D, capacity=CAPACITY, tail=8,
                          migrate_batch=8), batch=B), mesh, head_axis="model"),
      "batch": lambda: kvjax.cache_sharding(kvjax.init(spec, batch=3), mesh, batch_axis="data"),
      "no_batch": lambda: kvjax.cache_sharding(kvjax.init(spec), mesh, batch_axis="data"),
      "axis": lambda: kvjax.cache_sharding(kvjax.init(spec, batch=B), mesh, head_axis="tensor"),
      "paged_batch": lambda: kvjax.cache_sharding(
          kvjax.paged.init(kvjax.PagedSpec(num_kv_heads=H, head_dim=D)), mesh,
          batch_axis="data"),
      "not_a_cache": lambda: kvjax.cache_sharding({"k": np.zeros(3)}, mesh),
  }
  out = {}
  for name, call in bad.items():
    try:
      call()
      out[name] = None
    except ValueError as e:
      out[name] = str(e)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--part", default="all", choices=("all", "caches", "paged", "model"))
  p.add_argument("--process-id", type=int, default=None,
                 help="one of two processes joined over 127.0.0.1 (4 devices each)")
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--every", action="store_true",
                 help="every store format (and two mixed pairs) in every layout")
  args = p.parse_args(argv)
  if args.process_id is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=2,
                               process_id=args.process_id)
  mesh = make_mesh()
  result = {"devices": jax.device_count(), "processes": jax.process_count()}
  many = args.process_id is not None
  if args.part in ("all", "caches"):
    cases = CASES
    if args.every:
      cases = [(s, layout) for s in list(_formats.FORMATS) + MIXED for layout in LAYOUTS]
    if many:  # Across hosts: the batch over one axis, the heads over the other.
      cases = [("turbo3.5", "2d")]
    result["caches"] = {f"{s if isinstance(s, str) else '/'.join(s)}@{layout}":
                        check_cache(s, layout, mesh, jnp_path=s in JNP_PATH and not many,
                                    detector=i == 0 and not many)
                        for i, (s, layout) in enumerate(cases)}
  if args.part in ("all", "paged") and not many:
    result["paged"] = {s: check_paged(s, mesh) for s in ("turbo3.5",)}
  if args.part in ("all", "model"):
    result["model"] = {"2d": check_model(mesh, "2d")}
  if args.part == "all" and not many:
    result["errors"] = errors(mesh)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
