"""ConVIRT: contrastive image-report pretraining, with a softmax (InfoNCE) or a sigmoid (SigLIP) loss.

Zhang et al. 2020, https://arxiv.org/abs/2010.00747 ; SigLIP: Zhai et al., ICCV 2023, https://arxiv.org/abs/2303.15343 .
A ResNet encodes an augmented radiograph, a Hugging Face text encoder one random sentence of its report; two
projection heads map both into one L2-normalised space where matching pairs are pulled together and the batch's
other pairs pushed apart: ConVIRT's bidirectional InfoNCE (eq. 2-4) or SigLIP's pairwise loss. With --loss sigmoid
a heuristic (on by default) keeps SigLIP out of its collapse at small batches: positives weighted N-1, b started at
that loss's prior logit 0 (the loss starts at its collapse value 2 (N-1) log 2), t kept >= 2 log(N-1) (RESULTS.md).
convirt.load(checkpoint) gives the trained model back from the file alone: finetune.py --mode zeroshot uses it.

    python convirt.py --loss sigmoid                     # demo data, builds itself, a few minutes on a CPU
    python convirt.py --loss softmax --data /data/mimic-cxr-jpg --metadata-csv mimic-cxr-2.0.0-metadata.csv \
        --text-model emilyalsentzer/Bio_ClinicalBERT --freeze-text-layers 6 --weights imagenet
    torchrun --nproc_per_node=8 convirt.py --loss sigmoid --data /data/mimic-cxr-jpg ...
    python data.py demo /tmp/pairs --studies 4096 --size 256   # a larger pair set for GPU work
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed.nn as dist_nn
import torch.nn as nn
import torch.nn.functional as F

import data


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="MIMIC-CXR(-JPG) root or a CSV of image,report; none: the demo")
    p.add_argument("--image-col", default="path", help="CSV column with the image path")
    p.add_argument("--report-col", default="report", help="CSV column with the report text or a .txt path")
    p.add_argument("--metadata-csv", default=None, help="mimic-cxr-2.0.0-metadata.csv: keep frontal views (PA/AP) only")
    p.add_argument("--split-csv", default=None, help="mimic-cxr-2.0.0-split.csv: train on its 'train' split only")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (off: reports name sides)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest sentence in tokens")
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet50", "densenet121"],
                   help="image encoder (default resnet50; resnet18 on the demo data)")
    p.add_argument("--weights", default="none", choices=["imagenet", "none"], help="encoder init (ConVIRT: imagenet)")
    p.add_argument("--text-model", default=None, help="Hugging Face encoder name or folder; none: a small BERT")
    p.add_argument("--freeze-text-layers", type=int, default=0, help="freeze embeddings + K layers (ConVIRT: 6)")
    p.add_argument("--text-pool", default="max", choices=["max", "mean", "cls"], help="token pooling (ConVIRT: max)")
    p.add_argument("--proj-dim", type=int, default=512, help="shared embedding dimension (ConVIRT: 512)")
    p.add_argument("--loss", default="sigmoid", choices=["softmax", "sigmoid"], help="InfoNCE or SigLIP pairwise loss")
    p.add_argument("--temperature", "--tau", dest="tau", type=float, default=0.1, help="softmax tau (ConVIRT: 0.1)")
    p.add_argument("--lam", type=float, default=0.75, help="softmax weight of image->text (ConVIRT: 0.75)")
    p.add_argument("--t-init", type=float, default=10.0, help="sigmoid: initial t = exp(t') (SigLIP: 10; >= the floor)")
    p.add_argument("--b-init", type=float, default=-10.0, help="sigmoid: initial bias (SigLIP: -10; not the heuristic)")
    p.add_argument("--no-heuristic", action="store_true", help="sigmoid: plain SigLIP, without the heuristic")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (50; demo: 150, resnet50 300)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 64; ConVIRT: 32, as the demo)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the image tower, heads, t and b "
                   "(ConVIRT: Adam 1e-4; 3e-4 chosen on the demo's held-out retrieval)")
    p.add_argument("--head-lr", type=float, default=None, help="image head lr (default --lr x 512 / encoder width)")
    p.add_argument("--text-lr", type=float, default=None, help="text encoder lr (default 3e-5 with --text-model; "
                   "else --lr: the demo BERT starts from scratch)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (ConVIRT: 1e-6; t', b: none)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of all steps, then cosine")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    p.add_argument("--eval-every", type=int, default=5, help="epochs between retrieval evaluations (0: never)")
    p.add_argument("--eval-labels", default=None, help="CheXpert-style label CSV for retrieval (demo: validate split)")
    p.add_argument("--eval-root", default=None, help="image root for --eval-labels")
    p.add_argument("--eval-k", type=int, default=10, help="k of Precision@k")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 224; 64 on the demo data)")
    data.add_run_args(p, "convirt-LOSS")  # the run flags: --out, --resume, --workers, --seed ...
    args = data.parse_args(p, argv)
    data.set_defaults(args, arch=("resnet18", "resnet50"), size=(64, 224), batch_size=(32, 64))
    # demo: 192 pairs make 6 steps an epoch; the loss sits on its collapse value ~300 steps, a ResNet-50's ~600
    data.set_defaults(args, epochs=(300 if args.arch == "resnet50" else 150, 50))  # (RESULTS.md)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: a contrastive loss needs negatives in the batch")
    if args.lr <= 0 or (args.text_lr is not None and args.text_lr <= 0):
        p.error("--lr and --text-lr must be > 0")
    if args.freeze_text_layers < 0 or args.epochs < 1 or args.size < 16:
        p.error("--freeze-text-layers must be >= 0, --epochs >= 1 and --size >= 16")
    return args


# ---------------------------------------------------------------------------------------------- model
def projection(dim_in, dim_out):
    """ConVIRT's projection head: one hidden layer with ReLU. No bias on the output: Adam moves a bias as fast
    as any weight, and one vector added to every embedding pulls them all to one point (CLIP has none)."""
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out, bias=False))


def demo_text_model(reports, seed, max_words=3000):
    """A small BERT (2 layers, 128 wide) and a WordPiece tokenizer built from the reports: no download. Its
    vocabulary: the reports' most frequent words and every character, alone and as '##' continuation (any text
    tokenizes), counted in a fixed order (the tokenizers library's trainer breaks ties differently run to run)."""
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


BERT_SPECIALS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}


