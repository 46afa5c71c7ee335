"""ConVIRT: contrastive image-report pretraining, with a softmax (InfoNCE) or a sigmoid (SigLIP) loss.

Zhang et al. 2020, "Contrastive Learning of Medical Visual Representations from Paired Images and
Text", https://arxiv.org/abs/2010.00747 ; SigLIP: Zhai et al., ICCV 2023, https://arxiv.org/abs/2303.15343

A ResNet encodes an augmented radiograph, a Hugging Face text encoder one random sentence of its
report; two projection heads map both to a shared, L2-normalised space where matching pairs are
pulled together and the other pairs of the batch pushed apart.

    python convirt.py --loss sigmoid                     # demo data, builds itself, a few minutes on a CPU
    python convirt.py --loss softmax --data /data/mimic-cxr-jpg --metadata-csv mimic-cxr-2.0.0-metadata.csv \
        --text-model emilyalsentzer/Bio_ClinicalBERT --freeze-text-layers 6 --weights imagenet
    torchrun --nproc_per_node=8 convirt.py --loss sigmoid --data /data/mimic-cxr-jpg ...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 convirt.py ...
    python data.py demo /tmp/pairs --studies 4096 --size 256   # a larger phantom pair set for GPU work; it
                                                               # prints the convirt.py command that uses it

Text pooling: max over the token outputs (padding masked), as ConVIRT does (`--text-pool`).

Sigmoid loss collapse (derived here, measured in the README). SigLIP's loss for one image row is
    l_i = w * softplus(-a_ii) + sum_{j != i} softplus(a_ij),   a_ij = t u_i.v_j + b,
with N pairs in the batch and w the weight of the positive (SigLIP: w = 1). If both towers map
every input to one point, every logit takes one value a and l = w softplus(-a) + (N-1) softplus(a):
convex in a, least at sigmoid(a) = w / (w + N - 1), i.e. the prior logit a* = log(w / (N-1)), where
    L_c(N, w) = w log((w + N - 1) / w) + (N - 1) log((w + N - 1) / (N - 1))
(w = 1: log N + (N-1) log(N/(N-1)), 4.45 at N = 32; w = N-1: 2 (N-1) log 2, 42.97 at N = 32).
That is the collapse value, logged as `collapse_loss` in the units of `loss`. A run is collapsed
when it sits there: the embeddings' per-dimension standard deviation across the batch, times
sqrt(D) (`spread`: about 1 for directions spread like random ones, 0 for a single point), below
0.1, and the diagonal gap (`gap`: mean diagonal minus mean off-diagonal cosine) near 0.

Why runs fall into it. Collapse is a cheap way down whenever the loss starts above L_c: moving
every embedding the same way shifts all N^2 logits at once, and the towers do that far faster
than the single scalar b can (one Adam step moves b by lr, the towers' thousands of weights each by
lr). SigLIP's b = -10 is the prior logit -log(N-1) of its batch of 32k; at N = 32 it starts the
loss at ~10 against L_c = 4.45, a descent of 5.5 that collapse alone delivers. The old heuristic
here (b = -log(N-1) with positives weighted N-1) was worse: under that weighting the prior logit
is 0, not -log(N-1), so the loss started at ~108 against L_c = 43, and every run we measured slid
down to 43 and stayed. A second cheap way to one point: a bias in the projection's last layer gets
the same Adam step per coordinate as every weight and moves every embedding along one vector.

The heuristic (on by default with --loss sigmoid; --no-heuristic gives plain SigLIP):
  1. positives weighted w = N-1, so the N positives and the N(N-1) negatives weigh the same;
  2. b initialised at the prior logit of that weighted loss, log(w / (N-1)) = 0, so the loss
     starts at L_c and collapse offers no descent: the only way down is to tell pairs apart;
  3. a floor t >= 2 log(N-1) under the temperature (t_floor): with b = -t/2, a cosine swing of 1
     then carries a positive to odds (N-1):1 and a negative to 1:(N-1);
  4. (all losses) no bias in the projections' last layer (CLIP's projections have none), and t',
     b without weight decay and t <= 100, as in open_clip.
Measured (README, "Does it collapse?"; benchmarks/convirt_scale.py): on the demo (ResNet-18, 64 px,
N = 32, CPU) the default run leaves the collapse value after ~170-260 steps in every seed 0-4 and
ends at 0.81-0.86 x L_c, spread 0.40-0.55, held-out retrieval above chance. Not yet measured at
ResNet-50 / 224 px on a GPU.
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
    p.add_argument("--data", default=None, help="MIMIC-CXR(-JPG) root (files/pXX/...) or a CSV of image,report; none: the demo data")
    p.add_argument("--image-col", default="path", help="CSV column with the image path")
    p.add_argument("--report-col", default="report", help="CSV column with the report text or a .txt path")
    p.add_argument("--metadata-csv", default=None, help="mimic-cxr-2.0.0-metadata.csv: keep frontal views (PA/AP) only")
    p.add_argument("--split-csv", default=None, help="mimic-cxr-2.0.0-split.csv: train on its 'train' split only")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 224; 64 on the demo data)")
    p.add_argument("--cache-dir", default=data.default_cache_dir(), help="decode cache folder; '' decodes on the fly")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed each epoch) instead of stopping")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--hflip", action="store_true",
                   help="random horizontal flips; off by default because reports name sides (left/right)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest sentence in tokens")
    # model
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet50", "densenet121"],
                   help="image encoder (default resnet50; resnet18 on the demo data)")
    p.add_argument("--weights", default="none", choices=["imagenet", "none"], help="image encoder initialisation (ConVIRT: imagenet; none downloads nothing)")
    p.add_argument("--text-model", default=None,
                   help="Hugging Face encoder name or path; none: a small BERT with a WordPiece vocabulary trained on the reports")
    p.add_argument("--freeze-text-layers", type=int, default=0, help="freeze the text embeddings and the first K layers (paper: 6)")
    p.add_argument("--text-pool", default="max", choices=["max", "mean", "cls"], help="pooling of the token outputs")
    p.add_argument("--proj-dim", type=int, default=512, help="shared embedding dimension (ConVIRT: 512)")
    # loss
    p.add_argument("--loss", default="sigmoid", choices=["softmax", "sigmoid"], help="InfoNCE or SigLIP pairwise loss")
    p.add_argument("--tau", type=float, default=0.1, help="softmax temperature (ConVIRT: 0.1)")
    p.add_argument("--lam", type=float, default=0.75, help="softmax weight of the image->text direction (ConVIRT: 0.75)")
    p.add_argument("--t-init", type=float, default=10.0, help="sigmoid: initial temperature t = exp(t') (SigLIP: 10)")
    p.add_argument("--b-init", type=float, default=-10.0, help="sigmoid: initial bias (SigLIP: -10); the heuristic replaces it")
    p.add_argument("--no-heuristic", action="store_true", help="sigmoid: plain SigLIP, without the anti-collapse heuristic")
    # optimisation
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 50; 150 on the demo data)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, split over torchrun processes (default 64, for more negatives; ConVIRT: 32, as on the demo data)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the image tower, heads, t and b (ConVIRT: Adam 1e-4; here the course study's 3e-4: on the demo 1e-3 collapsed the sigmoid loss and 3e-4 gave the best held-out retrieval for both losses)")
    p.add_argument("--text-lr", type=float, default=None,
                   help="learning rate of the text encoder (default 3e-5 for a pretrained --text-model; --lr for the demo BERT, which starts from scratch)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (ConVIRT: 1e-6; t' and b get none)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of all steps, then a cosine decay (ConVIRT halves the lr when its validation loss stalls: a fixed schedule resumes exactly)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit; for smoke tests)")
    # running
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower); with --resume, the same curve")
    p.add_argument("--out", default=None, help="run folder (default runs/convirt-LOSS-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--eval-every", type=int, default=5, help="epochs between retrieval evaluations (0: never)")
    p.add_argument("--eval-labels", default=None, help="CheXpert-style label CSV for retrieval (demo: the validate split's studies)")
    p.add_argument("--eval-root", default=None, help="image root for --eval-labels")
    p.add_argument("--eval-k", type=int, default=10, help="k of Precision@k")
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
    # demo: 192 pairs make 6 steps an epoch; at lr 3e-4 the loss sits on its collapse value for the
    # first ~250 steps, and 100 epochs ended at 0.88-0.91 x it, 150 well below (README: the seed table)
    args.epochs = args.epochs if args.epochs is not None else (150 if demo else 50)
    args.batch_size = args.batch_size if args.batch_size is not None else (32 if demo else 64)
    args.text_lr = args.text_lr if args.text_lr is not None else (3e-5 if args.text_model else args.lr)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: a contrastive loss needs negatives in the batch")
    if args.lr <= 0 or args.text_lr <= 0:
        p.error("--lr and --text-lr must be > 0")
    if args.freeze_text_layers < 0 or args.epochs < 1 or args.size < 16:
        p.error("--freeze-text-layers must be >= 0, --epochs >= 1 and --size >= 16")
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


def projection(dim_in, dim_out):
    """ConVIRT's projection head: one hidden layer with ReLU. No bias on the output: Adam moves a
    bias as fast as any weight, and one shared vector added to every embedding pulls them all to
    one point (the docstring's collapse; CLIP's projections have no bias either)."""
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out, bias=False))


def demo_text_model(reports, seed, max_words=3000):
    """A small BERT (2 layers, 128 wide) and a WordPiece tokenizer built from the reports: no download.

    The vocabulary is the reports' most frequent words plus every character, alone and as a
    '##' continuation, so any text tokenizes; it is built by counting, in a fixed order, because
    the tokenizers library's trainer breaks ties differently from run to run.
    """
    from collections import Counter

    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel

    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for r in reports for w, _ in pre.pre_tokenize_str(norm.normalize_str(r)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if w not in vocab][:max_words]
    tk = Tokenizer(WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = norm, pre
    tk.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=256)
    return tk.to_str(), BertModel(config, add_pooling_layer=False)


def wrap_tokenizer(tokenizer_json):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def hub_text_model(name):
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load text model {name!r}: no such model or path, or offline with no local copy "
                         f"({str(e).splitlines()[0]})") from None
    # BERT-style models come with a pooler over [CLS]; ConVIRT pools the token outputs itself, so the
    # pooler gets no gradient, and DDP, waiting for one, would stop at the second step
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler.requires_grad_(False)
    return tokenizer, model


def freeze_text_layers(model, k):
    """Freeze the embeddings and the first k transformer layers (ConVIRT froze 6 of ClinicalBERT's 12)."""
    if k == 0:
        return
    layers = getattr(getattr(model, "encoder", None), "layer", None) or getattr(getattr(model, "encoder", None), "layers", None)
    if layers is None or k > len(layers):
        raise SystemExit(f"--freeze-text-layers {k}: the text model has {len(layers) if layers else 'no'} encoder layers")
    for m in [model.embeddings] + list(layers[:k]):
        m.requires_grad_(False)


class ConVIRT(nn.Module):
    def __init__(self, arch, weights, text_model, proj_dim, pool, t_init, b_init):
        super().__init__()
        self.image_encoder, dim = image_encoder(arch, weights)
        self.image_proj = projection(dim, proj_dim)
        self.text_encoder = text_model
        self.text_proj = projection(text_model.config.hidden_size, proj_dim)
        self.pool = pool
        # SigLIP's t = exp(t'), b; unused by the softmax loss
        self.t_prime = nn.Parameter(torch.tensor(math.log(t_init)))
        self.bias = nn.Parameter(torch.tensor(float(b_init)))

    def encode_image(self, x):
        return F.normalize(self.image_proj(self.image_encoder(x)).float(), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].bool()
        if self.pool == "max":
            h = h.masked_fill(~m, torch.finfo(h.dtype).min).amax(1)
        elif self.pool == "mean":
            h = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            h = h[:, 0]
        return F.normalize(self.text_proj(h).float(), dim=-1)

    def forward(self, x, input_ids, attention_mask):
        return self.encode_image(x), self.encode_text(input_ids, attention_mask)


class RandomSentence:
    """One sentence drawn uniformly from a study's findings + impression: a function of (seed, epoch,
    study), so persistent DataLoader workers and a resumed run draw what an uninterrupted run draws.
    The training loop sets `epoch`, a shared-memory tensor every worker reads."""

    def __init__(self, seed):
        self.seed, self.epoch = seed, torch.zeros((), dtype=torch.int64).share_memory_()

    def __call__(self, target):
        study, sentences = target
        return sentences[int(np.random.default_rng([self.seed, int(self.epoch), study]).integers(len(sentences)))]


class Tokenize:
    """The DataLoader's collate: stack the uint8 images and tokenise the batch's sentences, in the
    workers, so the training loop only copies tensors to the device."""

    def __init__(self, tokenizer, max_tokens):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, batch):
        images, text = zip(*batch)
        tok = self.tokenizer(list(text), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return torch.stack(images), tok["input_ids"], tok["attention_mask"]


# ---------------------------------------------------------------------------------------------- losses

def infonce_loss(u, v, tau=0.1, lam=0.75, u_all=None, v_all=None, offset=0):
    """ConVIRT's bidirectional InfoNCE (eq. 2-4): lam * l(image->text) + (1 - lam) * l(text->image).

    u, v: (n, D) L2-normalised image and text embeddings of this process's pairs. u_all, v_all:
    the global batch (N, D) with these pairs at rows offset..offset+n (default: u, v themselves),
    so the negatives come from the whole batch. Mean over the local pairs.
    """
    u_all = u if u_all is None else u_all
    v_all = v if v_all is None else v_all
    target = torch.arange(u.shape[0], device=u.device) + offset
    l_iv = F.cross_entropy(u @ v_all.T / tau, target)  # each image against every report
    l_vi = F.cross_entropy(v @ u_all.T / tau, target)  # each report against every image
    return lam * l_iv + (1 - lam) * l_vi


def sigmoid_loss(u, v, t, b, v_all=None, offset=0, pos_weight=1.0):
    """SigLIP's pairwise loss (Zhai et al. 2023, eq. 1): -(1/N) sum_i sum_j log sigmoid(z_ij (t u_i.v_j + b)).

    z_ii = 1, z_ij = -1 otherwise. u: (n, D) local images; v_all: all N texts of the global batch
    (default v) with the local pairs at offset. pos_weight multiplies the positive terms (the
    heuristic's N-1). Sum over texts, mean over the local images.
    """
    v_all = v if v_all is None else v_all
    logits = t * (u @ v_all.T) + b
    z = -torch.ones_like(logits)
    idx = torch.arange(u.shape[0], device=u.device)
    z[idx, idx + offset] = 1.0
    w = torch.ones_like(logits)
    w[idx, idx + offset] = pos_weight
    return -(w * F.logsigmoid(z * logits)).sum(1).mean()


def t_floor(n):
    """The heuristic's floor under t: 2 log(N-1). With b = -t/2, a positive at cosine 1 then sits at
    logit log(N-1) (odds (N-1):1) and a negative at cosine 0 at -log(N-1): one cosine swing is enough
    to separate a positive from N-1 negatives. At t = 1 it is not, and runs collapse (docstring)."""
    return 2 * math.log(n - 1)


def prior_logit(n, pos_weight=1.0):
    """a* = log(w / (N-1)): the one logit that minimises the sigmoid loss when all pairs score alike
    (sigmoid(a*) = w / (w + N - 1)). SigLIP's w = 1: -log(N-1); the heuristic's w = N-1: 0."""
    return math.log(pos_weight / (n - 1))


def collapse_loss(n, pos_weight=1.0):
    """L_c(N, w) = w log((w+N-1)/w) + (N-1) log((w+N-1)/(N-1)): sigmoid_loss when all N^2 pairs
    score alike at the best common logit prior_logit(N, w); in the units of sigmoid_loss."""
    w = pos_weight
    return w * math.log((w + n - 1) / w) + (n - 1) * math.log((w + n - 1) / (n - 1))


def softmax_collapse_loss(n):
    """log N: infonce_loss when every score in a row is alike (each direction, so any lam)."""
    return math.log(n)


def collapse_verdict(loss, collapse_value, spread, evaluation=None, k=10):
    """(collapsed, one line): a run has not collapsed when its loss (the last epoch's mean) is at most
    0.9 x the collapse value, its last logged spread above 0.1 and, if it was evaluated,
    image->image and text->image P@k more than 0.02 above chance."""
    checks = [(loss <= 0.9 * collapse_value, f"loss {loss:.3f} = {loss / collapse_value:.2f} x the collapse value {collapse_value:.3f}"),
              (spread > 0.1, f"spread {spread:.3f}")]
    if evaluation:
        chance = evaluation["chance"]
        for d in ("i2i", "t2i"):
            p = evaluation[f"{d}_p@{k}"]
            checks.append((p > chance + 0.02, f"{d} P@{k} {p:.3f} (chance {chance:.3f})"))
    collapsed = not all(ok for ok, _ in checks)
    return collapsed, f"{'COLLAPSED' if collapsed else 'not collapsed'}: " + ", ".join(
        ("" if ok else "FAILS ") + what for ok, what in checks)


def collapse_advice(args):
    """What to change, for the flags this run used."""
    if args.loss == "sigmoid" and args.no_heuristic:
        return "Drop --no-heuristic: plain SigLIP at a small batch collapses (convirt.py's docstring says why)."
    return (f"Try a lower --lr (now {args.lr:g}) and more --epochs (now {args.epochs}): both losses sit on their "
            "collapse value for a while before they leave it, and a high lr can keep them there (README).")


def collapse_metrics(u, v):
    """gap: mean diagonal minus mean off-diagonal cosine; spread: per-dimension std across the
    batch times sqrt(D), the smaller of the two towers (1 ~ spread out, 0 = one point)."""
    s = u @ v.T
    n = s.shape[0]
    diag = s.diagonal().mean()
    off = (s.sum() - s.diagonal().sum()) / max(n * (n - 1), 1)
    spread = min(float(u.std(0, unbiased=False).mean()), float(v.std(0, unbiased=False).mean())) * math.sqrt(u.shape[1])
    return float(diag - off), spread


# ---------------------------------------------------------------------------------------------- schedule

def lr_factor(step, total, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------- evaluation

EVAL_QUERIES = {  # text->image queries per category, in the spirit of ConVIRT's CheXpert 8x200 queries
    "Cardiomegaly": ["The heart is enlarged.", "Cardiomegaly is present."],
    "Consolidation": ["There is focal consolidation.", "Patchy airspace opacity is present."],
    "Pleural Effusion": ["There is a pleural effusion.", "A pleural effusion blunts the costophrenic angle."],
    "Pneumothorax": ["There is a pneumothorax.", "Pneumothorax with visible pleural line."],
    "No Finding": ["The lungs are clear.", "No acute cardiopulmonary process."],
    "Atelectasis": ["There is bibasilar atelectasis."], "Edema": ["There is pulmonary edema."],
    "Pneumonia": ["Findings concerning for pneumonia."],
}


@torch.no_grad()
def retrieval_precision(img_emb, labels, k, txt_emb=None):
    """Precision@k per category (ConVIRT's CheXpert 8x200 protocol, on any labelled set).

    image->image: each image positive for category c queries all other images; a hit is a
    retrieved image with label c = 1. text->image: txt_emb {c: (q, D)} queries all images.
    Returns {category index: (image->image P@k, text->image P@k or None, chance = prevalence)}.
    """
    sim = img_emb @ img_emb.T
    sim.fill_diagonal_(-float("inf"))
    k = min(k, len(img_emb) - 1)
    top = sim.topk(k, dim=1).indices
    out = {}
    for c in range(labels.shape[1]):
        pos = labels[:, c] > 0
        if pos.sum() < 2:
            continue
        i2i = float(pos[top[pos]].float().mean())
        t2i = None
        if txt_emb is not None and c in txt_emb:
            t_top = (txt_emb[c] @ img_emb.T).topk(k, dim=1).indices
            t2i = float(pos[t_top].float().mean())
        out[c] = (i2i, t2i, float(pos.float().mean()))
    return out


def embed_images(model, loader, device, amp):
    model.eval()
    out = []
    with torch.no_grad(), amp:
        for x, _ in loader:
            out.append(model.encode_image(x.to(device)).float().cpu())
    return torch.cat(out)


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

    out = Path(args.out or f"runs/convirt-{args.loss}-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not args.resume:
        raise SystemExit(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if args.resume and not ckpt_path.exists():
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")

    # data: (image, report) pairs; on the demo, its train split, and its validate split for retrieval
    # (the test split's patients are never seen here)
    eval_paths = eval_labels = None
    if args.data is None:
        paths, reports, _ = data.demo_pairs(split="train")
        eval_paths = data.demo_pairs(split="validate")[0]
        root = data.demo_root() / "mimic"
        lp, ly, _ = data.read_chexpert_labels(root / "mimic-cxr-2.0.0-chexpert.csv", "zeros", image_root=root)
        lab = dict(zip(lp, ly))
        eval_labels = np.stack([lab[p] for p in eval_paths])
    elif args.data.endswith(".csv"):
        paths, reports, _ = data.csv_pairs(args.data, args.image_col, args.report_col)
    else:
        paths, reports, _ = data.mimic_cxr_pairs(args.data, args.metadata_csv, args.split_csv,
                                                 "train" if args.split_csv else None)
    if args.eval_labels:
        eval_paths, eval_labels, _ = data.read_chexpert_labels(args.eval_labels, "zeros", image_root=args.eval_root)
    sentences = [data.report_sentences(r) for r in reports]
    keep = [i for i, s in enumerate(sentences) if s]
    if len(keep) < len(paths) and master:
        print(f"{len(paths) - len(keep)} reports have no text and are left out", file=sys.stderr)
    paths, sentences = [paths[i] for i in keep], [sentences[i] for i in keep]
    if len(paths) < args.batch_size:
        raise SystemExit(f"only {len(paths)} image-report pairs, fewer than --batch-size {args.batch_size}")

    cache = args.cache_dir or None
    if world > 1 and not master:
        dist.barrier()  # rank 0 builds the decode cache first; the others then only read it
    # workers read uint8 images, cached a little larger than the crop, and tokenise; augmentation is on the device
    pick = RandomSentence(args.seed)
    dataset = data.ImageDataset(paths, list(enumerate(sentences)), None, pick, size=data.train_side(args.size), channels=1,
                                cache_dir=cache, skip_bad=args.skip_bad, workers=args.workers, progress=master, uint8=True)
    augment = data.BatchAugment("convirt", args.size, 1, hflip=args.hflip)
    if world > 1 and master:
        dist.barrier()
    if len(dataset) < args.batch_size:  # --skip-bad can leave fewer readable images than one batch
        raise SystemExit(f"only {len(dataset)} readable image-report pairs of {len(paths)} ({len(dataset.skipped)} unreadable, "
                         f"skipped), fewer than --batch-size {args.batch_size}")

    # text model: named, or the demo's small BERT (resumed runs rebuild it from the checkpoint)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False) if args.resume else None
    if args.text_model:
        tokenizer, text_model = hub_text_model(args.text_model)
        tokenizer_json = None
    else:
        tokenizer_json, text_model = demo_text_model(reports, args.seed)
        if state:
            from transformers import BertConfig, BertModel

            tokenizer_json = state["tokenizer_json"]
            text_model = BertModel(BertConfig.from_dict(state["text_config"]), add_pooling_layer=False)
        tokenizer = wrap_tokenizer(tokenizer_json)
    freeze_text_layers(text_model, args.freeze_text_layers)

    heuristic = args.loss == "sigmoid" and not args.no_heuristic
    n = args.batch_size
    pos_weight = n - 1 if heuristic else 1.0  # the positives weigh as much as the N-1 negatives
    b_init = prior_logit(n, pos_weight) if heuristic else args.b_init  # the loss starts at its collapse value
    collapse_value = collapse_loss(n, pos_weight) if args.loss == "sigmoid" else softmax_collapse_loss(n)
    model = ConVIRT(args.arch, args.weights, text_model, args.proj_dim, args.text_pool, args.t_init, b_init).to(device)
    if args.loss == "softmax":  # t and b unused: frozen, or DDP would wait for their gradients and skip averaging
        model.t_prime.requires_grad_(False)
        model.bias.requires_grad_(False)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and cuda:  # BatchNorm statistics over the global batch (SyncBatchNorm is GPU-only; on CPU, per process)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    text_params = [p for p in model.text_encoder.parameters() if p.requires_grad]
    scalars = [p for p in (model.t_prime, model.bias) if p.requires_grad]  # no decay on t' and b (open_clip)
    other = [p for name, p in model.named_parameters()
             if not name.startswith("text_encoder.") and name not in ("t_prime", "bias") and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": other, "lr": args.lr}, {"params": text_params, "lr": args.text_lr},
                                   {"params": scalars, "lr": args.lr, "weight_decay": 0.0}], weight_decay=args.weight_decay)
    steps_per_epoch = len(dataset) // args.batch_size
    total = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, max(1, int(args.warmup * total))))
    start_epoch, step = 0, 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
    if args.compile:
        model.image_encoder.compile()  # in place: the state dict keeps torchvision's key names
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) if world > 1 else model
    raw = model  # the module whose state dict is saved (torchvision key names, no 'module.' prefix)

    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed,
                                                              drop_last=True)
    # persistent workers: their only random draw, the sentence, is a function of (seed, epoch, study); their
    # base seed comes from a generator of the loader's own, so the global stream (dropout) does not depend
    # on the epoch the workers started in
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the fast tokenizer's threads do not survive a fork
    loader = torch.utils.data.DataLoader(dataset, batch_size=local_bs, sampler=sampler, num_workers=args.workers,
                                         collate_fn=Tokenize(tokenizer, args.max_tokens), pin_memory=cuda,
                                         drop_last=True, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))
    eval_loader = None
    if eval_paths is not None and args.eval_every:  # every rank evaluates, so none waits for rank 0 in a collective
        eval_ds = data.ImageDataset(eval_paths, None, data.eval_transform(args.size), size=args.size, channels=1,
                                    cache_dir=cache, skip_bad=args.skip_bad)
        eval_loader = torch.utils.data.DataLoader(eval_ds, batch_size=64, num_workers=0)
        eval_labels_t = torch.as_tensor(eval_labels)[torch.as_tensor(eval_ds.index)]

    if master:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume:  # the first args.json stays; each resume is recorded beside it
            with open(out / "resumes.jsonl", "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": args.overrides}) + "\n")
            print(f"resuming {out} as it was started" + (f", with overrides {args.overrides}" if args.overrides else ""))
        else:
            (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        print(f"convirt: {len(dataset)} pairs, {args.arch} + {args.text_model or 'demo BERT'}, loss {args.loss}"
              f"{' + heuristic' if heuristic else ''}, {world} process(es) on {device}, run folder {out}")
    log = open(out / "log.jsonl", "a") if master else None

    def evaluate(epoch):
        model.eval()
        img = embed_images(raw, eval_loader, device, amp)
        txt = {}
        names = data.CHEXPERT_14
        with torch.no_grad(), amp:
            for c, name in enumerate(names):
                if name in EVAL_QUERIES:
                    tok = tokenizer(EVAL_QUERIES[name], padding=True, truncation=True, max_length=args.max_tokens,
                                    return_tensors="pt").to(device)
                    txt[c] = raw.encode_text(tok["input_ids"], tok["attention_mask"]).float().cpu()
        res = retrieval_precision(img, eval_labels_t, args.eval_k, txt)
        model.train()
        rec = {"epoch": epoch, "step": step, "eval": {names[c]: {"i2i": r[0], "t2i": r[1], "chance": r[2]} for c, r in res.items()}}
        mean = lambda i: float(np.mean([r[i] for r in res.values() if r[i] is not None]))  # noqa: E731
        rec.update({f"i2i_p@{args.eval_k}": mean(0), f"t2i_p@{args.eval_k}": mean(1), "chance": mean(2)})
        if master:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"epoch {epoch}: retrieval P@{args.eval_k} image->image {mean(0):.3f}, text->image {mean(1):.3f} "
                  f"(chance {mean(2):.3f})")
        return rec

    warned = False
    last_eval = last_rec = None
    ddp.train()
    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness is a function of (seed, epoch): a resumed run draws what it would have
        torch.manual_seed(args.seed * 100003 + epoch)
        views = data.epoch_generator(device, args.seed, epoch, rank)
        pick.epoch.fill_(epoch)
        sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not master, leave=False)
        t0 = time.time()
        loss_sum, n_steps = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for i, (x, ids, mask) in enumerate(bar, 1):
            x = augment(x.to(device, non_blocking=True), views)
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                u, v = ddp(x, ids, mask)
            u_all, v_all = gather(u, world), gather(v, world)
            offset = rank * u.shape[0]
            if args.loss == "softmax":
                loss = infonce_loss(u, v, args.tau, args.lam, u_all, v_all, offset)
                t = b = None
            else:
                t = raw.t_prime.exp().clamp(max=100.0)  # open_clip's ceiling on the logit scale
                if heuristic:
                    t = t.clamp(min=t_floor(u_all.shape[0]))
                b = raw.bias
                loss = sigmoid_loss(u, v, t, b, v_all, offset, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.detach()
            n_steps += 1
            if step % args.log_every == 0 or step == 1:
                lv = loss.detach()
                if world > 1:
                    dist.all_reduce(lv)
                    lv /= world
                lv = float(lv)
                if not math.isfinite(lv):
                    raise SystemExit(f"loss is {lv} at step {step} (epoch {epoch}): stopping; the last good "
                                     f"checkpoint, if any, is untouched at {ckpt_path}")
                gap, spread = collapse_metrics(u_all.detach().float(), v_all.detach().float())
                rec = {"step": step, "epoch": epoch, "loss": lv, "collapse_loss": collapse_value, "lr": scheduler.get_last_lr()[0],
                       "gap": gap, "spread": spread, "img_per_s": round(i * args.batch_size / max(time.time() - t0, 1e-9), 1)}
                if t is not None:
                    rec.update(t=float(t.detach()), b=float(b.detach()))
                if spread < 0.1 and not warned and master:
                    warned = True
                    warnings.warn(f"step {step}: the embeddings are collapsing (spread {spread:.3f} < 0.1, diagonal gap "
                                  f"{gap:.3f}, loss {lv:.3f} against the collapse value {collapse_value:.3f}). A dip "
                                  "before the loss leaves its collapse value can recover (the line at the end says); "
                                  f"if it stays: {collapse_advice(args)}")
                rec["collapsed"] = spread < 0.1
                last_rec = rec
                if master:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{lv:.3f}", **({"t": f"{rec['t']:.2f}", "b": f"{rec['b']:.2f}"} if t is not None else {}),
                                    gap=f"{gap:.2f}", spread=f"{spread:.2f}")
            if args.max_steps and step >= args.max_steps:
                break
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        # one batch's loss swings by several percent: the epoch's mean is what the verdict reads
        epoch_rec = {"epoch": epoch, "step": step, "epoch_loss": float(loss_sum) / max(n_steps, 1),
                     "collapse_loss": collapse_value}
        if master:
            log.write(json.dumps(epoch_rec) + "\n")
            if dataset.skipped:
                print(dataset.report_skipped(), file=sys.stderr)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise SystemExit(f"loss is {lv} at the end of epoch {epoch}: stopping; checkpoint untouched at {ckpt_path}")
            atomic_save({"method": "convirt", "arch": args.arch, "encoder": raw.image_encoder.state_dict(),
                         "model": raw.state_dict(), "text_model": args.text_model or "demo-bert",
                         "text_config": raw.text_encoder.config.to_dict(), "tokenizer_json": tokenizer_json,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch, "step": step, "args": vars(args)}, ckpt_path)
        if eval_loader is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            last_eval = evaluate(epoch)
        if args.max_steps and step >= args.max_steps:
            break
    if master:
        if last_rec is not None:
            collapsed, verdict = collapse_verdict(epoch_rec["epoch_loss"], collapse_value, last_rec["spread"], last_eval,
                                                  args.eval_k)
            log.write(json.dumps({"step": step, "collapsed": collapsed, "verdict": verdict}) + "\n")
            print(verdict + ("" if not collapsed else f" {collapse_advice(args)}"))
        log.close()
        print(f"checkpoint: {ckpt_path}")
        task = "--task rsna" if args.data is None else "--task rsna --data /path/to/rsna"
        if (Path(__file__).parent / "finetune.py").exists():
            print(f"evaluate it: python finetune.py --ckpt {ckpt_path} {task} --arch {args.arch} --init random")
    if world > 1:
        dist.destroy_process_group()
    return last_eval


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, data.BadImageError) as e:  # bad input: the message, not a traceback
        raise SystemExit(f"convirt.py: {e}") from None
