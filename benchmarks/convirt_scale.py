"""ConVIRT's sigmoid heuristic side by side with plain SigLIP, t 1 / b 0 and softmax, over seeds.

Runs convirt.py once per (variant, seed) as a user would, reads each run's log.jsonl and writes
results/convirt-scale.json (GPU; results/convirt-scale-cpu.json on the CPU): {"device", "command",
"runs": [{"variant", "arch", "size", "seed", "final_loss", "collapse_loss", "final_spread",
"i2i_p_at_k", "t2i_p_at_k", "chance", "collapsed"}]}
(final_loss: the last epoch's mean loss, the figure the run's own verdict reads),
then a figure of loss / collapse value and spread against step for the four variants.

    python benchmarks/convirt_scale.py                          # demo: ResNet-18, 64 px, CPU, seeds 0-4
    python benchmarks/convirt_scale.py --jobs 2                 # two runs at a time, one thread each
    python data.py demo /tmp/pairs --studies 4096 --size 256    # then, on a GPU, ResNet-50 at 224 px:
    python benchmarks/convirt_scale.py --device cuda --arch resnet50 --size 224 --seeds 0 1 2 -- \\
        --data /tmp/pairs/mimic --split-csv /tmp/pairs/mimic/mimic-cxr-2.0.0-split.csv \\
        --eval-labels /tmp/pairs/mimic/validate-chexpert.csv --eval-root /tmp/pairs/mimic --workers 16
    python benchmarks/convirt_scale.py --plot-only              # the figure from the JSON's runs

A finished run (its log ends with the collapse verdict) is read, not run again. Arguments after
`--` go to every convirt.py run.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # the flags that make each variant; everything else is convirt.py's defaults
    "heuristic": ["--loss", "sigmoid"],
    "siglip-init": ["--loss", "sigmoid", "--no-heuristic"],  # SigLIP's t 10, b -10
    "t1b0": ["--loss", "sigmoid", "--no-heuristic", "--t-init", "1", "--b-init", "0"],
    "softmax": ["--loss", "softmax"],
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="what to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="pretraining seeds")
    p.add_argument("--device", default="cpu", help="convirt.py --device")
    p.add_argument("--arch", default="resnet18", help="convirt.py --arch")
    p.add_argument("--size", type=int, default=64, help="convirt.py --size")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (CPU: each gets cores / jobs threads)")
    p.add_argument("--runs", default="runs/convirt-scale", help="folder of the run folders")
    p.add_argument("--out", default=None,
                   help="the JSON written (default results/convirt-scale.json; results/convirt-scale-cpu.json on the CPU)")
    p.add_argument("--figure", default=None, help="the figure written (default: the JSON's name with .png)")
    p.add_argument("--plot-only", action="store_true", help="only draw the figure from --out")
    p.add_argument("extra", nargs="*", help="after --: arguments for every convirt.py run")
    return p.parse_args(argv)


def read_run(folder):
    """The last logged step, the last evaluation and the verdict of one run folder (None if unfinished)."""
    log = Path(folder) / "log.jsonl"
    if not log.exists():
        return None
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    verdicts = [r for r in lines if "verdict" in r]
    if not verdicts:
        return None
    steps = [r for r in lines if "loss" in r]
    epochs = [r for r in lines if "epoch_loss" in r]
    evals = [r for r in lines if "eval" in r]
    return {"steps": steps, "epochs": epochs, "eval": evals[-1] if evals else None, "collapsed": verdicts[-1]["collapsed"],
            "verdict": verdicts[-1]["verdict"]}


def summary(variant, seed, args, run):
    last, ev = run["epochs"][-1], run["eval"] or {}
    k = next((key.split("@")[1] for key in ev if key.startswith("i2i_p@")), None)
    return {"variant": variant, "arch": args.arch, "size": args.size, "seed": seed,
            "final_loss": last["epoch_loss"], "collapse_loss": last["collapse_loss"], "final_spread": run["steps"][-1]["spread"],
            "i2i_p_at_k": ev.get(f"i2i_p@{k}"), "t2i_p_at_k": ev.get(f"t2i_p@{k}"), "k": int(k) if k else None,
            "chance": ev.get("chance"), "collapsed": run["collapsed"], "verdict": run["verdict"],
            "loss_curve": [[r["step"], r["epoch_loss"] / r["collapse_loss"]] for r in run["epochs"]],
            "spread_curve": [[r["step"], r["spread"]] for r in run["steps"]]}


def launch(variant, seed, args):
    folder = Path(args.runs) / f"{variant}-{args.arch}-{args.size}-s{seed}"
    if read_run(folder) is None:
        cmd = [sys.executable, str(ROOT / "convirt.py"), *VARIANTS[variant], "--device", args.device, "--arch", args.arch,
               "--size", str(args.size), "--seed", str(seed), "--out", str(folder), "--resume", "auto", *args.extra]  # a run cut short continues
        env = dict(os.environ)
        if args.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "stdout.txt", "a") as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}); see {folder / 'stdout.txt'}")
    return summary(variant, seed, args, read_run(folder))


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(VARIANTS, ["C0", "C1", "C2", "C3"]))
    top = 1.2  # the interesting range; a run above it is named in the legend with where it ends
    for r in runs:
        label = r["variant"] if r["seed"] == min(x["seed"] for x in runs if x["variant"] == r["variant"]) else None
        if label and max(v for _, v in r["loss_curve"][-5:]) > top:
            label += f" (off the axis: ends at {r['loss_curve'][-1][1]:.2f})"
        ax_l.plot(*zip(*r["loss_curve"]), color=colours[r["variant"]], alpha=0.7, label=label)
        ax_s.plot(*zip(*r["spread_curve"]), color=colours[r["variant"]], alpha=0.7, label=label)
    ax_l.set_ylim(0.75, top)
    ax_l.axhline(1.0, color="k", lw=0.8, ls=":")
    ax_l.axhline(0.9, color="k", lw=0.8, ls="--")
    ax_s.axhline(0.1, color="k", lw=0.8, ls="--")
    ax_l.set(xlabel="step", ylabel="epoch's mean loss / collapse value",
             title="loss in units of its collapse value (0.9: the bar)")
    ax_s.set(xlabel="step", ylabel="spread", title="spread (0.1: collapsed below)")
    ax_l.legend()
    a = runs[0]
    fig.suptitle(f"convirt.py, {a['arch']} at {a['size']} px, seeds {sorted({r['seed'] for r in runs})}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out or ("results/convirt-scale-cpu.json" if args.device == "cpu" else "results/convirt-scale.json"))
    figure = Path(args.figure or out.with_suffix(".png"))
    if args.plot_only:
        plot(json.loads(out.read_text())["runs"], figure)
        return
    import torch

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda vs: launch(*vs, args), jobs))
    out.parent.mkdir(parents=True, exist_ok=True)
    key = lambda r: (r["variant"], r["arch"], r["size"], r["seed"])  # noqa: E731
    if out.exists():  # runs of an earlier call (other seeds or variants) stay, this call's replace theirs
        new = {key(r) for r in runs}
        runs = [r for r in json.loads(out.read_text())["runs"] if key(r) not in new] + runs
        runs.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "command": " ".join(sys.argv[1:]),
                               "runs": runs}, indent=1))
    plot(runs, figure)
    print(f"{'variant':12s} {'seed':>4s} {'loss/L_c':>8s} {'spread':>7s} {'i2i':>6s} {'t2i':>6s} {'chance':>6s}  verdict")
    for r in runs:
        fmt = lambda x: f"{x:6.3f}" if x is not None else "     -"  # noqa: E731
        print(f"{r['variant']:12s} {r['seed']:4d} {r['final_loss'] / r['collapse_loss']:8.3f} {r['final_spread']:7.3f} "
              f"{fmt(r['i2i_p_at_k'])} {fmt(r['t2i_p_at_k'])} {fmt(r['chance'])}  {'COLLAPSED' if r['collapsed'] else 'ok'}")
    print(f"wrote {out} and {figure}")


if __name__ == "__main__":
    main()
