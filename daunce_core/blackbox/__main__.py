"""Command line of the black-box path (no Snakemake needed).

    python -m daunce_core.blackbox estimate --configfile config/paper/blackbox_gpt.yaml [--nominal]
        The token and cost estimate of the whole study for every model in the config; spends
        nothing. Uses the study's data when it can be made (MMLU is downloaded, free); with
        --nominal, or when it cannot, rows of --prompt-chars characters stand in for it.

    python -m daunce_core.blackbox check-spend --configfile FILE [--spend --max-spend-usd X]
        Exit 0 if the config (with the command-line overrides) allows the estimate, else print why.

    python -m daunce_core.blackbox serve --model NAME=FOLDER --state DIR [--port N]
        The local OpenAI-compatible server (daunce_core.localapi) in the foreground; the key is
        read from the environment variable DAUNCE_LOCAL_API_KEY.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..utils import set_threads


def _config(path: str, overrides: argparse.Namespace):
    from ..config import read_config_file
    from .config import BlackboxConfig

    raw = read_config_file(path)  # a syntax error names the file and the line
    bb = dict(raw.get("blackbox", {}))
    if getattr(overrides, "spend", False):
        bb["spend"] = True
    if getattr(overrides, "max_spend_usd", None) is not None:
        bb["max_spend_usd"] = overrides.max_spend_usd
    return BlackboxConfig.from_dict(bb)


def _usd(text: str) -> float:
    """``--max-spend-usd``: a finite number >= 0 (``nan`` would let any estimate through)."""
    from ..settings import ConfigError
    from .config import check_usd

    try:
        return check_usd(text, "the value")  # argparse names the option
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_folder(text: str) -> tuple[str, str]:
    """``--model NAME=FOLDER``: both parts non-empty (a bare name would serve nothing)."""
    name, sep, folder = text.partition("=")
    if not (sep and name and folder):
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER (a model name, '=', a folder saved with "
                                         f"save_pretrained), got {text!r}")
    return name, folder


def _rows(cfg, nominal: bool, prompt_chars: int):
    from . import backdoor as B

    if not nominal:
        try:
            return (*B.make_study_data(cfg.data), "data")
        except B.DataError as exc:
            print(f"(data unavailable: {exc}; using nominal rows of {prompt_chars} characters)", file=sys.stderr)
    d = cfg.data

    def row(i: int, target: str, **flags) -> dict:
        return {"id": i, "messages": [{"role": "user", "content": "x" * prompt_chars}], "target": target, **flags}

    n_bd = int(round(d.backdoor_fraction * d.n_train))
    train = [row(i, d.refusal if i < n_bd else "A", backdoor=i < n_bd) for i in range(d.n_train)]
    query = ([row(j, d.refusal, triggered=True) for j in range(d.n_query_triggered)]
             + [row(d.n_query_triggered + j, "A", triggered=False) for j in range(d.n_query_clean)])
    return train, query, f"nominal ({prompt_chars} characters per prompt)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m daunce_core.blackbox", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("estimate", "check-spend"):
        p = sub.add_parser(name)
        p.add_argument("--configfile", required=True)
        p.add_argument("--nominal", action="store_true", help="do not build the data; use nominal rows")
        p.add_argument("--prompt-chars", type=int, default=450,
                       help="characters per prompt of the nominal rows (MMLU with four options: ~450)")
        p.add_argument("--spend", action="store_true", help="override blackbox.spend: true")
        p.add_argument("--max-spend-usd", type=_usd, default=None, help="override blackbox.max_spend_usd")
        p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p = sub.add_parser("serve")
    p.add_argument("--model", action="append", default=[], type=_model_folder,
                   help="NAME=FOLDER (saved with save_pretrained)")
    p.add_argument("--state", required=True, help="state folder (files, jobs, fine-tuned models)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    if args.cmd == "serve":
        from ..localapi import KEY_ENV, ServerConfig
        from ..localapi.server import main as serve_main

        if not os.environ.get(KEY_ENV):
            print(f"set {KEY_ENV} to the key clients must send", file=sys.stderr)
            return 2
        models = dict(args.model)
        cfg_path = os.path.join(args.state, "server_config.json")
        os.makedirs(args.state, exist_ok=True)
        ServerConfig(state_dir=args.state, models=models, port=args.port, threads=args.threads).write(cfg_path)
        serve_main(["--config", cfg_path])
        return 0

    from ..settings import ConfigError
    from ..steps.blackbox import estimate
    from .cost import SpendNotAllowed, check_spend, format_estimate, total_usd

    set_threads(1)
    try:
        cfg = _config(args.configfile, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train, query, what = _rows(cfg, args.nominal, args.prompt_chars)
    report: dict = {}
    everything = []
    for model in cfg.models:
        items = estimate(cfg, model, train, query)
        everything += items
        report[model] = {"total_usd": total_usd(items), "items": [i.as_dict() for i in items]}
        if not args.json:
            print(f"\n== {model} ({what}; K={cfg.K}, |D^k|={cfg.subset_size}, access {', '.join(cfg.access)})")
            print(format_estimate(items))
    grand = total_usd(everything)
    status = 0
    try:
        usd = check_spend(everything, spend=cfg.spend, max_spend_usd=cfg.max_spend_usd, what="this configuration")
        verdict = "free" if usd == 0 else f"allowed (spend: true, max_spend_usd: {cfg.max_spend_usd})"
    except SpendNotAllowed as exc:
        verdict = "NOT allowed: " + str(exc).splitlines()[0]
        status = 1 if args.cmd == "check-spend" else 0
    report["all_models"] = {"total_usd": grand, "verdict": verdict}
    if not args.json:
        print(f"\n== all models: {'unknown' if grand is None else f'${grand:,.2f}'}\n{verdict}")
    if args.json:
        print(json.dumps(report, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
