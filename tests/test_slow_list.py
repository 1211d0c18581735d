"""tests/README.md's slow list is the set of tests marked slow: a test does not become slow (and
leave `make test-quick`) without saying there what it alone covers, and the list names no test
that is gone or no longer marked."""
import ast
import re

from conftest import REPO


def marked_slow() -> set[str]:
    found = set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(decorator) == "pytest.mark.slow" for decorator in node.decorator_list):
                found.add(f"tests/{path.name}::{node.name}")
    return found


def listed_slow() -> set[str]:
    text = (REPO / "tests" / "README.md").read_text()
    section = text.split("## Slow tests", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(tests/test_\w+\.py::test_\w+)`", section))


def test_the_slow_list_is_the_tests_marked_slow():
    marked, listed = marked_slow(), listed_slow()
    assert marked, "no test is marked slow: the scan finds none"
    assert marked - listed == set(), "marked slow but not listed in tests/README.md"
    assert listed - marked == set(), "listed in tests/README.md but not marked slow"
