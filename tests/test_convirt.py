"""convirt.py: the two losses by hand, their limits, DDP equivalence, and the script end to end."""
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convirt
import data
from conftest import check_exact_resume, init_gloo, run_script, spawn_two, usage_error

U = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
V = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # unit vectors; S = U V^T = [[1, 0.6], [0, 0.8]]


def softplus(x):
    return math.log1p(math.exp(x))


def test_infonce_hand_worked():
    # tau = 1, S = [[1, 0.6], [0, 0.8]].
    # image->text rows: -log(e^1/(e^1+e^0.6)) = log(1+e^-0.4) = 0.513015; log(1+e^-0.8) = 0.371101; mean 0.442058
    # text->image rows of S^T = [[1, 0], [0.6, 0.8]]: log(1+e^-1) = 0.313262; log(1+e^-0.2) = 0.598139; mean 0.455700
    # L = 0.75 * 0.442058 + 0.25 * 0.455700 = 0.445469
    assert convirt.infonce_loss(U, V, tau=1.0, lam=0.75).item() == pytest.approx(0.445469, abs=1e-6)
    assert convirt.infonce_loss(U, V, tau=1.0, lam=1.0).item() == pytest.approx(0.442058, abs=1e-6)
    assert convirt.infonce_loss(U, V, tau=1.0, lam=0.0).item() == pytest.approx(0.455700, abs=1e-6)


def test_infonce_matches_cross_entropy_and_limits():
    torch.manual_seed(0)
    u, v = F.normalize(torch.randn(6, 5), dim=1), F.normalize(torch.randn(6, 5), dim=1)
    logits = u @ v.T / 0.1
    ce_iv = F.cross_entropy(logits, torch.arange(6))
    ce_vi = F.cross_entropy(logits.T, torch.arange(6))
    assert torch.allclose(convirt.infonce_loss(u, v, 0.1, 1.0), ce_iv)
    assert torch.allclose(convirt.infonce_loss(u, v, 0.1, 0.0), ce_vi)
    assert torch.allclose(convirt.infonce_loss(u, v, 0.1, 0.3), 0.3 * ce_iv + 0.7 * ce_vi)
    # perfectly aligned, orthogonal pairs: the loss goes to 0 as tau shrinks
    e = torch.eye(4)
    assert convirt.infonce_loss(e, e, tau=0.01).item() < 1e-6


def test_sigmoid_hand_worked():
    # t = 1, b = 0, logits = S = [[1, 0.6], [0, 0.8]], z = [[1, -1], [-1, 1]]
    # L = (1/2) [softplus(-1) + softplus(0.6) + softplus(0) + softplus(-0.8)]
    #   = (1/2) [0.313262 + 1.037488 + 0.693147 + 0.371101] = 1.207499
    got = convirt.sigmoid_loss(U, V, torch.tensor(1.0), torch.tensor(0.0)).item()
    assert got == pytest.approx(1.207499, abs=1e-6)
    assert got == pytest.approx((softplus(-1) + softplus(0.6) + softplus(0) + softplus(-0.8)) / 2, abs=1e-6)
    # positives weighted by 3: 3 * (0.313262 + 0.371101) + 1.037488 + 0.693147 over 2
    w = convirt.sigmoid_loss(U, V, torch.tensor(1.0), torch.tensor(0.0), pos_weight=3.0).item()
    assert w == pytest.approx((3 * (softplus(-1) + softplus(-0.8)) + softplus(0.6) + softplus(0)) / 2, abs=1e-6)


@pytest.mark.parametrize("n", [4, 64])
def test_sigmoid_collapse_value_and_stationary_bias(n):
    # all embeddings identical: every cosine is 1, so the logit is a = t + b for all N^2 pairs and
    # L(a) = softplus(-a) + (N-1) softplus(a), minimal where sigmoid(a) = 1/N, i.e. a = -log(N-1),
    # with L = log N + (N-1) log(N/(N-1)) = L_c(N).
    x = F.normalize(torch.ones(n, 3), dim=1)
    t = torch.tensor(2.0)
    b_star = -math.log(n - 1) - 2.0
    grid = torch.linspace(b_star - 3, b_star + 3, 2001)
    losses = torch.stack([convirt.sigmoid_loss(x, x, t, b) for b in grid])
    assert losses.min().item() == pytest.approx(convirt.collapse_loss(n), abs=1e-5)
    assert grid[losses.argmin()].item() == pytest.approx(b_star, abs=5e-3)
    b = torch.tensor(b_star, requires_grad=True)
    convirt.sigmoid_loss(x, x, t, b).backward()
    assert abs(b.grad.item()) < 1e-5
    assert convirt.collapse_loss(4) == pytest.approx(math.log(4) + 3 * math.log(4 / 3))


