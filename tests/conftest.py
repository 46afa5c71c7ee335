"""Shared fixtures: one demo data set and one decode cache per test session, in a temp folder.

The environment variables are set before any test runs, so scripts started as
subprocesses by the smoke tests find the same demo data and never touch ~/.cache.
"""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_TMP = tempfile.mkdtemp(prefix="medssl-tests-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)  # the session's demo data and cache go with it
os.environ["MEDSSL_DEMO_DIR"] = os.path.join(_TMP, "demo")
os.environ["MEDSSL_CACHE"] = os.path.join(_TMP, "cache")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may download
os.environ["MEDSSL_NO_CURVES"] = "1"  # ~1 s of matplotlib a run, times the suite's runs; tests/test_curves.py draws
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a claim that takes minutes (the main job end to end): -m slow runs it")


def pytest_collection_modifyitems(config, items):
    """`pytest -q` leaves the slow claims out (said as skipped); `pytest -m slow` runs them (CI does both)."""
    if "slow" not in (config.getoption("-m") or ""):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="minutes long: python -m pytest -q -m slow runs it"))


@pytest.fixture(scope="session")
def demo():
    import data

    return data.demo_root()


def run_script(*args, timeout=600, cwd=None, check=True, env=None):
    """Run a project script as a user would, in a subprocess; return the CompletedProcess."""
    cmd = [sys.executable, *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else {**os.environ, **env})
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def usage_error(get_args, argv, capsys):
    """A script's get_args(argv) in process: argparse's exit 2, and what it printed to stderr (a subprocess would
    only add the interpreter's start)."""
    with pytest.raises(SystemExit) as e:
        get_args([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def logged_losses(run_dir):
    """(step, loss) of every logged step in a run folder's log.jsonl."""
    import json

    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def check_exact_resume(script, args, tmp_path, steps_per_epoch, rel=1e-5):
    """A 2-epoch run (`args`) stopped by SIGTERM to its process group once it has logged two steps, resumed with a bare
    `--resume --out DIR` and cut there by --max-steps two steps into epoch 1, then resumed bare again to its
    end, logs the same losses, step for step, as the same run uninterrupted. Both cuts fall inside an
    epoch: the resumed runs must skip exactly the batches done and draw what the whole run drew."""
    import json
    import signal
    import time

    import torch

    one = {**os.environ, "OMP_NUM_THREADS": "1"}  # the whole run beside the cut one, each on one core
    full = subprocess.Popen([sys.executable, script, *map(str, args), "--out", str(tmp_path / "full")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one)
    cut = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, script, *map(str, args), "--out", str(cut)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (cut / "log.jsonl").is_file() and len(logged_losses(cut)) >= 2:
            os.killpg(p.pid, signal.SIGTERM)  # the whole process group, DataLoader workers too, as Slurm signals
            break
        time.sleep(0.02)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1 and "stopped by SIGTERM at step" in err, (p.returncode, out[-2000:], err[-2000:])
    stopped = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert stopped["step"] == len(logged_losses(cut)) < 2 * steps_per_epoch
    run_script(script, "--resume", "--out", cut, "--max-steps", steps_per_epoch + 2, env=one)
    ck = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["epoch_step"], ck["epoch_done"]) == (1, 2, False)
    run_script(script, "--resume", "--out", cut, env=one)
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-3000:]
    full, resumed = logged_losses(tmp_path / "full"), logged_losses(cut)
    assert len(full) == 2 * steps_per_epoch and [s for s, _ in resumed] == [s for s, _ in full]
    for (_, a), (_, b) in zip(full, resumed):
        assert abs(a - b) <= rel * max(abs(a), 1e-12), (a, b)
    return [json.loads(x) for x in (cut / "resumes.jsonl").read_text().splitlines()]


def spawn_two(worker, *args):
    """Run worker(rank, 2, port, *args) in two processes, port a free loopback port for gloo."""
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(2, port, *args), nprocs=2)


def init_gloo(rank, world, port):
    """The process group of one spawn_two worker."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return dist
