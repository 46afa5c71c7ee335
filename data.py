"""data.py: the one module the medssl scripts share. DICOM and image reading, reports, data-set adapters, label
files, patient splits and label fractions, the decode cache, the batched augmentation, and the run mechanics every
script uses alike (process group, run folder and log, checkpoint and exact resume, encoder, kNN monitor, NaN guard).
The demo data set is built by demo.py, imported only when it is asked for.

    python data.py demo /tmp/demo            # write the demo data set and print a summary
    python data.py bench-cache               # images/s: decoding full-size DICOM vs reading the cache
    python data.py cache --data ROOT --size 224  # decode a data set into the cache before training, on every core
    python data.py plot RUN [NAME=RUN ...]   # the runs' curves from their log.jsonl, overlaid in curves.png

Conventions: every image comes out as float32 in [0, 1], H x W (grayscale) or H x W x 3; datasets return
C x S x S tensors (float, or uint8 as the cache stores them). Every reading error is a `BadImageError` whose
message starts with the file's path and says the cause.
"""
import argparse
import contextlib
import csv
import functools
import importlib.util
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from tqdm import tqdm

IMAGE_EXTS = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BadImageError(Exception):
    """An image that cannot be read; the message names the file and the cause."""


class TransientImageError(BadImageError):
    """Unreadable here and now, not by the file's own fault (a decoder not installed, no permission): not cached."""


# ------------------------------------------------------------------------------------------------------------ DICOM
# Which package decodes which transfer syntax (pydicom's pixel-data handler table): JPEG, JPEG-LS; JPEG 2000, HTJ2K
_DECODER_HINT = {**dict.fromkeys(["1.2.840.10008.1.2.4." + s for s in ("50", "51", "57", "70", "80", "81")],
                                 "pylibjpeg and pylibjpeg-libjpeg"),
                 **dict.fromkeys(["1.2.840.10008.1.2.4." + s for s in ("90", "91", "201", "202", "203")],
                                 "pylibjpeg and pylibjpeg-openjpeg"),
                 "1.2.840.10008.1.2.5": "pylibjpeg and pylibjpeg-rle (pydicom's own RLE decoder should also work)"}


def _read_dicom(path):
    """(dataset, raw pixel array of the first frame) or BadImageError naming the cause."""
    path = str(path)
    if not os.path.isfile(path):
        raise BadImageError(f"{path}: file not found")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as e:
        raise BadImageError(f"{path}: not a DICOM file ({e})") from None
    except Exception as e:  # a header cut short, an unreadable element; an OSError with an errno is the system's
        raise (TransientImageError if getattr(e, "errno", None) else BadImageError)(
            f"{path}: unreadable DICOM header ({type(e).__name__}: {e})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = ds.get("Modality", "") or str(ds.get("SOPClassUID", "unknown SOP class"))
        raise BadImageError(f"{path}: DICOM has no pixel data (modality/SOP class: {kind}); "
                            "it is not an image, e.g. an RT plan or a structured report")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # multi-frame: the first frame, which is what a radiograph is (a CT volume would need a slice choice)
            arr = ds.pixel_array if int(ds.get("NumberOfFrames", 1) or 1) == 1 else ds.pixel_array[0]
    except ValueError as e:
        what = "is truncated" if "less than expected" in str(e) or "truncat" in str(e).lower() else "cannot be decoded"
        raise BadImageError(f"{path}: pixel data {what} ({e})") from None
    except (RuntimeError, NotImplementedError) as e:
        name, hint = getattr(tsyntax, "name", str(tsyntax)), _DECODER_HINT.get(str(tsyntax))
        absent = "no plugins" in str(e) or "missing" in str(e).lower() or "no pixel data decoders" in str(e)
        raise (TransientImageError if absent else BadImageError)(f"{path}: " + (
            f"transfer syntax '{name}' needs a decoder that is not installed: pip install {hint}" if hint and absent
            else f"transfer syntax '{name}' could not be decoded, the data may be corrupt ({e})" if hint
            else f"no installed decoder handles transfer syntax '{name}' ({e})")) from None
    except Exception as e:
        raise BadImageError(f"{path}: pixel data cannot be decoded ({type(e).__name__}: {e})") from None
    return ds, arr


def _window(x, center, width, function="LINEAR"):
    """VOI windowing to [0, 1], DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    function, width = (function or "LINEAR").upper(), max(float(width), 1.0)
    if function == "SIGMOID":  # C.11.2.1.3.1
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":  # C.11.2.1.3.2
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    # LINEAR, C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to the range
    return np.clip((x - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)


def _dicom_to_display(ds, arr, path):
    """Grayscale stored values -> display-ready [0, 1] (modality LUT, VOI, MONOCHROME1)."""
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        y = apply_voi_lut(np.rint(x).astype(np.int64), ds, index=0, prefer_lut=True)  # LUT input: modality values
        y = np.asarray(y, np.float64) / float(2 ** bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowWidth not in (None, ""):
        c, w = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)  # several values: the first
                for v in (ds.WindowCenter, ds.WindowWidth))
        y = _window(x, c, w, ds.get("VOILUTFunction", "LINEAR"))
    else:
        # No VOI: the full range the stored bits can hold, through the modality LUT (not the image's own
        # min/max, which would make intensity depend on content)
        bits, signed = int(ds.get("BitsStored", ds.get("BitsAllocated", 16))), int(ds.get("PixelRepresentation", 0))
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = ((float(x.min()), float(x.max())) if "ModalityLUTSequence" in ds
                  else sorted((lo * slope + intercept, hi * slope + intercept)))
        y = (x - lo) / max(hi - lo, 1e-12)
    y = np.clip(y, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        y = 1.0 - y  # MONOCHROME1 stores bone dark; invert so bone and metal are bright everywhere
    if not np.isfinite(y).all():
        raise BadImageError(f"{path}: pixel values are not finite after rescale/windowing")
    return y.astype(np.float32)


def _dicom_colour(ds, arr):
    """Colour DICOM -> H x W x 3 RGB in [0, 1] (pydicom 3 already converts YBR_FULL(_422) to RGB)."""
    return (arr.astype(np.float64) / (2 ** int(ds.get("BitsStored", 8)) - 1)).clip(0, 1).astype(np.float32)


def _luminance(rgb):
    """ITU-R BT.601 luma, as PIL's convert('L'): 0.299 R + 0.587 G + 0.114 B."""
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def load_dicom(path):
    """A DICOM image as a display-ready float32 H x W array in [0, 1]: stored values -> modality LUT -> VOI (VOI LUT
    Sequence, else WindowCenter/Width with VOILUTFunction, else the full stored range) -> MONOCHROME1 inverted.
    Multi-frame: the first frame. Colour (RGB, YBR_*, PALETTE COLOR) -> luminance."""
    ds, arr = _read_dicom(path)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float64)
        return _luminance(rgb / max(float(rgb.max()), 1.0))
    if arr.ndim == 3 or arr.dtype.kind != "u" or arr.itemsize > 2:
        return _luminance(_dicom_colour(ds, arr)) if arr.ndim == 3 else _dicom_to_display(ds, arr, path)
    # each stored value present mapped once, then looked up: all is per pixel (min/max too), so the same numbers, sooner
    table, present = np.zeros(int(arr.max()) + 1, np.float32), np.flatnonzero(np.bincount(arr.ravel()))
    table[present] = _dicom_to_display(ds, present.astype(arr.dtype), path)
    return table[arr]