@pytest.mark.parametrize("n", [4, 32])
def test_heuristic_collapse_value_golden(n):
    # Positives weighted w = N-1. All embeddings at one point: every logit is one value a and a row's
    # loss is l(a) = (N-1) softplus(-a) + (N-1) softplus(a), least at sigmoid(a) = 1/2, a* = 0, where
    # l = 2 (N-1) log 2:  N = 4: 6 x 0.693147 = 4.158883;  N = 32: 62 x 0.693147 = 42.975125.
    # (The old heuristic started b at -log(N-1) = -3.434, below that prior: at N = 32 the loss began at
    # 31 softplus(3.434) + 31 softplus(-3.434) = 31 (3.4657 + 0.0317) = 108.42, 65 above the collapse value.)
    golden = {4: 4.158883, 32: 42.975125}[n]
    assert convirt.collapse_loss(n, n - 1) == pytest.approx(golden, abs=1e-6)
    assert convirt.prior_logit(n, n - 1) == 0.0
    assert convirt.prior_logit(n) == pytest.approx(-math.log(n - 1))
    x = F.normalize(torch.ones(n, 3), dim=1)  # one point: every cosine is 1
    t = torch.tensor(5.0)
    b = torch.tensor(-5.0, requires_grad=True)  # t * 1 + b = 0 = a*
    loss = convirt.sigmoid_loss(x, x, t, b, pos_weight=n - 1)
    assert loss.item() == pytest.approx(golden, abs=1e-5)
    loss.backward()
    assert abs(b.grad.item()) < 1e-5  # the collapsed state is stationary in b: nothing pulls out of it
    # the unweighted formula is the w = 1 case
    assert convirt.collapse_loss(n, 1.0) == pytest.approx(math.log(n) + (n - 1) * math.log(n / (n - 1)))
    assert convirt.softmax_collapse_loss(n) == pytest.approx(math.log(n))


def test_collapse_verdict():
    ev = {"i2i_p@10": 0.33, "t2i_p@10": 0.35, "chance": 0.27}
    collapsed, line = convirt.collapse_verdict(38.0, 42.975, 0.2, ev)
    assert not collapsed and line.startswith("not collapsed") and "0.88 x the collapse value" in line
    # each condition alone fails the run, and the line names it
    for loss, spread, e, what in [(39.0, 0.2, ev, "FAILS loss"), (38.0, 0.08, ev, "FAILS spread"),
                                  (38.0, 0.2, {**ev, "i2i_p@10": 0.28}, "FAILS i2i"),
                                  (38.0, 0.2, {**ev, "t2i_p@10": 0.29}, "FAILS t2i")]:
        collapsed, line = convirt.collapse_verdict(loss, 42.975, spread, e)
        assert collapsed and line.startswith("COLLAPSED") and what in line, line
    assert not convirt.collapse_verdict(3.0, math.log(32), 0.3)[0]  # no evaluation: loss and spread decide


def test_collapse_metrics():
    e = torch.eye(8)
    gap, spread = convirt.collapse_metrics(e, e)
    assert gap == pytest.approx(1.0) and spread > 0.5
    same = F.normalize(torch.ones(8, 8), dim=1)
    gap, spread = convirt.collapse_metrics(same, same)
    assert abs(gap) < 1e-6 and spread < 1e-6


def test_lr_schedule():
    assert convirt.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert convirt.lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert convirt.lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert convirt.lr_factor(100, 100, 10) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------- distributed

