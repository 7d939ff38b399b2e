"""benchmarks/gpu_check.sh and benchmarks/bench_retrain.py: the prepared GPU check runs its
whole code path at toy sizes on a CPU and writes the report the cost table reads; the
projection multiplies the config's sizes by the measured rates."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT


def _bench_retrain():
    spec = importlib.util.spec_from_file_location("bench_retrain", ROOT / "benchmarks" / "bench_retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_gpu_check_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--threads", "2", "--llm", "llama-3.1-8b", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "daunce-gpu-check/1"
    assert doc["complete"] is True and doc["tiny"] is True
    assert doc["gpu_estimate"] is False and "NOT a GPU estimate" in doc["note"]
    assert {"name", "device", "torch", "peak_memory"} <= set(doc["device"])

    v = doc["vision"]
    for k in ("theta_0", "lds_chunk"):
        assert {"images_per_s", "images_per_s_per_model", "peak_mb", "mode", "models"} <= set(v[k]), v[k]
        assert v[k]["images_per_s"] > 0 and v[k]["peak_mb"] > 0
    assert v["lds_chunk"]["models"] == 2
    assert math.isclose(v["lds_chunk"]["images_per_s_per_model"] * 2, v["lds_chunk"]["images_per_s"])
    assert {"fit_images_per_s", "predict_images_per_s", "fit_peak_mb"} <= set(v["perturbed"])
    assert v["projection"]["device_hours"]["Figure 1a (baselines not included)"] > 0

    llm = doc["llm"]["llama-3.1-8b"]
    assert llm["real_layers"] == 32 and llm["dtype"] == "bfloat16"
    assert set(llm["measured"]) == {"1", "2"}
    for layers, got in llm["measured"].items():
        for what in ("lora", "full"):
            assert got[what]["tokens_per_s"] > 0 and got[what]["peak_mb"] > 0, (layers, what, got[what])
    assert llm["measured"]["2"]["signals"]["tokens_per_s"] > 0
    for got in llm["measured"].values():
        assert got["generate"]["new_tokens"] == 4 and got["generate"]["tokens_per_s"] > 0, got["generate"]
    assert set(llm["projected_peak_mb"]) == {"lora", "full"}
    assert all(v is not None for v in llm["projected_peak_mb"].values())
    assert llm["projected_generate_tokens_per_s"] > 0
    # the printed summary names the same figures and says they are not GPU figures
    assert "NOT GPU figures" in proc.stdout and "tokens/s" in proc.stdout and "images/s" in proc.stdout

    # the cost table reads such a report once a GPU made it (marked as one here to test the path)
    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_gpu_cost as G

    doc["gpu_estimate"] = True
    (tmp_path / "measured.json").write_text(json.dumps(doc))
    block = G.render(measured=tmp_path / "measured.json")
    assert "MEASURED rates" in block and "(ESTIMATE)" not in block
    rate = llm["projected_generate_tokens_per_s"]
    row = next(line for line in block.splitlines() if line.startswith("| `config/paper/llm_ifeval.yaml`"))
    tokens, hours = (c.strip() for c in row.strip("|").split("|")[4:6])
    assert hours != "not measured" and tokens.endswith(" M")
    assert abs(float(hours.replace(",", "")) - 57 * 200 * 1280 / rate / 3600) <= 0.051  # Llama-3.1-8B's rate
    assert "projected per-GPU peak memory" in block


def test_gpu_check_refuses_full_sizes_on_a_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "--tiny" in proc.stderr


def test_projection_multiplies_the_paper_sizes_by_the_rates():
    BR = _bench_retrain()
    exp = BR.load_config()
    p = BR.project(exp, base={"images_per_s": 1000.0}, lds={"images_per_s": 2000.0},
                   perturbed={"fit_images_per_s": 500.0, "predict_images_per_s": 4000.0})
    # theta_0: 24 epochs of the 50,000 images in whole batches of 512
    assert math.isclose(p["base_job_min"], 24 * (50_000 // 512) * 512 / 1000 / 60)
    # the ground truth: (M + M_select) x seeds retrains on alpha * n = 25,000 images
    per_retrain = 24 * (25_000 // 512) * 512 / 2000
    assert math.isclose(p["device_hours"]["LDS ground truth (test + selection masks)"], 2200 * per_retrain / 3600)
    assert p["lds_chunk_jobs"] == 110
    # a perturbed job: 5 lr x (50 models x 117 steps x 128 images fitted + 50 x 60,000 predicted)
    job_s = 5 * (50 * 117 * 128 / 500 + 50 * 60_000 / 4000)
    assert math.isclose(p["perturbed_chunk_job_min"], job_s / 60)
    assert p["perturbed_chunk_jobs"] == 24
    hours = p["device_hours"]
    assert math.isclose(hours["Figure 1a (baselines not included)"],
                        hours["theta_0 (base)"] + hours["LDS ground truth (test + selection masks)"]
                        + 3 * 4 * job_s / 3600)
