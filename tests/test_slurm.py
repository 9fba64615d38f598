"""profiles/slurm on a real (one-node) SLURM cluster, and how `--profile slurm` finds the profile.

The SLURM test installs Debian's slurmctld, slurmd, slurm-client and munge if they are missing
(root and apt-get needed; otherwise it is skipped with the reason), starts a private cluster
(tests/slurm/harness.py: partitions test_cpu and test_gpu, one counted GPU, no accounting), runs the
demo through profiles/slurm and through a plain local run, and checks that every non-local rule ran
as SLURM jobs (GPU rules with a GPU), that the per-slide rules went out as job arrays and that both
runs wrote the same H5 contents. The per-rule SLURM job counts are printed (pytest -s) and written
to <tmp>/slurm_job_counts.txt.

The test's copy of the profile differs from profiles/slurm only in the partition names, the status
command (squeue: no slurmdbd here) and a shorter first status check; the test asserts that.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import pytest
import yaml
from workflow_helpers import FAST, REPO, SNAKEMAKE, make_demo_workdir

PROFILE = REPO / "profiles" / "slurm"
GPU_RULES = ("features_encode_tiles", "eagle_embed_topk", "slide_encoders_encode_bags")
COMPARISON = "config/comparison.yaml"
PER_SLIDE_RULES = ("tiling_tile_slide",)  # the profile's slurm-array-jobs


def _load_harness():
    spec = importlib.util.spec_from_file_location(
        "eagle_slurm_harness", REPO / "tests" / "slurm" / "harness.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def _profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def _env(**extra: str) -> dict[str, str]:
    # Jobs run `python -m snakemake` with the PATH of the submitting process (--export=ALL).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PYTHONHASHSEED": "0", "PATH": path, **extra}


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints before it runs: jobs per rule."""
    lines = output.split("Job stats:", 1)[1].splitlines()[3:]
    table = {}
    for line in lines:
        if not line.strip():
            break
        rule, count = line.split()
        table[rule] = int(count)
    return table


def h5_digests(workdir: Path) -> dict[str, str]:
    """content_sha256 of every results/**/*.h5, by path relative to the working directory."""
    digests = {}
    for path in sorted((workdir / "results").rglob("*.h5")):
        with h5py.File(path, "r") as h5:
            digests[str(path.relative_to(workdir))] = str(h5.attrs["content_sha256"])
    return digests


# --- the profile itself (no SLURM needed) ---------------------------------------------------------


def test_profile_requests_gpus_and_arrays_and_no_default_profile():
    profile = _profile()
    assert profile["executor"] == "slurm"
    assert "software-deployment-method" not in profile and "sdm" not in profile
    assert "slurm-status-command" not in profile  # sacct is right where slurmdbd runs
    assert "slurm_account" not in profile["default-resources"]
    for key in ("slurm_partition", "mem_mb", "runtime"):
        assert key in profile["default-resources"]
    for rule in GPU_RULES:
        resources = profile["set-resources"][rule]
        assert resources["gpu"] == 1 and resources["cpus_per_gpu"] >= 1
        assert resources["slurm_partition"] != profile["default-resources"]["slurm_partition"]
    assert set(profile["slurm-array-jobs"].split(",")) == set(PER_SLIDE_RULES)
    assert profile["jobs"] == "unlimited"  # array mode needs whole waves (plugin issue #473)
    # profiles/default would be loaded implicitly and override --profile slurm key by key.
    assert not (REPO / "profiles" / "default").exists()


