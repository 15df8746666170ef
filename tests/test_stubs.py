"""The stub python/fastsgd/_core.pyi against the built module's own signatures.

``mypy.stubtest`` (run by .ci/run) finds names missing on either side but cannot see the
parameters of pybind11 functions; pybind11 writes them into the first docstring line, which this
test compares with the stub: names, order and which have defaults.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fastsgd import _core

STUB = Path(_core.__file__).with_name("_core.pyi")
if not STUB.is_file():  # an editable install serves the stub from the source tree
    STUB = Path(__file__).resolve().parents[1] / "python" / "fastsgd" / "_core.pyi"


def _split_top_level(text: str) -> list[str]:
    """Splits ``a: x, b: dict[str, int] = ...`` at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:])
    return [p.strip() for p in parts]


def _runtime_params(func: object, name: str) -> list[tuple[str, bool]]:
    """(name, has default) per parameter, from pybind11's ``name(a: T, b: U = ...) -> R`` line."""
    first = (getattr(func, "__doc__", None) or "").splitlines()[0]
    match = re.match(rf"{re.escape(name)}\((.*)\) -> ", first)
    assert match, f"no pybind11 signature line for {name}: {first!r}"
    return [(p.split(":")[0].strip(), "=" in p) for p in _split_top_level(match.group(1))]


def _stub_functions() -> dict[str, ast.FunctionDef]:
    """Qualified name -> definition for every function and method in the stub (no properties)."""
    tree = ast.parse(STUB.read_text())
    found: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.decorator_list:
                    found[f"{node.name}.{item.name}"] = item
    return found


STUB_FUNCTIONS = _stub_functions()


@pytest.mark.parametrize("qualname", sorted(STUB_FUNCTIONS))
def test_stub_parameters_match_the_binding(qualname):
    node = STUB_FUNCTIONS[qualname]
    owner: object = _core
    for part in qualname.split(".")[:-1]:
        owner = getattr(owner, part)
    runtime = _runtime_params(getattr(owner, node.name), node.name)
    args = node.args.args
    defaults = [False] * (len(args) - len(node.args.defaults)) + [True] * len(node.args.defaults)
    stub = [(a.arg, d) for a, d in zip(args, defaults)]
    if node.args.kwonlyargs:
        stub.append(("*", False))
        stub += [(a.arg, d is not None) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults)]
    if runtime[1:] == [("**kwargs", False)]:
        # Records (Group, Options) take their fields by keyword, from the field list in sgd.h:
        # the stub's keyword-only parameters must be exactly the record's attributes.
        fields = [n for n, v in vars(owner).items() if isinstance(v, property)]
        assert [a for a, _ in stub[2:]] == fields, f"{qualname}: stub {stub} vs fields {fields}"
        return
    assert stub == runtime, f"{qualname}: stub {stub} vs binding {runtime}"


def test_every_binding_has_a_stub():
    classes = {n: v for n, v in vars(_core).items() if isinstance(v, type) and not n.startswith("_")}
    public = {n for n, v in vars(_core).items() if callable(v) and not n.startswith("_") and n not in classes}
    for name, cls in classes.items():
        public |= {f"{name}.{n}" for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
        init_doc = (getattr(vars(cls).get("__init__"), "__doc__", None) or "")
        # Enums are made from their values; a record without a pybind11 signature line (GradStats)
        # cannot be constructed from Python at all.
        if "__init__" in vars(cls) and not hasattr(cls, "__members__") and init_doc.startswith("__init__("):
            public.add(f"{name}.__init__")
    missing = public - set(STUB_FUNCTIONS)
    assert not missing, f"bindings without a stub: {sorted(missing)}"
