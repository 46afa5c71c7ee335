"""simclr.py and byol.py: NT-Xent by hand and in its limits, BYOL's loss, EMA and schedule, DDP, the scripts."""
import json
import math

import pytest
import torch
import torch.nn as nn

import byol
import data
import simclr
from conftest import check_exact_resume, init_gloo, run_script, spawn_two, usage_error


# ---------------------------------------------------------------------------------- NT-Xent

def test_nt_xent_hand_worked():
    # N = 2, tau = 1. Views a1 = (1, 0), a2 = (0, 1) and their twins b1 = (0.6, 0.8), b2 = (0, 1).
    # Cosines: a1.a2 = 0, a1.b1 = 0.6, a1.b2 = 0, a2.b1 = 0.8, a2.b2 = 1, b1.b2 = 0.8.
    # l(a1) = log(e^0 + e^0.6 + e^0) - 0.6   = log(3.822119) - 0.6 = 0.740805   (candidates a2, b1+, b2)
    # l(a2) = log(e^0 + e^0.8 + e^1) - 1     = log(5.943823) - 1   = 0.782352   (a1, b1, b2+)
    # l(b1) = log(e^0.6 + e^0.8 + e^0.8) - 0.6 = log(6.273241) - 0.6 = 1.236287 (a1+, a2, b2)
    # l(b2) = log(e^0 + e^1 + e^0.8) - 1     = 0.782352                        (a1, a2+, b1)
    # mean over the 2N = 4 anchors: (0.740805 + 0.782352 + 1.236287 + 0.782352) / 4 = 0.885449
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert simclr.nt_xent(z1, z2, temperature=1.0).item() == pytest.approx(0.885449, abs=1e-5)


def test_nt_xent_scale_invariant_and_symmetric():
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    a = simclr.nt_xent(z1, z2, 0.1)
    assert simclr.nt_xent(z1 * 7.5, z2 * 0.01, 0.1).item() == pytest.approx(a.item(), rel=1e-5)
    assert simclr.nt_xent(z2, z1, 0.1).item() == pytest.approx(a.item(), rel=1e-5)


def test_nt_xent_lower_limit():
    # aligned twins, orthogonal negatives: l = log(1 + (2N - 2) e^{-1/tau}) -> 0 as tau shrinks
    e = torch.eye(4)
    for tau in (1.0, 0.5, 0.1):
        expected = math.log(1 + 6 * math.exp(-1 / tau))
        assert simclr.nt_xent(e, e, tau).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)  # float32
    assert simclr.nt_xent(e, e, 0.02).item() < 1e-6  # 6 e^-50 in exact arithmetic


def test_lars_step_reduces_a_quadratic():
    w = nn.Parameter(torch.tensor([[3.0, -2.0]]))
    opt = simclr.LARS([w], lr=1.0, weight_decay=0.0)
    for _ in range(50):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert w.norm() < 3.6  # trust ratio keeps each step at eta * |w|: slow, steady, never a blow-up
    assert w.norm() < torch.tensor([3.0, -2.0]).norm()


# ---------------------------------------------------------------------------------- BYOL

def test_byol_loss_limits():
    p = torch.randn(5, 8)
    assert byol.byol_loss(p, p * 3).item() == pytest.approx(0.0, abs=1e-6)
    assert byol.byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    q = torch.tensor([[1.0, 0.0]])
    assert byol.byol_loss(q, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.0)


def test_no_gradient_reaches_the_target():
    online = byol.Online("resnet18", "none", 16, 8)
    target = byol.Target(online)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    p1, p2 = online(x1, x2)
    z1, z2 = target(x1, x2)
    (byol.byol_loss(p1, z2) + byol.byol_loss(p2, z1)).backward()
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is not None for p in online.predictor.parameters())


def test_ema_update_parameter_by_parameter():
    online = byol.Online("resnet18", "none", 16, 8)
    target = byol.Target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in target.named_parameters()}
    byol.ema_update(target, online, 0.9)
    on = dict(online.named_parameters())
    for k, v in target.named_parameters():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * on[k], atol=1e-6), k


def test_tau_schedule_end_points():
    assert byol.tau_schedule(0, 100, 0.996) == pytest.approx(0.996)
    assert byol.tau_schedule(100, 100, 0.996) == pytest.approx(1.0)
    assert byol.tau_schedule(50, 100, 0.996) == pytest.approx(0.998)


# ---------------------------------------------------------------------------------- distributed

class Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.projector = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x1, x2):
        return self.projector(self.encoder(x1)), self.projector(self.encoder(x2))


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)