def wrap_tokenizer(tokenizer_json, specials=None):
    """A fast tokenizer from its JSON (the tokenizers library's whole definition) and special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), **(specials or BERT_SPECIALS))


def hub_text_model(name):
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load text model {name!r}: no such model or path, or offline with no local copy "
                         f"({str(e).splitlines()[0]})") from None
    if not tokenizer.is_fast:
        raise SystemExit(f"text model {name!r} has no fast tokenizer, which the checkpoint needs to carry its own")
    return tokenizer, model


def saved_text_model(ck):
    """(tokenizer, text encoder) rebuilt from a checkpoint alone, offline, whatever --text-model it was trained with:
    the saved tokenizer and config (the weights come with the model's state dict)."""
    from transformers import AutoConfig, AutoModel

    config = dict(ck["text_config"])
    model = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    if not any(k.startswith("text_encoder.pooler.") for k in ck["model"]):
        model.pooler = None  # trained without one (the demo BERT)
    return wrap_tokenizer(ck["tokenizer_json"], ck.get("tokenizer_specials")), model


def load(path, device="cpu"):
    """A convirt.py checkpoint as a model in eval mode, from the file alone (offline, on another transformers
    version). model.encode_image(x) takes a batch as data.eval_transform(model.size) makes it (B x 3 x S x S,
    ImageNet-normalised, a grayscale radiograph repeated); model.encode_text(list of str) tokenises itself; both
    return L2-normalised embeddings. model.temperature: the loss's tau (softmax), or 1/t (sigmoid)."""
    ck = data.load_checkpoint(path)
    if ck["method"] != "convirt" or not ck.get("tokenizer_json"):
        raise ValueError(f"{path}: a {ck['method']}.py checkpoint" + (" without its tokenizer (written before "
                         "convirt.py saved it)" if ck["method"] == "convirt" else " has no text tower") +
                         "; zero-shot needs a convirt.py checkpoint")
    a, (tokenizer, text_model) = ck["args"], saved_text_model(ck)
    model = ConVIRT(ck["arch"], "none", text_model, a["proj_dim"], a["text_pool"], 1.0, 0.0)
    state = {k: v for k, v in ck["model"].items() if not k.endswith("position_ids")}  # a buffer some versions save
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise ValueError(f"{path}: its weights do not fit the model they describe ({(missing or unexpected)[:3]})")
    model.tokenizer, model.max_tokens, model.size = tokenizer, a["max_tokens"], a["size"]
    model.temperature = a["tau"] if a["loss"] == "softmax" else float(1 / model.t_prime.detach().exp())
    return model.eval().to(device)


def freeze_text_layers(model, k):
    """Freeze the embeddings and the first k transformer layers (ConVIRT froze 6 of ClinicalBERT's 12)."""
    encoder = getattr(model, "encoder", None)
    layers = (getattr(encoder, "layer", None) or getattr(encoder, "layers", None)) if k else []
    if layers is None or k > len(layers):
        raise SystemExit(f"--freeze-text-layers {k}: the text model has {len(layers) if layers else 'no'} layers")
    for m in ([model.embeddings] if k else []) + list(layers[:k]):
        m.requires_grad_(False)


class ConVIRT(nn.Module):
    """Image tower (ResNet + projection) and text tower (a Hugging Face encoder, pooled, + projection) into one
    L2-normalised space; t = exp(t') and b are SigLIP's temperature and bias."""

    def __init__(self, arch, weights, text_model, proj_dim, pool, t_init, b_init):
        super().__init__()
        self.image_encoder, self.dim = data.image_encoder(arch, weights)
        self.image_proj = projection(self.dim, proj_dim)
        self.text_encoder = text_model
        self.text_proj = projection(text_model.config.hidden_size, proj_dim)
        self.pool = pool
        # SigLIP's t = exp(t'), b; unused by the softmax loss
        self.t_prime = nn.Parameter(torch.tensor(math.log(t_init)))
        self.bias = nn.Parameter(torch.tensor(float(b_init)))

    def encode_image(self, x):
        return F.normalize(self.image_proj(self.image_encoder(x)).float(), dim=-1)

    def encode_text(self, input_ids, attention_mask=None):
        if isinstance(input_ids, (list, tuple)):  # strings, tokenised by the model's own tokenizer
            tok = self.tokenizer(list(input_ids), padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt").to(self.t_prime.device)
            input_ids, attention_mask = tok["input_ids"], tok["attention_mask"]
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
    """One sentence drawn uniformly from a study's findings + impression, a function of (seed, epoch, study): the
    persistent workers and a resumed run draw as an uninterrupted run (`epoch`: shared memory, set by the loop)."""

    def __init__(self, seed):
        self.seed, self.epoch = seed, torch.zeros((), dtype=torch.int64).share_memory_()

    def __call__(self, target):
        study, sentences = target
        return sentences[int(np.random.default_rng([self.seed, int(self.epoch), study]).integers(len(sentences)))]


class Tokenize:
    """The DataLoader's collate, in the workers: the uint8 images stacked, the batch's sentences tokenised."""

    def __init__(self, tokenizer, max_tokens):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, batch):
        images, text = zip(*batch)
        tok = self.tokenizer(list(text), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return torch.stack(images), tok["input_ids"], tok["attention_mask"]


# ---------------------------------------------------------------------------------------------- losses
def gather(x, world):
    """The global batch on every rank; its backward carries each rank's gradient home (torch.distributed.nn)."""
    return torch.cat(dist_nn.all_gather(x), 0) if world > 1 else x


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
    w, m = pos_weight, n - 1
    return w * math.log((w + m) / w) + m * math.log((w + m) / m)


def softmax_collapse_loss(n):
    """log N: infonce_loss when every score in a row is alike (each direction, so any lam)."""
    return math.log(n)


def collapse_verdict(loss, collapse_value, spread, evaluation=None, k=10):
    """(collapsed, one line): a run has not collapsed when its loss (the last epoch's mean) is at most
    0.9 x the collapse value, its last logged spread above 0.1 and, if it was evaluated,
    image->image and text->image P@k more than 0.02 above chance."""
    ratio = loss / collapse_value
    checks = [(ratio <= 0.9, f"loss {loss:.3f} = {ratio:.2f} x the collapse value {collapse_value:.3f}"),
              (spread > 0.1, f"spread {spread:.3f}")]
    if evaluation:
        chance = evaluation["chance"]
        for d in ("i2i", "t2i"):
            p = evaluation[f"{d}_p@{k}"]
            checks.append((p > chance + 0.02, f"{d} P@{k} {p:.3f} (chance {chance:.3f})"))
    collapsed = not all(ok for ok, _ in checks)
    return collapsed, f"{'COLLAPSED' if collapsed else 'not collapsed'}: " + ", ".join(
        ("" if ok else "FAILS ") + what for ok, what in checks)


def collapse_advice(args, verdict=""):
    """What the measurements (RESULTS.md) support changing, for this run's loss, encoder and failed checks."""
    plain = args.loss == "sigmoid" and args.no_heuristic
    if plain and args.t_init <= 1:
        return "SigLIP from t 1 stays collapsed at a small batch (RESULTS.md): keep its t 10 / b -10, or the heuristic."
    if plain and verdict and "FAILS" not in verdict.split("collapse value")[-1]:
        return "Only the loss bar fails: plain SigLIP's spread and retrieval say it learned (RESULTS.md)."
    if args.arch != "resnet18" and args.weights == "none":
        return (f"A {args.arch} from scratch sits at the collapse value for ~600 steps on few pairs (a ResNet-18 "
                f"~300), then learns: more --epochs (now {args.epochs}); a lower --lr did not shorten it (RESULTS.md).")
    return (f"Try a lower --lr (now {args.lr:g}) and more --epochs (now {args.epochs}): both losses sit on their "
            "collapse value for a while before they leave it, and a high lr can keep them there (RESULTS.md).")


def collapse_metrics(u, v):
    """gap: mean diagonal minus mean off-diagonal cosine; spread: per-dimension std across the
    batch times sqrt(D), the smaller of the two towers (1 ~ spread out, 0 = one point)."""
    s, n = u @ v.T, u.shape[0]
    off = (s.sum() - s.diagonal().sum()) / max(n * (n - 1), 1)
    return float(s.diagonal().mean() - off), min(data.embedding_spread(u), data.embedding_spread(v))


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
    """Precision@k per category (ConVIRT's CheXpert 8x200 protocol, on any labelled set): {category index:
    (image->image P@k, text->image P@k or None, chance = prevalence)}. image->image: each image positive for c
    queries all others, a hit is an image with label c = 1; text->image: txt_emb {c: (q, D)} queries all images."""
    k = min(k, len(img_emb) - 1)
    top = (img_emb @ img_emb.T).fill_diagonal_(-float("inf")).topk(k, dim=1).indices
    out = {}
    for c in range(labels.shape[1]):
        pos = labels[:, c] > 0
        if pos.sum() < 2:
            continue
        t2i = None
        if txt_emb is not None and c in txt_emb:
            t2i = float(pos[(txt_emb[c] @ img_emb.T).topk(k, dim=1).indices].float().mean())
        out[c] = (float(pos[top[pos]].float().mean()), t2i, float(pos.float().mean()))
    return out


def evaluate(model, loader, labels, args, run, epoch):
    """Retrieval P@k on the labelled set: image->image, and text->image with EVAL_QUERIES; logged and returned."""
    model.eval()
    with torch.no_grad(), run.amp:
        img = torch.cat([model.encode_image(x.to(run.device)).float().cpu() for x, _ in loader])
        txt = {c: model.encode_text(EVAL_QUERIES[name]).float().cpu()
               for c, name in enumerate(data.CHEXPERT_14) if name in EVAL_QUERIES}
    res = retrieval_precision(img, labels, args.eval_k, txt)
    model.train()
    rec = {"epoch": epoch, "step": run.step,
           "eval": {data.CHEXPERT_14[c]: {"i2i": r[0], "t2i": r[1], "chance": r[2]} for c, r in res.items()}}
    for i, key in enumerate((f"i2i_p@{args.eval_k}", f"t2i_p@{args.eval_k}", "chance")):
        rec[key] = float(np.mean([r[i] for r in res.values() if r[i] is not None]))
    run.write(rec)
    if run.master:
        print(f"epoch {epoch}: retrieval P@{args.eval_k} image->image {rec[f'i2i_p@{args.eval_k}']:.3f}, "
              f"text->image {rec[f't2i_p@{args.eval_k}']:.3f} (chance {rec['chance']:.3f})")
    return rec


# ---------------------------------------------------------------------------------------------- main
def load_pairs(args):
    """(paths, sentences, reports, eval paths, eval labels): the training pairs with text and, for
    retrieval, a labelled set (the demo: its validate split; the test split's patients are never seen)."""
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
    if len(keep) < len(paths):
        print(f"{len(paths) - len(keep)} reports have no text and are left out")
    return [paths[i] for i in keep], [sentences[i] for i in keep], reports, eval_paths, eval_labels


def main(argv=None):
    args = get_args(argv)
    run = data.Run(args, f"convirt-{args.loss}")  # process group, device, seeds, run folder, checkpoint to resume
    paths, sentences, reports, eval_paths, eval_labels = load_pairs(args)
    # text model (before the images are decoded: a wrong name stops at once): rebuilt from the checkpoint on
    # resume; else named, or the demo's small BERT
    if run.state and run.state.get("tokenizer_json"):
        tokenizer, text_model = saved_text_model(run.state)
    elif args.text_model:
        tokenizer, text_model = hub_text_model(args.text_model)
    else:
        tokenizer_json, text_model = demo_text_model(reports, args.seed)
        tokenizer = wrap_tokenizer(tokenizer_json)
    if isinstance(getattr(text_model, "pooler", None), nn.Module):  # BERT's pooler over [CLS]: ConVIRT pools the
        text_model.pooler.requires_grad_(False)  # tokens itself, and DDP would wait for the pooler's gradient
    freeze_text_layers(text_model, args.freeze_text_layers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the fast tokenizer's threads do not survive a fork
    pick = RandomSentence(args.seed)
    # the workers read uint8 images, cached a little larger than the crop (the ranks share the cache), and tokenise
    dataset = data.ImageDataset(paths, list(enumerate(sentences)), None, pick, size=data.train_side(args.size),
                                channels=1, cache_dir=args.cache_dir or None, skip_bad=args.skip_bad,
                                workers=args.workers, progress=run.master, uint8=True)
    augment = data.BatchAugment("convirt", args.size, 1, hflip=args.hflip)  # drawn on the device
    loader = run.loader(dataset, Tokenize(tokenizer, args.max_tokens), what="image-report pairs")

    # ALGORITHM: the heuristic's weights and starting point (RESULTS.md, "Sigmoid loss collapse")
    heuristic, n = args.loss == "sigmoid" and not args.no_heuristic, args.batch_size
    pos_weight = n - 1 if heuristic else 1.0  # the N positives weigh as much as the N(N-1) negatives
    b_init = prior_logit(n, pos_weight) if heuristic else args.b_init  # the loss starts at its collapse value
    t_min = t_floor(n) if heuristic else 1e-2
    collapse_value = collapse_loss(n, pos_weight) if args.loss == "sigmoid" else softmax_collapse_loss(n)
    model = ConVIRT(args.arch, args.weights, text_model, args.proj_dim, args.text_pool, max(args.t_init, t_min), b_init)
    if args.loss == "softmax":  # t and b unused: frozen, or DDP would wait for their gradients
        model.t_prime.requires_grad_(False), model.bias.requires_grad_(False)
    model = run.prepare(model)
    model.tokenizer, model.max_tokens = tokenizer, args.max_tokens  # encode_text(list of str), as load() gives
    text_params = [p for p in model.text_encoder.parameters() if p.requires_grad]
    scalars = [p for p in (model.t_prime, model.bias) if p.requires_grad]  # no decay on t' and b (open_clip)
    # Adam moves a layer's output ~fan-in x lr: the image head's lr scaled to its width (muP, Yang et al. 2021)
    legacy = run.state is not None and len(run.state["optimizer"]["param_groups"]) == 3  # head at --lr, as then
    head = [] if legacy else list(model.image_proj.parameters())
    other = [p for name, p in model.named_parameters() if p.requires_grad and name not in ("t_prime", "bias")
             and not name.startswith("text_encoder.") and all(p is not q for q in head)]
    groups = [{"params": other, "lr": args.lr}, {"params": head, "lr": args.head_lr or args.lr * 512 / model.dim},
              {"params": text_params, "lr": args.text_lr or (3e-5 if args.text_model else args.lr)},  # follows --lr
              {"params": scalars, "lr": args.lr, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups[:1] + groups[2:] if legacy else groups, weight_decay=args.weight_decay)
    total = args.epochs * len(loader)
    warmup = max(1, int(args.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    run.checkpoint(method="convirt", arch=args.arch, encoder=model.image_encoder, model=model,
                   text_model=args.text_model or "demo-bert", text_config=model.text_encoder.config.to_dict(),
                   tokenizer_json=tokenizer.backend_tokenizer.to_str(), optimizer=optimizer, scheduler=scheduler,
                   tokenizer_specials={k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)})
    if args.compile:
        model.image_encoder.compile()  # in place: the state dict keeps torchvision's key names
    train_model = run.distribute(model)  # DDP over the model under torchrun, else the model
    eval_loader = None
    if eval_paths is not None and args.eval_every:  # every rank evaluates, so none waits for rank 0 in a collective
        eval_ds = data.ImageDataset(eval_paths, None, data.eval_transform(args.size), size=args.size, channels=1,
                                    cache_dir=args.cache_dir or None, skip_bad=args.skip_bad)
        eval_loader = torch.utils.data.DataLoader(eval_ds, batch_size=64, num_workers=0)
        eval_labels = torch.as_tensor(eval_labels)[torch.as_tensor(eval_ds.index)]
    run.start(f"convirt: {len(dataset)} pairs, {args.arch} + {args.text_model or 'demo BERT'}, loss {args.loss}"
              + (" + heuristic" if heuristic else ""))

    last_eval = last_rec = None
    for epoch, rng in run.epochs():  # rng: this epoch's augmentation draws (a torch.Generator)
        pick.epoch.fill_(epoch)  # the workers' sentence draw is a function of (seed, epoch, study)
        for x, ids, mask in run.batches(loader, collapse_loss=collapse_value):  # on the epoch's log line
            # ALGORITHM: both towers, the global batch, one of the two losses
            x = augment(x.to(run.device, non_blocking=True), rng)
            ids, mask = ids.to(run.device, non_blocking=True), mask.to(run.device, non_blocking=True)
            with run.amp:
                u, v = train_model(x, ids, mask)
            u_all, v_all = gather(u, run.world), gather(v, run.world)
            offset = run.rank * u.shape[0]
            if args.loss == "softmax":
                loss = infonce_loss(u, v, args.tau, args.lam, u_all, v_all, offset)
            else:
                t = model.t_prime.exp()
                loss = sigmoid_loss(u, v, t, model.bias, v_all, offset, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # t's bounds on the parameter after the step (open_clip); in the graph: zero gradient
                model.t_prime.clamp_(math.log(t_min), math.log(100.0))
            if run.track(loss):
                gap, spread = collapse_metrics(u_all.detach().float(), v_all.detach().float())
                scalars = {"t": float(t.detach()), "b": float(model.bias.detach())} if args.loss == "sigmoid" else {}
                last_rec = run.log(collapse_loss=collapse_value, gap=gap, spread=spread, collapsed=spread < 0.1,
                                   **scalars)
                run.warn_once(spread < 0.1, f"step {run.step}: the embeddings are collapsing (spread {spread:.3f}, "
                              f"loss {last_rec['loss']:.3f}, collapse value {collapse_value:.3f}). A dip can recover "
                              f"(the line at the end says); if it stays: {collapse_advice(args)}")
        epoch_loss = run.epoch_loss()  # one batch swings by several percent: the epoch's mean is what the verdict reads
        if eval_loader is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            last_eval = evaluate(model, eval_loader, eval_labels, args, run, epoch)
    if run.master and last_rec is not None:
        collapsed, verdict = collapse_verdict(epoch_loss, collapse_value, last_rec["spread"], last_eval, args.eval_k)
        run.write({"step": run.step, "collapsed": collapsed, "verdict": verdict})
        print(verdict + ("" if not collapsed else f" {collapse_advice(args, verdict)}"))
    run.finish()
    if run.master:
        task = "--task rsna" + ("" if args.data is None else " --data /path/to/rsna")
        print(f"checkpoint: {run.ckpt_path}\nevaluate it: python finetune.py --ckpt {run.ckpt_path} {task} "
              f"--arch {args.arch} --init random --mode linear zeroshot")
    return last_eval


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, data.BadImageError) as e:  # the message, not a traceback
        raise SystemExit(f"convirt.py: {e}") from None
