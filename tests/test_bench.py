"""benchmarks/bench.py runs end to end (tiny sizes) so it never rots. No test asserts a speed."""
import json

from conftest import run_script


def test_bench_smoke(tmp_path, demo):
    out = tmp_path / "b.json"
    p = run_script("benchmarks/bench.py", "--size", "32", "--batch-size", "4", "--steps", "1", "--repeats", "1",
                   "--warmup", "0", "--loss-sizes", "16", "--loader", "--loader-images", "8", "--workers", "0",
                   "--projector", "32-32", "--out", out)
    res = json.loads(out.read_text())
    assert [r["config"] for r in res["steps"]] == ["convirt-softmax", "convirt-sigmoid", "simclr", "byol", "barlow", "agbt"]
    assert all(r["step_img_per_s"] > 0 and r["floor_img_per_s"] > 0 for r in res["steps"])
    assert {r["loss"] for r in res["losses"]} == {"softmax", "sigmoid", "nt_xent", "barlow-8192"}
    assert {(r["pipeline"], r["source"]) for r in res["loader"]} == {("convirt", "DICOM"), ("convirt", "cache"),
                                                                     ("ssl-xray", "DICOM"), ("ssl-xray", "cache")}
    assert "| simclr |" in p.stdout