def test_profile_is_found_by_name(tmp_path):
    """`snakemake --profile slurm` with the link that `make setup` puts into ~/.config/snakemake."""
    work = make_demo_workdir(tmp_path / "work")
    config_home = tmp_path / "xdg"
    (config_home / "snakemake").mkdir(parents=True)
    (config_home / "snakemake" / "slurm").symlink_to(PROFILE)
    result = subprocess.run(
        # with the comparison config, so that every rule the profile names is planned
        [*SNAKEMAKE, "--profile", "slurm", "-n", "--directory", str(work), *FAST, COMPARISON],
        cwd=work,
        env=_env(XDG_CONFIG_HOME=str(config_home)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    cpu = _profile()["default-resources"]["slurm_partition"]
    gpu = _profile()["set-resources"]["features_encode_tiles"]["slurm_partition"]
    blocks = {
        block.split(":", 1)[0].strip(): block
        for block in re.split(r"\n(?:localrule|rule) ", output)[1:]
    }
    assert f"slurm_partition={cpu}" in blocks["tiling_tile_slide"]
    for rule in GPU_RULES:
        assert f"slurm_partition={gpu}" in blocks[rule] and "gpu=1" in blocks[rule]
    # Every rule the profile names exists (a renamed rule would silently lose its settings).
    named = {*_profile()["set-resources"], *_profile()["slurm-array-jobs"].split(",")}
    assert named <= set(blocks), named - set(blocks)


# --- the demo on a real SLURM cluster -------------------------------------------------------------


class Run:
    """A Snakemake run in the background, output to a log file."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.args, self.log, self.started = args, log, time.monotonic()
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.seconds = 0.0

    def wait(self, timeout: float) -> str:
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.stop()
        self.seconds = time.monotonic() - self.started
        text = self.log.read_text(errors="replace")
        code = self.process.returncode
        assert code == 0, f"{' '.join(self.args)} failed ({code}):\n{text[-8000:]}"
        return text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # Snakemake cancels its SLURM jobs on SIGTERM
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The plain local run (--cores 2), started first: it runs while SLURM is installed and used."""
    try:
        harness.check_possible()
    except harness.SlurmUnavailableError as reason:
        pytest.skip(f"no SLURM test cluster: {reason}")
    base = tmp_path_factory.mktemp("local")
    work = make_demo_workdir(base / "work")
    run = Run(
        [*SNAKEMAKE, "--cores", "2", "--directory", str(work), *FAST],
        cwd=work,
        env=_env(),
        log=base / "local.log",
    )
    run.workdir = work
    yield run
    run.stop()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("slurm-daemon-logs")
    try:
        cluster = harness.start(log=print)
    except harness.SlurmUnavailableError as reason:
        pytest.skip(f"no SLURM test cluster: {reason}")
    yield cluster
    shutil.copytree(cluster.state / "log", logs, dirs_exist_ok=True)
    harness.stop(cluster.state)


def _test_profile(directory: Path) -> Path:
    """profiles/slurm with only the partitions, the status command and the first check changed."""
    profile = _profile()
    cpu = profile["default-resources"]["slurm_partition"]
    profile["default-resources"]["slurm_partition"] = harness.CPU_PARTITION
    for resources in profile["set-resources"].values():
        if "slurm_partition" in resources:
            assert resources["slurm_partition"] != cpu
            resources["slurm_partition"] = harness.GPU_PARTITION
    profile["slurm-status-command"] = "squeue"  # no slurmdbd: sacct cannot answer
    profile["slurm-init-seconds-before-status-checks"] = 5

    def without_partitions(p: dict) -> dict:
        return {
            **p,
            "default-resources": _drop(p["default-resources"], "slurm_partition"),
            "set-resources": {
                r: _drop(v, "slurm_partition") for r, v in p["set-resources"].items()
            },
        }

    original = without_partitions(_profile())
    changed = without_partitions(profile)
    assert {k: v for k, v in changed.items() if original.get(k) != v} == {
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 5,
    }
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return directory


def _drop(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _sbatch_wrapper(bindir: Path, log: Path) -> None:
    """An `sbatch` first on PATH that logs its arguments as JSON and execs the real one."""
    real = harness.which("sbatch")  # the real one: SLURM_CONF comes from the environment
    bindir.mkdir(parents=True)
    wrapper = bindir / "sbatch"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as out:\n"
        "    out.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n"
    )
    wrapper.chmod(0o755)


def _rule_of(comment: str) -> str:
    match = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment)
    assert match, comment
    return match.group(1)


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _scontrol_jobs(cluster, workdir: Path) -> list[dict[str, str]]:
    """SLURM's own record of every job (array tasks one by one) that ran in `workdir`."""
    jobs = []
    for line in cluster.run("scontrol", "show", "job", "--oneliner").splitlines():
        fields = re.split(r" +(?=[A-Za-z:/]+=)", line.strip())
        record = {k: v.strip() for k, v in (f.split("=", 1) for f in fields if "=" in f)}
        if record.get("WorkDir") == str(workdir):
            jobs.append(record)
    return jobs


@pytest.mark.slurm
def test_demo_on_slurm_matches_local_run(local_run, slurm_cluster, tmp_path):
    started = time.monotonic()
    work = make_demo_workdir(tmp_path / "slurm")
    profile = _test_profile(tmp_path / "profile")
    sbatch_log = tmp_path / "sbatch_calls.jsonl"
    _sbatch_wrapper(tmp_path / "bin", sbatch_log)
    env = _env(SLURM_CONF=str(slurm_cluster.conf))
    env["PATH"] = os.pathsep.join([str(tmp_path / "bin"), str(slurm_cluster.bin), env["PATH"]])
    on_slurm = Run(
        [*SNAKEMAKE, "--profile", str(profile), "--directory", str(work), *FAST],
        cwd=work,
        env=env,
        log=tmp_path / "slurm.log",
    )
    try:
        local_log = local_run.wait(timeout=1500)
        slurm_log = on_slurm.wait(timeout=max(60.0, 1500 - (time.monotonic() - started)))
    finally:
        on_slurm.stop()  # cancels its SLURM jobs if the local run failed first
    # The Snakefile's localrules run in the submitting Snakemake; every other job must be SLURM's.
    local_rules = set(re.findall(r"^localrule (\w+):", slurm_log, flags=re.MULTILINE))
    expected = {
        rule: n
        for rule, n in job_stats(local_log).items()
        if rule not in local_rules and rule != "total"
    }
    assert "all" in local_rules and "embeddings_collect" in local_rules

    # What was submitted: one sbatch per array (per-slide rules) or per job (batch rules).
    calls = [json.loads(line) for line in sbatch_log.read_text().splitlines()]
    submissions = Counter(_rule_of(_option(args, "--comment")) for args in calls)
    for args in calls:
        rule = _rule_of(_option(args, "--comment"))
        if rule in GPU_RULES:
            assert "--gpus=1" in args and _option(args, "-p") == harness.GPU_PARTITION, args
            assert _option(args, "--cpus-per-gpu") is not None, args
        else:
            assert not any(a.startswith(("--gpus", "--gres")) for a in args), args
            assert _option(args, "-p") == harness.CPU_PARTITION, args
        if rule in PER_SLIDE_RULES:
            assert _option(args, "--array") is not None, args

    # What SLURM ran: every array task and job, with partition, GPU request and final state.
    records = _scontrol_jobs(slurm_cluster, work)
    ran = Counter(_rule_of(r["Comment"]) for r in records)
    lines = [
        f"{'rule':24} {'SLURM jobs':>10} {'sbatch calls':>12} {'DAG jobs':>8}",
        *(
            f"{rule:24} {ran[rule]:>10} {submissions[rule]:>12} {expected.get(rule, 0):>8}"
            for rule in sorted(set(expected) | set(ran))
        ),
        f"{'total':24} {sum(ran.values()):>10} {sum(submissions.values()):>12} "
        f"{sum(expected.values()):>8}",
        f"local rules (run by the submitting Snakemake): {', '.join(sorted(local_rules))}",
        f"wall time: local run {local_run.seconds:.0f} s, SLURM run {on_slurm.seconds:.0f} s "
        "(concurrently)",
    ]
    report = "\n".join(lines)
    (tmp_path / "slurm_job_counts.txt").write_text(report + "\n")
    print(f"\nSLURM jobs per rule (array tasks counted one by one):\n{report}")

    for record in records:
        rule = _rule_of(record["Comment"])
        assert record["JobState"] == "COMPLETED", record
        gres = record.get("TresPerJob", "") + record.get("TresPerNode", "")
        if rule in GPU_RULES:
            assert record["Partition"] == harness.GPU_PARTITION and "gpu:1" in gres, record
        else:
            assert record["Partition"] == harness.CPU_PARTITION and "gpu" not in gres, record
    assert ran == Counter(expected), report  # every non-local job ran on SLURM, once
    for rule in PER_SLIDE_RULES:
        assert submissions[rule] < ran[rule], report  # packed into arrays
    digests = h5_digests(local_run.workdir)
    assert len(digests) >= 4 * expected["tiling_tile_slide"]  # tiles, features, attention, top-k
    assert h5_digests(work) == digests
