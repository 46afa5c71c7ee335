"""Barlow Twins and attention-guided Barlow Twins (AGBT): image-only self-supervised pretraining.

Barlow Twins: Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
https://arxiv.org/abs/2103.03230 . Two augmented views go through one encoder and a projector; the
cross-correlation matrix C of the two views' standardised embeddings is pushed towards the identity:
L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2 (eq. 1).

AGBT (`--loss agbt`, the cervical-cytology study): an attention MLP k ending in a sigmoid reads each
view's projection p and weighs its dimensions, a1 = k(p1), a2 = k(p2); both views share a =
sqrt(a1 * a2 + eps) and the unchanged Barlow Twins loss is applied to p1 * a, p2 * a. The weight is
per sample: one constant over the batch would be removed by the standardisation, so a = 1 is exactly
Barlow Twins. The study's worked example is a test: its loss is 0.6580, not the 2.0586 it prints.

    python barlow.py                                  # Barlow Twins on the demo cytology images
    python barlow.py --loss agbt --aug cytology-B     # AGBT with the colour augmentation group
    python barlow.py --data /data/herlev --aug cytology-A --arch resnet50 --weights imagenet
    torchrun --nproc_per_node=8 barlow.py --data /data/hicervix/images --batch-size 1024
"""
import argparse
import math

import torch
import torch.distributed.nn as dist_nn
import torch.nn as nn

import data


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="folder of images/DICOMs or a CSV of paths; none: the demo data")
    p.add_argument("--image-col", default="path", help="CSV column with the image path")
    p.add_argument("--demo", default="cytology", choices=["xray", "cytology"], help="which demo images, without --data")
    p.add_argument("--aug", default=None, choices=data.PRESETS, help="augmentation preset (default: xray for grayscale "
                   "or DICOM images, cytology-A for colour ones)")
    p.add_argument("--clahe", action="store_true", help="CLAHE before the augmentation (needs scikit-image)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="channels read (default 3 for cytology "
                   "presets, else 1)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 224; 64 on the demo data)")
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet50"], help="encoder (default resnet50; "
                   "resnet18 on the demo)")
    p.add_argument("--weights", default="none", choices=["imagenet", "none"], help="encoder initialisation")
    p.add_argument("--projector", default=None,
                   help="projector widths (default 8192-8192-8192, Barlow Twins'; 1024-1024-1024 on the demo)")
    p.add_argument("--attn-hidden", type=int, default=512, help="AGBT: hidden width of the attention MLP k")
    p.add_argument("--loss", default="barlow", choices=["barlow", "agbt"], help="Barlow Twins or attention-guided")
    p.add_argument("--lambd", type=float, default=0.005, help="weight of the off-diagonal term (Barlow Twins: 5e-3)")
    p.add_argument("--agbt-eps", type=float, default=1e-6, help="AGBT: eps in a = sqrt(a1 * a2 + eps)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 100; Barlow Twins: 1000; "
                   "40 on the demo)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch, split over torchrun processes (Barlow Twins: 2048 with LARS)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (Barlow Twins: LARS at 0.2)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (AdamW; Barlow Twins: 1.5e-6)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"], help="AdamW, or LARS for large batches")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of all steps, then cosine")
    p.add_argument("--knn-every", type=int, default=5, help="epochs between kNN evaluations (0: never)")
    p.add_argument("--eval-data", default=None, help="labelled set for the kNN monitor: class folders or a CSV "
                   "(path,label); 'demo' on the demo data")
    p.add_argument("--knn-k", type=int, default=data.KNN_K, help="neighbours of the weighted kNN monitor")
    data.add_run_args(p, "LOSS")  # the run flags: --out, --resume, --workers, --seed ...
    args = data.parse_args(p, argv)
    # the demo's 168 train-split cytology images make 2 batches of 64: 40 epochs are 80 steps
    data.set_defaults(args, epochs=(40, 100), projector=("1024-1024-1024", "8192-8192-8192"))
    try:
        widths = [int(w) for w in args.projector.split("-")]
    except ValueError:
        p.error(f"--projector must look like 2048-2048-2048, got {args.projector!r}")
    if len(widths) < 1 or min(widths) < 1:
        p.error("--projector needs at least one positive width")
    data.set_defaults(args, arch=("resnet18", "resnet50"), size=(64, 224), eval_data=("demo", None))
    if args.data is None:  # with --data and no --aug, main() chooses the preset from the images
        args.aug = args.aug or ("xray" if args.demo == "xray" else "cytology-A")
    if args.aug:
        args.channels = args.channels or (3 if args.aug.startswith("cytology") else 1)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: the cross-correlation is estimated over the batch")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if args.epochs < 1 or args.size < 16:
        p.error("--epochs must be >= 1 and --size >= 16")
    return args


