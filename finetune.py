"""finetune.py: turn pretrained encoders into the studies' comparison tables.

Linear probe (logistic regression, C chosen on val), fine-tuning (early stopping on val AUC), the weighted kNN
and, for convirt.py checkpoints, zero-shot classification by prompts, at several label fractions and seeds: AUC,
F1 at a threshold chosen on val, accuracy, confusion matrices, 95 % bootstrap intervals over patients, ROC and
AUC-vs-fraction figures; t-SNE, clustering and Grad-CAM on request. Splits are by patient (60 / 20 / 20, seed 0,
the same for every method; MIMIC's official one with --split-csv), in split.json with a sha256 (--split FILE reuses
it); test is scored once per cell, every choice made on val (--score val never reads test); --resume skips done cells.

    python finetune.py --ckpt runs/convirt-sigmoid-X/checkpoint.pt --init random   # demo pneumonia task
    python finetune.py --task folder --ckpt barlow=runs/barlow-X/checkpoint.pt --ckpt agbt=runs/agbt-X/checkpoint.pt \
        --init random --mode linear finetune --embed --gradcam 2                       # demo cytology, 7 classes
    python finetune.py --task rsna --data /data/rsna --ckpt convirt=ck.pt --init imagenet --arch resnet50 --seeds 0 1 2
    python finetune.py --task chexpert --data /data/CheXpert-v1.0/train.csv --observations 5 --uncertainty ignore ...
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T

import data

METHODS = {"convirt", "simclr", "byol", "barlow", "agbt"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[], help="pretrained checkpoint, PATH or NAME=PATH (repeatable)")
    p.add_argument("--init", action="append", default=[], choices=["imagenet", "random"], help="a baseline row")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50", "densenet121", "efficientnet_b0",
                                                          "vit_b_16"], help="encoder (vit_b_16 needs --size 224)")
    p.add_argument("--task", default="rsna", choices=["rsna", "chexpert", "folder", "csv", "hicervix"], help="task")
    p.add_argument("--data", default=None, help="RSNA folder, CheXpert CSV, class folders, CSV; none: the demo sets")
    p.add_argument("--image-root", default=None, help="images of a CSV task (default: the CSV's folder)")
    p.add_argument("--label-col", default="label", help="csv task: label column (comma-separated for multi-label)")
    p.add_argument("--patient-col", default=None, help="csv, hicervix: the patient column (none: split by image)")
    p.add_argument("--grouping", default=None, help="folder task: a grouping of the class folders, e.g. herlev-2class")
    p.add_argument("--level", type=int, default=1, help="hicervix task: hierarchy level 1, 2 or 3")
    p.add_argument("--observations", default="14", choices=["14", "5"], help="chexpert: all 14 or the 5 competition")
    p.add_argument("--uncertainty", default="ones", choices=["ones", "zeros", "ignore"], help="chexpert: -1 labels")
    p.add_argument("--mode", nargs="+", default=["linear"], choices=["linear", "finetune", "knn", "zeroshot"],
                   help="linear probe, fine-tuning, weighted kNN, zero-shot by prompts (convirt.py checkpoints)")
    p.add_argument("--prompts", default=None, help='zeroshot: JSON {label: {"pos": [...], "neg": [...]}} or {class: '
                   '[...]} (default "{label}" / "no {label}")')
    p.add_argument("--head", default="sklearn", choices=["sklearn", "torch"], help="linear probe: sklearn or torch")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="label fractions of train")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; each cell is mean +- std over them")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 224; 64 on the demo data)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="channels (default: 3 cytology, else 1)")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (early stopping on val AUC)")
    p.add_argument("--patience", type=int, default=3, help="fine-tuning: epochs without val AUC gain before stopping")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (the new head: 10x)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="fine-tuning weight decay")
    p.add_argument("--embed", action="store_true", help="t-SNE, clustering scores, effective rank, class similarity")
    p.add_argument("--gradcam", type=int, default=0, help="Grad-CAM overlays for N test images per class")
    p.add_argument("--cache-dir", default=data.default_cache_dir(), help="decode cache folder; '' decodes on the fly")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="output folder (default runs/finetune-TIME)")
    p.add_argument("--resume", action="store_true", help="skip the cells already in --out/results.json")
    p.add_argument("--split", default=None, help="split.json of an earlier run: the same patients and label subsets")
    p.add_argument("--split-csv", default=None, help="chexpert: MIMIC-CXR's mimic-cxr-2.0.0-split.csv, so no patient "
                   "convirt.py pretrained on is tested on")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for each metric's 95 %% interval (0: none)")
    p.add_argument("--score", default="test", choices=["test", "val"], help="test: the final table; val: for "
                   "choosing settings (train split again 80/20 for the probe's choices; test never read)")
    args = p.parse_args(argv)
    args.size = args.size if args.size is not None else (224 if args.data else 64)
    if not args.ckpt and not args.init:
        p.error("give at least one --ckpt or --init row")
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error("--fractions must be in (0, 1]")
    if args.arch == "vit_b_16" and args.size != 224:
        p.error("vit_b_16 needs --size 224")
    if args.patient_col and args.task not in ("csv", "hicervix"):
        p.error("--patient-col is for --task csv or hicervix (the other tasks know their patients or have none)")
    return args


# ---------------------------------------------------------------------------------------------- model
def load_encoder(path, arch):
    """The image encoder of a pretraining checkpoint or a plain torchvision state dict of `arch` (classifier, if any,
    left out): read as weights only; one clear line for a foreign file, no encoder or another architecture."""
    state = plain_state_dict(path)
    if state is not None:
        net, dim = data.image_encoder(arch)
        head = "fc." if hasattr(net, "fc") else "heads." if hasattr(net, "heads") else "classifier."  # image_encoder's
        try:
            net.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)})
        except RuntimeError as e:
            raise ValueError(f"{path}: a plain state dict, not a torchvision {arch}'s (--arch): "
                             f"{str(e).strip().splitlines()[-1].strip()[:150]}") from None
        return net, dim
    net, dim, ck = data.encoder_from_checkpoint(path, arch)
    if ck["method"] not in METHODS:
        raise ValueError(f"{path}: not a checkpoint of convirt.py, simclr.py, byol.py or barlow.py ({ck['method']})")
    return net, dim


def plain_state_dict(path):
    """The file's {name: tensor} if it holds only that (a state_dict(), no 'method'), else None: medssl checkpoints
    and refused files go to data.load_checkpoint's checks. Memory-mapped: a large file is not read twice."""
    with contextlib.suppress(Exception):  # missing, refused or not zip-format: data.load_checkpoint says which
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return state if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()) else None


