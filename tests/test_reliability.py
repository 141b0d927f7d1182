"""The reliability issue's repros, one named test each: a bad value stays in
its own token, a cleared cache keeps nothing of the last sequence, and bad
input gets a clear error.

Attention is compared with float64 softmax over `materialize` (tests/
reference.py), on every implementation `attend` has (`IMPLEMENTATIONS`).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import _checks
from tests import reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("xla", None)


def reference_attend(cache, q, q_pos, **kw):
  k, v, pos, valid = (np.asarray(a) for a in kvjax.materialize(cache))
  with np.errstate(invalid="ignore", over="ignore"):
    return reference.attention(q, k, v, pos, valid, np.asarray(q_pos), **kw)


def assert_matches_reference(got, want, rtol=2e-5):
  """NaN and +-Inf exactly where the reference has them; elsewhere within
  `rtol` of each (query, head) row's largest reference value."""
  got = np.asarray(got, np.float64)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  finite = np.isfinite(want)
  scale = np.max(np.where(finite, np.abs(want), 0), axis=-1, keepdims=True)
  err = np.where(finite, np.abs(got - np.where(finite, want, 0)), 0)
  assert np.all(err <= rtol * scale + 1e-30), (err / np.maximum(scale, 1e-30)).max()


def attend_all(cache, q, q_pos, **kw):
  """`attend` by every implementation, each compared with the reference."""
  want = reference_attend(cache, q, q_pos, **kw)
  for impl in IMPLEMENTATIONS:
    got = kvjax.attend(cache, q, q_pos=q_pos, implementation=impl, **kw)
    assert_matches_reference(got, want)
  return want


def spec_of(store="q4", **kw):
  base = dict(num_kv_heads=2, head_dim=16, capacity=32, tail=4,
              migrate_batch=4, sinks=2, hot_dtype="float32", store=store)
  return kvjax.CacheSpec(**{**base, **kw})


def tokens(n, seed=0, h=2, d=16):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, h, d)).astype(np.float32),
          rng.normal(size=(n, h, d)).astype(np.float32))


def queries(n_q, seed=1, hq=4, d=16):
  return np.random.default_rng(seed).normal(size=(n_q, hq, d)).astype(np.float32)


# 1. A NaN in the first non-sink token of a split TurboQuant format.

@pytest.mark.parametrize("store", ["turbo3.5", "turbo2.5"])
def test_nan_in_the_first_token_keeps_a_permutation_and_loses_nothing(store):
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=16, capacity=256, tail=4,
                         migrate_batch=4, store=store)
  x = np.random.default_rng(0).standard_normal((200, 2, 16)).astype(np.float32)
  x[0, 0, 3] = np.nan
  x[0, 1, 5] = np.inf
  cache = kvjax.append(kvjax.init(spec), x, x)
  for order in np.asarray(cache.store_order).reshape(-1, 16):
    assert sorted(order.tolist()) == list(range(16))
  k = np.asarray(kvjax.materialize(cache)[0])
  bad = ~np.isfinite(k).all(-1)  # [token, head]
  assert bad[0].all() and not bad[1:].any()


# 2. Tokens a query cannot see never reach its output.

def test_a_bad_token_outside_the_window_does_not_reach_the_query():
  cache = kvjax.append(kvjax.init(spec_of("q4")), *tokens(20))
  k, v = tokens(1, seed=5)
  k[0, 0, 2], v[0, 1, 7] = np.nan, np.inf
  cache = kvjax.append(cache, k, v)  # position 20, in the tail
  cache = kvjax.append(cache, *tokens(3, seed=6))
  q = queries(2)
  want = attend_all(cache, q, [22, 23], window=2)  # sees 21..23, not 20
  assert np.isfinite(want).all()
  want = attend_all(cache, q, [22, 23], window=3)  # row 0 sees 20
  assert np.isnan(want[0, :2]).all()  # the NaN key, KV head 0
  assert np.isposinf(want[0, 2:, 7]).all()  # the Inf value, KV head 1
  assert np.isfinite(np.delete(want[0, 2:], 7, -1)).all() and np.isfinite(want[1]).all()


@pytest.mark.parametrize("store", ["q8", "f16", "turbo4"])
def test_an_evicted_bad_token_is_gone(store):
  k, v = tokens(20)
  k[3, 1, 0] = np.nan
  v[4, 0, 1] = -np.inf
  cache = kvjax.append(kvjax.init(spec_of(store)), k, v)
  cache = kvjax.evict(cache, 5)  # non-sink positions 2..6 (the bad 3 and 4)
  assert np.isfinite(np.asarray(kvjax.materialize(cache)[0])).all()
  assert np.isfinite(attend_all(cache, queries(1), [19])).all()


