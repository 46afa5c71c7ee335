"""Runs that survive the cluster: one command line that starts a run and continues it after any stop (--resume
auto, as torchrun --max-restarts and a requeued Slurm script repeat it), exact resume on every rank, flags given on
resume, the demo's build and the log after a crash. (A stop signal to the whole process group with DataLoader
workers on: conftest.check_exact_resume, which every script's exact-resume test runs.)"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import simclr
from conftest import ROOT, logged_losses, run_script, usage_error

# 192 train-split images / batch 16 = 12 steps an epoch
TINY = ["--size", "32", "--batch-size", "16", "--proj-hidden", "32", "--log-every", "1", "--knn-every", "0"]
ONE = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(cmd, out, **kw):
    """A job in a process group of its own, as a Slurm step or a terminal's job is."""
    return subprocess.Popen([*map(str, cmd), "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ONE, start_new_session=True, **kw)


def wait_for_steps(out, n, p, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if (out / "log.jsonl").is_file() and len(logged_losses(out)) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{out}: fewer than {n} steps logged ({p.poll()})")


def assert_same_run(a, b):
    la, lb = logged_losses(a), logged_losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb], (la, lb)
    for (s, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-5), (s, x, y)


def children(pid):
    """The pids whose parent is `pid` (torchrun's agent: its workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def rank_of(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, demo):
    """The uninterrupted 2-rank run (torchrun, gloo) that every cut 2-rank run must log step for step."""
    out = tmp_path_factory.mktemp("ranks") / "full"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "simclr.py", *TINY,
               "--epochs", "1", "--workers", "0", "--out", out, env={"OMP_NUM_THREADS": "1"})
    return out


def torchrun(*args, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", "simclr.py", *TINY, "--epochs", "1", "--workers", "0", *args]


def test_a_rank_killed_under_torchrun_restarts_with_the_same_command_and_every_rank_resumes_exactly(tmp_path,
                                                                                                   two_ranks):
    # torchrun --max-restarts restarts every worker with the same arguments after one dies (SIGKILL: no handler
    # runs); --resume auto makes that command continue from the last checkpoint instead of refusing the folder.
    # Before, the restarted ranks also read the dead ranks' addresses from torchrun's store and never connected,
    # and a checkpoint held rank 0's random states and loss sum alone: rank 1 drew rank 0's views for the rest of
    # the epoch (2.790 against 2.681 at the first step after a cut)
    cut = tmp_path / "cut"
    p = start(torchrun("--resume", "auto", "--save-every", "3", restarts=1), cut)
    wait_for_steps(cut, 5, p)
    rank1 = [c for c in children(p.pid) if rank_of(c) == 1]
    assert rank1, "torchrun's rank 1 not found"
    os.kill(rank1[0], signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    resumed = [json.loads(x)["step"] for x in (cut / "resumes.jsonl").read_text().splitlines()]
    assert "resuming" in out and len(resumed) == 1 and resumed[0] in (3, 6, 9)  # inside the 12-step epoch
    ck = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert len(ck["ranks"]) == 2 and not torch.equal(ck["ranks"][0]["rng"]["views"], ck["ranks"][1]["rng"]["views"])
    assert_same_run(two_ranks, cut)


def test_lr_given_on_resume_takes_effect_other_flags_are_refused_and_the_log_reads_as_one_run(tmp_path, demo, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "1", "--workers", "0", "--save-every", "3", "--out", str(out)]
    simclr.main([*args, "--max-steps", "4"])  # checkpoints at steps 3 and 4
    # a crash after the checkpoint at step 4 had logged steps 5 and 6: the resumed run logs them again
    crash = [json.dumps({"step": s, "epoch": 0, "loss": 99.0, "lr": 1.0}) + "\n" for s in (5, 6)]
    crash.insert(1, "{not json, as a disk error might leave\n")  # moved aside too, not a stop
    with open(out / "log.jsonl", "a") as f:
        f.writelines(crash)
    simclr.main([*args, "--resume", "--lr", "0.05", "--weight-decay", "0.5", "--max-steps", "6"])
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6] and 99.0 not in [r["loss"] for r in lines if "loss" in r]
    assert (out / "log.superseded.jsonl").read_text().splitlines(keepends=True) == crash
    # 12 steps, warm-up max(1, int(0.05 x 12)) = 1 step, then cosine: after step s the lr is
    # base x 0.5 (1 + cos(pi (s - 1) / 11)); steps 5 and 6 on the new base 0.05, step 4 on the old 1e-3
    lr = {r["step"]: r["lr"] for r in lines if "loss" in r}
    assert lr[4] == pytest.approx(1e-3 * simclr.lr_factor(4, 12, 1))
    for s in (5, 6):
        assert lr[s] == pytest.approx(0.05 * simclr.lr_factor(s, 12, 1))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {g["weight_decay"] for g in ck["optimizer"]["param_groups"]} == {0.5}
    assert ck["scheduler"]["base_lrs"] == [0.05]
    # a later plain resume keeps what the last one changed (it is in resumes.jsonl), rather than going back
    simclr.main([*args, "--resume", "--max-steps", "7"])
    lr = {r["step"]: r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}
    assert lr[7] == pytest.approx(0.05 * simclr.lr_factor(7, 12, 1))
    # what a checkpoint holds cannot change on resume: one line naming the flag, never "applied"
    err = usage_error(simclr.get_args, [*args, "--resume", "--arch", "resnet50"], capsys)
    assert "--arch was 'resnet18' when" in err and "cannot change on a resume" in err
    assert "--resume auto needs --out" in usage_error(simclr.get_args, ["--resume", "auto"], capsys)
    # SIGUSR1 (sbatch --signal=USR1@120) is a stop too, beside TERM and INT
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1} <= set(data.Run(simclr.get_args(TINY), "x").stop_signals)
    assert "--stop-signals: KILL is not a signal a process can catch" in usage_error(
        simclr.get_args, ["--stop-signals", "TERM,KILL"], capsys)


def test_the_demo_build_draws_nothing_from_the_global_generators(tmp_path, monkeypatch):
    # before, the demo's GaussianBlur drew its sigma from torch's global generator after Run had seeded it: the
    # first run on a new machine (the one that builds the demo) logged 3.2363 at step 1, every later run 3.6254
    monkeypatch.setenv("MEDSSL_DEMO_DIR", str(tmp_path / "fresh"))
    torch.manual_seed(0)
    np.random.seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    data.demo_root(size=32)  # small: the same draws
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
