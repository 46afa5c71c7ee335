"""barlow.py: the cytology study's worked example, an independent formulation, invariances, AGBT,
DDP equivalence, and the script end to end."""
import json
import math

import pytest
import torch
import torch.nn as nn

import barlow
import data
from conftest import check_exact_resume, init_gloo, run_script, spawn_two, usage_error

# The cervical-cytology study's worked example (3 samples, 3 dimensions, lambda = 0.005).
Z_A = torch.tensor([[0.3367, 0.1288, 0.2345], [0.2303, -1.1229, -0.1863], [2.2082, -0.6380, 0.4617]], dtype=torch.float64)
Z_B = torch.tensor([[0.2674, 0.5349, 0.8094], [1.1103, -1.6898, -0.9890], [0.9580, 1.3221, 0.8172]], dtype=torch.float64)
C_STUDY = [[0.3007, 0.7353, 0.5440], [-0.9750, 0.6156, 0.7920], [-0.3346, 0.9952, 0.9397]]


def test_worked_example_from_the_cytology_study():
    # The study's standardised z and its C are right (checked to 4 decimals below). Its last two sums are not:
    #   invariance = (1 - 0.3007)^2 + (1 - 0.6156)^2 + (1 - 0.9397)^2 = 0.48902 + 0.14776 + 0.00364 = 0.6404
    #     (the study wrote 2.0347)
    #   redundancy = 0.7353^2 + 0.5440^2 + 0.9750^2 + 0.7920^2 + 0.3346^2 + 0.9952^2
    #              = 0.54067 + 0.29594 + 0.95063 + 0.62726 + 0.11196 + 0.99042 = 3.5170  (the study wrote 4.7803)
    #   loss = 0.6404 + 0.005 * 3.5170 = 0.6580.
    # The study's 2.0586 = 2.0347 + 0.005 * 4.7803 follows only from its two mis-added sums; never bend to it.
    c = barlow.standardize(Z_A).T @ barlow.standardize(Z_B) / 3
    assert torch.allclose(c, torch.tensor(C_STUDY, dtype=torch.float64), atol=5e-5)
    loss, on, off = barlow.barlow_twins_loss(Z_A, Z_B, lambd=0.005)
    assert on.item() == pytest.approx(0.6404, abs=5e-5)
    assert off.item() == pytest.approx(3.5170, abs=5e-5)
    assert loss.item() == pytest.approx(0.6580, abs=5e-5)
    assert abs(loss.item() - 2.0586) > 1


def test_matches_batchnorm_formulation():
    # The reference implementation: BatchNorm1d(affine=False) on each view, c = bn(z_a).T @ bn(z_b) / N.
    torch.manual_seed(0)
    za, zb = torch.randn(32, 16), torch.randn(32, 16) * 3 + 1
    bn = nn.BatchNorm1d(16, affine=False)
    c = bn(za).T @ bn(zb) / 32
    off = c.pow(2).sum() - c.diagonal().pow(2).sum()
    ref = (1 - c.diagonal()).pow(2).sum() + 0.005 * off
    assert barlow.barlow_twins_loss(za, zb, 0.005)[0].item() == pytest.approx(ref.item(), rel=1e-5)


def test_invariant_to_per_dimension_affine_rescaling():
    torch.manual_seed(1)
    za, zb = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 6, dtype=torch.float64)
    scale, shift = torch.rand(6, dtype=torch.float64) * 5 + 0.1, torch.randn(6, dtype=torch.float64) * 10
    a = barlow.barlow_twins_loss(za, zb)[0]
    b = barlow.barlow_twins_loss(za * scale + shift, zb * scale.flip(0) - shift)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_zero_for_perfectly_correlated_decorrelated_inputs():
    # Columns of a centred +-1 Hadamard-like design are orthogonal with unit variance: C = I exactly.
    z = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    loss, on, off = barlow.barlow_twins_loss(z, z * 2 + 3)
    assert on.item() == pytest.approx(0, abs=1e-9) and off.item() == pytest.approx(0, abs=1e-9)
    assert loss.item() == pytest.approx(0, abs=1e-9)


def test_agbt_equals_barlow_when_attention_is_one():
    torch.manual_seed(2)
    p1, p2 = torch.randn(16, 8), torch.randn(16, 8)
    ones = torch.ones(16, 8)
    assert barlow.agbt_loss(p1, p2, ones, ones)[0].item() == pytest.approx(barlow.barlow_twins_loss(p1, p2)[0].item(), rel=1e-5)


def test_shared_attention_is_symmetric_and_gradients_reach_k():
    torch.manual_seed(3)
    a1, a2 = torch.rand(4, 5), torch.rand(4, 5)
    assert torch.equal(barlow.shared_attention(a1, a2), barlow.shared_attention(a2, a1))
    model = barlow.BarlowTwins("resnet18", "none", [32, 32], attn_hidden=8)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    p1, p2, a1, a2 = model(x1, x2)
    barlow.agbt_loss(p1, p2, a1, a2)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.attention.parameters())