def test_chunked_prefill_poisons_only_rows_at_or_after_the_bad_token():
  k, v = tokens(12)
  v[7, 0, 4] = np.nan
  cache = kvjax.append(kvjax.init(spec_of("q4", sinks=0)), k, v)
  want = attend_all(cache, queries(12), np.arange(12))
  rows_bad = np.isnan(want).any(axis=(1, 2))
  assert rows_bad.tolist() == [False] * 7 + [True] * 5
  # Only the heads reading KV head 0 (query heads 0 and 1).
  assert np.isnan(want[7:, :2]).all() and np.isfinite(want[:, 2:]).all()


def test_a_nan_sink_does_not_reach_a_query_before_it():
  k, v = tokens(10)
  k[1, 0, 0] = np.nan  # sink at position 1
  cache = kvjax.append(kvjax.init(spec_of("q8")), k, v)
  want = attend_all(cache, queries(3), [0, 1, 9])
  assert np.isfinite(want[0]).all() and np.isnan(want[1:, :2]).all()


@pytest.mark.parametrize("store", ["f32", "q4", "turbo3.5"])
def test_clear_isolates_the_next_sequence(store):
  k, v = tokens(30)
  k[5:25:3, :, 1] = np.nan
  v[6:28:4, :, 2] = np.inf
  old = kvjax.append(kvjax.init(spec_of(store)), k, v)
  assert np.isnan(np.asarray(kvjax.attend(old, queries(1), q_pos=[29]))).any()
  fresh = kvjax.append(kvjax.clear(old), *tokens(9, seed=3))
  # The old rows are still in the buffers, but nothing of them is read.
  want = attend_all(fresh, queries(4), [0, 3, 8, 8])
  assert np.isfinite(want).all()
  got = jax.jit(jax.vmap(kvjax.attend))(
      jax.tree.map(lambda a: jnp.stack([a, a]), fresh), jnp.stack([queries(1)] * 2))
  assert np.isfinite(np.asarray(got)).all()


def test_float16_overflow_is_an_inf_only_where_it_is_seen():
  k, v = tokens(16)
  v[10, 1, 3] = 1e5  # above float16's 65504: an Inf in the tail
  cache = kvjax.append(kvjax.init(spec_of("q4", hot_dtype="float16")), k, v)
  want = attend_all(cache, queries(3), [9, 10, 15])
  assert np.isfinite(want[0]).all()
  assert np.isposinf(want[1:, 2:, 3]).all()  # heads of KV head 1, channel 3
  assert np.isfinite(np.delete(want[1:, 2:], 3, axis=-1)).all()


# 3. Seeing a NaN key is not the same answer as seeing no key.

@pytest.mark.parametrize("store", ["q4", "bf16"])
def test_a_query_that_sees_a_nan_key_gets_nan_not_zeros(store):
  k, v = tokens(12)
  k[8, 0, 5] = np.nan
  cache = kvjax.append(kvjax.init(spec_of(store, sinks=0)), k, v)
  want = attend_all(cache, queries(3), [-1, 7, 11])
  assert (want[0] == 0).all()  # sees no key: zeros
  assert np.isfinite(want[1]).all()
  assert np.isnan(want[2, :2]).all() and np.isfinite(want[2, 2:]).all()


def test_all_minus_inf_logits_are_nan_as_in_the_reference():
  k, v = tokens(4)
  k[:, 0, :] = -np.inf
  cache = kvjax.append(kvjax.init(spec_of("f32", sinks=0)), k, v)
  q = np.abs(queries(1))  # every logit of KV head 0 is -inf
  want = attend_all(cache, q, [3])
  assert np.isnan(want[0, :2]).all() and np.isfinite(want[0, 2:]).all()


# 4. layer= out of range.

def test_a_static_layer_outside_the_stack_raises():
  stack = kvjax.init(spec_of(), batch=2)
  k, v = tokens(1)
  for layer in (2, 5, -3):
    with pytest.raises(ValueError, match=rf"layer: expected 0 <= layer < 2 .*got {layer}"):
      kvjax.append(stack, k, v, layer=layer)
    with pytest.raises(ValueError, match="layer: expected 0 <= layer < 2"):
      kvjax.attend(stack, queries(1), layer=layer)
    for fn in (lambda s: kvjax.evict(s, 1, layer=layer),
               lambda s: kvjax.migrate(s, layer=layer),
               lambda s: kvjax.materialize(s, layer=layer)):
      with pytest.raises(ValueError, match="layer: expected 0 <= layer < 2"):
        fn(stack)