# ---------------------------------------------------------------------------------------------- model
class BarlowTwins(nn.Module):
    """Encoder f, projector h (linear layers with BatchNorm + ReLU between), and for AGBT the attention k."""

    def __init__(self, arch, weights, widths, attn_hidden=None):
        super().__init__()
        self.encoder, dim = data.image_encoder(arch, weights)
        sizes = [dim] + widths
        layers = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        d = widths[-1]
        self.attention = nn.Sequential(nn.Linear(d, attn_hidden), nn.ReLU(inplace=True), nn.Linear(attn_hidden, d),
                                       nn.Sigmoid()) if attn_hidden else None

    def forward(self, x1, x2):
        """Projections p1, p2 and, for AGBT, the attention weights a1, a2 (else None)."""
        p1, p2 = self.projector(self.encoder(x1)).float(), self.projector(self.encoder(x2)).float()
        if self.attention is None:
            return p1, p2, None, None
        return p1, p2, self.attention(p1).float(), self.attention(p2).float()


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as Barlow Twins uses at large batch.
    Biases and BatchNorm parameters (1-D) get neither weight decay nor the trust ratio, as in the paper."""

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w, u = torch.norm(p), torch.norm(d)
                    d = d.mul(torch.where((w > 0) & (u > 0), g["eta"] * w / u, torch.ones_like(w)))
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


# ---------------------------------------------------------------------------------------------- losses
def gather(x, world):
    """The global batch on every rank; its backward carries each rank's gradient home (torch.distributed.nn)."""
    return torch.cat(dist_nn.all_gather(x), 0) if world > 1 else x


def standardize(z, eps=1e-12):
    """Each dimension to mean 0, standard deviation 1 over the batch (biased, divide-by-N estimator).
    No epsilon inside the square root, so the loss is the paper's formula to the last digit; eps only
    keeps a constant dimension at 0 instead of 0/0."""
    return (z - z.mean(0)) / z.std(0, unbiased=False).clamp_min(eps)


def barlow_twins_loss(z_a, z_b, lambd=0.005):
    """Barlow Twins (Zbontar et al. 2021, eq. 1). z_a, z_b: (N, D) embeddings of the two views.

    C = standardize(z_a)^T standardize(z_b) / N;  loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.
    Returns (loss, invariance term, redundancy term).
    """
    n = z_a.shape[0]
    c = standardize(z_a).T @ standardize(z_b) / n
    diag = c.diagonal()
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off, on, off


def shared_attention(a1, a2, eps=1e-6):
    """AGBT's shared attention a = sqrt(a1 * a2 + eps): symmetric in the views, 1 where both are 1."""
    return torch.sqrt(a1 * a2 + eps)


def agbt_loss(p1, p2, a1, a2, lambd=0.005, eps=1e-6):
    """AGBT: the Barlow Twins loss, unchanged, on the attention-weighted projections p * a."""
    a = shared_attention(a1, a2, eps)
    return barlow_twins_loss(p1 * a, p2 * a, lambd)


def off_diagonal_mean(z_a, z_b):
    """Mean |C_ij| over i != j: how much redundancy is left (a collapse metric for Barlow Twins)."""
    c = standardize(z_a).T @ standardize(z_b) / z_a.shape[0]
    d = c.shape[0]
    return float((c.abs().sum() - c.diagonal().abs().sum()) / max(d * (d - 1), 1))


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(step, total, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = get_args(argv)
    run = data.Run(args, args.loss)  # process group, device, seeds, run folder, checkpoint to resume from
    dataset = data.pretraining_images(args, run)  # uint8 images; --aug chosen from them when not given
    augment = data.BatchAugment(args.aug, args.size, args.channels)  # both views drawn on the device
    loader = run.loader(dataset)

    widths = [int(w) for w in args.projector.split("-")]
    model = run.prepare(BarlowTwins(args.arch, args.weights, widths, args.attn_hidden if args.loss == "agbt" else None))
    if args.optimizer == "lars":
        optimizer = LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * len(loader)
    warmup = max(1, int(args.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    run.checkpoint(method=args.loss, arch=args.arch, encoder=model.encoder, model=model, optimizer=optimizer,
                   scheduler=scheduler)
    if args.compile:
        model.encoder.compile()  # in place: the state dict keeps torchvision's key names
    train_model = run.distribute(model)  # DDP over the model under torchrun, else the model
    knn = data.KNNMonitor(args, run) if args.eval_data and args.knn_every and run.master else None
    run.start(f"{args.loss}: {len(dataset)} images, {args.arch}, projector {args.projector}, aug {args.aug}")
    if knn and run.step == 0:
        knn(model.encoder, -1)  # the same encoder before any training: the baseline pretraining must beat

    for epoch, rng in run.epochs():  # rng: this epoch's augmentation draws (a torch.Generator)
        for x, _ in run.batches(loader):
            # ALGORITHM: the cross-correlation of the global batch's two views, pushed to the identity
            x = x.to(run.device, non_blocking=True)
            with run.amp:
                p1, p2, a1, a2 = train_model(augment(x, rng), augment(x, rng))
            # the gather's backward sums each rank's share and DDP averages: one process's gradient on that batch
            p1, p2 = gather(p1, run.world), gather(p2, run.world)
            if args.loss == "agbt":
                a1, a2 = gather(a1, run.world), gather(a2, run.world)
                loss, on, off = agbt_loss(p1, p2, a1, a2, args.lambd, args.agbt_eps)
            else:
                loss, on, off = barlow_twins_loss(p1, p2, args.lambd)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if run.track(loss):
                a = shared_attention(a1, a2, args.agbt_eps).detach() if a1 is not None else 1.0
                z1, z2 = p1.detach() * a, p2.detach() * a
                run.log(invariance=float(on.detach()), redundancy=float(off.detach()),
                        spread=data.embedding_spread(z1), offdiag_abs_c=off_diagonal_mean(z1, z2))
        if knn:
            knn(model.encoder, epoch)
    run.finish()
    if run.master:
        print(f"checkpoint: {run.ckpt_path}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, data.BadImageError) as e:  # the message, not a traceback
        raise SystemExit(f"barlow.py: {e}") from None
