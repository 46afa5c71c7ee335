"""benchmarks/bench.py runs end to end (tiny sizes) so it never rots. No test asserts a speed."""
import json

from conftest import run_script


def test_bench_smoke(tmp_path, demo):
    out = tmp_path / "b.json"
    p = run_script("benchmarks/bench.py", "--size", "32", "--batch-size", "4", "--steps", "1", "--repeats", "1",
                   "--warmup", "0", "--loss-sizes", "16", "--loader", "--loader-images", "8", "--workers", "0",
                   "--projector", "32-32", "--augment", "--out", out)
    res = json.loads(out.read_text())
    assert [r["config"] for r in res["steps"]] == ["convirt-softmax", "convirt-sigmoid", "simclr", "byol", "barlow", "agbt"]
    assert all(r["step_img_per_s"] > 0 and r["floor_img_per_s"] > 0 for r in res["steps"])
    assert {r["loss"] for r in res["losses"]} == {"softmax", "sigmoid", "nt_xent", "barlow-8192"}
    assert {(r["pipeline"], r["source"]) for r in res["loader"]} == {("convirt", "DICOM"), ("convirt", "cache"),
                                                                     ("ssl-xray", "DICOM"), ("ssl-xray", "cache")}
    assert "| simclr |" in p.stdout
    assert [r["preset"] for r in res["augment"]] == ["xray", "cytology-B", "simclr"]
    assert all(r["per_image_1_thread_img_per_s"] > 0 and r["batched_img_per_s"] > 0 for r in res["augment"])


def test_convirt_scale_smoke(tmp_path, demo):
    # the seed-table script: runs, reads each run's log, writes the JSON the README's table and figure come from
    out = tmp_path / "scale.json"
    p = run_script("benchmarks/convirt_scale.py", "--variants", "heuristic", "softmax", "--seeds", "0", "--size", "32",
                   "--runs", tmp_path / "runs", "--out", out, "--", "--epochs", "1", "--max-steps", "2", "--workers", "0",
                   "--eval-every", "1")
    res = json.loads(out.read_text())
    assert [(r["variant"], r["seed"], r["size"]) for r in res["runs"]] == [("heuristic", 0, 32), ("softmax", 0, 32)]
    keys = {"final_loss", "collapse_loss", "final_spread", "i2i_p_at_k", "t2i_p_at_k", "chance", "collapsed"}
    assert all(keys <= set(r) and r["chance"] > 0 for r in res["runs"])
    assert (tmp_path / "scale.png").is_file() and "heuristic" in p.stdout
