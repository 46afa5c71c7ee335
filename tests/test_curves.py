"""The run's curves (data.read_log, data.plot_runs, `python data.py plot`) and the trackers (data.Tracker):
logs written by hand with known values, no training."""
import json
import sys
import types

import pytest

import data
import demo as demo_py
from conftest import run_script, usage_error


def write_log(run_dir, lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def step(s, loss, **more):
    return {"step": s, "epoch": (s - 1) // 2, "loss": loss, "img_per_s": 100.0 + s, **more}


def convirt_log(run_dir):
    """ConVIRT, sigmoid loss, 2 steps an epoch, two optimizer groups, crashed after step 5 with the checkpoint at
    step 2 and resumed to step 4: steps 3 and 4 are logged again (0.7, 0.6 replace 0.9, 0.8); step 5, which the
    resumed run never reached, is marked superseded (as a resume marks what comes after its checkpoint)."""
    s = dict(collapse_loss=1.4, spread=0.3, t=10.0, b=-10.0)
    return write_log(run_dir, [
        step(1, 1.3, lr=0.1, lrs=[0.1, 0.01], **s), step(2, 1.2, lr=0.2, lrs=[0.2, 0.02], **s),
        {"epoch": 0, "step": 2, "epoch_loss": 1.25, "collapse_loss": 1.4},
        {"epoch": 0, "step": 2, "i2i_p@10": 0.3, "t2i_p@10": 0.25, "chance": 0.2, "eval": {"Edema": {"i2i": 0.3}}},
        step(3, 0.9, lr=0.3, lrs=[0.3, 0.03], **s), step(4, 0.8, lr=0.4, lrs=[0.4, 0.04], **s),
        {"epoch": 1, "step": 4, "epoch_loss": 0.85, "collapse_loss": 1.4},
        {"epoch": 1, "step": 4, "i2i_p@10": 0.1, "t2i_p@10": 0.1, "chance": 0.2},
        {**step(5, 5.0, lr=0.5), "superseded": True},  # never read
        step(3, 0.7, lr=0.3, lrs=[0.3, 0.03], **s), step(4, 0.6, lr=0.4, lrs=[0.4, 0.04], **s),
        {"epoch": 1, "step": 4, "epoch_loss": 0.65, "collapse_loss": 1.4},
        {"epoch": 1, "step": 4, "i2i_p@10": 0.4, "t2i_p@10": 0.35, "chance": 0.2},
        {"step": 4, "collapsed": False, "verdict": "the loss left its collapse value"}])


def test_the_plotted_series_are_the_log_with_a_resumed_step_replaced(tmp_path):
    run = convirt_log(tmp_path / "sig")
    drawn = data.plot_runs([("sig", run)], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(drawn) == ["loss", "spread", "lr", "t and b", "retrieval", "images/s"]
    steps = [1, 2, 3, 4]
    assert drawn["loss"] == {"sig: loss": (steps, [1.3, 1.2, 0.7, 0.6]),  # the resumed 0.7, 0.6; no step 5
                             "sig: epoch loss": ([2, 4], [1.25, 0.65]),
                             "sig: collapse value": (steps, [1.4] * 4)}
    assert drawn["spread"] == {"sig: spread": (steps, [0.3] * 4)}
    assert drawn["lr"] == {"sig: lr group 0": (steps, [0.1, 0.2, 0.3, 0.4]),  # "lrs" drawn, "lr" not
                           "sig: lr group 1": (steps, [0.01, 0.02, 0.03, 0.04])}
    assert drawn["t and b"] == {"sig: t": (steps, [10.0] * 4), "sig: b": (steps, [-10.0] * 4)}
    assert drawn["retrieval"] == {"sig: i2i_p@10": ([2, 4], [0.3, 0.4]), "sig: t2i_p@10": ([2, 4], [0.25, 0.35]),
                                  "sig: chance": ([2, 4], [0.2, 0.2])}
    assert drawn["images/s"] == {"sig: images/s": (steps, [101.0, 102.0, 103.0, 104.0])}


def test_a_panel_with_nothing_logged_is_left_out_and_knn_has_its_untrained_line(tmp_path):
    # SimCLR with the kNN monitor: one lr group, no t or b, no collapse value; kNN at epoch -1 (random weights)
    run = write_log(tmp_path / "simclr", [
        {"epoch": -1, "step": 0, "knn_top1@20": 0.5}, step(1, 6.0, lr=0.1, spread=0.4),
        step(2, 5.5, lr=0.1, spread=0.4),
        {"epoch": 0, "step": 2, "knn_top1@20": 0.7}])
    drawn = data.plot_runs([("s", run)], tmp_path / "c.png")
    assert list(drawn) == ["loss", "spread", "lr", "retrieval", "images/s"]  # no "t and b"
    assert drawn["loss"] == {"s: loss": ([1, 2], [6.0, 5.5])}
    assert drawn["lr"] == {"s: lr": ([1, 2], [0.1, 0.1])}
    assert drawn["retrieval"] == {"s: knn_top1@20": ([0, 2], [0.5, 0.7]),
                                  "s: knn_top1@20 untrained": ([0, 2], [0.5, 0.5])}  # from step 0 to the last, 2


def test_data_py_plot_overlays_two_runs_with_their_labels(tmp_path):
    convirt_log(tmp_path / "a")
    convirt_log(tmp_path / "seed1")
    out = run_script("data.py", "plot", f"softmax={tmp_path / 'a'}", tmp_path / "seed1", "--out", tmp_path / "two.png")
    assert out.stdout.strip() == f"wrote {tmp_path / 'two.png'}: softmax, seed1"  # NAME=RUN, then the folder's name
    assert (tmp_path / "two.png").read_bytes()[:4] == b"\x89PNG"
    drawn = data.plot_runs([("softmax", tmp_path / "a"), ("seed1", tmp_path / "seed1")], tmp_path / "c.png")
    assert set(drawn["loss"]) == {f"{r}: {s}" for r in ("softmax", "seed1") for s in ("loss", "epoch loss",
                                                                                     "collapse value")}
    with pytest.raises(SystemExit, match=r"^data\.py plot: .*nope.log\.jsonl: no such log"):
        demo_py.main(["plot", str(tmp_path / "nope")])


def test_tensorboard_events_read_back_and_a_resume_continues_the_step_axis(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = data.Tracker(["tensorboard"], tmp_path, {"lr": 0.1})
    for s in range(1, 7):  # the run logs steps 1-6, then dies; its last checkpoint was at step 4
        first.log({"step": s, "loss": float(s), "lrs": [0.1, 0.01], "verdict": "text is not a scalar"})
    first.close()
    resumed = data.Tracker(["tensorboard"], tmp_path, {"lr": 0.1}, start_step=4)
    for s in range(5, 9):
        resumed.log({"step": s, "loss": 100.0 + s})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 105), (6, 106), (7, 107), (8, 108)]  # dead run's 5, 6 hidden
    assert [(e.step, e.value) for e in events.Scalars("lrs/1")] == [(s, pytest.approx(0.01)) for s in (1, 2, 3, 4)]
    assert "verdict" not in events.Tags()["scalars"]


class FakeWandb(types.ModuleType):
    """A stand-in for the wandb module: records init's arguments and each log call, no network, no account."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda d, step: self.logged.append((d, step)), finish=self.finish)

    def finish(self):
        self.finished += 1


def test_wandb_offline_by_default_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, so no key: offline
    tracker = data.Tracker(["wandb"], tmp_path / "run", {"lr": 0.1})
    tracker.log({"step": 7, "epoch": 0, "loss": 1.5, "lrs": [0.1, 0.01], "collapsed": False, "verdict": "ok",
                 "eval": {"Edema": {"i2i": 0.3}}})
    tracker.close()
    run_id = (tmp_path / "run" / "wandb-id").read_text()
    assert fake.inits == [dict(project="medssl", name="run", dir=str(tmp_path / "run"), id=run_id, resume="allow",
                               config={"lr": 0.1}, mode="offline")]
    assert fake.logged == [({"epoch": 0.0, "loss": 1.5, "lrs/0": 0.1, "lrs/1": 0.01, "collapsed": 0.0}, 7)]
    assert fake.finished == 1
    monkeypatch.setenv("WANDB_MODE", "online")
    data.Tracker(["wandb"], tmp_path / "run", {"lr": 0.1}, start_step=7)
    assert fake.inits[1]["id"] == run_id and fake.inits[1]["mode"] == "online"  # the same run, as WANDB_MODE says
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    data.Tracker(["wandb"], tmp_path / "run", {"lr": 0.1}, start_step=7)
    assert fake.inits[2]["mode"] == "online"  # a key and no WANDB_MODE: online, as wandb itself would


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_tracker_package_is_one_line_with_its_pip_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ImportError) as e:
        data.Tracker([name], tmp_path, {})
    assert str(e.value) == f"--report-to {name}: {name} is not installed: pip install {name}"


# ------------------------------------------------------------------------------------ what a training run keeps

@pytest.mark.parametrize("script", ["simclr", "byol", "barlow", "convirt"])
def test_every_pretraining_script_offers_the_trackers_and_resume_auto(script, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(script).get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--report-to REPORT_TO" in text and "also log to tensorboard, wandb or both" in text
    assert "--resume [{yes,auto}]" in text and "--stop-signals" in text


def test_a_run_keeps_its_curves_and_mirrors_its_log_to_tensorboard_across_a_resume(tmp_path, demo, capsys,
                                                                                   monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.delenv("MEDSSL_NO_CURVES")  # what every run does unless told not to
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import simclr

    out = tmp_path / "run"
    args = ["--size", "32", "--batch-size", "16", "--proj-hidden", "32", "--log-every", "1", "--epochs", "1",
            "--workers", "0", "--report-to", "tensorboard", "--out", str(out), "--resume", "auto"]
    simclr.main([*args, "--max-steps", "3"])
    assert (out / "curves.png").stat().st_size > 10_000  # drawn at the stop
    simclr.main(args)  # the same command: on to the epoch's 12th step, where the kNN line is logged and drawn
    log = data.read_log(out)
    drawn = data.plot_runs([("run", out)], tmp_path / "again.png")
    assert drawn["loss"]["run: loss"] == ([r["step"] for r in log["step"]], [r["loss"] for r in log["step"]])
    # the epoch's line at its end alone (a cut inside it, at step 3, writes none: one line an epoch)
    assert drawn["loss"]["run: epoch loss"] == ([12], [r["epoch_loss"] for r in log["epoch"]])
    assert drawn["retrieval"]["run: knn_top1@20"][0] == [0, 3, 12]  # untrained, at the cut, at the end
    assert [r["step"] for r in log["step"]] == list(range(1, 13))
    events = EventAccumulator(str(out / "tensorboard")).Reload().Scalars("loss")
    assert [(e.step, pytest.approx(e.value)) for e in events] == [(r["step"], r["loss"]) for r in log["step"]]
    assert "--report-to wandb: not installed: pip install wandb" in usage_error(
        simclr.get_args, ["--report-to", "wandb"], capsys) or pytest.importorskip("wandb") is None
