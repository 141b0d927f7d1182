"""Argument checks shared by the public functions, with their messages.

Every check names the argument and says what was expected; it runs at trace
time, where shapes and dtypes are known (values may be traced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def describe(value) -> str:
  """A short description of `value` for an error message."""
  if isinstance(value, jax.core.Tracer):
    return f"a traced {jnp.result_type(value)} array of shape {jnp.shape(value)}"
  if isinstance(value, (jax.Array, np.ndarray)):
    return f"a {value.dtype} array of shape {value.shape}"
  return repr(value)


def int_scalar(name: str, value):
  """`value` (a Python int or an integer scalar array, may be traced) as
  int32. Floats, bools and arrays of other shapes raise: a float would be
  truncated silently."""
  if isinstance(value, (bool, np.bool_)) or jnp.ndim(value) or not jnp.issubdtype(
      jnp.result_type(value), jnp.integer):
    raise ValueError(f"{name}: expected an int scalar, got {describe(value)}")
  return jnp.asarray(value, jnp.int32)


def positive_int_scalar(name: str, value):
  """`int_scalar`, and a concrete value must be >= 1 (a traced one cannot
  be checked: the caller documents what it then means)."""
  out = int_scalar(name, value)
  if not isinstance(value, jax.core.Tracer) and int(np.asarray(value)) < 1:
    raise ValueError(f"{name}: expected an int >= 1, got {describe(value)}")
  return out


def float_scalar(name: str, value):
  """`value` (a Python number or a float scalar array, may be traced) as
  float32."""
  if isinstance(value, (bool, np.bool_)) or jnp.ndim(value) or not (
      jnp.issubdtype(jnp.result_type(value), jnp.floating)
      or jnp.issubdtype(jnp.result_type(value), jnp.integer)):
    raise ValueError(f"{name}: expected a real scalar, got {describe(value)}")
  return jnp.asarray(value, jnp.float32)


def require_host(tree, fn_name: str) -> None:
  """Host-side functions (`stats`, `check`) read values: not under `jit`."""
  if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree)):
    raise ValueError(
        f"kvjax.{fn_name} is a host-side function (it reads the cache's "
        "counters into Python numbers) and cannot run under jax.jit, vmap or "
        "another transformation; call it on the cache outside them")
