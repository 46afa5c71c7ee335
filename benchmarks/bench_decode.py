"""Decoding and the decode cache at MIMIC-CXR's scale: what `python data.py cache` and a run's start-up cost.

1. Images/s per process of load_image + fit_square (one thread) for a 2,500 x 3,000 JPEG, a 2,048^2 PNG and a
   2,048^2 12-bit DICOM (uncompressed and RLE), with --old (an older data.py, e.g. the one before the draft decode:
   `git show a40029e:data.py > /tmp/old/data.py`) timed alternately beside it, and the mean and largest difference
   of the two outputs in 1/255 steps.
2. The cache build of --build-n JPEGs at 1, 2 and all cores (a fresh cache each; the pool's start-up counted).
3. The start-up of a run whose cache is complete, at --startup N generated tiny files in MIMIC's folder layout:
   finding the files, keying each (os.stat) and reading the index (DecodeCache.build), mapping the file (first read);
   extrapolated linearly to 377,110 files (MIMIC-CXR-JPG).

    python benchmarks/bench_decode.py --old /tmp/old/data.py --out benchmarks/results-decode.json
    python benchmarks/bench_decode.py --formats --build-n 0 --startup 10000 100000   # start-up only

Results: markdown tables on stdout, JSON in --out.
"""
import argparse
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import demo  # noqa: E402

MIMIC = 377_110


def old_module(path, tmp):
    """An older data.py as the module old_data, importable by the cache build's spawned processes too."""
    shutil.copy(path, tmp / "old_data.py")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("old_data")


