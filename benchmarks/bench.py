"""Speed and memory of every pretraining script's training step against its physical floor.

The floor of a step is the encoder's own forward + backward on the same batch (both views for the
image-only methods; BYOL's target forward counted too; ConVIRT's text tower counted too). Everything
a script adds on top (heads, the loss, the optimizer, gathers) is overhead: the ratio step/floor
rate says how much of it there is. Synthetic tensors already in memory, so the data side is left
out here and measured on its own: the DataLoader (--loader), the batched augmentation (--augment),
and each real script end to end on a generated folder of DICOMs (--end-to-end), whose images/s over
the synthetic step's says how much the data side costs (1.0: nothing).

    python benchmarks/bench.py                                   # CPU: resnet18, 64 px, batch 32
    python benchmarks/bench.py --device cuda --arch resnet50 --size 224 --batch-size 128 --compile
    python benchmarks/bench.py --losses-only --loss-sizes 256 1024 4096
    python benchmarks/bench.py --losses-only --loss-sizes 256 --end-to-end        # CPU: each real script, a few minutes
    python benchmarks/bench.py --device cuda --arch resnet50 --size 224 --batch-size 256 --projector 8192-8192-8192 \
        --end-to-end --e2e-workers 16 --augment --loader --workers 0 16 --out benchmarks/results-gpu.json

Figures are medians of --repeats timed blocks of --steps steps, after --warmup steps; CUDA timings
use CUDA events after a synchronise. Results: a markdown table on stdout and JSON in --out.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import barlow  # noqa: E402
import byol  # noqa: E402
import convirt  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402
import simclr  # noqa: E402

CONFIGS = ["convirt-softmax", "convirt-sigmoid", "simclr", "byol", "barlow", "agbt"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"], help="image encoder")
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (CUDA)")
    p.add_argument("--projector", default="1024-1024-1024", help="Barlow Twins projector (8192-8192-8192 for ResNet-50)")
    p.add_argument("--only", default=None, choices=CONFIGS, help="one configuration (used for per-process peak memory)")
    p.add_argument("--losses-only", action="store_true", help="only the loss timings")
    p.add_argument("--loss-sizes", type=int, nargs="+", default=[256, 1024, 4096], help="batch sizes for the loss timings")
    p.add_argument("--loader", action="store_true", help="also time the data pipeline (decode + augmentation)")
    p.add_argument("--loader-images", type=int, default=512, help="images the loader benchmark reads an epoch (the demo's, repeated)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers for the loader benchmark")
    p.add_argument("--augment", action="store_true", help="also time data.BatchAugment alone, every preset, on --device")
    p.add_argument("--end-to-end", action="store_true",
                   help="also run each real script on a generated folder and compare its images/s with the synthetic step")
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS, help="configurations for --end-to-end")
    p.add_argument("--e2e-images", type=int, default=2048, help="images in the generated folder")
    p.add_argument("--e2e-source-size", type=int, default=256, help="side of the generated DICOMs")
    p.add_argument("--e2e-epochs", type=int, default=3, help="epochs per script; the first is not timed")
    p.add_argument("--e2e-workers", type=int, default=2, help="DataLoader workers of each script (16 on the GPU machine)")
    p.add_argument("--out", default="benchmarks/results.json", help="JSON results")
    return p.parse_args(argv)


def timer(device):
    """A function that runs fn() `steps` times and returns the seconds, synchronised on CUDA."""
    def run(fn, steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - t
    return run


def rate(fn, images, args, device):
    """Median images/s of fn over --repeats blocks of --steps calls, after --warmup calls."""
    for _ in range(args.warmup):
        fn()
    run = timer(device)
    return statistics.median(images * args.steps / run(fn, args.steps) for _ in range(args.repeats))


def build(name, args, device):
    """(step function, floor function) for one configuration, on synthetic tensors."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    cl = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    b, s = args.batch_size, args.size
    x1 = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=cl)
    x2 = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=cl)

    def encoder_floor(enc, views, extra=None):
        def floor():
            for x in views:
                with amp:
                    out = enc(x)
                out.float().sum().backward()
            if extra:
                extra()
        return floor

    if name.startswith("convirt"):
        reports = [demo.demo_report(np.random.default_rng(i), demo._random_findings(np.random.default_rng(i)))[0] for i in range(50)]
        tok_json, text = convirt.demo_text_model(reports, 0)
        tok = convirt.wrap_tokenizer(tok_json)
        t = tok(["There is consolidation in the right lower lobe."] * b, padding="max_length", max_length=32, return_tensors="pt")
        ids, mask = t["input_ids"].to(device), t["attention_mask"].to(device)
        model = convirt.ConVIRT(args.arch, "none", text, 512, "max", 10.0, convirt.prior_logit(b, b - 1)).to(device, memory_format=cl)
        if args.compile:
            model.image_encoder.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with amp:
                u, v = model(x1, ids, mask)
            if name == "convirt-softmax":
                loss = convirt.infonce_loss(u, v)
            else:
                loss = convirt.sigmoid_loss(u, v, model.t_prime.exp().clamp(min=convirt.t_floor(b)), model.bias, pos_weight=b - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def text_floor():
            with amp:
                h = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            h.float().sum().backward()
        return step, encoder_floor(model.image_encoder, [x1], text_floor)
    if name == "simclr":
        model = simclr.SimCLR(args.arch, "none", 2048, 128).to(device, memory_format=cl)
        loss_fn = lambda z1, z2: simclr.nt_xent(z1, z2, 0.1)  # noqa: E731
    elif name in ("barlow", "agbt"):
        widths = [int(w) for w in args.projector.split("-")]
        model = barlow.BarlowTwins(args.arch, "none", widths, 512 if name == "agbt" else None).to(device, memory_format=cl)
        loss_fn = lambda *o: (barlow.agbt_loss(*o) if o[2] is not None else barlow.barlow_twins_loss(o[0], o[1]))[0]  # noqa
    else:
        model = byol.Online(args.arch, "none", 4096, 256).to(device, memory_format=cl)
        target = byol.Target(model).to(device)
    if args.compile:
        model.encoder.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with amp:
            out = model(x1, x2)
            if name == "byol":
                with torch.no_grad():
                    z1, z2 = target(x1, x2)
        loss = byol.byol_loss(out[0], z2) + byol.byol_loss(out[1], z1) if name == "byol" else loss_fn(*out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if name == "byol":
            byol.ema_update(target, model, 0.996)

    def target_forward():  # BYOL's floor includes its target network's forward on both views
        with torch.no_grad(), amp:
            target.encoder(x1), target.encoder(x2)
    return step, encoder_floor(model.encoder, [x1, x2], target_forward if name == "byol" else None)


def bench_config(name, args, device):
    step, floor = build(name, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r_step = rate(step, args.batch_size, args, device)
    r_floor = rate(floor, args.batch_size, args, device)
    rec = {"config": name, "step_img_per_s": round(r_step, 1), "floor_img_per_s": round(r_floor, 1),
           "ratio": round(r_step / r_floor, 3), "overhead_x": round(r_floor / r_step, 3),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        rec["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return rec


def synthetic(name, argv):
    """bench_config of one configuration in its own process, so its peak memory is its own."""
    p = subprocess.run([sys.executable, __file__, *argv, "--only", name], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_losses(args, device):
    """Forward + backward time of each loss alone, at growing batch (and D = 8192 for Barlow Twins)."""
    out = []
    for n in args.loss_sizes:
        for name in ("softmax", "sigmoid", "nt_xent", "barlow-8192"):
            d = 8192 if name == "barlow-8192" else 512
            a = torch.randn(n, d, device=device, requires_grad=True)
            b = torch.randn(n, d, device=device, requires_grad=True)
            fn = {"softmax": lambda: convirt.infonce_loss(F.normalize(a, dim=1), F.normalize(b, dim=1)),
                  "sigmoid": lambda: convirt.sigmoid_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), torch.tensor(10.0), torch.tensor(-10.0)),
                  "nt_xent": lambda: simclr.nt_xent(a, b),
                  "barlow-8192": lambda: barlow.barlow_twins_loss(a, b)[0]}[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sec = 1 / rate(lambda: fn().backward(), 1, args, device)
            rec = {"loss": name, "n": n, "d": d, "ms": round(sec * 1000, 2)}
            if device.type == "cuda":
                rec["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
            out.append(rec)
    return out


def bench_loader(args):
    """Images/s the DataLoader delivers to a script's training loop: uint8 reads at train_side(size)
    (+ a sentence each and the batch's tokenisation for ConVIRT), from the DICOMs or the decode
    cache; the augmentation is on the device (--augment). Steady state, as in training: persistent
    workers, a whole warm-up epoch (workers start, files enter the page cache), then a timed epoch."""
    import tempfile

    paths, reports, _ = data.demo_pairs(split=None)
    paths = [paths[i % len(paths)] for i in range(args.loader_images)]  # repeated, for as many as asked
    sentences = [data.report_sentences(reports[i % len(reports)]) for i in range(args.loader_images)]
    tok_json, _ = convirt.demo_text_model(reports, 0)
    collate = convirt.Tokenize(convirt.wrap_tokenizer(tok_json), 128)
    out = []
    tmp = tempfile.TemporaryDirectory(prefix="medssl-bench-")
    for cache in (False, True):
        root = tmp.name if cache else None
        for pname in ("convirt", "ssl"):
            targets, pick = (list(enumerate(sentences)), convirt.RandomSentence(0)) if pname == "convirt" else (None, None)
            ds = data.ImageDataset(paths, targets, None, pick, size=data.train_side(args.size), channels=1,
                                   cache_dir=root, uint8=True)
            for w in args.workers:
                loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=w, persistent_workers=w > 0,
                                                     collate_fn=collate if pname == "convirt" else None)
                for _ in loader:
                    pass
                t = time.perf_counter()
                n = sum(len(batch[0]) for batch in loader)
                out.append({"pipeline": pname, "source": "cache" if cache else "DICOM", "workers": w,
                            "img_per_s": round(n / (time.perf_counter() - t), 1)})
                del loader  # its persistent workers end before the cache's folder goes
    tmp.cleanup()
    return out


def bench_augment(args, device):
    """Images/s of one augmented view: data.BatchAugment on a batch of uint8 images a little larger
    than the crop (train_side: 256 for 224), on `device`, every preset."""
    out = []
    side = data.train_side(args.size)
    for preset in data.PRESETS + ["convirt"]:
        ch = 3 if preset.startswith("cytology") or preset == "simclr" else 1
        aug = data.BatchAugment(preset, args.size, ch)
        x = (torch.rand(args.batch_size, ch, side, side) * 255).to(torch.uint8).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        out.append({"preset": preset, "channels": ch, "img_per_s": round(rate(lambda: aug(x, g), args.batch_size, args, device), 1),
                    "device": str(device)})
    return out


def e2e_command(name, args, folder, run):
    """The real script's command line for one end-to-end configuration."""
    script = "convirt.py" if name.startswith("convirt") else "barlow.py" if name in ("barlow", "agbt") else f"{name}.py"
    cmd = [sys.executable, str(ROOT / script), "--data", str(folder), "--arch", args.arch, "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--workers", str(args.e2e_workers), "--epochs", str(args.e2e_epochs),
           "--device", args.device, "--out", str(run), "--log-every", str(args.e2e_images // args.batch_size),
           "--cache-dir", str(Path(run).parent / "cache")]
    if name.startswith("convirt"):
        cmd += ["--loss", name.split("-")[1], "--eval-every", "0"]
    else:
        cmd += ["--knn-every", "0"]
    if name in ("barlow", "agbt"):
        cmd += ["--loss", name, "--projector", args.projector]
    return cmd + (["--compile"] if args.compile else [])


def bench_end_to_end(args, argv):
    """Each real script on a generated folder of --e2e-images DICOMs (the pairs demo: MIMIC layout,
    reports beside), its images/s over each epoch after the first (workers started, cache built, the
    compile done), against the synthetic step of the same configuration and batch on this machine."""
    import tempfile

    out = []
    with tempfile.TemporaryDirectory(prefix="medssl-e2e-") as tmp:  # images, caches and checkpoints: GBs
        work = Path(tmp)
        folder = Path(demo.make_pairs_demo(work / "pairs", args.e2e_images, size=args.e2e_source_size,
                                           quiet=True)["mimic"]["path"])
        for name in args.configs:
            run = work / name
            p = subprocess.run(e2e_command(name, args, folder, run), capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"end to end {name} failed:\n{p.stderr[-3000:]}")
            logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            rates = [r["img_per_s"] for r in logged if "img_per_s" in r and r["epoch"] >= 1]
            if not rates:
                raise SystemExit(f"end to end {name}: no epoch after the first was logged (--e2e-epochs {args.e2e_epochs})")
            step = synthetic(name, argv)
            e2e = statistics.median(rates)
            out.append({"config": name, "e2e_img_per_s": round(e2e, 1), "step_img_per_s": step["step_img_per_s"],
                        "ratio": round(e2e / step["step_img_per_s"], 3), "epochs_timed": len(rates)})
    return out


def table(title, columns, rows):
    """A markdown table on stdout; columns: (heading, key) pairs."""
    print(f"\n{title}\n| " + " | ".join(h for h, _ in columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for _, k in columns) + " |")


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.only:  # one configuration in this process, so its peak memory is its own
        print(json.dumps(bench_config(args.only, args, device)))
        return
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    argv = list(argv or sys.argv[1:])
    if not args.losses_only:
        rows = [synthetic(name, argv) for name in CONFIGS]
        results["steps"] = rows
        table(f"Training step vs floor: {args.arch}, {args.size} px, batch {args.batch_size}, {results['device']}",
              [("script", "config"), ("step img/s", "step_img_per_s"), ("floor img/s", "floor_img_per_s"),
               ("step / floor", "ratio"), ("overhead x", "overhead_x"), ("peak RSS MiB", "peak_rss_mib")], rows)
    results["losses"] = bench_losses(args, device)
    print("\nLosses alone, forward + backward (ms):")
    print("| loss | " + " | ".join(f"N={n}" for n in args.loss_sizes) + " |")
    print("|---|" + "---|" * len(args.loss_sizes))
    for name in ("softmax", "sigmoid", "nt_xent", "barlow-8192"):
        print(f"| {name} | " + " | ".join(str(r["ms"]) for r in results["losses"] if r["loss"] == name) + " |")
    if args.loader:
        results["loader"] = bench_loader(args)
        table(f"DataLoader alone (uint8 reads at {data.train_side(args.size)} px; ConVIRT: + tokenisation), batch {args.batch_size}:",
              [("pipeline", "pipeline"), ("source", "source"), ("workers", "workers"), ("img/s", "img_per_s")], results["loader"])
    if args.augment:
        results["augment"] = bench_augment(args, device)
        table(f"BatchAugment alone on {device}, one view, {args.size} px from {data.train_side(args.size)} px, batch {args.batch_size}:",
              [("preset", "preset"), ("img/s", "img_per_s")], results["augment"])
    if args.end_to_end:
        results["end_to_end"] = bench_end_to_end(args, argv)
        table(f"End to end: each script on {args.e2e_images} generated DICOMs, {args.e2e_workers} workers, epochs after "
              "the first, against its synthetic step:", [("script", "config"), ("end to end img/s", "e2e_img_per_s"),
                                                        ("step img/s", "step_img_per_s"), ("end to end / step", "ratio")],
              results["end_to_end"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nresults: {args.out}")


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return f"cpu x {os.cpu_count()}"


if __name__ == "__main__":
    main()
