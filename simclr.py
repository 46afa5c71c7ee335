"""SimCLR: image-only contrastive pretraining with the NT-Xent loss.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
https://arxiv.org/abs/2002.05709 . Two augmented views of each image go through one encoder and a
projection MLP; each view must pick out its twin among the 2N - 1 other views of the batch
(NT-Xent, eq. 1). Under torchrun the views are all-gathered with their gradients, so the negatives
come from the global batch.

    python simclr.py                                   # the demo chest radiographs, xray augmentation (~2 min, 2 cores)
    python simclr.py --demo cytology --aug cytology-D  # the demo cytology images, blur + speckle group
    python simclr.py --data /data/mura/train --aug xray --arch resnet50 --weights imagenet
    torchrun --nproc_per_node=8 simclr.py --data /data/chexpert/train --batch-size 4096 --optimizer lars --lr 4.8

Learning rate: AdamW takes --lr as it is. LARS follows the paper's batch scaling: give it
lr = 0.3 x batch / 256 (4.8 at batch 4096); SimCLR's square-root rule 0.075 x sqrt(batch) suits small batches.
The X-ray augmentation study found SimCLR sensitive to class imbalance and to the augmentations:
repeat that comparison with --aug (one flag per setting) and the kNN monitor.
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
    p.add_argument("--demo", default="xray", choices=["xray", "cytology"], help="which demo images, without --data")
    p.add_argument("--aug", default=None, choices=data.PRESETS, help="augmentation preset (default: from the images with --data, grayscale or DICOM: xray, colour: cytology-A; demo: xray, or cytology-A for --demo cytology)")
    p.add_argument("--clahe", action="store_true", help="CLAHE on each image before the augmentation (needs scikit-image)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3],
                   help="image channels read (default 3 for cytology presets, else 1)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 224; 64 on the demo data)")
    p.add_argument("--cache-dir", default=data.default_cache_dir(), help="decode cache folder; '' decodes on the fly")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed each epoch) instead of stopping")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    # model
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet50"], help="encoder (default resnet50, as in SimCLR; resnet18 on the demo)")
    p.add_argument("--weights", default="none", choices=["imagenet", "none"], help="encoder initialisation")
    p.add_argument("--proj-hidden", type=int, default=2048, help="hidden width of the projection MLP (SimCLR: 2048)")
    p.add_argument("--proj-dim", type=int, default=128, help="output width of the projection MLP (SimCLR: 128)")
    # loss
    p.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature (SimCLR: 0.1 for its large batches)")
    # optimisation
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 100, SimCLR's ablations; 1000 for its best; 60 on the demo)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, split over torchrun processes (default 64, one GPU's share; SimCLR: 4096 with LARS; 32 on the demo)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"], help="AdamW (small batches), or LARS (SimCLR's, for large batches)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW; SimCLR: LARS at 0.3 x batch / 256)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (AdamW; SimCLR: 1e-6 with LARS)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of all steps, then cosine (SimCLR: 10 epochs, then cosine)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit; for smoke tests)")
    # running
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower); with --resume, the same curve")
    p.add_argument("--out", default=None, help="run folder (default runs/simclr-TIME)")
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
    # the demo's train splits have 168-192 images: a smaller batch gives the steps these methods need in minutes
    args.epochs = args.epochs if args.epochs is not None else (60 if demo else 100)
    args.batch_size = args.batch_size if args.batch_size is not None else (32 if demo else 64)
    if demo:  # with --data and no --aug, main() picks the preset from the images
        args.aug = args.aug or ("xray" if args.demo == "xray" else "cytology-A")
    if args.aug:
        args.channels = args.channels or (3 if args.aug.startswith("cytology") else 1)
    args.eval_data = args.eval_data or ("demo" if demo else None)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: the other images of the batch are the negatives")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if args.temperature <= 0:
        p.error("--temperature must be > 0")
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


class SimCLR(nn.Module):
    """Encoder f and projection MLP g (Linear, BatchNorm, ReLU, Linear), SimCLR v2's head."""

    def __init__(self, arch, weights, hidden, out_dim):
        super().__init__()
        self.encoder, dim = image_encoder(arch, weights)
        self.projector = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, out_dim))

    def forward(self, x1, x2):
        return self.projector(self.encoder(x1)).float(), self.projector(self.encoder(x2)).float()


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as SimCLR uses at large batch.

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


# ---------------------------------------------------------------------------------------------- losses

def nt_xent(z1, z2, temperature=0.1, z1_all=None, z2_all=None, offset=0):
    """NT-Xent (Chen et al. 2020, eq. 1), mean over the 2n anchors of this process.

    z1, z2: (n, D) projections of the two views; z1_all, z2_all: the global batch (N, D) with
    these rows at offset (default: z1, z2). Each anchor's positive is its twin; its negatives are
    the other 2N - 2 views. Cosine similarity, so the scale of z does not matter.
    """
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    n, big = z1.shape[0], z1_all.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)
    cands = F.normalize(torch.cat([z1_all, z2_all]), dim=1)
    logits = anchors @ cands.T / temperature
    idx = torch.arange(n, device=z1.device) + offset
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, torch.cat([idx, idx + big])] = float("-inf")  # a view is not its own negative
    return F.cross_entropy(logits, torch.cat([idx + big, idx]))


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

    out = Path(args.out or f"runs/simclr-{time.strftime('%Y%m%d-%H%M%S')}")
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

    model = SimCLR(args.arch, args.weights, args.proj_hidden, args.proj_dim).to(device)
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
        print(f"simclr: {len(dataset)} images, {args.arch}, aug {args.aug}, optimizer {args.optimizer}, "
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
                z1, z2 = ddp(x1, x2)
            # negatives from the global batch; the gather's backward sums each rank's share and DDP
            # averages, which together give exactly the gradient of one process on that batch
            z1_all, z2_all = gather(z1, world), gather(z2, world)
            loss = nt_xent(z1, z2, args.temperature, z1_all, z2_all, rank * z1.shape[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % args.log_every == 0 or step == 1:
                lv = loss.detach()
                if world > 1:
                    dist.all_reduce(lv)
                    lv /= world
                lv = float(lv)
                if not math.isfinite(lv):
                    raise SystemExit(f"loss is {lv} at step {step} (epoch {epoch}): stopping; the last good "
                                     f"checkpoint, if any, is untouched at {ckpt_path}")
                spread = embedding_spread(z1_all.detach())
                rec = {"step": step, "epoch": epoch, "loss": lv, "lr": scheduler.get_last_lr()[0], "spread": spread,
                       "img_per_s": round(i * args.batch_size / max(time.time() - t0, 1e-9), 1)}
                if spread < 0.1 and not warned and master:
                    warned = True
                    warnings.warn(f"step {step}: the embeddings have collapsed (spread {spread:.3f} < 0.1)")
                if master:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{lv:.3f}", spread=f"{spread:.2f}")
            if args.max_steps and step >= args.max_steps:
                break
        if master:
            if dataset.skipped:
                print(dataset.report_skipped(), file=sys.stderr)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise SystemExit(f"loss is {lv} at the end of epoch {epoch}: stopping; checkpoint untouched at {ckpt_path}")
            atomic_save({"method": "simclr", "arch": args.arch, "encoder": raw.encoder.state_dict(),
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
        raise SystemExit(f"simclr.py: {e}") from None
