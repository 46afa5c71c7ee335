"""demo.py: the offline demo data set that medssl's tests and examples run on.

Chest phantoms with findings and the reports that describe them (MIMIC-CXR's layout, CheXpert labels,
an official-style split), an RSNA-style pneumonia set and Herlev-style colour cell images, all written as
the real data sets lay them out, so the scripts read the demo through the same adapters as real data.
Only data.py imports this file, and only when the demo data are needed (`data.demo_root`) or a run's curves
are drawn (`data.plot_runs`).

    python data.py demo /tmp/demo                          # write the demo data set and print a summary
    python data.py demo /tmp/pairs --studies 4096 --size 256  # a larger image-report set for GPU work
    python data.py bench-cache                             # images/s: decoding full-size DICOM vs the cache
    python data.py cache --data ROOT --size 224            # decode a data set into the cache before training
    python data.py plot softmax=runs/a sigmoid=runs/b      # the runs' curves overlaid, in curves.png
"""
import argparse
import contextlib
import csv
import hashlib
import importlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T

from data import (CHEXPERT_14, HERLEV_CLASSES, BadImageError, DecodeCache, ImageDataset, _read_csv, atomic_write_text,
                  default_cache_dir, eval_split, file_lock, find_images, fit_square, load_image, mimic_cxr_pairs,
                  patient_split, read_class_folders, read_rsna_labels, train_side)

# ----------------------------------------------------------------------------------
# The demo data set's accessors (data.demo_root, ... reach them through data.__getattr__)
# ----------------------------------------------------------------------------------
DEMO_VERSION = 3  # 2: 600 RSNA-style images, RSNA and cytology on their own random streams; 3: a MIMIC test split


def demo_root(size=128):
    """The demo data set's folder, written on first use: $MEDSSL_DEMO_DIR, else ~/.cache/medssl/demo-v{N}-{size}px."""
    base = os.environ.get("MEDSSL_DEMO_DIR") or os.path.join(default_cache_dir(), f"demo-v{DEMO_VERSION}-{size}px")
    root = Path(base)
    if (root / "summary.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(str(root) + ".lock"):  # several processes (torchrun ranks) may ask at once
        if not (root / "summary.json").is_file():
            print(f"building the demo data set in {root} (once) ...", file=sys.stderr)
            tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".tmp"))
            make_demo(tmp, size=size, quiet=True)
            if root.exists():
                import shutil

                shutil.rmtree(root)
            os.replace(tmp, root)
    return root


def demo_pairs(size=128, split="train"):
    """(paths, reports, patient ids) of the demo image-report set's official-style split: 'train' (192
    studies: what the demo pretrains on), 'validate' (48: ConVIRT's held-out retrieval set, on which the
    demo defaults were chosen), 'test' (80: scored only), or None for all 320."""
    root = demo_root(size) / "mimic"
    return mimic_cxr_pairs(root, split_csv=root / "mimic-cxr-2.0.0-split.csv" if split else None, split=split)


def demo_images(kind="xray", size=128):
    """Paths of the demo images the pretraining scripts use: 'xray' (the MIMIC-style DICOMs) or
    'cytology'. Only each evaluation's train split: no image of a patient that finetune.py validates
    or tests on is ever pretrained on."""
    if kind == "xray":
        return demo_pairs(size, "train")[0]
    if kind == "cytology":
        paths, _, _, ids = demo_labelled("cytology", size)
        return [paths[i] for i in eval_split(ids)[0]]
    raise ValueError(f"unknown demo set {kind!r}: choose xray or cytology")


def demo_labelled(task, size=128, without_test=False):
    """(paths, labels, class names, patient ids) of a demo classification task:
    'rsna' (pneumonia yes/no), 'cytology' (7 Herlev classes), 'cytology-2class'.
    without_test: leave out finetune.py's test patients (for monitors, which must not see them)."""
    root = demo_root(size)
    if task == "rsna":
        labels = read_rsna_labels(root / "rsna" / "stage_2_train_labels.csv")
        ids = sorted(labels)
        paths = [str(root / "rsna" / "stage_2_train_images" / f"{i}.dcm") for i in ids]
        out = paths, np.asarray([labels[i] for i in ids], np.int64), ["no pneumonia", "pneumonia"], ids
    elif task in ("cytology", "cytology-2class"):
        grouping = "herlev-2class" if task.endswith("2class") else None
        paths, labels, names = read_class_folders(root / "cytology", grouping)
        out = paths, labels, names, paths
    else:
        raise ValueError(f"unknown demo task {task!r}: choose rsna, cytology or cytology-2class")
    if without_test:
        keep = np.sort(np.concatenate(eval_split(out[3])[:2]))
        out = [out[0][i] for i in keep], out[1][keep], out[2], [out[3][i] for i in keep]
    return out


LOBES = {  # (centre u, centre v) in the phantom's [-1, 1] frame; the patient's right is the image's left
    "right upper lobe": (-0.38, -0.32), "right middle lobe": (-0.36, 0.08), "right lower lobe": (-0.40, 0.34),
    "left upper lobe": (0.40, -0.30), "left lower lobe": (0.42, 0.32),
}
FINDINGS = ["consolidation", "effusion", "cardiomegaly", "pneumothorax"]


def _smooth_noise(rng, size, scale):
    """Band-limited noise in [-1, 1]: white noise blurred by a Gaussian of `scale` pixels."""
    n = torch.from_numpy(rng.standard_normal((1, 1, size, size)).astype(np.float32))
    k = max(3, int(scale * 3) | 1)
    n = T.functional.gaussian_blur(n, [k, k], [scale, scale])[0, 0].numpy()  # GaussianBlur would draw sigma globally
    return n / (np.abs(n).max() + 1e-8)


def _soft(d, edge):
    """Soft inside-mask from a signed distance (negative inside)."""
    return 1.0 / (1.0 + np.exp(np.clip(d / edge, -50, 50)))


