"""data.py: DICOM and image reading, reports, label files, splits, the cache, augmentation, demo."""
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, JpegImagePlugin
from pydicom.data import get_testdata_file

import data
import demo as demo_py
from conftest import ROOT, run_script


def tf(name):
    return get_testdata_file(name)  # bundled with pydicom: no download


# ------------------------------------------------------------------------- DICOM reading

def test_window_matches_the_standard_formula():
    # MR_small: no rescale, WindowCenter 600, WindowWidth 1600, LINEAR (PS3.3 C.11.2.1.2.1):
    # y = clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) = clip((x - 599.5) / 1599 + 0.5, 0, 1)
    raw = pydicom.dcmread(tf("MR_small.dcm")).pixel_array.astype(np.float64)
    expected = np.clip((raw - 599.5) / 1599 + 0.5, 0, 1)
    got = data.load_dicom(tf("MR_small.dcm"))
    assert got.dtype == np.float32 and got.shape == (64, 64)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert 0 < got.mean() < 1 and got.min() >= 0 and got.max() <= 1


def test_rescale_without_window_uses_full_stored_range():
    # CT_small: signed 16-bit stored, RescaleSlope 1, RescaleIntercept -1024, no window tags.
    # The full stored range [-32768, 32767] maps through the rescale to [-33792, 31743].
    raw = pydicom.dcmread(tf("CT_small.dcm")).pixel_array.astype(np.float64)
    hu = raw * 1 - 1024
    expected = (hu - (-33792)) / (31743 - (-33792))
    np.testing.assert_allclose(data.load_dicom(tf("CT_small.dcm")), expected, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path):
    ds = pydicom.dcmread(tf("MR_small.dcm"))
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-100"
    ds.WindowCenter, ds.WindowWidth = "1000", "2001"
    ds.save_as(tmp_path / "r.dcm")
    raw = ds.pixel_array.astype(np.float64)
    expected = np.clip((raw * 2 - 100 - 999.5) / 2000 + 0.5, 0, 1)  # window on modality values
    np.testing.assert_allclose(data.load_dicom(tmp_path / "r.dcm"), expected, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(tf("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    np.testing.assert_allclose(data.load_dicom(tmp_path / "m1.dcm"), 1 - data.load_dicom(tf("MR_small.dcm")), atol=1e-6)


def test_voi_lut_sequence_takes_precedence_over_window(tmp_path):
    ds = pydicom.dcmread(tf("MR_small.dcm"))
    raw = ds.pixel_array.astype(np.int64)
    n = int(raw.max()) + 1
    lut = (np.sqrt(np.arange(n) / (n - 1)) * 4095).astype(np.uint16)  # a non-linear LUT, 12-bit output
    item = pydicom.Dataset()
    item.LUTDescriptor = [n, 0, 12]
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data, US when 16-bit entries
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.save_as(tmp_path / "lut.dcm")
    expected = lut[np.clip(raw, 0, n - 1)] / 4095.0
    np.testing.assert_allclose(data.load_dicom(tmp_path / "lut.dcm"), expected, atol=1e-6)


@pytest.mark.parametrize("twin", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"])
def test_lossless_twins_decode_to_the_same_pixels(twin):
    np.testing.assert_array_equal(data.load_dicom(tf(twin)), data.load_dicom(tf("MR_small.dcm")))


def test_jpeg_lossless_and_rle_colour_twins_agree():
    a = data.load_image(tf("SC_rgb_jpeg_gdcm.dcm"), 3)  # JPEG lossless, process 14
    b = data.load_image(tf("SC_rgb_rle.dcm"), 3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (100, 100, 3)
    # colour -> luminance 0.299 R + 0.587 G + 0.114 B; the top-left pixel is pure red (255, 0, 0)
    assert data.load_dicom(tf("SC_rgb_rle.dcm"))[0, 0] == pytest.approx(0.299, abs=1e-6)


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG2000.dcm", "693_J2KI.dcm", "JPEGLSNearLossless_16.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "image_dfl.dcm"])
def test_every_supported_syntax_loads(name):
    a = data.load_dicom(tf(name))
    assert a.dtype == np.float32 and a.ndim == 2 and 0 <= a.min() <= a.max() <= 1 and a.std() > 0


def test_ybr_lossy_jpeg_close_to_rgb_original():
    a = data.load_image(tf("SC_rgb_jpeg_dcmtk.dcm"), 3)  # YBR_FULL baseline JPEG
    b = data.load_image(tf("SC_rgb_rle.dcm"), 3)
    assert np.abs(a - b).mean() < 0.02


def test_multiframe_reads_the_first_frame():
    a = data.load_image(tf("SC_rgb_rle_2frame.dcm"), 3)
    first = pydicom.dcmread(tf("SC_rgb_rle_2frame.dcm")).pixel_array[0] / 255.0
    np.testing.assert_allclose(a, first, atol=1e-6)


def test_demo_dicom_round_trip_through_window_and_monochrome1(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (32, 32)).astype(np.float32)
    for pi in ("MONOCHROME1", "MONOCHROME2"):
        for rle in (False, True):
            p = tmp_path / f"{pi}{rle}.dcm"
            demo_py.write_dicom(p, img, np.random.default_rng(1), pi, bits=12, rle=rle)
            ds = pydicom.dcmread(p)
            assert ds.PhotometricInterpretation == pi
            assert ds.file_meta.TransferSyntaxUID == (pydicom.uid.RLELossless if rle else pydicom.uid.ExplicitVRLittleEndian)
            # stored values span at least 0.65 * 4095 levels, so the error is under one level
            np.testing.assert_allclose(data.load_dicom(p), img, atol=1 / (0.6 * 4095))


# ------------------------------------------------------------------------- bad input

def test_missing_file():
    with pytest.raises(data.BadImageError, match="nope.dcm: file not found"):
        data.load_image("/tmp/definitely/nope.dcm")


def test_not_a_dicom(tmp_path):
    p = tmp_path / "fake.dcm"
    p.write_text("hello, I am not a DICOM file " * 20)
    with pytest.raises(data.BadImageError, match="fake.dcm: not a DICOM file"):
        data.load_dicom(p)
    with pytest.raises(data.BadImageError, match="fake.dcm"):
        data.load_image(p)


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
def test_dicom_without_pixels(name):
    with pytest.raises(data.BadImageError, match=f"{name}: DICOM has no pixel data"):
        data.load_dicom(tf(name))


def test_truncated_pixel_data():
    with pytest.raises(data.BadImageError, match="MR_truncated.dcm: pixel data is truncated"):
        data.load_dicom(tf("MR_truncated.dcm"))


def test_truncated_png(tmp_path):
    p = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(data.BadImageError, match="cut.png: image data is truncated"):
        data.load_image(p)


def test_undecodable_transfer_syntax_names_the_package():
    # Run with pylibjpeg hidden, as on a machine where it was never installed.
    code = ("import sys; sys.modules['pylibjpeg'] = sys.modules['libjpeg'] = None\n"
            "import data\nfrom pydicom.data import get_testdata_file as g\n"
            "try:\n    data.load_dicom(g('MR_small_jpeg_ls_lossless.dcm'))\nexcept data.BadImageError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout
    assert "MR_small_jpeg_ls_lossless.dcm" in out and "JPEG-LS" in out and "pip install pylibjpeg" in out


def test_unsupported_syntax(tmp_path):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(tf("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: nothing decodes it
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(data.BadImageError, match="mpeg.dcm: no installed decoder handles transfer syntax 'MPEG2"):
        data.load_dicom(tmp_path / "mpeg.dcm")


# ------------------------------------------------------------------------- other images

def test_load_image_formats(tmp_path):
    rng = np.random.default_rng(0)
    g8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "a.png")
    Image.fromarray(g16).save(tmp_path / "b.png")
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    Image.fromarray(rgb).save(tmp_path / "d.tif")
    smooth = np.stack(list(np.meshgrid(np.linspace(0, 255, 30), np.linspace(0, 255, 20))) + [np.full((20, 30), 128.0)], -1)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "e.jpg", quality=95)
    np.testing.assert_allclose(data.load_image(tmp_path / "a.png"), g8 / 255, atol=1e-6)
    np.testing.assert_allclose(data.load_image(tmp_path / "b.png"), g16 / 65535, atol=1e-6)
    np.testing.assert_allclose(data.load_image(tmp_path / "c.bmp", 3), rgb / 255, atol=1e-6)
    np.testing.assert_allclose(data.load_image(tmp_path / "d.tif", 3), rgb / 255, atol=1e-6)
    assert np.abs(data.load_image(tmp_path / "e.jpg", 3) - smooth.astype(np.uint8) / 255).mean() < 0.02
    lum = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / 255
    np.testing.assert_allclose(data.load_image(tmp_path / "c.bmp", 1), lum, atol=1e-5)
    three = data.load_image(tmp_path / "a.png", 3)  # grayscale replicated
    assert three.shape == (20, 30, 3) and np.array_equal(three[..., 0], three[..., 2])


def test_dicom_found_by_preamble_not_extension(tmp_path):
    p = tmp_path / "image_without_extension"
    shutil.copy(tf("MR_small.dcm"), p)
    np.testing.assert_array_equal(data.load_image(p), data.load_dicom(tf("MR_small.dcm")))
    assert data.find_images(tmp_path) == [str(p)]


def test_fit_square():
    t = data.fit_square(np.ones((40, 80), np.float32) * 0.5, 16)
    assert t.shape == (1, 16, 16) and torch.allclose(t, torch.full_like(t, 0.5))
    assert data.fit_square(np.zeros((10, 10, 3), np.float32), 8).shape == (3, 8, 8)


# ------------------------------------------------------------------------- reports

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.  A 3.5 cm nodule projects over the
 left lung, e.g. within the breast.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_parse_mimic_report():
    r = data.parse_report(MIMIC_REPORT)
    assert r["findings"].startswith("There is no focal consolidation") and r["findings"].endswith("within the breast.")
    assert "\n" not in r["findings"] and "  " not in r["findings"]
    assert r["impression"] == "No acute cardiopulmonary process."
    assert r["comparison"] == "None."
    assert "FINAL REPORT" not in " ".join(r.values())


def test_report_sentences_keep_decimals_and_abbreviations():
    s = data.report_sentences(MIMIC_REPORT)
    assert s == ["There is no focal consolidation, pleural effusion or pneumothorax.",
                 "Bilateral nodular opacities that most likely represent nipple shadows.",
                 "The cardiomediastinal silhouette is normal.",
                 "A 3.5 cm nodule projects over the left lung, e.g. within the breast.",
                 "No acute cardiopulmonary process."]


def test_inline_headings_and_numbered_impression():
    r = data.parse_report("WET READ: JXR 3:45 PM  no ptx. FINDINGS: Lungs clear. Heart size normal. "
                          "IMPRESSION: 1. No pneumonia. 2. Dr. Lee notified at 3 p.m. No change.")
    assert r["findings"] == "Lungs clear. Heart size normal."
    assert r["wet read"].startswith("JXR")
    assert data.report_sentences("FINDINGS: Lungs clear. IMPRESSION: 1. No pneumonia. 2. Dr. Lee was told.") == [
        "Lungs clear.", "No pneumonia.", "Dr. Lee was told."]


def test_missing_sections_fall_back_to_the_whole_text():
    r = data.parse_report("Portable chest. Lungs are clear.")
    assert r["findings"] == "" and r["impression"] == ""
    assert data.report_sentences("Portable chest. Lungs are clear.") == ["Portable chest.", "Lungs are clear."]
    only = data.parse_report("IMPRESSION:\n   Small left effusion.\n")
    assert only["impression"] == "Small left effusion." and only["findings"] == ""
    assert data.report_sentences("") == []


def test_conclusion_is_an_impression_alias():
    assert data.parse_report("FINDINGS: x. CONCLUSION: Normal study.")["impression"] == "Normal study."


# ------------------------------------------------------------------------- label files

def test_rsna_labels_multi_box(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("patientId,x,y,width,height,Target\n"
                 "a,,,,,0\n"
                 "b,10,20,30,40,1\n"
                 "b,50,60,30,40,1\n"
                 "c,1,2,3,4,1\n")
    assert data.read_rsna_labels(p) == {"a": 0, "b": 1, "c": 1}


def test_rsna_wrong_column(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("patient,Target\na,0\n")
    with pytest.raises(ValueError, match=r"labels.csv: missing column\(s\) \['patientId'\]"):
        data.read_rsna_labels(p)


def test_missing_csv():
    with pytest.raises(FileNotFoundError, match="nope.csv: CSV file not found"):
        data.read_rsna_labels("/tmp/nope.csv")


@pytest.mark.parametrize("policy,labels,mask", [
    ("ones", [1, 0, 1, 0], [1, 1, 1, 1]),
    ("zeros", [1, 0, 0, 0], [1, 1, 1, 1]),
    ("ignore", [1, 0, 0, 0], [1, 1, 0, 1]),
])
def test_chexpert_policies(tmp_path, policy, labels, mask):
    obs = ["Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"]
    p = tmp_path / "CheXpert-v1.0" / "train.csv"
    p.parent.mkdir()
    p.write_text("Path,Sex," + ",".join(obs) + "\nCheXpert-v1.0/train/patient1/study1/view1_frontal.jpg,F,1.0,0.0,-1.0,\n")
    paths, y, m = data.read_chexpert_labels(p, policy, observations=obs)
    assert paths == [str(tmp_path / "CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg")]
    assert y.tolist() == [labels] and m.tolist() == [mask]


def test_chexpert_bad_value_and_policy(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("Path,Edema\nx.jpg,2\n")
    with pytest.raises(ValueError, match="Edema must be 1, 0, -1 or blank"):
        data.read_chexpert_labels(p, observations=["Edema"])
    with pytest.raises(ValueError, match="uncertainty policy"):
        data.read_chexpert_labels(p, "maybe", observations=["Edema"])


def test_mimic_chexpert_join_on_demo(demo):
    paths, y, m = data.read_chexpert_labels(demo / "mimic" / "mimic-cxr-2.0.0-chexpert.csv", "ignore",
                                            image_root=demo / "mimic")
    pairs = data.demo_pairs(split=None)[0]
    assert sorted(paths) == sorted(pairs) and y.shape == (len(paths), 14)
    # a study whose report says consolidation has Consolidation = 1
    cons = data.CHEXPERT_14.index("Consolidation")
    reports = dict(zip(*data.demo_pairs(split=None)[:2]))
    for p, row in zip(paths[:40], y[:40]):
        findings = data.parse_report(reports[p])["findings"]
        says = any(w in findings for w in ("consolidation in the", "opacity is present", "Patchy consolidation"))
        assert bool(row[cons]) == says


def test_class_folders_and_grouping(demo):
    paths, y, names = data.read_class_folders(demo / "cytology")
    assert names == sorted(data.HERLEV_CLASSES) and len(paths) == len(y) and set(y) == set(range(7))
    paths2, y2, names2 = data.read_class_folders(demo / "cytology", "herlev-2class")
    assert names2 == ["abnormal", "normal"]
    normal = [p for p, c in zip(paths2, y2) if c == 1]
    assert all("/normal_" in p for p in normal) and len(normal) == 3 * len(paths) // 7


def test_hicervix_and_generic(tmp_path):
    h = tmp_path / "hicervix.csv"
    h.write_text("image_name,level_1,level_2,level_3\na.jpg,ASC,ASC-US,\nb.jpg,NILM,NILM,Normal\nc.jpg,ASC,ASC-H,\n")
    paths, y, names = data.read_label_csv(h, "image_name", "level_2", tmp_path)  # finetune.py --task hicervix
    assert names == ["ASC-H", "ASC-US", "NILM"] and y.tolist() == [1, 2, 0]
    assert data.read_label_csv(h, "image_name", "level_3", tmp_path)[2] == ["Normal"]
    g = tmp_path / "g.csv"
    g.write_text("path,label\nx.png,cat\ny.png,dog\nz.png,cat\n")
    assert data.read_label_csv(g)[1].tolist() == [0, 1, 0]
    g.write_text("path,label\nx.png,cat\ny.png,\nz.png,dog\n")  # an empty cell: no label, the row left out
    assert data.read_label_csv(g)[0] == [str(tmp_path / "x.png"), str(tmp_path / "z.png")]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['diagnosis'\]"):
        data.read_label_csv(g, label_col="diagnosis")


# ------------------------------------------------------------------------- splits and fractions

def test_patient_split_disjoint_deterministic():
    ids = [f"p{i // 3}" for i in range(300)]  # 100 patients, 3 images each
    a = data.patient_split(ids, (0.7, 0.15, 0.15), seed=1)
    b = data.patient_split(ids, (0.7, 0.15, 0.15), seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(300))
    pats = [{ids[i] for i in part} for part in a]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])
    assert [len(p) for p in a] == [210, 45, 45]
    assert not np.array_equal(a[0], data.patient_split(ids, (0.7, 0.15, 0.15), seed=2)[0])
    with pytest.raises(ValueError, match="sum to 1"):
        data.patient_split(ids, (0.5, 0.2))


def test_label_fraction_stratified_nested_deterministic():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    f1, f10, f100 = (data.label_fraction(labels, f, seed=3) for f in (0.01, 0.1, 1.0))
    assert set(f1) <= set(f10) <= set(f100) and len(f100) == 1000
    assert np.bincount(labels[f1]).tolist() == [9, 1, 1]  # at least one per class
    assert np.bincount(labels[f10]).tolist() == [90, 9, 1]
    assert np.array_equal(f10, data.label_fraction(labels, 0.1, seed=3))
    assert not np.array_equal(f10, data.label_fraction(labels, 0.1, seed=4))


def test_label_fraction_multilabel():
    rng = np.random.default_rng(0)
    y = (rng.random((500, 4)) < [0.5, 0.2, 0.05, 0.01]).astype(np.float32)
    y[0, 3] = 1
    small, big = data.label_fraction(y, 0.01, 0), data.label_fraction(y, 0.1, 0)
    assert set(small) <= set(big)
    assert (y[small].sum(0) > 0).all()


# ------------------------------------------------------------------------- decode cache and dataset

def test_cache_hit_miss_invalidation(tmp_path, demo):
    src = data.demo_images("xray")[:4]
    files = []
    for i, p in enumerate(src):
        shutil.copy(p, tmp_path / f"{i}.dcm")
        files.append(str(tmp_path / f"{i}.dcm"))
    c = data.DecodeCache(tmp_path / "cache", 32, 1)
    slots, bad = c.build(files)
    assert (c.misses, c.hits, bad) == (4, 0, {})
    direct = data.fit_square(data.load_image(files[2]), 32)
    assert torch.allclose(c.read(slots[2]), direct, atol=0.5 / 255 + 1e-6)  # uint8 store: half a level
    c2 = data.DecodeCache(tmp_path / "cache", 32, 1)
    assert c2.build(files)[0] == slots and (c2.misses, c2.hits) == (0, 4)
    time.sleep(0.01)
    shutil.copy(src[0], files[2])  # file 2 now holds another image: its key changes
    slots3, _ = c2.build(files)
    assert (c2.misses, c2.hits) == (1, 3) and slots3[2] != slots[2]
    assert torch.allclose(c2.read(slots3[2]), c2.read(slots3[0]))
    # a different target size is a different store
    c4 = data.DecodeCache(tmp_path / "cache", 16, 1)
    c4.build(files)
    assert c4.misses == 4 and c4.read(0).shape == (1, 16, 16)


def test_cache_with_decode_workers(tmp_path, demo):
    files = data.demo_images("xray")[:6]
    c = data.DecodeCache(tmp_path, 24, 1)
    slots, _ = c.build(files, workers=2)
    direct = data.fit_square(data.load_image(files[5]), 24)
    assert torch.allclose(c.read(slots[5]), direct, atol=0.5 / 255 + 1e-6)  # uint8: rounded to the nearest level
    assert torch.equal(c.read(slots[5], uint8=True), (direct * 255).round().to(torch.uint8))


def noise_pngs(folder, n, side=24):
    """n small PNGs of distinct noise: a slot that holds another image's pixels cannot go unseen."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return sorted(str(p) for p in folder.iterdir())


def fresh_uint8(path, size):  # the image decoded now, as the cache stores it
    return (data.fit_square(data.load_image(path), size) * 255).round().to(torch.uint8)


def test_cache_build_under_a_file_size_limit_stops_in_one_line_and_keeps_what_it_recorded(tmp_path):
    paths, cache = noise_pngs(tmp_path / "imgs", 40), tmp_path / "cache"
    # slots of 32 x 32 = 1,024 bytes, recorded every 4; the limit (as a full disk or a quota) is 10.5 slots: slot 10's
    # write is cut short, the build stops with slots 0-9 on disk and recorded, and the half slot is cut off
    code = ("import resource, signal, data, demo; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10752, 10752)); data.DecodeCache.save_images = 4; "
            f"demo.main(['cache', '--data', {str(tmp_path / 'imgs')!r}, '--for', 'finetune', '--size', '32', "
            f"'--workers', '1', '--cache-dir', {str(cache)!r}])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    folder = cache / "32px-1ch-uint8"
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr  # one line, after the progress bar's
    assert p.stderr.strip().splitlines()[-1] == f"data.py cache: {folder}: cannot write the cache (File too large); " \
                                               "what it holds stays"
    assert (folder / "pixels.bin").stat().st_size == 10 * 1024
    c = data.DecodeCache(cache, 32, 1)
    slots, bad = c.build(paths)
    assert (c.misses, bad, sorted(slots)) == (30, {}, list(range(40)))  # only the 30 not recorded are decoded
    assert all(torch.equal(c.read(s, uint8=True), fresh_uint8(p, 32)) for s, p in zip(slots, paths))
    assert (folder / "pixels.bin").stat().st_size == 40 * 1024


def test_cache_build_killed_midway_resumes_where_it_stopped(tmp_path):
    paths, cache = noise_pngs(tmp_path / "imgs", 40), tmp_path / "cache"
    # recorded every 10 images; SIGKILL (nothing runs after it) as the 25th is decoded: 20 recorded, 24 written
    code = """if True:
        import os, signal, sys, data
        data.DecodeCache.save_images, fit, calls = 10, data.fit_square, []
        def fit_then_kill(*a, **k):
            calls.append(1)
            if len(calls) == 25:
                os.kill(os.getpid(), signal.SIGKILL)
            return fit(*a, **k)
        data.fit_square = fit_then_kill
        data.DecodeCache(sys.argv[1], 32, 1).build(sys.argv[2:])"""
    p = subprocess.run([sys.executable, "-c", code, str(cache), *paths], cwd=ROOT, capture_output=True, timeout=300)
    folder = cache / "32px-1ch-uint8"
    assert p.returncode == -9 and (folder / "pixels.bin").stat().st_size == 24 * 1024  # 4 slots not yet recorded
    c = data.DecodeCache(cache, 32, 1)
    slots, bad = c.build(paths)
    assert (c.misses, bad, sorted(slots)) == (20, {}, list(range(40)))  # the 20 recorded are not decoded again
    assert all(torch.equal(c.read(s, uint8=True), fresh_uint8(p, 32)) for s, p in zip(slots, paths))
    assert (folder / "pixels.bin").stat().st_size == 40 * 1024  # the 4 orphaned slots written over, not kept


def test_cache_tries_a_file_again_once_its_missing_decoder_is_installed(tmp_path, monkeypatch):
    path = tf("JPGExtended.dcm")  # JPEG Extended: pylibjpeg-libjpeg decodes it

    def missing(self):  # what pydicom says when no plugin that decodes the syntax is installed
        raise RuntimeError("Unable to decompress 'JPEG Extended (Process 2 and 4)' pixel data because all plugins "
                           "are missing dependencies:\n\tpylibjpeg - requires pylibjpeg-libjpeg")
    with monkeypatch.context() as m:
        m.setattr(pydicom.dataset.Dataset, "pixel_array", property(missing))
        slots, bad = data.DecodeCache(tmp_path, 16, 1).build([path])
    assert slots == [-1] and "needs a decoder that is not installed: pip install pylibjpeg" in bad[path]
    c = data.DecodeCache(tmp_path, 16, 1)
    slots, bad = c.build([path])  # the decoder is there now: the file is decoded, not remembered as unreadable
    assert (c.misses, bad, slots) == (1, {}, [0]) and torch.equal(c.read(0, uint8=True), fresh_uint8(path, 16))
    # a cache written before remembered it: its entry is dropped and the file decoded
    index = json.loads(c.index_path.read_text())
    index["bad"], index["slots"] = {k: "x.dcm: ... needs a decoder that is not installed: pip install" for k in
                                    index["slots"]}, {}
    c.index_path.write_text(json.dumps(index))
    assert c.build([path]) == ([0], {}) and c.misses == 1


def test_cache_command_then_a_script_with_the_same_data_options_decodes_nothing(tmp_path):
    noise_pngs(tmp_path / "imgs", 8, side=40)
    cache = tmp_path / "cache"
    p = run_script("data.py", "cache", "--data", tmp_path / "imgs", "--size", "32", "--workers", "1",
                   "--cache-dir", cache)
    index = cache / f"{data.train_side(32)}px-1ch-uint8" / "index.json"  # pretraining caches at 8/7 of the crop
    assert f"{index.parent}: 8 of 8 images cached, 8 decoded now" in p.stdout
    before = index.stat().st_mtime_ns, index.read_bytes()
    run_script("simclr.py", "--data", tmp_path / "imgs", "--size", "32", "--arch", "resnet18", "--batch-size", "4",
               "--epochs", "1", "--max-steps", "1", "--workers", "0", "--cache-dir", cache, "--out", tmp_path / "run")
    assert (index.stat().st_mtime_ns, index.read_bytes()) == before  # a decoded image would rewrite the index


def test_jpeg_draft_decode_stays_within_its_stated_bound_of_the_full_decode(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    img = demo_py.chest_phantom(rng, 528, {"effusion": "left"}) + rng.normal(0, 0.01, (528, 528))
    for name, (h, w) in (("even.jpg", (528, 440)), ("odd.jpg", (527, 437))):
        Image.fromarray(np.rint(img[:h, 44:44 + w].clip(0, 1) * 255).astype(np.uint8)).save(tmp_path / name, quality=95)
    original, scales = JpegImagePlugin.JpegImageFile.draft, []

    def spy(self, mode, size):
        width = self.size[0]
        original(self, mode, size)
        scales.append(width // self.size[0])
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for size in (16, 32, 64):  # the largest scale that leaves 2 x size: 440 / 8 = 55 >= 32, 440 / 4 = 110 >= 64, ...
        full = data.fit_square(data.load_image(tmp_path / "even.jpg"), size)
        d = (data.fit_square(data.load_image(tmp_path / "even.jpg", 1, size), size) - full).abs() * 255
        assert d.mean() <= 0.5 and d.max() <= 4, (size, float(d.mean()), float(d.max()))  # the docstring's bound
        odd = tmp_path / "odd.jpg"  # no scale divides 527 x 437: decoded in full
        assert torch.equal(data.fit_square(data.load_image(odd, 1, size), size),
                           data.fit_square(data.load_image(odd), size))
    assert scales == [8, 4, 2]


def test_decode_benchmark_runs_end_to_end(tmp_path):
    # benchmarks/bench_decode.py on tiny sources, so it never rots (no speed asserted); --old: this very data.py
    out = tmp_path / "b.json"
    run_script("benchmarks/bench_decode.py", "--old", ROOT / "data.py", "--n", "1", "--repeats", "1", "--build-n", "2",
               "--workers", "1", "--startup", "20", "30", "--source-scale", "0.05", "--size", "16", "--out", out)
    res = json.loads(out.read_text())
    assert [r["format"] for r in res["formats"]] == ["JPEG 2500x3000", "PNG 2048^2", "DICOM 2048^2", "DICOM 2048^2 RLE"]
    # the same code: the same pixels, but for the JPEG's draft decode (old: load_image without the size)
    assert [r["max_diff"] == 0 for r in res["formats"]] == [False, True, True, True]
    assert res["formats"][0]["max_diff"] < 4
    assert [(r["code"], r["workers"]) for r in res["build"]] == [("new", 1), ("old", 1)]
    assert [r["files"] for r in res["startup"]] == [20, 20, 30, 30, 377110, 377110]


def test_dataset_skip_bad(tmp_path, demo):
    files = data.demo_images("xray")[:3]
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"garbage")
    paths = files + [str(bad)]
    with pytest.raises(data.BadImageError, match="bad.dcm: not a DICOM file"):
        data.ImageDataset(paths, size=16, cache_dir=tmp_path / "c")
    ds = data.ImageDataset(paths, size=16, cache_dir=tmp_path / "c", skip_bad=True)
    assert len(ds) == 3 and "bad.dcm" in ds.report_skipped()
    assert ds[0][0].shape == (1, 16, 16)
    # without the cache, skip_bad reads each file once up front: the bad one is left out before any worker starts
    uncached = data.ImageDataset(paths, size=16, skip_bad=True)
    assert len(uncached) == 3 and "bad.dcm" in uncached.report_skipped() and uncached[2][1] == 2
    with pytest.raises(data.BadImageError, match="bad.dcm"):  # without skip_bad, where it is read
        data.ImageDataset(paths, size=16)[3]
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        data.ImageDataset([str(bad)], size=16, skip_bad=True)


def test_empty_dataset_and_folder(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        data.ImageDataset([], size=8)
    with pytest.raises(ValueError, match="no images found"):
        data.find_images(tmp_path)


# ------------------------------------------------------------------------- augmentation

def test_clahe_needs_scikit_image_or_keeps_the_dtype():
    try:
        import skimage  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="scikit-image"):
            data.CLAHE()
    else:  # an image-like input (CLAHE amplifies the uint8 rounding of pixel noise, so not noise)
        r, c = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
        x = (0.45 + 0.3 * torch.exp(-((r - 0.2) ** 2 + (c + 0.3) ** 2) / 0.1) - 0.2 * (r ** 2 + c ** 2) / 2)[None]
        x8 = (x * 255).round().to(torch.uint8)
        y8, yf, yq = data.CLAHE()(x8), data.CLAHE()(x), data.CLAHE()(x8.float() / 255)
        assert y8.dtype == torch.uint8 and yf.dtype == torch.float32 and y8.shape == yf.shape == (1, 64, 64)
        # the two paths on the same pixels (what the uint8 cache and a float read hold) differ only by the output's
        # rounding to uint8; CLAHE itself is not continuous in its input (an unquantised x gives other bins)
        assert (y8.float() / 255 - yq).abs().max() <= 1 / 255
        assert (yf - x).abs().mean() > 0.01 and (yq - x8.float() / 255).abs().mean() > 0.01  # it did equalise


# ------------------------------------------------------------------------- demo data

def test_demo_layout_and_determinism(demo, tmp_path):
    paths, reports, patients = data.demo_pairs(split=None)
    assert len(paths) == 320 and len(set(patients)) == 160
    assert all(p.endswith(".dcm") for p in paths)
    kinds = {pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation for p in paths[:40]}
    assert kinds == {"MONOCHROME1", "MONOCHROME2"}
    assert all(data.report_sentences(r) for r in reports)
    rsna = data.read_rsna_labels(demo / "rsna" / "stage_2_train_labels.csv")
    rows = (demo / "rsna" / "stage_2_train_labels.csv").read_text().count("\n") - 1
    assert rows > len(rsna) and 0 < sum(rsna.values()) < len(rsna)  # multi-box rows exist
    # same seed, same bytes of pixels; the small version is quick
    a, b = tmp_path / "a", tmp_path / "b"
    demo_py.make_demo(a, size=32, n_xray=4, n_xray_test=2, n_rsna=4, n_cells=1, quiet=True)
    demo_py.make_demo(b, size=32, n_xray=4, n_xray_test=2, n_rsna=4, n_cells=1, quiet=True)
    pa, pb = sorted(a.rglob("*.dcm")), sorted(b.rglob("*.dcm"))
    assert [p.relative_to(a) for p in pa] == [p.relative_to(b) for p in pb]
    assert all(np.array_equal(data.load_dicom(x), data.load_dicom(y)) for x, y in zip(pa, pb))


def test_demo_split_keeps_the_pretraining_pairs_and_adds_unseen_test_patients(demo):
    # MIMIC's official split file, by patient: the first 240 studies' patients dealt 80 / 20 into train /
    # validate exactly as ConVIRT's demo split them before the file existed (so its measured runs stand),
    # and 80 studies of 40 new patients as the test split, which no demo choice has seen
    train, validate, test = (data.demo_pairs(split=s) for s in ("train", "validate", "test"))
    assert (len(train[0]), len(validate[0]), len(test[0])) == (192, 48, 80)
    assert not set(train[2]) & set(validate[2]) and not (set(train[2]) | set(validate[2])) & set(test[2])
    first = data.demo_pairs(split=None)
    first = [(p, q) for p, q in zip(first[0], first[2]) if q not in set(test[2])]
    tr, va = data.patient_split([q for _, q in first], (0.8, 0.2), seed=0)
    assert [first[i][0] for i in tr] == train[0] and [first[i][0] for i in va] == validate[0]
    assert [int(q[1:]) for q in sorted(set(test[2]))] == list(range(10000120, 10000160))


def test_official_split_reads_the_split_csv_and_names_a_missing_row(tmp_path):
    csv = tmp_path / "split.csv"
    csv.write_text("dicom_id,study_id,subject_id,split\na,1,1,train\nb,2,2,validate\nc,3,3,test\nd,4,4,train\n")
    parts = data.official_split(["x/d.dcm", "x/c.dcm", "x/a.jpg", "x/b.dcm"], csv)
    assert [p.tolist() for p in parts] == [[0, 2], [3], [1]]
    with pytest.raises(ValueError, match="1 images have no row.*e.dcm"):
        data.official_split(["x/a.dcm", "x/e.dcm"], csv)


def test_demo_pixels_carry_the_findings(demo):
    # Cardiomegaly makes the heart bigger: the bright area in the lower middle of the image grows.
    paths, y, m = data.read_chexpert_labels(demo / "mimic" / "mimic-cxr-2.0.0-chexpert.csv", image_root=demo / "mimic")
    k = data.CHEXPERT_14.index("Cardiomegaly")
    area = np.array([(data.load_dicom(p)[64:100, 60:100] > 0.4).mean() for p in paths])  # around the heart
    assert area[y[:, k] == 1].mean() > area[y[:, k] == 0].mean() + 0.05


def test_demo_command_line(tmp_path):
    out = run_script("data.py", "demo", tmp_path / "d", "--size", "32").stdout
    assert "demo data written" in out and "cytology/" in out
    assert (tmp_path / "d" / "summary.json").is_file()
    # --studies: the larger pair set instead, and the convirt.py command that uses it
    out = run_script("data.py", "demo", tmp_path / "p", "--studies", "4", "--size", "32", "--workers", "1").stdout
    assert "4 image-report studies of 2 patients" in out and "python convirt.py --data" in out
    assert len(list((tmp_path / "p" / "mimic").rglob("*.dcm"))) == 4 and not (tmp_path / "p" / "rsna").exists()


def test_csv_pairs_report_cells(tmp_path):
    (tmp_path / "r1.txt").write_text("FINDINGS: Small left effusion.")
    p = tmp_path / "pairs.csv"
    p.write_text("path,report\na.dcm,r1.txt\nb.dcm,The lungs are clear.\n")
    paths, reports, _ = data.csv_pairs(p)
    assert reports == ["FINDINGS: Small left effusion.", "The lungs are clear."]
    # a .txt cell whose file is missing used to become the report text itself: the model trained on file names
    p.write_text("path,report\na.dcm,r1.txt\nb.dcm,reports/r2.txt\n")
    with pytest.raises(ValueError, match=r"pairs.csv, row 3: report file not found: .*reports/r2.txt"):
        data.csv_pairs(p)
    p.write_text("path,report\na.dcm,r1.txt\nb.dcm,  \n")
    with pytest.raises(ValueError, match=r"pairs.csv, row 3: the 'report' cell is empty \(no report for b.dcm\)"):
        data.csv_pairs(p)


def test_pairs_demo_any_number_of_processes(tmp_path):
    # each study on its own random stream: one process or two write the same images and reports
    one, two = tmp_path / "one", tmp_path / "two"
    s = demo_py.make_pairs_demo(one, 12, size=32, workers=1, quiet=True)
    demo_py.make_pairs_demo(two, 12, size=32, workers=2, quiet=True)
    pa, pb = sorted(one.rglob("*.dcm")), sorted(two.rglob("*.dcm"))
    assert len(pa) == 12 and [p.relative_to(one) for p in pa] == [p.relative_to(two) for p in pb]
    assert all(np.array_equal(data.load_dicom(x), data.load_dicom(y)) for x, y in zip(pa, pb))
    assert [p.read_text() for p in sorted(one.rglob("*.txt"))] == [p.read_text() for p in sorted(two.rglob("*.txt"))]
    mimic = one / "mimic"
    train, _, train_patients = data.mimic_cxr_pairs(mimic, None, mimic / "mimic-cxr-2.0.0-split.csv", "train")
    val, _, val_patients = data.mimic_cxr_pairs(mimic, None, mimic / "mimic-cxr-2.0.0-split.csv", "validate")
    assert len(train) + len(val) == 12 and val and not set(train_patients) & set(val_patients)
    eval_paths, _, _ = data.read_chexpert_labels(mimic / "validate-chexpert.csv", "zeros", image_root=mimic)
    assert sorted(eval_paths) == sorted(val)
    assert s["mimic"]["studies"] == 12 and s["mimic"]["patients"] == 6


def test_preset_for_follows_the_images(tmp_path, demo):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (40, 40), dtype=np.uint8)
    for name, arr in [("g.png", grey), ("grey-as-rgb.jpg", np.stack([grey] * 3, 2)),
                      ("c.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))]:
        Image.fromarray(arr).save(tmp_path / name)
    assert data.preset_for([str(tmp_path / "g.png"), str(tmp_path / "grey-as-rgb.jpg")]) == "xray"
    assert data.preset_for(data.demo_images("xray")[:4]) == "xray"  # DICOM
    assert data.preset_for([str(tmp_path / "c.png")]) == "cytology-A"
    assert data.preset_for(data.demo_images("cytology")[:4]) == "cytology-A"


# ------------------------------------------------------------------ batched augmentation (BatchAugment)

def _whole_crop(q, n, side):
    q["crop"] = (torch.zeros(n), torch.zeros(n), torch.full((n,), float(side)), torch.full((n,), float(side)))
    return q


@pytest.mark.parametrize("preset", data.PRESETS + ["convirt"])
def test_batch_augment_draws_per_image_and_replays_from_its_generator(preset):
    colour = preset.startswith("cytology") or preset == "simclr"
    aug = data.BatchAugment(preset, 32, 3 if colour else 1)
    one = torch.rand(1, 3 if colour else 1, 40, 40)
    x = one.expand(8, -1, -1, -1).contiguous()  # eight copies of one image
    y = aug(x, torch.Generator().manual_seed(0))
    assert y.shape == (8, 3, 32, 32) and torch.isfinite(y).all()
    raw = y * torch.tensor(data.IMAGENET_STD).reshape(1, 3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    assert raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4  # every operation keeps pixels in [0, 1]
    assert all(not torch.equal(y[0], y[i]) for i in range(1, 8))  # each copy got its own parameters
    assert torch.equal(y, aug(x, torch.Generator().manual_seed(0)))  # a fixed generator replays the batch
    assert not torch.equal(y, aug(x, torch.Generator().manual_seed(1)))
    aug.where = True  # the GPU's way to a subset (every image computed, the mask picks, no host sync): the same
    assert torch.allclose(aug(x, torch.Generator().manual_seed(0)), y, atol=1e-5)
    aug.where = None
    u8 = (one * 255).round().to(torch.uint8).expand(8, -1, -1, -1)  # the decode cache's uint8 reads the same
    assert torch.allclose(aug(u8, torch.Generator().manual_seed(0)), aug(u8.float() / 255, torch.Generator().manual_seed(0)))


def test_batch_augment_crop_and_flips_agree_with_torchvision_per_image():
    import torchvision.transforms.v2.functional as TF

    n, side, size = 8, 72, 64
    x = torch.rand(n, 1, side, side)
    aug = data.BatchAugment("cytology-A", size, 1)
    q = aug.sample(torch.Generator().manual_seed(1), n, side)
    y = aug.apply(x, q)[:, :1] * data.IMAGENET_STD[0] + data.IMAGENET_MEAN[0]  # gray, before its copy to 3 channels
    top, left, h, w = (t.int().tolist() for t in q["crop"])
    # h and w are each rounded from sqrt(area / r) and sqrt(area * r): the bounds hold within half a pixel, any seed
    assert all((hh + 0.5) * (ww + 0.5) >= 0.5 * side**2 and hh * ww <= side**2
               and (ww - 0.5) / (hh + 0.5) <= 4 / 3 and (ww + 0.5) / (hh - 0.5) >= 3 / 4 for hh, ww in zip(h, w))
    for i in range(n):
        ref = TF.resized_crop(x[i], top[i], left[i], h[i], w[i], [size, size], antialias=False)
        ref = TF.vertical_flip(ref) if q["vflip"][i] else ref
        ref = TF.horizontal_flip(ref) if q["hflip"][i] else ref
        # interior: at the crop's edge one grid_sample over the whole image reads the pixel beyond it
        assert torch.allclose(y[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5)


def test_batch_augment_colour_jitter_blur_rotation_elastic_agree_with_torchvision():
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(0)
    n, s = 6, 48
    x = torch.rand(n, 3, s, s)
    factors = [torch.rand(n) + 0.5, torch.rand(n) + 0.5, torch.rand(n) + 0.5, torch.rand(n) * 0.2 - 0.1]
    order = torch.argsort(torch.rand(n, 4), 1)  # each image its own order of the four, as ColorJitter draws it
    got = data.jitter_images(x, factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        ref = x[i]
        for k in order[i].tolist():
            ref = ops[k](ref, float(factors[k][i]))
        assert torch.allclose(got[i], ref, atol=1e-5)
    sigma = torch.rand(n) * 1.9 + 0.1
    got = data._blur(x, sigma, 7)
    for i in range(n):
        assert torch.allclose(got[i], TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2), atol=1e-5)
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    aug = data.BatchAugment("cytology-C", s, 3)  # the elastic field on an uncropped, unflipped image
    q = _whole_crop(aug.sample(torch.Generator().manual_seed(2), n, s), n, s)
    q["hflip"], q["vflip"] = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    got = aug.apply(x, q) * std + mean
    for i in range(n):
        ref = TF.elastic(x[i], q["elastic"][i:i + 1].permute(0, 2, 3, 1))
        assert torch.allclose(got[i, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-5)
    aug = data.BatchAugment("xray", s, 1)  # rotation alone: no blur, jitter or erasing
    q = _whole_crop(aug.sample(torch.Generator().manual_seed(3), n, s), n, s)
    q["angle"] = torch.tensor([5.0, -8.0, 0.0, 10.0, -3.0, 7.0])
    off = torch.zeros(n, dtype=torch.bool)
    q["blur"], q["jitter"], q["erase"] = (off, q["blur"][1]), (off,) + q["jitter"][1:], (off,) + q["erase"][1:]
    got = aug.apply(x[:, :1], q)[:, :1] * data.IMAGENET_STD[0] + data.IMAGENET_MEAN[0]
    for i in range(n):
        ref = TF.rotate(x[i, :1], float(q["angle"][i]), interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(got[i, :, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5)


def test_batch_augment_affine_agrees_with_torchvision_and_options_are_opt_in():
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(0)
    n, s = 6, 48
    x = torch.rand(n, 1, s, s)
    aug = data.BatchAugment("convirt", s, 1)  # ConVIRT's affine alone: rotation, whole-pixel shift and scale
    q = _whole_crop(aug.sample(torch.Generator().manual_seed(3), n, s), n, s)
    off = torch.zeros(n, dtype=torch.bool)
    q["blur"], q["jitter"] = (off, q["blur"][1]), (off,) + q["jitter"][1:]
    assert q["hflip"] is None and q["shift"].abs().max() <= round(0.1 * s) and ((q["zoom"] - 1).abs() <= 0.05).all()
    got = aug.apply(x, q)[:, :1] * data.IMAGENET_STD[0] + data.IMAGENET_MEAN[0]
    for i in range(n):
        # torchvision's affine turns clockwise, rotate (and `angle` here) counter-clockwise; the draw is symmetric
        ref = TF.affine(x[i], angle=-float(q["angle"][i]), translate=q["shift"][i].int().tolist(), scale=float(q["zoom"][i]),
                        shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(got[i, :, 12:-12, 12:-12], ref[:, 12:-12, 12:-12], atol=1e-5)  # away from the fill's edge
    g = torch.Generator().manual_seed(0)
    assert data.BatchAugment("convirt", s, 1, hflip=True).sample(g, n, s)["hflip"] is not None
    assert data.BatchAugment("xray", s).sample(g, n, s)["chessboard"] is None  # the mask lowered both probes on val
    on, cells, phase = data.BatchAugment("xray-chessboard", s).sample(g, n, s)["chessboard"]
    assert ((2 <= cells) & (cells <= 8)).all() and set(phase.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        data.BatchAugment("cutmix", s)


@pytest.mark.parametrize("preset", ["xray", "convirt"])
def test_batch_augment_composed_geometry_agrees_with_torchvision(preset):
    # crop, flip and rotation (xray) or ConVIRT's affine, composed into one grid_sample, against torchvision's
    # resized_crop, horizontal_flip and rotate / affine one after the other with the same parameters. Two
    # bilinear resamplings are not one, so the image is smooth and the tolerance is that of interpolation.
    import torchvision.transforms.v2.functional as TF

    n, side, size = 6, 80, 64
    r, c = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    x = (0.5 + 0.25 * torch.sin(6 * r + 2 * c) + 0.2 * torch.cos(5 * c - 3 * r)).expand(n, 1, side, side).clone()
    aug = data.BatchAugment(preset, size, 1)
    q = aug.sample(torch.Generator().manual_seed(4), n, side)
    off = torch.zeros(n, dtype=torch.bool)
    q["blur"], q["jitter"] = (off, q["blur"][1]), (off,) + q["jitter"][1:]
    if preset == "xray":
        q["erase"] = (off,) + q["erase"][1:]
        q["angle"] = torch.tensor([7.0, -9.0, 3.0, 0.0, 10.0, -4.0])
    q["hflip"] = torch.tensor([True, False, True, True, False, True])
    got = aug.apply(x, q)[:, :1] * data.IMAGENET_STD[0] + data.IMAGENET_MEAN[0]
    top, left, h, w = (t.int().tolist() for t in q["crop"])
    for i in range(n):
        ref = TF.resized_crop(x[i], top[i], left[i], h[i], w[i], [size, size], antialias=False)
        ref = TF.horizontal_flip(ref) if q["hflip"][i] else ref
        if preset == "xray":
            ref = TF.rotate(ref, float(q["angle"][i]), interpolation=TF.InterpolationMode.BILINEAR)
        else:  # torchvision's affine turns clockwise, `angle` counter-clockwise
            ref = TF.affine(ref, angle=-float(q["angle"][i]), translate=q["shift"][i].int().tolist(),
                            scale=float(q["zoom"][i]), shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
        inner = (slice(None), slice(14, -14), slice(14, -14))  # away from the rotated crop's black corners
        assert (got[i][inner] - ref[inner]).abs().max() < 0.03, (preset, i)
        assert (got[i][inner] - ref[inner]).abs().mean() < 0.005, (preset, i)


def test_chessboard_hides_alternate_cells():
    aug = data.BatchAugment("xray-chessboard", 8, 1)
    q = _whole_crop(aug.sample(torch.Generator().manual_seed(0), 2, 8), 2, 8)
    off = torch.zeros(2, dtype=torch.bool)
    q["angle"], q["blur"], q["erase"] = torch.zeros(2), (off, q["blur"][1]), (off,) + q["erase"][1:]
    q["jitter"] = (off,) + q["jitter"][1:]
    q["chessboard"] = (torch.ones(2, dtype=torch.bool), torch.tensor([2, 4]), torch.tensor([0, 1]))
    y = aug.apply(torch.ones(2, 1, 8, 8), q)[:, 0] * data.IMAGENET_STD[0] + data.IMAGENET_MEAN[0]
    hidden = y.abs() < 1e-5
    assert hidden.sum((1, 2)).tolist() == [32, 32]  # half of each image
    assert hidden[0, :4, :4].all() and not hidden[0, :4, 4:].any()  # 2 x 2 cells, phase 0: the top-left one hidden
    assert not hidden[1, :2, :2].any() and hidden[1, :2, 2:4].all()  # 4 x 4 cells, phase 1: the top-left one shown


def test_epoch_generator_is_a_function_of_seed_epoch_and_rank():
    draw = lambda *key: torch.rand(4, generator=data.epoch_generator("cpu", *key))  # noqa: E731
    assert torch.equal(draw(0, 3, 0), draw(0, 3, 0))
    assert len({tuple(draw(*k).tolist()) for k in [(0, 3, 0), (0, 3, 1), (0, 4, 0), (1, 3, 0)]}) == 4


def test_uint8_reads_match_the_float_reads(tmp_path, demo):
    paths = data.demo_images("xray")[:3]
    for cache in (str(tmp_path / "c"), None):
        f = data.ImageDataset(paths, size=data.train_side(16), cache_dir=cache)
        u = data.ImageDataset(paths, size=data.train_side(16), cache_dir=cache, uint8=True)
        for i in range(3):
            assert u[i][0].dtype == torch.uint8 and u[i][0].shape == (1, 19, 19)
            assert (u[i][0].float() / 255 - f[i][0]).abs().max() <= 0.5 / 255 + 1e-6
