"""Shared benchmark helpers: interleaved timing and JSON output.

Machines here are noisy, so every benchmark measures the things it compares
side by side in one run, alternating between them, and reports ratios of
medians.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def time_steps(step, state, args, *, steps: int) -> tuple[float, object]:
  """Seconds per call of `state = step(state, *args)`, over `steps` calls."""
  start = time.perf_counter()
  for _ in range(steps):
    state = step(state, *args)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / steps, state


# Before every timed window: a candidate's background work (XLA:CPU frees a
# call's buffers after its result is ready) must not land in the next one's
# window. After `jax.nn.dot_product_attention` at 32k tokens, whose
# intermediates are hundreds of MB, the next 40 ms of kernel calls ran at
# half speed (8-12 ms a call instead of 4.6-5.0; after a 50 ms pause,
# 4.8-5.6). Then one untimed call, so that the window sees the steady state
# of a decoding loop, not threads waking from the pause (at 1k tokens that
# first call cost dense attention 1.2-2.1 ms and the kernel 0.6-1.1).
SETTLE_SECONDS = 0.1


def interleaved(candidates: dict, *, rounds: int, steps: int) -> dict:
  """Median seconds per step of each candidate, measured in alternation.

  `candidates` maps a name to `(step, state, args)`; state is threaded
  through (donated steps consume it). Every window starts after a pause of
  SETTLE_SECONDS and one untimed step.
  """
  states = {name: c[1] for name, c in candidates.items()}
  for name, (step, _, args) in candidates.items():  # compile and warm up
    _, states[name] = time_steps(step, states[name], args, steps=3)
  samples = {name: [] for name in candidates}
  for _ in range(rounds):
    for name, (step, _, args) in candidates.items():
      time.sleep(SETTLE_SECONDS)
      _, states[name] = time_steps(step, states[name], args, steps=1)
      seconds, states[name] = time_steps(step, states[name], args, steps=steps)
      samples[name].append(seconds)
  return {name: statistics.median(s) for name, s in samples.items()}


def write(name: str, payload: dict) -> pathlib.Path:
  RESULTS.mkdir(exist_ok=True)
  payload = dict(payload, machine=dict(
      processor=platform.processor() or platform.machine(),
      cpus=os.cpu_count(), jax=jax.__version__,
      device=str(jax.devices()[0])))
  path = RESULTS / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1))
  print(f"wrote {path}")
  return path
