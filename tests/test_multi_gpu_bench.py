"""bench/multi_gpu.py end to end on the CPU (`--smoke`: tiny model, 1 process vs 2 gloo DDP processes).

The GPU run of this script is what issue 9's results come from; here it must run through and show what
it is meant to measure: the same seed and global batch give the same curves on 1 and on 2 processes,
and both DDP replicas end with the same router.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")),
                    reason="accelerate CLI not installed")
def test_multi_gpu_bench_smoke(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "multi_gpu.py"), "--smoke", "--stage", "1", "--steps", "4",
           "--seq-len", "128", "--micro-batch", "1", "--logging-steps", "1", "--warmup", "1", "--text-mb", "0.3",
           "--fit-blocks", "2", "--calibration-blocks", "2", "--work", str(tmp_path / "work"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [runs[f"stage1_{m}"]["returncode"] for m in ("1gpu", "ddp")] == [0, 0], runs
    assert runs["stage1_ddp"]["world_size"] == 2 and runs["stage1_ddp"]["global_step"] == 4
    assert runs["stage1_ddp"]["router_same_across_ranks"]
    diff = report["summary"]["stage1"]["ddp_vs_1gpu"]
    assert len(runs["stage1_1gpu"]["curves"]["align_loss"]) == 4
    assert diff["align_loss"]["max_abs_diff"] < 1e-4 and diff["loss"]["max_abs_diff"] < 1e-4, diff
    assert runs["stage1_ddp"]["throughput"]["tokens_per_s_per_gpu"] > 0