def write_sources(folder, k=3, seed=0, scale=1.0):
    """k files per format, each a different chest phantom, sides x scale: {format: [paths]}."""
    side = lambda n: n if scale == 1 else max(16, int(n * scale) // 8 * 8)  # noqa: E731
    rng, out = np.random.default_rng(seed), {"JPEG 2500x3000": [], "PNG 2048^2": [], "DICOM 2048^2": [],
                                              "DICOM 2048^2 RLE": []}
    for i in range(k):
        cut = (side(3000) - side(2500)) // 2  # 3,000 rows x 2,500 columns: 4 divides both, 8 does not
        big = demo.chest_phantom(rng, side(3000), {"effusion": "left"})[:, cut:cut + side(2500)]
        grain = rng.normal(0, 0.01, big.shape)  # detector noise: JPEGs of ~2.5 MB at quality 95, as MIMIC-CXR-JPG's
        Image.fromarray(np.rint((big + grain).clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=95)
        img = demo.chest_phantom(rng, side(2048), {"cardiomegaly": True})
        Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(folder / f"{i}.png")
        demo.write_dicom(folder / f"{i}.dcm", img, rng, "MONOCHROME2", bits=12)
        demo.write_dicom(folder / f"{i}-rle.dcm", img, rng, "MONOCHROME1", bits=12, rle=True)
        for (name, _), ext in zip(out.items(), (".jpg", ".png", ".dcm", "-rle.dcm")):
            out[name].append(str(folder / f"{i}{ext}"))
    return out


def rate(fn, paths, n):
    """Images/s of fn over n decodes cycling through paths."""
    t = time.perf_counter()
    for i in range(n):
        fn(paths[i % len(paths)])
    return n / (time.perf_counter() - t)


def bench_formats(sources, size, n, repeats, old):
    new_fn = lambda p: data.fit_square(data.load_image(p, 1, size), size)  # noqa: E731  (what the cache decodes)
    old_fn = (lambda p: old.fit_square(old.load_image(p, 1), size)) if old else None  # noqa: E731
    rows = []
    for name, paths in sources.items():
        new_fn(paths[0]), old_fn and old_fn(paths[0])  # warm: file cache, imports
        news, olds = [], []
        for _ in range(repeats):  # alternately: a shared machine's load falls on both alike
            news.append(rate(new_fn, paths, n))
            if old:
                olds.append(rate(old_fn, paths, n))
        row = {"format": name, "size": size, "new_img_per_s": round(statistics.median(news), 1)}
        if old:
            d = torch.stack([(new_fn(p) - old_fn(p)).abs() * 255 for p in paths])
            old_rate = statistics.median(olds)
            row.update(old_img_per_s=round(old_rate, 1), speedup=round(row["new_img_per_s"] / old_rate, 2),
                       mean_diff=round(float(d.mean()), 3), max_diff=round(float(d.max()), 2))
        rows.append(row)
    return rows


def bench_build(jpegs, n, size, workers_list, tmp, old):
    folder = tmp / "build"
    folder.mkdir()
    paths = []
    for i in range(n):  # copies: each its own key, decoded like the original
        paths.append(str(folder / f"{i}.jpg"))
        shutil.copy(jpegs[i % len(jpegs)], paths[-1])
    rows = []
    for workers in workers_list:
        start = pool_start(workers) if workers > 1 else 0.0
        for label, mod in (("new", data), ("old", old)):
            if mod is None:
                continue
            cache = tmp / f"cache-{label}-{workers}"
            t = time.perf_counter()
            mod.DecodeCache(cache, size, 1).build(paths, workers=workers)
            took = time.perf_counter() - t
            rows.append({"code": label, "workers": workers, "images": n, "img_per_s": round(n / took, 1),
                         "pool_start_s": round(start, 1), "img_per_s_after_start": round(n / (took - start), 1)})
            shutil.rmtree(cache)
    return rows


def pool_start(workers):
    """Seconds to start the build's process pool (spawn: each process imports data.py, torch with it) and use it."""
    import multiprocessing
    t = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers, torch.set_num_threads, (1,)) as pool:
        pool.map(data.train_side, range(8, 8 + workers))  # a function of data.py: the import happens
    return time.perf_counter() - t


def bench_startup(counts, tmp, old, workers):
    """A run's start-up on a complete cache: find the files, key them and read the index, map the file."""
    rows, png = [], tmp / "tiny.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(png)
    blob = png.read_bytes()
    for n in counts:
        root = tmp / f"startup-{n}" / "files"
        for i in range(n):  # MIMIC's layout: files/p1X/pSUBJECT/sSTUDY/DICOM_ID.jpg, ~10 images a patient
            d = root / f"p1{i // 10 % 10}" / f"p1{i // 10:07d}" / f"s5{i // 2:07d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:08x}-bde0afdd-112c0b34-7bc16630-4e384014.png").write_bytes(blob)
        cache = tmp / f"startup-cache-{n}"
        paths = data.find_images(root)
        data.DecodeCache(cache, 8, 1).build(paths, workers=min(workers, n // 5000))  # complete now
        times = {}
        for label, mod in [("new", data), ("old", old), ("old", old), ("new", data)]:  # each phase: the faster of 2
            if mod is None:
                continue
            t0 = time.perf_counter()
            paths = mod.find_images(root)
            t1 = time.perf_counter()
            c = mod.DecodeCache(cache, 8, 1)
            slots, _ = c.build(paths)
            t2 = time.perf_counter()
            c.read(slots[-1])
            t3 = time.perf_counter()
            assert c.misses == 0, c.misses
            times[label] = [min(a, b) for a, b in zip(times.get(label, [1e9] * 3), (t1 - t0, t2 - t1, t3 - t2))]
        for label, (find, key, mapped) in times.items():
            rows.append({"code": label, "files": n, "find_s": round(find, 3), "key_and_index_s": round(key, 3),
                         "map_s": round(mapped, 4), "total_s": round(find + key + mapped, 3)})
        shutil.rmtree(root.parent), shutil.rmtree(cache)
    for label in ("new", "old"):  # linear through the two largest counts
        mine = [r for r in rows if r["code"] == label]
        if len(mine) >= 2:
            a, b = mine[-2], mine[-1]
            slope = (b["total_s"] - a["total_s"]) / (b["files"] - a["files"])
            at_mimic = b["total_s"] + slope * (MIMIC - b["files"])
            rows.append({"code": label, "files": MIMIC, "total_s": round(at_mimic, 1),
                         "extrapolated": True, "growth": round(b["total_s"] / max(a["total_s"], 1e-9), 2)})
    return rows


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default=None, help="an older data.py to time beside this one")
    p.add_argument("--size", type=int, default=256, help="side fitted to (256: the pretraining cache for --size 224)")
    p.add_argument("--n", type=int, default=6, help="decodes per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks (median)")
    p.add_argument("--formats", action="store_true", help="skip the per-format table")
    p.add_argument("--build-n", type=int, default=48, help="JPEGs in the cache build (0: skip)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 0], help="build processes (0: every core)")
    p.add_argument("--startup", type=int, nargs="*", default=[], help="file counts of the start-up (10000 100000)")
    p.add_argument("--source-scale", type=float, default=1.0, help="sides of the generated sources x this (tests)")
    p.add_argument("--out", default=None, help="JSON results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cores = demo.cpu_cores()
    res = {"machine": f"{cores} cores, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d")}
    tmp = Path(tempfile.mkdtemp(prefix="medssl-decode-bench-"))
    try:
        old = old_module(a.old, tmp) if a.old else None
        sources = write_sources(tmp, scale=a.source_scale)
        if not a.formats:
            res["formats"] = bench_formats(sources, a.size, a.n, a.repeats, old)
            print(table(res["formats"], ["format", "old_img_per_s", "new_img_per_s", "speedup", "mean_diff",
                                         "max_diff"]))
        if a.build_n:
            workers = list(dict.fromkeys(w or cores for w in a.workers))
            res["build"] = bench_build(sources["JPEG 2500x3000"], a.build_n, a.size, workers, tmp, old)
            print(table(res["build"], ["code", "workers", "images", "img_per_s", "pool_start_s",
                                       "img_per_s_after_start"]))
        if a.startup:
            res["startup"] = bench_startup(a.startup, tmp, old, cores)
            print(table(res["startup"], ["code", "files", "find_s", "key_and_index_s", "map_s", "total_s", "growth"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
