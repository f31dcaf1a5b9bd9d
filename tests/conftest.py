"""pytest setup shared by the whole suite.

Under pytest-xdist (`-n N`, the README test command) every worker is its own process on the same cores: each keeps
torch (and the subprocesses its tests start, through OMP_NUM_THREADS) to one intra-op thread, so N workers use N
threads instead of N x cores. A plain `pytest` run (no xdist) is left as it was.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
