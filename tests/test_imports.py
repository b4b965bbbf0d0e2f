"""The packages depend one way: data_prep uses recsys_mtl (the data contract), recsys_mtl never uses data_prep."""

import ast
from pathlib import Path

import recsys_mtl

PACKAGE = Path(recsys_mtl.__file__).parent


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(imported module, the function it is imported in, None at module level) of every import in `path`."""
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", function))
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            visit(child, function or inner)

    visit(ast.parse(path.read_text(), str(path)), None)
    return found


def _is_data_prep(module: str) -> bool:
    return module == "data_prep" or module.startswith("data_prep.")


def test_no_module_of_recsys_mtl_imports_data_prep() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "data" / "encode.py" in modules  # scoring's raw-row encoding lives in the package
    offenders = {
        str(path.relative_to(PACKAGE)): module
        for path in modules
        for module, _ in _imports(path)
        if _is_data_prep(module)
    }
    assert offenders == {}  # the CLI included: data_prep adds synth and prepare through an entry point


def test_data_never_imports_the_model() -> None:
    imported = {module for path in (PACKAGE / "data").glob("*.py") for module, _ in _imports(path)}
    assert "recsys_mtl.data.description" in imported
    assert sorted(m for m in imported if m.startswith("recsys_mtl.model")) == []


def test_the_import_scan_sees_function_level_imports(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef run():\n    from data_prep.synth import WorldConfig\n    import data_prep\n")
    assert _imports(source) == [("os", None), ("data_prep.synth", "run"), ("data_prep", "run")]


def test_commands_that_need_no_bert_do_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, recsys_mtl.evaluate, recsys_mtl.score, recsys_mtl.train; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
