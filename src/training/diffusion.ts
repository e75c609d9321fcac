import { cp, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { UserError } from '../errors.js';
import { shapesSource, type DataSource } from '../data/source.js';
import type { Graph, Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { ClipTextModel, clipTextConfig } from '../models/clip-text.js';
import { patchify } from '../models/patch-autoencoder.js';
import { UNet2DConditionModel, unetConfig } from '../models/unet-2d-condition.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { Vae } from '../pipelines/components.js';
import type { GenerationDefaults } from '../pipelines/stable-diffusion.js';
import type { RuntimeOptions } from '../runtime/session.js';
import { alphasCumprodFor } from '../schedulers/scheduler.js';
import type { TorchGenerator } from '../tensor/rng.js';
import { shapeSize, Tensor } from '../tensor/tensor.js';
import { WordTokenizer } from '../tokenizers/word.js';
import type { DataRandom, TrainingTask } from './trainer.js';

/**
 * The diffusion route: a bidirectional text encoder trained jointly with a cross-attention UNet
 * that denoises shapes-world images, in pixel space (as a grid of p×p patches) or in the latent
 * space of a trained autoencoder, with caption dropout so classifier-free guidance works. The
 * trained model is an ordinary model folder.
 */

/** A trained autoencoder (an autoencoder run's model/ folder) the denoiser works in. */
export class LatentSpace {
  private constructor(
    readonly dir: string,
    private readonly vae: Vae,
  ) {}

  static async load(dir: string, runtime: RuntimeOptions = {}): Promise<LatentSpace> {
    return new LatentSpace(dir, await Vae.load(dir, { ...runtime, cacheDir: false }));
  }

  get channels(): number {
    return this.vae.latentChannels;
  }

  get side(): number {
    return 64 / this.vae.scaleFactor;
  }

  /** NHWC uint8 images → latents as the pipeline samples them: (mean − shift) · scale. */
  async encode(images: Tensor<'uint8'>): Promise<Tensor<'float32'>> {
    return this.vae.encodeMeanScaled(patchify(images, 1));
  }

  /** The autoencoder's folder as a model's vae/, its weights in fp16 if asked. */
  async copyTo(vaeDir: string, fp16: boolean): Promise<void> {
    await mkdir(vaeDir, { recursive: true });
    await cp(join(this.dir, 'config.json'), join(vaeDir, 'config.json'));
    const file = 'diffusion_pytorch_model.safetensors';
    if (!fp16) return cp(join(this.dir, file), join(vaeDir, file));
    const tensors: Record<string, Tensor> = {};
    await SafetensorsFile.with(join(this.dir, file), async (f) => {
      for (const name of f.names) tensors[name] = (await f.read(name)).to('float16');
    });
    await writeSafetensors(join(vaeDir, file), tensors);
  }

  release(): Promise<void> {
    return this.vae.release();
  }
}

export interface DiffusionRecipe {
  readonly batchSize: number;
  /** Fraction of captions replaced by the empty caption (for classifier-free guidance). */
  readonly captionDropout: number;
  readonly patchSize: number;
  /** Token sequence length. */
  readonly maxLength: number;
  /** The text encoder's config.json (a CLIP text model with `causal: false`). */
  readonly textEncoder: Readonly<Record<string, unknown>>;
  /** The UNet's config.json, diffusers' keys. */
  readonly unet: Readonly<Record<string, unknown>>;
  /**
   * The noise schedule trained on: diffusers DDPM scheduler keys. `prediction_type` is what the
   * UNet outputs: `epsilon`, `v_prediction` or `sample` (the clean image).
   */
  readonly noise: Readonly<Record<string, unknown>>;
  /**
   * Min-SNR loss weighting (Hang et al. 2023), as a weight on the clean-image error: min(1 + SNR,
   * cap) for `sample` and `v_prediction` (the v loss with its low-noise weights clipped), and
   * min(SNR, cap) for `epsilon` (whose clean-image weight 1 + SNR would be unbounded at high
   * noise); each put in the units of the prediction, so the prediction type changes only what the
   * UNet outputs. 0 turns weighting off: plain MSE on the prediction.
   */
  readonly snrWeightCap: number;
}

/**
 * The Min-SNR weight of one example's loss in the units of its prediction. The clean-image error
 * is the prediction's error times 1 (sample), √(1 − ᾱ) (v) or √((1 − ᾱ)/ᾱ) (ε), so its weight
 * min(1 + SNR, cap), or min(SNR, cap) for ε, is divided by 1, 1 + SNR or SNR.
 */
export function minSnrWeight(
  snr: number,
  cap: number,
  prediction: 'epsilon' | 'v_prediction' | 'sample',
): number {
  if (prediction === 'sample') return Math.min(1 + snr, cap);
  if (prediction === 'v_prediction') return Math.min(1 + snr, cap) / (1 + snr);
  // ᾱ = 0 exactly (a zero-terminal-SNR schedule's last step): the limit of min(SNR, cap) / SNR.
  return snr > 0 ? Math.min(snr, cap) / snr : 1;
}

/** What makes a text encoder config gesso's own: its word tokenizer's <eos> is id 2. */
const GESSO_TEXT_MODEL = { architectures: ['GessoTextModel'], eos_token_id: 2 };

export const DEFAULT_DIFFUSION_RECIPE: DiffusionRecipe = {
  batchSize: 32,
  captionDropout: 0.1,
  patchSize: 4,
  maxLength: 24,
  textEncoder: {
    architectures: ['GessoTextModel'],
    hidden_size: 128,
    intermediate_size: 256,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    max_position_embeddings: 24,
    hidden_act: 'gelu',
    layer_norm_eps: 1e-5,
    causal: false,
  },
  unet: {
    in_channels: 48,
    out_channels: 48,
    sample_size: 16,
    block_out_channels: [64, 128, 128],
    layers_per_block: 1,
    down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
    only_cross_attention: [true, false, false],
    cross_attention_dim: 128,
    attention_head_dim: 4,
    norm_num_groups: 16,
  },
  noise: {
    num_train_timesteps: 1000,
    beta_schedule: 'squaredcos_cap_v2',
    prediction_type: 'sample',
  },
  snrWeightCap: 5,
};

/** What a shapes model samples with unless told otherwise: DPM-Solver++ converges in 20 steps. */
export const SHAPES_DEFAULTS: GenerationDefaults = { steps: 20, guidance: 4 };

/** The module tree: `text_encoder.*` and `unet.*`, exported to their own folders. */
class DiffusionModel extends Module {
  readonly textEncoder: ClipTextModel;
  readonly unet: UNet2DConditionModel;

  constructor(recipe: DiffusionRecipe, vocabularySize: number) {
    super();
    this.textEncoder = this.addModule(
      'text_encoder',
      new ClipTextModel(
        clipTextConfig({ ...recipe.textEncoder, ...GESSO_TEXT_MODEL, vocab_size: vocabularySize }),
      ),
    );
    this.unet = this.addModule(
      'unet',
      new UNet2DConditionModel(unetConfig(recipe.unet), { fusedAttention: false }),
    );
  }
}

/** Weights `init_from` may lack: added at zero, they leave the model's function unchanged. */
const ADDABLE_AT_ZERO = /^text_encoder\.text_model\.embeddings\.token_mixing\.weight$/;

export class DiffusionTask implements TrainingTask {
  readonly recipe: DiffusionRecipe;
  readonly data: DataSource;
  readonly tokenizer: WordTokenizer;
  readonly model: DiffusionModel;
  readonly shapes: ReadonlyMap<string, readonly number[]>;
  private readonly alphasCumprod: Float32Array;
  private readonly predictionType: 'epsilon' | 'v_prediction' | 'sample';
  /** Latents per side of the grid the UNet denoises. */
  private readonly side: number;
  /** Trained weights to start from (`startFrom`); fresh ones when absent. */
  private start: Map<string, Float32Array> | undefined;

  /** `latents`: the trained autoencoder to work in; without it, pixel space as p×p patches. */
  constructor(
    recipe: DiffusionRecipe = DEFAULT_DIFFUSION_RECIPE,
    data: DataSource = shapesSource(),
    readonly latents?: LatentSpace,
  ) {
    this.recipe = recipe;
    this.data = data;
    this.tokenizer = new WordTokenizer(data.vocabulary, recipe.maxLength);
    this.model = new DiffusionModel(recipe, this.tokenizer.vocab.length);
    this.shapes = this.model.namedParameters();
    this.alphasCumprod = alphasCumprodFor(recipe.noise);
    const prediction = recipe.noise.prediction_type ?? 'epsilon';
    if (prediction !== 'epsilon' && prediction !== 'v_prediction' && prediction !== 'sample')
      throw new UserError(
        'bad-config',
        `noise.prediction_type ${JSON.stringify(prediction)} is not one of epsilon, v_prediction, sample`,
      );
    this.predictionType = prediction;
    const channels = latents?.channels ?? 3 * recipe.patchSize ** 2;
    if (
      this.model.unet.config.inChannels !== channels ||
      this.model.unet.config.outChannels !== channels
    )
      throw new UserError(
        'bad-config',
        `the UNet's in_channels and out_channels must be ${channels}, the channels of ${latents !== undefined ? `the latents of ${latents.dir}` : `${recipe.patchSize}×${recipe.patchSize} RGB patches`} (got ${this.model.unet.config.inChannels} and ${this.model.unet.config.outChannels})`,
      );
    this.side = latents?.side ?? 64 / recipe.patchSize;
  }

  get cacheKey(): string {
    return JSON.stringify({
      diffusion: this.recipe,
      vocabulary: this.tokenizer.vocab,
      side: this.side,
    });
  }

  initialParameters(random: TorchGenerator): Map<string, Float32Array> {
    return this.start ?? this.model.initialParameters(random);
  }

  /**
   * Starts training from the text encoder and UNet of a trained model folder (fine-tuning) rather
   * than from fresh weights. The folder must be this architecture with this tokenizer: every
   * weight present with its shape, and the same words in the same order (a word's id picks its
   * embedding row). fp16 weights are widened to fp32. A token-mixing window the folder lacks
   * (`gesso_token_mixing` added to its encoder) starts at zero, so training starts from the
   * folder's model exactly.
   */
  async startFrom(dir: string): Promise<void> {
    const words = (await WordTokenizer.fromFolder(join(dir, 'tokenizer'))).vocab;
    const ours = this.tokenizer.vocab;
    if (words.length !== ours.length || words.some((w, i) => w !== ours[i]))
      throw new UserError(
        'bad-init',
        `init_from: ${dir} has a tokenizer of ${words.length} words that differs from this run's ${ours.length} (the data's vocabulary); fine-tune on the data the model was trained on, or train from scratch`,
      );
    // Only this model's weights are read, each checked for its exact shape before its bytes.
    const start = new Map<string, Float32Array>();
    const read = async (prefix: string, file: string) => {
      await SafetensorsFile.with(join(dir, prefix, file), async (f) => {
        const names = new Set(f.names);
        for (const [key, shape] of this.shapes) {
          if (!key.startsWith(`${prefix}.`)) continue;
          const name = key.slice(prefix.length + 1);
          const found = names.has(name) ? f.info(name).shape : undefined;
          if (found === undefined && ADDABLE_AT_ZERO.test(key)) {
            start.set(key, new Float32Array(shapeSize(shape)));
            continue;
          }
          if (found === undefined || found.join() !== shape.join())
            throw new UserError(
              'bad-init',
              `init_from: ${dir} ${found === undefined ? `has no weight ${key}` : `has ${key} of shape [${found.join(', ')}] where this run's model has [${shape.join(', ')}]`}; the model config (model.unet, model.text_encoder) must be the one ${dir} was trained with`,
            );
          start.set(key, (await f.read(name)).to('float32').data);
        }
      });
    };
    await read('text_encoder', 'model.safetensors');
    await read('unet', 'diffusion_pytorch_model.safetensors');
    this.start = start;
  }

  buildLoss(p: ParameterSource, g: Graph): Value {
    const { batchSize: b, maxLength } = this.recipe;
    const c = this.model.unet.config.inChannels;
    const side = this.side;
    const ids = g.input('input_ids', 'int64', [b, maxLength]);
    const noisy = g.input('noisy', 'float32', [b, c, side, side]);
    const timestep = g.input('timestep', 'float32', [b]);
    const target = g.input('target', 'float32', [b, c, side, side]);
    const weight = g.input('loss_weight', 'float32', [b, 1, 1, 1]);
    const context = this.model.textEncoder.forward(p, ids).lastHiddenState;
    const prediction = this.model.unet.forward(p, {
      sample: noisy,
      timestep,
      encoderHiddenStates: context,
    });
    const error = op.sub(prediction, target);
    return op.reduceMean(op.mul(op.mul(error, error), weight), [0, 1, 2, 3], false);
  }

  async batch(
    _step: number,
    random: DataRandom,
    noise: TorchGenerator,
  ): Promise<Record<string, Tensor>> {
    const { batchSize: b, captionDropout, patchSize, maxLength } = this.recipe;
    const { images, captions } = this.data.sample(random.uniform, b);
    const prompts = captions.map((caption) => (random.next() < captionDropout ? '' : caption));
    const ids = Tensor.int64(
      [b, maxLength],
      prompts.flatMap((p) => this.tokenizer.encode(p)),
    );
    const x0 =
      this.latents !== undefined ? await this.latents.encode(images) : patchify(images, patchSize);
    const eps = noise.randn(x0.shape);
    const total = this.alphasCumprod.length;
    const per = x0.size / b;
    const noisy = new Tensor('float32', x0.shape);
    const target = new Tensor('float32', x0.shape);
    const timesteps = new Float32Array(b);
    const weights = new Float32Array(b);
    const prediction = this.predictionType;
    const cap = this.recipe.snrWeightCap;
    for (let n = 0; n < b; n++) {
      const t = Math.min(total - 1, Math.floor(random.next() * total));
      timesteps[n] = t;
      const alphaBar = this.alphasCumprod[t]!;
      const a = Math.sqrt(alphaBar);
      const s = Math.sqrt(1 - alphaBar);
      weights[n] = cap > 0 ? minSnrWeight(alphaBar / (1 - alphaBar), cap, prediction) : 1;
      for (let i = n * per; i < (n + 1) * per; i++) {
        const x = x0.data[i]!;
        const e = eps.data[i]!;
        noisy.data[i] = a * x + s * e;
        target.data[i] = prediction === 'sample' ? x : prediction === 'epsilon' ? e : a * e - s * x;
      }
    }
    return {
      input_ids: ids,
      noisy,
      timestep: new Tensor('float32', [b], timesteps),
      target,
      loss_weight: new Tensor('float32', [b, 1, 1, 1], weights),
    };
  }

  /** Writes a model folder that StableDiffusionPipeline.fromPretrained loads. */
  async exportModel(
    dir: string,
    weights: Readonly<Record<string, Tensor>>,
    options: { fp16?: boolean; note?: string; defaults?: GenerationDefaults } = {},
  ): Promise<void> {
    const part = (prefix: string) => {
      const out: Record<string, Tensor> = {};
      for (const [key, t] of Object.entries(weights)) {
        if (key.startsWith(`${prefix}.`))
          out[key.slice(prefix.length + 1)] = options.fp16 === true ? t.to('float16') : t;
      }
      return out;
    };
    const json = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;
    const write = async (sub: string, files: Record<string, string>) => {
      await mkdir(join(dir, sub), { recursive: true });
      for (const [name, text] of Object.entries(files)) await writeFile(join(dir, sub, name), text);
    };
    const te = this.model.textEncoder.config;
    await write('', {
      'model_index.json': json({
        _class_name: 'StableDiffusionPipeline',
        _gesso: {
          route: 'diffusion',
          note: options.note ?? '',
          defaults: options.defaults ?? SHAPES_DEFAULTS,
        },
        tokenizer: ['gesso', 'GessoWordTokenizer'],
        text_encoder: ['gesso', 'GessoTextModel'],
        unet: ['diffusers', 'UNet2DConditionModel'],
        vae:
          this.latents !== undefined
            ? ['diffusers', 'AutoencoderKL']
            : ['gesso', 'GessoPatchAutoencoder'],
        scheduler: ['diffusers', 'DPMSolverMultistepScheduler'],
      }),
    });
    await write('tokenizer', this.tokenizer.files());
    await write('text_encoder', {
      'config.json': json({
        ...this.recipe.textEncoder,
        ...GESSO_TEXT_MODEL,
        vocab_size: te.vocabSize,
      }),
    });
    await write('unet', {
      'config.json': json({ _class_name: 'UNet2DConditionModel', ...this.recipe.unet }),
    });
    if (this.latents !== undefined) {
      await this.latents.copyTo(join(dir, 'vae'), options.fp16 === true);
    } else {
      await write('vae', {
        'config.json': json({
          _class_name: 'GessoPatchAutoencoder',
          patch_size: this.recipe.patchSize,
          in_channels: 3,
          scaling_factor: 1,
        }),
      });
    }
    await write('scheduler', {
      'scheduler_config.json': json({
        _class_name: 'DPMSolverMultistepScheduler',
        ...this.recipe.noise,
        algorithm_type: 'dpmsolver++',
        solver_order: 2,
        timestep_spacing: 'trailing',
        // DDIM and DDPM clip x₀ to [-1, 1] unless told not to, as diffusers does; right for
        // pixels, ruinous for latents (a DDIM switch scored 0.004 where DPM-Solver++ scores 0.24).
        clip_sample: this.latents === undefined,
      }),
    });
    await writeSafetensors(join(dir, 'text_encoder', 'model.safetensors'), part('text_encoder'));
    await writeSafetensors(join(dir, 'unet', 'diffusion_pytorch_model.safetensors'), part('unet'));
  }
}