def chest_phantom(rng, size, findings):
    """A frontal chest radiograph phantom in display space [0, 1] (bone bright, air dark).

    findings: dict with optional 'consolidation' (list of lobes), 'effusion' ('left'|'right'|
    'bilateral'), 'cardiomegaly' (True), 'pneumothorax' ('left'|'right'). Position, size,
    rotation, exposure and noise vary from image to image.
    """
    s = size
    y, x = np.mgrid[0:s, 0:s].astype(np.float64) / (s - 1) * 2 - 1
    ang = rng.uniform(-0.08, 0.08)
    sc = rng.uniform(0.9, 1.08)
    dx, dy = rng.uniform(-0.06, 0.06, 2)
    u = (np.cos(ang) * (x - dx) + np.sin(ang) * (y - dy)) / sc
    v = (-np.sin(ang) * (x - dx) + np.cos(ang) * (y - dy)) / sc
    e = 2.0 / s  # edge softness of about one pixel
    img = np.full((s, s), 0.04)
    torso = _soft(np.sqrt((u / 0.92) ** 2 + ((v - 0.15) / 1.05) ** 2) - 1, e * 3)
    img += 0.42 * torso
    lung_r = _soft(np.sqrt(((u + 0.38) / 0.27) ** 2 + ((v + 0.02) / 0.56) ** 2) - 1, e * 2)
    lung_l = _soft(np.sqrt(((u - 0.38) / 0.26) ** 2 + ((v + 0.04) / 0.54) ** 2) - 1, e * 2)
    # lung markings: fine vessels fading to the periphery
    markings = 0.06 * np.clip(_smooth_noise(rng, s, s / 60), 0, 1) * (1 - 0.6 * np.abs(u))
    lung_r_val = lung_r * (0.26 - markings)
    lung_l_val = lung_l * (0.26 - markings)
    if findings.get("pneumothorax"):
        side = findings["pneumothorax"]
        cu = -0.38 if side == "right" else 0.38
        # collapsed lung edge: lateral/apical rim with no markings, very dark, and a thin pleural line
        r = np.sqrt(((u - cu) / 0.27) ** 2 + ((v + 0.02) / 0.56) ** 2)
        rim = _soft(0.72 - r, e * 3) * (lung_r if side == "right" else lung_l)
        line = np.exp(-((r - 0.72) / 0.025) ** 2) * (lung_r if side == "right" else lung_l)
        val = lung_r_val if side == "right" else lung_l_val
        val = val + rim * (0.12 + markings) - 0.03 * line
        if side == "right":
            lung_r_val = val
        else:
            lung_l_val = val
    img -= lung_r_val + lung_l_val
    # heart: mostly on the image's right (the patient's left); larger with cardiomegaly
    cs = rng.uniform(1.32, 1.5) if findings.get("cardiomegaly") else rng.uniform(0.9, 1.08)
    heart = _soft(np.sqrt(((u - 0.12) / (0.25 * cs)) ** 2 + ((v - 0.3) / (0.22 * cs ** 0.6)) ** 2) - 1, e * 2)
    img = img * (1 - heart) + heart * 0.5
    img += 0.2 * _soft(np.abs(u) - 0.07, e) * torso  # spine
    for k in range(9):  # ribs: curved bands across each lung
        rv = -0.72 + 0.16 * k + 0.22 * u ** 2
        img += 0.08 * np.exp(-((v - rv) / 0.025) ** 2) * (lung_r + lung_l) * _soft(np.abs(u) - 0.7, e)
    for side in (-1, 1):  # clavicles
        cv = -0.72 + 0.12 * (side * u - 0.2) ** 2
        img += 0.12 * np.exp(-((v - cv) / 0.03) ** 2) * _soft(np.abs(u - side * 0.35) - 0.3, e)
    for lobe in findings.get("consolidation", []):
        cu, cv = LOBES[lobe]
        lung = lung_r if cu < 0 else lung_l
        blob = _soft(np.sqrt(((u - cu) / 0.17) ** 2 + ((v - cv) / 0.15) ** 2) - 1, 0.08)
        patch = 0.5 + 0.5 * _smooth_noise(rng, s, s / 25)
        img += 0.22 * blob * np.clip(patch, 0.2, 1) * lung
    eff = findings.get("effusion")
    if eff:
        for side in (("left", "right") if eff == "bilateral" else (eff,)):
            cu = -0.38 if side == "right" else 0.38
            lung = lung_r if side == "right" else lung_l
            level = rng.uniform(0.18, 0.32)
            # meniscus: fluid climbs laterally, blunting the costophrenic angle
            meniscus = level - 0.35 * np.clip(np.abs(u - cu) * np.sign(cu) * np.sign(u) - 0.05, 0, 1) * (np.sign(u) == np.sign(cu))
            img += 0.24 * _soft(meniscus - v, 0.03) * lung
    gamma = rng.uniform(0.8, 1.25)  # exposure
    img = np.clip(img, 0, 1) ** gamma * rng.uniform(0.9, 1.1)
    img += rng.normal(0, 0.015, (s, s))
    return np.clip(img, 0, 1).astype(np.float32)


