"""The layering in docs/architecture.md holds: every import in service/ and skills/ (function-level ones
included) is checked against the doc's import rules, so the doc and the tree cannot drift apart."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def _rules() -> list[tuple[str, list[str], list[str]]]:
    block = re.search(r"<!-- import-rules -->\s*```\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/architecture.md: the import-rules block is missing"
    rules = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        importer, _, rest = line.partition("!->")
        forbidden, _, exempt = rest.partition(" except ")
        rules.append((importer.strip(), forbidden.split(), exempt.split()))
    return rules


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _module_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from service import qnn_context`-style imports name modules too
            out += [(node.lineno, target)] + [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def violations(rules, files, root: Path = ROOT) -> list[str]:
    found = []
    for path in files:
        module = _module_of(path, root)
        for importer, forbidden, exempt in rules:
            if not _under(module, importer) or any(_under(module, e) for e in exempt):
                continue
            for line, target in _imports(path, module):
                for prefix in forbidden:
                    if _under(target, prefix):
                        found.append(f"{path.relative_to(root)}:{line}: {module} imports {target} "
                                     f"({importer} may not import {prefix})")
    return sorted(set(found))


def _tree() -> list[Path]:
    return sorted(p for top in ("service", "skills") for p in (ROOT / top).rglob("*.py"))


def test_the_rules_cover_the_layers_the_issue_names():
    rules = {importer: forbidden for importer, forbidden, _ in _rules()}
    assert {"skills", "service.modelbuild"} <= set(rules["service.runtime"])
    assert "service.perception.build" in rules["service.perception"]


def test_no_module_imports_what_the_architecture_forbids():
    found = violations(_rules(), _tree())
    assert not found, "forbidden imports:\n" + "\n".join(found)


@pytest.mark.parametrize("source, module", [
    ("from service.modelbuild.qnn_compile import compile_context\n", "service.runtime.backends"),
    ("def load():\n    import skills.sentinel\n", "service.runtime.host"),
    ("from .build import catalog\n", "service.perception.faces"),
])
def test_a_forbidden_import_is_caught_even_inside_a_function(tmp_path, source, module):
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    fake = tmp_path / path.relative_to(ROOT)
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    assert violations(_rules(), [fake], tmp_path)
