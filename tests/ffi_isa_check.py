"""Bit-exactness of the loaded C++ kernel variant against the jnp reference.

Run in a subprocess per variant (the variant is chosen once per process):

  KVJAX_ISA=avx2 python -m tests.ffi_isa_check [--reference FILE]

(`--save-reference FILE` writes the jnp reference of every case, which the
test computes once and hands to each variant's process.)

Compares backend="ffi", eagerly and under jit, with backend="jax" for
encode and decode of q8 and q4, on the committed golden files, the
adversarial groups at several D, and 2^20 random values; then of every turbo
format on the adversarial groups and 2^17 random values at D=128 each (split
formats with a random channel order per vector); prints one JSON line with
the mismatch counts and exits non-zero on any mismatch.
"""

import functools
import json
import sys

import jax
import numpy as np

import kvjax
from kvjax import _turbo
from tests import golden
from tests.affine_inputs import adversarial_groups, random_groups


def as_bits(a):
  a = np.asarray(a)
  return a.view(np.uint32) if a.dtype == np.float32 else a


def mismatches(got, want) -> int:
  return int(np.sum(as_bits(got) != as_bits(want)))


def encode_decode(x, fmt, backend, jit):
  enc_fn = lambda a: kvjax.quantize(a, fmt, backend=backend)
  dec_fn = lambda e: kvjax.dequantize(e, fmt, backend=backend)
  if jit:
    enc_fn, dec_fn = jax.jit(enc_fn), jax.jit(dec_fn)
  enc = enc_fn(x)
  return (*enc, dec_fn(enc))


def affine_cases():
  """(format, D, input, golden encoded or None) per affine case: one array
  per (format, D), so each jit compiles once: the golden inputs, the
  adversarial groups, and at D=128 2^20 random values."""
  for fmt, golden_sizes in golden.GROUP_SIZES.items():
    for d in sorted(set(golden_sizes) | {2, 40}):
      parts = [adversarial_groups(d)]
      if d == 128:
        parts.append(random_groups(8192, d, seed=5))
      if d in golden_sizes:
        parts.insert(0, golden.read_groups(golden.groups_path(d)))
      yield fmt, d, np.concatenate(parts), d in golden_sizes


def turbo_inputs():
  rng = np.random.default_rng(8)
  x = np.concatenate([adversarial_groups(128), rng.normal(size=(1024, 128)) * 3]).astype(np.float32)
  orders = np.argsort(rng.random((len(x), 128)), -1).astype(np.int32)
  return x, orders


def turbo_run(fmt, x, order, backend):
  order = order if fmt.split else None
  enc = fmt.encode(x, order, backend=backend)
  return (*enc, fmt.decode(enc, order, backend=backend))


def reference() -> dict:
  """The jnp reference of every case (`case name -> arrays`), the same in
  every process: computed once and handed to each variant's process."""
  want = {}
  for fmt, d, x, _ in affine_cases():
    # The reference's eager and jit results agree (tests/test_affine.py).
    want[f"{fmt}/d{d}"] = encode_decode(x, fmt, "jax", True)
  x, orders = turbo_inputs()
  for name, fmt in _turbo.FORMATS.items():
    want[f"{name}/d128"] = jax.jit(functools.partial(turbo_run, fmt), static_argnums=2)(
        x, orders, "jax")
  return {k: tuple(np.asarray(a) for a in v) for k, v in want.items()}


def save_reference(path) -> None:
  flat = {f"{k}#{i}": a for k, v in reference().items() for i, a in enumerate(v)}
  np.savez(path, **flat)


def load_reference(path) -> dict:
  out = {}
  with np.load(path) as f:
    for key in sorted(f.files, key=lambda k: (k.split("#")[0], int(k.split("#")[1]))):
      out.setdefault(key.split("#")[0], []).append(f[key])
  return out


def main(argv):
  if argv[:1] == ["--save-reference"]:
    save_reference(argv[1])
    return 0
  info = kvjax.backend_info()
  if not info["ffi_loaded"]:
    print(json.dumps({"error": info["reason"]}))
    return 2
  want = load_reference(argv[1]) if argv[:1] == ["--reference"] else reference()
  counts = {}  # case -> mismatched elements over codes, scale, zero, decoded
  checked = 0
  for fmt, d, x, has_golden in affine_cases():
    sources = {"ffi-eager": encode_decode(x, fmt, "ffi", False),
               "ffi-jit": encode_decode(x, fmt, "ffi", True)}
    for source, got in sources.items():
      counts[f"{fmt}/d{d}/{source}"] = sum(
          mismatches(g, w) for g, w in zip(got, want[f"{fmt}/d{d}"]))
    if has_golden:  # the committed bytes, not only the live reference
      _, file = golden.read_encoded(golden.encoded_path(fmt, d))
      n = len(file.scale)
      counts[f"{fmt}/d{d}/ffi-jit-vs-golden-file"] = sum(
          mismatches(np.asarray(g)[:n], w)
          for g, w in zip(sources["ffi-jit"], file))
    checked += x.size
  x, orders = turbo_inputs()
  for name, fmt in _turbo.FORMATS.items():
    run = functools.partial(turbo_run, fmt)
    sources = {"ffi-eager": run(x, orders, "ffi"),
               "ffi-jit": jax.jit(run, static_argnums=2)(x, orders, "ffi")}
    for source, got in sources.items():
      counts[f"{name}/d128/{source}"] = sum(
          mismatches(g, w) for g, w in zip(got, want[f"{name}/d128"]))
    checked += x.size
  bad = {k: v for k, v in counts.items() if v}
  print(json.dumps({"isa": info["isa"], "values_per_source": checked,
                    "cases": len(counts), "mismatched": bad}))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
