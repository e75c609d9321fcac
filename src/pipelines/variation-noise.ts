import { Tensor } from '../tensor/tensor.js';
import { seededGenerator, type NormalGenerator, type RngSource } from '../tensor/rng.js';

/**
 * AUTOMATIC1111's variation seeds and "resize seed from" (its ImageRNG): an image's starting
 * noise drawn from its seed, spherically interpolated toward the noise of a variation seed, and
 * optionally drawn at another size and centred in the image's own noise. Everything a sampler
 * draws after that still comes from the image's seed, as in A1111.
 */

export interface VariationOptions {
  /** The variation seed of this image. */
  readonly subseed: number;
  /** 0: the seed's own noise; 1: the variation seed's. */
  readonly strength: number;
  /** [height, width] of the noise the seed is drawn at, in latent cells (A1111's size / 8). */
  readonly resizeFrom?: readonly [number, number];
  /** The generator seeds feed (default cpu). */
  readonly rng?: RngSource;
}

/**
 * A1111's `slerp` on one image's noise [C, H, W], with its quirks kept: the angle is taken per
 * channel and column (its norms run along dimension 1), and when the two are nearly parallel it
 * falls back to `low·val + high·(1 − val)`, the weights the other way round.
 */
export function slerp(
  val: number,
  low: Tensor<'float32'>,
  high: Tensor<'float32'>,
): Tensor<'float32'> {
  const [channels, rows, columns] = low.shape as [number, number, number];
  const at = (c: number, y: number, x: number) => (c * rows + y) * columns + x;
  const out = new Tensor('float32', low.shape);
  const dots = new Float64Array(channels * columns);
  let mean = 0;
  for (let c = 0; c < channels; c++)
    for (let x = 0; x < columns; x++) {
      let ll = 0;
      let hh = 0;
      for (let y = 0; y < rows; y++) {
        ll += low.data[at(c, y, x)]! ** 2;
        hh += high.data[at(c, y, x)]! ** 2;
      }
      const [lowNorm, highNorm] = [Math.sqrt(ll), Math.sqrt(hh)];
      let dot = 0;
      for (let y = 0; y < rows; y++)
        dot += (low.data[at(c, y, x)]! / lowNorm) * (high.data[at(c, y, x)]! / highNorm);
      dots[c * columns + x] = dot;
      mean += dot / (channels * columns);
    }
  if (mean > 0.9995) {
    for (let i = 0; i < out.size; i++) out.data[i] = low.data[i]! * val + high.data[i]! * (1 - val);
    return out;
  }
  for (let c = 0; c < channels; c++)
    for (let x = 0; x < columns; x++) {
      const omega = Math.acos(dots[c * columns + x]!);
      const so = Math.sin(omega);
      const a = Math.sin((1 - val) * omega) / so;
      const b = Math.sin(val * omega) / so;
      for (let y = 0; y < rows; y++)
        out.data[at(c, y, x)] = a * low.data[at(c, y, x)]! + b * high.data[at(c, y, x)]!;
    }
  return out;
}

/**
 * One image's starting noise [1, C, H, W] for `seed` with a variation seed and/or a resized
 * seed, and the generator the image's later noise comes from (seeded with `seed`, past the
 * starting noise).
 */
export function variationNoise(
  seed: number,
  shape: readonly [number, number, number],
  options: VariationOptions,
): { noise: Tensor<'float32'>; generator: NormalGenerator } {
  const [channels, height, width] = shape;
  const [fromHeight, fromWidth] = options.resizeFrom ?? [height, width];
  const resized = fromHeight !== height || fromWidth !== width;
  const noiseShape = [channels, fromHeight, fromWidth];
  const seeded = (s: number) => seededGenerator(s, options.rng);
  const generator = seeded(seed);
  let noise = resized ? seeded(seed).randn(noiseShape) : generator.randn(noiseShape);
  if (options.strength !== 0)
    noise = slerp(options.strength, noise, seeded(options.subseed).randn(noiseShape));
  if (resized) {
    // The seed's noise at the image's size, with the drawn one centred over it (cropped where
    // it is larger).
    const image = generator.randn([channels, height, width]);
    const dx = Math.floor((width - fromWidth) / 2);
    const dy = Math.floor((height - fromHeight) / 2);
    const w = dx >= 0 ? fromWidth : fromWidth + 2 * dx;
    const h = dy >= 0 ? fromHeight : fromHeight + 2 * dy;
    const [tx, ty, sx, sy] = [Math.max(dx, 0), Math.max(dy, 0), Math.max(-dx, 0), Math.max(-dy, 0)];
    for (let c = 0; c < channels; c++)
      for (let y = 0; y < h; y++)
        for (let x = 0; x < w; x++)
          image.data[(c * height + ty + y) * width + tx + x] =
            noise.data[(c * fromHeight + sy + y) * fromWidth + sx + x]!;
    noise = image;
  }
  return { noise: new Tensor('float32', [1, channels, height, width], noise.data), generator };
}
