"""The demo defaults that were once chosen on the test split, chosen again on the validation split.

Each candidate setting is pretrained on the demo radiographs (the scripts' defaults but for the flags
named) over pretraining seeds, then every run is scored by one `finetune.py --task rsna --score val`:
a linear probe on 10 % and 100 % of the labels, probe seeds 0-2, scored on the validation split; the
test split is never read. Writes results/demo-tuning.json and prints one line per setting (mean over
pretraining seeds of the probe's mean AUC), the figures the choices in RESULTS.md rest on.

    python benchmarks/demo_tuning.py --jobs 2          # ~1 h on 2 CPU cores

The questions: BYOL's demo tau and lr (0.95, 3e-4) against the paper's (0.996, 1e-3); the xray
preset's brightness / contrast jitter (0.3) against 0.2 and 0.45; whether the chessboard mask joins the
xray preset (SimCLR and BYOL). A finished run is not run again; a run cut short continues.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# setting -> (script, flags, xray jitter); jitter has no flag: data.BatchAugment's keyword, set for that run only
SETTINGS = {
    "byol (demo: tau 0.95, lr 3e-4)": ("byol.py", [], None),
    "byol, paper tau 0.996 and lr 1e-3": ("byol.py", ["--tau-base", "0.996", "--lr", "1e-3"], None),
    "byol, jitter 0.2": ("byol.py", [], 0.2),
    "byol, jitter 0.45": ("byol.py", [], 0.45),
    "byol, xray-chessboard": ("byol.py", ["--aug", "xray-chessboard"], None),
    "simclr (demo)": ("simclr.py", [], None),
    "simclr, xray-chessboard": ("simclr.py", ["--aug", "xray-chessboard"], None),
}
THREE_SEEDS = {"byol (demo: tau 0.95, lr 3e-4)", "byol, paper tau 0.996 and lr 1e-3"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), help="which settings to run")
    p.add_argument("--seeds", type=int, default=2, help="pretraining seeds 0..N-1 (3 for BYOL's tau/lr question)")
    p.add_argument("--jobs", type=int, default=1, help="pretraining runs at a time (each gets cores / jobs threads)")
    p.add_argument("--runs", default="runs/demo-tuning", help="folder of the run folders")
    p.add_argument("--out", default="results/demo-tuning.json", help="the JSON written")
    p.add_argument("extra", nargs="*", help="after --: arguments for every pretraining run (e.g. --epochs 1 for a smoke test)")
    return p.parse_args(argv)


def folder_name(setting, seed):
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in setting) + f"-s{seed}"


def pretrain(setting, seed, args):
    script, flags, jitter = SETTINGS[setting]
    folder = Path(args.runs) / folder_name(setting, seed)
    if (folder / "done").exists():
        return folder
    argv = [*flags, "--seed", str(seed), "--out", str(folder), "--workers", "1", "--resume", "auto", *args.extra]
    if jitter is None:
        cmd = [sys.executable, str(ROOT / script), *argv]
    else:  # the preset's jitter is not a flag: this run's BatchAugment gets it as a keyword
        code = (f"import functools, sys, data, {script[:-3]} as m; "
                f"data.BatchAugment = functools.partial(data.BatchAugment, jitter={jitter}); "
                f"print('xray jitter', data.BatchAugment.keywords['jitter']); m.main(sys.argv[1:])")
        cmd = [sys.executable, "-c", code, *argv]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout.txt", "a") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}); see {folder / 'stdout.txt'}")
    (folder / "done").write_text("")
    return folder


def main(argv=None):
    args = get_args(argv)
    jobs = [(s, seed) for s in args.settings for seed in range(args.seeds + (s in THREE_SEEDS))]
    with ThreadPoolExecutor(args.jobs) as pool:
        folders = list(pool.map(lambda js: pretrain(*js, args), jobs))
    probe = Path(args.runs) / "probe"
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--task", "rsna", "--score", "val", "--mode", "linear",
           "--fractions", "0.1", "1.0", "--seeds", "0", "1", "2", "--init", "random", "--bootstrap", "0",
           "--out", str(probe), "--resume"]
    for (s, seed), folder in zip(jobs, folders):
        cmd += ["--ckpt", f"{s} #{seed}={folder / 'checkpoint.pt'}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    cells = json.loads((probe / "results.json").read_text())
    rows = []
    for s in ["random"] + args.settings:
        runs = sorted({c["method"] for c in cells if c["method"] == s or c["method"].startswith(s + " #")})
        row = {"setting": s, "pretraining_seeds": len(runs)}
        for f in (0.1, 1.0):
            per_run = [np.mean([c["auc"] for c in cells if c["method"] == r and c["fraction"] == f]) for r in runs]
            row[f"val_auc_{f:g}"] = [round(float(a), 4) for a in per_run]
            row[f"val_auc_{f:g}_mean"] = round(float(np.mean(per_run)), 4)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"scored": "val (finetune.py --score val; the test split never read)",
                                          "command": " ".join(sys.argv[1:]), "settings": rows}, indent=1))
    print(f"{'setting':40s} {'seeds':>5s} {'AUC 10 %':>9s} {'AUC 100 %':>9s}   per pretraining seed (10 % | 100 %)")
    for r in rows:
        print(f"{r['setting']:40s} {r['pretraining_seeds']:5d} {r['val_auc_0.1_mean']:9.3f} {r['val_auc_1_mean']:9.3f}   "
              f"{r['val_auc_0.1']} | {r['val_auc_1']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
