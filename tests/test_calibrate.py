"""`python -m kvjax calibrate`: the policy search against brute force, measured
bits, the policy file, and the demo's policy row."""

import itertools
import json

import jax
import numpy as np
import pytest

from kvjax import calibrate
from kvjax import demo
from kvjax.models import llama

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
                         "--tail", "8", "--migrate-batch", "4", "--refine", "0",
                         "--min-context", "16", "--out", str(out)]) == 0
  policy = json.loads(out.read_text())
  assert policy["version"] == 1 and len(policy["layers"]) == 4
  assert policy["min_context"] == 16
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


def test_policy_model_is_decoding_through_real_caches():
  """The measured-KL model (formats applied inside a cache-free forward,
  sinks and hot tail read exactly per `exact_keys`) gives the logits of
  decoding token by token through kvjax caches of those formats."""
  config = llama.LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=16, ffn_dim=96, tie_embeddings=False)
  params = llama.random_params(config, jax.random.key(1))
  n, sinks, tail, batch = 30, 2, 4, 3
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (n,), 0, config.vocab_size))
  formats = ["q8", "q4", "turbo3.5"]
  policy = [("turbo3.5", "q4"), ("q4", "q8")]
  specs = [llama.cache_spec(config, capacity=40, tail=tail, migrate_batch=batch, sinks=sinks,
                            hot_dtype="float32", store=pair) for pair in policy]
  caches = llama.init_caches(config, specs)
  step = jax.jit(lambda c, t: llama.forward(params, config, c, t))
  got = []
  for t in range(n):
    logits, caches = step(caches, tokens[t:t + 1])
    got.append(jax.nn.log_softmax(logits[0]))
  exact = calibrate.exact_keys(n, sinks, tail, batch)
  logp = calibrate.policy_logits(params, config, tokens, formats, sinks, exact)
  want = logp([formats.index(k) for k, _ in policy], [formats.index(v) for _, v in policy])
  np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-4)
  # The store matters: without the formats the logits differ.
  exact_model = logp([-1, -1], [-1, -1])
  assert np.max(np.abs(np.stack(got) - exact_model)) > 1e-3
  # The tail keeps the newest `tail` tokens and migrates `batch` at a time.
  hot = [int(np.sum(exact[i, sinks:i + 1])) for i in range(n)]
  assert hot[:tail + 1] == [0, 0, 1, 2, 3] and max(hot) == tail + batch - 1
  assert min(hot[sinks + tail:]) == tail
  # `start`: the KL over the later positions only (a numpy KL over the logits).
  ik, iv = [formats.index(k) for k, _ in policy], [formats.index(v) for _, v in policy]
  late = calibrate.policy_kl(params, config, tokens, formats, sinks, exact, start=20)
  ref, got = np.asarray(exact_model, np.float64)[20:], np.asarray(want, np.float64)[20:]
  assert late(ik, iv) == pytest.approx(np.mean(np.sum(np.exp(ref) * (ref - got), -1)),
                                       rel=1e-4)


def test_min_context_must_leave_positions_to_measure():
  with pytest.raises(SystemExit):
    calibrate.main(["--bits", "4.0", "--model", "random", "--tokens", "16",
                    "--min-context", "16"])


def test_refine_stays_within_budget_and_never_keeps_a_worse_measured_kl():
  rng = np.random.default_rng(1)
  layers, formats = 3, list(BITS)
  scale = {"keys": rng.uniform(1, 10, layers), "values": rng.uniform(0.1, 2, layers)}
  errors = {s: {f: list(scale[s] * 2.0 ** -b) for f, b in BITS.items()} for s in scale}

  def kl(key_index, value_index):  # not additive: a saturating sum
    total = sum(errors["keys"][formats[i]][l] + errors["values"][formats[j]][l]
                for l, (i, j) in enumerate(zip(key_index, value_index)))
    return total / (1 + 0.5 * total)

  start = [("turbo3", "turbo3")] * layers  # 3.5 bits: a poor start under 5.0
  index = lambda c, s: [formats.index(p[s]) for p in c]
  choice, best, history = calibrate.refine(kl, start, formats, errors, BITS, 5.0, rounds=3,
                                           log=lambda *_: None)
  assert np.mean([BITS[f] for pair in choice for f in pair]) <= 5.0
  assert history[0] == kl(index(start, 0), index(start, 1))
  assert best == kl(index(choice, 0), index(choice, 1)) < history[0]
  assert all(b < a for a, b in zip(history, history[1:-1]))  # every kept round improved
  optimum, _ = brute_force(errors, BITS, 5.0, layers)  # additive optimum, same order
  assert best == pytest.approx(optimum / (1 + 0.5 * optimum), rel=1e-9)
