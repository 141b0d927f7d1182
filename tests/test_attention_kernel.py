"""The fused decode-attention kernel (kvjax/ffi/attention_*): accuracy on
every format, hot dtype, GQA ratio, option and ring position against float64
attention over `materialize`, on every variant this CPU runs (the standalone
checker, sanitized and NEON under qemu: tests/test_ffi_native.py); vmap to
one call, layer stacks read in place, scan loops, and how `implementation`
picks."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from tests import attention_check

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFO = kvjax.backend_info()
REQUIRE_ALL = os.environ.get("KVJAX_REQUIRE_ALL_CHECKS") == "1"
needs_ffi = pytest.mark.skipif(
    not INFO["ffi_loaded"] and not REQUIRE_ALL,
    reason=f"C++ kernels not loaded: {INFO['reason']}")
# Per variant: every kind of tier read (raw, q8, whole and repeated 4-bit
# words, 3-bit groups, QJL bits) and a scalar fallback.
QUICK = [("q4", 64), ("q8", 128), ("turbo3.5", 64), ("turbo4", 128), ("bf16", 64),
         ("turbo2p", 64), ("turbo1p", 16), (("q8", "turbo3.5"), 64)]


@needs_ffi
def test_every_format_within_tolerance_of_the_reference():
  errors = attention_check.errors()
  worst = max(errors, key=errors.get)
  assert errors[worst] <= attention_check.TOLERANCE, (worst, errors[worst])
  assert len(errors) >= 5 * len(attention_check.CASES) > 150


@needs_ffi
@pytest.mark.parametrize("store, head_dim", [("q4", 64), (("q8", "turbo3.5"), 128)])
def test_runs_of_several_blocks_within_tolerance(store, head_dim):
  # Store runs of up to ~690 tokens: items of 512 tokens and more span
  # several of the kernel's 256-token blocks (the online softmax carried
  # from block to block, whole-block fast paths, masked q4 values and q8
  # keys read in place), which the other cases' 160-slot rings never reach.
  cache = attention_check.filled(store, head_dim=head_dim, hot_dtype="bfloat16",
                                 capacity=700, n=760, seed=7)
  length = int(cache.length)
  rng = np.random.default_rng(8)
  for n_q, window in ((1, None), (3, 300)):
    q = rng.normal(size=(n_q, 8, head_dim)).astype(np.float32)
    q_pos = np.arange(length - n_q, length, dtype=np.int32)
    kw = {} if window is None else {"window": window}
    got = attention_check.attend(cache, q, q_pos, kw, "ffi")
    want = attention_check.reference_attend(cache, q, q_pos, **kw)
    assert attention_check.relative_error(got, want) <= attention_check.TOLERANCE, (store, n_q)


@needs_ffi
def test_agrees_with_the_jnp_path():
  # One cache holds both kinds of store the jnp path decodes differently:
  # affine keys and TurboQuant values.
  group, = attention_check.case_groups([(("q4", "turbo3.5"), 64)])
  (_, ffi), (_, xla) = (attention_check.materialize_and_attend(group, impl)
                        for impl in ("ffi", "xla"))
  assert len(ffi) == len(xla) == len(attention_check.OPTIONS)
  for (name, *_), got, want in zip(group, ffi, xla):
    assert attention_check.relative_error(got, np.asarray(want, np.float64)) <= 5e-5, name


@needs_ffi
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "neon"])
def test_each_variant_within_tolerance(isa):
  if isa not in INFO["compiled_isas"]:
    pytest.skip(f"{isa} is not built on this platform (NEON: the standalone "
                "checker runs it under qemu-aarch64)")
  if isa not in INFO["supported_isas"]:
    pytest.skip(f"this CPU cannot run {isa}")
  if isa == INFO["isa"]:
    pytest.skip(f"{isa} runs in this process: test_every_format_within_tolerance_of_"
                "the_reference covers it on every case")
  code = ("import json, sys; from tests import attention_check as a; "
          f"e = a.errors(pairs={QUICK!r}); print(json.dumps(e)); "
          "sys.exit(max(e.values()) > a.TOLERANCE)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "KVJAX_ISA": isa})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  errors = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(errors) == 5 * len(QUICK)


def _spec(**kw):
  base = dict(num_kv_heads=2, head_dim=64, capacity=96, tail=8, migrate_batch=8,
              sinks=2, hot_dtype="bfloat16", store="q4")
  return kvjax.CacheSpec(**{**base, **kw})


def _tokens(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _calls(hlo: str, target="kvjax_attend"):
  return hlo.count(f'custom_call_target="{target}"')


@needs_ffi
def test_vmap_is_one_kernel_call_with_unbatched_queries_too():
  lengths = jnp.array([70, 3, 96, 40], jnp.int32)
  k = _tokens((4, 96, 2, 64), 1)
  caches = jax.vmap(kvjax.append)(kvjax.init(_spec(), batch=4), k, k * 0.5, lengths)
  q = _tokens((4, 2, 8, 64), 2)
  run = jax.jit(jax.vmap(lambda c, q: kvjax.attend(c, q, implementation="ffi")))
  hlo = run.lower(caches, q).compile().as_text()
  assert _calls(hlo) == 1 and "while" not in hlo
  got = run(caches, q)
  shared = jax.jit(jax.vmap(lambda c: kvjax.attend(c, q[0], implementation="ffi")))(caches)
  for b in range(4):
    one = jax.tree.map(lambda a: a[b], caches)
    want = attention_check.reference_attend(one, q[b], int(lengths[b]) - 2 + np.arange(2))
    assert attention_check.relative_error(got[b], want) <= 5e-5
    want = attention_check.reference_attend(one, q[0], int(lengths[b]) - 2 + np.arange(2))
    assert attention_check.relative_error(shared[b], want) <= 5e-5


@needs_ffi
@pytest.mark.parametrize("store", ["turbo2p", ("q4", "turbo3.5")])
def test_a_sequence_attends_alike_alone_and_in_a_batch(store):
  """Bit for bit: batching (or sharding) a call changes no sequence's
  result, the prod formats' QJL projections included (a dot's summation
  order would follow the batch shape)."""
  # 8 KV heads of 32: a shape where a dot's order did differ (AVX-512).
  lengths = jnp.array([90, 41], jnp.int32)
  k = _tokens((2, 96, 8, 32), 4)
  spec = _spec(store=store, num_kv_heads=8, head_dim=32)
  caches = jax.vmap(kvjax.append)(kvjax.init(spec, batch=2), k, -k, lengths)
  q = _tokens((2, 2, 16, 32), 5)
  batched = jax.jit(jax.vmap(lambda c, q: kvjax.attend(c, q, implementation="ffi")))(caches, q)
  alone = jax.jit(lambda c, q: kvjax.attend(c, q, implementation="ffi"))
  for b in range(2):
    np.testing.assert_array_equal(alone(jax.tree.map(lambda a: a[b], caches), q[b]), batched[b])


@needs_ffi
def test_layer_stack_is_read_in_place():
  layers = 3
  stack = kvjax.init(_spec(capacity=4096, store="q8"), batch=layers)
  for i in range(layers):
    k = _tokens((200, 2, 64), 10 + i)
    stack = kvjax.append(stack, k, k, layer=i)
  q = _tokens((1, 4, 64), 3)

  def over_layers(stack):
    out = jnp.zeros((layers, 1, 4, 64))
    def body(i, out):
      return out.at[i].set(kvjax.attend(stack, q, layer=i, implementation="ffi"))
    return jax.lax.fori_loop(0, layers, body, out)

  hlo = jax.jit(over_layers).lower(stack).compile().as_text()
  assert _calls(hlo) == 1
  big = [line for line in hlo.splitlines()
         if (" copy(" in line or "dynamic-slice(" in line) and "4094" in line]
  assert not big, big  # no layer's store (4094 slots) is copied out
  outs = jax.jit(over_layers)(stack)
  for i in range(layers):
    one = jax.tree.map(lambda a: a[i], stack)
    want = attention_check.reference_attend(one, q, [199])
    assert attention_check.relative_error(outs[i], want) <= 5e-5


@needs_ffi
def test_scan_decode_loop_in_place_and_equal_to_steps():
  spec = _spec(capacity=2048, store="turbo3.5")
  k = _tokens((40, 1, 2, 64), 4)
  q = _tokens((40, 1, 4, 64), 5)

  def loop(cache):
    def step(cache, x):
      cache = kvjax.append(cache, x[0], x[0])
      return cache, kvjax.attend(cache, x[1])
    return jax.lax.scan(step, cache, (k, q))

  run = jax.jit(loop, donate_argnums=0)
  hlo = run.lower(kvjax.init(spec)).compile().as_text()
  assert _calls(hlo) == 1
  big = [line for line in hlo.splitlines() if " copy(" in line and "2046" in line]
  assert not big, big
  cache, outs = run(kvjax.init(spec))
  one = kvjax.init(spec)
  for t in range(40):
    one = kvjax.append(one, k[t], k[t])
    np.testing.assert_allclose(outs[t], kvjax.attend(one, q[t]), rtol=2e-5, atol=2e-6)


@needs_ffi
def test_implementation_picks_per_call():
  cache = kvjax.append(kvjax.init(_spec()), *(_tokens((20, 2, 64), 6),) * 2)
  lower = lambda n_q, impl: jax.jit(lambda c, q: kvjax.attend(
      c, q, implementation=impl)).lower(cache, jnp.ones((n_q, 4, 64))).compile().as_text()
  assert _calls(lower(16, None)) == 1  # CPU, fits: the kernel
  assert _calls(lower(1024, None)) == 1
  assert _calls(lower(1025, None)) == 0  # beyond the kernel's limit: jnp
  assert _calls(lower(1, "xla")) == 0
  with pytest.raises(ValueError, match="at most 1024 queries per call, got n_q=1025"):
    lower(1025, "ffi")
  with pytest.raises(ValueError, match="implementation: expected one of"):
    kvjax.attend(cache, jnp.ones((1, 4, 64)), implementation="pallas")
  # For a GPU the CPU-only custom call is never emitted (exported without one).
  gpu = jax.export.export(jax.jit(lambda c, q: kvjax.attend(c, q)), platforms=["cuda"])(
      cache, jnp.ones((1, 4, 64))).mlir_module()
  assert "kvjax_attend" not in gpu


def test_kvjax_backend_jax_keeps_attention_on_the_jnp_path():
  code = ("import jax, jax.numpy as jnp, kvjax; "
          "s = kvjax.CacheSpec(num_kv_heads=1, head_dim=16, capacity=32, tail=2, "
          "migrate_batch=2); c = kvjax.init(s); "
          "print(jax.jit(kvjax.attend).lower(c, jnp.ones((1, 1, 16))).as_text().count('kvjax_attend'))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "KVJAX_BACKEND": "jax"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "0"
