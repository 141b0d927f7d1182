"""`python -m kvjax calibrate`: a per-layer, per-side (keys, values) store
format policy chosen by measurement.

    python -m kvjax calibrate --bits 4.0 [--text FILE] [--out policy.json]
    python -m kvjax demo --policy policy.json      # the policy as a table row

It runs the demo's model (SmolLM2-135M, or `--model random`) over a
calibration text in float32 and records every layer's queries, keys and
values. For each layer, side and candidate format it measures the
attention-output error of storing that side in that format (the rest exact):
`sum ||out - out_ref||^2 / sum ||out_ref||^2` over the text's positions, the
first `--sinks` tokens kept exact as the cache keeps them. One forward pass
per layer and side with that side alone in the `--probe` format gives the
side's next-token KL per unit of attention error, so each candidate's error
becomes a predicted KL. It then picks, per layer and side, the formats with
the lowest total predicted KL whose average bits per value, measured from
the encoded arrays, is at most `--bits` (exactly: a knapsack over the
layer-sides by dynamic programming), and
measures next-token KL against a float32 cache of the chosen policy and of
the uniform candidates near the budget, each through a real kvjax cache over
the same text.

The policy file is plain JSON, one entry per layer:

    {"version": 1, "bits_per_value": 3.98, "layers": [{"keys": "q8",
     "values": "turbo3"}, ...], ...the measurements...}
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import _formats
from kvjax.models import llama

CANDIDATES = ("f32", "bf16", "q8", "q4", "turbo4", "turbo3.5", "turbo3", "turbo2.5",
              "turbo2", "turbo1")
DEFAULT_TEXT = str(pathlib.Path(__file__).resolve().parent / "data" / "calibration.txt")
POLICY_VERSION = llama.POLICY_VERSION
policy_specs = llama.policy_specs  # a policy read back into specs (the demo uses it too)


def bits_per_value(fmt: str, head_dim: int) -> float:
  """Bits per value of `fmt`, measured from its encoded arrays."""
  x = jnp.ones((16, head_dim), jnp.float32)
  enc = _formats.FORMATS[fmt].encode(x)
  return 8.0 * sum(a.nbytes for a in jax.tree.leaves(enc)) / x.size


def roundtrip(fmt: str, x, sinks: int):
  """`x: [L, n, H, D]` as a cache stores it: positions >= `sinks` encoded in
  `fmt` (split formats: each head's channel order from its first non-sink
  token), the sinks exact."""
  f = _formats.FORMATS[fmt]
  order = f.outlier_order(x[:, sinks]) if f.split else None  # [L, H, D]
  order = None if order is None else order[:, None]
  y = f.decode(f.encode(x, order), order)
  keep = (jnp.arange(x.shape[1]) < sinks)[None, :, None, None]
  return jnp.where(keep, x, y)


@jax.jit
def _attention(q, k, v):
  """Causal attention of one layer: q `[n, Hq, D]`, k, v `[n, H, D]`."""
  n, hq, d = q.shape
  group = hq // k.shape[1]
  k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
  s = jnp.einsum("qhd,khd->hqk", q, k, precision="highest") / math.sqrt(d)
  causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
  p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
  return jnp.einsum("hqk,khd->qhd", p, v, precision="highest")


@jax.jit
def _relative_error(out, ref):
  return jnp.sum((out - ref) ** 2) / jnp.sum(ref ** 2)


def attention_errors(q, k, v, candidates, sinks):
  """`{side: {format: [L] relative errors}}` for side "keys" and "values"."""
  layers = q.shape[0]
  ref = [_attention(q[l], k[l], v[l]) for l in range(layers)]
  out = {"keys": {}, "values": {}}
  for fmt in candidates:
    kq, vq = roundtrip(fmt, k, sinks), roundtrip(fmt, v, sinks)
    out["keys"][fmt] = [float(_relative_error(_attention(q[l], kq[l], v[l]), ref[l]))
                        for l in range(layers)]
    out["values"][fmt] = [float(_relative_error(_attention(q[l], k[l], vq[l]), ref[l]))
                          for l in range(layers)]
  return out


def kl_sensitivity(params, config, tokens, k, v, probe: str, sinks: int, errors):
  """`{side: [L]}`: next-token KL against float32 per unit of attention
  error, each layer's side alone through `probe` (one forward pass each, the
  model's own float32 attention elsewhere): the factor that turns a
  format's measured attention error into its predicted KL."""
  layers = config.n_layers
  forward = jax.jit(lambda o: jax.nn.log_softmax(
      llama.forward_without_cache(params, config, tokens, o)))
  no = jnp.zeros(layers, bool)
  ref = forward((k, v, no, no))
  p_ref = jnp.exp(ref)
  kq, vq = roundtrip(probe, k, sinks), roundtrip(probe, v, sinks)
  out = {"keys": [], "values": []}
  for l in range(layers):
    one = no.at[l].set(True)
    for side, override in (("keys", (kq, v, one, no)), ("values", (k, vq, no, one))):
      kl = float(jnp.mean(jnp.sum(p_ref * (ref - forward(override)), -1)))
      out[side].append(max(kl, 0.0) / max(errors[side][probe][l], 1e-30))
  return out