def _worker(rank, world, port, out):
    dist = init_gloo(rank, world, port)
    raw = Head()
    model = nn.parallel.DistributedDataParallel(raw)
    x1, x2 = _batch()
    n = x1.shape[0] // world
    z1, z2 = model(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n])
    loss = simclr.nt_xent(z1, z2, 0.5, simclr.gather(z1, world), simclr.gather(z2, world), rank * n)
    loss.backward()
    lv = loss.detach().clone()
    dist.all_reduce(lv)
    # BYOL: a target updated by EMA from DDP-synchronised weights is the same on every rank
    target = Head()
    torch.optim.SGD(raw.parameters(), lr=0.1).step()
    byol.ema_update(target, raw, 0.9)
    flat = torch.cat([p.detach().flatten() for p in target.parameters()])
    everyone = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    if rank == 0:
        torch.save({"loss": lv / world, "grads": {k: p.grad for k, p in raw.named_parameters()},
                    "targets": everyone}, out)
    dist.destroy_process_group()


def test_ddp_simclr_matches_one_process_and_byol_targets_agree(tmp_path):
    model = Head()
    x1, x2 = _batch()
    z1, z2 = model(x1, x2)
    loss = simclr.nt_xent(z1, z2, 0.5)
    loss.backward()
    spawn_two(_worker, str(tmp_path / "d.pt"))
    got = torch.load(tmp_path / "d.pt")
    assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
    for k, p in model.named_parameters():
        assert torch.allclose(got["grads"][k], p.grad, atol=1e-5), k
    assert torch.equal(got["targets"][0], got["targets"][1])


# ---------------------------------------------------------------------------------- the scripts

SMALL = ["--size", "32", "--batch-size", "16", "--workers", "0", "--log-every", "1"]


@pytest.mark.parametrize("script", ["simclr.py", "byol.py"])
def test_help_lists_every_flag(script):
    out = run_script(script, "--help").stdout
    for f in open(script).read().split('p.add_argument("')[1:]:
        assert f.split('"')[0] in out


@pytest.mark.parametrize("script,extra", [("simclr.py", ["--proj-hidden", "64"]), ("byol.py", ["--proj-hidden", "64"]),
                                          ("simclr.py", ["--optimizer", "lars", "--lr", "0.1"])])
