"""bench/model_bench.py's host-time table of a decode step (`host_python_per_token`): per token, by function."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "model_bench.py"


def _bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # model_bench imports its bench/ neighbours
    spec = importlib.util.spec_from_file_location("model_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step():
    time.sleep(0.002)


def _setup():
    time.sleep(0.01)


def test_host_time_is_split_per_token_by_function(monkeypatch):
    """The fixed work of a call (the prefill, `_setup`) cancels; each token's function shows once per token with
    its own time."""
    def run(k):
        _setup()
        for _ in range(k):
            _step()

    table = _bench(monkeypatch).host_python_per_token(run, 2, 6, top=5)
    rows = {r["function"].split(":")[-1]: r for r in table["functions"]}
    assert rows["_step"]["calls_per_token"] == 1.0
    sleep = next(r for r in table["functions"] if "time.sleep" in r["function"])
    # ~2 ms a token, not the 10 ms setup; the bounds are wide because a loaded machine's sleeps overshoot, and how
    # much the two runs' setups overshoot differs: that difference lands in the per-token difference
    assert sleep["calls_per_token"] == 1.0 and 1000 < sleep["us_per_token"] < 20000
    assert table["functions"][0] is sleep and table["us_per_token"] > 1000
