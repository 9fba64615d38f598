"""Lint and format checks, and pins that must agree (fast tier: seconds each)."""

from __future__ import annotations

import re

import yaml
from workflow_helpers import BIN, REPO, SNAKEMAKE, run


def test_snakefmt_is_clean():
    run([str(BIN / "snakefmt"), "--check", "Snakefile", "rules"], cwd=REPO)


def test_ruff_is_clean():
    run([str(BIN / "ruff"), "check", "scripts", "tests"], cwd=REPO)
    run([str(BIN / "ruff"), "format", "--check", "scripts", "tests"], cwd=REPO)


def test_snakemake_lint_has_no_findings(demo_dir):
    result = run([*SNAKEMAKE, "--lint", "--directory", str(demo_dir)], cwd=demo_dir, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output, output


def pins(lines: list[str]) -> dict[str, str]:
    """name -> version of every `name==version` line (comments and options skipped)."""
    found = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s#;]+)\s*(#.*)?", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_every_conda_env_pins_the_versions_of_requirements_txt():
    required = pins((REPO / "requirements.txt").read_text().splitlines())
    assert "torch" in required and "snakemake" in required
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        pip_lists = [d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d]
        assert pip_lists, f"{env.name}: no pip section"
        entries = [entry for pip in pip_lists for entry in pip]
        pinned = pins(entries)
        unpinned = [e for e in entries if "==" not in e]
        assert not unpinned, f"{env.name}: not pinned: {unpinned}"
        differ = {
            name: (version, required.get(name))
            for name, version in pinned.items()
            if required.get(name) != version
        }
        assert not differ, f"{env.name} (env, requirements.txt): {differ}"


def test_the_profile_docs_name_the_snakefiles_local_rules():
    snakefile = (REPO / "Snakefile").read_text()
    block = re.search(r"^localrules:\n((?:    \w+,\n)+)", snakefile, re.M)
    assert block, "no localrules: block in the Snakefile"
    local = [name.strip(" ,") for name in block.group(1).splitlines()]
    docs = (REPO / "profiles" / "README.md").read_text()
    assert "the one local rule" not in docs
    for rule in local:
        if rule != "all":
            assert f"`{rule}`" in docs, rule
    profile = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    named = set(re.findall(r"#.*?\b(\w+_\w+)\b", profile)) & set(local)
    assert not named, f"profiles/slurm/config.yaml comments name single local rules: {named}"
