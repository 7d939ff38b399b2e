"""The experiment a Snakemake command line runs: config/config.yaml's `experiment`, overridden by
each --configfile that sets it, then by --config experiment=<name> (Snakemake's own order).

    python scripts/experiment_of.py [snakemake args...]     # prints e.g. digits_mlp

./dev uses it to write the run's report to results/<experiment>/report.html.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def experiment_of(argv: list[str], default: Path = Path("config/config.yaml")) -> str:
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--configfile", "--configfiles", nargs="+", action="extend", default=[])
    ap.add_argument("--config", "-C", nargs="+", action="extend", default=[])
    args, _ = ap.parse_known_args(argv)
    name = None
    for path in ([default] if default.exists() else []) + [Path(p) for p in args.configfile]:
        cfg = yaml.safe_load(path.read_text()) or {}
        name = cfg.get("experiment", name) if isinstance(cfg, dict) else name
    for item in args.config:
        key, _, value = item.partition("=")
        if key == "experiment":
            name = str(yaml.safe_load(value))
    if not name:
        raise SystemExit("no experiment name: config/config.yaml or a --configfile must set `experiment`")
    return name


if __name__ == "__main__":
    print(experiment_of(sys.argv[1:]))
