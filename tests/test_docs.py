"""The README is part of the contract: every config key documented, the quickstart intact."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import pythonpath_with_repo

from drnn_cli.config import DataConfig, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_documents_every_config_key():
    for section, model in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
        for key in model.model_fields:
            assert f"`{section}.{key}`" in README, f"{section}.{key} is missing from the README"


def test_readme_config_table_is_the_schema_reference_row_for_row():
    """scripts/config_reference.py prints the table from the schema: defaults, choices, bounds."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "config_reference.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": pythonpath_with_repo()},
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    stale = [row for row in rows if row not in README.splitlines()]
    assert not stale, "README rows differ from scripts/config_reference.py:\n" + "\n".join(stale)


def test_quickstart_is_two_commands_that_train_the_seed_preset_predict_evaluate_and_test():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```\n(.*?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2 and all("\n" not in command for command in commands)
    assert commands[0].endswith(
        '&& drnn train --config lstm2.yaml && drnn predict "time traveller" && drnn eval'
    )
    assert "python -m pytest" in commands[1]


def test_readme_has_no_unfilled_placeholders():
    assert not re.search(r"^[A-Z0-9_]{6,}$", README, flags=re.M)


def test_readme_sections_cited_in_the_code_exist():
    """Docstrings and messages point readers to README sections by name (`README "Using a GPU"`): each
    name must begin a heading of the README, so that a renamed section cannot leave a dead pointer."""
    headings = [line.lstrip("#").strip() for line in README.splitlines() if line.startswith("#")]
    sources = [
        *sorted((REPO / "drnn_cli").glob("*.py")),
        *sorted((REPO / "scripts").glob("*.py")),
        *sorted(path for path in (REPO / "tests").glob("*.py") if path.name != "test_docs.py"),
    ]
    cited = {
        (path.name, name)
        for path in sources
        for name in re.findall(r'README "([^"]+)"', path.read_text(encoding="utf-8"))
    }
    assert len(cited) >= 7
    dead = sorted((file, name) for file, name in cited if not any(h.startswith(name) for h in headings))
    assert not dead, f"README sections cited but not found: {dead}"


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation but hyphens dropped, spaces hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("Fine-tuning: `--init-from`") == "fine-tuning---init-from"
    assert github_anchor("Several processes, GPUs or nodes") == "several-processes-gpus-or-nodes"


def markdown_anchors(path: Path) -> set[str]:
    return {
        github_anchor(line.lstrip("#"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }


def test_every_link_inside_the_readme_reaches_a_heading():
    """The contents line and the cross-references link to `#fragments`; a renamed heading breaks them."""
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert len(links) >= 15
    assert not sorted(set(links) - markdown_anchors(REPO / "README.md"))


def test_every_link_between_the_readme_and_docs_reaches_its_file_and_heading():
    """The README sends details to docs/*.md (the GPU, benchmarks, errors, `drnn inspect`, long runs,
    torchrun, your own text) and they link back: a link to a file that moved, or to a heading renamed in
    the other file, fails here. Images count as links: a picture left behind by a moved section fails too."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    checked = 0
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#][^)]*)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            file_part, _, fragment = target.partition("#")
            linked = (page.parent / file_part).resolve()
            checked += 1
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif fragment and fragment not in markdown_anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert checked >= 12
    assert not broken, "\n".join(broken)


# README heading -> the docs page its details moved to. The heading stays (code and messages cite it by name,
# `README "Long runs"`), with a summary and a link to the page.
MOVED_SECTIONS = {
    "## Using a GPU": "gpu.md",
    "## Seeing what the network learned": "inspect.md",
    "## Long runs on big text: budgets, step cadence, token cache, TensorBoard": "long-runs.md",
    "## Several processes, GPUs or nodes": "distributed.md",
    "## Your own text, and held-out numbers that mean something": "own-text.md",
    "## What happens when": "errors.md",
    "## Benchmarks": "benchmarks.md",
}


def test_each_moved_section_keeps_its_readme_heading_and_links_its_page_which_links_back():
    """A section moved to docs/ leaves its heading and a summary that links to the page; the page opens
    with a link back to the README; and every page of docs/ is one of them, so none is left unlinked."""
    assert {page.name for page in (REPO / "docs").glob("*.md")} == set(MOVED_SECTIONS.values())
    for heading, page in MOVED_SECTIONS.items():
        assert f"\n{heading}\n" in README, f"{heading} is no longer a README heading"
        section = README.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
        assert f"](docs/{page}" in section, f"README {heading!r} does not link docs/{page}"
        opening = (REPO / "docs" / page).read_text(encoding="utf-8").split("\n\n")[1]
        assert "](../README.md#" in opening, f"docs/{page} does not open with a link back to the README"


def test_the_module_table_names_every_module_of_the_package():
    """README "How data flows" says each module's one job: a module added without a row there (or a row
    left for a module that is gone) fails here."""
    section = README.split("## How data flows", 1)[1].split("\n## ", 1)[0]
    named = {
        name.removeprefix("drnn_cli/")
        for row in section.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`([\w/]+\.py)`", row.split(" | ")[0])
    }
    modules = {path.name for path in (REPO / "drnn_cli").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert named == modules
