"""BYOL: image-only self-supervised pretraining without negatives.

Grill et al. 2020, "Bootstrap Your Own Latent", https://arxiv.org/abs/2006.07733 . An online network
(encoder, projector, predictor) learns to predict a target network's projection of another view of
the same image; the target (encoder, projector) is an exponential moving average of the online one,
its rate rising from --ema-base to 1 on a cosine schedule (section 3.2). Loss (eq. 2): 2 - 2 cos(p, z),
symmetrised over the two views; no gradient reaches the target.

    python byol.py                                    # the demo chest radiographs (~3 min on 2 cores)
    python byol.py --demo cytology --aug cytology-C   # the demo cytology images, elastic group
    python byol.py --data /data/mura/train --aug xray --arch resnet50 --weights imagenet
    torchrun --nproc_per_node=8 byol.py --data /data/chexpert/train --batch-size 4096 --optimizer lars --lr 3.2

BYOL's classic failure is a constant output: `spread` (data.embedding_spread of the predictions) is
logged, with a warning below 0.1. Under torchrun the EMA update reads DDP-synchronised online weights,
so the target stays identical on every rank.
"""
import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="folder of images/DICOMs or a CSV of paths; none: the demo data")
    p.add_argument("--image-col", default="path", help="CSV column with the image path")
    p.add_argument("--demo", default="xray", choices=["xray", "cytology"], help="which demo images, without --data")
    p.add_argument("--aug", default=None, choices=data.PRESETS, help="augmentation preset (default: xray for grayscale "
                   "or DICOM images, cytology-A for colour ones)")
    p.add_argument("--clahe", action="store_true", help="CLAHE before the augmentation (needs scikit-image)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="channels read (default 3 for cytology "
                   "presets, else 1)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 224; 64 on the demo data)")
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet50"], help="encoder (default resnet50; "
                   "resnet18 on the demo)")
    p.add_argument("--weights", default="none", choices=["imagenet", "none"], help="encoder initialisation")
    p.add_argument("--proj-hidden", type=int, default=4096, help="hidden width of projector and predictor (BYOL: 4096)")
    p.add_argument("--proj-dim", type=int, default=256, help="output width of projector and predictor (BYOL: 256)")
    p.add_argument("--ema-base", "--tau-base", dest="tau_base", type=float, default=None,
                   help="the target's initial EMA rate, rising to 1 (default 0.996, BYOL's; 0.95 on the demo)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 100; 60 on the demo)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch, split over torchrun processes (default 64; BYOL: 4096; 32 on the demo)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3; 3e-4 on the demo; "
                   "BYOL: LARS at 0.2 x batch / 256)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (AdamW; BYOL: 1.5e-6 with LARS)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"], help="AdamW, or LARS for large batches")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of all steps, then cosine")
    p.add_argument("--knn-every", type=int, default=5, help="epochs between kNN evaluations (0: never)")
    p.add_argument("--eval-data", default=None, help="labelled set for the kNN monitor: class folders or a CSV "
                   "(path,label); 'demo' on the demo data")
    p.add_argument("--knn-k", type=int, default=data.KNN_K, help="neighbours of the weighted kNN monitor")
    data.add_run_args(p, "byol")  # the run flags: --out, --resume, --workers, --seed ...
    args = data.parse_args(p, argv)
    # demo values chosen on the demo's validation split (RESULTS.md): 360 steps are too few for 0.996
    data.set_defaults(args, epochs=(60, 100), batch_size=(32, 64), tau_base=(0.95, 0.996), lr=(3e-4, 1e-3))
    if not 0 <= args.tau_base <= 1:
        p.error("--ema-base must be in [0, 1]")
    data.set_defaults(args, arch=("resnet18", "resnet50"), size=(64, 224), eval_data=("demo", None))
    if args.data is None:  # with --data and no --aug, main() chooses the preset from the images
        args.aug = args.aug or ("xray" if args.demo == "xray" else "cytology-A")
    if args.aug:
        args.channels = args.channels or (3 if args.aug.startswith("cytology") else 1)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: BatchNorm needs more than one image")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if args.epochs < 1 or args.size < 16:
        p.error("--epochs must be >= 1 and --size >= 16")
    return args


