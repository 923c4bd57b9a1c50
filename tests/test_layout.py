"""The layout a reader relies on: no import cycles, no references to documents a reader lacks.

These read the source as text (ast for imports); they run in a second and can fail.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> dict[str, Path]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    tools = (ROOT / "tools").glob("*.py")
    mods.update({f"tools.{p.stem}": p for p in tools if p.stem != "__init__"})
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (lazy imports count)."""
    graph = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                if node.module == "tools":
                    deps |= {f"tools.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    def visit(node: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph[node]):
            if dep in path:
                return path[path.index(dep):] + [dep]
            found = visit(dep, path + [dep])
            if found:
                return found
        return None

    for start in sorted(graph):
        found = visit(start, [start])
        if found:
            return found
    return None


def test_import_graph_has_no_cycles():
    graph = import_graph(project_modules())
    assert {"ddpo_min", "sampler", "config", "loading", "plumbing", "tiny"} <= set(graph)
    assert find_cycle(graph) is None, find_cycle(graph)
    assert graph["sampler"] == set() and graph["tiny"] <= {"sampler"}  # the policy stands alone
    # the check itself can fail: a graph with a cycle is found
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# "seed 001", "DESIGN.md" and "issue 5" point to documents a reader of the project does not have
INTERNAL = re.compile(r"\bseed 00\d|\bseeds/|\bseed documents?\b|DESIGN\.md|\bissue #?\d+\b(?! on)"
                      r"|\(issue \d", re.I)
# citing a public repository's issue (owner/repo#N or "owner/repo, issue N") is fine
PUBLIC = re.compile(r"[\w.-]+/[\w.-]+(#\d+|,? issues? #?\d+)")


def reader_files() -> list[Path]:
    files = [*ROOT.glob("*.py"), *(ROOT / "tools").glob("*.py"), *ROOT.glob("*.md"),
             *(ROOT / "tests").glob("*.md")]
    files += [*(ROOT / "notebooks").rglob("*.py"), *(ROOT / "notebooks").rglob("*.md")]
    files += [*(ROOT / "notebooks").rglob("*.ipynb"), *(ROOT / "assets").rglob("*.md")]
    return sorted(files)


def internal_references(text: str) -> list[str]:
    return [m.group(0) for line in text.splitlines() if not PUBLIC.search(line)
            for m in INTERNAL.finditer(line)]


def test_code_notebooks_and_readme_cite_no_internal_documents():
    found = {str(p.relative_to(ROOT)): refs for p in reader_files()
             if (refs := internal_references(p.read_text()))}
    assert not found, found


@pytest.mark.parametrize("line", ["as seed 001 says", "see DESIGN.md", "the bar of issue 3",
                                  "(issue 5)", "from the seed documents"])
def test_the_reference_check_catches_internal_references(line):
    assert internal_references(line)


def test_the_reference_check_allows_public_issue_links():
    assert not internal_references("traced in kvablack/ddpo-pytorch#3")
    assert not internal_references("(kvablack/ddpo-pytorch, issue 3)")


def _control_characters(text: str) -> list[str]:
    """Control characters other than newline: what a LaTeX escape such as \\frac or \\rho becomes
    when written through a non-raw Python string (form feed, carriage return, ...)."""
    return [repr(c) for c in text if ord(c) < 32 and c != "\n"]


def test_markdown_and_notebook_sources_hold_no_control_characters():
    files = [p for p in (*ROOT.rglob("*.md"), *(ROOT / "notebooks" / "src").rglob("*.py"))
             if not {"runs", ".git"} & set(p.relative_to(ROOT).parts)]
    assert len(files) > 10
    bad = {str(p.relative_to(ROOT)): _control_characters(p.read_text(encoding="utf-8"))[:3]
           for p in files}
    assert not {k: v for k, v in bad.items() if v}


def test_the_control_character_check_catches_a_broken_latex_escape():
    assert _control_characters("$\frac12$ and $\rho$") == ["'\\x0c'", "'\\r'"]
    assert _control_characters(r"$\frac12$ and $\rho$") == []


def _unanswered_prompts(sources: dict[str, str], answers: str) -> list[str]:
    """Notebook sources with a "Think about it" prompt and no answer heading ("### <stem>, ...")
    in the answer key."""
    headings = [line for line in answers.splitlines() if line.startswith("### ")]
    return sorted(stem for stem, text in sources.items() if "**Think about it.**" in text
                  and not any(h.startswith(f"### {stem},") for h in headings))


def test_every_think_about_it_prompt_has_an_answer_in_the_key():
    sources = {p.stem: p.read_text(encoding="utf-8")
               for p in (ROOT / "notebooks" / "src").rglob("*.py")}
    sources.pop("ex5_your_ddpo_trains")  # answered under "## Exercise 5", with its run's numbers
    answers = (ROOT / "notebooks" / "course" / "ANSWERS.md").read_text(encoding="utf-8")
    assert sum("**Think about it.**" in t for t in sources.values()) >= 5
    assert not _unanswered_prompts(sources, answers)
    # and the check can fail: a prompt whose heading is missing is named
    assert _unanswered_prompts({"05_rwr": "**Think about it.** ..."}, "### 05_rwr\n") == ["05_rwr"]
