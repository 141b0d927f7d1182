"""`python -m kvjax calibrate`: the policy search against brute force, measured
bits, the policy file, and the demo's policy row."""

import itertools
import json

import numpy as np
import pytest

from kvjax import calibrate
from kvjax import demo

BITS = {"q8": 9.0, "q4": 5.0, "turbo3": 3.5, "turbo2": 2.5}


def brute_force(errors, bits, budget, layers):
  """The exact optimum over every assignment (an independent reference)."""
  names, best = list(bits), None
  for flat in itertools.product(names, repeat=2 * layers):
    choice = list(zip(flat[0::2], flat[1::2]))
    if np.mean([bits[f] for f in flat]) > budget + 1e-9:
      continue
    total = sum(errors["keys"][k][l] + errors["values"][v][l] for l, (k, v) in enumerate(choice))
    if best is None or total < best[0]:
      best = (total, choice)
  return best


def test_choice_is_within_budget_and_the_exact_optimum():
  rng = np.random.default_rng(0)
  layers = 3
  # Errors fall with bits, keys cost more than values, layers differ.
  scale = {"keys": rng.uniform(1, 10, layers), "values": rng.uniform(0.1, 2, layers)}
  errors = {s: {f: list(scale[s] * 2.0 ** -b) for f, b in BITS.items()} for s in scale}
  total = lambda c: sum(errors["keys"][k][l] + errors["values"][v][l] for l, (k, v) in enumerate(c))
  for budget in (3.0, 4.0, 5.0, 6.5):
    choice = calibrate.choose(errors, BITS, budget)
    assert np.mean([BITS[f] for pair in choice for f in pair]) <= budget
    optimum, _ = brute_force(errors, BITS, budget, layers)
    assert total(choice) == pytest.approx(optimum, rel=1e-12), (budget, choice)
    uniform = [f for f, b in BITS.items() if b <= budget]
    assert total(choice) <= min(total([(f, f)] * layers) for f in uniform)


def test_bits_are_measured_from_the_arrays():
  assert calibrate.bits_per_value("q8", 64) == 9.0  # 8 + f32 scale and zero per 64
  assert calibrate.bits_per_value("q4", 128) == 4.5
  assert calibrate.bits_per_value("turbo3.5", 64) == 4.0  # 3.5 + two bf16 norms


def test_calibrate_writes_a_policy_the_demo_runs(tmp_path, capsys):
  out = tmp_path / "policy.json"
  assert calibrate.main(["--bits", "4.0", "--model", "random", "--tokens", "48",
                         "--candidates", "q8,q4,turbo3,turbo2", "--compare", "turbo3",
                         "--out", str(out)]) == 0
  policy = json.loads(out.read_text())
  assert policy["version"] == 1 and len(policy["layers"]) == 4
  chosen = [f for layer in policy["layers"] for f in (layer["keys"], layer["values"])]
  bits = policy["candidate_bits_per_value"]
  assert policy["bits_per_value"] == np.mean([bits[f] for f in chosen]) <= 4.0
  assert set(policy["calibration_kl"]) == {"policy", "turbo3"}
  assert all(len(v) == 4 for side in policy["attention_error"].values() for v in side.values())
  # Errors fall with bits on every layer and side (q8 below turbo2).
  for side in ("keys", "values"):
    assert all(a < b for a, b in zip(policy["attention_error"][side]["q8"],
                                     policy["attention_error"][side]["turbo2"]))
  rows = tmp_path / "rows.json"
  assert demo.main(["--model", "random", "--formats", "f32", "--policy", str(out),
                    "--batch", "1", "--prompt-len", "32", "--new-tokens", "4",
                    "--chunk", "16", "--tail", "8", "--migrate-batch", "4",
                    "--json", str(rows)]) == 0
  table = {r["format"]: r for r in json.loads(rows.read_text())}
  # The row's bits are measured from its caches: the policy's average.
  assert abs(table["policy"]["store_bits"] - policy["bits_per_value"]) < 1e-9
  assert np.isfinite(table["policy"]["kl"])
