"""Each stage's code digest covers exactly the package modules its rule script runs.

The modules are derived from the imports (eagleflow.provenance.stage_modules); these tests check
them against an independent finder (the standard library's modulefinder, which follows the same
imports through the compiled byte code) and check that editing a module changes the digest of the
stages that run it, and of no other.
"""

from __future__ import annotations

import importlib.util
import modulefinder
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from eagleflow import provenance

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
PACKAGE = SCRIPTS / "eagleflow"


def workflow_rules() -> dict[str, str]:
    """Rule name -> its script (relative to scripts/), read from rules/*.smk."""
    rules = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        for match in re.finditer(r"^rule (\w+):(.*?)(?=^rule |\Z)", text, re.S | re.M):
            script = re.search(r'script:\s*"\.\./scripts/([\w/]+\.py)"', match.group(2))
            if script:
                rules[match.group(1)] = script.group(1)
    return rules


RULES = workflow_rules()


def test_every_rule_has_its_own_script_named_after_it():
    assert len(RULES) >= 13
    assert {rule: script for rule, script in RULES.items() if script != f"{rule}.py"} == {}


def found_by_modulefinder(script: Path) -> set[str]:
    finder = modulefinder.ModuleFinder(path=[str(SCRIPTS)])
    finder.run_script(str(script))
    return {
        Path(module.__file__).relative_to(PACKAGE).as_posix()
        for name, module in finder.modules.items()
        if name.split(".")[0] == "eagleflow" and module.__file__
    }


@pytest.mark.parametrize("rule", sorted(RULES))
def test_stage_modules_are_what_the_rule_script_imports(rule):
    derived = set(provenance.stage_modules(rule))
    assert derived == found_by_modulefinder(SCRIPTS / RULES[rule])
    # The package's own __init__ and the module of the rule's main function are always in.
    assert "__init__.py" in derived and "logutil.py" in derived


def test_known_dependencies_that_a_hand_list_had_missed():
    assert "models/__init__.py" in provenance.stage_modules("features_encode_tiles")
    assert "attention.py" in provenance.stage_modules("eagle_embed_topk")
    # A tool or the demo generator is no stage's code.
    for rule in RULES:
        assert not any(m.startswith("demo") for m in provenance.stage_modules(rule)), rule


def load_copy(scripts_copy: Path) -> ModuleType:
    """The provenance module of a copied tree, loaded on its own (it hashes the copy)."""
    spec = importlib.util.spec_from_file_location(
        "provenance_copy", scripts_copy / "eagleflow" / "provenance.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_editing_a_module_changes_exactly_the_digests_of_the_stages_that_run_it(tmp_path):
    copy = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = load_copy(copy)
    digests = {rule: before.stage_code_digest(rule) for rule in RULES}
    package = copy / "eagleflow"
    modules = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py"))
    assert "models/__init__.py" in modules
    for module in modules:
        path = copy / "eagleflow" / module
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            after = load_copy(copy)
            changed = {rule for rule in RULES if after.stage_code_digest(rule) != digests[rule]}
        finally:
            path.write_bytes(original)
        runs_it = {rule for rule in RULES if module in before.stage_modules(rule)}
        assert changed == runs_it, module


def test_editing_a_rule_script_changes_only_its_stage(tmp_path):
    copy = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    digests = {rule: load_copy(copy).stage_code_digest(rule) for rule in RULES}
    script = copy / "heads_fewshot.py"
    script.write_text(script.read_text() + "\n# an edit\n")
    after = load_copy(copy)
    assert {r for r in RULES if after.stage_code_digest(r) != digests[r]} == {"heads_fewshot"}


def test_relative_imports_are_followed(tmp_path):
    copy = tmp_path / "scripts"
    (copy / "eagleflow" / "sub").mkdir(parents=True)
    shutil.copy(PACKAGE / "provenance.py", copy / "eagleflow" / "provenance.py")
    (copy / "eagleflow" / "__init__.py").write_text("")
    (copy / "eagleflow" / "sub" / "__init__.py").write_text("")
    (copy / "eagleflow" / "sub" / "a.py").write_text("from . import b\nfrom ..c import x\n")
    (copy / "eagleflow" / "sub" / "b.py").write_text("")
    (copy / "eagleflow" / "c.py").write_text("x = 1\n")
    (copy / "eagleflow" / "unused.py").write_text("")
    (copy / "rule_x.py").write_text("def main():\n    from eagleflow.sub import a\n")
    assert load_copy(copy).stage_modules("rule_x") == (
        "__init__.py",
        "c.py",
        "sub/__init__.py",
        "sub/a.py",
        "sub/b.py",
    )


def test_an_unknown_stage_is_an_error():
    with pytest.raises(KeyError, match="no rule script"):
        provenance.stage_modules("no_such_rule")


def test_outputs_name_their_stage_code_in_the_code_version():
    version = provenance.code_version("heads_fewshot")
    assert f"heads_fewshot.{provenance.stage_code_digest('heads_fewshot')}" in version
    assert provenance.provenance_attrs("heads_fewshot")["code_version"] == version
