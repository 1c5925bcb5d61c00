#!/usr/bin/env bash
# Regenerate the README's gallery, plots/gallery/*.png: the one command that writes there (a bare
# `--plot` writes plots/<command>.png, which git ignores). Run from anywhere; takes a few minutes
# (it trains the moons model and the shapes UNet into build/gallery/, also ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
work=build/gallery
out=plots/gallery
mkdir -p "$work" "$out"
ddpm train --data moons --steps 2000 --out "$work/ckpt.pt" --force -q
ddpm train --data shapes --steps 400 --out "$work/shapes.pt" --force -q
ddpm schedule --kind cosine --plot "$out/schedule_cosine.png" >/dev/null
ddpm compare linear cosine scaled_linear+zsnr sigmoid_logsnr edm --plot "$out/compare.png" >/dev/null
ddpm compare sd15 sd3 flux@1024 edm --steps 28 --plot "$out/compare_families.png" >/dev/null
ddpm posterior --kind linear --plot "$out/posterior_linear.png" >/dev/null
ddpm reconstruct "$work/ckpt.pt" --plot "$out/reconstruct_moons.png" >/dev/null
ddpm sample "$work/ckpt.pt" --n 512 --trajectory-every 100 --plot "$out/sample_moons.png" >/dev/null
ddpm reconstruct "$work/shapes.pt" --n 6 --plot "$out/reconstruct_shapes.png" >/dev/null
