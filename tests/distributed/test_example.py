"""The documented torchrun example runs, checkpoints at 2 ranks and resumes at 3."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).parents[2] / "examples" / "fsdp2_train.py"


def torchrun(n: int, *args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(EXAMPLE), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_fsdp2_example_saves_and_resumes_at_another_world_size(tmp_path):
    checkpoint = tmp_path / "ckpt"
    first = torchrun(2, "--steps", "5", "--checkpoint", str(checkpoint))
    assert "step 5: loss" in first and f"saved {checkpoint} at step 5" in first
    second = torchrun(3, "--steps", "10", "--checkpoint", str(checkpoint))
    assert f"resumed from {checkpoint} at step 5 on 3 ranks" in second
    losses = [float(line.split("loss")[1]) for line in second.splitlines() if line.startswith("step 10")]
    assert len(losses) == 1 and math.isfinite(losses[0])
