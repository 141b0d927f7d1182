"""Sharded caches (`kvjax.cache_sharding`, `kvjax.shard`): the shardings'
layout in process; on 8 simulated CPU devices (tests/sharding_check.py in a
subprocess) every transform of every store format bit-identical to one
device, attend's jnp path within the kernel's tolerance (XLA partitions its
reductions), the decode step free of cache-sized collectives and copies,
bytes per device the total over the shards, the paged pool over heads, the
demo's model decoding a sharded batch as one device does; the same across
two processes joined by `jax.distributed` over 127.0.0.1."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

import kvjax
from tests import sharding_check

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOLERANCE = 5e-5  # the kernel's, against float64 attention (docs/attention.md)
# Metadata (counters, channel orders) is replicated or sharded with the batch:
# bytes per device may exceed total / shards by this much.
METADATA_BYTES = 1024


def one_device_mesh():
  return jax.make_mesh((1, 1), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def specs(tree):
  return {jax.tree_util.keystr(path): s.spec for path, s in
          jax.tree_util.tree_leaves_with_path(tree)}


def test_layout_of_every_leaf():
  spec = kvjax.CacheSpec(num_kv_heads=4, head_dim=16, capacity=32, tail=8,
                         migrate_batch=8, store="turbo3.5")
  mesh = one_device_mesh()
  batch = specs(kvjax.cache_sharding(kvjax.init(spec, batch=2), mesh,
                                     batch_axis="data", head_axis="model"))
  assert batch[".tail_k.data"] == P("data", "model", None, None)
  assert batch[".store_k.codes"] == P("data", "model", None, None)
  assert batch[".store_order"] == P("data", None, "model", None)
  assert batch[".length"] == P("data")
  stacks = specs(kvjax.cache_sharding(kvjax.init(spec, batch=(2, 3)), mesh,
                                      batch_axis="data", head_axis="model"))
  assert stacks[".store_k.codes"] == P("data", None, "model", None, None)
  assert stacks[".length"] == P("data", None)
  model = specs(kvjax.cache_sharding(kvjax.init_layers([spec] * 2, batch=2), mesh,
                                     batch_axis="data"))
  assert model[".runs[0].store_v.norms"] == P("data", None, None, None, None)
  pool = specs(kvjax.cache_sharding(kvjax.paged.init(kvjax.PagedSpec(
      num_kv_heads=4, head_dim=16, store="q4")), mesh, head_axis="model"))
  assert pool[".pages_k.codes"] == P(None, "model", None, None)
  assert pool[".sink_v.data"] == P(None, "model", None, None)
  assert pool[".page_table"] == P(None, None)
  with pytest.raises(ValueError, match="Explicit.*axis_types"):
    kvjax.cache_sharding(kvjax.init(spec, batch=2), jax.make_mesh(
        (1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)), batch_axis="data")
  placed = kvjax.shard(kvjax.init(spec, batch=2), mesh, batch_axis="data")
  assert all(isinstance(x.sharding, jax.sharding.NamedSharding)
             for x in jax.tree.leaves(placed))


def run_check(args, devices):
  env = {**os.environ,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen([sys.executable, "-m", "tests.sharding_check", *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def result_of(proc, timeout=900):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight_devices():
  return result_of(run_check([], 8))


def assert_cases_match(caches):
  for name, case in caches.items():
    assert case["cache"] and case["materialize"] and case["clear"], name
    assert case["attend"][0], name  # the kernel, per shard: bit-identical
    assert case["attend_relative_difference"] <= TOLERANCE, name
    assert case["step_collectives"] == 0 and not case["step_big_ops"], (name, case)
    assert case["step_kernel_calls"] >= 1, name  # the kernels ran sharded
    # Every layout splits the cache 8 ways (2 x 4 mesh).
    assert case["bytes_per_device"] <= case["bytes_total"] / 8 + METADATA_BYTES, name


def test_every_kind_of_store_and_layout_matches_one_device(eight_devices):
  """Raw, affine, TurboQuant (whole, split, prod) and mixed stores; every
  format in every layout: `python -m tests.sharding_check --every`."""
  caches = eight_devices["caches"]
  assert eight_devices["devices"] == 8
  assert len(caches) == len(sharding_check.CASES)
  assert {n.split("@")[1] for n in caches} == set(sharding_check.LAYOUTS)
  assert_cases_match(caches)
  # The detector sees the all-gathers of a step that returns the cache
  # replicated: an empty list above means something.
  assert next(iter(caches.values()))["gathering_step_big_ops"] > 0


def test_paged_pool_over_heads(eight_devices):
  for store, case in eight_devices["paged"].items():
    assert case["pool"] and case["attend"] and not case["big_ops"], store
    # 2 x 4 mesh, heads over the 4: each device holds a quarter of the pages.
    assert case["page_bytes_per_device"] * 4 == case["page_bytes_total"], store


def test_model_decodes_a_sharded_batch_as_one_device(eight_devices):
  model = eight_devices["model"]["2d"]
  assert model["tokens"]
  # Heads sharded: the output projection sums the heads in another order
  # (the caches then hold keys a rounding away): logits within 1e-4.
  assert model["logits_relative_difference"] < 1e-4


def test_bad_input_raises_clearly(eight_devices):
  errors = eight_devices["errors"]
  assert "2 KV heads cannot be split evenly over mesh axis 'model' of size 4" in errors["heads"]
  assert "3 sequences cannot be split evenly over mesh axis 'data'" in errors["batch"]
  assert "no batch axis" in errors["no_batch"]
  assert "'tensor' is not an axis of the mesh" in errors["axis"]
  assert "shared between its sequences" in errors["paged_batch"]
  assert "expected a kvjax.KVCache, ModelCache or PagedCache" in errors["not_a_cache"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_over_loopback_match_one_device():
  port = str(free_port())
  procs = [run_check(["--process-id", str(i), "--port", port], 4) for i in range(2)]
  results = [result_of(p) for p in procs]
  for r in results:
    assert r["processes"] == 2 and r["devices"] == 8
    assert len(r["caches"]) == 1
    assert_cases_match(r["caches"])
    assert r["model"]["2d"]["tokens"]
    assert r["model"]["2d"]["logits_relative_difference"] < 1e-4