def choose(errors, bits, budget, quantum=1 / 256):
  """Per layer `(key format, value format)` minimizing the summed errors
  (`errors[side][format][layer]`, e.g. predicted KL) with average bits per
  value (over layers and sides) at most `budget`: exact, by dynamic
  programming over the layer-sides with bit costs rounded up to `quantum`
  (a multiple-choice knapsack)."""
  sides = ("keys", "values")
  layers = len(next(iter(errors["keys"].values())))
  names = list(bits)
  items = [(s, l) for l in range(layers) for s in sides]
  cost = {f: int(math.ceil(bits[f] / quantum - 1e-9)) for f in names}
  capacity = int(math.floor(budget * len(items) / quantum + 1e-9))
  if min(cost.values()) * len(items) > capacity:
    raise ValueError(f"--bits: no assignment of {names} reaches {budget} bits per value "
                     f"(the cheapest is {min(bits.values()):.2f})")
  best = np.full(capacity + 1, np.inf)  # least error of the items so far at each total cost
  best[0] = 0.0
  picks = []
  for side, layer in items:
    new = np.full(capacity + 1, np.inf)
    pick = np.full(capacity + 1, -1)
    for k, f in enumerate(names):
      c = cost[f]
      if c > capacity:
        continue
      trial = best[:capacity + 1 - c] + errors[side][f][layer]
      better = trial < new[c:]
      new[c:] = np.where(better, trial, new[c:])
      pick[c:] = np.where(better, k, pick[c:])
    best = new
    picks.append(pick)
  total = int(np.argmin(best))
  chosen = {}
  for (side, layer), pick in zip(reversed(items), reversed(picks)):
    f = names[pick[total]]
    chosen[side, layer] = f
    total -= cost[f]
  return [tuple(chosen[s, l] for s in sides) for l in range(layers)]