def test_a_traced_layer_outside_the_stack_is_recorded_and_surfaced():
  stack = kvjax.append(kvjax.init(spec_of(), batch=2), *tokens(3), layer=1)
  append = jax.jit(lambda s, i: kvjax.append(s, *tokens(3, seed=2), layer=i))
  bad = append(stack, 2)
  assert kvjax.stats(bad)["bad_layer_tokens"] == [3, 3]
  assert kvjax.stats(bad)["length"] == [0, 3]  # nothing stored anywhere
  np.testing.assert_array_equal(bad.tail_k.data, stack.tail_k.data)
  with pytest.raises(IndexError, match="outside the stack of 2 layers and stored nothing; refused 3 tokens"):
    kvjax.check(bad)
  kvjax.check(append(stack, 0))  # in range: quiet
  out = jax.jit(lambda s, i: kvjax.attend(s, queries(1), layer=i))(stack, 5)
  assert np.isnan(np.asarray(out)).all()
  k = jax.jit(lambda s, i: kvjax.materialize(s, layer=i)[0])(stack, -1)
  assert np.isnan(np.asarray(k)).all()


def test_layer_works_for_evict_migrate_and_materialize():
  stack = kvjax.init(spec_of(), batch=3)
  for i in range(3):
    stack = kvjax.append(stack, *tokens(20, seed=i), layer=i)
  stack = kvjax.evict(stack, 4, layer=1)
  stack = kvjax.migrate(stack, layer=2)
  single = [kvjax.append(kvjax.init(spec_of()), *tokens(20, seed=i)) for i in range(3)]
  single[1] = kvjax.evict(single[1], 4)
  single[2] = kvjax.migrate(single[2])
  for i in range(3):
    for got, want in zip(kvjax.materialize(stack, layer=i), kvjax.materialize(single[i])):
      np.testing.assert_array_equal(got, want)
    assert kvjax.stats(stack)["tail_tokens"][i] == kvjax.stats(single[i])["tail_tokens"]


# 5. Empty batches.

@pytest.mark.parametrize("fmt", ["q4", "q8", "turbo3.5", "turbo2p", "bf16"])
def test_empty_batches_quantize_and_dequantize(fmt):
  for backend in ("jax", "auto"):
    enc = kvjax.quantize(np.zeros((0, 16)), fmt, backend=backend)
    assert kvjax.dequantize(enc, fmt, backend=backend).shape == (0, 16)


# 6. Installing without a C++ compiler.

@pytest.mark.slow
def test_install_without_a_compiler_runs_the_jnp_path(tmp_path):
  target = tmp_path / "site"
  env = dict(os.environ, CXX="/bin/false", CC="/bin/false")
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--no-build-isolation",
       "--no-deps", "--target", str(target), str(ROOT)],
      capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert not list(target.glob("kvjax/ffi/_kvjax_ffi*"))
  # Import the installed copy, not this checkout (whose editable install
  # hooks the import system first).
  script = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, {str(target)!r})
import numpy as np
import kvjax
assert kvjax.__file__.startswith({str(target)!r}), kvjax.__file__
info = kvjax.backend_info()
assert not info["ffi_loaded"] and "not installed" in info["reason"], info
spec = kvjax.CacheSpec(num_kv_heads=1, head_dim=8, capacity=16, tail=2,
                       migrate_batch=2, store="q4")
