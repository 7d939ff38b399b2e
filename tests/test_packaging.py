"""The promises of the README and the two install routes stay true."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(req: str) -> str:
    return req.strip()[len(_name(req)):].replace(" ", "")


def test_environment_yml_lists_the_same_requirements_as_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = py["dependencies"] + py["optional-dependencies"]["test"]
    want = {_name(r): _spec(r) for r in reqs}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    got = {}
    for dep in env["dependencies"]:
        for r in dep["pip"] if isinstance(dep, dict) else [dep]:
            if _name(r) not in ("python", "pip"):
                got[_name(r)] = _spec(r)
    assert got == want


def test_torch_is_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^#+ [^\n]*Quick start[^\n]*\n+```[a-z]*\n(.*?)```", text, re.M | re.S | re.I)
    assert m, "README.md needs a fenced code block right under a 'Quick start' heading"
    lines = [ln for ln in m.group(1).splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[1].strip() in ci