_SENTENCES = {
    "normal_lungs": ["The lungs are clear.", "No focal consolidation is seen.", "Lungs are well expanded and clear.",
                     "There is no focal airspace opacity."],
    "normal_pleura": ["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                      "No effusion. No pneumothorax is seen."],
    "normal_heart": ["Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
                     "Cardiac and mediastinal contours are normal."],
    "consolidation": ["There is consolidation in the {lobe}.", "Focal airspace opacity is present in the {lobe}.",
                      "Patchy consolidation is seen within the {lobe}."],
    "effusion": ["There is a {side} pleural effusion.", "A {side} pleural effusion blunts the costophrenic angle.",
                 "Small {side} pleural effusion is present."],
    "cardiomegaly": ["The heart is enlarged.", "Cardiomegaly is present.", "Moderate enlargement of the cardiac silhouette."],
    "pneumothorax": ["There is a {side} pneumothorax.", "A {side} apical pneumothorax is seen.",
                     "{Side} pneumothorax with visible pleural line."],
    "imp_normal": ["No acute cardiopulmonary process.", "Normal chest radiograph.", "No acute intrathoracic abnormality."],
    "imp_consolidation": ["{Lobe} consolidation, concerning for pneumonia.", "{Lobe} pneumonia.",
                          "Opacity in the {lobe} may represent pneumonia."],
    "imp_effusion": ["{Side} pleural effusion.", "{Side} effusion."],
    "imp_cardiomegaly": ["Cardiomegaly.", "Enlarged heart."],
    "imp_pneumothorax": ["{Side} pneumothorax.", "{Side} pneumothorax, findings discussed with Dr. Smith at 3.5 p.m."],
}


def _random_findings(rng):
    f = {}
    r = rng.random()
    if r < 0.3:
        return f  # normal
    if rng.random() < 0.45:
        f["consolidation"] = list(rng.choice(list(LOBES), size=1 if rng.random() < 0.8 else 2, replace=False))
    if rng.random() < 0.3:
        f["effusion"] = str(rng.choice(["left", "right", "bilateral"]))
    if rng.random() < 0.3:
        f["cardiomegaly"] = True
    if rng.random() < 0.2:
        f["pneumothorax"] = str(rng.choice(["left", "right"]))
    if not f:
        f["consolidation"] = [str(rng.choice(list(LOBES)))]
    return f


def _matches(sentence, templates):
    """Whether a sentence was made from one of the templates (their {placeholders} as wildcards)."""
    return any(re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)), sentence) for t in templates)


def demo_report(rng, findings):
    """A MIMIC-CXR-style report (FINAL REPORT banner, FINDINGS, IMPRESSION) describing `findings`."""
    pick = lambda k, **kw: str(rng.choice(_SENTENCES[k])).format(**kw)  # noqa: E731
    fnd, imp = [], []
    uncertain = False
    for lobe in findings.get("consolidation", []):
        fnd.append(pick("consolidation", lobe=lobe))
        s = pick("imp_consolidation", lobe=lobe, Lobe=lobe.capitalize())
        uncertain |= "may represent" in s
        imp.append(s)
    if not findings.get("consolidation"):
        fnd.append(pick("normal_lungs"))
    if findings.get("effusion"):
        side = "bilateral" if findings["effusion"] == "bilateral" else findings["effusion"]
        fnd.append(pick("effusion", side=side))
        imp.append(pick("imp_effusion", Side=side.capitalize()))
    if findings.get("pneumothorax"):
        side = findings["pneumothorax"]
        fnd.append(pick("pneumothorax", side=side, Side=side.capitalize()))
        imp.append(pick("imp_pneumothorax", Side=side.capitalize()))
    if not findings.get("effusion") and not findings.get("pneumothorax"):
        fnd.append(pick("normal_pleura"))
    fnd.append(pick("cardiomegaly") if findings.get("cardiomegaly") else pick("normal_heart"))
    if findings.get("cardiomegaly"):
        imp.append(pick("imp_cardiomegaly"))
    if not imp:
        imp.append(pick("imp_normal"))
    if findings:  # abnormal studies keep one normal statement at most, so most sentences carry a finding
        abnormal_keys = ("consolidation", "effusion", "cardiomegaly", "pneumothorax")
        is_abn = [any(_matches(s, _SENTENCES[k]) for k in abnormal_keys) for s in fnd]
        normals = [i for i, a in enumerate(is_abn) if not a]
        drop = set(normals[1:]) if normals else set()
        fnd = [s for i, s in enumerate(fnd) if i not in drop]
    order = rng.permutation(len(fnd))
    fnd = [fnd[i] for i in order]
    # wrap lines at ~70 characters as the archive's reports are
    body = " ".join(fnd)
    wrapped = re.sub(r"(.{1,68})(\s+|$)", r"\1\n ", body).rstrip()
    imp_text = " ".join(f"{i + 1}. {s}" for i, s in enumerate(imp)) if len(imp) > 1 else imp[0]
    text = ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
            f" INDICATION:  ___ with {str(rng.choice(['cough', 'fever', 'dyspnea', 'chest pain']))}\n \n"
            " COMPARISON:  None.\n \n FINDINGS: \n \n " + wrapped + "\n \n IMPRESSION: \n \n " + imp_text + "\n")
    return text, uncertain


def chexpert_row(findings, uncertain):
    """CheXpert-style labels for a phantom: 1, 0 (explicitly negated), -1 (uncertain) or '' (not mentioned)."""
    row = {o: "" for o in CHEXPERT_14}
    cons = bool(findings.get("consolidation"))
    row["Consolidation"] = "1.0" if cons else "0.0"
    row["Lung Opacity"] = "1.0" if cons else ""
    row["Pneumonia"] = ("-1.0" if uncertain else "1.0") if cons else ""
    row["Pleural Effusion"] = "1.0" if findings.get("effusion") else "0.0"
    row["Pneumothorax"] = "1.0" if findings.get("pneumothorax") else "0.0"
    row["Cardiomegaly"] = "1.0" if findings.get("cardiomegaly") else ""
    row["No Finding"] = "1.0" if not findings else ""
    return row


