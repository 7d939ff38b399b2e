#!/usr/bin/env python
"""The perturbed ResNet-9 chunk (``bench_retrain.measure_perturbed``) under each speed option --
bf16 + channels_last, bf16, fp32, and bf16 + channels_last with cuDNN off -- so that one run on a
GPU shows which precision and layout each trainer path accepts there. Writes
``$OUT/perturbed_diag.json`` (default /tmp) after each option; ``--tiny`` runs toy sizes on the CPU.

    python benchmarks/gpu_speed_options.py            # on a GPU (about a minute on an H200)
    python benchmarks/gpu_speed_options.py --tiny     # the same code on the CPU
"""
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_retrain as BR  # noqa: E402

E = BR.E


def main() -> None:
    tiny = "--tiny" in sys.argv
    dev = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    exp = BR.load_config()
    width, n, n_eval, models = (0.125, 64, 32, 2) if tiny else (1.0, 10000, 10000, exp.daunce.chunk_size)
    daunce = dataclasses.replace(exp.daunce, batch_size=16) if tiny else exp.daunce
    out = {}
    for name, speed, cudnn in [("bf16+cl", E.Speed("bf16", True, False), True),
                               ("bf16", E.Speed("bf16", False, False), True),
                               ("fp32", E.Speed("fp32", False, False), True),
                               ("bf16+cl,cudnn off", E.Speed("bf16", True, False), False)]:
        torch.backends.cudnn.enabled = cudnn
        t = time.perf_counter()
        try:
            r = BR.measure_perturbed(dev, daunce, width=width, models=models, n=n, n_eval=n_eval, speed=speed)
        except Exception:
            r = {"error": traceback.format_exc()[-6000:]}
        r["wall"] = time.perf_counter() - t
        out[name] = r
        print(name, {k: r.get(k) for k in ("fit_images_per_s", "predict_images_per_s", "fit_peak_mb", "wall")},
              (r.get("error") or "")[-600:], flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        Path(os.environ.get("OUT", "/tmp"), "perturbed_diag.json").write_text(json.dumps(out, indent=1))
    torch.backends.cudnn.enabled = True


if __name__ == "__main__":
    main()
