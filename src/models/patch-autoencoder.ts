import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { Module } from '../nn/module.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * gesso's parameter-free "autoencoder" for its own pixel-space models: an image's p×p patches
 * become the channels of a grid p times smaller ([B, 3, H, W] ↔ [B, 3·p², H/p, W/p], channel index
 * (dy·p + dx)·3 + c, ONNX's SpaceToDepth / DepthToSpace in DCR order), losslessly. Diffusion on that grid is diffusion in pixel space at a fraction
 * of the cost of full resolution. It fills the `vae/` slot of a model folder.
 */

export interface PatchAutoencoderConfig {
  readonly patchSize: number;
  readonly inChannels: number;
  readonly scalingFactor: number;
}

export function patchAutoencoderConfig(c: Record<string, unknown>): PatchAutoencoderConfig {
  return {
    patchSize: typeof c.patch_size === 'number' ? c.patch_size : 4,
    inChannels: typeof c.in_channels === 'number' ? c.in_channels : 3,
    scalingFactor: typeof c.scaling_factor === 'number' ? c.scaling_factor : 1,
  };
}

export class PatchAutoencoder extends Module {
  readonly config: PatchAutoencoderConfig;

  constructor(config: PatchAutoencoderConfig) {
    super();
    this.config = config;
  }

  get latentChannels(): number {
    return this.config.inChannels * this.config.patchSize ** 2;
  }

  /** [B, C, H, W] → [B, C·p², H/p, W/p]. */
  encode(image: Value): Value {
    return op.spaceToDepth(image, this.config.patchSize);
  }

  /** [B, C·p², h, w] → [B, C, h·p, w·p]. */
  decode(latents: Value): Value {
    return op.depthToSpace(latents, this.config.patchSize);
  }
}

/** Host version of `encode` for training data: NHWC uint8 → patch grid in [−1, 1]. */
export function patchify(images: Tensor<'uint8'>, p: number): Tensor<'float32'> {
  const [b, h, w, c] = images.shape as [number, number, number, number];
  const out = new Tensor('float32', [b, c * p * p, h / p, w / p]);
  const src = images.data as Uint8Array;
  const gh = h / p;
  const gw = w / p;
  for (let n = 0; n < b; n++) {
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        for (let k = 0; k < c; k++) {
          const channel = ((y % p) * p + (x % p)) * c + k;
          const v = src[((n * h + y) * w + x) * c + k]! / 127.5 - 1;
          out.data[((n * c * p * p + channel) * gh + Math.floor(y / p)) * gw + Math.floor(x / p)] =
            v;
        }
      }
    }
  }
  return out;
}
