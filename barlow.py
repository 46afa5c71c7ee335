"""Barlow Twins and attention-guided Barlow Twins (AGBT): image-only self-supervised pretraining.

Barlow Twins: Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
https://arxiv.org/abs/2103.03230 . Two augmented views of each image go through one encoder and a
projector; the cross-correlation matrix C of the two views' standardised embeddings is pushed
towards the identity: L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2 (eq. 1).

AGBT (`--loss agbt`), from the cervical-cytology study: an attention subnetwork k (a small MLP ending
in a sigmoid) reads each view's projection p = h(f(x)) and gives a weight per embedding dimension,
a1 = k(p1), a2 = k(p2); the views share a = sqrt(a1 * a2 + eps) so both are reweighted alike and
stay in phase, and the unchanged Barlow Twins loss is applied to z1 = p1 * a, z2 = p2 * a. No
auxiliary loss. The attention acts on the projector's output, the space the loss sees, because that
is where it can choose which dimensions of a sample's embedding the correlation rewards. It is
per sample: a weight constant over the batch would be removed by the per-dimension
standardisation, so with a = 1 everywhere AGBT is exactly Barlow Twins.

    python barlow.py                                  # Barlow Twins on the demo cytology images
    python barlow.py --loss agbt --aug cytology-B     # AGBT with the colour augmentation group
    python barlow.py --data /data/herlev --aug cytology-A --arch resnet50 --weights imagenet
    torchrun --nproc_per_node=8 barlow.py --data /data/hicervix/images --batch-size 1024

The worked example of the cytology study is a test (tests/test_barlow.py): its C matrix is right,
its two final sums are not, and the loss of that example is 0.6580, not the 2.0586 it prints.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import data


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default=None, help="folder of images/DICOMs or a CSV of paths; none: the demo data")
    p.add_argument("--image-col", default="path", help="CSV column with the image path")
    p.add_argument("--demo", default="cytology", choices=["cytology", "xray"], help="which demo images, without --data")
    p.add_argument("--aug", default=None, choices=data.PRESETS, help="augmentation preset (default: from the images with --data, grayscale or DICOM: xray, colour: cytology-A; demo: xray, or cytology-A for --demo cytology)")
    p.add_argument("--clahe", action="store_true", help="CLAHE on each image before the augmentation (needs scikit-image)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3],
                   help="image channels read (default 3 for cytology presets, else 1)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 224; 64 on the demo data)")
    p.add_argument("--cache-dir", default=data.default_cache_dir(), help="decode cache folder; '' decodes on the fly")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed each epoch) instead of stopping")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    # model
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet50"], help="encoder (default resnet50, as in Barlow Twins; resnet18 on the demo)")
    p.add_argument("--weights", default="none", choices=["imagenet", "none"], help="encoder initialisation")
    p.add_argument("--projector", default=None, help="projector widths (default 8192-8192-8192, Barlow Twins'; 1024-1024-1024 on the demo)")
    p.add_argument("--attn-hidden", type=int, default=512, help="AGBT: hidden width of the attention MLP k")
    # loss
    p.add_argument("--loss", default="barlow", choices=["barlow", "agbt"], help="Barlow Twins or attention-guided Barlow Twins")
    p.add_argument("--lambd", type=float, default=0.005, help="weight of the redundancy (off-diagonal) term (Barlow Twins: 5e-3)")
    p.add_argument("--agbt-eps", type=float, default=1e-6, help="AGBT: eps in a = sqrt(a1 * a2 + eps)")
    # optimisation
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 100; Barlow Twins: 1000; 40 on the demo)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over torchrun processes (one GPU's share; Barlow Twins: 2048 with LARS)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (Barlow Twins: LARS at 0.2, 0.0048 for biases and BatchNorm)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (AdamW; Barlow Twins: 1.5e-6 with LARS)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"],
                   help="AdamW, or LARS for large batches (Barlow Twins: LARS, lr 0.2 (biases and BatchNorm 0.0048), weight decay 1.5e-6, batch 2048; one lr for every parameter here)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of all steps, then cosine (Barlow Twins: 10 epochs, then cosine)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit; for smoke tests)")
    # running
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower); with --resume, the same curve")
    p.add_argument("--out", default=None, help="run folder (default runs/LOSS-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--knn-every", type=int, default=5, help="epochs between kNN evaluations (0: never)")
    p.add_argument("--eval-data", default=None,
                   help="labelled set for the kNN monitor: class folders or a CSV (path,label); 'demo' on the demo data")
    p.add_argument("--knn-k", type=int, default=10, help="neighbours in the kNN monitor")
    args = p.parse_args(argv)
    if args.resume:  # continue the run as it was started: its args.json, then the flags given again on top
        saved = Path(args.out or "") / "args.json"
        if not args.out or not saved.is_file():
            p.error(f"--resume needs --out, a run folder with its args.json ({saved} not found)")
        for a in p._actions:  # parse again with no defaults: only the flags given now remain
            a.default = argparse.SUPPRESS
        given = vars(p.parse_args(argv))
        first = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("max_steps", "overrides")}
        args = argparse.Namespace(**{**vars(args), **first, **given})
        args.overrides = {k: v for k, v in given.items() if k not in ("resume", "out") and first.get(k) != v}
    demo = args.data is None
    args.arch = args.arch or ("resnet18" if demo else "resnet50")
    args.size = args.size if args.size is not None else (64 if demo else 224)
    # demo: 168 train-split cytology images make 2 batches of 64 an epoch; 40 epochs keep the 80 steps the
    # demo ran when it pretrained on all 280 (including finetune.py's val and test images)
    args.epochs = args.epochs if args.epochs is not None else (40 if demo else 100)
    args.projector = args.projector or ("1024-1024-1024" if demo else "8192-8192-8192")
    if demo:  # with --data and no --aug, main() picks the preset from the images
        args.aug = args.aug or ("xray" if args.demo == "xray" else "cytology-A")
    if args.aug:
        args.channels = args.channels or (3 if args.aug.startswith("cytology") else 1)
    args.eval_data = args.eval_data or ("demo" if demo else None)
    try:
        widths = [int(w) for w in args.projector.split("-")]
    except ValueError:
        p.error(f"--projector must look like 2048-2048-2048, got {args.projector!r}")
    if len(widths) < 1 or min(widths) < 1:
        p.error("--projector needs at least one positive width")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: the cross-correlation is estimated over the batch")
    if args.epochs < 1 or args.size < 16:
        p.error("--epochs must be >= 1 and --size >= 16")
    return args


# ---------------------------------------------------------------------------------------------- model

def image_encoder(arch, weights):
    """A torchvision model without its classifier, and its feature dimension. Keys stay torchvision's."""
    try:
        net = getattr(torchvision.models, arch)(weights="DEFAULT" if weights == "imagenet" else None)
    except Exception as e:  # no network, no cached weights
        raise SystemExit(f"could not get ImageNet weights for {arch} ({type(e).__name__}: {e}); "
                         "offline? use --weights none, or copy the file into torchvision's cache (~/.cache/torch)") from None
    if hasattr(net, "fc"):
        dim, net.fc = net.fc.in_features, nn.Identity()
    else:
        dim, net.classifier = net.classifier.in_features, nn.Identity()
    return net, dim


