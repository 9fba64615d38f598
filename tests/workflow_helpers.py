"""Running Snakemake on the generated demo in a temporary working directory (shared by tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile")]
# Small enough for CI on 2 cores: 2 tiles per slide through Virchow2 (ViT-H on CPU), 2 GPU batches.
FAST_CONFIG = (
    "eagle:\n  top_k: 2\nfeatures:\n  n_batches: 2\n"
    "heads:\n  fewshot:\n    repeats: 2\n  bootstrap:\n    n: 100\n"
)
FAST = ["--configfile", "config/config.yaml", "config/fast.yaml"]


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run (rule -> count), empty if nothing is planned."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    if "Job stats:" not in lines:
        return counts
    for line in lines[lines.index("Job stats:") + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def make_demo_workdir(work: Path) -> Path:
    """A working directory with the generated demo cohort and the config (plus fast overrides)."""
    from eagleflow.demo import make_demo_cohort

    make_demo_cohort(work / "resources" / "demo", seed=0)
    (work / "config").mkdir(exist_ok=True)
    for name in ("config.yaml", "comparison.yaml"):
        shutil.copy(REPO / "config" / name, work / "config" / name)
    (work / "config" / "fast.yaml").write_text(FAST_CONFIG)
    return work
