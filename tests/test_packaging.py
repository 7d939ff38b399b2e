"""The promises of the README and the two install routes stay true."""
import re
import tomllib
from pathlib import Path

import yaml

from helpers import ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(req: str) -> str:
    return req.strip()[len(_name(req)):].replace(" ", "")


def _conda_requirements(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    got = {}
    for dep in env["dependencies"]:
        for r in dep["pip"] if isinstance(dep, dict) else [dep]:
            if _name(r) not in ("python", "pip"):
                got[_name(r)] = _spec(r)
    return got


def test_environment_yml_lists_the_same_requirements_as_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = py["dependencies"] + py["optional-dependencies"]["test"]
    assert _conda_requirements(ROOT / "environment.yml") == {_name(r): _spec(r) for r in reqs}


def test_the_rules_environment_lists_the_runtime_requirements_of_pyproject():
    """workflow/envs/daunce.yaml (`snakemake --sdm conda`): what the jobs import, without test tools."""
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env_file = ROOT / "workflow" / "envs" / "daunce.yaml"
    assert _conda_requirements(env_file) == {_name(r): _spec(r) for r in py["dependencies"]}
    assert "python=3.11" in yaml.safe_load(env_file.read_text())["dependencies"]
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for path in re.findall(r"^    conda:\n\s+\"([^\"]+)\"", smk.read_text(), re.M):
            assert (smk.parent / path).resolve() == env_file, (smk.name, path)


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
