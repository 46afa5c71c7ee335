"""How data.BatchAugment draws its parameters, preset by preset, held to torchvision's own get_params.

The application of each operation is held to torchvision image by image in test_data.py; here the
draws: the distribution of every parameter (two-sample Kolmogorov-Smirnov test against the same number
of torchvision draws) and the probability of every operation (within 4.5 binomial standard deviations),
with fixed seeds, so a run passes or fails the same way every time. A correct draw fails a KS check at
p < 1e-5 with that probability; each of the wrong draws these tests were written against (rotation always
on, blur sigma from 0.1-5, one jitter order for the batch, blur at p 0.9 / 0.1, erasing at p 0.9) fails
far below it."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from scipy.stats import chisquare, ks_2samp

import data

N, SIZE = 3000, 32
SIDE = data.train_side(SIZE)
# the probability of each operation, from each preset's definition (data.BatchAugment's docstring)
SPEC = {
    "xray": {"angle": 0.5, "blur": 0.3, "jitter": 1.0, "erase": 0.3},
    "xray-chessboard": {"angle": 0.5, "blur": 0.3, "jitter": 1.0, "erase": 0.3, "chessboard": 0.3},
    "cytology-A": {"hflip": 0.5, "vflip": 0.5},
    "cytology-B": {"hflip": 0.5, "vflip": 0.5, "jitter": 0.8, "equalize": 0.3},
    "cytology-C": {"hflip": 0.5, "vflip": 0.5, "elastic": 0.7},
    "cytology-D": {"hflip": 0.5, "vflip": 0.5, "blur": 0.5, "noise": 0.5},
    "cytology-E": {"hflip": 0.5, "vflip": 0.5, "blur": 0.5},
    "simclr": {"hflip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": 0.5},
    "convirt": {"blur": 1.0, "jitter": 1.0},
}
CROP = {"xray": ((0.6, 1.0), (0.85, 1.15)), "simclr": ((0.08, 1.0), (3 / 4, 4 / 3)),
        "convirt": ((0.6, 1.0), (3 / 4, 4 / 3))}
JITTER = {"xray": (0.3, 0.3, 0, 0), "cytology-B": (0.4, 0.4, 0.4, 0.1), "simclr": (0.8, 0.8, 0.8, 0.2),
          "convirt": (0.4, 0.4, 0, 0)}


def same_distribution(ours, theirs, what):
    ours, theirs = np.asarray(ours, np.float64).ravel(), np.asarray(theirs, np.float64).ravel()
    p = ks_2samp(ours, theirs).pvalue
    assert p > 1e-5, (f"{what}: not torchvision's distribution (KS p = {p:.2e}; mean {ours.mean():.4g} vs "
                      f"{theirs.mean():.4g}, range [{ours.min():.4g}, {ours.max():.4g}] vs "
                      f"[{theirs.min():.4g}, {theirs.max():.4g}])")


def rate(flags, p, what):
    flags = np.asarray(flags, bool)
    got, bound = flags.mean(), 4.5 * math.sqrt(p * (1 - p) / len(flags)) + 1e-12
    assert abs(got - p) <= bound, f"{what}: applied to {got:.3f} of the images, the preset says {p}"


def draws(preset):
    colour = preset.startswith("cytology") or preset == "simclr"
    aug = data.BatchAugment(preset, SIZE, 3 if colour else 1)
    return aug.sample(torch.Generator().manual_seed(0), N, SIDE)


@pytest.mark.parametrize("preset", data.PRESETS + ["convirt"])
def test_every_parameter_is_drawn_as_torchvisions(preset):
    torch.manual_seed(1)  # torchvision's get_params draw from the global generator
    q, spec = draws(preset), SPEC[preset]
    # RandomResizedCrop, with its ten tries and its fallback
    scale, ratio = CROP.get("xray" if preset.startswith("xray") else preset, ((0.5, 1.0), (3 / 4, 4 / 3)))
    img = torch.zeros(1, SIDE, SIDE)
    ref = np.asarray([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(N)])
    for k, name in enumerate(("top", "left", "height", "width")):
        same_distribution(q["crop"][k].numpy(), ref[:, k], f"{preset} crop {name}")
    # flips, and the probability of every operation the preset has (none it does not have)
    on = {"hflip": q["hflip"], "vflip": q["vflip"], "angle": None if q["angle"] is None else q["angle"] != 0,
          "blur": None if q["blur"] is None else q["blur"][0], "jitter": None if q["jitter"] is None else q["jitter"][0],
          "erase": None if q["erase"] is None else q["erase"][0], "equalize": q["equalize"], "gray": q["gray"],
          "noise": None if q["noise"] is None else q["noise"][0],
          "chessboard": None if q["chessboard"] is None else q["chessboard"][0],
          "elastic": None if q["elastic"] is None else q["elastic"].flatten(1).abs().amax(1) > 0}
    if preset == "convirt":  # ConVIRT's affine is always on: its angle is never exactly 0
        on["angle"] = None
    assert {k for k, v in on.items() if v is not None} == set(spec), preset
    for k, p in spec.items():
        rate(on[k].numpy(), p, f"{preset} {k}")
    # RandomRotation (the X-ray study's +-10 deg, when applied) and ConVIRT's RandomAffine
    if preset.startswith("xray"):
        applied = q["angle"][q["angle"] != 0].numpy()
        same_distribution(applied, [T.RandomRotation.get_params([-10, 10]) for _ in range(len(applied))],
                          f"{preset} rotation angle")
    if preset == "convirt":
        ref = [T.RandomAffine.get_params([-20, 20], [0.1, 0.1], [0.95, 1.05], None, [SIZE, SIZE]) for _ in range(N)]
        same_distribution(q["angle"].numpy(), [r[0] for r in ref], "convirt affine angle")
        for k in range(2):
            same_distribution(q["shift"][:, k].numpy(), [r[1][k] for r in ref], f"convirt affine shift {k}")
        same_distribution(q["zoom"].numpy(), [r[2] for r in ref], "convirt affine scale")
    # GaussianBlur's sigma (ConVIRT's 0.1-3 is for 224 px: scaled with the side)
    if q["blur"] is not None:
        lo, hi = (0.1 * SIZE / 224, 3.0 * SIZE / 224) if preset == "convirt" else (0.1, 2.0)
        same_distribution(q["blur"][1].numpy(), [T.GaussianBlur.get_params(lo, hi) for _ in range(N)],
                          f"{preset} blur sigma")
    # ColorJitter: each factor, and an order of its four operations drawn per image (a uniform permutation)
    if q["jitter"] is not None:
        b, c, s, h = JITTER["xray" if preset.startswith("xray") else preset]
        colour = preset.startswith("cytology") or preset == "simclr"
        s, h = (s, h) if colour else (0, 0)
        rng = lambda a: [max(0, 1 - a), 1 + a] if a else None  # noqa: E731
        ref = [T.ColorJitter.get_params(rng(b), rng(c), rng(s), [-h, h] if h else None) for _ in range(N)]
        for k, name in enumerate(("brightness", "contrast", "saturation", "hue")):
            ours = q["jitter"][1][k]
            assert (ours is None) == (ref[0][k + 1] is None), f"{preset} jitter {name}"
            if ours is not None:
                same_distribution(ours.numpy(), [r[k + 1] for r in ref], f"{preset} jitter {name}")
        perms = {p: i for i, p in enumerate(__import__("itertools").permutations(range(4)))}
        counts = np.bincount([perms[tuple(o)] for o in q["jitter"][2].tolist()], minlength=24)
        assert chisquare(counts).pvalue > 1e-5, f"{preset}: the jitter orders are not uniform per image: {counts}"
    # RandomErasing (the X-ray study's scale 0.02-0.1, ratio 0.3-3.3), on the crop
    if q["erase"] is not None:
        img = torch.zeros(1, SIZE, SIZE)
        ref = np.asarray([T.RandomErasing.get_params(img, (0.02, 0.1), (0.3, 3.3), [0])[:4] for _ in range(N)])
        for k, name in enumerate(("top", "left", "height", "width")):
            same_distribution(q["erase"][k + 1].numpy(), ref[:, k], f"{preset} erasing {name}")
    # ElasticTransform(alpha 20, sigma 6): the displacement field where it is applied
    if q["elastic"] is not None:
        applied = q["elastic"][on["elastic"]][:60].permute(0, 2, 3, 1)
        ref = torch.cat([T.ElasticTransform.get_params([20.0, 20.0], [6.0, 6.0], [SIZE, SIZE]) for _ in range(60)])
        pick = torch.randperm(SIZE * SIZE)[:40]  # a few pixels of each field: neighbours are correlated
        same_distribution(applied.flatten(1, 2)[:, pick], ref.flatten(1, 2)[:, pick], "cytology-C elastic field")
    if q["noise"] is not None:  # speckle x (1 + sigma n): sigma uniform in 0.05-0.2, n standard normal
        same_distribution(q["noise"][1].numpy(), np.random.default_rng(0).uniform(0.05, 0.2, N), "speckle sigma")
        same_distribution(q["noise"][2][:50, 0, 0, :].numpy(), np.random.default_rng(0).standard_normal(50 * SIZE),
                          "speckle noise")
    if q["chessboard"] is not None:
        same_distribution(q["chessboard"][1].numpy(), np.random.default_rng(0).integers(2, 9, N), "chessboard cells")


def test_boxes_follow_torchvisions_conventions():
    # RandomResizedCrop: w = sqrt(area * ratio); RandomErasing: h = sqrt(area * ratio). With ratios above 1
    # every crop is wider than high and every erased box higher than wide, as torchvision's get_params draw.
    g = torch.Generator().manual_seed(0)
    _, _, h, w, _ = data._boxes(g, 500, 64, 64, (0.02, 0.2), (2.0, 3.0))
    assert (w > h).all()
    _, _, h, w, found = data._boxes(g, 500, 64, 64, (0.02, 0.2), (2.0, 3.0), erase=True)
    assert found.all() and (h > w).all()
    img = torch.zeros(1, 64, 64)  # torchvision's own draws, for the record: the same conventions
    assert all(bh > bw for _, _, bh, bw, _ in (T.RandomErasing.get_params(img, (0.02, 0.2), (2.0, 3.0), [0])
                                               for _ in range(200)))
    assert all(bw > bh for _, _, bh, bw in (T.RandomResizedCrop.get_params(img, [0.02, 0.2], [2.0, 3.0])
                                            for _ in range(200)))
