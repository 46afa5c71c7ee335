"""SimCLR: image-only contrastive pretraining with the NT-Xent loss.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
https://arxiv.org/abs/2002.05709 . Two augmented views of each image go through one encoder and a
projection MLP; each view must pick out its twin among the 2N - 1 other views of the batch
(NT-Xent, eq. 1). Under torchrun the views are all-gathered with their gradients, so the negatives
come from the global batch.

    python simclr.py                                   # the demo chest radiographs (~2 min on 2 cores)
    python simclr.py --demo cytology --aug cytology-D  # the demo cytology images, blur + speckle group
    python simclr.py --data /data/mura/train --aug xray --arch resnet50 --weights imagenet
    torchrun --nproc_per_node=8 simclr.py --data /data/chexpert/train --batch-size 4096 --optimizer lars --lr 4.8

Learning rate: AdamW takes --lr as it is; LARS follows the paper's batch scaling, 0.3 x batch / 256.
"""
import argparse
import math

import torch
import torch.distributed.nn as dist_nn
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
    p.add_argument("--proj-hidden", type=int, default=2048, help="hidden width of the projection MLP (SimCLR: 2048)")
    p.add_argument("--proj-dim", type=int, default=128, help="output width of the projection MLP (SimCLR: 128)")
    p.add_argument("--temperature", "--tau", dest="temperature", type=float, default=0.1,
                   help="NT-Xent temperature tau (SimCLR: 0.1 for its large batches)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 100; 60 on the demo)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch, split over torchrun processes (default 64; SimCLR: 4096; 32 on the demo)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"], help="AdamW, or LARS for large batches")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW; SimCLR: LARS at 0.3 x batch / 256)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (AdamW; SimCLR: 1e-6 with LARS)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of all steps, then cosine")
    p.add_argument("--knn-every", type=int, default=5, help="epochs between kNN evaluations (0: never)")
    p.add_argument("--eval-data", default=None, help="labelled set for the kNN monitor: class folders or a CSV "
                   "(path,label); 'demo' on the demo data")
    p.add_argument("--knn-k", type=int, default=data.KNN_K, help="neighbours of the weighted kNN monitor")
    data.add_run_args(p, "simclr")  # the run flags: --out, --resume, --workers, --seed ...
    args = data.parse_args(p, argv)
    # the demo's train splits have 168-192 images: a smaller batch gives the steps these methods need in minutes
    data.set_defaults(args, epochs=(60, 100), batch_size=(32, 64))
    if args.temperature <= 0:
        p.error("--temperature must be > 0")
    data.set_defaults(args, arch=("resnet18", "resnet50"), size=(64, 224), eval_data=("demo", None))
    if args.data is None:  # with --data and no --aug, main() chooses the preset from the images
        args.aug = args.aug or ("xray" if args.demo == "xray" else "cytology-A")
    if args.aug:
        args.channels = args.channels or (3 if args.aug.startswith("cytology") else 1)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: the other images of the batch are the negatives")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if args.epochs < 1 or args.size < 16:
        p.error("--epochs must be >= 1 and --size >= 16")
    return args


# ---------------------------------------------------------------------------------------------- model
class SimCLR(nn.Module):
    """Encoder f and projection MLP g (Linear, BatchNorm, ReLU, Linear), SimCLR v2's head."""

    def __init__(self, arch, weights, hidden, out_dim):
        super().__init__()
        self.encoder, dim = data.image_encoder(arch, weights)
        self.projector = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                       nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x1, x2):
        return self.projector(self.encoder(x1)).float(), self.projector(self.encoder(x2)).float()


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as SimCLR uses at large batch.
    Biases and BatchNorm parameters (1-D) get neither weight decay nor the trust ratio, as in SimCLR."""

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
def gather(x, world):
    """The global batch on every rank; its backward carries each rank's gradient home (torch.distributed.nn)."""
    return torch.cat(dist_nn.all_gather(x), 0) if world > 1 else x


def nt_xent(z1, z2, temperature=0.1, z1_all=None, z2_all=None, offset=0):
    """NT-Xent (Chen et al. 2020, eq. 1), mean over the 2n anchors of this process.

    z1, z2: (n, D) projections of the two views; z1_all, z2_all: the global batch (N, D) with
    these rows at offset (default: z1, z2). Each anchor's positive is its twin; its negatives are
    the other 2N - 2 views. Cosine similarity, so the scale of z does not matter.
    """
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    n, n_global = z1.shape[0], z1_all.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = F.normalize(torch.cat([z1_all, z2_all]), dim=1)
    logits = anchors @ candidates.T / temperature
    idx = torch.arange(n, device=z1.device) + offset
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, torch.cat([idx, idx + n_global])] = float("-inf")  # a view is not its own negative
    return F.cross_entropy(logits, torch.cat([idx + n_global, idx]))


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(step, total, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = get_args(argv)
    run = data.Run(args, "simclr")  # process group, device, seeds, run folder, checkpoint to resume from
    dataset = data.pretraining_images(args, run)  # uint8 images; --aug chosen from them when not given
    augment = data.BatchAugment(args.aug, args.size, args.channels)  # both views drawn on the device
    loader = run.loader(dataset)

    model = run.prepare(SimCLR(args.arch, args.weights, args.proj_hidden, args.proj_dim))
    if args.optimizer == "lars":
        optimizer = LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * len(loader)
    warmup = max(1, int(args.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    run.checkpoint(method="simclr", arch=args.arch, encoder=model.encoder, model=model, optimizer=optimizer,
                   scheduler=scheduler)
    if args.compile:
        model.encoder.compile()  # in place: the state dict keeps torchvision's key names
    train_model = run.distribute(model)  # DDP over the model under torchrun, else the model
    knn = data.KNNMonitor(args, run) if args.eval_data and args.knn_every and run.master else None
    run.start(f"simclr: {len(dataset)} images, {args.arch}, aug {args.aug}, optimizer {args.optimizer}")
    if knn and run.step == 0:
        knn(model.encoder, -1)  # the same encoder before any training: the baseline pretraining must beat

    for epoch, rng in run.epochs():  # rng: this epoch's augmentation draws (a torch.Generator)
        for x, _ in run.batches(loader):
            # ALGORITHM: two views, one encoder, NT-Xent over the global batch
            x = x.to(run.device, non_blocking=True)
            x1, x2 = augment(x, rng), augment(x, rng)
            with run.amp:
                z1, z2 = train_model(x1, x2)
            # the gather's backward sums each rank's share and DDP averages: one process's gradient on that batch
            z1_all, z2_all = gather(z1, run.world), gather(z2, run.world)
            loss = nt_xent(z1, z2, args.temperature, z1_all, z2_all, run.rank * z1.shape[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if run.track(loss):
                spread = data.embedding_spread(z1_all)
                run.log(spread=spread)
                run.warn_once(spread < 0.1, f"step {run.step}: the embeddings collapsed (spread {spread:.3f} < 0.1)")
        if knn:
            knn(model.encoder, epoch)
    run.finish()
    if run.master:
        print(f"checkpoint: {run.ckpt_path}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, data.BadImageError) as e:  # the message, not a traceback
        raise SystemExit(f"simclr.py: {e}") from None
