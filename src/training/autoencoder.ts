import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { shapesSource, type DataSource } from '../data/source.js';
import { UserError } from '../errors.js';
import type { Graph, Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { AutoencoderKL, autoencoderKLConfig } from '../models/autoencoder-kl.js';
import { patchify } from '../models/patch-autoencoder.js';
import type { ParameterSource } from '../nn/module.js';
import { Vae } from '../pipelines/components.js';
import type { RuntimeOptions } from '../runtime/session.js';
import type { TorchGenerator } from '../tensor/rng.js';
import { shapeSize, Tensor } from '../tensor/tensor.js';
import { DataRandom, type TrainingTask } from './trainer.js';

/**
 * The latent space of gesso's own models: a small diffusers `AutoencoderKL` trained on the
 * training images (reconstruction error plus a light KL term, as latent diffusion's first stage),
 * so the denoiser works on an 8×8 grid of latents instead of 64×64 pixels. The exported folder is
 * an ordinary diffusers `vae/` folder whose `scaling_factor` and `shift_factor` bring the latents
 * to zero mean and unit variance.
 */

export type ReconstructionLoss = 'mse' | 'l1';

/** How a reconstruction is scored. */
export interface ReconstructionObjective {
  /**
   * The pixel error: `mse`, or `l1` (absolute error), whose optimum is a sharp edge where the
   * squared error's is a blur between the two sides.
   */
  readonly loss: ReconstructionLoss;
  /**
   * Extra weight on the pixels at colour edges of the training image (0: every pixel alike). In
   * the shapes world nearly every pixel is flat background, so a plain mean error barely sees
   * what tells a small square from a small disc: its corners.
   */
  readonly edgeWeight: number;
}

export interface AutoencoderRecipe extends ReconstructionObjective {
  readonly batchSize: number;
  /** diffusers `AutoencoderKL` config keys. */
  readonly vae: Readonly<Record<string, unknown>>;
  /** Weight of the mean KL divergence to N(0, 1) per latent, beside the mean pixel error. */
  readonly klWeight: number;
}

/** A config's `autoencoder.loss` and `autoencoder.edge_weight`, checked. */
export function reconstructionObjective(fields: {
  readonly loss: unknown;
  readonly edge_weight: unknown;
}): ReconstructionObjective {
  const { loss, edge_weight: edgeWeight } = fields;
  if (loss !== 'mse' && loss !== 'l1')
    throw new UserError(
      'bad-config',
      `autoencoder.loss ${JSON.stringify(loss)} is not one of mse, l1`,
    );
  if (typeof edgeWeight !== 'number' || !Number.isFinite(edgeWeight) || edgeWeight < 0)
    throw new UserError(
      'bad-config',
      `autoencoder.edge_weight must be a number of 0 or more (got ${JSON.stringify(edgeWeight)})`,
    );
  return { loss, edgeWeight };
}

/** Mean pixel error of a reconstruction, [B, C, H, W], weighted per pixel by `weights` [B, 1, H, W]. */
function reconstructionError(
  reconstruction: Value,
  images: Value,
  loss: ReconstructionLoss,
  weights: Value | undefined,
): Value {
  const error = op.sub(reconstruction, images);
  const perPixel = loss === 'l1' ? op.abs(error) : op.mul(error, error);
  return op.reduceMean(
    weights !== undefined ? op.mul(perPixel, weights) : perPixel,
    [0, 1, 2, 3],
    false,
  );
}

/** Channel difference (0–255) above which two neighbouring pixels are on either side of an edge. */
const EDGE_CONTRAST = 24;

/**
 * Per-pixel loss weights for NHWC uint8 images, [B, 1, H, W]: 1 + `edgeWeight` where a pixel
 * differs from one of its 8 neighbours by more than EDGE_CONTRAST in some channel, else 1; scaled
 * so they average 1 over the batch, which keeps the loss on the plain mean's scale.
 */
export function edgeWeights(images: Tensor<'uint8'>, edgeWeight: number): Tensor<'float32'> {
  const [b, h, w, c] = images.shape as [number, number, number, number];
  const px = images.data;
  const out = new Float32Array(b * h * w).fill(1);
  let total = 0;
  for (let n = 0; n < b; n++) {
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const at = (n * h + y) * w + x;
        let edge = false;
        for (let dy = -1; dy <= 1 && !edge; dy++) {
          for (let dx = -1; dx <= 1 && !edge; dx++) {
            const yy = y + dy;
            const xx = x + dx;
            if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
            const other = (n * h + yy) * w + xx;
            for (let k = 0; k < c; k++) {
              if (Math.abs(px[at * c + k]! - px[other * c + k]!) > EDGE_CONTRAST) {
                edge = true;
                break;
              }
            }
          }
        }
        if (edge) out[at] = 1 + edgeWeight;
        total += out[at]!;
      }
    }
  }
  const scale = out.length / total;
  for (let i = 0; i < out.length; i++) out[i]! *= scale;
  return new Tensor('float32', [b, 1, h, w], out);
}

