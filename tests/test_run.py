"""data.py's run mechanics, as every script uses them: checkpoints that cannot run code, clear lines for a
checkpoint from elsewhere, resume from a checkpoint written before resume inside an epoch, SIGTERM,
ConVIRT's temperature at the batch sizes users run, the sizes we hold, and one script copied alone."""
import ast
import json
import math
import re
import shutil

import pytest
import torch

import data
from conftest import ROOT, logged_losses, run_script

SMALL = ["--size", "32", "--batch-size", "16", "--workers", "0", "--log-every", "1", "--knn-every", "0"]


class Evil:
    """Unpickling this runs `touch PATH`: what a shared checkpoint could carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


def test_a_checkpoint_that_carries_code_is_refused_and_runs_nothing(tmp_path, demo):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"method": "simclr", "arch": "resnet18", "encoder": {}, "payload": Evil(marker)}, evil)
    with pytest.raises(ValueError, match=re.escape(f"{evil}: refused")):
        data.load_checkpoint(evil)
    p = run_script("finetune.py", "--ckpt", evil, "--size", "32", "--workers", "0", "--out", tmp_path / "ft",
                   check=False)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr and str(evil) in lines[-1] and "refused" in lines[-1]
    # the same file as a run's checkpoint, resumed
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"batch_size": 16, "epochs": 1}))
    shutil.copy(evil, run / "checkpoint.pt")
    p = run_script("simclr.py", "--resume", "--out", run, check=False)  # the flags: the run's args.json
    assert p.returncode != 0 and "Traceback" not in p.stderr and "refused" in p.stderr
    assert not marker.exists()


def test_a_checkpoint_from_elsewhere_gives_one_line(tmp_path, demo):
    run_script("simclr.py", *SMALL, "--proj-hidden", "32", "--epochs", "1", "--max-steps", "1", "--out", tmp_path / "s")
    ck = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)
    with pytest.raises(ValueError, match="expected a resnet50 encoder \\(--arch\\), found a resnet18 encoder"):
        data.encoder_from_checkpoint(tmp_path / "s" / "checkpoint.pt", "resnet50")
    torch.save({k: v for k, v in ck.items() if k != "arch"}, tmp_path / "noarch.pt")  # no arch said: the weights tell
    with pytest.raises(ValueError, match="noarch.pt: expected a resnet50 encoder \\(--arch\\), found weights that do"):
        data.encoder_from_checkpoint(tmp_path / "noarch.pt", "resnet50")
    torch.save({**ck, "encoder": {}}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty.pt: holds no image encoder"):
        data.encoder_from_checkpoint(tmp_path / "empty.pt", "resnet18")
    p = run_script("finetune.py", "--ckpt", tmp_path / "s" / "checkpoint.pt", "--arch", "resnet50", "--size", "32",
                   "--workers", "0", "--out", tmp_path / "ft", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "checkpoint.pt: expected a resnet50 encoder (--arch), found a resnet18 encoder" in p.stderr


def test_a_checkpoint_written_before_resume_inside_an_epoch_still_resumes(tmp_path, demo):
    # the keys a checkpoint had before this change: no epoch_step, epoch_done, loss_sum or random states;
    # it was written at an epoch's end, so the run goes on at the next epoch, from the same step
    out = tmp_path / "old"
    run_script("byol.py", *SMALL, "--batch-size", "32", "--proj-hidden", "32", "--epochs", "2", "--max-steps", "6",
               "--out", out)  # 192 images / batch 32: 6 steps an epoch
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step"], ck["epoch_done"]) == (0, 6, True)
    torch.save({k: v for k, v in ck.items() if k not in ("epoch_step", "epoch_done", "loss_sum", "rng")},
               out / "checkpoint.pt")
    run_script("byol.py", "--resume", "--out", out)
    assert [s for s, _ in logged_losses(out)] == list(range(1, 13))


def test_save_every_and_sigint(tmp_path, demo):
    # --save-every 5: checkpoints inside the epoch, each a place to resume from
    out = tmp_path / "every"
    run_script("simclr.py", *SMALL, "--proj-hidden", "32", "--epochs", "1", "--max-steps", "7", "--save-every", "5",
               "--out", out)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ck["step"], ck["epoch_step"], ck["epoch_done"]) == (7, 7, False)
    assert set(ck["ranks"][0]["rng"]) >= {"torch", "views"} and ck["ranks"][0]["loss_sum"].shape == ()


def test_convirt_temperature_trains_at_batch_256(tmp_path, demo, monkeypatch):
    # At N = 256 the heuristic's floor 2 log(255) = 11.08 is above --t-init 10. Bounded inside the graph
    # (t = exp(t').clamp(min=floor)), t' got a gradient of exactly 0 and never trained; bounded on the
    # parameter after the step, t starts at the floor, t' gets its gradient, and the bound holds t there
    # while that gradient points down (on these pairs it does in the first steps: dL/dt' ~ +0.03).
    import csv

    import convirt

    paths, reports, _ = data.demo_pairs(split="train")
    with open(tmp_path / "pairs.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(["path", "report"])
        w.writerows((paths[i % len(paths)], reports[i % len(paths)]) for i in range(256))
    grads, real = [], torch.optim.AdamW.step

    def step(self, *a, **k):  # the scripts' optimiser: the last group holds t' and b (no weight decay)
        grads.append(float(self.param_groups[-1]["params"][0].grad))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "t"
    convirt.main(["--data", str(tmp_path / "pairs.csv"), "--arch", "resnet18", "--size", "16", "--batch-size", "256",
                  "--workers", "0", "--log-every", "1", "--epochs", "2", "--eval-every", "0", "--proj-dim", "16",
                  "--out", str(out)])
    floor = 2 * math.log(255)
    assert len(grads) == 2 and all(g != 0 for g in grads)  # t' trains from step 1
    ts = [r["t"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "t" in r]
    assert ts[0] == pytest.approx(floor, rel=1e-6)  # the logged t is the one step 1's loss used
    t_prime = torch.load(out / "checkpoint.pt", weights_only=True)["model"]["t_prime"]
    assert math.exp(float(t_prime)) >= floor * (1 - 1e-6) and all(t >= floor * (1 - 1e-6) for t in ts)


# ---------------------------------------------------------------------------------- sizes and a copied script

SIZES = {"simclr.py": 300, "byol.py": 340, "barlow.py": 350, "convirt.py": 560, "finetune.py": 850}
MAIN = {"simclr.py": 100, "byol.py": 100, "barlow.py": 100, "convirt.py": 150}


def test_data_py_holds_its_size():  # the demo generator lives in demo.py
    lines = (ROOT / "data.py").read_text().splitlines()
    assert not [i + 1 for i, x in enumerate(lines) if len(x) > 120]
    assert len(lines) <= 1500, f"data.py: {len(lines)} lines"


@pytest.mark.parametrize("script", sorted(SIZES))
def test_the_sizes_we_hold(script):
    src = (ROOT / script).read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    assert len(lines) <= SIZES[script], f"{script}: {len(lines)} lines"
    long = [i + 1 for i, x in enumerate(lines) if len(x) > 120]
    assert not long, f"{script}: lines over 120 characters: {long}"
    doc = ast.get_docstring(tree, clean=False)
    assert doc and len(doc.splitlines()) <= 25, f"{script}: module docstring of {len(doc.splitlines())} lines"
    if script in MAIN:
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        assert main.end_lineno - main.lineno + 1 <= MAIN[script]
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    # the one exception (README): finetune.py's zero-shot loads the image-text model with convirt.load, in a function
    allowed = {"convirt"} if script == "finetune.py" else set()
    assert not imports & {"simclr", "byol", "barlow", "convirt", "finetune", "demo"} - allowed, "scripts share data.py"
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not top & {"simclr", "byol", "barlow", "convirt", "finetune", "demo"}, "no script imports another at the top"


def test_one_script_copied_alone_runs_on_a_few_dicoms(tmp_path, demo):
    # a user copies simclr.py and data.py into an empty folder and points --data at a few DICOMs
    work = tmp_path / "mine"
    (work / "dicoms").mkdir(parents=True)
    for name in ("simclr.py", "data.py"):
        shutil.copy(ROOT / name, work / name)
    for i, p in enumerate(data.demo_images("xray")[:8]):
        shutil.copy(p, work / "dicoms" / f"{i}.dcm")
    p = run_script(work / "simclr.py", "--data", "dicoms", "--size", "32", "--batch-size", "4", "--arch", "resnet18",
                   "--workers", "0", "--max-steps", "2", "--knn-every", "0", "--proj-hidden", "32", "--log-every", "1",
                   "--cache-dir", "", "--out", "run", cwd=work)
    assert "checkpoint:" in p.stdout and len(logged_losses(work / "run")) == 2
    assert not (work / "demo.py").exists() and not (work / "runs").exists()
    assert "no curves.png: demo.py, which draws them, is not beside data.py" in p.stderr


def test_every_flag_the_readme_names_is_in_that_scripts_help(capsys):
    import importlib

    scripts = ["convirt", "simclr", "byol", "barlow", "finetune"]
    helps = {}
    for name in scripts:
        with pytest.raises(SystemExit):
            importlib.import_module(name).get_args(["--help"])
        helps[name] = capsys.readouterr().out
    with pytest.raises(SystemExit):
        data._demo().main(["--help"])  # data.py's command line lives in demo.py: each of its commands' help
    commands = re.search(r"\{([\w,-]+)\}", capsys.readouterr().out).group(1).split(",")
    for command in commands:
        with pytest.raises(SystemExit):
            data._demo().main([command, "--help"])
    helps["data"] = capsys.readouterr().out
    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w=-]*_)")
    named, section = [], scripts
    in_code = False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("#"):
            section = [s for s in scripts if f"{s}.py" in line] or scripts
        in_code ^= line.startswith("```")
        # a command names its script: the flags after `NAME.py` are that script's
        commands = list(re.finditer(r"\b(convirt|simclr|byol|barlow|finetune|data)\.py([^`|]*)", line))
        for m in commands:
            named += [([m.group(1)], f, line) for f in flag.findall(m.group(2))]
        rest = re.sub(r"\b(convirt|simclr|byol|barlow|finetune|data)\.py[^`|]*", "", line)
        spans = [rest] if in_code else re.findall(r"`([^`]*)`", rest)
        named += [(section, f, line) for s in spans for f in flag.findall(s)
                  if not s.startswith(("torchrun", "#SBATCH"))]  # their own flags
    assert len(named) > 40
    missing = [(f, line) for owners, f, line in named if not any(re.search(rf"{f}\b(?!-)", helps[o]) for o in owners)]
    assert not missing, missing


def test_resumable_sampler_starts_inside_the_epoch_without_the_batches_done():
    ds = list(range(50))
    full = data.ResumableSampler(ds, 2, 1, shuffle=True, seed=3, drop_last=True)
    full.set_epoch(4)
    order = list(full)
    cut = data.ResumableSampler(ds, 2, 1, shuffle=True, seed=3, drop_last=True)
    cut.set_epoch(4)
    cut.skip = 10
    assert list(cut) == order[10:] and len(cut) == len(order) - 10 == 15