def last_conv_block(net):
    """The layer Grad-CAM hooks: the last convolutional block (ResNet's layer4; DenseNet's, EfficientNet's features)."""
    if not hasattr(net, "layer4") and not hasattr(net, "features"):
        raise ValueError("Grad-CAM needs a ResNet, DenseNet or EfficientNet encoder")
    return net.layer4 if hasattr(net, "layer4") else net.features


# ---------------------------------------------------------------------------------------------- metrics
def best_f1_threshold(y, s):
    """The score threshold that maximises F1 on (y, s) (chosen on validation, applied to test)."""
    from sklearn.metrics import precision_recall_curve
    if not len(y) or y.min() == y.max():  # nothing to choose by (no positive, no negative or all masked)
        return 0.5
    prec, rec, thr = precision_recall_curve(y, s)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    return float(thr[np.argmax(f1[:-1])])


def _columns(kind, y, s, thresholds, mask):
    """Per class (true, score, predicted), the form every metric reads: a binary task is one column, a multi-class
    one one-vs-rest with the argmax as prediction, a multi-label one each observation where its mask is 1."""
    if kind == "binary":
        return [(y > 0, s, s >= thresholds)]
    if kind == "multiclass":
        return [(y == c, s[:, c], s.argmax(1) == c) for c in range(s.shape[1])]
    keep = [np.ones(len(y), bool) if mask is None else mask[:, c] > 0 for c in range(y.shape[1])]
    return [(y[m, c] > 0, s[m, c], s[m, c] >= thresholds[c]) for c, m in enumerate(keep)]


def metrics(kind, y, s, thresholds=None, mask=None):
    """AUC (macro; per class), F1 (at the thresholds for binary / multi-label, macro over the argmax for multi-class),
    accuracy. kind: binary (s: n), multiclass (s: n x K probabilities), multilabel (s, y: n x K; mask 0 leaves an entry
    out). A class that cannot be scored (no positive, no negative, all masked) has no AUC (None) and is left out of
    every mean; None where no class can be scored."""
    if thresholds is None:
        thresholds = 0.5 if kind == "binary" else "argmax" if kind == "multiclass" else [0.5] * y.shape[1]
    cols = _columns(kind, y, s, thresholds, mask)
    per = [rank_auc(yc, sc) for yc, sc, _ in cols]
    ok = [c for c, a in zip(cols, per) if a is not None]
    mean = lambda v: float(np.mean(v)) if len(v) else None  # noqa: E731
    acc = np.mean(s.argmax(1) == y) if kind == "multiclass" else mean([np.mean(yc == p) for yc, _, p in ok])
    return {"auc": mean([a for a in per if a is not None]), "f1": mean([_f1(yc, p) for yc, _, p in ok]),
            "acc": None if acc is None else float(acc), "per_class_auc": per,
            "threshold": [float(t) for t in thresholds] if kind == "multilabel" else
            thresholds if kind == "multiclass" else float(thresholds)}