def test_weighted_knn_golden():
    # The weighted kNN of InstDisc, solo-learn and DINO: votes exp(s / T), T = 0.07. Query q = (1, 0); the bank
    # holds one class-0 feature at cosine 0.99 and two class-1 features at cosine 0.5. A majority vote of the k = 3
    # says class 1; the weights (scaled by exp(-0.99 / T), which cancels) are exp(0) = 1 and exp(-0.49 / 0.07) =
    # exp(-7) = 0.000912 each, so class 0 scores 1 / (1 + 2 x 0.000912) = 0.99818 and class 1 0.00182.
    bank = torch.tensor([[0.99, math.sqrt(1 - 0.99 ** 2)], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])
    scores = data.knn_predict(bank, torch.eye(2)[[0, 1, 1]], torch.tensor([[1.0, 0.0]]), k=3)
    assert scores[0].tolist() == pytest.approx([0.99818, 0.00182], abs=2e-5)
    assert data.knn_accuracy(bank, torch.tensor([0, 1, 1]), torch.tensor([[2.0, 0.0]]), torch.tensor([0]), k=3) == 1.0
    # with T large the vote is a plain majority: class 1; k is capped at the bank's size
    assert data.knn_predict(bank, torch.eye(2)[[0, 1, 1]], torch.tensor([[1.0, 0.0]]), k=50, t=1e6).argmax() == 1
    # multi-label targets: the weighted mean of the 0/1 labels
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert data.knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), k=3)[0].tolist() == pytest.approx([0.99818, 1.0],
                                                                                                         abs=2e-5)


def test_knn_accuracy():
    f = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 1])
    assert data.knn_accuracy(f, y, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), torch.tensor([0, 1]), k=2) == 1.0
    assert data.knn_accuracy(f, y, torch.tensor([[1.0, 0.05]]), torch.tensor([1]), k=1) == 0.0


# ---------------------------------------------------------------------------------- distributed

def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)


class Proj(nn.Module):
    def __init__(self, agbt):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Linear(6, 5)
        self.k = nn.Sequential(nn.Linear(5, 5), nn.Sigmoid()) if agbt else None

    def forward(self, x1, x2):
        p1, p2 = self.f(x1), self.f(x2)
        return (p1, p2, None, None) if self.k is None else (p1, p2, self.k(p1), self.k(p2))


def _loss(p1, p2, a1, a2):
    return barlow.barlow_twins_loss(p1, p2)[0] if a1 is None else barlow.agbt_loss(p1, p2, a1, a2)[0]


def _worker(rank, world, port, agbt, out):
    dist = init_gloo(rank, world, port)
    raw = Proj(agbt)
    model = nn.parallel.DistributedDataParallel(raw)
    x1, x2 = _batch()
    n = x1.shape[0] // world
    p1, p2, a1, a2 = model(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n])
    g = lambda t: None if t is None else barlow.gather(t, world)  # noqa: E731
    loss = _loss(g(p1), g(p2), g(a1), g(a2))
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": {k: p.grad for k, p in raw.named_parameters()}}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("agbt", [False, True])
def test_ddp_matches_one_process(agbt, tmp_path):
    model = Proj(agbt)
    x1, x2 = _batch()
    loss = _loss(*model(x1, x2))
    loss.backward()
    spawn_two(_worker, agbt, str(tmp_path / "d.pt"))
    got = torch.load(tmp_path / "d.pt")
    assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
    for k, p in model.named_parameters():
        assert torch.allclose(got["grads"][k], p.grad, atol=1e-5), k


# ---------------------------------------------------------------------------------- the script

SMALL = ["--size", "32", "--batch-size", "16", "--workers", "0", "--log-every", "1", "--projector", "64-64"]


def test_help_lists_every_flag():
    out = run_script("barlow.py", "--help").stdout
    for f in open(barlow.__file__).read().split('p.add_argument("')[1:]:
        assert f.split('"')[0] in out


@pytest.mark.parametrize("loss", ["barlow", "agbt"])
def test_smoke_and_checkpoint_into_torchvision(loss, tmp_path, demo):
    out = tmp_path / loss
    p = run_script("barlow.py", "--loss", loss, *SMALL, "--epochs", "1", "--max-steps", "2", "--knn-every", "1", "--out", out)
    assert "checkpoint:" in p.stdout and "kNN top-1 accuracy" in p.stdout
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all({"invariance", "redundancy", "spread", "offdiag_abs_c"} <= set(r) for r in steps)
    assert sum("knn_top1@20" in r for r in lines) == 2  # before training, and after the epoch
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    import torchvision

    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(ck["encoder"], strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == [] and ck["method"] == loss


def test_exact_resume(tmp_path, demo):
    # 168 train-split cytology images / batch 32 = 5 steps an epoch (DataLoader workers: simclr's and convirt's tests)
    check_exact_resume("barlow.py", ["--loss", "agbt", *SMALL, "--batch-size", "32", "--epochs", "2",
                                     "--knn-every", "0", "--deterministic"], tmp_path, 5)


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        barlow.get_args(["--lr", "0"])  # an explicit 0 is not the default
    assert "--lr must be > 0" in capsys.readouterr().err
    assert "--projector must look like" in usage_error(barlow.get_args, ["--projector", "wide"], capsys)
    assert "--batch-size must be at least 2" in usage_error(barlow.get_args, ["--batch-size", "1"], capsys)
    p = run_script("barlow.py", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", check=False)
    assert p.returncode != 0 and "data folder not found" in p.stderr
