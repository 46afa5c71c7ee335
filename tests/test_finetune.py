"""finetune.py: metrics against scikit-learn, checkpoint loading from every pretraining script, frozen
vs trained encoders, aggregation and tables, Grad-CAM, clustering, and the script end to end."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from sklearn.metrics import f1_score, roc_auc_score

import data
import finetune
from conftest import run_script, usage_error


# ---------------------------------------------------------------------------------- metrics

def test_binary_metrics_match_sklearn():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.6, 0.4, 0.9, 0.2, 0.7])
    m = finetune.metrics("binary", y, s, thresholds=0.5)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["f1"] == pytest.approx(f1_score(y, s >= 0.5))
    # threshold chosen by F1: at 0.4 the positives 0.4, 0.7, 0.9 are all found and one negative (0.6)
    # slips in: precision 3/4, recall 1, F1 = 6/7 = 0.857, the best of all thresholds
    assert finetune.best_f1_threshold(y, s) == pytest.approx(0.4)
    assert finetune.metrics("binary", y, s, 0.4)["f1"] == pytest.approx(6 / 7)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    s = rng.dirichlet([1, 1, 1], size=10)
    m = finetune.metrics("multiclass", y, s)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s, multi_class="ovr", average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, s.argmax(1), average="macro"))


def test_multilabel_class_without_positives_is_reported_not_a_crash():
    y = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]])
    s = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.7, 0.2, 0.6], [0.1, 0.4, 0.3]])
    m = finetune.metrics("multilabel", y, s, thresholds=[0.5, 0.5, 0.5])
    assert m["per_class_auc"][1] is None  # no positive for class 1: no AUC, said so
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, 0], s[:, 0]), roc_auc_score(y[:, 2], s[:, 2])]))
    masked = finetune.metrics("multilabel", y, s, [0.5] * 3, mask=np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]]))
    assert masked["per_class_auc"][2] == pytest.approx(roc_auc_score(y[[0, 1, 3], 2], s[[0, 1, 3], 2]))


def test_summarize_and_table_shape():
    assert finetune.summarize([0.5, 0.7]) == "0.60±0.10"
    assert finetune.summarize([0.5]) == "0.50" and finetune.summarize([None]) == "-"
    cells = [{"method": m, "mode": "linear", "fraction": f, "seed": s, "f1": 0.5, "auc": 0.6}
             for m in ("random", "convirt") for f in (0.01, 1.0) for s in (0, 1)]
    t = finetune.results_table(cells, ["random", "convirt"], [0.01, 1.0])
    rows = [line for line in t.splitlines() if line.startswith("| ")]
    assert rows[0] == "| Method | 1 % | 100 % |" and len(rows) == 3
    assert rows[2] == "| convirt | 0.50±0.00 / 0.60±0.00 | 0.50±0.00 / 0.60±0.00 |"


def test_cluster_scores_on_known_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 10
    y = np.repeat(np.arange(4), 30)
    f = centres[y] + rng.normal(0, 0.3, (120, 4))
    s = finetune.cluster_scores(f, y)
    assert s["kmeans"]["nmi"] > 0.95 and s["kmeans"]["ari"] > 0.95 and s["kmeans"]["silhouette"] > 0.5


def test_effective_rank_hand_worked():
    # Columns of a 4x4 Hadamard matrix without the constant one: zero mean, orthogonal, equal norm, so
    # after standardising the three singular-value energies are equal, p = (1/3, 1/3, 1/3): rank 3.
    h = np.array([[1, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], float)
    assert finetune.effective_rank(h) == pytest.approx(3.0)
    # Scaling a column or adding a constant column changes nothing (standardised; constants dropped).
    assert finetune.effective_rank(np.c_[5 * h[:, :1], h[:, 1:], np.ones(4)]) == pytest.approx(3.0)
    # Columns (a, a, b): energies 2n and n, p = (2/3, 1/3),
    # exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = exp(0.27031 + 0.36620) = exp(0.63651) = 1.8899.
    assert finetune.effective_rank(h[:, [0, 0, 1]]) == pytest.approx(1.8899, abs=1e-4)
    # One direction only: rank 1, whatever the width.
    assert finetune.effective_rank(np.outer(h[:, 0], [1, -2, 3, 0.5])) == pytest.approx(1.0)


def test_grad_cam_shape_and_range():
    enc, dim = data.image_encoder("resnet18", "none")
    net = nn.Sequential(enc, nn.Linear(dim, 3)).eval()
    x = torch.randn(2, 3, 64, 64)
    cam = finetune.grad_cam(net, finetune.last_conv_block(enc), x, torch.tensor([0, 2]))
    assert cam.shape == (2, 64, 64) and cam.min() >= 0 and cam.max() <= 1 + 1e-6


# ---------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="session")
def checkpoints(demo, tmp_path_factory):
    """One tiny checkpoint from each pretraining script (one step, 32-pixel images; the image-only
    scripts at lr 1e-12, so their encoders are still their initial weights)."""
    root = tmp_path_factory.mktemp("ckpts")
    small = ["--size", "32", "--batch-size", "16", "--workers", "0", "--epochs", "1", "--max-steps", "1"]
    out = {}
    for script, extra in (("convirt.py", ["--eval-every", "0"]),
                          ("simclr.py", ["--knn-every", "0", "--proj-hidden", "32", "--lr", "1e-12"]),
                          ("byol.py", ["--knn-every", "0", "--proj-hidden", "32", "--lr", "1e-12"]),
                          ("barlow.py", ["--knn-every", "0", "--projector", "32-32", "--lr", "1e-12"])):
        run_script(script, *small, *extra, "--out", root / script[:-3])
        out[script[:-3]] = root / script[:-3] / "checkpoint.pt"
    return out


@pytest.mark.parametrize("method,prefix", [("convirt", "image_encoder."), ("simclr", "encoder."), ("byol", "encoder."),
                                           ("barlow", "encoder.")])
def test_every_pretraining_checkpoint_loads_with_the_same_features(checkpoints, method, prefix):
    ck = torch.load(checkpoints[method], weights_only=False)
    in_memory = torchvision.models.resnet18()
    in_memory.fc = nn.Identity()
    in_memory.load_state_dict({k[len(prefix):]: v for k, v in ck["model"].items() if k.startswith(prefix)})
    loaded, dim = finetune.load_encoder(str(checkpoints[method]), "resnet18")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), in_memory.eval()(x), atol=1e-6) and dim == 512


@pytest.mark.parametrize("method", ["simclr", "byol", "barlow"])
def test_random_row_is_the_initial_weights_of_a_seed_0_run(checkpoints, method):
    # The baseline a pretraining run must beat is the same encoder with random weights. finetune.py's
    # --init random row builds its encoder right after torch.manual_seed(0) (the first probe seed), as
    # these scripts do at their default --seed 0, so the row is exactly where their runs start.
    # (convirt.py builds the demo BERT first: its image encoder is another draw.)
    torch.manual_seed(0)
    fresh, _ = data.image_encoder("resnet18", "none")
    encoder = torch.load(checkpoints[method], weights_only=False)["encoder"]
    for name, w in fresh.named_parameters():  # parameters: the one step moved BatchNorm's running statistics
        assert torch.allclose(encoder[name], w, rtol=0, atol=1e-9), name


def test_checkpoint_errors(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="expected a resnet50 encoder \\(--arch\\), found a resnet18 encoder"):
        finetune.load_encoder(str(checkpoints["simclr"]), "resnet50")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of convirt.py, simclr.py, byol.py or barlow.py"):
        finetune.load_encoder(str(tmp_path / "other.pt"), "resnet18")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        finetune.load_encoder(str(tmp_path / "none.pt"), "resnet18")


def _watch_encoder(monkeypatch):
    """Make load_encoder hand out one encoder object we keep, with a copy of its starting weights."""
    enc, dim = data.image_encoder("resnet18", "none")
    start = {k: v.clone() for k, v in enc.state_dict().items()}
    monkeypatch.setattr(finetune, "load_encoder", lambda path, arch: (enc, dim))
    return enc, start


def test_linear_mode_keeps_the_encoder_frozen(checkpoints, monkeypatch, tmp_path):
    enc, start = _watch_encoder(monkeypatch)
    finetune.main(["--ckpt", str(checkpoints["simclr"]), "--mode", "linear", "--fractions", "1.0", "--size", "32",
                   "--workers", "0", "--out", str(tmp_path / "lin")])
    assert all(torch.equal(start[k], v) for k, v in enc.state_dict().items())


def test_finetune_mode_trains_the_encoder(checkpoints, monkeypatch, tmp_path):
    enc, start = _watch_encoder(monkeypatch)
    finetune.main(["--ckpt", str(checkpoints["simclr"]), "--mode", "finetune", "--fractions", "0.1", "--size", "32",
                   "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "ft")])
    assert not torch.equal(start["conv1.weight"], enc.state_dict()["conv1.weight"])


# ---------------------------------------------------------------------------------- the script

def test_smoke_both_modes_figures_and_resume(checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--task", "folder", "--ckpt", f"barlow={checkpoints['barlow']}", "--init", "random", "--mode", "linear",
            "finetune", "--fractions", "0.1", "1.0", "--seeds", "0", "--size", "32", "--epochs", "1",
            "--workers", "0", "--embed", "--gradcam", "1", "--bootstrap", "50", "--out", out]
    p = run_script("finetune.py", *args)
    assert "| barlow |" in p.stdout
    res = json.loads((out / "results.json").read_text())
    assert len(res) == 2 * 2 * 2  # rows x modes x fractions
    ntrain = {(c["fraction"]): c["n_train"] for c in res}
    assert ntrain[0.1] < ntrain[1.0] and ntrain[0.1] >= 7  # at least one per class of 7
    for f in ("results.md", "results.csv", "roc.png", "auc_vs_fraction.png", "tsne-barlow.png", "gradcam-barlow-linear.png",
              "class-similarity-random.png", "embed-barlow.json"):
        assert (out / f).is_file(), f
    md = (out / "results.md").read_text()
    assert " [" in md and "### linear" in md and "### finetune" in md  # a bootstrap interval in each cell
    # a second call refuses to overwrite; --resume finds every cell done and only rewrites the tables (these
    # calls in process: the first one above is the user's)
    args = [str(a) for a in args]
    with pytest.raises((SystemExit, ValueError)):
        finetune.main(args)
    capsys.readouterr()
    finetune.main(args + ["--resume"])
    assert "seed 0:" not in capsys.readouterr().out and len(json.loads((out / "results.json").read_text())) == 8
    # other weights under the same name (another file, then the same file re-written): the barlow cells,
    # and only those (2 modes x 2 fractions), are evaluated again
    other = tmp_path / "barlow-retrained.pt"
    shutil.copyfile(checkpoints["barlow"], other)
    args[args.index(f"barlow={checkpoints['barlow']}")] = f"barlow={other}"
    for _ in range(2):
        finetune.main(args + ["--resume"])
        stdout = capsys.readouterr().out
        assert "4 cell(s) of ['barlow'] came from other weights" in stdout
        assert stdout.count("seed 0:") == 4 and len(json.loads((out / "results.json").read_text())) == 8
        os.utime(other, ns=(other.stat().st_atime_ns, other.stat().st_mtime_ns + 10**9))  # as if re-trained


def test_knn_and_zeroshot_modes(checkpoints, tmp_path, capsys):
    # the weighted kNN trains nothing; zero-shot scores by prompts, one cell at 0 % of the labels, its prompt set
    # chosen on val among "prompt 1", "prompt 2" (each list's i-th) and their "ensemble"; a row without a text
    # tower is skipped with one line, and a table of such rows only is refused
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"pneumonia": {"pos": ["pneumonia", "Findings concerning for pneumonia."],
                                                 "neg": ["no pneumonia", "The lungs are clear."]}}))
    out = tmp_path / "zs"
    p = run_script("finetune.py", "--ckpt", f"convirt={checkpoints['convirt']}", "--ckpt", f"simclr={checkpoints['simclr']}",
                   "--mode", "knn", "zeroshot", "--prompts", prompts, "--fractions", "0.1", "--size", "32",
                   "--workers", "0", "--bootstrap", "20", "--out", out)
    res = json.loads((out / "results.json").read_text())
    zs = [c for c in res if c["mode"] == "zeroshot"]
    assert len(zs) == 1 and (zs[0]["method"], zs[0]["fraction"], zs[0]["n_train"]) == ("convirt", 0.0, 0)
    auc = zs[0]["prompts_val_auc"]
    assert set(auc) == {"ensemble", "prompt 1", "prompt 2"} and auc[zs[0]["prompts"]] == max(auc.values())
    assert sorted(c["method"] for c in res if c["mode"] == "knn") == ["convirt", "simclr"]
    assert all(c["n_train"] == 36 and c["auc"] is not None for c in res if c["mode"] == "knn")  # 10 % of 360
    assert "simclr: zero-shot needs a convirt.py checkpoint" in p.stdout
    assert "| Method | 0 % |" in (out / "results.md").read_text()
    # the cell records its prompts; --resume keeps it while they are the same and recomputes it when they change
    import hashlib

    sha = hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert (zs[0]["prompts_file"], zs[0]["prompts_sha256"]) == (str(prompts), sha)
    args = [str(a) for a in p.args[2:]] + ["--resume"]
    finetune.main(args)
    assert "seed 0:" not in capsys.readouterr().out
    prompts.write_text(json.dumps({"pneumonia": {"pos": ["pneumonia"], "neg": ["The lungs are clear."]}}))
    finetune.main(args)
    stdout = capsys.readouterr().out
    assert "1 cell(s) of ['convirt'] came from other weights, another --score or other prompts" in stdout
    assert stdout.count("seed 0:") == 1 and "(prompts: default)" in stdout
    zs = [c for c in json.loads((out / "results.json").read_text()) if c["mode"] == "zeroshot"]
    assert len(zs) == 1 and zs[0]["prompts_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    with pytest.raises((SystemExit, ValueError), match="--mode zeroshot needs a convirt.py checkpoint"):
        finetune.main(["--ckpt", str(checkpoints["simclr"]), "--mode", "zeroshot", "--size", "32",
                       "--out", str(tmp_path / "no")])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"pneumonia": ["a list where a pos / neg pair belongs"]}))
    with pytest.raises((SystemExit, ValueError), match=r"'pneumonia' needs \{"):
        finetune.main(["--ckpt", str(checkpoints["convirt"]), "--mode", "zeroshot", "--prompts", str(wrong),
                       "--size", "32", "--out", str(tmp_path / "w")])


def test_zero_shot_pair_score_golden(capsys):
    # CheXzero's rule on 2-D embeddings, tau = 0.1. Image u = (1, 0). Positive prompts "a" = (1, 0) and "b" = (0, 1):
    # their mean (0.5, 0.5) renormalised is (0.7071, 0.7071), so s_pos = 0.7071; negative "c" = (0, 1): s_neg = 0.
    # p = sigmoid((0.7071 - 0) / 0.1) = sigmoid(7.071) = 0.999151. Image (0, 1): s_pos 0.7071, s_neg 1,
    # p = sigmoid(-2.929) = 1 / (1 + 18.71) = 0.050742. Multi-class, classes "a" and "c", image (0.6, 0.8):
    # softmax(0.6 / 0.1, 0.8 / 0.1) = softmax(6, 8) = (1 / (1 + e^2), 1 / (1 + e^-2)) = (0.119203, 0.880797)
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.0, 1.0]}
    model = type("Fake", (), {"temperature": 0.1, "encode_text": lambda self, t: torch.tensor([table[x] for x in t])})()
    p = finetune.zero_shot(model, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), {"x": {"pos": ["a", "b"], "neg": ["c"]}},
                           "binary")
    assert p.tolist() == pytest.approx([0.999151, 0.050742], abs=1e-6)
    p = finetune.zero_shot(model, torch.tensor([[0.6, 0.8]]), {"one": ["a"], "two": ["c"]}, "multiclass")
    assert p[0].tolist() == pytest.approx([0.119203, 0.880797], abs=1e-6)
    # default prompts: "{label}" / "no {label}" in lower case; "No Finding" is not negated with "no" (and it is said)
    sets = finetune.prompt_sets(["No Finding", "Pleural Effusion"], "multilabel")
    assert sets == {"default": {"No Finding": {"pos": ["no finding"], "neg": ["finding"]},
                                "Pleural Effusion": {"pos": ["pleural effusion"], "neg": ["no pleural effusion"]}}}
    assert "'No Finding' cannot be negated" in capsys.readouterr().out
    assert finetune.prompt_sets(["no pneumonia", "pneumonia"], "binary") == {
        "default": {"pneumonia": {"pos": ["pneumonia"], "neg": ["no pneumonia"]}}}
    assert finetune.prompt_sets(["normal_columnar", "carcinoma_in_situ"], "multiclass") == {
        "default": {"normal_columnar": ["normal columnar"], "carcinoma_in_situ": ["carcinoma in situ"]}}


def test_multilabel_chexpert_demo(tmp_path, demo):
    p = run_script("finetune.py", "--task", "chexpert", "--init", "random", "--fractions", "1.0", "--size", "32",
                   "--workers", "0", "--uncertainty", "ignore", "--bootstrap", "50", "--out", tmp_path / "cx")
    res = json.loads((tmp_path / "cx" / "results.json").read_text())
    assert res[0]["auc"] is not None and len(res[0]["per_class_auc"]) >= 4 and "| random |" in p.stdout
    # CheXpert's own figure beside the mean over every observation scored: the 5 competition observations' mean
    assert 0 < res[0]["auc_5"] <= 1


def test_clear_errors(tmp_path, demo, capsys):
    assert "at least one --ckpt or --init" in usage_error(finetune.get_args, ["--task", "rsna"], capsys)
    csv = tmp_path / "l.csv"
    csv.write_text("path,diagnosis\na.png,x\n")
    p = run_script("finetune.py", "--task", "csv", "--data", csv, "--init", "random", "--out", tmp_path / "r", check=False)
    assert p.returncode != 0 and "missing column(s) ['label']" in p.stderr and "Traceback" not in p.stderr
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    import shutil

    for i, src in enumerate(sorted((demo / "cytology" / "normal_columnar").iterdir())[:4]):
        shutil.copy(src, one / "only" / f"{i}.png")
    p = run_script("finetune.py", "--task", "folder", "--data", one, "--init", "random", "--out", tmp_path / "r2", check=False)
    assert p.returncode != 0 and "needs at least two class folders, found ['only']" in p.stderr


def test_size_defaults_to_224_with_real_data():
    # pretraining switches to 224 px with --data; the evaluation used to stay at the demo's 64
    assert finetune.get_args(["--init", "random"]).size == 64
    assert finetune.get_args(["--init", "random", "--data", "/data/rsna"]).size == 224
    assert finetune.get_args(["--init", "random", "--data", "/data/rsna", "--size", "96"]).size == 96


# --------------------------------------------------------------- an honest protocol: splits and intervals

@pytest.mark.parametrize("task", [["--task", "rsna"], ["--task", "chexpert"], ["--task", "folder"],
                                  ["--task", "folder", "--grouping", "herlev-2class"]])
def test_demo_pretraining_never_sees_an_evaluation_val_or_test_image(task, demo):
    # What each script pretrains on at its demo defaults (simclr / byol: demo_images("xray"), with
    # --demo cytology demo_images("cytology"); barlow: demo_images("cytology"); convirt: the pairs'
    # train split) and what the kNN monitors read, against finetune.py's val and test images of every
    # demo task. barlow.py used to pretrain on all 280 cytology images, the ones finetune.py tests on.
    import data

    args = finetune.get_args(["--init", "random", *task])
    paths, labels, _, _, ids, kind = finetune.load_task(args)
    tr, va, te, _, _ = finetune.make_split(args, paths, ids, labels, kind)
    held_out = {os.path.realpath(paths[i]) for i in np.concatenate([va, te])}
    pretraining = {"xray": data.demo_images("xray"), "cytology": data.demo_images("cytology"),
                   "convirt": data.demo_pairs(split="train")[0]}
    for name, images in pretraining.items():
        assert not held_out & {os.path.realpath(p) for p in images}, name
    assert len(pretraining["cytology"]) == 168 and len(pretraining["xray"]) == 192
    if "chexpert" in task:  # the demo's default is MIMIC's split file, the same as naming it with --split-csv
        named = finetune.get_args(["--init", "random", *task, "--split-csv", str(demo / "mimic" / "mimic-cxr-2.0.0-split.csv")])
        parts = finetune.make_split(named, paths, ids, labels, kind)[:3]
        assert all(np.array_equal(a, b) for a, b in zip(parts, (tr, va, te))) and (len(tr), len(va), len(te)) == (192, 48, 80)
    tested = {os.path.realpath(paths[i]) for i in te}
    for monitor in ("rsna", "cytology"):  # the kNN monitors may read val, never test
        assert not tested & {os.path.realpath(p) for p in data.demo_labelled(monitor, without_test=True)[0]}


def test_rank_auc_hand_worked_and_against_sklearn():
    # y = 0 1 0 1, s = .5 .5 .2 .9: of the 4 (positive, negative) pairs, (.5, .5) is a tie (1/2) and
    # (.5, .2), (.9, .5), (.9, .2) are ordered (1 each): AUC = 3.5 / 4 = 0.875
    assert finetune.rank_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == 0.875
    assert finetune.rank_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 300), rng.integers(0, 20, 300) / 20  # many ties
    assert abs(finetune.rank_auc(y, s) - roc_auc_score(y, s)) < 1e-12


def test_bootstrap_interval_pairs_resamples_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1.0, 200)
    a1, f1 = finetune.bootstrap("binary", y, s, 0.5, n=300)
    a2, _ = finetune.bootstrap("binary", y, s + 5, 5.5, n=300)  # a shifted score and threshold: the same resamples
    assert a1 == a2 and len(a1) == 300
    lo, hi = finetune.interval([a1])
    point = finetune.metrics("binary", y, s, 0.5)
    assert lo < point["auc"] < hi and hi - lo < 0.2
    f_lo, f_hi = finetune.interval([f1])
    assert f_lo < point["f1"] < f_hi
    perfect = finetune.bootstrap("multiclass", np.arange(200) % 3, np.eye(3)[np.arange(200) % 3], "argmax", n=50)
    assert finetune.interval([perfect[0]]) == [1.0, 1.0] and finetune.interval([perfect[1]]) == [1.0, 1.0]
    # over seeds, the interval is of the seeds' mean, resample by resample
    assert finetune.interval([[0.6, 0.8], [0.8, 0.6]]) == [0.7, 0.7]


def test_split_file_round_trip_hash_and_errors(tmp_path, demo):
    base = ["--init", "random", "--fractions", "0.1", "1.0", "--size", "32", "--workers", "0", "--bootstrap", "100"]
    finetune.main([*base, "--out", str(tmp_path / "a")])
    rec = json.loads((tmp_path / "a" / "split.json").read_text())
    assert rec["scored"] == "test" and rec["sha256"] == finetune.split_hash(rec)
    assert sum(map(len, rec["patients"].values())) == 600 and set(rec["fractions"]) == {"0.1/0", "1/0"}
    assert rec["sha256"][:16] in (tmp_path / "a" / "results.md").read_text()
    # another group: the file alone gives the same patients, the same label subsets, the same scores
    finetune.main([*base, "--split", str(tmp_path / "a" / "split.json"), "--out", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "split.json").read_text()) == rec
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert [(c["auc"], c["auc_ci"]) for c in ra] == [(c["auc"], c["auc_ci"]) for c in rb]
    assert all(c["auc_ci"][0] <= c["auc"] <= c["auc_ci"][1] for c in ra)
    edited = dict(rec, patients={**rec["patients"], "test": rec["patients"]["test"][1:]})
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="edited after it was written"):
        finetune.main([*base, "--split", str(tmp_path / "edited.json"), "--out", str(tmp_path / "c")])
    edited["sha256"] = finetune.split_hash(edited)  # consistent, but one patient is in no split
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="1 patient.* in none of its splits"):
        finetune.main([*base, "--split", str(tmp_path / "edited.json"), "--out", str(tmp_path / "d")])


def test_score_val_never_reads_the_test_split(tmp_path, demo, monkeypatch):
    # choosing settings: the train split is split again, val is scored, and no test image is loaded
    import data

    seen = []
    real_extract = finetune.extract
    monkeypatch.setattr(finetune, "extract", lambda enc, loader, *a: seen.extend(loader.dataset.indices) or real_extract(enc, loader, *a))
    args = ["--init", "random", "--fractions", "1.0", "--size", "32", "--workers", "0", "--bootstrap", "0"]
    finetune.main([*args, "--score", "val", "--out", str(tmp_path / "v")])
    paths, _, _, ids = data.demo_labelled("rsna")
    _, va, te = data.eval_split(ids)
    assert seen and not set(seen) & set(te.tolist()) and set(va.tolist()) <= set(seen)
    cell = json.loads((tmp_path / "v" / "results.json").read_text())[0]
    assert cell["scored"] == "val" and "val n = 120" in (tmp_path / "v" / "results.md").read_text()
    # a --resume under the other --score re-evaluates rather than mixing the two
    p = run_script("finetune.py", *args, "--out", tmp_path / "v", "--resume")
    assert "another --score or other prompts: re-evaluated" in p.stdout


# --------------------------------------------------------------- evaluation you can trust on real data sets

def test_bootstrap_resamples_patients_so_copies_of_a_patient_add_nothing():
    # 80 patients scored once, then each patient's score given on 2 and on 3 images (MIMIC's PA + lateral). Resampling
    # patients, a resample of the copied set is the same patients' images k times over: every (positive, negative) pair
    # counts k^2 times and every F1 count k times, so AUC and F1 are the single set's, and the draws depend on the
    # number of patients alone: the interval is exactly the same. Resampling images (the old bootstrap) it narrows,
    # about as 1 / sqrt(k) (0.18 -> 0.14 -> 0.12 here), with no new information.
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    s = y + rng.normal(0, 1.2, 80)
    one = finetune.interval([finetune.bootstrap("binary", y, s, 0.5, n=400, groups=np.arange(80))[0]])
    for k in (2, 3):
        yk, sk, patients = np.repeat(y, k), np.repeat(s, k), np.repeat(np.arange(80), k)
        auc, f1 = finetune.bootstrap("binary", yk, sk, 0.5, n=400, groups=patients)
        assert finetune.interval([auc]) == pytest.approx(one)
        assert f1 == pytest.approx(finetune.bootstrap("binary", y, s, 0.5, n=400, groups=np.arange(80))[1])
        by_image = finetune.interval([finetune.bootstrap("binary", yk, sk, 0.5, n=400)[0]])
        assert by_image[1] - by_image[0] < 0.85 * (one[1] - one[0])
    # one image per patient (RSNA): the patients' draws are the images' draws, whatever the ids
    ids = [f"p{i}" for i in range(80)]
    assert finetune.bootstrap("binary", y, s, 0.5, n=50, groups=ids) == finetune.bootstrap("binary", y, s, 0.5, n=50)


def test_knn_masked_neighbours_cast_no_vote_golden():
    # Bank A = (1, 0), B = (0.8, 0.6), C = (0.8, -0.6), query q = (1, 0): cosines 1, 0.8, 0.8, weights
    # exp((s - 1) / 0.07) = 1, e^-2.857143 = 0.057433, 0.057433 (k = 20 capped at the bank's 3).
    # label 0: A positive, B and C masked (uncertain): A alone votes, 1 * 1 / 1 = 1.0 (as negatives they gave
    #   1 / (1 + 2 * 0.057433) = 0.896969: --uncertainty ignore behaved as zeros)
    # label 1: A 0, B 1, C masked: 0.057433 / (1 + 0.057433) = 0.054313 (unmasked: 0.057433 / 1.114865 = 0.051515)
    # label 2: all three masked: nobody knows it, 0.5
    bank = np.array([[1, 0], [0.8, 0.6], [0.8, -0.6]], np.float32)
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1]], np.float32)
    m = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    score = finetune.knn_scorer(bank, y, "multilabel", 3, m)
    assert score(np.array([[1.0, 0.0]], np.float32))[0].tolist() == pytest.approx([1.0, 0.054313, 0.5], abs=1e-6)
    # without a mask every entry votes, as before
    assert finetune.knn_scorer(bank, y, "multilabel", 3)(np.array([[1.0, 0.0]], np.float32))[0, :2].tolist() == \
        pytest.approx([0.896969, 0.051515], abs=1e-6)
    # a query's masked label is not scored: the third query's label 0 (score 0.9, label 0) would break the order
    yq, sq = np.array([[1, 0], [0, 1], [0, 1]]), np.array([[0.8, 0.1], [0.2, 0.7], [0.9, 0.6]])
    mq = np.array([[1, 1], [1, 1], [0, 1]])
    assert finetune.metrics("multilabel", yq, sq, [0.5, 0.5], mq)["per_class_auc"][0] == 1.0


def test_a_label_a_split_cannot_score_is_said_and_left_out_of_every_mean():
    # observation b masked on every image (CheXpert's -1 under --uncertainty ignore), observation c never positive
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    s = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.7, 0.2, 0.6], [0.1, 0.4, 0.3]])
    mask = np.array([[1, 0, 1]] * 4)
    # val: no threshold to choose for b or c (the old code stopped on numpy's zero-size reduction for b)
    assert finetune.choose_thresholds("multilabel", y, s, mask) == [0.7, 0.5, 0.5]
    m = finetune.metrics("multilabel", y, s, [0.5, 0.5, 0.5], mask)
    # only a is scored: AUC 1, F1 1 (0.9, 0.7 found, 0.2, 0.1 not), accuracy 1; c's F1 0 and accuracy 1/2
    # (0.6 >= 0.5 is a false positive) and b's empty column are left out
    assert m["per_class_auc"] == [1.0, None, None] and (m["auc"], m["f1"], m["acc"]) == (1.0, 1.0, 1.0)
    assert finetune.confusion("multilabel", y, s, [0.5] * 3, mask)[1:] == [[[0, 0], [0, 0]], [[2, 2], [0, 0]]]
    assert finetune.unscorable("multilabel", y, mask, ["a", "b", "c"]) == ["'b' (all masked)", "'c' (no positive)"]
    # multi-class: a class absent from the split is left out of the macro F1 (the argmax is always right here)
    yc = np.array([0, 1, 0, 1])
    assert finetune.metrics("multiclass", yc, np.eye(3)[yc])["f1"] == 1.0
    assert finetune.unscorable("multiclass", yc, None, ["x", "y", "z"]) == ["'z' (no positive)"]


@pytest.mark.parametrize("content,expected", [
    ('["pneumonia"]', "expected {label: {\"pos\": [...], \"neg\": [...]}, non-empty prompt lists} for the labels "
                      "['pneumonia'], found a list"),
    ('{"pneumonia": {"pos": [], "neg": ["clear lungs"]}}', "'pneumonia' needs {\"pos\""),
    ('{"pneumonia": {"pos": "pneumonia", "neg": ["clear lungs"]}}', "found {\"pos\": \"pneumonia\""),
    ('{"pneumonia": {"pos": ["pneumonia"]}}', "'pneumonia' needs"),
    ('{"pneumonia": {"pos": ["a"], "neg": ["b"]}, "effusion": {"pos": ["a"], "neg": ["b"]}}', "the label 'effusion'"),
    ('{}', "'pneumonia' needs {\"pos\": [...], \"neg\": [...]}, non-empty prompt lists; found none"),
    ('{"pneumonia": ', "not valid JSON (Expecting value: line 1 column 15"),
])
def test_a_bad_prompts_file_is_one_line_before_any_checkpoint_is_read(tmp_path, demo, content, expected):
    # the checkpoint named does not exist: the prompts file must be read, and refused, first
    f = tmp_path / "prompts.json"
    f.write_text(content)
    with pytest.raises(ValueError) as e:
        finetune.main(["--ckpt", str(tmp_path / "none.pt"), "--mode", "zeroshot", "--prompts", str(f), "--size", "32",
                       "--out", str(tmp_path / "out")])
    assert str(e.value).startswith(f"{f}: ") and expected in str(e.value) and "\n" not in str(e.value)
    # a class's list (multi-class tasks)
    f.write_text('{"a": ["an a"], "b": []}')
    with pytest.raises(ValueError, match="'b' needs a non-empty list of prompts; found \\[\\]"):
        finetune.prompt_sets(["a", "b"], "multiclass", f)


def test_a_torchvision_state_dict_is_a_row(tmp_path):
    # a published encoder converted to torchvision's keys: random weights here, with and without its classifier
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "with-fc.pt")
    torch.save({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, tmp_path / "no-fc.pt")
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    for name in ("with-fc.pt", "no-fc.pt"):
        enc, dim = finetune.load_encoder(str(tmp_path / name), "resnet18")
        with torch.no_grad():
            assert dim == 512 and torch.allclose(enc.eval()(x), tv.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="no-fc.pt: a plain state dict, not a torchvision resnet50's \\(--arch\\)"):
        finetune.load_encoder(str(tmp_path / "no-fc.pt"), "resnet50")


def test_csv_task_split_and_intervals_by_patient_beside_a_torchvision_row(tmp_path, demo, capsys):
    # The demo's RSNA images as a CSV task, 3 images to a patient (patients P000..P199), two 0/1 label columns of
    # which "never" has no positive: said once per split, left out of the means. A torchvision state dict row
    # beside the random one, linear and kNN.
    paths, labels, _, _ = data.demo_labelled("rsna")
    rows = ["path,pneumonia,never,patient"] + [f"{p},{y},0,P{i // 3:03d}"
                                                for i, (p, y) in enumerate(zip(paths, labels))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pt")
    base = ["--task", "csv", "--data", str(tmp_path / "labels.csv"), "--label-col", "pneumonia,never", "--size", "32",
            "--workers", "0", "--fractions", "1.0", "--bootstrap", "20"]
    finetune.main([*base, "--patient-col", "patient", "--init", "random", "--ckpt", f"tv={tmp_path / 'tv.pt'}",
                   "--mode", "linear", "knn", "--out", str(tmp_path / "run")])
    stdout = capsys.readouterr().out
    assert "test: 'never' (no positive) cannot be scored: left out of the means in every mode" in stdout
    split = json.loads((tmp_path / "run" / "split.json").read_text())["patients"]
    assert sorted(sum(split.values(), [])) == [f"P{i:03d}" for i in range(200)]  # each patient in one split only
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {(c["method"], c["mode"]) for c in res} == {(m, k) for m in ("random", "tv") for k in ("linear", "knn")}
    assert all(c["per_class_auc"][1] is None and c["auc"] == c["per_class_auc"][0] for c in res)
    n = len(split["test"])
    assert f"Intervals resample the {n} scored patients, all of a patient's images together." in \
        (tmp_path / "run" / "results.md").read_text()
    # a row without its patient is refused (its image would be a patient alone)
    (tmp_path / "gap.csv").write_text("path,label,patient\na.png,0,P1\nb.png,1,\n")
    with pytest.raises(ValueError, match="gap.csv: 1 row\\(s\\) with an empty 'patient' cell .*b.png"):
        data.read_label_csv(tmp_path / "gap.csv", patient_col="patient")
    # without the column: by image, and said
    args = finetune.get_args([*base, "--init", "random"])
    assert finetune.load_task(args)[4] == [str(tmp_path / p) for p in paths]
    assert "--task csv: split and bootstrap by image, no patients named" in capsys.readouterr().out
    finetune.load_task(finetune.get_args(["--task", "folder", "--init", "random"]))
    assert "--task folder: split and bootstrap by image" in capsys.readouterr().out
    # two unnamed files in one folder would be one row named after it (both encoders' cells merged): refused
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv2.pt")
    with pytest.raises(ValueError, match=f"two rows are named '{tmp_path.name}'"):
        finetune.main([*base, "--init", "random", "--ckpt", str(tmp_path / "tv.pt"), "--ckpt", str(tmp_path / "tv2.pt"),
                       "--out", str(tmp_path / "two")])
    assert not (tmp_path / "two").exists()  # nothing written before the inputs are known good
