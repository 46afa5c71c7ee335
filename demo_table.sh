#!/usr/bin/env bash
# The demo comparison table, in one command: pretrain every method on the demo data, then evaluate
# them at 1 / 10 / 100 % of the labels, linear probe and fine-tuning. About an hour on 2 CPU cores.
#   bash demo_table.sh [OUT]       (default runs/demo-table)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-runs/demo-table}
mkdir -p "$out"
py=${PYTHON:-python}
# --resume auto: a run cut short continues from its last checkpoint (and returns at once if it is done)
run() { "$py" "${@:2}" --out "$out/$1" --resume auto; }

# image-report pretraining (demo chest radiographs), then the demo pneumonia task
run convirt-softmax convirt.py --loss softmax
run convirt-sigmoid convirt.py --loss sigmoid
run convirt-sigmoid-plain convirt.py --loss sigmoid --no-heuristic
"$py" finetune.py --task rsna --init random \
    --ckpt "ConVIRT softmax=$out/convirt-softmax/checkpoint.pt" \
    --ckpt "ConVIRT sigmoid + heuristic=$out/convirt-sigmoid/checkpoint.pt" \
    --ckpt "ConVIRT sigmoid, plain=$out/convirt-sigmoid-plain/checkpoint.pt" \
    --mode linear finetune --seeds 0 1 --resume --out "$out/pneumonia"

# image-only pretraining on the demo chest radiographs (the scripts' defaults), linear probe on pneumonia
# and the X-ray study's comparison, one flag apart: with the chessboard mask
run simclr-xray simclr.py
run byol-xray byol.py
run simclr-xray-chessboard simclr.py --aug xray-chessboard
run byol-xray-chessboard byol.py --aug xray-chessboard
"$py" finetune.py --task rsna --init random \
    --ckpt "SimCLR=$out/simclr-xray/checkpoint.pt" --ckpt "BYOL=$out/byol-xray/checkpoint.pt" \
    --ckpt "SimCLR, xray-chessboard=$out/simclr-xray-chessboard/checkpoint.pt" \
    --ckpt "BYOL, xray-chessboard=$out/byol-xray-chessboard/checkpoint.pt" \
    --mode linear --fractions 0.1 1.0 --seeds 0 1 2 --resume --out "$out/pneumonia-image-only"

# the weighted kNN (no training) of every pneumonia row, and zero-shot classification by prompts for the image-text
# models, beside a ConVIRT with random weights (one step at lr 1e-12) as the chance row; prompts chosen on val
run convirt-random convirt.py --loss sigmoid --epochs 1 --max-steps 1 --lr 1e-12 --text-lr 1e-12 --eval-every 0
"$py" finetune.py --task rsna --init random \
    --ckpt "ConVIRT softmax=$out/convirt-softmax/checkpoint.pt" \
    --ckpt "ConVIRT sigmoid + heuristic=$out/convirt-sigmoid/checkpoint.pt" \
    --ckpt "ConVIRT sigmoid, plain=$out/convirt-sigmoid-plain/checkpoint.pt" \
    --ckpt "ConVIRT, random weights=$out/convirt-random/checkpoint.pt" \
    --ckpt "SimCLR=$out/simclr-xray/checkpoint.pt" --ckpt "BYOL=$out/byol-xray/checkpoint.pt" \
    --mode knn zeroshot --prompts benchmarks/pneumonia-prompts.json --seeds 0 1 --resume --out "$out/pneumonia-knn-zeroshot"

# image-only pretraining (demo cytology), then the 7-class cytology task
run simclr simclr.py --demo cytology --aug cytology-B
run byol byol.py --demo cytology --aug cytology-B
run barlow barlow.py --aug cytology-B
run agbt barlow.py --loss agbt --aug cytology-B
"$py" finetune.py --task folder --init random \
    --ckpt "SimCLR=$out/simclr/checkpoint.pt" --ckpt "BYOL=$out/byol/checkpoint.pt" \
    --ckpt "Barlow Twins=$out/barlow/checkpoint.pt" --ckpt "AGBT=$out/agbt/checkpoint.pt" \
    --mode linear finetune --seeds 0 1 --resume --out "$out/cytology"
"$py" finetune.py --task folder --init random \
    --ckpt "SimCLR=$out/simclr/checkpoint.pt" --ckpt "BYOL=$out/byol/checkpoint.pt" \
    --ckpt "Barlow Twins=$out/barlow/checkpoint.pt" --ckpt "AGBT=$out/agbt/checkpoint.pt" \
    --mode knn --seeds 0 1 --resume --out "$out/cytology-knn"

echo
echo "== demo pneumonia (RSNA-style) =="; cat "$out/pneumonia/results.md"
echo "== demo pneumonia, image-only pretraining on the demo radiographs =="; cat "$out/pneumonia-image-only/results.md"
echo "== demo pneumonia, weighted kNN and zero-shot =="; cat "$out/pneumonia-knn-zeroshot/results.md"
echo "== demo cytology (Herlev-style, 7 classes) =="; cat "$out/cytology/results.md"
echo "== demo cytology, weighted kNN =="; cat "$out/cytology-knn/results.md"
