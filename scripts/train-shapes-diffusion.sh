#!/usr/bin/env bash
# The bundled default model, models/shapes-diffusion, from nothing: the autoencoder whose latents
# it works in, then the diffusion model, then a fine-tune of it, fp16 weights into models/, and a
# second and third fine-tune of those: about 5 h 45 min on 2 CPU cores up to the second fine-tune,
# which took 50 min more on a faster 2-core host, and the third 95 min there. A stage whose run
# folder already holds a checkpoint continues it with --resume (a finished stage then does nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
gesso() { node dist/src/cli/main.js "$@"; }
stage() {
  local config=$1 out=$2
  if [ -f "$out/checkpoint/state.safetensors" ]; then
    gesso train --resume --out "$out"
  else
    gesso train --config "$config"
  fi
}
npm run build --silent
stage configs/shapes-autoencoder.yaml runs/shapes-autoencoder
stage configs/shapes-diffusion.yaml runs/shapes-diffusion
# Then twice 3000 steps more: each resume stretches the cosine schedule to the new length, so the
# learning rate restarts (at 2.4e-4, then 1.9e-4) and decays to 1e-4 again. Measured
# (gesso eval --prompts 8 --images 2): 0.266 overall at 9000 steps, 0.430 at 12000, 0.539 at 15000.
gesso train --resume --out runs/shapes-diffusion --steps 12000
gesso train --resume --out runs/shapes-diffusion --steps 15000
# Then fine-tuned 9000 steps from those weights on fresh data (seed 2), with a fresh optimizer and
# a cosine schedule from 2e-4 to 2e-5 (about 90 min), and resumed to 12000 (30 min). On
# --prompts 32 --images 2 --seed 9: 0.502 before, 0.537 at 9000, 0.553 at 12000; on the README's
# --prompts 8 --images 2: 0.539, 0.539, 0.586.
if [ -f runs/shapes-diffusion-ft/checkpoint/state.safetensors ]; then
  gesso train --resume --out runs/shapes-diffusion-ft
else
  gesso train --config configs/shapes-diffusion.yaml --out runs/shapes-diffusion-ft \
    --init-from runs/shapes-diffusion/model --seed 2 --steps 9000 \
    --learning-rate 2e-4 --final-learning-rate 2e-5 --warmup-steps 100
fi
gesso train --resume --out runs/shapes-diffusion-ft --steps 12000
# Replace the bundled model only once the new one is complete.
install_model() {
  rm -rf models/shapes-diffusion.new
  gesso convert "$1" models/shapes-diffusion.new --dtype fp16
  rm -rf models/shapes-diffusion
  mv models/shapes-diffusion.new models/shapes-diffusion
}
install_model runs/shapes-diffusion-ft/model
# Then a second fine-tune of those fp16 weights (seed 3, 6000 steps, about 50 min at 2 steps/s):
# on --prompts 32 --images 2 --seed 9 0.553 → 0.592, on --prompts 8 --images 2 0.586 → 0.594.
stage configs/shapes-diffusion-ft2.yaml runs/shapes-diffusion-ft2
install_model runs/shapes-diffusion-ft2/model
# Then a third, with a token-mixing window of 11 added to the text encoder and trained at ten times
# the schedule's rate (seed 4, 6000 steps, resumed to 12000; about 95 min at 2.0–2.1 steps/s): on
# --prompts 32 --images 2 --seed 9 0.592 → 0.648 (two objects 0.141 → 0.328), on --prompts 8
# --images 2 0.594 → 0.656.
stage configs/shapes-diffusion-ft3.yaml runs/shapes-diffusion-ft3
gesso train --resume --out runs/shapes-diffusion-ft3 --steps 12000
install_model runs/shapes-diffusion-ft3/model