class Towers(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = nn.Linear(6, 4), nn.Linear(5, 4)
        self.t_prime, self.bias = nn.Parameter(torch.tensor(math.log(3.0))), nn.Parameter(torch.tensor(-1.0))
        if kind == "softmax":  # as convirt.main does: unused parameters must not wait for gradients under DDP
            self.t_prime.requires_grad_(False)
            self.bias.requires_grad_(False)

    def forward(self, x, y):
        return F.normalize(self.img(x), dim=1), F.normalize(self.txt(y), dim=1)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


def _loss(model, u, v, u_all, v_all, offset, kind):
    if kind == "softmax":
        return convirt.infonce_loss(u, v, 0.1, 0.75, u_all, v_all, offset)
    return convirt.sigmoid_loss(u, v, model.t_prime.exp(), model.bias, v_all, offset, pos_weight=u_all.shape[0] - 1)


def _worker(rank, world, port, kind, out):
    dist = init_gloo(rank, world, port)
    raw = Towers(kind)
    model = nn.parallel.DistributedDataParallel(raw)
    x, y = _batch()
    n = x.shape[0] // world
    u, v = model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
    loss = _loss(raw, u, v, convirt.gather(u, world), convirt.gather(v, world), rank * n, kind)
    loss.backward()
    lv = loss.detach().clone()
    dist.all_reduce(lv)
    if rank == 0:
        torch.save({"loss": lv / world, "grads": {k: p.grad for k, p in raw.named_parameters()}}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ddp_matches_one_process(kind, tmp_path):
    model = Towers(kind)
    x, y = _batch()
    u, v = model(x, y)
    loss = _loss(model, u, v, u, v, 0, kind)
    loss.backward()
    out = tmp_path / "ddp.pt"
    spawn_two(_worker, kind, str(out))
    got = torch.load(out)
    assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
    for k, p in model.named_parameters():
        if p.grad is None:  # t and b take no part in the softmax loss
            assert kind == "softmax" and k in ("t_prime", "bias") and got["grads"][k] is None
            continue
        assert torch.allclose(got["grads"][k], p.grad, atol=1e-5), k


# ---------------------------------------------------------------------------------- the script

SMALL = ["--size", "32", "--batch-size", "32", "--workers", "0", "--log-every", "1"]


def test_help_lists_every_flag():
    out = run_script("convirt.py", "--help").stdout
    parser_flags = [a for a in open(convirt.__file__).read().split('p.add_argument("')[1:]]
    for f in parser_flags:
        assert f.split('"')[0] in out


def test_smoke_and_checkpoint_into_torchvision(tmp_path, demo):
    out = tmp_path / "run"
    p = run_script("convirt.py", "--loss", "sigmoid", *SMALL, "--epochs", "1", "--max-steps", "2",
                   "--eval-every", "1", "--out", out)
    assert "checkpoint:" in p.stdout
    assert json.loads((out / "args.json").read_text())["loss"] == "sigmoid"
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("gap" in r and "spread" in r and "t" in r for r in steps)
    assert any("eval" in r for r in lines)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    import torchvision

    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(ck["encoder"], strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    assert torch.equal(net.conv1.weight, ck["encoder"]["conv1.weight"])
    # a second run into the same folder refuses rather than overwriting
    p = run_script("convirt.py", *SMALL, "--epochs", "1", "--out", out, check=False)
    assert p.returncode != 0 and "already holds a checkpoint" in p.stderr


def test_exact_resume(tmp_path, demo):
    # 192 training pairs / batch 32 = 6 steps an epoch; two persistent workers draw the sentences and
    # tokenise, the views are drawn in the training process: the resumed run must draw them all again
    args = ["--loss", "softmax", *SMALL, "--workers", "2", "--epochs", "2", "--eval-every", "0", "--deterministic"]
    check_exact_resume("convirt.py", args, tmp_path, 6)


def test_nan_guard_keeps_last_checkpoint(tmp_path, demo, monkeypatch):
    calls = {"n": 0}
    real = convirt.infonce_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 6 else loss  # epoch 0 is clean, epoch 1 is not

    monkeypatch.setattr(convirt, "infonce_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="loss is nan at step 7"):
        convirt.main(["--loss", "softmax", *SMALL, "--epochs", "3", "--eval-every", "0", "--out", str(out)])
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 0 and all(torch.isfinite(v).all() for v in ck["encoder"].values() if v.is_floating_point())


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convirt.get_args(["--text-lr", "-1"])  # a negative rate is a typo, not a request
    assert "--lr and --text-lr must be > 0" in capsys.readouterr().err
    assert "--batch-size must be at least 2" in usage_error(convirt.get_args, ["--batch-size", "1"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_script("convirt.py", "--data", empty, "--out", tmp_path / "r", check=False)
    assert p.returncode != 0 and "no images found" in p.stderr
    p = run_script("convirt.py", *SMALL, "--text-model", "no-such-org/no-such-model", "--out", tmp_path / "r2", check=False)
    assert p.returncode != 0 and "could not load text model 'no-such-org/no-such-model'" in p.stderr


@pytest.mark.slow
def test_main_job_does_not_collapse(tmp_path, demo):
    # `python convirt.py --loss sigmoid` exactly as the README runs it (demo defaults: ResNet-18, 64 px,
    # batch 32, lr 3e-4, 150 epochs), judged by the bar: the last epoch's mean loss at most
    # 0.9 x the collapse value 2 (N-1) log 2 = 42.975, spread above 0.1, and held-out retrieval more
    # than 0.02 above chance. Before the heuristic's parts agreed, this run sat at 42.4-43.4, spread
    # 0.03-0.13, retrieval at chance.
    # (--eval-every 25 only thins the evaluations: training draws nothing there, and the last one is kept)
    out = tmp_path / "main"
    p = run_script("convirt.py", "--loss", "sigmoid", "--eval-every", "25", "--out", out, timeout=1800)  # 3-6 min alone
    assert "not collapsed:" in p.stdout, p.stdout[-2000:]
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    last_epoch = [r for r in lines if "epoch_loss" in r][-1]
    assert last_epoch["collapse_loss"] == pytest.approx(62 * math.log(2))
    assert last_epoch["epoch_loss"] <= 0.9 * last_epoch["collapse_loss"]
    assert [r for r in lines if "spread" in r][-1]["spread"] > 0.1
    ev = [r for r in lines if "eval" in r][-1]
    assert ev["i2i_p@10"] > ev["chance"] + 0.02 and ev["t2i_p@10"] > ev["chance"] + 0.02
    assert lines[-1]["collapsed"] is False


def test_image_head_moves_alike_at_any_encoder_width():
    # Issue 23 (RESULTS.md, "ConVIRT with a ResNet-50"): Adam's first step moves each weight by ~lr, and on ReLU
    # features (all >= 0) a hidden pre-activation then moves by ~lr x fan-in x the mean feature: at the ResNet-18's
    # lr a ResNet-50's 2048-wide head moves 4x as far a step (and collapsed); at lr x 512 / 2048 it moves alike.
    def moved(width, lr):
        torch.manual_seed(0)
        head, x = convirt.projection(width, 512), F.relu(torch.randn(32, width))
        before = head[0](x).detach()
        opt = torch.optim.AdamW(head.parameters(), lr=lr)
        (head(x) * torch.randn(32, 512)).sum().backward()
        opt.step()
        return float((head[0](x).detach() - before).norm() / before.norm())

    # measured: 512 wide at 3e-4 moves 0.080 of its size, 2048 wide at 7.5e-5 0.078 (0.98 x), at 3e-4 0.313 (3.90 x)
    assert 0.7 < moved(2048, 3e-4 * 512 / 2048) / moved(512, 3e-4) < 1.4
    assert moved(2048, 3e-4) / moved(512, 3e-4) > 3  # the old default: one lr for every width


def test_resnet50_head_lr_and_a_checkpoint_written_before_it_resumes(tmp_path, demo):
    out = tmp_path / "r50"
    convirt.main(["--arch", "resnet50", *SMALL, "--batch-size", "4", "--max-steps", "1", "--eval-every", "0",
                  "--out", str(out)])
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    # image tower, its head (hidden weight and bias, output weight), the demo BERT, t' and b
    assert [g["initial_lr"] for g in groups] == pytest.approx([3e-4, 3e-4 * 512 / 2048, 3e-4, 3e-4])
    assert len(groups[1]["params"]) == 3
    # the same checkpoint in the layout written before the head had its own lr: one group for the image tower, its
    # head and the text head, in the model's order (encoder, image head, text head); it resumes with 3 groups
    g0, g1 = groups[0], groups[1]
    a = len(g0["params"]) - 3  # the text head's 3 tensors come last in group 0
    order = g0["params"][:a] + g1["params"] + g0["params"][a:]
    state = ck["optimizer"]["state"]
    ck["optimizer"]["state"] = {**{k: v for k, v in state.items() if k not in order},
                                **{g0["params"][0] + i: state[p] for i, p in enumerate(order) if p in state}}
    ck["optimizer"]["param_groups"] = [{**g0, "params": sorted(order)}] + groups[2:]
    for key in ("base_lrs", "_last_lr"):
        ck["scheduler"][key] = ck["scheduler"][key][:1] + ck["scheduler"][key][2:]
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(out / "args.json", old / "args.json")
    torch.save(ck, old / "checkpoint.pt")
    convirt.main(["--resume", "--out", str(old), "--max-steps", "2"])
    resumed = torch.load(old / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 2 and len(resumed["optimizer"]["param_groups"]) == 3


def test_collapse_advice_says_what_the_measurements_support():
    # RESULTS.md: plain SigLIP from SigLIP's t 10 / b -10 learned on the demo (spread 0.44-0.46, retrieval at the
    # heuristic's) with only its loss ratio over the 0.9 bar; from t 1 / b 0 it stayed collapsed; a ResNet-50 from
    # scratch sat at its collapse value ~600 steps, then learned; a heuristic or softmax run is told about --lr, --epochs
    only_loss = "COLLAPSED: FAILS loss 4.190 = 0.94 x the collapse value 4.450, spread 0.306, i2i P@10 0.372 (chance 0.271)"
    plain = convirt.get_args(["--loss", "sigmoid", "--no-heuristic"])
    assert "Only the loss bar fails" in convirt.collapse_advice(plain, only_loss)
    assert "Drop --no-heuristic" not in convirt.collapse_advice(plain, only_loss)
    assert "Only the loss" not in convirt.collapse_advice(plain, only_loss.replace("spread", "FAILS spread"))
    assert "Only the loss" not in convirt.collapse_advice(plain)  # during the run no verdict exists yet
    t1 = convirt.get_args(["--loss", "sigmoid", "--no-heuristic", "--t-init", "1", "--b-init", "0"])
    assert "SigLIP from t 1 stays collapsed" in convirt.collapse_advice(t1, only_loss)
    r50 = convirt.get_args(["--loss", "softmax", "--arch", "resnet50"])
    advice = convirt.collapse_advice(r50)
    assert "resnet50 from scratch sits at the collapse value for ~600 steps" in advice
    # on the demo a ResNet-50 runs 300 epochs (1,800 steps): the 150 of a ResNet-18 ended before it had learned
    assert "more --epochs (now 300)" in advice and "lower --lr did not shorten" in advice
    heur = convirt.get_args(["--loss", "sigmoid", "--lr", "1e-3"])
    advice = convirt.collapse_advice(heur)
    assert "--no-heuristic" not in advice and "--lr (now 0.001)" in advice and "--epochs (now 150)" in advice


def test_imagenet_weights_offline_gives_a_clear_error(monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit, match="could not get ImageNet weights for resnet18.*use --weights none"):
        data.image_encoder("resnet18", "imagenet")


def test_torchrun_with_a_hub_bert_that_has_its_pooler(tmp_path, demo):
    # AutoModel builds BERT with its pooler; ConVIRT pools the tokens itself, so the pooler gets no
    # gradient and DDP used to stop at step 2 ("Expected to have finished reduction ..."). A tiny
    # BertModel with a pooler, saved as a local --text-model folder, run by torchrun on two gloo ranks.
    import data
    from transformers import BertConfig, BertModel

    paths, reports, _ = data.demo_pairs()
    tokenizer_json, _ = convirt.demo_text_model(reports, 0)
    tokenizer = convirt.wrap_tokenizer(tokenizer_json)
    folder = tmp_path / "tiny-bert"
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    bert = BertModel(config, add_pooling_layer=True)
    assert bert.pooler is not None
    bert.save_pretrained(folder)
    out = tmp_path / "ddp"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "convirt.py",
               "--text-model", folder, "--size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
               "--max-steps", "3", "--eval-every", "0", "--log-every", "1", "--out", out)
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["text_model"] == str(folder) and any(k.startswith("text_encoder.pooler.") for k in ck["model"])
    # convirt.load: the checkpoint alone embeds texts and images (the folder deleted, the hub offline: conftest),
    # also with the position_ids buffer some transformers versions save among the weights
    shutil.rmtree(folder)
    ck["model"]["text_encoder.embeddings.position_ids"] = torch.arange(256)[None]
    torch.save(ck, tmp_path / "older.pt")
    code = ("import sys, torch, convirt; m = convirt.load(sys.argv[1]); x = torch.zeros(3, 3, m.size, m.size); "
            "t = m.encode_text(['There is a pleural effusion.', 'The lungs are clear.']); i = m.encode_image(x); "
            "print(tuple(t.shape), tuple(i.shape), round(float(t.norm(dim=1).min()), 4), m.temperature, m.training)")
    words = run_script("-c", code, out / "checkpoint.pt").stdout.split()  # a fresh process, as a user would
    assert words[:5] + words[6:] == ["(2,", "512)", "(3,", "512)", "1.0", "False"], words
    assert float(words[5]) == pytest.approx(1 / math.exp(ck["model"]["t_prime"]))  # the sigmoid loss's 1/t
    older = convirt.load(tmp_path / "older.pt")
    assert older.encode_text(["The lungs are clear."]).shape == (1, 512) and not older.training
    # one clear line for a checkpoint with no text tower, and for one written before tokenizers were saved
    ck["method"] = "simclr"
    torch.save(ck, tmp_path / "simclr.pt")
    with pytest.raises(ValueError, match="simclr.py checkpoint has no text tower; zero-shot needs a convirt.py"):
        convirt.load(tmp_path / "simclr.pt")
    ck.update(method="convirt", tokenizer_json=None)
    torch.save(ck, tmp_path / "old-hub.pt")
    with pytest.raises(ValueError, match="without its tokenizer"):
        convirt.load(tmp_path / "old-hub.pt")
