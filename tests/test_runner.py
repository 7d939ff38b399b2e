"""``runner.run_script``: the glue of every workflow script (one-line errors, signals)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import ROOT

# A script-like job: run_script with a stand-in for Snakemake's ``snakemake`` object, whose main
# writes a large output atomically, slowly enough to be caught in the middle.
JOB = textwrap.dedent("""
    import sys, time
    from types import SimpleNamespace
    from daunce_core import store
    from daunce_core.runner import run_script

    out, log = sys.argv[1], sys.argv[2]
    snakemake = SimpleNamespace(rule="big_output", threads=1, log=[log], output=[out], config={})

    def main(sm):
        with store.atomic_path(sm.output[0]) as tmp:
            with open(tmp, "wb") as fh:
                for _ in range(600):  # up to 600 MiB: far more than the test waits for
                    fh.write(b"x" * (1 << 20))
                    fh.flush()
                    time.sleep(0.01)

    run_script(snakemake, main)
""")


def _start(tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(tmp_path / "big.bin"), str(tmp_path / "job.log")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # wait until the job is writing: a temporary of a few MiB exists
        temps = list(tmp_path.glob(".big.bin.daunce-tmp-*"))
        if temps and temps[0].stat().st_size >= 4 << 20:
            return proc
        assert proc.poll() is None, f"the job ended before it could be signalled: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated by signal 15"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_a_signalled_job_removes_its_temporary_at_once(tmp_path, sig, code, word):
    proc = _start(tmp_path)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10, "the job did not stop promptly"
    assert proc.returncode == code, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.log"], "a temporary or an output was left"
    assert "rule big_output" in err and word in err and "temporary files were removed" in err
    assert "Traceback" not in err
    assert word in (tmp_path / "job.log").read_text()


# A job's threads reach torch whether the job imports it before run_script or only inside main
# (the scripts' imports leave torch out so that jobs without torch skip its start-up).
THREADS_JOB = textwrap.dedent("""
    import importlib.util, sys
    from types import SimpleNamespace
    from daunce_core.runner import run_script

    assert "torch" not in sys.modules, "importing the runner loaded torch"
    snakemake = SimpleNamespace(rule="threads", threads=int(sys.argv[1]), log=[sys.argv[2]], output=[], config={})

    def main(sm):
        assert importlib.util.find_spec("torch") is not None  # a lookup alone imports nothing
        assert "torch" not in sys.modules, "run_script loaded torch"
        import torch
        print(torch.get_num_threads())

    run_script(snakemake, main)
""")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_jobs_threads_reach_torch_imported_inside_the_job(tmp_path, threads):
    other = 3 - threads  # torch's own default from the environment, which set_threads must override
    out = subprocess.run([sys.executable, "-c", THREADS_JOB, str(threads), str(tmp_path / "job.log")], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(other)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(min(threads, os.cpu_count()))]