/** The images as the graph takes them, and their edge weights when the objective has any. */
function reconstructionTargets(
  images: Tensor<'uint8'>,
  edgeWeight: number,
): { images: Tensor<'float32'>; pixel_weights?: Tensor<'float32'> } {
  return {
    images: patchify(images, 1),
    ...(edgeWeight > 0 ? { pixel_weights: edgeWeights(images, edgeWeight) } : {}),
  };
}

/** The graph inputs of the reconstruction targets: images, and their weights when used. */
function reconstructionInputs(
  g: Graph,
  batchSize: number,
  edgeWeight: number,
): { images: Value; weights: Value | undefined } {
  return {
    images: g.input('images', 'float32', [batchSize, 3, 64, 64]),
    weights:
      edgeWeight > 0 ? g.input('pixel_weights', 'float32', [batchSize, 1, 64, 64]) : undefined,
  };
}

export const DEFAULT_AUTOENCODER_RECIPE: AutoencoderRecipe = {
  batchSize: 32,
  vae: {
    in_channels: 3,
    out_channels: 3,
    down_block_types: Array<string>(4).fill('DownEncoderBlock2D'),
    up_block_types: Array<string>(4).fill('UpDecoderBlock2D'),
    block_out_channels: [16, 32, 64, 64],
    layers_per_block: 1,
    latent_channels: 8,
    norm_num_groups: 8,
    sample_size: 64,
  },
  klWeight: 1e-6,
  loss: 'mse',
  edgeWeight: 0,
};

/** Latents per side for a 64×64 image: each block but the last halves the resolution. */
function latentSide(model: AutoencoderKL): number {
  return 64 / 2 ** (model.config.blockOutChannels.length - 1);
}

/** Images measured to set the exported latent scale and shift. */
const SCALE_IMAGES = 512;
const SCALE_SEED = 20261127;

export class AutoencoderTask implements TrainingTask {
  readonly recipe: AutoencoderRecipe;
  readonly data: DataSource;
  readonly model: AutoencoderKL;
  readonly shapes: ReadonlyMap<string, readonly number[]>;
  private readonly latentSide: number;

  constructor(
    recipe: AutoencoderRecipe = DEFAULT_AUTOENCODER_RECIPE,
    data: DataSource = shapesSource(),
  ) {
    this.recipe = recipe;
    this.data = data;
    this.model = new AutoencoderKL(autoencoderKLConfig({ ...recipe.vae }), {
      fusedAttention: false,
    });
    this.shapes = this.model.namedParameters();
    this.latentSide = latentSide(this.model);
  }

  get cacheKey(): string {
    return JSON.stringify({ autoencoder: this.recipe });
  }

  initialParameters(random: TorchGenerator): Map<string, Float32Array> {
    return this.model.initialParameters(random);
  }

  buildLoss(p: ParameterSource, g: Graph): Value {
    const b = this.recipe.batchSize;
    const c = this.model.config.latentChannels;
    const side = this.latentSide;
    const { images, weights } = reconstructionInputs(g, b, this.recipe.edgeWeight);
    const eps = g.input('eps', 'float32', [b, c, side, side]);
    const { mean, std } = this.model.encode(p, images);
    const reconstruction = this.model.decode(p, op.add(mean, op.mul(std, eps)));
    const error = reconstructionError(reconstruction, images, this.recipe.loss, weights);
    // KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), per latent.
    const variance = op.mul(std, std);
    const kl = op.mul(
      op.reduceMean(
        op.sub(op.sub(op.add(op.mul(mean, mean), variance), 1), op.log(variance)),
        [0, 1, 2, 3],
        false,
      ),
      0.5,
    );
    return op.add(error, op.mul(kl, this.recipe.klWeight));
  }

  batch(_step: number, random: DataRandom, noise: TorchGenerator): Record<string, Tensor> {
    const b = this.recipe.batchSize;
    const { images } = this.data.sample(random.uniform, b);
    const side = this.latentSide;
    return {
      ...reconstructionTargets(images, this.recipe.edgeWeight),
      eps: noise.randn([b, this.model.config.latentChannels, side, side]),
    };
  }

  /**
   * Writes a diffusers `vae/` folder, then encodes a fixed sample of training images with it to
   * set `shift_factor` and `scaling_factor` (the latents' mean and 1 / standard deviation).
   */
  async exportModel(
    dir: string,
    weights: Readonly<Record<string, Tensor>>,
    runtime: RuntimeOptions = {},
  ): Promise<{ scalingFactor: number; shiftFactor: number }> {
    await mkdir(dir, { recursive: true });
    const config = (scale: { scalingFactor: number; shiftFactor: number }) =>
      `${JSON.stringify(
        {
          _class_name: 'AutoencoderKL',
          ...this.recipe.vae,
          scaling_factor: scale.scalingFactor,
          shift_factor: scale.shiftFactor,
        },
        null,
        2,
      )}\n`;
    await writeSafetensors(join(dir, 'diffusion_pytorch_model.safetensors'), weights);
    await writeFile(join(dir, 'config.json'), config({ scalingFactor: 1, shiftFactor: 0 }));
    const scale = await measureLatentScale(dir, this.data, runtime);
    await writeFile(join(dir, 'config.json'), config(scale));
    return scale;
  }
}