# ---------------------------------------------------------------------------------------------- model
def mlp(dim_in, hidden, dim_out):
    """BYOL's projector and predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


class Online(nn.Module):
    """Online network: encoder f, projector g, predictor q. forward gives the predictions of both views."""

    def __init__(self, arch, weights, hidden, out_dim):
        super().__init__()
        self.encoder, dim = data.image_encoder(arch, weights)
        self.projector = mlp(dim, hidden, out_dim)
        self.predictor = mlp(out_dim, hidden, out_dim)

    def forward(self, x1, x2):
        return tuple(self.predictor(self.projector(self.encoder(x))).float() for x in (x1, x2))


class Target(nn.Module):
    """Target network: a copy of the online encoder and projector, moved only by ema_update."""

    def __init__(self, online):
        super().__init__()
        self.encoder, self.projector = copy.deepcopy(online.encoder), copy.deepcopy(online.projector)
        self.requires_grad_(False)

    def forward(self, x1, x2):
        return tuple(self.projector(self.encoder(x)).float() for x in (x1, x2))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as BYOL uses at large batch.
    Biases and BatchNorm parameters (1-D) get neither weight decay nor the trust ratio, as in BYOL."""

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


# ---------------------------------------------------------------------------------------------- loss
def byol_loss(p, z):
    """BYOL eq. 2: 2 - 2 cos(p, z), mean over the batch; z is a target, so no gradient flows into it."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


@torch.no_grad()
def ema_update(target, online, tau):
    """target <- tau * target + (1 - tau) * online, parameter by parameter (same names); buffers
    (BatchNorm statistics) are copied."""
    src = dict(online.named_parameters())
    for name, t in target.named_parameters():
        t.mul_(tau).add_(src[name].detach(), alpha=1 - tau)
    bufs = dict(online.named_buffers())
    for name, b in target.named_buffers():
        b.copy_(bufs[name])


# ---------------------------------------------------------------------------------------------- schedule
def tau_schedule(step, total, base=0.996):
    """BYOL section 3.2: tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2, from base at k = 0 to 1 at k = K."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1) / 2


def lr_factor(step, total, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = get_args(argv)
    run = data.Run(args, "byol")  # process group, device, seeds, run folder, checkpoint to resume from
    dataset = data.pretraining_images(args, run)  # uint8 images; --aug chosen from them when not given
    augment = data.BatchAugment(args.aug, args.size, args.channels)  # both views drawn on the device
    loader = run.loader(dataset)

    model = run.prepare(Online(args.arch, args.weights, args.proj_hidden, args.proj_dim))
    target = run.prepare(Target(model))
    if args.optimizer == "lars":
        optimizer = LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * len(loader)
    warmup = max(1, int(args.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    run.checkpoint(method="byol", arch=args.arch, encoder=model.encoder, model=model, target=target,
                   optimizer=optimizer, scheduler=scheduler)
    if args.compile:
        model.encoder.compile()  # in place: the state dict keeps torchvision's key names
    train_model = run.distribute(model)  # DDP over the model under torchrun, else the model
    knn = data.KNNMonitor(args, run) if args.eval_data and args.knn_every and run.master else None
    run.start(f"byol: {len(dataset)} images, {args.arch}, aug {args.aug}, EMA {args.tau_base} -> 1")
    if knn and run.step == 0:
        knn(model.encoder, -1)  # the same encoder before any training: the baseline pretraining must beat

    spread = None
    for epoch, rng in run.epochs():  # rng: this epoch's augmentation draws (a torch.Generator)
        for x, _ in run.batches(loader):
            # ALGORITHM: each view's online prediction regresses the other view's target projection
            x = x.to(run.device, non_blocking=True)
            x1, x2 = augment(x, rng), augment(x, rng)
            with run.amp:
                p1, p2 = train_model(x1, x2)
                with torch.no_grad():
                    z1, z2 = target(x1, x2)
            loss = byol_loss(p1, z2) + byol_loss(p2, z1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema_update(target, model, tau_schedule(run.step - 1, total, args.tau_base))
            if run.track(loss):
                spread = data.embedding_spread(p1)
                run.log(spread=spread, tau=tau_schedule(run.step, total, args.tau_base))
                # an early dip that recovers is usual (the predictor first outputs the targets' mean direction)
                run.warn_once(spread < 0.1, f"step {run.step}: the predictions are nearly constant (spread "
                              f"{spread:.3f} < 0.1); an early dip that recovers is usual, one that stays is collapse")
        if knn:
            knn(model.encoder, epoch)
    run.finish()
    if run.master:
        if spread is not None and spread < 0.1:
            print(f"warning: the run ended with nearly constant predictions (spread {spread:.3f} < 0.1): collapsed")
        print(f"checkpoint: {run.ckpt_path}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, data.BadImageError) as e:  # the message, not a traceback
        raise SystemExit(f"byol.py: {e}") from None
