"""benchmarks/bench.py runs end to end (tiny sizes) so it never rots. No test asserts a speed."""
import json

import data
from conftest import run_script


def test_bench_smoke(tmp_path, demo):
    out = tmp_path / "b.json"
    p = run_script("benchmarks/bench.py", "--size", "32", "--batch-size", "4", "--steps", "1", "--repeats", "1",
                   "--warmup", "0", "--loss-sizes", "16", "--loader", "--loader-images", "8", "--workers", "0",
                   "--projector", "32-32", "--augment", "--end-to-end", "--configs", "simclr",
                   "--e2e-images", "32", "--e2e-epochs", "2", "--e2e-source-size", "48", "--e2e-workers", "1", "--out", out)
    # (end to end: simclr's run only; the function that times it is the same for every config)
    res = json.loads(out.read_text())
    assert [r["config"] for r in res["steps"]] == ["convirt-softmax", "convirt-sigmoid", "simclr", "byol", "barlow", "agbt"]
    assert all(r["step_img_per_s"] > 0 and r["floor_img_per_s"] > 0 for r in res["steps"])
    assert {r["loss"] for r in res["losses"]} == {"softmax", "sigmoid", "nt_xent", "barlow-8192"}
    assert {(r["pipeline"], r["source"]) for r in res["loader"]} == {("convirt", "DICOM"), ("convirt", "cache"),
                                                                     ("ssl", "DICOM"), ("ssl", "cache")}
    assert "| simclr |" in p.stdout
    assert [r["preset"] for r in res["augment"]] == data.PRESETS + ["convirt"] and all(r["img_per_s"] > 0 for r in res["augment"])
    e2e = res["end_to_end"]  # each real script ran on the generated folder; epoch 1 of 2 timed
    assert [r["config"] for r in e2e] == ["simclr"] and all(r["epochs_timed"] == 1 for r in e2e)
    assert all(r["ratio"] > 0 and abs(r["ratio"] - r["e2e_img_per_s"] / r["step_img_per_s"]) < 0.01 * r["ratio"] for r in e2e)


def test_convirt_scale_smoke(tmp_path, demo):
    # the seed-table script: runs, reads each run's log, writes the JSON the README's table and figure come from
    out = tmp_path / "scale.json"
    p = run_script("benchmarks/convirt_scale.py", "--variants", "heuristic", "softmax", "--seeds", "0", "--size", "32",
                   "--runs", tmp_path / "runs", "--out", out, "--", "--epochs", "1", "--batch-size", "96", "--workers", "0",
                   "--eval-every", "1")
    res = json.loads(out.read_text())
    assert [(r["variant"], r["seed"], r["size"]) for r in res["runs"]] == [("heuristic", 0, 32), ("softmax", 0, 32)]
    keys = {"final_loss", "collapse_loss", "final_spread", "i2i_p_at_k", "t2i_p_at_k", "chance", "collapsed"}
    assert all(keys <= set(r) and r["chance"] > 0 for r in res["runs"])
    assert (tmp_path / "scale.png").is_file() and "heuristic" in p.stdout


def test_demo_tuning_smoke(tmp_path, demo):
    # the val-split tuning script: pretrains each setting (a flag, or the jitter keyword), probes with
    # finetune.py --score val, and writes the JSON the README's choices table comes from
    out = tmp_path / "tuning.json"
    p = run_script("benchmarks/demo_tuning.py", "--settings", "byol, jitter 0.2", "--seeds", "1",
                   "--runs", tmp_path / "runs", "--out", out, "--", "--epochs", "1", "--max-steps", "1", "--size", "32",
                   "--knn-every", "0")
    res = json.loads(out.read_text())
    assert [r["setting"] for r in res["settings"]] == ["random", "byol, jitter 0.2"]
    assert all(0 < r["val_auc_1_mean"] <= 1 for r in res["settings"]) and res["scored"].startswith("val")
    cells = json.loads((tmp_path / "runs" / "probe" / "results.json").read_text())
    assert {c["scored"] for c in cells} == {"val"} and "byol, jitter 0.2" in p.stdout
    assert "xray jitter 0.2" in (tmp_path / "runs" / "byol__jitter_0.2-s0" / "stdout.txt").read_text()