def rank_auc(y, s):
    """ROC AUC as the Mann-Whitney statistic, tied scores sharing their mean rank (sklearn's roc_auc_score),
    fast enough for a thousand bootstrap resamples; None without both labels."""
    n_pos, n_neg = int(y.sum()), len(y) - int(y.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based ranks, ties averaged
    return float((mean_rank[inv][y > 0].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap(kind, y, s, thresholds, mask=None, n=1000, seed=0, groups=None):
    """AUC and F1 (metrics(), fixed thresholds) of n resamples of the patients (groups: each image's; a patient's
    images drawn together) or of the images. Drawn from (seed, number of patients) alone: every cell of a table
    shares them, and an interval over seeds pairs them resample by resample."""
    _, first, code = np.unique(np.arange(len(y)) if groups is None else np.asarray(groups, str), return_index=True,
                               return_inverse=True)
    members = np.split(np.argsort(code, kind="stable"), np.cumsum(np.bincount(code))[:-1])
    members = [members[j] for j in np.argsort(first)]  # numbered by first image: one image each draws as images do
    rng, aucs, f1s = np.random.default_rng(seed), [], []
    for _ in range(n):
        i = np.concatenate([members[p] for p in rng.integers(0, len(members), len(members))])
        m = metrics(kind, y[i], s[i], thresholds, None if mask is None else np.asarray(mask)[i])
        aucs.append(m["auc"])
        f1s.append(m["f1"])
    return aucs, f1s


def _f1(y, pred):
    tp = np.sum(y & pred)
    denom = 2 * tp + np.sum(~y & pred) + np.sum(y & ~pred)
    return float(2 * tp / denom) if denom else 0.0  # sklearn's zero_division=0


def interval(boots):
    """The 95 % percentile interval of the seeds' mean, resample by resample; None without resamples."""
    if not boots or any(b is None for b in boots):
        return None
    a = np.asarray([[np.nan if v is None else v for v in b] for b in boots], np.float64).mean(0)
    a = a[~np.isnan(a)]
    return np.percentile(a, [2.5, 97.5]).tolist() if len(a) else None


def choose_thresholds(kind, y, s, mask=None):
    """The F1-maximising thresholds on val: one (binary) or one per observation (multi-label); argmax otherwise."""
    if kind == "multilabel":
        keep = np.ones_like(y) if mask is None else mask
        return [best_f1_threshold(y[keep[:, c] > 0, c], s[keep[:, c] > 0, c]) for c in range(y.shape[1])]
    return best_f1_threshold(y, s) if kind == "binary" else "argmax"


def confusion(kind, y, s, thresholds, mask=None):
    """Confusion matrices (rows true, columns predicted): one K x K (multi-class) or one 2 x 2 per class (binary,
    multi-label; all zeros where every entry is masked)."""
    count = lambda t, p, k: np.bincount(np.asarray(t, int) * k + np.asarray(p, int),  # noqa: E731
                                        minlength=k * k).reshape(k, k).tolist()
    return ([count(y, s.argmax(1), s.shape[1])] if kind == "multiclass" else
            [count(yc, p, 2) for yc, _, p in _columns(kind, y, s, thresholds, mask)])


def unscorable(kind, y, mask, names):
    """'name (why)' for each class or label a split cannot score: no positive, no negative, or every entry masked."""
    cols = ([y > 0] if kind == "binary" else [y == c for c in range(len(names))] if kind == "multiclass"
            else [y[mask[:, c] > 0, c] > 0 for c in range(y.shape[1])])
    return [f"{n!r} ({'all masked' if not len(c) else 'no positive' if not c.any() else 'no negative'})"
            for n, c in zip(names[-len(cols):], cols) if not len(c) or c.all() or not c.any()]


def summarize(values):
    """'mean +- std' over seeds ('-' when no value), two decimals."""
    v = [x for x in values if x is not None]
    return "-" if not v else f"{np.mean(v):.2f}" if len(v) == 1 else f"{np.mean(v):.2f}±{np.std(v):.2f}"


def results_table(cells, methods, all_fractions, resampled="the scored images"):
    """Markdown tables in the studies' shape: rows = methods, columns = fractions, cells = F1 / AUC."""
    lines = []
    for mode in sorted({c["mode"] for c in cells}):
        fractions = [0.0] if mode == "zeroshot" else all_fractions  # zero-shot uses no labelled image
        lines += [f"### {mode}", "", "| Method | " + " | ".join(f"{f * 100:g} %" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for m in [m for m in methods if any(c["mode"] == mode and c["method"] == m for c in cells)]:
            row = []
            for f in fractions:
                cs = [c for c in cells if c["mode"] == mode and c["method"] == m and c["fraction"] == f]
                ci = {k: interval([c.get(f"{k}_boot") for c in cs]) for k in ("f1", "auc")}
                row.append(" / ".join(summarize([c[k] for c in cs]) + (f" [{ci[k][0]:.2f}, {ci[k][1]:.2f}]" if ci[k]
                                                                      else "") for k in ("f1", "auc")) if cs else "")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines += ["", f"Intervals resample {resampled}.", ""]  # under each table: what the bootstrap drew
    return "\n".join(lines) + ("\nCells: F1 / AUC, mean ± std over seeds [95 % bootstrap interval of that mean]; F1 "
                               "at the threshold that maximises it on val; a class a split cannot score is left out.\n")


def cluster_scores(features, labels, seed=0):
    """K-means (K = classes) and DBSCAN on L2-normalised features: NMI, ARI, silhouette."""
    from sklearn.cluster import DBSCAN, KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
    from sklearn.neighbors import NearestNeighbors
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=len(np.unique(labels)), n_init=10, random_state=seed).fit_predict(f)
    # DBSCAN's eps: the median distance to the 5th neighbour, a common default when nothing is known
    d = NearestNeighbors(n_neighbors=min(6, len(f))).fit(f).kneighbors(f)[0][:, -1]
    db = DBSCAN(eps=float(np.median(d)), min_samples=5).fit_predict(f)
    return {name: {"nmi": float(normalized_mutual_info_score(labels, pred)),
                   "ari": float(adjusted_rand_score(labels, pred)),
                   "silhouette": float(silhouette_score(f, pred)) if 1 < len(np.unique(pred)) < len(f) else None}
            for name, pred in (("kmeans", km), ("dbscan", db))}


def effective_rank(features):
    """Roy & Vetterli 2007: exp of the entropy of p_i = s_i^2 / sum s^2, the standardised features' singular-value
    energies: D for D equally used directions, 1 for one (dimensional collapse, which no linear probe undoes)."""
    f = np.asarray(features, np.float64)
    f = f - f.mean(0)
    std = f.std(0)
    f = f[:, std > 0] / std[std > 0]  # constant features carry nothing
    e = np.linalg.svd(f, compute_uv=False) ** 2
    p = e[e > 0] / e.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def grad_cam(model, layer, x, target):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): ReLU(sum_k alpha_k A^k), alpha_k the spatial mean of
    d y_c / d A^k; upsampled to the input and scaled to [0, 1] per image. target: class index per image."""
    acts, grads = [], []
    h1 = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    try:
        model.zero_grad()
        out = model(x)
        out = out if out.ndim == 2 else out[:, None]  # a binary task: its one logit, signed by the target
        picked = out.gather(1, target.view(-1, 1)) if out.shape[1] > 1 else out[:, 0] * (2 * target.float() - 1)
        picked.sum().backward()
    finally:
        h1.remove()
        h2.remove()
    a, g = acts[0].detach(), grads[0].detach()
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return (cam - lo) / (hi - lo).clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(step, total, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------- main
def load_task(args):
    """(paths, labels, mask or None, class names, patient ids, kind)."""
    demo = args.data is None
    if demo and args.task in ("csv", "hicervix"):
        raise ValueError(f"--task {args.task} needs --data CSV" + (" and --image-root" * (args.task == "hicervix")))
    if args.task == "rsna":
        if demo:
            paths, labels, names, ids = data.demo_labelled("rsna")
        else:
            root = Path(args.data)
            lab = data.read_rsna_labels(root / "stage_2_train_labels.csv")
            ids = sorted(lab)
            paths = [str(root / "stage_2_train_images" / f"{i}.dcm") for i in ids]
            labels, names = np.asarray([lab[i] for i in ids]), ["no pneumonia", "pneumonia"]
        return paths, labels, None, names, ids, "binary"
    if args.task == "chexpert":
        names = data.CHEXPERT_14 if args.observations == "14" else data.CHEXPERT_5
        csv_path = (data.demo_root() / "mimic" / "mimic-cxr-2.0.0-chexpert.csv") if demo else args.data
        root = (data.demo_root() / "mimic") if demo else args.image_root
        paths, labels, mask = data.read_chexpert_labels(csv_path, args.uncertainty, names, image_root=root)
        ids = [(Path(p).parent.parent if Path(p).parent.name.startswith("s") else Path(p).parent).name for p in paths]
        keep = [c for c in range(len(names)) if 0 < labels[mask[:, c] > 0, c].sum() < (mask[:, c] > 0).sum()]
        if not keep:
            raise ValueError("no CheXpert observation has both positive and negative labels")
        return paths, labels[:, keep], mask[:, keep], [names[c] for c in keep], ids, "multilabel"
    if args.task == "folder" and demo:
        paths, labels, names, ids = data.demo_labelled("cytology-2class" if args.grouping == "herlev-2class"
                                                       else "cytology")
    else:
        path_col, cols = (("image_name", [f"level_{args.level}"]) if args.task == "hicervix"
                          else ("path", args.label_col.split(",")))
        paths, labels, names, *ids = (data.read_class_folders(args.data, args.grouping) if args.task == "folder" else
                                      data.read_label_csv(args.data, path_col, cols if len(cols) > 1 else cols[0],
                                                          args.image_root, args.patient_col))
        ids = ids[0] if ids else paths
    if ids is paths:  # Herlev, SIPaKMeD, LBC file names carry no patient: nothing to read one from
        print(f"--task {args.task}: split and bootstrap by image, no patients named (a CSV task's --patient-col does)")
    if labels.ndim == 2:  # a CSV with several 0/1 label columns
        return paths, labels, None, names, ids, "multilabel"
    if len(np.unique(labels)) < 2:
        raise ValueError(f"the task has one class only ({names}): nothing to classify")
    return paths, labels, None, names, ids, ("binary" if len(names) == 2 else "multiclass")


def image_keys(paths):
    """Each image's path relative to the images' common folder: how a split file names images, the
    same wherever another group keeps the data."""
    full = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath(full) if len(full) > 1 else os.path.dirname(full[0])
    return [os.path.relpath(p, root) for p in full]


def split_hash(record):
    body = json.dumps({"patients": record["patients"], "fractions": record["fractions"]}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def make_split(args, paths, ids, labels, kind):
    """(train, val, test, {(fraction, seed): positions in train}, the record for split.json): --split FILE's
    patients, else MIMIC's official split (--split-csv; the demo CheXpert task's own), else data.eval_split. With
    --score val, train is split again 80 / 20 by patient and val scored in test's place. The record lists each
    split's patients and each label fraction's images with a hash of both: another group can score on exactly these."""
    keys = image_keys(paths)
    pids = [k if str(i) == str(p) else str(i) for i, p, k in zip(ids, paths, keys)]  # path-named patients by key
    given = json.loads(Path(args.split).read_text()) if args.split else {}
    if args.split:
        if split_hash(given) != given.get("sha256"):
            raise ValueError(f"{args.split}: its sha256 does not match its lists: edited after it was written")
        role = {p: name for name in ("train", "val", "test") for p in given["patients"][name]}
        missing = sorted({p for p in pids if p not in role})
        if missing:
            raise ValueError(f"{args.split}: {len(missing)} patient(s) of this task are in none of its splits, e.g. "
                             f"{missing[0]!r}: another task or data set?")
        parts = [np.asarray([i for i, p in enumerate(pids) if role[p] == name], np.int64)
                 for name in ("train", "val", "test")]
    else:
        csv = args.split_csv or (data.demo_root() / "mimic" / "mimic-cxr-2.0.0-split.csv"
                                 if args.data is None and args.task == "chexpert" else None)
        parts = data.official_split(paths, csv) if csv else data.eval_split(ids)
    tr, va, te = parts
    if args.score == "val":  # choosing settings: val is scored in test's place, and test is never read
        inner_tr, inner_va = data.patient_split([ids[i] for i in tr], (0.8, 0.2), seed=0)
        tr, va, te = tr[inner_tr], tr[inner_va], va
    listed = given.get("fractions", {}) if given.get("scored") == args.score else {}  # a file's subsets of train
    fractions, position = {}, {keys[i]: j for j, i in enumerate(tr)}
    y_tr = labels[tr] if kind != "multilabel" else (labels[tr] > 0)
    for f, seed in [(f, seed) for f in args.fractions for seed in args.seeds]:
        if f"{f:g}/{seed}" in listed:
            unknown = [k for k in listed[f"{f:g}/{seed}"] if k not in position]
            if unknown:
                raise ValueError(f"{args.split}: label fraction {f:g} seed {seed} names {len(unknown)} image(s) "
                                 f"outside the train split, e.g. {unknown[0]!r}")
            fractions[(f, seed)] = np.asarray(sorted(position[k] for k in listed[f"{f:g}/{seed}"]), np.int64)
        else:
            fractions[(f, seed)] = data.label_fraction(y_tr, f, seed)
    record = {"task": args.task, "scored": args.score,
              "patients": {n: sorted({pids[i] for i in idx}) for n, idx in zip(("train", "val", "test"), parts)},
              "fractions": {**listed, **{f"{f:g}/{s}": sorted(keys[tr[j]] for j in pos)
                                         for (f, s), pos in fractions.items()}}}
    record["sha256"] = split_hash(record)
    return tr, va, te, fractions, record


def to_device(x, device):
    """A batch of images on the device; channels_last on CUDA, the layout the encoders run fastest in."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def extract(net, loader, device, amp, fn=None):
    """(fn or net)(images) over a loader, in eval mode, on the CPU: an encoder's features, a classifier's logits."""
    net.eval()
    with torch.no_grad(), amp:
        return torch.cat([(fn or net)(to_device(x, device)).float().cpu() for x, _ in loader])


def fit_linear(kind, ftr, ytr, mtr, fva, yva, mva, seed, head):
    """A linear classifier on frozen features, its L2 strength chosen on val AUC (the first best).
    Returns (scores function, torch Linear equivalent for Grad-CAM)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(ftr)
    xtr, xva = scaler.transform(ftr), scaler.transform(fva)
    val_auc = lambda score: metrics(kind, yva, score(xva), mask=mva)["auc"] or 0  # noqa: E731
    scorer = lambda lin: lambda x: probabilities(lin(torch.tensor(x, dtype=torch.float32)).detach(), kind)  # noqa: E731
    if head == "torch" or kind == "multilabel":
        k = ytr.shape[1] if kind == "multilabel" else (1 if kind == "binary" else int(ytr.max()) + 1)
        X, Y = torch.as_tensor(xtr, dtype=torch.float32), torch.as_tensor(ytr)
        M = torch.as_tensor(mtr if mtr is not None else np.ones((len(xtr), max(k, 1))), dtype=torch.float32)

        def train(wd):
            torch.manual_seed(seed)
            lin = nn.Linear(xtr.shape[1], k)
            opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=wd)
            for _ in range(300):
                opt.zero_grad()
                task_loss(lin(X), Y, M, kind).backward()
                opt.step()
            return lin

        lin = max((train(wd) for wd in (1e-4, 1e-3, 1e-2)), key=lambda lin: val_auc(scorer(lin)))
        return (lambda f: scorer(lin)(scaler.transform(f))), _fold(lin.weight, lin.bias, scaler)
    proba = lambda clf, x: clf.predict_proba(x)[:, 1] if kind == "binary" else clf.predict_proba(x)  # noqa: E731
    clf = max((LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(xtr, ytr) for c in (0.01, 0.1, 1, 10.0)),
              key=lambda clf: val_auc(lambda x: proba(clf, x)))
    return (lambda f: proba(clf, scaler.transform(f))), _fold(clf.coef_, clf.intercept_, scaler)


def knn_scorer(bank, y, kind, n_out, mask=None):
    """The weighted kNN (data.knn_predict: k 20, T 0.07) on the label fraction's features: class probabilities. A
    masked (uncertain) neighbour casts no vote for that label, as it adds nothing to the other modes' loss: the
    label's score is sum(w y m) / sum(w m) over the k nearest, 0.5 where none of them knows it."""
    y, m = torch.as_tensor(y).float(), torch.as_tensor(np.ones(np.shape(y)) if mask is None else mask).float()
    targets = torch.cat([y * m, m], 1) if kind == "multilabel" else F.one_hot(y.long(), max(n_out, 2))

    def score(f):
        v = data.knn_predict(torch.as_tensor(bank), targets, torch.as_tensor(f))
        if kind == "multilabel":  # sum(w y m) / sum(w m): knn_predict's division by sum(w) cancels
            num, den = v.chunk(2, 1)
            v = torch.where(den > 0, num / den.clamp(min=1e-30), 0.5)
        return v[:, 1].numpy() if kind == "binary" else v.numpy()
    return score


def prompt_sets(names, kind, path=None):
    """{set name: prompts}, prompts {label: {"pos": [...], "neg": [...]}} (the binary task's positive class, or each
    observation) or {class: [...]}. Default CheXzero's "{label}" / "no {label}" in lower case; from --prompts, set
    "prompt i" takes each list's i-th prompt, "ensemble" all (chosen on val). The file is checked whole: a JSON error,
    a wrong shape, an empty list, an unknown label is one line naming file, label and what was expected."""
    labels, multiclass = (names[1:] if kind == "binary" else names), kind == "multiclass"
    known = data.CHEXPERT_14 if set(labels) <= set(data.CHEXPERT_14) else ()  # observations this task left out
    if path:
        want = "a non-empty list of prompts" if multiclass else '{"pos": [...], "neg": [...]}, non-empty prompt lists'
        try:
            spec = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected {{label: {want}}}") from None
        unknown = [k for k in spec if k not in labels and k not in known] if isinstance(spec, dict) else [None]
        if unknown:
            raise ValueError(f"{path}: expected {{label: {want}}} for the labels {labels}, found " +
                             (f"a {type(spec).__name__}" if unknown == [None] else f"the label {unknown[0]!r}"))
        ok = lambda v: isinstance(v, list) and v and all(isinstance(t, str) and t.strip() for t in v)  # noqa: E731
        for n, v in ((n, spec.get(n)) for n in labels):
            if not (ok(v) if multiclass else isinstance(v, dict) and set(v) == {"pos", "neg"}
                    and ok(v["pos"]) and ok(v["neg"])):
                raise ValueError(f"{path}: {n!r} needs {want}; found " + (json.dumps(v)[:80] if n in spec else "none"))
        spec = {n: spec[n] for n in labels}
    else:
        low = {n: n.lower().replace("_", " ") for n in labels}
        for n in [n for n in labels if low[n].startswith("no ") and not multiclass]:  # "no No Finding"
            print(f"zero-shot: {n!r} cannot be negated with 'no'; its negative prompt is {low[n][3:]!r} (--prompts)")
        spec = {n: [low[n]] if multiclass else {"pos": [low[n]], "neg": [low[n][3:] if low[n].startswith("no ")
                                                                          else f"no {low[n]}"]} for n in labels}
    pick = lambda p, i: {k: pick(v, i) for k, v in p.items()} if isinstance(p, dict) else [p[i % len(p)]]  # noqa: E731
    n = max(len(v) for p in spec.values() for v in (p.values() if isinstance(p, dict) else [p]))
    return {"ensemble": spec, **{f"prompt {i + 1}": pick(spec, i) for i in range(n)}} if n > 1 else {"default": spec}


@torch.no_grad()
def zero_shot(model, emb, prompts, kind):
    """CheXzero's scores: s is the cosine between the image embedding and the renormalised mean of a prompt list's
    embeddings; per label p = sigmoid((s_pos - s_neg) / tau), per class softmax(s / tau); tau the checkpoint's own."""
    mean = lambda texts: F.normalize(model.encode_text(texts).float().mean(0), dim=0).cpu()  # noqa: E731
    if kind == "multiclass":
        return (emb @ torch.stack([mean(p) for p in prompts.values()]).T / model.temperature).softmax(1).numpy()
    pos, neg = (torch.stack([mean(p[k]) for p in prompts.values()]) for k in ("pos", "neg"))
    p = torch.sigmoid((emb @ pos.T - emb @ neg.T) / model.temperature).numpy()
    return p[:, 0] if kind == "binary" else p


def image_text_model(path, device):
    """convirt.load: zero-shot needs convirt.py beside this file (the other modes do not)."""
    try:
        import convirt
    except ImportError:
        raise ValueError("--mode zeroshot loads the model with convirt.py: copy it beside finetune.py") from None
    return convirt.load(path, device)


def task_loss(out, y, m, kind):
    """Cross-entropy (multi-class), or binary cross-entropy masked where a label is left out (mask 0)."""
    if kind == "multiclass":
        return F.cross_entropy(out, y.long())
    bce = F.binary_cross_entropy_with_logits(out, y.float().view_as(out), reduction="none")
    return (bce * m.view_as(out)).sum() / m.sum().clamp(min=1)


def probabilities(out, kind):
    """Logits -> scores: softmax over classes, else sigmoid (one column for a binary task)."""
    p = out.softmax(1) if kind == "multiclass" else out.sigmoid()
    return p[:, 0].numpy() if kind == "binary" else p.numpy()


@torch.no_grad()
def _fold(weight, bias, scaler):
    """A linear layer on standardised features with the scaler folded in: encoder -> layer gives its logits."""
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    w = f32(weight) / f32(scaler.scale_)
    out = nn.Linear(w.shape[1], w.shape[0])
    out.weight.copy_(w)
    out.bias.copy_(f32(bias) - (w * f32(scaler.mean_)).sum(1))
    return out


def finetune(encoder, dim, kind, n_out, train_ds, val_loader, yva, mva, args, device, amp, seed):
    """Whole network trained; the weights with the best val AUC are kept. Returns the network."""
    torch.manual_seed(seed)
    model = nn.Sequential(encoder, nn.Linear(dim, n_out)).to(device)
    model = model.to(memory_format=torch.channels_last) if device.type == "cuda" else model
    opt = torch.optim.AdamW([{"params": encoder.parameters(), "lr": args.lr},
                             {"params": model[1].parameters(), "lr": args.lr * 10}], weight_decay=args.weight_decay)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=min(args.batch_size, len(train_ds)), shuffle=True,
                                         generator=torch.Generator().manual_seed(seed), num_workers=args.workers,
                                         drop_last=len(train_ds) > args.batch_size)
    total = args.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, max(1, total // 20)))
    best, best_state, bad = -1.0, None, 0
    for epoch in range(args.epochs):
        model.train()
        for x, (y, m) in loader:
            x, y, m = to_device(x, device), y.to(device), m.to(device)
            with amp:
                loss = task_loss(model(x).float(), y, m, kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        s = probabilities(extract(model, val_loader, device, amp), kind)
        auc = metrics(kind, yva, s, mask=mva)["auc"] or 0.0
        if auc > best:
            best, bad, best_state = auc, 0, {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif (bad := bad + 1) >= args.patience:
            break
    model.load_state_dict(best_state)
    return model


def source_id(path):
    """Which weights a checkpoint file holds, cheaply: its path, size and modification time."""
    st = os.stat(path)
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def main(argv=None):
    args = get_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(("cuda" if args.device == "auto" else args.device) if cuda else "cpu")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    out = Path(args.out or f"runs/finetune-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "results.json").exists() and not args.resume:
        raise SystemExit(f"{out} already holds results: pass --resume to finish them, or choose another --out")
    paths, labels, mask, names, ids, kind = load_task(args)
    sets = "zeroshot" in args.mode and prompt_sets(names, kind, args.prompts)  # a bad file: stopped before any work
    body = Path(args.prompts).read_bytes() if sets and args.prompts else json.dumps(sets, sort_keys=True).encode()
    prompts_id = {"prompts_file": args.prompts or "default", "prompts_sha256": hashlib.sha256(body).hexdigest()}
    channels = args.channels or (3 if args.task in ("folder", "hicervix") else 1)
    rows = [(n, ("init", n)) for n in args.init]
    for spec in args.ckpt:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec).parent.name, spec)  # a run's: its folder
        if name in [r for r, _ in rows]:  # two files in one folder, say: one row would hold both
            raise ValueError(f"two rows are named {name!r} (--ckpt {spec}): name each one, --ckpt NAME=PATH")
        load_encoder(path, args.arch)  # fail now, before any work, on a wrong file or arch
        rows.append((name, ("ckpt", path)))
    out.mkdir(parents=True, exist_ok=True)  # only once every input is known good
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    tr, va, te, fraction_sets, split_record = make_split(args, paths, ids, labels, kind)
    data.atomic_write_text(out / "split.json", json.dumps(split_record, indent=1))
    mask_all = mask if mask is not None else np.ones(labels.shape, np.float32)  # 0: a label left out (uncertain)
    for split, idx in (("train", tr), ("val", va), ("test" if args.score == "test" else "scored val", te)):
        bad = unscorable(kind, labels[idx], mask_all[idx], names)  # a head needs every class; val, test score some
        if bad and (split == "train" and kind != "multilabel" or len(bad) == (1 if kind == "binary" else len(names))):
            raise ValueError(f"the {split} split cannot be used: {', '.join(bad)}")
        if bad and split != "train":
            print(f"{split}: {', '.join(bad)} cannot be scored: left out of the means in every mode")
    groups = [str(ids[i]) for i in te]  # the bootstrap's unit: a patient, all of a patient's images together
    resampled = (f"the {len(set(groups))} scored patients, all of a patient's images together" if len(set(groups))
                 < len(te) else "the scored images, one per patient" if groups[0] != str(paths[te[0]]) else
                 "the scored images: the task names no patients (split by image too)")
    ds = data.ImageDataset(paths, None, data.eval_transform(args.size), size=args.size, channels=channels,
                           cache_dir=args.cache_dir or None, skip_bad=args.skip_bad, workers=args.workers)
    if len(ds) != len(paths):
        raise ValueError(f"{len(paths) - len(ds)} unreadable images; finetune.py needs every labelled image readable")
    loader_of = lambda idx: torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=64,  # noqa: E731
                                                        num_workers=args.workers)
    results = json.loads((out / "results.json").read_text()) if args.resume and (out / "results.json").exists() else []
    # a cell is done only if it came from the same weights: a checkpoint re-trained under the same name is re-evaluated
    source_of = {n: f"init:{w}" if src == "init" else source_id(w) for n, (src, w) in rows}
    paired = {n: src == "ckpt" and plain_state_dict(w) is None and data.load_checkpoint(w)["method"] == "convirt"
              for n, (src, w) in rows if "zeroshot" in args.mode}  # the checkpoints read again for zero-shot only
    if "zeroshot" in args.mode and not any(paired.values()):
        raise ValueError("--mode zeroshot needs a convirt.py checkpoint (an image-text model); no row has a text tower")

    def same_weights(c):  # cells written before sources were recorded carry none, and are kept; so are other rows'
        same = "source" not in c or c["method"] not in source_of or c["source"] == source_of[c["method"]]
        prompts = c["mode"] != "zeroshot" or not sets or c.get("prompts_sha256") == prompts_id["prompts_sha256"]
        return same and prompts and c.get("scored", "test") == args.score

    stale = [c for c in results if not same_weights(c)]
    if stale:
        print(f"--resume: {len(stale)} cell(s) of {sorted({c['method'] for c in stale})} came from other weights, "
              "another --score or other prompts: re-evaluated")
        results = [c for c in results if same_weights(c)]
    done = {(c["method"], c["mode"], c["fraction"], c["seed"]) for c in results}
    n_out = labels.shape[1] if kind == "multilabel" else (1 if kind == "binary" else len(names))
    ft_aug = T.Compose([T.RandomResizedCrop(args.size, scale=(0.8, 1.0), antialias=True), data.ToRGBNormalized()])
    curves, split = {}, (("val", "test"), (va, te))
    print(f"finetune: task {args.task} ({kind}, {len(names)} classes), {len(paths)} images (train {len(tr)} / val "
          f"{len(va)} / {'test' if args.score == 'test' else 'scored: val'} {len(te)}), rows {[r[0] for r in rows]}, "
          f"modes {args.mode}; split {out / 'split.json'} (sha256 {split_record['sha256'][:16]})")
    for name, (src, what) in rows:
        def fresh():  # this row's encoder, as it starts, on the device
            net, dim = data.image_encoder(args.arch, what) if src == "init" else load_encoder(what, args.arch)
            return net.to(device), dim
        feats = None
        for mode in args.mode:
            if mode == "zeroshot" and not paired.get(name):
                print(f"  {name}: zero-shot needs a convirt.py checkpoint (an image-text model); skipped")
                continue
            zeroshot = mode == "zeroshot"  # no labelled image: one cell, at fraction 0
            for f in [0.0] if zeroshot else args.fractions:
                for seed in args.seeds[:1] if zeroshot else args.seeds:
                    if (name, mode, f, seed) in done:
                        continue
                    chosen = fraction_sets.get((f, seed), np.zeros(0, np.int64))  # positions in the train split
                    sub, net, score, extra = tr[chosen], None, None, {}
                    torch.manual_seed(seed)
                    if zeroshot:  # the prompt set, too, is chosen on val
                        clip = image_text_model(what, device)
                        emb = {k: extract(clip, loader_of(i), device, amp, clip.encode_image) for k, i in zip(*split)}
                        auc = {k: metrics(kind, labels[va], zero_shot(clip, emb["val"], p, kind), mask=mask_all[va]
                                          )["auc"] or 0.0 for k, p in sets.items()}
                        extra = {"prompts": max(auc, key=auc.get), "prompts_val_auc": auc, **prompts_id}
                        s_va, s_te = (zero_shot(clip, emb[k], sets[extra["prompts"]], kind) for k in ("val", "test"))
                    else:
                        enc, dim = fresh()
                    if mode in ("linear", "knn") and feats is None:  # frozen: extracted once per row, for every cell
                        feats = {k: extract(enc, loader_of(idx), device, amp).numpy()
                                 for k, idx in (("train", tr), ("val", va), ("test", te))}
                    if mode == "knn":
                        score = knn_scorer(feats["train"][chosen], labels[sub], kind, n_out, mask_all[sub])
                    elif mode == "linear":
                        before = {k: v.clone() for k, v in enc.state_dict().items()}
                        score, lin = fit_linear(kind, feats["train"][chosen], labels[sub], mask_all[sub],
                                                feats["val"], labels[va], mask_all[va], seed, args.head)
                        assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items()), "the encoder moved"
                        net = nn.Sequential(enc, lin.to(device))
                    elif mode == "finetune":
                        train_ds = data.ImageDataset([paths[i] for i in sub], [(labels[i], mask_all[i]) for i in sub],
                                                     ft_aug, size=args.size, channels=channels,
                                                     cache_dir=args.cache_dir or None)
                        net = finetune(enc, dim, kind, n_out, train_ds, loader_of(va), labels[va], mask_all[va],
                                       args, device, amp, seed)
                        s_va, s_te = (probabilities(extract(net, loader_of(i), device, amp), kind) for i in (va, te))
                    if score is not None:
                        s_va, s_te = score(feats["val"]), score(feats["test"])
                    thr = choose_thresholds(kind, labels[va], s_va, mask_all[va])
                    m = metrics(kind, labels[te], s_te, thr, mask_all[te])
                    if args.task == "chexpert":  # the 5 competition observations' mean, however many were scored
                        m["auc_5"] = float(np.mean([a for n, a in zip(names, m["per_class_auc"])
                                                    if n in data.CHEXPERT_5 and a is not None] or [np.nan]))
                    if args.bootstrap:
                        m["auc_boot"], m["f1_boot"] = bootstrap(kind, labels[te], s_te, thr, mask_all[te],
                                                                args.bootstrap, groups=groups)
                        m["auc_ci"], m["f1_ci"] = interval([m["auc_boot"]]), interval([m["f1_boot"]])
                    m.update(method=name, source=source_of[name], scored=args.score, mode=mode, fraction=f, seed=seed,
                             n_train=int(len(sub)), confusion=confusion(kind, labels[te], s_te, thr, mask_all[te]),
                             resampled=resampled, **extra)
                    results.append(m)
                    data.atomic_write_text(out / "results.json", json.dumps(results, indent=1))  # cell by cell
                    print(f"  {name:>12} {mode:>8} {f:>5g} seed {seed}: F1 {m['f1']:.3f}  AUC "
                          f"{m['auc'] if m['auc'] is None else round(m['auc'], 3)}"
                          + (f" {np.round(m['auc_ci'], 3).tolist()}" if m.get("auc_ci") else "")
                          + (f"  (prompts: {extra['prompts']})" if zeroshot else f"  (n_train {len(sub)})"))
                    if f == (0.0 if zeroshot else max(args.fractions)) and seed == args.seeds[0]:
                        curves[(name, mode)] = (s_te, net)
        if args.embed and feats is not None:
            summary = embed_figures(feats["test"], labels[te], names, name, out, kind)
            (out / f"embed-{name}.json").write_text(json.dumps(summary))
            print(f"  {name}: K-means NMI {summary['kmeans']['nmi']:.3f}, DBSCAN NMI {summary['dbscan']['nmi']:.3f}, "
                  f"effective rank {summary['effective_rank']:.1f} of {feats['test'].shape[1]}")

    table = results_table(results, [r[0] for r in rows], args.fractions, resampled)
    data.atomic_write_text(out / "results.md", f"# {args.task}: {len(names)} classes, {args.score} n = {len(te)}, "
                           f"split sha256 {split_record['sha256'][:16]} (split.json)\n\n{table}")
    write_csv(results, out / "results.csv")
    print("\n" + table)
    figures(results, curves, labels[te], mask_all[te], names, kind, args.fractions, out)
    if args.gradcam:
        gradcam_figures(curves, ds, te, labels, names, kind, args.gradcam, out, device)
    print(f"results: {out / 'results.md'}")


def write_csv(results, path):
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["method", "mode", "fraction", "seed", "n_train", "auc", "f1", "acc", "auc_ci", "f1_ci"],
                       extrasaction="ignore")
    w.writeheader()
    w.writerows(results)
    data.atomic_write_text(path, buf.getvalue())


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no screen needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def figures(results, curves, y, mask, names, kind, fractions, out):
    from sklearn.metrics import roc_curve
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for mode in sorted({c["mode"] for c in results} - {"zeroshot"}):
        for m in dict.fromkeys(c["method"] for c in results):
            aucs = [[c["auc"] for c in results if (c["method"], c["mode"], c["fraction"]) == (m, mode, f)
                     and c["auc"] is not None] for f in fractions]
            ax.plot(fractions, [np.mean(a) if a else np.nan for a in aucs], marker="o", label=f"{m} ({mode})")
    ax.set(xscale="log", xlabel="label fraction", ylabel="test AUC", title="AUC against label fraction")
    ax.legend(fontsize=7) if ax.lines else None  # zero-shot only: no line
    save_figure(fig, out / "auc_vs_fraction.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for (m, mode), (s, _) in curves.items():
        yy, ss = ((y, s) if kind == "binary" else (np.eye(len(names))[y].ravel(), s.ravel()) if kind == "multiclass"
                  else (y[mask > 0], s[mask > 0]))  # several classes: the micro-average
        if len(np.unique(yy)) == 2:
            fpr, tpr, _ = roc_curve(yy, ss)
            ax.plot(fpr, tpr, label=f"{m} ({mode})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title="ROC, 100 % labels" + ("" if kind == "binary" else " (micro-average)"))
    ax.legend(fontsize=7) if len(ax.lines) > 1 else None  # the diagonal alone: no cell at 100 %
    save_figure(fig, out / "roc.png")


def embed_figures(f, y, names, method, out, kind):
    from sklearn.manifold import TSNE
    plt = pyplot()
    if kind == "multilabel":
        y = y.argmax(1)  # colour by the first positive observation
    emb = TSNE(n_components=2, perplexity=max(2, min(30, len(f) // 4)), random_state=0, init="pca").fit_transform(f)
    fig, ax = plt.subplots(figsize=(5, 4))
    for c in np.unique(y):
        ax.scatter(emb[y == c, 0], emb[y == c, 1], s=8, label=names[c] if c < len(names) else str(c))
    ax.set(title=f"t-SNE of test features: {method}")
    ax.legend(fontsize=6)
    save_figure(fig, out / f"tsne-{method}.png")
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    means = unit(np.stack([unit(f)[y == c].mean(0) for c in np.unique(y)]))
    fig, ax = plt.subplots(figsize=(4, 4))
    fig.colorbar(ax.imshow(means @ means.T, cmap="viridis"))
    ax.set(title="cosine between class means")
    save_figure(fig, out / f"class-similarity-{method}.png")
    return {**cluster_scores(f, y), "effective_rank": effective_rank(f)}


def gradcam_figures(curves, ds, te, labels, names, kind, n, out, device):
    plt = pyplot()
    y = labels[te] if kind != "multilabel" else labels[te].argmax(1)
    for (m, mode), (_, net) in [(k, v) for k, v in curves.items() if v[1] is not None]:  # kNN, zero-shot: no net
        net = net.to(device).eval()
        chosen = [i for c in np.unique(y) for i in np.flatnonzero(y == c)[:n]]
        x = torch.stack([ds[int(te[i])][0] for i in chosen]).to(device)
        target = torch.as_tensor(y[chosen], device=device)
        cams = grad_cam(net, last_conv_block(net[0]), x, target).cpu()
        with torch.no_grad():
            pred = net(x)
            pred = (pred.argmax(1) if pred.shape[1] > 1 else (pred[:, 0] > 0).long()).cpu()
        fig, axes = plt.subplots(1, len(chosen), figsize=(2 * len(chosen), 2.3), squeeze=False)
        std, mean = (torch.tensor(v)[:, None, None] for v in (data.IMAGENET_STD, data.IMAGENET_MEAN))
        for a, img, cam, t, p in zip(axes[0], x.cpu(), cams, target.cpu(), pred):
            a.imshow((img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
            a.imshow(cam.numpy(), cmap="jet", alpha=0.4)
            a.set_title(f"label {names[int(t)]}\npred {names[int(p)]}", fontsize=6)
            a.axis("off")
        save_figure(fig, out / f"gradcam-{m}-{mode}.png")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, data.BadImageError) as e:  # bad input: the message, not a traceback
        raise SystemExit(f"finetune.py: {e}") from None