/** The mean and 1 / standard deviation of a VAE's latent means over a fixed sample of `data`. */
async function measureLatentScale(
  dir: string,
  data: DataSource,
  runtime: RuntimeOptions,
): Promise<{ scalingFactor: number; shiftFactor: number }> {
  const vae = await Vae.load(dir, { ...runtime, cacheDir: false });
  try {
    const random = new DataRandom(SCALE_SEED);
    let sum = 0;
    let squares = 0;
    let count = 0;
    for (let done = 0; done < SCALE_IMAGES; done += 64) {
      const { images } = data.sample(random.uniform, 64);
      const { mean } = await vae.encode(patchify(images, 1));
      for (const v of mean.data) {
        sum += v;
        squares += v * v;
        count += 1;
      }
    }
    const average = sum / count;
    const deviation = Math.sqrt(Math.max(squares / count - average * average, 1e-12));
    return { scalingFactor: 1 / deviation, shiftFactor: average };
  } finally {
    await vae.release();
  }
}

/**
 * Fine-tunes the decoder of a trained autoencoder with its encoder frozen: sharper images from
 * the same latents, so a diffusion model already trained in that latent space keeps working (the
 * folder keeps its encoder, scale and shift). The reconstruction loss alone.
 */
export class DecoderTask implements TrainingTask {
  readonly model: AutoencoderKL;
  readonly shapes: ReadonlyMap<string, readonly number[]>;

  private constructor(
    readonly dir: string,
    readonly batchSize: number,
    readonly objective: ReconstructionObjective,
    readonly data: DataSource,
    private readonly config: Record<string, unknown>,
    private readonly start: ReadonlyMap<string, Tensor<'float32'>>,
    private readonly encoder: Vae,
  ) {
    this.model = new AutoencoderKL(autoencoderKLConfig(config), { fusedAttention: false });
    this.shapes = new Map(
      [...this.model.namedParameters()].filter(
        ([key]) => !key.startsWith('encoder.') && !key.startsWith('quant_conv.'),
      ),
    );
  }

  static async load(
    dir: string,
    batchSize: number,
    objective: ReconstructionObjective,
    data: DataSource,
    runtime: RuntimeOptions = {},
  ): Promise<DecoderTask> {
    const config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<
      string,
      unknown
    >;
    const start = new Map<string, Tensor<'float32'>>();
    await SafetensorsFile.with(join(dir, 'diffusion_pytorch_model.safetensors'), async (file) => {
      for (const name of file.names) start.set(name, (await file.read(name)).to('float32'));
    });
    const encoder = await Vae.load(dir, { ...runtime, cacheDir: false });
    return new DecoderTask(dir, batchSize, objective, data, config, start, encoder);
  }

  get cacheKey(): string {
    return JSON.stringify({
      decoder: this.config,
      batch: this.batchSize,
      objective: this.objective,
    });
  }

  get trainedParameters(): number {
    let n = 0;
    for (const shape of this.shapes.values()) n += shapeSize(shape);
    return n;
  }

  /** The trained decoder's weights, not fresh ones: fine-tuning continues from them. */
  initialParameters(): Map<string, Float32Array> {
    return new Map([...this.shapes.keys()].map((key) => [key, this.start.get(key)!.data]));
  }

  buildLoss(p: ParameterSource, g: Graph): Value {
    const b = this.batchSize;
    const side = latentSide(this.model);
    const latents = g.input('latents', 'float32', [
      b,
      this.model.config.latentChannels,
      side,
      side,
    ]);
    const { images, weights } = reconstructionInputs(g, b, this.objective.edgeWeight);
    return reconstructionError(this.model.decode(p, latents), images, this.objective.loss, weights);
  }

  /** Images and draws from their (frozen) latent distributions. */
  async batch(
    _step: number,
    random: DataRandom,
    noise: TorchGenerator,
  ): Promise<Record<string, Tensor>> {
    const { images } = this.data.sample(random.uniform, this.batchSize);
    const targets = reconstructionTargets(images, this.objective.edgeWeight);
    const { mean, std } = await this.encoder.encode(targets.images);
    const eps = noise.randn(mean.shape);
    const latents = new Tensor(
      'float32',
      mean.shape,
      mean.data.map((m, i) => m + std.data[i]! * eps.data[i]!),
    );
    return { latents, ...targets };
  }

  /** The autoencoder folder again: the frozen encoder's weights, the new decoder's, the same config. */
  async exportModel(dir: string, weights: Readonly<Record<string, Tensor>>): Promise<void> {
    await mkdir(dir, { recursive: true });
    const all: Record<string, Tensor> = Object.fromEntries(this.start);
    Object.assign(all, weights);
    await writeSafetensors(join(dir, 'diffusion_pytorch_model.safetensors'), all);
    await writeFile(join(dir, 'config.json'), `${JSON.stringify(this.config, null, 2)}\n`);
  }

  release(): Promise<void> {
    return this.encoder.release();
  }
}
