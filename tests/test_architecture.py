"""The house rules of ARCHITECTURE.md, checked: layer boundaries, one argv parser, no
test hooks in production code, short functions."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "harness"
SOURCES = sorted(PKG.rglob("*.py"))
MAX_FUNCTION_LINES = 60


def _imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["harness.report", "harness.actor", "harness.space", "harness.methods",
                                    "harness.errors", "harness"])
def test_light_modules_import_without_torch(module):
    heavy = {"torch", "timm", "ray", "harness.train", "harness.neurons", "harness.convert"}
    if module == "harness.report":
        heavy -= {"ray"}
    assert not (_imported_after(module) & heavy)


def test_report_does_not_import_training_code():
    loaded = _imported_after("harness.report")
    assert not {m for m in loaded if m.startswith("harness.") and m.split(".")[1] in
                {"train", "trainable", "sweep", "calibration", "data", "models", "neurons", "convert"}}


def _exit_calls(path) -> list[str]:
    """The functions of a source file that call os._exit."""
    import ast

    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "_exit"):
                    found.append(fn.name)
    return found


def test_no_test_hooks_in_production_code():
    for p in SOURCES:
        text = p.read_text()
        # os._exit only where a forked child of the report ends (no atexit, no flushing
        # of the parent's buffers): never as a way for tests to kill a process
        calls = _exit_calls(p)
        assert calls == (["_child"] if p.relative_to(PKG).as_posix() == "report/cli.py"
                         else []), (p, calls)
        assert "HARNESS_TEST" not in text and "HARNESS_SWEEP_MAX_FAILURES" not in text, p


def test_only_cli_parses_argv():
    users = sorted(str(p.relative_to(PKG)) for p in SOURCES
                   if "argparse" in p.read_text() or "sys.argv" in p.read_text())
    assert users == ["cli.py"], users


def test_functions_are_short():
    long = []
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_shared_constants_agree():
    from harness import actor, calibration
    assert actor.DEFAULT_BATCH == calibration.DEFAULT_BATCH
