from conftest import ROOT
from distillery.docs import methods_markdown, render


def test_readme_method_list_matches_registry():
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "README method list is stale: run `python -m distillery.docs`"
    for line in methods_markdown().splitlines()[2:]:
        assert line in readme


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.index("## Python API")]
    assert "make demo" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()
