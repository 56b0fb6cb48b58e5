"""The README front page and the documentation site's sources: the README's commands are what CI
runs, its links resolve, and the docs stay optional (mkdocs builds the site in .ci/run; nothing in
leakpipe imports it)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_is_a_front_page_whose_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    ci = (REPO / ".ci" / "run").read_text()
    (test_line,) = [line for line in ci.splitlines() if "pytest" in line and not line.lstrip().startswith("#")]
    assert f"```bash\n{test_line.strip()}\n```" in readme
    assert "mkdocs build --strict" in ci and '".[test,docs]"' in ci
    assert "--quiet" not in ci  # mkdocs --quiet drops the warnings that --strict counts


def test_readme_links_resolve_and_every_docs_page_is_in_the_nav():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", readme)
    assert links and all((REPO / link).is_file() for link in links if "://" not in link), links
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert pages == set(re.findall(r":\s+([\w/-]+\.md)\s*$", nav, re.M))
    for page in ("reading-numbers.md", "developer.md", "reference/cli.md", "reference/math.md"):
        assert page in pages


def test_nothing_imports_mkdocs():
    for folder in ("pipeline", "stages", "workflows", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            assert not re.search(r"^\s*(import|from)\s+mkdocs", path.read_text(), re.M), path