x = np.ones((5, 1, 8), np.float32)
out = kvjax.attend(kvjax.append(kvjax.init(spec), x, x), np.ones((1, 1, 8), np.float32))
assert np.allclose(out, 1), out
print(info["reason"])
"""
  run = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "C++ extension is not installed" in run.stdout


# 7. An overflow can be acknowledged.

def test_acknowledge_overflow_quiets_check_until_the_next_refusal():
  spec = spec_of(capacity=12, overflow="error")
  full = kvjax.append(kvjax.init(spec), *tokens(15))
  with pytest.raises(OverflowError, match="rejected 3 tokens"):
    kvjax.check(full)
  handled = kvjax.evict(full, 4)
  handled = kvjax.append(handled, *tokens(2, seed=1))
  with pytest.raises(OverflowError):  # the record stays until acknowledged
    kvjax.check(handled)
  handled = jax.jit(kvjax.acknowledge_overflow)(handled)
  kvjax.check(handled)
  assert kvjax.stats(handled)["overflow"] is False
  assert kvjax.stats(handled)["length"] == 14  # nothing else changed
  again = kvjax.append(handled, *tokens(5, seed=2))
  with pytest.raises(OverflowError, match="rejected 3 tokens"):
    kvjax.check(again)
  batch = jax.vmap(kvjax.append)(kvjax.init(spec, batch=2),
                                 np.stack([tokens(15)[0]] * 2), np.stack([tokens(15)[1]] * 2))
  kvjax.check(jax.vmap(kvjax.acknowledge_overflow)(batch))


# 8. check names sequences and layers of a batch of stacks.

def test_check_on_a_batch_of_stacks_names_sequence_and_layer():
  spec = spec_of(capacity=12, overflow="error")
  stacks = kvjax.init(spec, batch=(2, 3))
  assert stacks.length.shape == (2, 3)
  fill = jax.vmap(lambda s, n: kvjax.append(s, *tokens(15), n, layer=1))
  stacks = fill(stacks, jnp.array([15, 4], jnp.int32))
  with pytest.raises(OverflowError, match=r"caches \(sequence, layer\) \[\(0, 1\)\]: \[3\] tokens"):
    kvjax.check(stacks)
  assert kvjax.stats(stacks)["rejected_tokens"] == [[0, 3, 0], [0, 0, 0]]


# 9. Clear errors, and no silently accepted bad arguments.

def test_hot_dtype_accepts_dtypes_and_short_names_canonically():
  base = spec_of()
  for value in (np.dtype("float32"), np.float32, jnp.float32, "f32", "float32"):
    spec = spec_of(hot_dtype=value)
    assert spec.hot_dtype == "float32" and spec == base and hash(spec) == hash(base)
    kvjax.init(spec)
  assert spec_of(hot_dtype=jnp.bfloat16).hot_dtype == spec_of(hot_dtype="bf16").hot_dtype == "bfloat16"
  assert spec_of(hot_dtype=np.float16).hot_dtype == "float16"
  with pytest.raises(ValueError, match="CacheSpec.hot_dtype: must be one of"):
    spec_of(hot_dtype=np.float64)


def test_sizes_accept_numpy_ints_and_reject_what_int32_cannot_hold():
  assert spec_of(capacity=np.int64(512)).capacity == 512
  assert type(spec_of(capacity=np.int64(512)).capacity) is int
  with pytest.raises(ValueError, match=r"CacheSpec.capacity: must be at most 2\*\*31 - 1"):
    spec_of(capacity=2**31 + 5)
  with pytest.raises(ValueError, match="CacheSpec.capacity: must be an int"):
    spec_of(capacity=True)


def test_init_batch_checks_and_batches_of_stacks():
  for batch in (True, 0, 2.0, (2, 0), ()):
    with pytest.raises(ValueError, match="batch: expected a positive int or a tuple"):
      kvjax.init(spec_of(), batch=batch)
  stacks = kvjax.init(spec_of(), batch=(2, 3))
  assert stacks.length.shape == (2, 3) and stacks.store_k.codes.shape[:2] == (2, 3)


def test_attend_takes_a_list_of_positions():
  cache = kvjax.append(kvjax.init(spec_of()), *tokens(6))
  got = kvjax.attend(cache, queries(2), q_pos=[3, 5])
  np.testing.assert_allclose(got, reference_attend(cache, queries(2), [3, 5]),
                             rtol=1e-5, atol=1e-6)


def test_host_functions_say_they_are_host_side():
  cache = kvjax.init(spec_of())
  for fn in (kvjax.stats, kvjax.check):
    with pytest.raises(ValueError, match=r"is a host-side function .*outside them"):
      jax.jit(fn)(cache)


def test_counts_and_windows_must_be_ints():
  cache = kvjax.append(kvjax.init(spec_of()), *tokens(6))
  k, v = tokens(2)
  with pytest.raises(ValueError, match=r"n_valid: expected an int scalar, got 2.7"):
    kvjax.append(cache, k, v, 2.7)
  with pytest.raises(ValueError, match=r"n_valid: expected an int scalar, got True"):
    kvjax.append(cache, k, v, True)
  with pytest.raises(ValueError, match=r"n: expected an int scalar, got 2.5"):
    kvjax.evict(cache, 2.5)
  with pytest.raises(ValueError, match=r"window: expected an int scalar, got 2.5"):
    kvjax.attend(cache, queries(1), window=2.5)
  with pytest.raises(ValueError, match=r"window: expected an int >= 1, got -1"):
    kvjax.attend(cache, queries(1), window=-1)
  with pytest.raises(ValueError, match=r"softcap: expected a number > 0, got 0.0"):
    kvjax.attend(cache, queries(1), softcap=0)
  with pytest.raises(ValueError, match=r"window: expected an int scalar, got a traced float32"):
    jax.jit(lambda c, w: kvjax.attend(c, queries(1), window=w))(cache, 2.0)
  # A traced window <= 0 sees no key (documented).
  out = jax.jit(lambda c, w: kvjax.attend(c, queries(1), window=w))(cache, 0)
  assert (np.asarray(out) == 0).all()


def test_none_gets_the_same_error_everywhere():
  for fn in (kvjax.clear, kvjax.check, kvjax.stats, kvjax.materialize, kvjax.migrate,
             kvjax.acknowledge_overflow, kvjax.length,
             lambda c: kvjax.evict(c, 1), lambda c: kvjax.attend(c, queries(1)),
             lambda c: kvjax.append(c, *tokens(1))):
    with pytest.raises(ValueError, match="cache: expected a kvjax.KVCache, got NoneType"):
      fn(None)


def test_dequantize_says_what_is_wrong_with_the_encoding():
  x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
  q8 = kvjax.quantize(x, "q8")
  with pytest.raises(ValueError, match=r"encoded: these are q8 codes .*as 'q8', not 'q4'"):
    kvjax.dequantize(q8, "q4")
  with pytest.raises(ValueError, match=r"encoded: expected kvjax.TurboCodes for 'turbo4', got Q8Codes"):
    kvjax.dequantize(q8, "turbo4")
  t = kvjax.quantize(np.ones((2, 128), np.float32), "turbo4")
  with pytest.raises(ValueError, match=r"encoded: 14 code bytes per vector is no head_dim of 'turbo4'"):
    kvjax.dequantize(kvjax.TurboCodes(t.codes[:, :14], t.norms), "turbo4")
  with pytest.raises(ValueError, match=r"encoded: expected 1 norms per vector"):
    kvjax.dequantize(kvjax.TurboCodes(t.codes, jnp.concatenate([t.norms] * 2, -1)), "turbo4")
  with pytest.raises(ValueError, match=r"encoded: expected RawValues.data of dtype uint16"):
    kvjax.dequantize(kvjax.RawValues(jnp.ones((2, 16), jnp.bfloat16)), "bf16")
  # Codes built by hand are taken as the format they are given as.
  hand = kvjax.AffineCodes(*q8)
  assert kvjax.dequantize(hand, "q4").shape == (3, 32)


def test_environment_variables_are_reported_not_raised(monkeypatch):
  from kvjax import _backend
  monkeypatch.setenv("KVJAX_BACKEND", "cuda")
  info = kvjax.backend_info()
  assert info["default_backend"] is None
  assert "KVJAX_BACKEND: expected one of ('auto', 'jax', 'ffi')" in info["reason"]
  with pytest.raises(ValueError, match="KVJAX_BACKEND"):
    kvjax.quantize(np.ones((1, 8)), "q8")
  monkeypatch.setenv("KVJAX_BACKEND", "")  # empty means auto, as for KVJAX_ISA
  assert _backend.default_backend() == "auto"
  assert kvjax.backend_info()["default_backend"] == "auto"


def test_describe_traced_and_concrete_values():
  assert _checks.describe(2.5) == "2.5"
  assert _checks.describe(np.zeros((2,), np.int8)) == "a int8 array of shape (2,)"


# 10. The demo checks its arguments before loading anything.

def test_demo_rejects_a_missing_text_before_loading_the_model(capsys, monkeypatch):
  from kvjax import demo
  from kvjax.models import smollm2
  monkeypatch.setattr(smollm2, "load", lambda: pytest.fail("the model was loaded"))
  with pytest.raises(SystemExit) as exit_info:
    demo.main(["--text", "/nonexistent/text.txt"])
  assert exit_info.value.code == 2
  assert "--text: cannot read '/nonexistent/text.txt'" in capsys.readouterr().err


def test_demo_ships_its_default_text():
  from kvjax import demo
  text = pathlib.Path(demo.DEFAULT_TEXT).read_text()
  assert "Apache License" in text and "trademarks" in text
  assert text == (ROOT / "LICENSE").read_text()