def is_dicom(path):
    """True when the file has the 'DICM' magic at byte 128 (or a .dcm/.dicom name)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM" or Path(path).suffix.lower() in (".dcm", ".dicom")
    except OSError:
        return False


def preset_for(paths, n=16):
    """The augmentation preset that fits a folder of images: 'xray' when most of the first n readable
    files are grayscale (DICOM, a one-channel file, or colour whose channels agree), else 'cytology-A'."""
    gray = []
    for p in paths:
        try:
            dicom = is_dicom(p)
            if not dicom:
                with Image.open(p) as im:
                    a = np.asarray(im.convert("RGB").resize((32, 32)), np.int16)
        except OSError:
            continue  # unreadable files are the dataset's business
        gray.append(dicom or np.abs(a - a.mean(2, keepdims=True)).max() <= 3)
        if len(gray) == n:
            break
    return "xray" if 2 * sum(gray) >= len(gray) else "cytology-A"


def load_image(path, channels=1, size=0):
    """Any supported image as float32 in [0, 1], H x W (channels=1: colour -> luminance) or H x W x 3 (channels=3:
    gray replicated): DICOM by its 'DICM' preamble, whatever its name; else PNG (8/16 bit), JPEG, BMP, TIFF. size: the
    side fit_square will give it: a JPEG is decoded at the smallest of 1/8, 1/4, 1/2 that divides both sides and leaves
    2 x size (PIL's draft), within 0.5/255 on average and 4/255 at most of the full decode (BENCHMARKS.md)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not os.path.isfile(path):
        raise BadImageError(f"{path}: file not found")
    if is_dicom(path):
        if channels == 1:
            return load_dicom(path)
        ds, arr = _read_dicom(path)
        return _dicom_colour(ds, arr) if arr.ndim == 3 else np.repeat(load_dicom(path)[..., None], 3, axis=2)
    try:
        with Image.open(path) as im:
            w, h = im.size  # the draft's scale divides both sides: each reduced pixel stands for whole source pixels
            s = max([k for k in (2, 4, 8) if w % k == h % k == 0 and min(w, h) >= 2 * size * k], default=1)
            if size and s > 1 and im.format == "JPEG":
                im.draft("L" if channels == 1 else im.mode, (w // s, h // s))
            im.load()  # float32, never float64: 16-bit values and x / 255 are exact enough in it
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNG/TIFF: mode I or I;16, both 0..65535
                a = np.asarray(im, dtype=np.float32)
                a = a / 65535 if a.max() > 255 or im.mode.startswith("I;16") else a / 255
            elif im.mode == "F":
                a = np.asarray(im, dtype=np.float32)
                a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
            else:
                a = np.asarray(im.convert("L" if im.mode in ("L", "1", "LA") else "RGB"), dtype=np.float32) / 255
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image file that Pillow or pydicom can read") from None
    except OSError as e:  # truncated JPEG/PNG; with an errno, the system's fault; 'not available': a missing codec
        here = e.errno is not None or "not available" in str(e)
        raise (TransientImageError if here else BadImageError)(f"{path}: " + (
            "cannot be read here" if here else "image data is truncated or corrupt") + f" ({e})") from None
    a = np.clip(a, 0, 1, out=a)
    if a.ndim == 2:
        return a if channels == 1 else np.repeat(a[..., None], 3, axis=2)
    return _luminance(a) if channels == 1 else a


def fit_square(img, size):
    """H x W or H x W x C float array -> C x size x size tensor: shorter side to `size` (antialiased bilinear, as
    PIL), centre crop (it loses the long side's margins, which on radiographs are outside the lungs)."""
    t = torch.from_numpy(np.ascontiguousarray(img))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    h, w = t.shape[-2:]
    nh, nw = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    if (nh, nw) != (h, w):
        t = F.interpolate(t[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return t[:, top:top + size, left:left + size].clamp(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------- Reports
# A heading: capitalised words ending in a colon, e.g. "FINDINGS:", "WET READ:", "PA AND LATERAL VIEWS OF THE CHEST:"
_HEADING = re.compile(r"(?:(?<=^)|(?<=[\s.]))([A-Z][A-Z&/()\- ]{1,60}[A-Z)]):")
_ALIASES = {"finding": "findings", "findings": "findings", "impression": "impression",
            "impressions": "impression", "conclusion": "impression", "conclusions": "impression"}
# Words whose full stop never ends a sentence here. Units ("3 cm.") and "p.m." can end one, so
# they are not listed: a split needs a capital or digit after the stop anyway.
_ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "vs", "e.g", "i.e", "approx", "st", "fig", "cf", "pt", "pts", "hx",
                  "jr", "sr", "al", "resp", "incl", "ca"}


def _clean(text):
    return re.sub(r"\s+", " ", text).strip()


def parse_report(text):
    """Sections of a MIMIC-CXR-style report: {lower-case heading: text}, always with 'findings', 'impression' and
    'preamble' (the text before the first heading; '' when absent). Headings are capitalised words ending in a
    colon, on their own line or inline; 'FINAL REPORT' banners are dropped; whitespace is collapsed."""
    text = re.sub(r"\bFINAL REPORT\b", " ", text or "")
    matches = list(_HEADING.finditer(text))
    sections = {"findings": "", "impression": "", "preamble": _clean(text[:matches[0].start()] if matches else text)}
    for m, nxt in zip(matches, matches[1:] + [None]):
        name = _ALIASES.get(_clean(m.group(1)).lower(), _clean(m.group(1)).lower())
        body = _clean(text[m.end():nxt.start() if nxt else len(text)])
        sections[name] = (sections[name] + " " + body).strip() if sections.get(name) else body
    return sections


def split_sentences(text):
    """Sentences of a text; abbreviations, initials, decimals and list numbers do not split."""
    text, out, start = _clean(text), [], 0
    for m in re.finditer(r"[.!?]+(?=\s+[A-Z0-9(\"'_]|\s*$)", text):
        before = text[start:m.start()].split()
        last = before[-1].lower().strip("(\"'") if before else ""
        if last in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last) or re.fullmatch(r"\d+", last) and len(before) == 1:
            continue  # "Dr.", an initial, or a list marker "1."
        out.append(text[start:m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    out = [re.sub(r"^\(?\d+[.)]\s+", "", s) for s in out]  # drop a leading list marker
    return [s for s in out if re.search(r"[A-Za-z]", s)]


def report_sentences(text):
    """Sentences of findings + impression (the whole text when neither exists): ConVIRT's text augmentation."""
    s = parse_report(text)
    body = " ".join(p for p in (s["findings"], s["impression"]) if p) or " ".join(v for v in s.values() if v)
    return split_sentences(body)


# ---------------------------------- Data-set adapters: real on-disk layouts -> lists of paths (+ reports or labels)
def _read_csv(csv_path, required=()):
    """Rows of a CSV as dicts; a missing file or column is a clear error naming both."""
    csv_path = str(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"{csv_path}: CSV file not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; the file has {reader.fieldnames or []}")
        return list(reader)


def find_images(root):
    """Every image or DICOM file below a folder, sorted (extension-less DICOMs found by preamble)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found")
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            ext = Path(f).suffix.lower()
            if ext in IMAGE_EXTS or (ext == "" and is_dicom(os.path.join(dirpath, f))):
                out.append(os.path.join(dirpath, f))
    if not out:
        raise ValueError(f"{root}: no images found (looked for {sorted(IMAGE_EXTS)} and DICOM files)")
    return out


def mimic_cxr_pairs(root, metadata_csv=None, split_csv=None, split=None, views=("PA", "AP")):
    """(image paths, report texts, patient ids) in the MIMIC-CXR (DICOM) or MIMIC-CXR-JPG layout:
    root/files/p10/p10000032/s50414267/02aa804e-....dcm (or .jpg) beside root/files/p10/p10000032/s50414267.txt.
    metadata_csv: only ViewPosition in `views`; split_csv with split 'train' | 'validate' | 'test': that split."""
    root = Path(root)
    keep = []  # the sets of dicom_ids an image must be in
    if metadata_csv:
        keep.append({r["dicom_id"] for r in _read_csv(metadata_csv, ("dicom_id", "ViewPosition"))
                     if r["ViewPosition"] in views})
    if split_csv and split:
        keep.append({r["dicom_id"] for r in _read_csv(split_csv, ("dicom_id", "split")) if r["split"] == split})
    paths, reports, patients = [], [], []
    for img in find_images(root / "files" if (root / "files").is_dir() else root):
        study, txt = Path(img).parent, Path(img).parent.with_suffix(".txt")
        if study.name.startswith("s") and all(Path(img).stem in k for k in keep) and txt.is_file():
            paths.append(img)
            reports.append(txt.read_text(errors="replace"))
            patients.append(study.parent.name)
    if not paths:
        raise ValueError(f"{root}: no MIMIC-CXR image/report pairs found (expected files/pXX/pSUBJECT/sSTUDY/*.dcm|jpg "
                         "beside sSTUDY.txt)")
    return paths, reports, patients


def csv_pairs(csv_path, image_col="path", report_col="report", root=None):
    """(paths, reports, patient ids = paths) from a CSV: an image path column and a report column holding the text
    or the path of a .txt file; relative paths are read from `root` (default: the CSV's folder)."""
    rows = _read_csv(csv_path, (image_col, report_col))
    base = Path(root or Path(csv_path).parent)
    paths, reports = [], []
    for n, r in enumerate(rows, 2):  # row 1 is the header
        paths.append(str(base / r[image_col]))
        rep = (r[report_col] or "").strip()
        if not rep:
            raise ValueError(f"{csv_path}, row {n}: the {report_col!r} cell is empty (no report for {r[image_col]})")
        if rep.endswith(".txt") and "\n" not in rep:  # a file name, never a report that ends in '.txt'
            if not (base / rep).is_file():
                raise ValueError(f"{csv_path}, row {n}: report file not found: {base / rep}")
            rep = (base / rep).read_text(errors="replace")
        reports.append(rep)
    return paths, reports, list(paths)


def unlabelled_images(data, image_col="path"):
    """Paths for image-only pretraining: a folder tree, or a CSV with an image path column."""
    if str(data).endswith(".csv"):
        return [str(Path(data).parent / r[image_col]) for r in _read_csv(data, (image_col,))]
    return find_images(data)


def read_rsna_labels(csv_path):
    """RSNA Pneumonia's stage_2_train_labels.csv -> {patientId: 0|1}: one row per box, so several per positive
    patient, who is positive when any row has Target 1. The images are {patientId}.dcm."""
    labels = {}
    for r in _read_csv(csv_path, ("patientId", "Target")):
        t = int(float(r["Target"]))
        if t not in (0, 1):
            raise ValueError(f"{csv_path}: Target must be 0 or 1, got {r['Target']!r} for {r['patientId']}")
        labels[r["patientId"]] = max(labels.get(r["patientId"], 0), t)
    return labels


CHEXPERT_14 = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture", "Support Devices"]
CHEXPERT_5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def read_chexpert_labels(csv_path, policy="ones", observations=CHEXPERT_14, image_root=None):
    """CheXpert's train.csv or MIMIC-CXR's mimic-cxr-2.0.0-chexpert.csv -> (paths, labels, mask), float32 arrays
    (images x observations). Values 1, 0, -1 (uncertain), blank (-> 0); policy for -1: 'ones' -> 1, 'zeros' -> 0,
    'ignore' -> 0 with mask 0 (out of the loss). CheXpert: 'Path' relative to image_root (default: the CSV's
    parent folder). MIMIC-CXR: per study (subject_id, study_id); every image of its study folder gets its labels."""
    if policy not in ("ones", "zeros", "ignore"):
        raise ValueError(f"uncertainty policy must be ones, zeros or ignore, got {policy!r}")
    rows = _read_csv(csv_path, tuple(observations))
    if rows and "Path" not in rows[0] and not {"subject_id", "study_id"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: needs a 'Path' column (CheXpert) or 'subject_id' and 'study_id' (MIMIC-CXR)")
    base = Path(image_root) if image_root else Path(csv_path).parent.parent
    paths, labels, mask = [], [], []
    for r in rows:
        vals = [float(r[o].strip()) if (r[o] or "").strip() else 0.0 for o in observations]
        bad = [o for o, v in zip(observations, vals) if v not in (1.0, 0.0, -1.0)]
        if bad:
            raise ValueError(f"{csv_path}: {bad[0]} must be 1, 0, -1 or blank, got {r[bad[0]]!r}")
        m = [0.0 if v == -1 and policy == "ignore" else 1.0 for v in vals]
        vals = [(1.0 if policy == "ones" else 0.0) if v == -1 else v for v in vals]
        if "Path" in r:
            images = [str(base / r["Path"])]
        else:
            sid = str(r["subject_id"])
            study = base / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{r['study_id']}"
            images = sorted(str(p) for p in study.glob("*") if p.suffix.lower() in IMAGE_EXTS) if study.is_dir() else []
        paths += images
        labels += [vals] * len(images)
        mask += [m] * len(images)
    if not paths:
        raise ValueError(f"{csv_path}: no labelled images found under {base}")
    return paths, np.asarray(labels, np.float32), np.asarray(mask, np.float32)


HERLEV_CLASSES = ["normal_superficiel", "normal_intermediate", "normal_columnar", "light_dysplastic",
                  "moderate_dysplastic", "severe_dysplastic", "carcinoma_in_situ"]
# Herlev's usual 2-class task: the three normal classes vs the four abnormal ones
GROUPINGS = {"herlev-2class": {c: ("normal" if c.startswith("normal") else "abnormal") for c in HERLEV_CLASSES}}


def read_class_folders(root, grouping=None):
    """(paths, labels, class names) of a class-folder layout (Herlev, SIPaKMeD, LBC, any root/CLASS/**/image).
    grouping: None, a name in GROUPINGS ('herlev-2class'), or a dict {folder name: group name}."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if isinstance(grouping, str) and grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; known: {sorted(GROUPINGS)}")
    grouping = GROUPINGS[grouping] if isinstance(grouping, str) else grouping
    if grouping and any(f not in grouping for f in folders):
        raise ValueError(f"{root}: folders {[f for f in folders if f not in grouping]} are not in the grouping "
                         f"{sorted(grouping)}")
    group = grouping or {f: f for f in folders}
    names = sorted(set(group[f] for f in folders))
    paths, labels = [], []
    for f in folders:
        found = find_images(root / f)
        paths += found
        labels += [names.index(group[f])] * len(found)
    if len(set(labels)) < 2:
        raise ValueError(f"{root}: needs at least two class folders, found {folders}")
    return paths, np.asarray(labels, np.int64), names


def read_label_csv(csv_path, path_col="path", label_col="label", root=None, patient_col=None):
    """(paths, labels, class names) of a CSV: a path column and one label column (class names or integers:
    multi-class; a row with an empty cell has no label and is left out) or a list of columns (0/1: multi-label).
    Relative paths are read from `root` (default: the CSV's folder). HiCervix: path_col "image_name", label_col
    "level_1", "level_2" or "level_3" (a class with no finer level has an empty cell there). patient_col: a 4th
    value, each image's patient id from that column (an empty cell is an error: its image would be a patient alone)."""
    cols = [label_col] if isinstance(label_col, str) else list(label_col)
    rows = _read_csv(csv_path, [path_col] + cols + ([patient_col] if patient_col else []))
    rows = rows if len(cols) > 1 else [r for r in rows if (r[label_col] or "").strip()]
    paths = [str(Path(root or Path(csv_path).parent) / r[path_col]) for r in rows]
    patients = [(r[patient_col] or "").strip() for r in rows] if patient_col else []
    if "" in patients:
        raise ValueError(f"{csv_path}: {patients.count('')} row(s) with an empty {patient_col!r} cell (patient id), "
                         f"e.g. {paths[patients.index('')]}")
    if len(cols) > 1:
        labels, names = np.asarray([[float(r[c] or 0) for c in cols] for r in rows], np.float32), cols
    else:
        values = [r[label_col].strip() for r in rows]
        number = lambda v: v.lstrip("-").isdigit()  # noqa: E731  (integers first, in order, then names)
        names = sorted(set(values), key=lambda v: (not number(v), int(v) if number(v) else 0, v))
        labels = np.asarray([names.index(v) for v in values], np.int64)
    return (paths, labels, names) + ((patients,) if patient_col else ())


# --------------------------------------------------------------------------------------- Splits and label fractions
def patient_split(ids, fractions=(0.7, 0.15, 0.15), seed=0):
    """Index arrays, one per fraction, with no patient in two of them: the patients, shuffled with `seed`, are
    dealt in turn to the split furthest below its share of images, so the counts follow `fractions`."""
    fr = np.asarray(fractions, np.float64)
    if (fr < 0).any() or not math.isclose(fr.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    groups = {}
    for i, p in enumerate(ids):
        groups.setdefault(str(p), []).append(i)
    patients = sorted(groups)
    np.random.default_rng(seed).shuffle(patients)
    out, counts = [[] for _ in fr], np.zeros(len(fr))
    for p in patients:
        k = int(np.argmax(fr * len(ids) - counts))
        out[k].extend(groups[p])
        counts[k] += len(groups[p])
    return [np.asarray(sorted(o), np.int64) for o in out]


def eval_split(ids):
    """finetune.py's (train, val, test) index arrays: 60 / 20 / 20 by patient, seed 0, alike for every method."""
    return patient_split(ids, (0.6, 0.2, 0.2), seed=0)


def official_split(paths, split_csv):
    """(train, val, test) index arrays of image paths from MIMIC-CXR's mimic-cxr-2.0.0-split.csv
    (by dicom_id, the file name's stem); an image the CSV does not list is an error."""
    split_of = {r["dicom_id"]: r["split"] for r in _read_csv(split_csv, ("dicom_id", "split"))}
    missing = [p for p in paths if Path(p).stem not in split_of]
    if missing:
        raise ValueError(f"{split_csv}: {len(missing)} images have no row (dicom_id), e.g. {missing[0]}")
    return [np.asarray([i for i, p in enumerate(paths) if split_of[Path(p).stem] == name], np.int64)
            for name in ("train", "validate", "test")]


def label_fraction(labels, fraction, seed=0):
    """Indices of a stratified, deterministic, nested subset holding `fraction` of the labels (the 1 % subset lies
    inside the 10 % one for the same seed). Multi-class: per class, the first max(1, round(fraction n_class)) of a
    seeded permutation. Multi-label: the first round(fraction n) of one permutation, plus each class's first
    positive in that order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels, rng = np.asarray(labels), np.random.default_rng(seed)
    if labels.ndim == 1:
        chosen = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            chosen.append(idx[rng.permutation(len(idx))][:max(1, int(round(fraction * len(idx))))])
        return np.sort(np.concatenate(chosen))
    order = rng.permutation(len(labels))
    chosen = set(order[:max(1, int(round(fraction * len(labels))))].tolist())
    for c in range(labels.shape[1]):  # each class's first positive in that order
        chosen.update(order[labels[order, c] > 0][:1].tolist())
    return np.asarray(sorted(chosen), np.int64)


# ----------------------------------------------------------------------------------------------------- Decode cache
@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` for the block (torchrun ranks may ask at once): fcntl, or msvcrt on Windows."""
    with open(path, "a+") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # Windows: msvcrt's LK_LOCK gives up after 10 s, so ask until the lock is ours
            import msvcrt
            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    pass
        yield  # closing the file releases the lock


def atomic_write_text(path, text):
    """Write a whole file or nothing: a temporary file beside it, then one rename."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=Path(path).name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush(), os.fsync(f.fileno())  # on disk before the rename: after a crash, the old file or the new one
    os.replace(tmp, path)


def default_cache_dir():
    return os.environ.get("MEDSSL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "medssl"))


def _decode_one(job):
    """(key, the image as the cache stores it or None, None or (reason, whether it is the file's own fault))."""
    key, path, size, channels = job
    try:
        return key, np.rint(fit_square(load_image(path, channels, size), size).numpy() * 255).astype(np.uint8), None
    except BadImageError as e:
        return key, None, (str(e), not isinstance(e, TransientImageError))


class DecodeCache:
    """Decoded, resized images in one on-disk uint8 memmap (ROOT/{size}px-{channels}ch-uint8/pixels.bin, slot i of
    C x size x size at i x its size), shared by epochs, runs and workers; index.json maps absolute path | size |
    mtime_ns to a slot, so a changed file is decoded again. Writers hold a lock on the folder (torchrun ranks and runs
    share one cache); readers only map it. The index names a slot once its bytes are on disk, and a build rewrites it
    every `save_seconds` or `save_images`: one killed or stopped by a full disk resumes where it was."""
    save_seconds, save_images = 10.0, 5000

    def __init__(self, root, size, channels):
        self.size, self.channels = size, channels
        self.dir = Path(root) / f"{size}px-{channels}ch-uint8"  # 8 bits: what a display shows after windowing
        self.data_path, self.index_path = self.dir / "pixels.bin", self.dir / "index.json"
        self.shape, self._mm, self.hits, self.misses = (channels, size, size), None, 0, 0

    def build(self, paths, workers=0, progress=False):
        """(slot per path, -1 when unreadable; {path: reason} of the unreadable ones). Decodes only what the index
        lacks. Only a file's own fault (no pixel data, truncated, corrupt) is remembered with its key, not a missing
        decoder's. A full disk or quota, a file-size limit, a read-only folder: a ValueError naming it; slots stay."""
        keys = [f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}" if os.path.isfile(p) and (st := os.stat(p))
                else None for p in paths]  # size and mtime from one os.stat: every file is checked each run
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with file_lock(self.dir / "lock"):
                index = (json.loads(self.index_path.read_text()) if self.index_path.is_file()
                         else {"slots": {}, "bad": {}})
                # an older cache remembered a missing decoder or a system error too: they are tried again
                index["bad"] = {k: v for k, v in index["bad"].items() if "installed" not in v and "[Errno" not in v}
                todo = sorted({(k, p) for k, p in zip(keys, paths) if k and k not in index["slots"]
                               and k not in index["bad"]})
                self.misses, self.hits = len(todo), len(paths) - len(todo)
                failed = self._decode(todo, index, workers, progress) if todo else {}  # the environment's faults
        except OSError as e:
            raise ValueError(f"{self.dir}: cannot write the cache ({e.strerror or e}); what it holds stays") from None
        self._mm = None
        bad = {p: f"{p}: file not found" if k is None else index["bad"].get(k) or failed[k]
               for k, p in zip(keys, paths) if k is None or k in index["bad"] or k in failed}
        return [index["slots"].get(k, -1) if k else -1 for k in keys], bad

    def _decode(self, todo, index, workers, progress):
        """Decode `todo` into the slots after the last recorded one, over what a killed build left there."""
        jobs, failed, pending, saved = [(k, p, self.size, self.channels) for k, p in todo], {}, {}, time.monotonic()
        nxt, pool, slot = max(index["slots"].values(), default=-1) + 1, None, int(np.prod(self.shape))
        with open(self.data_path, "r+b" if self.data_path.exists() else "w+b", buffering=0) as out:
            try:
                if workers > 1:  # spawn, not fork: a fork of torch's OpenMP threads can deadlock
                    pool = multiprocessing.get_context("spawn").Pool(workers, torch.set_num_threads, (1,))
                results = pool.imap_unordered(_decode_one, jobs, chunksize=8) if pool else map(_decode_one, jobs)
                for k, arr, err in tqdm(results, desc="decoding into cache", total=len(jobs), unit="img", leave=False,
                                        disable=not progress, mininterval=1 if sys.stderr.isatty() else 60):
                    if err:
                        (index["bad"] if err[1] else failed)[k] = err[0]
                        continue
                    out.seek(nxt * slot)
                    view = memoryview(arr.tobytes())
                    while view:  # a write cut short (a file-size limit, a full disk) raises on the next try
                        view = view[out.write(view):]
                    pending[k], nxt = nxt, nxt + 1
                    if len(pending) >= self.save_images or time.monotonic() - saved > self.save_seconds:
                        self._save(out, index, pending)
                        saved = time.monotonic()
            finally:
                if pool:
                    pool.terminate()
                with contextlib.suppress(OSError):  # done, stopped or a failed write: what is whole on disk is kept
                    self._save(out, index, pending)
                out.truncate((max(index["slots"].values(), default=-1) + 1) * slot)  # no orphan, no part
        return failed

    def _save(self, out, index, pending):
        """Name the slots written once fsync put them on disk; none after a failed fsync (Linux says it once)."""
        try:
            os.fsync(out.fileno())
            index["slots"].update(pending)
        finally:
            pending.clear()
        atomic_write_text(self.index_path, json.dumps(index))

    def read(self, slot, uint8=False):
        """The slot as a float C x S x S tensor in [0, 1], or (uint8=True) as stored."""
        if self._mm is None or self._mm.shape[0] <= slot:  # opened lazily: each DataLoader worker maps its own
            n = self.data_path.stat().st_size // int(np.prod(self.shape))
            self._mm = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(n,) + self.shape)
        return torch.from_numpy(np.array(self._mm[slot]) if uint8 else np.asarray(self._mm[slot], np.float32) / 255)

    def __getstate__(self):  # a memmap is not sent to worker processes; each opens its own
        return {**self.__dict__, "_mm": None}


class ImageDataset(torch.utils.data.Dataset):
    """Images (+ targets: labels, report texts, None -> the index) -> (transform(image), target_transform(target)).
    An image: a float C x size x size tensor in [0, 1] from the decode cache (`cache_dir`, built here before any
    worker starts) or decoded on the fly; uint8: as the cache stores them (a quarter of the bytes through the
    DataLoader). skip_bad: an unreadable file is left out and listed by report_skipped(), else an error naming it."""

    def __init__(self, paths, targets=None, transform=None, target_transform=None, size=224, channels=1,
                 cache_dir=None, skip_bad=False, workers=0, progress=False, uint8=False):
        if len(paths) == 0:
            raise ValueError("the data set is empty: no images were found")
        self.paths, self.size, self.channels, self.targets = list(map(str, paths)), size, channels, targets
        self.transform, self.target_transform, self.skip_bad = transform, target_transform, skip_bad
        self.cache, self.skipped, self.uint8 = None, {}, uint8
        if cache_dir:
            self.cache = DecodeCache(cache_dir, size, channels)
            self.slots, bad = self.cache.build(self.paths, workers=workers, progress=progress)
        else:  # decoded in the workers; with skip_bad each file is read once now, so the unreadable ones are known
            jobs = [(p, p, size, channels) for p in self.paths] if skip_bad else []
            bad = {p: err[0] for p, _, err in map(_decode_one, jobs) if err}
        if bad and not skip_bad:
            more = f" (and {len(bad) - 1} more unreadable files; --skip-bad skips them)" if len(bad) > 1 else ""
            raise BadImageError(next(iter(bad.values())) + more)
        self.skipped = bad
        self.index = np.asarray([i for i, p in enumerate(self.paths) if p not in bad], np.int64)
        if len(self.index) == 0:
            raise ValueError(f"none of the {len(self.paths)} images could be read; first error: "
                             f"{next(iter(bad.values()))}")

    def __len__(self):
        return len(self.index)

    def read(self, i):
        """The i-th usable image: a float C x S x S tensor in [0, 1], or uint8 (see `uint8`)."""
        j = int(self.index[i])
        if self.cache is not None:
            return self.cache.read(self.slots[j], self.uint8)
        img = fit_square(load_image(self.paths[j], self.channels, self.size), self.size)
        return (img * 255).round().to(torch.uint8) if self.uint8 else img

    def __getitem__(self, i):
        img, j = self.read(i), int(self.index[i])
        t = self.targets[j] if self.targets is not None else j
        t = self.target_transform(t) if self.target_transform is not None else t
        return (self.transform(img) if self.transform else img), t

    def report_skipped(self):
        """The skipped files, one line each (printed once per epoch by the scripts)."""
        lines = [f"skipped {len(self.skipped)} unreadable file(s):"] + [f"  {v}" for v in self.skipped.values()]
        return "\n".join(lines) if self.skipped else ""


# ------------------------------------------------------------- Per-image transforms (run in the DataLoader workers)
class CLAHE(torch.nn.Module):
    """Contrast-limited adaptive histogram equalisation (scikit-image's equalize_adapthist) of one C x H x W image,
    float in [0, 1] or uint8 (returned as it came); deterministic, run in the workers before BatchAugment."""

    def __init__(self, clip_limit=0.01):
        super().__init__()
        try:
            from skimage.exposure import equalize_adapthist
        except ImportError:
            raise ImportError("CLAHE needs scikit-image: pip install scikit-image") from None
        self.fn, self.clip_limit = equalize_adapthist, clip_limit

    def forward(self, x):
        a = x.permute(1, 2, 0).numpy().astype(np.float64) / (255 if x.dtype == torch.uint8 else 1)
        t = torch.from_numpy(np.asarray(self.fn(a[..., 0] if a.shape[2] == 1 else a, clip_limit=self.clip_limit),
                                        np.float32))
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        return (t * 255).round().to(torch.uint8) if x.dtype == torch.uint8 else t


class ToRGBNormalized(torch.nn.Module):
    """Grayscale -> 3 channels (so ImageNet-shaped encoders take it), then ImageNet normalisation."""

    def forward(self, x):  # one C x H x W image or a B x C x H x W batch
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]


def eval_transform(size):
    """Deterministic transform for evaluation: resize to size (already square) + normalise."""
    return T.Compose([T.Resize(size, antialias=True), ToRGBNormalized()])


# -------------------------------------------- Batched augmentation: the presets on a whole batch, on its own device
PRESETS = ["xray", "xray-chessboard", "cytology-A", "cytology-B", "cytology-C", "cytology-D", "cytology-E", "simclr"]


def train_side(size):
    """The side pretraining images are cached at: 8/7 of the crop's (256 for 224), so a crop is not upsampled."""
    return -(-size * 8 // 7)


def epoch_generator(device, seed, epoch, rank=0):
    """The augmentation's generator for one epoch of one process, a function of (seed, epoch, rank) alone: a
    resumed run draws what the uninterrupted one drew, and every torchrun process draws its own."""
    mixed = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]) >> 1
    return torch.Generator(device=device).manual_seed(mixed)


def _uniform(g, shape, lo=0.0, hi=1.0):
    return torch.rand(shape, generator=g, device=g.device) * (hi - lo) + lo


def _boxes(g, n, height, width, scale, ratio, erase=False):
    """(top, left, h, w, found) per image, torchvision's RandomResizedCrop (or, erase, RandomErasing) draw: ten
    tries of an area fraction in `scale` and a log-uniform aspect ratio r in `ratio`, the first that fits; none
    fits: the whole image (crop) or nothing (erasing, found False). The crop's w = sqrt(area r), the erased h."""
    area = _uniform(g, (n, 10), *scale) * height * width
    r = torch.exp(_uniform(g, (n, 10), math.log(ratio[0]), math.log(ratio[1])))
    h, w = torch.sqrt(area / r).round(), torch.sqrt(area * r).round()
    h, w = (w, h) if erase else (h, w)
    fits = (w < width) & (h < height) if erase else (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    pick = fits.float().argmax(1, keepdim=True)
    found = fits.any(1)
    h = torch.where(found, h.gather(1, pick)[:, 0], torch.full_like(h[:, 0], height))
    w = torch.where(found, w.gather(1, pick)[:, 0], torch.full_like(w[:, 0], width))
    top, left = torch.floor(_uniform(g, (n,)) * (height - h + 1)), torch.floor(_uniform(g, (n,)) * (width - w + 1))
    return top, left, h, w, found


def _per_image(v):
    return v.reshape(-1, 1, 1, 1)


def _gray(x):
    return x if x.shape[1] == 1 else 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blur(x, sigma, k):
    """Each image blurred with its own sigma (torchvision's kernel, reflect padding): two grouped 1-D passes."""
    b, c, hgt, wid = x.shape
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    ker = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, b * c, hgt, wid), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(F.conv2d(y, ker[:, None, None, :], groups=b * c), ker[:, None, :, None], groups=b * c)
    return y.reshape(b, c, hgt, wid)


def _hue_shift(x, shift):
    """RGB -> HSV, hue + shift (mod 1), -> RGB, per image."""
    r, g, b = x.unbind(1)
    mx = x.max(1).values
    d = mx - x.min(1).values
    dd = d.clamp(min=1e-12)
    h = torch.where(mx == r, ((g - b) / dd) % 6, torch.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4)) / 6
    h = (torch.where(d > 0, h, torch.zeros_like(h)) + shift.reshape(-1, 1, 1)) % 1.0
    s = torch.where(mx > 0, d / mx.clamp(min=1e-12), torch.zeros_like(mx))
    # HSV -> RGB channel by channel: c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).reshape(1, 3, 1, 1) + 6 * h[:, None]) % 6
    return mx[:, None] - (mx * s)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _subset(mask, fn, x, where=False):
    """fn(x[idx], idx) for the images where mask holds, the others as they are. where=False: the subset is
    gathered and written back in place, so each image pays only for its operations (the CPU's way); True: fn runs
    on every image and the mask picks, with no host sync, so the CPU keeps queueing work ahead of a GPU."""
    if where:
        return torch.where(_per_image(mask), fn(x, slice(None)), x)
    idx = mask.nonzero().squeeze(1)
    if len(idx) == len(x):
        return fn(x, idx)
    if len(idx):
        x[idx] = fn(x[idx], idx)
    return x


def jitter_images(x, factors, order, where=False):
    """torchvision's ColorJitter with per-image factors (brightness, contrast, saturation: n each;
    hue: a shift, n) applied in a per-image order (n x 4, a permutation of 0..3); where: see _subset."""
    def op(k):  # brightness, contrast, saturation: a blend with black, the mean gray, the gray image; hue: a shift
        def run(y, idx):
            if k == 3:
                return _hue_shift(y, factors[3][idx])
            f = _per_image(factors[k][idx])
            other = 0.0 if k == 0 else _gray(y).mean((1, 2, 3), keepdim=True) if k == 1 else _gray(y)
            return (f * y + (1 - f) * other).clamp(0, 1)
        return run

    used = [k for k in range(4) if factors[k] is not None and (k < 2 or x.shape[1] == 3)]
    x = x.clone()  # written in place below
    for slot in range(4):
        for k in used:
            x = _subset(order[:, slot] == k, op(k), x, where)
    return x


class BatchAugment:
    """The augmentation presets on a whole batch on its own device, each image with its own parameters, drawn by
    `sample` from one generator (epoch_generator: a resumed run draws the same) and applied by `apply`: crop,
    flips, rotation or affine and the elastic field composed into one grid_sample, then the intensity operations.
    Input B x C x S x S, uint8 or float in [0, 1] (S = train_side(size)); output B x 3 x size x size, ImageNet-
    normalised. Each operation draws as torchvision's transform of that name does (tests hold them to it). The
    presets (xray, xray-chessboard, cytology-A..E, simclr, convirt): README's table; why each choice: RESULTS.md.
    """

    def __init__(self, preset, size, channels=1, jitter=0.3, hflip=False):
        if preset not in PRESETS + ["convirt"]:
            raise ValueError(f"unknown augmentation preset {preset!r}; choose from {PRESETS}")
        self.preset, self.size, self.channels, self.jitter, self.hflip = preset, size, channels, jitter, hflip
        self.blur_k = 2 * (size // (16 if preset == "convirt" else 20)) + 1
        self.where = None  # how operations reach a subset of images (see _subset); None: by the device

    def __call__(self, x, generator):
        return self.apply(x, self.sample(generator, x.shape[0], x.shape[-1]))

    def sample(self, g, n, side):
        p, s = self.preset, self.size
        xray, cyto, colour, convirt = p.startswith("xray"), p.startswith("cytology"), self.channels == 3, p == "convirt"
        coin = lambda prob: _uniform(g, (n,)) < prob  # noqa: E731
        scale = (0.6 if xray or convirt else 0.08 if p == "simclr" else 0.5, 1.0)
        ratio = (0.85, 1.15) if xray else (3 / 4, 4 / 3)
        params = {"crop": _boxes(g, n, side, side, scale, ratio)[:4]}
        params["hflip"] = coin(0.5) if cyto or p == "simclr" or (convirt and self.hflip) else None
        params["vflip"] = coin(0.5) if cyto else None
        params["angle"] = (_uniform(g, (n,), -10, 10) * coin(0.5) if xray
                           else _uniform(g, (n,), -20, 20) if convirt else None)
        # RandomAffine's shift: whole pixels, up to 10 % of the side; its scale 0.95-1.05 (its angle turns
        # clockwise, `angle` here counter-clockwise as rotate's: the same symmetric draw)
        params["shift"] = torch.round(_uniform(g, (n, 2), -0.1 * s, 0.1 * s)) if convirt else None
        params["zoom"] = _uniform(g, (n,), 0.95, 1.05) if convirt else None
        params["elastic"] = None
        if p == "cytology-C":  # torchvision's ElasticTransform(alpha 20, sigma 6), p 0.7
            sigma = torch.full((n,), 6.0, device=g.device)
            field = _blur(_uniform(g, (n, 2, s, s), -1.0, 1.0), sigma, int(8 * 6.0 + 1) | 1)
            params["elastic"] = field * 20.0 / s * _per_image(coin(0.7))
        blur_p = {"xray": 0.3, "xray-chessboard": 0.3, "cytology-D": 0.5, "simclr": 0.5, "cytology-E": 0.5,
                  "convirt": 1.0}.get(p)
        sigma = (0.1 * s / 224, 3.0 * s / 224) if convirt else (0.1, 2.0)  # ConVIRT's sigma is for 224 px
        params["blur"] = (coin(blur_p), _uniform(g, (n,), *sigma)) if blur_p else None
        amounts = {"xray": (self.jitter, self.jitter, 0, 0), "xray-chessboard": (self.jitter, self.jitter, 0, 0),
                   "cytology-B": (0.4, 0.4, 0.4, 0.1), "simclr": (0.8, 0.8, 0.8 * colour, 0.2 * colour),
                   "convirt": (0.4, 0.4, 0, 0)}.get(p)
        params["jitter"] = None
        if amounts:
            factors = [_uniform(g, (n,), max(0, 1 - a), 1 + a) if a else None for a in amounts[:3]]
            factors.append(_uniform(g, (n,), -amounts[3], amounts[3]) if amounts[3] else None)
            params["jitter"] = (coin(1.0 if xray or convirt else 0.8), factors, torch.argsort(_uniform(g, (n, 4)), 1))
        params["equalize"] = coin(0.3) if p == "cytology-B" else None
        params["gray"] = coin(0.2) if p == "simclr" and colour else None
        params["noise"] = (coin(0.5), _uniform(g, (n,), 0.05, 0.2),
                           torch.randn((n, self.channels, s, s), generator=g, device=g.device)) \
            if p == "cytology-D" else None
        params["chessboard"] = (coin(0.3), torch.randint(2, 9, (n,), generator=g, device=g.device),
                           torch.randint(0, 2, (n,), generator=g, device=g.device)) if p == "xray-chessboard" else None
        params["erase"] = (coin(0.3),) + _boxes(g, n, s, s, (0.02, 0.1), (0.3, 3.3), erase=True) if xray else None
        return params

    def apply(self, x, params):
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        n, side, s = x.shape[0], x.shape[-1], self.size
        lin = (torch.arange(s, device=x.device, dtype=torch.float32) + 0.5) / s * 2 - 1  # output pixel centres
        u, v = lin[None, None, :].expand(n, s, s), lin[None, :, None].expand(n, s, s)
        if params["elastic"] is not None:  # on the flipped crop, in its coordinates (ElasticTransform after the crop)
            u, v = u + params["elastic"][:, 0], v + params["elastic"][:, 1]
        if params["shift"] is not None:  # the affine's inverse about the crop's centre: R^-1 (p - shift) / zoom
            shift = (2 * params["shift"] / s).reshape(-1, 2, 1, 1)
            u, v = u - shift[:, 0], v - shift[:, 1]
        if params["angle"] is not None:  # rotation of the crop about its centre
            a = torch.deg2rad(params["angle"]).reshape(-1, 1, 1)
            u, v = torch.cos(a) * u - torch.sin(a) * v, torch.sin(a) * u + torch.cos(a) * v
        if params["zoom"] is not None:
            u, v = u / params["zoom"].reshape(-1, 1, 1), v / params["zoom"].reshape(-1, 1, 1)
        inside = (u.abs() <= 1) & (v.abs() <= 1)  # outside the crop: black, as rotate and elastic fill
        if params["hflip"] is not None:
            u = torch.where(params["hflip"].reshape(-1, 1, 1), -u, u)
        if params["vflip"] is not None:
            v = torch.where(params["vflip"].reshape(-1, 1, 1), -v, v)
        top, left, h, w = (t.reshape(-1, 1, 1) for t in params["crop"])
        grid = torch.stack([(left + (u + 1) / 2 * w) / side * 2 - 1, (top + (v + 1) / 2 * h) / side * 2 - 1], -1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * inside[:, None]
        where = x.device.type != "cpu" if self.where is None else self.where
        subset = lambda mask, fn, y: _subset(mask, fn, y, where)  # noqa: E731
        blur = lambda y, i: _blur(y, params["blur"][1][i], self.blur_k)  # noqa: E731
        if self.preset in ("xray", "xray-chessboard", "cytology-D"):  # blur before the intensity operations
            x = subset(params["blur"][0], blur, x)
        if params["jitter"] is not None:
            on, factors, order = params["jitter"]
            pick = lambda i: [None if f is None else f[i] for f in factors]  # noqa: E731  (this subset's factors)
            x = subset(on, lambda y, i: jitter_images(y, pick(i), order[i], where), x)
        if params["equalize"] is not None:
            x = subset(params["equalize"], lambda y, i: T.functional.equalize(y), x)
        if params["gray"] is not None:
            x = subset(params["gray"], lambda y, i: _gray(y).expand_as(y), x)
        if self.preset in ("simclr", "convirt"):  # these blur after the colour operations
            x = subset(params["blur"][0], blur, x)
        if self.preset == "cytology-E":  # blur or sharpen
            x = subset(params["blur"][0], blur, x)
            x = subset(~params["blur"][0], lambda y, i: T.functional.adjust_sharpness(y, 3.0), x)
        if params["noise"] is not None:
            on, sigma, z = params["noise"]
            x = subset(on, lambda y, i: (y * (1 + _per_image(sigma[i]) * z[i])).clamp(0, 1), x)
        r = torch.arange(s, device=x.device).reshape(1, 1, -1, 1)
        c = torch.arange(s, device=x.device).reshape(1, 1, 1, -1)
        if params["chessboard"] is not None:
            on, cells, phase = (t.reshape(-1, 1, 1, 1) for t in params["chessboard"])
            x = x.masked_fill(on & ((r * cells // s + c * cells // s + phase) % 2 == 0), 0.0)
        if params["erase"] is not None:
            on, top, left, h, w, found = (t.reshape(-1, 1, 1, 1) for t in params["erase"])
            box = (r >= top) & (r < top + h) & (c >= left) & (c < left + w)
            x = x.masked_fill(box & on & found, 0.0)
        x = ToRGBNormalized()(x)
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x  # the encoders' fastest layout

# --------------------------------------------------- Run mechanics: the same in every script, nothing of any method
# The scripts keep what teaches their method (model, loss, the all-gather that gives the loss its global batch,
# optimiser, schedule, the training step); what follows they all do alike.

RESUMABLE = {"out", "resume", "max_steps", "save_every", "log_every", "workers", "device", "compile", "cache_dir",
             "skip_bad", "report_to", "stop_signals", "deterministic", "knn_every", "eval_every", "epochs", "lr",
             "weight_decay", "head_lr", "text_lr"}


def add_run_args(p, name):
    """The run mechanics' flags, alike in every pretraining script."""
    a = p.add_argument
    a("--cache-dir", default=default_cache_dir(), help="decode cache folder; '' decodes on the fly")
    a("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    a("--workers", type=int, default=2, help="DataLoader worker processes")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--compile", action="store_true", help="torch.compile the image encoder")
    a("--seed", type=int, default=0, help="random seed")
    a("--deterministic", action="store_true", help="deterministic kernels (slower)")
    a("--out", default=None, help=f"run folder (default runs/{name}-TIME)")
    a("--resume", nargs="?", const="yes", default=None, choices=["yes", "auto"], help="continue the run in --out "
      "from its checkpoint; 'auto': continue it if it has one, else start it (one command for every restart)")
    a("--save-every", type=int, default=0, help="also checkpoint every N steps (0: at epoch ends only)")
    a("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    a("--log-every", type=int, default=10, help="steps between log lines")
    a("--stop-signals", default="TERM,INT,USR1", help="signals that stop the run with a checkpoint at the next step "
      "(Slurm's warning: sbatch --signal=USR1@120)")
    a("--report-to", default="", help="also log to tensorboard, wandb or both (comma-separated)")


def parse_args(p, argv=None):
    """Parse; on a resume, the run's own args.json under the flags given again (kept in args.overrides): those in
    RESUMABLE, read afresh (lr and weight decay go into the optimizer, Run.checkpoint); any other is refused."""
    args = p.parse_args(argv)
    if args.resume == "auto" and not args.out:
        p.error("--resume auto needs --out: the run folder that every restart continues")
    sigs = [s.strip().upper().removeprefix("SIG") for s in args.stop_signals.split(",") if s.strip()]
    if bad := [s for s in sigs if "SIG" + s not in signal.Signals.__members__ or s in ("KILL", "STOP")]:
        p.error(f"--stop-signals: {bad[0]} is not a signal a process can catch")
    if args.report_to and importlib.util.find_spec("demo") is None:
        p.error("--report-to: demo.py, which holds the trackers, is not beside data.py: copy it there")
    for name in filter(None, args.report_to.split(",")):  # said now, not after the images are decoded
        if name not in ("tensorboard", "wandb") or importlib.util.find_spec(name) is None:
            p.error(f"--report-to {name}: " + (f"not installed: pip install {name}" if name in ("tensorboard", "wandb")
                                               else "choose tensorboard, wandb or both (comma-separated)"))
    if not args.resume or (args.resume == "auto" and not (Path(args.out) / "checkpoint.pt").is_file()):
        return args  # a new run (--resume auto the first time: started as the same command will continue it)
    saved = Path(args.out or "") / "args.json"
    if not args.out or not saved.is_file():
        p.error(f"--resume needs --out, a run folder with its args.json ({saved} not found)")
    unset = object()  # argparse fills only what a namespace lacks: what stays `unset` was not given
    given = {k: v for k, v in vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))).items()
             if v is not unset}
    first, resumes = json.loads(saved.read_text()), saved.parent / "resumes.jsonl"
    for line in resumes.read_text().splitlines() if resumes.is_file() else []:
        first.update(json.loads(line).get("overrides", {}))  # what each resume changed stays in force
    first = {k: v for k, v in first.items() if k not in ("max_steps", "overrides")}
    args = argparse.Namespace(**{**vars(args), **first, **given})
    args.overrides = {k: v for k, v in given.items() if k not in ("resume", "out") and first.get(k) != v}
    for k in sorted(set(args.overrides) - RESUMABLE):
        p.error(f"--{k.replace('_', '-')} was {first.get(k)!r} when {args.out} started and cannot change on a "
                "resume (the checkpoint's weights, optimizer or random streams hold it): drop it, or start a new --out")
    return args


def set_defaults(args, **pairs):
    """Each flag left at None gets its (value on the demo data, value with --data)."""
    for name, (on_demo, on_data) in pairs.items():
        if getattr(args, name) is None:
            setattr(args, name, on_demo if args.data is None else on_data)


def image_encoder(arch, weights="none"):
    """A torchvision model without its classifier, and its feature dimension. Keys stay torchvision's."""
    import torchvision

    try:
        net = getattr(torchvision.models, arch)(weights="DEFAULT" if weights == "imagenet" else None)
    except Exception as e:  # no network, no cached weights
        raise SystemExit(f"could not get ImageNet weights for {arch} ({type(e).__name__}: {e}); offline? use "
                         "--weights none (finetune.py: --init random), or copy the file into ~/.cache/torch") from None
    head = "fc" if hasattr(net, "fc") else "heads" if hasattr(net, "heads") else "classifier"  # ResNet, ViT, others
    last = [m for m in getattr(net, head).modules() if isinstance(m, torch.nn.Linear)][-1]
    setattr(net, head, torch.nn.Identity())
    return net, last.in_features


def load_checkpoint(path):
    """A checkpoint's dict, read with weights_only=True: tensors and plain values, so no code in it runs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled callable, a truncated or a foreign file
        raise ValueError(f"{path}: refused, not a checkpoint of these scripts that loads as weights only "
                         f"({str(e).strip().splitlines()[0][:160]})") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("method"), str):
        raise ValueError(f"{path}: not a checkpoint of convirt.py, simclr.py, byol.py or barlow.py (no 'method' entry)")
    return ck


def encoder_from_checkpoint(path, arch):
    """(encoder, feature dimension, checkpoint): one clear line when it holds none or not an `arch`."""
    ck = load_checkpoint(path)
    if not isinstance(ck.get("encoder"), dict) or not ck["encoder"]:
        raise ValueError(f"{path}: holds no image encoder (method {ck['method']!r}, entries {sorted(ck)})")
    if ck.get("arch", arch) != arch:
        raise ValueError(f"{path}: expected a {arch} encoder (--arch), found a {ck['arch']} encoder")
    net, dim = image_encoder(arch)
    try:
        net.load_state_dict(ck["encoder"])
    except RuntimeError as e:
        raise ValueError(f"{path}: expected a {arch} encoder (--arch), found weights that do not fit it "
                         f"({str(e).strip().splitlines()[-1].strip()[:150]})") from None
    return net, dim, ck


def pretraining_images(args, run):
    """The image-only scripts' data set (the demo's train split or --data) as uint8 images cached a little larger
    than the crop; with no --aug, the preset is chosen from the images (preset_for) and said."""
    paths = unlabelled_images(args.data, args.image_col) if args.data else _demo().demo_images(args.demo)
    if args.aug is None:
        args.aug = preset_for(paths)
        args.channels = args.channels or (3 if args.aug.startswith("cytology") else 1)
        if run.master:
            print(f"--aug {args.aug}: chosen from the images; pass --aug to choose another")
    return ImageDataset(paths, None, CLAHE() if args.clahe else None, size=train_side(args.size),
                        channels=args.channels, cache_dir=args.cache_dir or None, skip_bad=args.skip_bad,
                        workers=args.workers, progress=run.master, uint8=True)


def embedding_spread(z):
    """Per-dimension std across the batch of the L2-normalised embeddings, times sqrt(D): ~1 spread, 0 collapsed."""
    return float(F.normalize(z.detach().float(), dim=1).std(0, unbiased=False).mean()) * math.sqrt(z.shape[1])


class ResumableSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler starting `skip` samples in: a run resumed mid-epoch neither reads nor decodes the batches
    done. Its order is a function of (seed, epoch)."""
    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


def _quiet_worker(signals, _):
    """Workers leave the stop signals to the main process: one to the whole process group stops the run at a step."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


class Run:
    """One training run: process group and device, seeds, run folder and JSON log, checkpoints (atomic, CPU tensors;
    at each epoch's end, every --save-every steps, at --max-steps and at the next step after a stop signal),
    exact resume from any of them on every rank, the NaN guard, the progress bar, curves.png and the trackers."""

    def __init__(self, args, name):
        self.args, a = args, args
        self.cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if "RANK" in os.environ:  # torchrun: NCCL between GPUs, gloo between CPU processes
            store, _, _ = next(torch.distributed.rendezvous("env://"))
            # torchrun keeps its store across restarts: this attempt's keys apart, or a restarted rank would read
            # the dead ranks' addresses and fail to connect
            store = torch.distributed.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/", store)
            torch.distributed.init_process_group("nccl" if self.cuda else "gloo", store=store, rank=self.rank,
                                                 world_size=self.world)
        local = os.environ.get("LOCAL_RANK")
        self.device = torch.device((f"cuda:{local}" if local else "cuda" if a.device == "auto" else a.device)
                                   if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.master = self.rank == 0
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        if a.batch_size % self.world:
            raise SystemExit(f"--batch-size {a.batch_size} must be divisible by the number of processes ({self.world})")
        self.local_batch = a.batch_size // self.world
        self.stop_signals = [signal.Signals["SIG" + s.strip().upper().removeprefix("SIG")]
                             for s in a.stop_signals.split(",") if s.strip()]  # checked by parse_args
        torch.manual_seed(a.seed)
        np.random.seed(a.seed)
        if a.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.out = Path(a.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.ckpt_path = self.out / "checkpoint.pt"
        if a.resume != "auto" and self.ckpt_path.exists() != bool(a.resume):
            raise SystemExit(f"--resume: no checkpoint at {self.ckpt_path}" if a.resume else f"{self.out} already "
                             "holds a checkpoint: pass --resume to continue it (--resume auto: whenever it has one), "
                             "or choose another --out")
        self.state = load_checkpoint(self.ckpt_path) if self.ckpt_path.exists() and a.resume else None
        self.step = self.epoch = self.epoch_step = 0
        self.epoch_done, self.stopped, self.warned, self.signal, self.log_file, self.handlers, self.bar, self.tracker \
            = True, False, False, None, None, {}, None, None
        self.drawn, self.cost = 0.0, math.inf if os.environ.get("MEDSSL_NO_CURVES") else 0.0  # 1: no curves.png

    def prepare(self, model):
        """On the device; on CUDA in channels_last and, under torchrun, with SyncBatchNorm (the CPU: per process)."""
        model = model.to(self.device)
        if self.world > 1 and self.cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model.to(memory_format=torch.channels_last) if self.cuda else model

    def distribute(self, model):
        """DDP under torchrun (gradients averaged over ranks), else the model itself."""
        return model if self.world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.cuda else None)

    def loader(self, dataset, collate_fn=None, what="images"):
        """This rank's whole batches, shuffled by (seed, epoch). Persistent workers draw nothing random; their
        base seed comes from the loader's own generator, so the global stream is the same on resume."""
        if len(dataset) < self.args.batch_size:  # --skip-bad can leave fewer readable images than one batch
            bad = len(dataset.skipped)
            raise SystemExit(f"only {len(dataset)} " + (f"readable {what} of {len(dataset) + bad} ({bad} unreadable, "
                             "skipped)" if bad else what) + f", fewer than --batch-size {self.args.batch_size}")
        self.dataset = dataset
        self.sampler = ResumableSampler(dataset, self.world, self.rank, seed=self.args.seed, drop_last=True)
        return torch.utils.data.DataLoader(dataset, self.local_batch, sampler=self.sampler, drop_last=True,
                                           num_workers=self.args.workers, collate_fn=collate_fn, pin_memory=self.cuda,
                                           persistent_workers=self.args.workers > 0,
                                           worker_init_fn=functools.partial(_quiet_worker, self.stop_signals),
                                           generator=torch.Generator().manual_seed(self.args.seed))

    def checkpoint(self, **entries):
        """What each checkpoint holds beside the run's place: objects with a state dict (saved as it is then), and
        plain values. On a resume the objects are loaded and the run continues where the checkpoint was written;
        an lr or weight decay given again goes into the optimizer's groups and the schedule's base values."""
        self.entries, s = entries, self.state
        if s is None:
            return
        fresh = {k: [dict(g) for g in o.param_groups] for k, o in entries.items() if hasattr(o, "param_groups")}
        for key, obj in entries.items():
            if hasattr(obj, "load_state_dict") and key != "encoder":
                obj.load_state_dict(s[key])
        for key, groups in fresh.items():
            opt = entries[key]
            sched = [o for o in entries.values() if getattr(o, "optimizer", None) is opt]
            for i, (new, g) in enumerate(zip(groups, opt.param_groups)):
                base, old = new.get("initial_lr", new["lr"]), g.get("initial_lr", g["lr"])
                g["weight_decay"] = new.get("weight_decay", g.get("weight_decay"))
                if base != old:  # the same point of the schedule, on the new base value
                    g["lr"], g["initial_lr"] = g["lr"] * base / old if old else base, base
                    for sc in sched:
                        sc.base_lrs[i] = base
        self.epoch_done = s.get("epoch_done", True)  # older checkpoints were written at epoch ends only
        self.step, self.epoch = s["step"], s["epoch"] + self.epoch_done
        self.epoch_step = 0 if self.epoch_done else s["epoch_step"]
        ranks = s.get("ranks") or [{"rng": s.get("rng"), "loss_sum": s.get("loss_sum")}]  # before: rank 0's only
        if not self.epoch_done and len(ranks) != self.world:
            raise SystemExit(f"{self.ckpt_path} was written inside an epoch by {len(ranks)} process(es): resume it "
                             f"with {len(ranks)}, not {self.world}, or from a checkpoint at an epoch's end")
        self.resumed = ranks[self.rank] if not self.epoch_done else None

    def start(self, summary):
        """The run folder: args.json (on resume, a line in resumes.jsonl), the log, the signal handlers."""
        if self.master:
            self.out.mkdir(parents=True, exist_ok=True)
            self.supersede()
            if self.state is not None:  # the first args.json stays; each resume is recorded beside it
                with open(self.out / "resumes.jsonl", "a") as f:
                    f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": self.step,
                                        "overrides": getattr(self.args, "overrides", {})}) + "\n")
                print(f"resuming {self.out} at step {self.step} as it was started" + (
                    f", with {self.args.overrides}" if getattr(self.args, "overrides", None) else ""))
            else:
                atomic_write_text(self.out / "args.json", json.dumps(vars(self.args), indent=1))
            self.log_file = open(self.out / "log.jsonl", "a")
            if importlib.util.find_spec("demo") is None:  # a script copied beside data.py alone
                self.cost = math.inf
                print("no curves.png: demo.py, which draws them, is not beside data.py", file=sys.stderr)
            if self.args.report_to:
                self.tracker = _demo().Tracker(self.args.report_to.split(","), self.out, vars(self.args), self.step)
            print(f"{summary}, {self.world} process(es) on {self.device}, run folder {self.out}")
        if threading.current_thread() is threading.main_thread():  # a preempted job saves, then stops
            for sig in self.stop_signals:
                self.handlers[sig] = signal.signal(sig, lambda n, _: setattr(self, "signal", signal.Signals(n).name))

    def supersede(self):
        """The log read as one run: lines of steps after the checkpoint (logged before a crash, or by a start
        that never reached a checkpoint) move to log.superseded.jsonl, so each step is logged once."""
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        lines = log.read_text().splitlines(keepends=True)
        late = [x for x in lines if self.state is None or not re.match(r'{"(step|epoch)": -?\d+.*}\n$', x)  # or torn
                or json.loads(x)["step"] > self.step]
        if late:
            with open(self.out / "log.superseded.jsonl", "a") as f:
                f.writelines(x if x.endswith("\n") else x + "\n" for x in late)
            atomic_write_text(log, "".join(x for x in lines if x not in late))

    def epochs(self):
        """(epoch, the augmentation's generator) from where the run stands. An epoch's randomness is a function
        of (seed, epoch, rank); a run resumed inside an epoch takes the checkpoint's states of this rank."""
        for epoch in range(self.epoch, self.args.epochs):
            self.epoch, s = epoch, self.state
            self.rng = epoch_generator(self.device, self.args.seed, epoch, self.rank)
            if s is not None and not self.epoch_done and s["epoch"] == epoch:
                rng = self.resumed["rng"]
                torch.set_rng_state(rng["torch"])
                if self.cuda and "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"])
                self.rng.set_state(rng["views"])
                self.loss_sum = self.resumed["loss_sum"].to(self.device)
            else:
                torch.manual_seed(self.args.seed * 100003 + epoch)  # a prime stride: no two (seed, epoch) share one
                self.epoch_step, self.loss_sum = 0, torch.zeros((), device=self.device)
            self.epoch_done = False
            self.sampler.set_epoch(epoch)
            self.sampler.skip = self.epoch_step * self.local_batch
            yield epoch, self.rng
            self.draw()
            if self.stopped:
                return

    def batches(self, loader, **epoch_line):
        """The epoch's batches; after each step, the checkpoint when one is due, and the stop; at the epoch's end
        its mean loss (with `epoch_line`) in the log. Epochs under 500 steps share one bar for the whole run."""
        a, skipped, per_epoch = self.args, self.epoch_step, len(loader) + self.epoch_step
        total = min(a.epochs * per_epoch, a.max_steps or math.inf)
        short = per_epoch < 500  # minutes on a GPU: one bar for the whole run; a longer epoch gets a bar of its own
        if self.bar is None or not short:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total if short else per_epoch, initial=self.step if short else skipped,
                            disable=not self.master, leave=False, dynamic_ncols=True)
        self.bar.set_description(f"epoch {self.epoch + 1}/{a.epochs}")
        self.t0, self.seen, self.total = time.time(), 0, total
        for self.seen, batch in enumerate(loader, 1):  # seen: steps of this call (img/s after a resume too)
            self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
            yield batch
            self.bar.update()
            stop = self.signal is not None
            if self.world > 1:  # every rank stops at the same step
                stop = bool(self.mean(torch.tensor(float(stop), device=self.device)) > 0)
            at_max = bool(a.max_steps) and self.step >= a.max_steps
            if stop or at_max or (a.save_every and self.step % a.save_every == 0):
                self.epoch_done = self.epoch_step == skipped + len(loader)
                self.save()
            if stop:
                self.finish()
                raise SystemExit(f"stopped by {self.signal or 'a signal to another rank'} at step {self.step}: "
                                 f"checkpoint {self.ckpt_path}; continue with --resume --out {self.out} (a command "
                                 "with --resume auto continues by itself when run again)")
            if at_max:
                self.stopped = True
                break
        else:
            self.epoch_done = True
        if self.epoch_done:  # the whole epoch's mean (at --max-steps inside it: none; the step saved the checkpoint)
            self.write({"epoch": self.epoch, "step": self.step, "epoch_loss": self.epoch_loss(), **epoch_line})
            if not self.stopped:
                self.save()

    def track(self, loss):
        """The step's loss into the epoch's mean (on the device: no sync); True on a logging step."""
        self.loss = loss.detach()
        self.loss_sum = self.loss_sum + self.loss.float()
        return self.step % self.args.log_every == 0 or self.step == 1

    def mean(self, x):
        """A float, the mean over the ranks."""
        x = x.detach().float().clone()
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return float(x) / self.world

    def log(self, **metrics):
        """One JSON line (step, epoch, the loss averaged over ranks, metrics, each optimizer group's lr, images/s);
        the NaN guard."""
        lrs = [g["lr"] for g in self.entries["optimizer"].param_groups]
        rec = {"step": self.step, "epoch": self.epoch, "loss": self.check_finite(), **metrics, "lr": lrs[0],
               **({"lrs": lrs} if len(lrs) > 1 else {}),
               "img_per_s": round(self.seen * self.args.batch_size / max(time.time() - self.t0, 1e-9), 1)}
        self.write(rec)
        epoch_mean = self.epoch_loss()  # a collective: every rank asks
        if self.master:
            left = (self.total - self.step) * (time.time() - self.t0) / max(self.seen, 1) / 60  # minutes
            self.bar.set_postfix({**{k: f"{rec[k]:.3f}" for k in ("loss", "spread", "t", "gap") if k in rec},
                                  "epoch mean": f"{epoch_mean:.3f}",  # the one bar shows the run's time left
                                  **({} if self.bar.total == self.total else {"run left": f"{left:.0f} min"})})
        return rec

    def write(self, rec):
        if self.master:
            self.log_file.write(json.dumps(rec) + "\n")
            self.log_file.flush()
            if self.tracker:
                self.tracker.log(rec)

    def draw(self, last=False):
        """curves.png from the log, at an epoch's end (drawing kept under 5 % of the run's time) and at the stop."""
        if self.master and self.cost < math.inf and (last or time.time() > self.drawn + 19 * self.cost):
            t = time.time()
            _demo().plot_runs([(self.out.name, self.out)], self.out / "curves.png")
            self.drawn, self.cost = time.time(), time.time() - t

    def warn_once(self, condition, message):
        """A warning the first time `condition` holds: a collapse is said once, not at every step."""
        if condition and not self.warned and self.master:
            self.warned = True
            warnings.warn(message)

    def check_finite(self):
        """The last loss (mean over ranks); a stop that leaves the last checkpoint as it is if it is not finite."""
        loss = self.mean(self.loss)
        if not math.isfinite(loss):
            self.finish()
            raise SystemExit(f"loss is {loss} at step {self.step} (epoch {self.epoch}): stopping; the last good "
                             f"checkpoint, if any, is untouched at {self.ckpt_path}")
        return loss

    def epoch_loss(self):
        """The mean loss of this epoch's steps so far, over the ranks: one batch swings by several percent."""
        return self.mean(self.loss_sum) / max(self.epoch_step, 1)

    def save(self):
        """The checkpoint (the entries, the run's place, every rank's random states and loss sum), written
        atomically by rank 0 on the CPU."""
        self.check_finite()
        mine = {"rng": {"torch": torch.get_rng_state(), "views": self.rng.get_state(),
                        **({"cuda": torch.cuda.get_rng_state()} if self.cuda else {})}, "loss_sum": self.loss_sum.cpu()}
        ranks = [mine] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(ranks, mine)
        if self.master:
            state = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in self.entries.items()}
            state.update(epoch=self.epoch, step=self.step, epoch_step=self.epoch_step, epoch_done=self.epoch_done,
                         ranks=ranks, args=vars(self.args))
            torch.save(to_cpu(state), f"{self.ckpt_path}.tmp")
            os.replace(f"{self.ckpt_path}.tmp", self.ckpt_path)  # a crash mid-write leaves the last one intact
            if self.dataset.skipped and self.epoch_done:
                print(self.dataset.report_skipped(), file=sys.stderr)

    def finish(self):
        """Close the log (curves.png drawn a last time), give the signal handlers back, leave the process group."""
        for sig in list(self.handlers):
            signal.signal(sig, self.handlers.pop(sig))
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
            self.draw(last=True)
        for obj in (self.tracker, self.bar):
            if obj is not None:
                obj.close()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def to_cpu(obj):
    """The same nesting of dicts, lists and tuples with every tensor on the CPU."""
    if isinstance(obj, (dict, list, tuple)):
        return {k: to_cpu(v) for k, v in obj.items()} if isinstance(obj, dict) else type(obj)(map(to_cpu, obj))
    return obj.detach().cpu() if torch.is_tensor(obj) else obj


KNN_K, KNN_T = 20, 0.07  # the weighted kNN of InstDisc (Wu et al. 2018), solo-learn and DINO


class KNNMonitor:
    """The image-only scripts' kNN monitor: frozen features of a labelled set (the demo's without finetune.py's
    test patients), half its patients the bank, half the queries; top-1 accuracy of the weighted kNN."""

    def __init__(self, args, run):
        read = read_label_csv if args.eval_data.endswith(".csv") else read_class_folders
        task = "cytology" if args.demo == "cytology" else "rsna"
        paths, labels, _, ids = (_demo().demo_labelled(task, without_test=True) if args.eval_data == "demo"
                                 else (*read(args.eval_data), None))
        ids = ids or paths
        ds = ImageDataset(paths, None, eval_transform(args.size), size=args.size, channels=args.channels,
                          cache_dir=args.cache_dir or None, skip_bad=args.skip_bad)
        self.labels = torch.as_tensor(np.asarray(labels)[ds.index])
        self.bank, self.query = patient_split([ids[i] for i in ds.index], (0.5, 0.5), seed=0)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=128, num_workers=0)
        self.run, self.k, self.every = run, args.knn_k, args.knn_every

    def __call__(self, encoder, epoch):
        """At epoch -1 (random weights: the baseline to beat), every --knn-every epochs and at the last."""
        run = self.run
        if epoch >= 0 and (epoch + 1) % self.every and epoch + 1 != run.args.epochs:
            return
        encoder.eval()
        with torch.no_grad(), run.amp:
            f = torch.cat([encoder(x.to(run.device)).float().cpu() for x, _ in self.loader])
        encoder.train()
        acc = knn_accuracy(f[self.bank], self.labels[self.bank], f[self.query], self.labels[self.query], self.k)
        run.write({"epoch": epoch, "step": run.step, f"knn_top1@{self.k}": acc})
        print(f"epoch {epoch}: kNN top-1 accuracy {acc:.3f}" + (" (random weights)" if epoch < 0 else ""))


@torch.no_grad()
def knn_predict(bank, targets, queries, k=KNN_K, t=KNN_T):
    """The weighted kNN's scores: each query's k most cosine-similar bank features (k capped at the bank's size) vote
    with weight exp(s / t) for their targets (n_bank x C: one-hot classes, or 0/1 labels), summed and divided by
    the total weight: (n_queries x C), each row a distribution over the classes for one-hot targets."""
    s, idx = (F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T).topk(min(k, len(bank)), dim=1)
    w = ((s - s[:, :1]) / t).exp()  # exp(s / t) up to a per-query factor that cancels: no overflow
    return (w[..., None] * targets.float()[idx]).sum(1) / w.sum(1, keepdim=True)


def knn_accuracy(bank, bank_y, queries, query_y, k=KNN_K, t=KNN_T):
    """Top-1 accuracy of the weighted kNN on frozen features, class labels 0..C-1."""
    votes = knn_predict(bank, F.one_hot(bank_y, int(max(bank_y.max(), query_y.max())) + 1), queries, k, t)
    return float((votes.argmax(1) == query_y).float().mean())


# --------------------------------------------------- The demo data set: demo.py, imported only when it is asked for
def __getattr__(name):
    """data.demo_root, demo_pairs, demo_images, demo_labelled, plot_runs, read_log and Tracker (the curves and the
    trackers: matplotlib and the trackers' packages load only when used) (PEP 562): from demo.py, on first use."""
    if name.startswith("demo_") or name in ("DEMO_VERSION", "plot_runs", "read_log", "Tracker"):
        return getattr(_demo(), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def _demo():
    import demo
    return demo


if __name__ == "__main__":  # python data.py demo ... | bench-cache
    _demo().main()
