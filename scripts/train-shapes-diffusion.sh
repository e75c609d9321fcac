#!/usr/bin/env bash
# The bundled default model, models/shapes-diffusion, from nothing: the autoencoder whose latents
# it works in, then the diffusion model, then fp16 weights into models/. About 2 h 45 min on 2 CPU
# cores. A stage whose run folder already holds a checkpoint continues it with --resume (a finished
# stage then does nothing).
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
# Replace the bundled model only once the new one is complete.
rm -rf models/shapes-diffusion.new
gesso convert runs/shapes-diffusion/model models/shapes-diffusion.new --dtype fp16
rm -rf models/shapes-diffusion
mv models/shapes-diffusion.new models/shapes-diffusion
