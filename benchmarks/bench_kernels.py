"""q8 / q4 / TurboQuant encode and decode throughput of each C++ kernel
variant, against the jitted jnp reference and against a numpy copy of the
same array; and cache appends (1 and 512 tokens) with either encoder.

    python benchmarks/bench_kernels.py [--quick]

For every variant this CPU runs (the variant is chosen once per process, so
each runs in a child process with KVJAX_ISA set), the child times, in
alternation: the jitted jnp reference (backend="jax"), the kernel
(backend="ffi", jitted, XLA's thread pool), and `np.copy` of the float32
input, on a [4096, 8, 128] float32 array. It reports speedup = jnp time /
kernel time, and the kernel's bandwidth (bytes read + written per second) as
a fraction of the copy's (2 x input bytes per second).
"""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from _timing import interleaved, write

SHAPE = (4096, 8, 128)
QUICK_SHAPE = (256, 8, 128)
FORMATS = ("q8", "q4", "turbo4", "turbo3.5", "turbo2.5", "turbo2")
QUICK_FORMATS = ("q4", "turbo3.5")
APPEND_FORMATS = ("q8", "q4", "turbo4", "turbo3.5")
QUICK_APPEND_FORMATS = ("q4",)


def measure(shape, rounds, steps, formats, append_formats) -> dict:
  """In the child: times for the variant this process loaded."""
  x_np = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  x = jax.device_put(x_np)
  candidates = {"numpy_copy": (lambda _, a: np.copy(a), None, (x_np,))}
  encoded = {}
  for fmt in formats:
    for backend in ("jax", "ffi"):
      enc = jax.jit(lambda a, f=fmt, b=backend: kvjax.quantize(a, f, backend=b))
      dec = jax.jit(lambda e, f=fmt, b=backend: kvjax.dequantize(e, f, backend=b))
      encoded[fmt] = enc(x)
      candidates[f"{fmt}_encode_{backend}"] = (lambda _, a, f=enc: f(a), None, (x,))
      candidates[f"{fmt}_decode_{backend}"] = (
          lambda _, e, f=dec: f(e), None, (encoded[fmt],))
  times = interleaved(candidates, rounds=rounds, steps=steps)
  x_bytes = x_np.nbytes
  copy_bandwidth = 2 * x_bytes / times["numpy_copy"]
  result = {"isa": kvjax.backend_info()["isa"], "shape": list(shape),
            "seconds": times, "speedup_over_jnp": {}, "fraction_of_copy_bandwidth": {}}
  for fmt in formats:
    encoded_bytes = sum(np.asarray(a).nbytes for a in encoded[fmt])
    for op, moved in (("encode", x_bytes + encoded_bytes),
                      ("decode", encoded_bytes + x_bytes)):
      key = f"{fmt}_{op}"
      ffi_time = times[f"{key}_ffi"]
      result["speedup_over_jnp"][key] = times[f"{key}_jax"] / ffi_time
      result["fraction_of_copy_bandwidth"][key] = moved / ffi_time / copy_bandwidth
  result["append_speedup_over_jnp"] = append_speedups(
      shape[0] // 8, rounds, steps, append_formats)
  return result


def append_speedups(prefill, rounds, steps, formats) -> dict:
  """Cache append with KVJAX_BACKEND=jax against "auto" (the kernels)."""
  h, d = SHAPE[1], SHAPE[2]
  speedups = {}
  for store in formats:
    spec = kvjax.CacheSpec(num_kv_heads=h, head_dim=d, capacity=4096, tail=256,
                           migrate_batch=64, store=store, hot_dtype="bfloat16")
    candidates = {}
    for tokens in (1, prefill):
      kv = jnp.ones((tokens, h, d), jnp.float32)
      for backend in ("jax", "auto"):
        os.environ["KVJAX_BACKEND"] = backend
        jax.clear_caches()  # the backend is read when append is traced
        step = jax.jit(kvjax.append, donate_argnums=0).lower(
            kvjax.init(spec), kv, kv).compile()
        candidates[(tokens, backend)] = (step, kvjax.init(spec), (kv, kv))
    os.environ.pop("KVJAX_BACKEND", None)
    times = interleaved(candidates, rounds=rounds, steps=steps)
    for tokens in (1, prefill):
      speedups[f"{store}_append_{tokens}_tokens"] = (
          times[(tokens, "jax")] / times[(tokens, "auto")])
  return speedups


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="small input (smoke test)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  shape = QUICK_SHAPE if args.quick else SHAPE
  rounds, steps = (2, 3) if args.quick else (9, 20)
  if args.child:
    formats = (QUICK_FORMATS, QUICK_APPEND_FORMATS) if args.quick else (FORMATS, APPEND_FORMATS)
    print(json.dumps(measure(shape, rounds, steps, *formats)))
    return 0
  info = kvjax.backend_info()
  if not info["ffi_loaded"]:
    print(f"the C++ kernels are not loaded: {info['reason']}")
    return 1
  missing = [isa for isa in info["compiled_isas"] if isa not in info["supported_isas"]]
  results = []
  # --quick (a smoke test) runs the best variant only.
  for isa in info["supported_isas"][:1] if args.quick else info["supported_isas"]:
    proc = subprocess.run([sys.executable, __file__, "--child"] + (["--quick"] if args.quick else []),
                          env={**os.environ, "KVJAX_ISA": isa}, capture_output=True,
                          text=True, check=True)
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  print(f"input float32 {list(shape)}; ratios of medians, measured in alternation per variant")
  print(f"{'variant':8s} {'op':16s} {'x jnp (jit)':>12s} {'of copy bw':>11s}")
  for r in results:
    for key, speedup in r["speedup_over_jnp"].items():
      print(f"{r['isa']:8s} {key:16s} {speedup:11.2f}x "
            f"{r['fraction_of_copy_bandwidth'][key]:10.0%}")
  print("cache append (donated), jnp encoder time / kernel time:")
  for r in results:
    print(f"  {r['isa']:8s} " + ", ".join(
        f"{k} {v:.2f}x" for k, v in r["append_speedup_over_jnp"].items()))
  if missing:
    print(f"not measured (this CPU cannot run them): {', '.join(missing)}")
  ratios = {f"{r['isa']}/{key}/{kind}": r[kind][key] for r in results
            for kind in ("speedup_over_jnp", "fraction_of_copy_bandwidth",
                         "append_speedup_over_jnp")
            for key in r[kind]}
  write("kernels_quick" if args.quick else "kernels",
        {"ratios": ratios, "variants": results, "not_runnable_here": missing,
         "bars": {"best variant q4_encode >=": 3, "best variant turbo3.5_encode >=": 3,
                  "best variant turbo4_encode >=": 3},
         "threads": "XLA's intra-op pool", "cpu_count": os.cpu_count()})
  return 0


if __name__ == "__main__":
  sys.exit(main())