def cache_kl(work_params, config, tokens, specs_by_name, chunk=128):
  """Next-token KL of each cache (name -> per-layer specs) against a float32
  cache, over every position of `tokens` (prefill in chunks)."""
  n = tokens.shape[0]
  padded = np.zeros(-(-n // chunk) * chunk, np.int32)
  padded[:n] = tokens

  def logits_of(specs):
    caches = llama.init_caches(config, specs)
    step = jax.jit(lambda c, t, m: llama.forward(work_params, config, c, t, m),
                   donate_argnums=0)
    out = []
    for start in range(0, len(padded), chunk):
      logits, caches = step(caches, padded[start:start + chunk],
                            np.int32(min(chunk, n - start)))
      out.append(np.asarray(jax.nn.log_softmax(logits)))
    return np.concatenate(out)[:n]

  results = {}
  reference = None
  for name, specs in specs_by_name.items():
    logp = logits_of(specs)
    if reference is None:
      reference = logp
    p = np.exp(reference)
    results[name] = float(np.mean(np.sum(p * (reference - logp), -1)))
  return results


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m kvjax calibrate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--bits", type=float, required=True,
                 help="average store bits per value the policy may use (measured)")
  p.add_argument("--text", default=DEFAULT_TEXT, help="calibration text (default: "
                 "kvjax/data/calibration.txt, held out from the demo's text)")
  p.add_argument("--out", default="policy.json", help="policy file (default: %(default)s)")
  p.add_argument("--model", default="smollm2", choices=["smollm2", "random"])
  p.add_argument("--tokens", type=int, default=1024, help="calibration tokens")
  p.add_argument("--sinks", type=int, default=4, help="tokens kept exact (the demo's sinks)")
  p.add_argument("--candidates", default=",".join(CANDIDATES))
  p.add_argument("--probe", default="turbo2",
                 help="format whose effect on KL, layer by layer, calibrates the "
                 "attention errors (default: %(default)s)")
  p.add_argument("--compare", default="q4,turbo4,turbo3.5",
                 help="uniform formats whose KL is measured beside the policy's")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
  unknown = [c for c in candidates if c not in _formats.FORMATS]
  if unknown:
    p.error(f"--candidates: unknown {unknown}")
  started = time.perf_counter()
  if args.model == "random":
    from kvjax import demo
    work = demo.random_workload(argparse.Namespace(prompt_len=args.tokens, batch=1,
                                                   new_tokens=1))
    config, params = work.config, work.params
    tokens = work.prompts[0][:args.tokens]
    model_name = work.name
  else:
    from kvjax.models import smollm2
    config, params, tokenizer = smollm2.load()
    with open(args.text, encoding="utf-8", errors="replace") as f:
      tokens = np.asarray(tokenizer.encode(f.read()), np.int32)[:args.tokens]
    model_name = "SmolLM2-135M-Instruct"
  params = jax.device_put(params)
  print(f"kvjax calibrate: {model_name}, {len(tokens)} tokens of {args.text}", flush=True)
  q, k, v = jax.jit(lambda t: llama.attention_inputs_per_layer(params, config, t))(tokens)
  bits = {f: bits_per_value(f, config.head_dim) for f in candidates}
  errors = attention_errors(q, k, v, candidates, args.sinks)
  probe = args.probe
  weight = kl_sensitivity(params, config, tokens, k, v, probe, args.sinks, errors)
  predicted = {side: {f: [w * e for w, e in zip(weight[side], errors[side][f])]
                      for f in candidates} for side in errors}
  choice = choose(predicted, bits, args.bits)
  achieved = float(np.mean([bits[f] for pair in choice for f in pair]))
  print("\nattention-output error per layer (keys | values), chosen formats marked *:")
  print("(KL per unit error, keys | values: " + ", ".join(
      f"{a:.2g}|{b:.2g}" for a, b in zip(weight["keys"], weight["values"])) + ")")
  head = "layer | " + " | ".join(f"{c} ({bits[c]:.1f}b)" for c in candidates)
  print(head)
  for l, (fk, fv) in enumerate(choice):
    cells = [f"{errors['keys'][c][l]:.1e}{'*' if c == fk else ' '}|"
             f"{errors['values'][c][l]:.1e}{'*' if c == fv else ' '}" for c in candidates]
    print(f"{l:5d} | " + " | ".join(cells))
  spec_kwargs = dict(capacity=-(-len(tokens) // 128) * 128 + 128, tail=32, migrate_batch=32,
                     sinks=args.sinks, hot_dtype="bfloat16")
  policy = {"version": POLICY_VERSION, "model": model_name, "text": args.text,
            "tokens": int(len(tokens)), "budget_bits_per_value": args.bits,
            "bits_per_value": achieved,
            "layers": [{"keys": fk, "values": fv} for fk, fv in choice],
            "candidate_bits_per_value": bits,
            "attention_error": errors, "kl_per_attention_error": weight,
            "probe": probe}
  caches = {"f32": [llama.cache_spec(config, store="f32", **{**spec_kwargs,
                                                             "hot_dtype": "float32"})]
            * config.n_layers,
            "policy": policy_specs(policy, config, **spec_kwargs)}
  for name in [c.strip() for c in args.compare.split(",") if c.strip()]:
    caches[name] = [llama.cache_spec(config, store=name, **spec_kwargs)] * config.n_layers
  kl = cache_kl(params, config, tokens, caches)
  policy["calibration_kl"] = {name: kl[name] for name in caches if name != "f32"}
  with open(args.out, "w") as f:
    json.dump(policy, f, indent=1)
  print(f"\npolicy: {achieved:.3f} bits per value (budget {args.bits}); next-token KL "
        "against a float32 cache on the calibration text:")
  for name, value in policy["calibration_kl"].items():
    measured = achieved if name == "policy" else bits_per_value(name, config.head_dim)
    print(f"  {name:>9}: {value:.3e}  ({measured:.2f} bits)")
  print(f"wrote {args.out} ({time.perf_counter() - started:.0f}s)")
  return 0