def test_smoke_and_checkpoint_into_torchvision(script, extra, tmp_path, demo):
    out = tmp_path / "run"
    p = run_script(script, *SMALL, *extra, "--epochs", "1", "--max-steps", "2", "--knn-every", "1", "--out", out)
    assert "checkpoint:" in p.stdout and "kNN top-1 accuracy" in p.stdout
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) and "spread" in r for r in steps)
    assert all(r["img_per_s"] > 0 for r in steps)  # counted per step, not from the bar's lagging counter
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    import torchvision

    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(ck["encoder"], strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == [] and ck["method"] == script[:-3]


@pytest.mark.parametrize("module", [simclr, byol])
@pytest.mark.parametrize("preset", data.PRESETS)
def test_every_augmentation_preset_runs(module, preset, tmp_path, demo):
    # in-process (the subprocess smoke tests above run the scripts as a user would): one step per preset
    kind = "cytology" if preset.startswith("cytology") else "xray"
    module.main([*SMALL, "--proj-hidden", "32", "--demo", kind, "--aug", preset, "--epochs", "1",
                 "--max-steps", "1", "--knn-every", "0", "--out", str(tmp_path / preset)])
    assert (tmp_path / preset / "checkpoint.pt").is_file()


def test_exact_resume(tmp_path, demo):
    # 192 train-split images / batch 32 = 6 steps an epoch (simclr.py, with DataLoader workers: the bare-resume test
    # below; the workers are data.Run's, alike in every script)
    check_exact_resume("byol.py", [*SMALL, "--batch-size", "32", "--proj-hidden", "64", "--epochs", "2",
                                   "--knn-every", "0", "--deterministic"], tmp_path, 6)


@pytest.mark.parametrize("module", [simclr, byol])
def test_demo_and_real_data_defaults(module, capsys):
    demo, real = module.get_args([]), module.get_args(["--data", "/data/x"])
    assert (demo.batch_size, demo.epochs, demo.arch, demo.size, demo.aug) == (32, 60, "resnet18", 64, "xray")
    assert (real.batch_size, real.epochs, real.arch, real.size) == (64, 100, "resnet50", 224)
    if module is byol:
        assert (demo.tau_base, real.tau_base, demo.lr, real.lr) == (0.95, 0.996, 3e-4, 1e-3)
    # an explicit 0 is an error, not a request for the default
    for flag, msg in (("--batch-size", "--batch-size must be at least 2"), ("--epochs", "--epochs must be >= 1"),
                      ("--lr", "--lr must be > 0")):
        with pytest.raises(SystemExit):
            module.get_args([flag, "0"])
        assert msg in capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    assert "--temperature must be > 0" in usage_error(simclr.get_args, ["--temperature", "0"], capsys)
    assert "--ema-base must be in [0, 1]" in usage_error(byol.get_args, ["--tau-base", "1.5"], capsys)
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.png").write_bytes(b"nor this")
    p = run_script("simclr.py", "--data", bad, "--batch-size", "2", "--out", tmp_path / "r", check=False)
    assert p.returncode != 0 and "a.png: not an image file" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("script", ["simclr.py", "byol.py", "barlow.py"])
def test_skip_bad_counts_only_readable_images(script, tmp_path, demo):
    # 3 readable images and 2 unreadable ones with --batch-size 4: the epoch would have no step, and the
    # run used to end in "UnboundLocalError: 'loss'"; it now says how many readable images are left
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(data.demo_images("xray")[:3]):
        shutil.copy(p, folder / f"good{i}.dcm")
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.png").write_bytes(b"nor this")
    p = run_script(script, "--data", folder, "--skip-bad", "--batch-size", "4", "--size", "32", "--workers", "0",
                   "--cache-dir", tmp_path / "cache", "--out", tmp_path / "r", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "--aug xray: chosen from the images" in p.stdout  # DICOMs, no --aug: not the colour preset
    assert "only 3 readable images of 5 (2 unreadable, skipped), fewer than --batch-size 4" in p.stderr
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_bare_resume_continues_the_run_as_started_with_workers(tmp_path, demo, capsys):
    # `--resume --out DIR` alone: the run's own flags (not the demo defaults), the first args.json
    # kept, and with 2 DataLoader workers the same losses step for step (workers seeded per epoch)
    args = ["--size", "32", "--batch-size", "32", "--workers", "2", "--log-every", "1", "--proj-hidden", "64",
            "--epochs", "2", "--knn-every", "0", "--deterministic"]
    record = check_exact_resume("simclr.py", args, tmp_path, 6)  # 192 train-split images / batch 32 = 6 steps an epoch
    cut = tmp_path / "cut"
    first = json.loads((cut / "args.json").read_text())
    assert (first["batch_size"], first["epochs"], first["max_steps"], first["resume"]) == (32, 2, 0, None)
    assert [r["overrides"] for r in record] == [{"max_steps": 8}, {}]
    # a flag given again overrides the saved one and is said
    p = run_script("simclr.py", "--resume", "--out", cut, "--epochs", "3", "--max-steps", "15")
    assert "at step 12 as it was started, with {'epochs': 3, 'max_steps': 15}" in p.stdout
    assert json.loads((cut / "args.json").read_text()) == first
    overrides = [json.loads(x)["overrides"] for x in (cut / "resumes.jsonl").read_text().splitlines()]
    assert overrides[-1] == {"epochs": 3, "max_steps": 15}
    # --resume without a run folder is a clear error
    assert "--resume needs --out, a run folder with its args.json" in usage_error(
        simclr.get_args, ["--resume", "--out", tmp_path / "nothing"], capsys)


def test_lars_in_byol_and_barlow_steps_as_simclrs():
    # the three scripts each carry LARS (one file a method): the copies must step alike, weight decay and
    # trust ratio on matrices only, plain momentum SGD on 1-D parameters (biases, BatchNorm)
    import barlow

    def run(cls):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
        opt = cls(net.parameters(), lr=0.1, weight_decay=1e-2)
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 4)).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    ref = run(simclr.LARS)
    for cls in (byol.LARS, barlow.LARS):
        assert all(torch.equal(a, b) for a, b in zip(ref, run(cls)))


@pytest.mark.parametrize("script,extra", [("byol.py", ["--proj-hidden", "32"]), ("barlow.py", ["--projector", "32-32"])])
def test_byol_and_barlow_with_lars(script, extra, tmp_path, demo):
    out = tmp_path / "lars"
    run_script(script, *SMALL, *extra, "--optimizer", "lars", "--lr", "0.1", "--epochs", "1", "--max-steps", "2",
               "--knn-every", "0", "--out", out)
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert json.loads((out / "args.json").read_text())["optimizer"] == "lars"


def test_clahe_flag_runs_with_scikit_image_or_says_what_to_install(tmp_path, demo):
    try:
        import skimage  # noqa: F401
    except ImportError:
        has = False
    else:
        has = True
    p = run_script("simclr.py", *SMALL, "--clahe", "--proj-hidden", "32", "--epochs", "1", "--max-steps", "1",
                   "--knn-every", "0", "--cache-dir", "", "--out", tmp_path / "c", check=False)
    if has:
        assert p.returncode == 0 and len([r for r in map(json.loads, (tmp_path / "c" / "log.jsonl").read_text()
                                                          .splitlines()) if "loss" in r]) == 1
    else:
        assert p.returncode != 0 and "pip install scikit-image" in p.stderr and "Traceback" not in p.stderr