def write_dicom(path, display, rng, photometric="MONOCHROME2", bits=12, rle=False, patient_id="", study_uid=None):
    """Write a display-space image [0, 1] as a real DICOM radiograph (CR/DX-like).

    Stored values s, rescale to modality values m = slope * s + intercept, and a window
    (center, width) chosen so that load_dicom returns `display` back to within a stored step.
    MONOCHROME1 stores the inverted image, as many CR readers do.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    maxv = 2 ** bits - 1
    # the window spans stored values [lo, hi] inside the full range, so windowing really matters
    lo, hi = int(maxv * rng.uniform(0.05, 0.15)), int(maxv * rng.uniform(0.8, 0.95))
    d = display if photometric == "MONOCHROME2" else 1.0 - display
    stored = np.rint(lo + d * (hi - lo)).astype(np.uint16)
    slope, intercept = float(rng.choice([1.0, 0.5, 2.0])), float(rng.choice([0.0, -1024.0, 100.0]))
    # LINEAR window (PS3.3 C.11.2.1.2.1) mapping modality lo..hi onto 0..1: w - 1 = (hi - lo) * slope
    width = (hi - lo) * slope + 1
    center = lo * slope + intercept + 0.5 + (width - 1) / 2

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.Modality, ds.ViewPosition = patient_id, "DX", "PA"
    ds.Rows, ds.Columns = display.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    ds.WindowCenter, ds.WindowWidth = f"{center:.2f}", f"{width:.2f}"
    ds.PixelData = stored.tobytes()
    if rle:
        ds.compress(RLELossless, stored)
    ds.save_as(path, enforce_file_format=True)


def cell_image(rng, size, cls):
    """A colour Pap-smear cell image (Herlev-style class) in [0, 1], H x W x 3.

    Normal cells: small nuclei, large cytoplasm (superficial: pink, pyknotic nucleus;
    intermediate: blue-green; columnar: elongated with a basal nucleus). Dysplasia to
    carcinoma in situ: the nucleus grows, loses its round outline and gets coarser chromatin,
    while the cytoplasm shrinks.
    """
    s = size
    y, x = np.mgrid[0:s, 0:s].astype(np.float64) / (s - 1) * 2 - 1
    k = HERLEV_CLASSES.index(cls)
    # (cytoplasm radius, elongation, nucleus radius, nucleus irregularity, chromatin coarseness)
    params = [(0.62, 1.0, 0.06, 0.02, 0.0), (0.6, 1.0, 0.1, 0.03, 0.05), (0.3, 2.2, 0.11, 0.05, 0.05),
              (0.55, 1.0, 0.17, 0.08, 0.15), (0.45, 1.0, 0.22, 0.12, 0.25), (0.36, 1.0, 0.26, 0.18, 0.35),
              (0.32, 1.0, 0.29, 0.22, 0.45)][k]
    rc, elong, rn, irr, coarse = params
    rc *= rng.uniform(0.85, 1.15)
    rn *= rng.uniform(0.85, 1.15)
    ang = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(-0.1, 0.1, 2)
    xr = np.cos(ang) * (x - cx) + np.sin(ang) * (y - cy)
    yr = -np.sin(ang) * (x - cx) + np.cos(ang) * (y - cy)
    theta = np.arctan2(yr, xr)
    # polygonal-ish outline: a few low harmonics
    wob = sum(rng.uniform(0, 0.06) * np.cos(h * theta + rng.uniform(0, 6.28)) for h in (3, 4, 5))
    rad = np.sqrt((xr / elong) ** 2 + yr ** 2)
    cyto = _soft(rad - rc * (1 + wob), 0.02)
    # nucleus, basal in columnar cells
    nx = xr - (rc * elong * 0.55 if cls == "normal_columnar" else rng.uniform(-0.05, 0.05))
    ntheta = np.arctan2(yr, nx)
    nwob = sum(rng.uniform(0, irr) * np.cos(h * ntheta + rng.uniform(0, 6.28)) for h in (2, 3, 5, 7))
    nuc = _soft(np.sqrt(nx ** 2 + yr ** 2) - rn * (1 + nwob), 0.015)
    stain = rng.uniform(0.9, 1.1, 3)
    bg = np.array([0.92, 0.9, 0.93]) * stain
    cyto_col = (np.array([0.93, 0.62, 0.72]) if cls == "normal_superficiel" else np.array([0.62, 0.8, 0.86])) * stain
    if k >= 3:
        cyto_col = np.array([0.7, 0.75, 0.88]) * stain
    nuc_col = np.array([0.32, 0.2, 0.45]) * rng.uniform(0.85, 1.15) * (0.7 if cls == "normal_superficiel" else 1.0)
    img = bg[None, None] * (1 - cyto[..., None]) + cyto_col[None, None] * cyto[..., None]
    chrom = 1 + coarse * _smooth_noise(rng, s, max(s / 60, 0.8))[..., None]
    img = img * (1 - nuc[..., None]) + (nuc_col[None, None] * chrom) * nuc[..., None]
    for _ in range(int(rng.integers(0, 4))):  # debris and neighbouring fragments
        dxy = rng.uniform(-1, 1, 2)
        blob = _soft(np.sqrt((x - dxy[0]) ** 2 + (y - dxy[1]) ** 2) - rng.uniform(0.03, 0.12), 0.02)
        img = img * (1 - 0.4 * blob[..., None]) + 0.4 * blob[..., None] * cyto_col[None, None] * 0.9
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def make_demo(out_dir, size=128, n_xray=240, n_xray_test=80, n_rsna=600, n_cells=40, seed=0, quiet=False):
    """Write the demo data set into out_dir and return a summary dict.

    out_dir/mimic/files/pXX/pSUBJECT/sSTUDY/<id>.dcm + sSTUDY.txt   image-report pairs (MIMIC-CXR layout)
    out_dir/mimic/mimic-cxr-2.0.0-chexpert.csv, -metadata.csv          CheXpert labels, views
    out_dir/mimic/mimic-cxr-2.0.0-split.csv                            train / validate / test by patient
    out_dir/rsna/stage_2_train_images/<patientId>.dcm                  pneumonia set
    out_dir/rsna/stage_2_train_labels.csv                              one row per box
    out_dir/cytology/<herlev class>/<n>.png                            colour cell images
    """
    from PIL import Image

    t0 = time.time()
    out = Path(out_dir)
    rng = np.random.default_rng(seed)  # the RSNA and cytology parts draw their own streams: resizing one changes no other
    mimic = out / "mimic"
    rows = [_write_study(mimic, i, rng, size, seed) for i in range(n_xray + n_xray_test)]
    n_m1, n_rle = _write_mimic_csvs(mimic, rows)
    # the split, by patient (two studies each): the first n_xray studies 80 / 20 train / validate (ConVIRT's
    # pretraining pairs and its held-out set, on which the demo defaults were chosen), the studies written
    # after them the test split, which no choice has seen
    subjects = [r[1]["subject_id"] for r in rows[:n_xray]]
    _, val = patient_split(subjects, (0.8, 0.2), seed=seed)
    val = {subjects[i] for i in val}
    _write_csv(mimic / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
               [{**{k: r[1][k] for k in ("dicom_id", "study_id", "subject_id")},
                 "split": "test" if i >= n_xray else "validate" if r[1]["subject_id"] in val else "train"}
                for i, r in enumerate(rows)])

    rsna = out / "rsna"
    rng = np.random.default_rng([seed, 1])
    (rsna / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    box_rows, n_pos = [], 0
    for i in range(n_rsna):
        pid = hashlib.sha1(f"rsna-{seed}-{i}".encode()).hexdigest()[:8] + f"-{i:04d}"
        f = _random_findings(rng) if rng.random() < 0.6 else {}
        f.pop("effusion", None) if rng.random() < 0.5 else None
        write_dicom(rsna / "stage_2_train_images" / f"{pid}.dcm", chest_phantom(rng, size, f), rng,
                    "MONOCHROME2" if rng.random() < 0.7 else "MONOCHROME1", bits=12, rle=bool(rng.random() < 0.2),
                    patient_id=pid)
        lobes = f.get("consolidation", [])
        n_pos += bool(lobes)
        for lobe in lobes:  # one row per box, in pixel coordinates of the image
            cu, cv = LOBES[lobe]
            w, h = 0.34 * size / 2, 0.3 * size / 2
            x0, y0 = (cu + 1) / 2 * (size - 1) - w / 2, (cv + 1) / 2 * (size - 1) - h / 2
            box_rows.append({"patientId": pid, "x": f"{x0:.1f}", "y": f"{y0:.1f}", "width": f"{w:.1f}",
                             "height": f"{h:.1f}", "Target": 1})
        if not lobes:
            box_rows.append({"patientId": pid, "x": "", "y": "", "width": "", "height": "", "Target": 0})
    _write_csv(rsna / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], box_rows)

    cyto = out / "cytology"
    rng = np.random.default_rng([seed, 2])
    for cls in HERLEV_CLASSES:
        (cyto / cls).mkdir(parents=True, exist_ok=True)
        for j in range(n_cells):
            a = cell_image(rng, size, cls)
            Image.fromarray(np.rint(a * 255).astype(np.uint8)).save(cyto / cls / f"{cls}_{j:03d}.png")
    summary = {"version": DEMO_VERSION, "size": size, "seed": seed, "seconds": round(time.time() - t0, 1),
               "mimic": {"studies": len(rows), "patients": (len(rows) + 1) // 2, "test_studies": n_xray_test,
                         "monochrome1": n_m1, "rle": n_rle, "path": str(mimic)},
               "rsna": {"images": n_rsna, "positive": n_pos, "box_rows": len(box_rows), "path": str(rsna)},
               "cytology": {"classes": len(HERLEV_CLASSES), "images": n_cells * len(HERLEV_CLASSES), "path": str(cyto)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        print(f"demo data written to {out} in {summary['seconds']} s")
        print(f"  mimic/    {len(rows)} studies of {summary['mimic']['patients']} patients, DICOM {size}x{size} "
              f"({n_m1} MONOCHROME1, {n_rle} RLE), MIMIC-style reports, CheXpert label CSV, split CSV "
              f"({n_xray_test} test studies)")
        print(f"  rsna/     {n_rsna} DICOMs, {n_pos} with pneumonia, {len(box_rows)} label rows (one per box)")
        print(f"  cytology/ {n_cells * len(HERLEV_CLASSES)} colour PNGs in {len(HERLEV_CLASSES)} Herlev class folders")
    return summary


def _write_study(mimic, i, rng, size, seed):
    """Study i of the MIMIC-style part (patient i // 2): its DICOM and report; its CSV rows."""
    from pydicom.uid import generate_uid

    subject, study = 10000000 + i // 2, 50000000 + i  # two studies per patient
    f = _random_findings(rng)
    sdir = mimic / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
    sdir.mkdir(parents=True, exist_ok=True)
    text, unc = demo_report(rng, f)
    (sdir.parent / f"s{study}.txt").write_text(text)
    dicom_id = hashlib.sha1(f"{seed}-{i}".encode()).hexdigest()[:16]
    photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
    rle = bool(rng.random() < 0.3)
    write_dicom(sdir / f"{dicom_id}.dcm", chest_phantom(rng, size, f), rng, photometric,
                bits=int(rng.choice([12, 14, 16])), rle=rle, patient_id=f"p{subject}", study_uid=generate_uid())
    return ({"subject_id": subject, "study_id": study, **chexpert_row(f, unc)},
            {"dicom_id": dicom_id, "subject_id": subject, "study_id": study, "ViewPosition": "PA"}, photometric, rle)


def _write_mimic_csvs(mimic, rows):
    """The CheXpert label and metadata CSVs of the studies' rows; (MONOCHROME1 count, RLE count)."""
    _write_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id"] + CHEXPERT_14, [r[0] for r in rows])
    _write_csv(mimic / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
               [r[1] for r in rows])
    return sum(r[2] == "MONOCHROME1" for r in rows), sum(r[3] for r in rows)


def _write_study_own_stream(args):
    mimic, i, size, seed = args
    return _write_study(mimic, i, np.random.default_rng([seed, 3, i]), size, seed)


def make_pairs_demo(out_dir, studies, size=256, seed=0, workers=None, val_fraction=0.2, quiet=False):
    """A larger MIMIC-style image-report set for GPU work (the built-in demo's 240 studies are too few
    for a ResNet-50): `studies` studies, two per patient, each on its own random stream, so any number
    of processes writes the same files. Beside the MIMIC layout it writes mimic-cxr-2.0.0-split.csv
    (a patient-level train / validate split) and validate-chexpert.csv (the validate studies' labels,
    for convirt.py --eval-labels). Returns a summary dict."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.time()
    mimic = Path(out_dir) / "mimic"
    mimic.mkdir(parents=True, exist_ok=True)
    jobs = [(mimic, i, size, seed) for i in range(studies)]
    workers = workers or os.cpu_count() or 1
    if workers > 1:  # spawned, not forked: a fork of a process whose torch threads are running can hang
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_write_study_own_stream, jobs, chunksize=16))
    else:
        rows = [_write_study_own_stream(j) for j in jobs]
    n_m1, n_rle = _write_mimic_csvs(mimic, rows)
    subjects = sorted({r[0]["subject_id"] for r in rows})
    _, val = patient_split(subjects, (1 - val_fraction, val_fraction), seed=seed)
    val = {subjects[i] for i in val}
    _write_csv(mimic / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
               [{**{k: r[1][k] for k in ("dicom_id", "study_id", "subject_id")},
                 "split": "validate" if r[1]["subject_id"] in val else "train"} for r in rows])
    _write_csv(mimic / "validate-chexpert.csv", ["subject_id", "study_id"] + CHEXPERT_14,
               [r[0] for r in rows if r[0]["subject_id"] in val])
    summary = {"version": DEMO_VERSION, "size": size, "seed": seed, "seconds": round(time.time() - t0, 1),
               "mimic": {"studies": studies, "patients": len(subjects), "validate_patients": len(val),
                         "monochrome1": n_m1, "rle": n_rle, "path": str(mimic)}}
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        print(f"{studies} image-report studies of {len(subjects)} patients ({len(val)} in the validate split), "
              f"DICOM {size}x{size}, written to {mimic} in {summary['seconds']} s by {workers} process(es)")
        print(f"  pretrain: python convirt.py --data {mimic} --split-csv {mimic / 'mimic-cxr-2.0.0-split.csv'} "
              f"--eval-labels {mimic / 'validate-chexpert.csv'} --eval-root {mimic}")
    return summary


def _write_csv(path, fields, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)



def bench_cache(n=40, size=224, source_size=2048, workers=0):
    """Images/s: decoding full-size DICOMs (half RLE-compressed, as archives mix them) and
    resizing them, against reading the same images back from the decode cache."""
    tmp = Path(tempfile.mkdtemp(prefix="medssl-cache-bench-"))
    rng = np.random.default_rng(0)
    base = chest_phantom(rng, source_size, {"effusion": "left"})
    paths = []
    for i in range(n):
        p = tmp / f"{i}.dcm"
        write_dicom(p, base, rng, "MONOCHROME1" if i % 3 == 0 else "MONOCHROME2", bits=12, rle=i % 2 == 1)
        paths.append(str(p))
    t = time.perf_counter()
    for p in paths:
        fit_square(load_image(p, 1), size)
    direct = len(paths) / (time.perf_counter() - t)
    t = time.perf_counter()
    ds = ImageDataset(paths, size=size, channels=1, cache_dir=tmp / "cache", workers=workers)
    build = len(paths) / (time.perf_counter() - t)
    reps = max(1, 2000 // n)
    t = time.perf_counter()
    for _ in range(reps):
        for i in range(len(ds)):
            ds.read(i)
    cached = reps * len(ds) / (time.perf_counter() - t)
    import shutil

    shutil.rmtree(tmp)
    return {"images": n, "source_size": source_size, "size": size, "workers": workers,
            "direct_decode_per_s": round(direct, 1), "cache_build_per_s": round(build, 1),
            "cached_read_per_s": round(cached, 1)}


# ----------------------------------------------------------------------------------
# Curves and trackers: data.Run draws and reports through these (matplotlib and the trackers' packages load
# only when used)
# ----------------------------------------------------------------------------------
_FAINT, _DASHED = dict(alpha=0.35, lw=0.8), dict(ls="--", lw=1.0)
_BOLD = [dict(lw=1.6, ls=ls) for ls in ("-", ":", "-.")]  # a run's several series in one panel, told apart
EVAL_KEY = re.compile(r"((i2i|t2i)_p|knn_top1)@\d+$")  # retrieval P@k (ConVIRT), kNN top-1 (image-only scripts)


def read_log(run_dir):
    """RUN/log.jsonl as one run: {"step"|"epoch"|"eval": its lines in step order}. A step logged twice (a crash
    after the last checkpoint, then --resume) keeps its later line; lines marked "superseded" are skipped."""
    path, kinds = Path(run_dir) / "log.jsonl", {"step": {}, "epoch": {}, "eval": {}}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such log (is {run_dir} a run folder?)")
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, TypeError):  # a line cut by a crash mid-write, or not an object
            rec = json.loads(line)
            kind = ("step" if "loss" in rec else "epoch" if "epoch_loss" in rec
                    else "eval" if any(map(EVAL_KEY.match, rec)) else None)
            if kind and "step" in rec and not rec.get("superseded"):
                kinds[kind][rec["step"]] = rec
    return {kind: [lines[s] for s in sorted(lines)] for kind, lines in kinds.items()}


def _curves(log):
    """One run's {panel: {series: (steps, values, style)}} from data.read_log's lines; a series may be empty."""
    def series(kind, key, style, i=None):  # i: one optimizer group of "lrs"
        pts = [(r["step"], v) for r in log[kind] if key in r for v in ([r[key]] if i is None else r[key][i:i + 1])]
        return [s for s, _ in pts], [v for _, v in pts], style

    n_lrs = max((len(r["lrs"]) for r in log["step"] if "lrs" in r), default=0)
    evals = sorted({k for r in log["eval"] for k in r if EVAL_KEY.match(k)})
    last = max((r["step"] for lines in log.values() for r in lines), default=0)
    untrained = {f"{k} untrained": ([0, last], [r[k]] * 2, _DASHED)  # random weights (epoch -1): the value to beat
                 for k in evals for r in log["eval"] if r.get("epoch") == -1 and k in r}
    return {"loss": {"loss": series("step", "loss", _FAINT), "epoch loss": series("epoch", "epoch_loss", _BOLD[0]),
                     "collapse value": series("step", "collapse_loss", _DASHED)},
            "spread": {"spread": series("step", "spread", _BOLD[0])},
            "lr": ({f"lr group {i}": series("step", "lrs", _BOLD[i % 3], i) for i in range(n_lrs)} if n_lrs
                   else {"lr": series("step", "lr", _BOLD[0])}),
            "t and b": {"t": series("step", "t", _BOLD[0]), "b": series("step", "b", _BOLD[1])},
            "retrieval": {**{k: series("eval", k, _BOLD[i % 3]) for i, k in enumerate(evals)}, **untrained,
                          "chance": series("eval", "chance", _DASHED)},
            "images/s": {"images/s": series("step", "img_per_s", _BOLD[0])}}


def plot_runs(runs, out):
    """The curves of runs [(label, run folder)], each run in its own colour, into the PNG `out`, written whole
    (through Figure and Agg, no pyplot: cheap, and safe beside a training loop). Returns what was drawn,
    {panel: {"label: series": (steps, values)}}; a panel with nothing logged is left out."""
    from matplotlib.figure import Figure
    drawn = {}
    for n, (label, run_dir) in enumerate(runs):
        for panel, series in _curves(read_log(run_dir)).items():
            for name, (xs, ys, style) in series.items():
                if xs:
                    drawn.setdefault(panel, {})[f"{label}: {name}"] = (xs, ys, style, f"C{n % 10}")
    rows = max(1, (len(drawn) + 1) // 2)
    fig = Figure(figsize=(12, 3 * rows))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / (3 * rows), top=1 - 0.3 / (3 * rows), hspace=0.45)
    for i, (panel, series) in enumerate(drawn.items()):
        ax = fig.add_subplot(rows, 2, i + 1, title=panel, xlabel="step")
        for name, (xs, ys, style, colour) in series.items():  # one run: its series' names alone
            ax.plot(xs, ys, color=colour, label=name if len(runs) > 1 else name.rpartition(": ")[2], **style)
        if panel == "spread":  # below it the embeddings have collapsed (the scripts' warning)
            ax.axhline(0.1, color="k", label="0.1", **_DASHED)
        ax.legend(fontsize=7)
    tmp = f"{out}.{os.getpid()}.tmp"
    fig.savefig(tmp, format="png", dpi=80)
    os.replace(tmp, out)  # a viewer (or the README) never sees half a picture
    return {panel: {name: s[:2] for name, s in series.items()} for panel, series in drawn.items()}


class Tracker:
    """--report-to tensorboard,wandb: each logged line mirrored at its step, to RUN/tensorboard and to W&B (its
    run id in RUN/wandb-id). A resume from step `start_step` continues the same step axis and the same W&B run;
    TensorBoard hides what the interrupted run logged after its checkpoint. Rank 0 only."""

    def __init__(self, report_to, run_dir, args, start_step=0):
        self.tb = self.wandb = None
        for name in filter(None, report_to):  # the package, or one line saying how to install it
            try:
                module = importlib.import_module({"tensorboard": "torch.utils.tensorboard"}.get(name, name))
            except ImportError:
                raise ImportError(f"--report-to {name}: {name} is not installed: pip install {name}") from None
            if name == "tensorboard":  # it hides what was logged from purge_step on: after the checkpoint, or all
                log_dir = str(Path(run_dir) / "tensorboard")
                self.tb = module.SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else 0)
            elif name == "wandb":
                self.wandb = self._wandb(module, Path(run_dir), args)

    @staticmethod
    def _wandb(wandb, run_dir, args):
        """Offline (a cluster node has no network) unless WANDB_MODE says otherwise or an API key is there, in the
        environment or in the ~/.netrc that `wandb login` writes. The run id: made once, reused on resume."""
        id_file, netrc = run_dir / "wandb-id", Path.home() / ".netrc"
        run_dir.mkdir(parents=True, exist_ok=True)
        if not id_file.exists():
            atomic_write_text(id_file, os.urandom(4).hex())
        key = os.environ.get("WANDB_API_KEY") or netrc.is_file() and "api.wandb.ai" in netrc.read_text()
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "medssl"), name=run_dir.name, dir=str(run_dir),
                          id=id_file.read_text().strip(), resume="allow", config=args,
                          mode=os.environ.get("WANDB_MODE") or ("online" if key else "offline"))

    def log(self, rec):
        """Every number of a logged line at the line's step; a list ("lrs") as one value per group ("lrs/0", ...)."""
        flat = {f"{k}/{i}" if isinstance(v, list) else k: x for k, v in rec.items() if k != "step"
                for i, x in enumerate(v if isinstance(v, list) else [v])}
        scalars = {k: float(x) for k, x in flat.items() if isinstance(x, (int, float))}
        if self.tb:
            for k, x in scalars.items():
                self.tb.add_scalar(k, x, rec["step"])
        if self.wandb:
            self.wandb.log(scalars, step=rec["step"])

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# ----------------------------------------------------------------------------------
# python data.py cache: the decode cache built before the training run, on every core
# ----------------------------------------------------------------------------------
def cache_paths(a):
    """The images a script reads with these data options: MIMIC-CXR as convirt.py takes it (with --metadata-csv or
    --split-csv: the frontal views of the train split), a CSV's image column, or every image under a folder."""
    if a.metadata_csv or a.split_csv:
        return mimic_cxr_pairs(a.data, a.metadata_csv, a.split_csv, "train" if a.split_csv else None)[0]
    if a.data.endswith(".csv"):  # relative paths from --image-root, else the CSV's folder, as the scripts read them
        root = Path(a.image_root or Path(a.data).parent)
        return [str(root / r[a.image_col]) for r in _read_csv(a.data, [a.image_col])]
    return find_images(a.data)


def cpu_cores():
    """The cores this process may run on (under Slurm: its --cpus-per-task), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_cache(a):
    """Decode the images into the cache at the side(s) the named scripts look up; one summary line per side."""
    paths, workers = cache_paths(a), a.workers or cpu_cores()
    sides = {"pretrain": [train_side(a.size)], "finetune": [a.size], "both": [train_side(a.size), a.size]}[a.script]
    for side in sides:
        cache, t = DecodeCache(a.cache_dir, side, a.channels), time.perf_counter()
        slots, bad = cache.build(paths, workers=workers, progress=True)
        took = time.perf_counter() - t
        procs = f"{workers} process" + "es" * (workers > 1)
        print(f"{cache.dir}: {sum(s >= 0 for s in slots)} of {len(paths)} images cached, {cache.misses} decoded "
              f"now in {took:.0f} s ({cache.misses / max(took, 1e-9):.1f} images/s, {procs}), {len(bad)} unreadable")
        for reason in list(bad.values())[:5]:
            print(f"  {reason}")
        if bad:
            print("  (a training run stops on them unless --skip-bad; a missing decoder is tried again next time)")


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="medssl data tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="write the built-in demo data set")
    d.add_argument("out", help="output folder")
    d.add_argument("--size", type=int, default=128, help="image side in pixels")
    d.add_argument("--seed", type=int, default=0, help="random seed (the data set is deterministic given it)")
    d.add_argument("--studies", type=int, default=0,
                   help="instead of the built-in demo, this many MIMIC-style image-report studies (for GPU work; "
                        "e.g. 4096 at --size 256), with a train/validate split CSV")
    d.add_argument("--workers", type=int, default=0, help="with --studies: processes (0: all cores)")
    b = sub.add_parser("bench-cache", help="images/s: decoding DICOM directly vs from the decode cache")
    b.add_argument("--n", type=int, default=40, help="number of DICOMs written for the benchmark")
    b.add_argument("--size", type=int, default=224, help="target size")
    b.add_argument("--source-size", type=int, default=2048, help="side of the DICOMs (MIMIC-CXR's are ~2500-3000)")
    b.add_argument("--workers", type=int, default=0, help="processes that build the cache")
    c = sub.add_parser("cache", help="decode a data set into the decode cache before training, on every core",
                       description="Decode every image once into the decode cache, with the data options the training "
                       "script will get; the run then finds each image cached and starts at once. A killed build "
                       "resumes where it stopped.")
    c.add_argument("--data", required=True, help="folder of images/DICOMs, a CSV with an image column, or a MIMIC-CXR("
                   "-JPG) root (with --metadata-csv / --split-csv, as convirt.py takes it)")
    c.add_argument("--image-col", default="path", help="CSV column with the image path")
    c.add_argument("--image-root", default=None, help="CSV: folder its relative paths start from (default: its own)")
    c.add_argument("--metadata-csv", default=None, help="mimic-cxr-2.0.0-metadata.csv: frontal views only")
    c.add_argument("--split-csv", default=None, help="mimic-cxr-2.0.0-split.csv: its train split only")
    c.add_argument("--size", type=int, default=224, help="the script's --size (default 224)")
    c.add_argument("--channels", type=int, default=1, choices=[1, 3],
                   help="the script's channels (default 1; 3: cytology)")
    c.add_argument("--for", dest="script", default="pretrain", choices=["pretrain", "finetune", "both"],
                   help="pretrain: convirt, simclr, byol, barlow (they cache at 8/7 of --size, 256 for 224); "
                        "finetune: finetune.py (at --size); both (default: pretrain)")
    c.add_argument("--cache-dir", default=default_cache_dir(),
                   help="the scripts' --cache-dir (default: $MEDSSL_CACHE or ~/.cache/medssl, as theirs)")
    c.add_argument("--workers", type=int, default=0, help=f"decoding processes (0: every core, {cpu_cores()} here)")
    g = sub.add_parser("plot", help="several runs' curves (their log.jsonl) overlaid panel by panel, in one PNG")
    g.add_argument("runs", nargs="+", metavar="RUN", help="a run folder, or NAME=RUN to label it NAME")
    g.add_argument("--out", default="curves.png", help="the PNG (default: curves.png here; each run keeps its own)")
    a = p.parse_args(argv)
    if a.cmd == "cache":
        try:
            build_cache(a)
        except (ValueError, FileNotFoundError, BadImageError) as e:  # the message, not a traceback
            raise SystemExit(f"data.py cache: {e}") from None
    elif a.cmd == "plot":  # NAME=RUN, or RUN labelled by its folder's name
        runs = [r.split("=", 1) if "=" in r and not Path(r).exists() else (Path(r).resolve().name, r) for r in a.runs]
        try:
            plot_runs(runs, a.out)
        except OSError as e:  # a missing run, an --out that is a folder or cannot be written
            raise SystemExit(f"data.py plot: {e}") from None
        print(f"wrote {a.out}: " + ", ".join(label for label, _ in runs))
    elif a.cmd == "demo" and a.studies:
        make_pairs_demo(a.out, a.studies, size=a.size, seed=a.seed, workers=a.workers or None)
    elif a.cmd == "demo":
        make_demo(a.out, size=a.size, seed=a.seed)
    elif a.cmd == "bench-cache":
        print(json.dumps(bench_cache(a.n, a.size, a.source_size, a.workers)))