class BarlowTwins(nn.Module):
    """Encoder f, projector h (linear layers with BatchNorm + ReLU between), and for AGBT the attention k."""

    def __init__(self, arch, weights, widths, attn_hidden=None):
        super().__init__()
        self.encoder, dim = image_encoder(arch, weights)
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
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as the paper uses at large batch.

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


def embedding_spread(z):
    """Per-dimension std across the batch of the L2-normalised embeddings, times sqrt(D): ~1 spread, 0 collapsed."""
    return float(F.normalize(z, dim=1).std(0, unbiased=False).mean()) * math.sqrt(z.shape[1])


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, k=10):
    """Top-1 accuracy of a k-nearest-neighbour majority vote (cosine similarity) on frozen features."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    idx = (test_f @ train_f.T).topk(min(k, len(train_f)), dim=1).indices
    votes = F.one_hot(train_y[idx], int(train_y.max()) + 1).sum(1)
    return float((votes.argmax(1) == test_y).float().mean())


# ---------------------------------------------------------------------------------------------- schedule

def lr_factor(step, total, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------- main

def setup_distributed(device_arg):
    """(rank, world size, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. NCCL on GPU, gloo on CPU."""
    cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return 0, 1, torch.device(("cuda" if device_arg == "auto" else device_arg) if cuda else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def gather(x, world):
    """All-gather that carries gradients back to every rank (torch.distributed.nn)."""
    return torch.cat(dist_nn.all_gather(x), 0) if world > 1 else x


def to_cpu(obj):
    """The same nesting of dicts and lists with every tensor on the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def atomic_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(to_cpu(obj), tmp)  # CPU tensors: a GPU run's checkpoint loads on any machine
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def labelled_eval_set(spec, demo_kind):
    """(paths, labels, group ids) for the kNN monitor: the demo's labels (without finetune.py's test
    patients), class folders, or a CSV."""
    if spec == "demo":
        paths, labels, _, ids = data.demo_labelled("cytology" if demo_kind == "cytology" else "rsna", without_test=True)
        return paths, labels, ids
    if spec.endswith(".csv"):
        paths, labels, _ = data.read_label_csv(spec)
    else:
        paths, labels, _ = data.read_class_folders(spec)
    return paths, labels, paths


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    local_bs = args.batch_size // world
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    out = Path(args.out or f"runs/{args.loss}-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not args.resume:
        raise SystemExit(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if args.resume and not ckpt_path.exists():
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")

    paths = data.demo_images(args.demo) if args.data is None else data.unlabelled_images(args.data, args.image_col)
    if len(paths) < args.batch_size:
        raise SystemExit(f"only {len(paths)} images, fewer than --batch-size {args.batch_size}")
    if args.aug is None:
        args.aug = data.preset_for(paths)
        args.channels = args.channels or (3 if args.aug.startswith("cytology") else 1)
        if master:
            print(f"--aug {args.aug}: chosen from the images (grayscale or DICOM: xray; colour: cytology-A); "
                  "pass --aug to choose another")
    cache = args.cache_dir or None
    if world > 1 and not master:
        dist.barrier()  # rank 0 builds the decode cache first; the others then only read it
    # workers only read uint8 images, cached a little larger than the crop; both views are drawn on the device
    dataset = data.ImageDataset(paths, None, data.CLAHE() if args.clahe else None, size=data.train_side(args.size),
                                channels=args.channels, cache_dir=cache, skip_bad=args.skip_bad, workers=args.workers,
                                progress=master, uint8=True)
    augment = data.BatchAugment(args.aug, args.size, args.channels)
    if world > 1 and master:
        dist.barrier()
    if len(dataset) < args.batch_size:  # --skip-bad can leave fewer readable images than one batch
        raise SystemExit(f"only {len(dataset)} readable images of {len(paths)} ({len(dataset.skipped)} unreadable, "
                         f"skipped), fewer than --batch-size {args.batch_size}")

    widths = [int(w) for w in args.projector.split("-")]
    model = BarlowTwins(args.arch, args.weights, widths, args.attn_hidden if args.loss == "agbt" else None).to(device)
    if world > 1 and cuda:  # BatchNorm statistics over the global batch (SyncBatchNorm is GPU-only; on CPU, per process)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if args.optimizer == "lars":
        optimizer = LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(dataset) // args.batch_size
    total = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, max(1, int(args.warmup * total))))
    start_epoch, step = 0, 0
    if args.resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
    if args.compile:
        model.encoder.compile()  # in place: the state dict keeps torchvision's key names
    raw = model
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) if world > 1 else model

    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed,
                                                              drop_last=True)
    # persistent workers: they draw nothing random (the sampler, in this process, reshuffles each epoch); their
    # base seed comes from a generator of the loader's own, so the global stream does not depend on the
    # epoch the workers started in
    loader = torch.utils.data.DataLoader(dataset, batch_size=local_bs, sampler=sampler, num_workers=args.workers,
                                         pin_memory=cuda, drop_last=True, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))
    knn = None
    if args.eval_data and args.knn_every and master:
        ep, ey, eids = labelled_eval_set(args.eval_data, args.demo)
        eval_ds = data.ImageDataset(ep, None, data.eval_transform(args.size), size=args.size, channels=args.channels,
                                    cache_dir=cache, skip_bad=args.skip_bad)
        ey = torch.as_tensor(np.asarray(ey)[eval_ds.index])
        bank, query = data.patient_split([eids[i] for i in eval_ds.index], (0.5, 0.5), seed=0)
        knn = (torch.utils.data.DataLoader(eval_ds, batch_size=128, num_workers=0), ey, bank, query)

    if master:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume:  # the first args.json stays; each resume is recorded beside it
            with open(out / "resumes.jsonl", "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": args.overrides}) + "\n")
            print(f"resuming {out} as it was started" + (f", with overrides {args.overrides}" if args.overrides else ""))
        else:
            (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        print(f"{args.loss}: {len(dataset)} images, {args.arch}, projector {args.projector}, aug {args.aug}, "
              f"{world} process(es) on {device}, run folder {out}")
    log = open(out / "log.jsonl", "a") if master else None

    def knn_eval(epoch):
        loader_, ey, bank, query = knn
        raw.eval()
        with torch.no_grad(), amp:
            feats = torch.cat([raw.encoder(x.to(device)).float().cpu() for x, _ in loader_])
        raw.train()
        acc = knn_accuracy(feats[bank], ey[bank], feats[query], ey[query], args.knn_k)
        log.write(json.dumps({"epoch": epoch, "step": step, f"knn_top1@{args.knn_k}": acc}) + "\n")
        log.flush()
        print(f"epoch {epoch}: kNN top-1 accuracy {acc:.3f}" + (" (random weights)" if epoch < 0 else ""))

    if knn and start_epoch == 0:
        knn_eval(-1)  # the same encoder before any training: the baseline pretraining must beat
    warned = False
    ddp.train()
    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness is a function of (seed, epoch): a resumed run draws what it would have
        torch.manual_seed(args.seed * 100003 + epoch)
        views = data.epoch_generator(device, args.seed, epoch, rank)
        sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not master, leave=False)
        t0 = time.time()
        for i, (x, _) in enumerate(bar, 1):
            x = x.to(device, non_blocking=True)
            x1, x2 = augment(x, views), augment(x, views)
            if cuda:
                x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
            with amp:
                p1, p2, a1, a2 = ddp(x1, x2)
            # the loss of the global batch, on every rank; the gather's backward sums each rank's share
            # and DDP averages, which together give exactly the gradient of one process on that batch
            p1, p2 = gather(p1, world), gather(p2, world)
            if args.loss == "agbt":
                a1, a2 = gather(a1, world), gather(a2, world)
                loss, on, off = agbt_loss(p1, p2, a1, a2, args.lambd, args.agbt_eps)
            else:
                loss, on, off = barlow_twins_loss(p1, p2, args.lambd)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % args.log_every == 0 or step == 1:
                lv = float(loss.detach())  # the same on every rank
                if not math.isfinite(lv):
                    raise SystemExit(f"loss is {lv} at step {step} (epoch {epoch}): stopping; the last good "
                                     f"checkpoint, if any, is untouched at {ckpt_path}")
                z1 = (p1 * shared_attention(a1, a2, args.agbt_eps) if a1 is not None else p1).detach()
                z2 = (p2 * shared_attention(a1, a2, args.agbt_eps) if a1 is not None else p2).detach()
                spread, offd = embedding_spread(z1), off_diagonal_mean(z1, z2)
                rec = {"step": step, "epoch": epoch, "loss": lv, "invariance": float(on.detach()), "redundancy": float(off.detach()),
                       "lr": scheduler.get_last_lr()[0], "spread": spread, "offdiag_abs_c": offd,
                       "img_per_s": round(i * args.batch_size / max(time.time() - t0, 1e-9), 1)}
                if spread < 0.1 and not warned and master:
                    warned = True
                    warnings.warn(f"step {step}: the embeddings have collapsed (spread {spread:.3f} < 0.1)")
                if master:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{lv:.3f}", spread=f"{spread:.2f}", offdiag=f"{offd:.3f}")
            if args.max_steps and step >= args.max_steps:
                break
        if master:
            if dataset.skipped:
                print(dataset.report_skipped(), file=sys.stderr)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise SystemExit(f"loss is {lv} at the end of epoch {epoch}: stopping; checkpoint untouched at {ckpt_path}")
            atomic_save({"method": args.loss, "arch": args.arch, "encoder": raw.encoder.state_dict(),
                         "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "args": vars(args)}, ckpt_path)
            if knn and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                knn_eval(epoch)
        if args.max_steps and step >= args.max_steps:
            break
    if master:
        log.close()
        print(f"checkpoint: {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, data.BadImageError) as e:  # bad input: the message, not a traceback
        raise SystemExit(f"barlow.py: {e}") from None
