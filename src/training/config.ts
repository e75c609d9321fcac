import { extname } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { UserError } from '../errors.js';
import { readUserFile } from '../io/atomic.js';
import { DEFAULT_AUTOENCODER_RECIPE } from './autoencoder.js';
import { DEFAULT_DIFFUSION_RECIPE } from './diffusion.js';

/**
 * `gesso train`'s configuration: a JSON or YAML file, flags over it, defaults under both. Every
 * field is listed in FIELDS with its meaning; `gesso train --help` prints them.
 */

export interface TrainConfig {
  route: 'diffusion' | 'gan' | 'features' | 'autoencoder';
  out: string;
  seed: number;
  steps: number;
  batch_size: number;
  learning_rate: number;
  final_learning_rate: number;
  warmup_steps: number;
  decay: 'cosine' | 'constant';
  ema_decay: number;
  weight_decay: number;
  max_grad_norm: number;
  learning_rate_scales: Record<string, number>;
  caption_dropout: number;
  save_every: number;
  sample_every: number;
  sample_prompts: string[];
  sample_steps: number;
  sample_guidance: number;
  data: string;
  shapes_colourless: number;
  threads: number | null;
  text_encoder_from: string;
  vae_from: string;
  init_from: string;
  autoencoder: {
    vae: Record<string, unknown>;
    kl_weight: number;
    loss: 'mse' | 'l1';
    edge_weight: number;
    finetune_decoder_of: string;
  };
  gan: {
    z_dim: number;
    nf: number;
    patch_size: number;
    attention_resolutions: number[];
    generator_learning_rate: number;
    discriminator_learning_rate: number;
    gp_weight: number;
    gp_power: number;
    blocks_per_resolution: number;
    sentence: string;
  };
  model: {
    patch_size: number;
    max_length: number;
    snr_weight_cap: number;
    text_encoder: Record<string, unknown>;
    unet: Record<string, unknown>;
    noise: Record<string, unknown>;
  };
}

interface Field {
  readonly type:
    'number' | 'integer' | 'string' | 'object' | 'string[]' | 'integer|null' | 'number map';
  readonly doc: string;
  readonly choices?: readonly string[];
  readonly min?: number;
}

export const FIELDS: Readonly<Record<keyof TrainConfig, Field>> = {
  route: {
    type: 'string',
    choices: ['diffusion', 'gan', 'features', 'autoencoder'],
    doc: 'what to train: diffusion or gan (text-to-image models), autoencoder (the latent space a diffusion model can work in: its vae_from), or features (the shapes network gesso eval measures realism with)',
  },
  out: {
    type: 'string',
    doc: 'run folder: checkpoint/ (resumable state), model/ (the trained model, loadable by gesso generate), samples/, log.jsonl',
  },
  seed: {
    type: 'integer',
    min: 0,
    doc: 'seeds initialization, data and noise: the same seed and config give the same run',
  },
  steps: { type: 'integer', min: 1, doc: 'optimizer steps in all' },
  batch_size: { type: 'integer', min: 1, doc: 'images per step' },
  learning_rate: { type: 'number', min: 0, doc: 'peak AdamW learning rate, reached after warm-up' },
  final_learning_rate: {
    type: 'number',
    min: 0,
    doc: 'learning rate at the last step with cosine decay',
  },
  warmup_steps: { type: 'integer', min: 0, doc: 'steps of linear learning-rate warm-up from zero' },
  decay: {
    type: 'string',
    choices: ['cosine', 'constant'],
    doc: 'learning-rate schedule after warm-up',
  },
  ema_decay: {
    type: 'number',
    min: 0,
    doc: 'decay of the weights’ exponential moving average (the exported model uses the EMA)',
  },
  weight_decay: {
    type: 'number',
    min: 0,
    doc: 'AdamW decoupled weight decay on matrices and kernels',
  },
  max_grad_norm: {
    type: 'number',
    min: 0,
    doc: 'clip the gradients’ global norm to this (0 turns clipping off)',
  },
  learning_rate_scales: {
    type: 'number map',
    min: 0,
    doc: 'diffusion route: learning-rate multipliers by parameter-name prefix, as PyTorch parameter groups (a parameter takes the longest prefix it starts with, for its update and weight decay; names as in the model files with the folder in front, e.g. text_encoder.text_model.embeddings.token_mixing.weight: 20); empty: every parameter at the schedule’s rate',
  },
  caption_dropout: {
    type: 'number',
    min: 0,
    doc: 'fraction of captions replaced by the empty caption, for classifier-free guidance',
  },
  save_every: {
    type: 'integer',
    min: 1,
    doc: 'write the checkpoint and the model every this many steps (and on exit or Ctrl-C)',
  },
  sample_every: {
    type: 'integer',
    min: 0,
    doc: 'write a grid of samples for sample_prompts every this many steps (0: never)',
  },
  sample_prompts: { type: 'string[]', doc: 'prompts drawn in the sample grids' },
  sample_steps: { type: 'integer', min: 1, doc: 'denoising steps for sample grids' },
  sample_guidance: { type: 'number', min: 0, doc: 'guidance scale for sample grids' },
  data: {
    type: 'string',
    doc: '"shapes" (the shapes world, generated on the fly) or a folder of images with captions (NAME.txt beside each, or metadata.jsonl)',
  },
  shapes_colourless: {
    type: 'number',
    min: 0,
    doc: 'shapes world: fraction of single-object captions that leave the colour unnamed ("a circle"); the grammar always names it, prompts often do not',
  },
  threads: { type: 'integer|null', min: 1, doc: 'compute threads (null: one per core)' },
  text_encoder_from: {
    type: 'string',
    doc: 'gan route: the model folder whose tokenizer/ and text_encoder/ the GAN uses, frozen (a trained diffusion model)',
  },
  vae_from: {
    type: 'string',
    doc: 'diffusion and gan routes: a trained autoencoder (the model/ folder of an autoencoder run) whose latents the UNet denoises, or the GAN draws and judges (gan.patch_size is then 1); empty: pixel space, as p×p patches (model.patch_size, gan.patch_size)',
  },
  init_from: {
    type: 'string',
    doc: "diffusion route: a trained diffusion model folder (gesso's own, the same architecture and tokenizer) whose text encoder and UNet weights training starts from instead of fresh ones: fine-tuning, with a fresh optimizer and learning-rate schedule; a gesso_token_mixing window the folder lacks starts at zero, so the model starts as the folder's; empty: from scratch",
  },
  autoencoder: {
    type: 'object',
    doc: 'autoencoder route: vae (a diffusers AutoencoderKL config; its latents are 64 / 2^(blocks − 1) on a side), kl_weight (weight of the mean KL term beside the mean pixel error), loss (the pixel error: mse or l1), edge_weight (extra weight on pixels at colour edges of the image, where shapes differ; 0: every pixel alike), finetune_decoder_of (a trained autoencoder folder: train only its decoder further, the encoder frozen, so its latents stay valid for a diffusion model trained on them; empty: train from scratch)',
  },
  gan: {
    type: 'object',
    doc: 'gan route: z_dim, nf (base width), patch_size, attention_resolutions (grid sizes with word attention), blocks_per_resolution (generator blocks per grid size: one that doubles it, the rest keep it; 1 as DF-GAN), sentence (the caption as one vector for both networks: max, the largest value of each feature over the tokens of the caption, or eos, the state of the text encoder at the end-of-text token, as DF-GAN; a frozen diffusion encoder gathers the caption at no single token, hence max), generator_learning_rate, discriminator_learning_rate, gp_weight and gp_power (MA-GP)',
  },
  model: {
    type: 'object',
    doc: 'architecture: patch_size (pixels per side of a patch), max_length (tokens), text_encoder (a CLIP text config; causal false; gesso_token_embedding_std and gesso_position_embedding_std: the spread of the word and position embeddings at the start, 0.02 as in CLIP by default; gesso_token_mixing: an odd window of tokens, each word embedding plus a learned convolution over the embeddings in that window, 1 (none) by default), unet (a diffusers UNet2DConditionModel config; gesso_position_embedding: true adds a learned embedding of each latent cell after conv_in; gesso_text_layout: true adds a learned linear map from the mean text state to a feature map of the latent grid after conv_in, a direct route from place words to places; gesso_patch_size: p folds p×p latents into channels before conv_in and unfolds them after conv_out, so the UNet runs on a grid p times coarser; diffusers itself reads none of these), noise (diffusers DDPM scheduler keys: beta_schedule, prediction_type epsilon|v_prediction|sample, ...), snr_weight_cap (Min-SNR: weight min(1 + SNR, cap) on the clean-image error, min(SNR, cap) for epsilon, put in the units of the prediction, so prediction_type changes only what the UNet outputs; 0 for plain MSE on the prediction)',
  },
};

export const DEFAULT_TRAIN_CONFIG: TrainConfig = {
  route: 'diffusion',
  out: 'runs/shapes-diffusion',
  seed: 1,
  steps: 6000,
  batch_size: DEFAULT_DIFFUSION_RECIPE.batchSize,
  learning_rate: 1e-3,
  final_learning_rate: 1e-4,
  warmup_steps: 200,
  decay: 'cosine',
  ema_decay: 0.999,
  weight_decay: 0.01,
  max_grad_norm: 1,
  learning_rate_scales: {},
  caption_dropout: DEFAULT_DIFFUSION_RECIPE.captionDropout,
  save_every: 500,
  sample_every: 500,
  sample_prompts: [
    'a red circle',
    'a small blue square in the top left corner',
    'three green triangles',
    'a yellow circle to the left of a purple square',
    'a large white diamond on a black background',
    'an orange circle',
    'two blue diamonds on a white background',
    'a green triangle above a red square',
  ],
  sample_steps: 20,
  sample_guidance: 4,
  data: 'shapes',
  shapes_colourless: 0,
  threads: null,
  text_encoder_from: 'models/shapes-diffusion',
  vae_from: '',
  init_from: '',
  autoencoder: {
    vae: { ...DEFAULT_AUTOENCODER_RECIPE.vae },
    kl_weight: DEFAULT_AUTOENCODER_RECIPE.klWeight,
    loss: DEFAULT_AUTOENCODER_RECIPE.loss,
    edge_weight: DEFAULT_AUTOENCODER_RECIPE.edgeWeight,
    finetune_decoder_of: '',
  },
  gan: {
    z_dim: 100,
    nf: 32,
    patch_size: 4,
    attention_resolutions: [8, 16],
    generator_learning_rate: 1e-4,
    discriminator_learning_rate: 4e-4,
    gp_weight: 2,
    gp_power: 6,
    blocks_per_resolution: 1,
    sentence: 'max',
  },
  model: {
    patch_size: DEFAULT_DIFFUSION_RECIPE.patchSize,
    max_length: DEFAULT_DIFFUSION_RECIPE.maxLength,
    snr_weight_cap: DEFAULT_DIFFUSION_RECIPE.snrWeightCap,
    text_encoder: { ...DEFAULT_DIFFUSION_RECIPE.textEncoder },
    unet: { ...DEFAULT_DIFFUSION_RECIPE.unet },
    noise: { ...DEFAULT_DIFFUSION_RECIPE.noise },
  },
};

function check(key: string, value: unknown): void {
  const field = FIELDS[key as keyof TrainConfig];
  if (field === undefined) {
    throw new UserError(
      'bad-config',
      `unknown training config field '${key}' (known: ${Object.keys(FIELDS).join(', ')})`,
    );
  }
  const bad = (what: string): never => {
    throw new UserError(
      'bad-config',
      `training config field '${key}' must be ${what} (got ${JSON.stringify(value)})`,
    );
  };
  switch (field.type) {
    case 'number':
      if (typeof value !== 'number' || !Number.isFinite(value)) bad('a number');
      break;
    case 'integer':
      if (!Number.isInteger(value)) bad('an integer');
      break;
    case 'integer|null':
      if (value !== null && !Number.isInteger(value)) bad('an integer or null');
      break;
    case 'string':
      if (typeof value !== 'string') bad('a string');
      break;
    case 'string[]':
      if (!Array.isArray(value) || !value.every((v) => typeof v === 'string'))
        bad('a list of strings');
      break;
    case 'number map':
      if (
        typeof value !== 'object' ||
        value === null ||
        Array.isArray(value) ||
        !Object.values(value).every(
          (v) => typeof v === 'number' && Number.isFinite(v) && v >= (field.min ?? -Infinity),
        )
      )
        bad(
          `a mapping of names to numbers${field.min !== undefined ? ` of at least ${field.min}` : ''}`,
        );
      break;
    case 'object': {
      if (typeof value !== 'object' || value === null || Array.isArray(value)) bad('an object');
      // A misspelt key inside model, autoencoder or gan would otherwise be dropped in silence.
      const known = Object.keys(DEFAULT_TRAIN_CONFIG[key as keyof TrainConfig] as object);
      for (const inner of Object.keys(value as object)) {
        if (!known.includes(inner))
          throw new UserError(
            'bad-config',
            `unknown field '${inner}' in training config field '${key}' (known: ${known.join(', ')})`,
          );
      }
      break;
    }
  }
  if (field.choices !== undefined && !field.choices.includes(value as string))
    bad(`one of ${field.choices.join(', ')}`);
  if (field.min !== undefined && typeof value === 'number' && value < field.min)
    bad(`at least ${field.min}`);
}

/** Reads a JSON (.json) or YAML (.yaml, .yml) config file. */
export async function readTrainConfigFile(path: string): Promise<Record<string, unknown>> {
  const text = (await readUserFile(path, 'the training config ')).toString('utf8');
  let value: unknown;
  try {
    value = ['.yaml', '.yml'].includes(extname(path).toLowerCase())
      ? parseYaml(text)
      : JSON.parse(text);
  } catch (error) {
    throw new UserError(
      'bad-config',
      `${path} is not valid ${extname(path) === '.json' ? 'JSON' : 'YAML'}: ${(error as Error).message}`,
    );
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new UserError('bad-config', `${path} must hold a mapping of fields`);
  return value as Record<string, unknown>;
}

/** Defaults, then the file's fields, then flags; every field checked. */
export function resolveTrainConfig(...layers: readonly Record<string, unknown>[]): TrainConfig {
  const config = structuredClone(DEFAULT_TRAIN_CONFIG) as unknown as Record<string, unknown>;
  for (const layer of layers) {
    for (const [key, value] of Object.entries(layer)) {
      if (value === undefined) continue;
      check(key, value);
      // An object field (model, autoencoder, gan) keeps the defaults of the keys a layer leaves out.
      config[key] =
        FIELDS[key as keyof TrainConfig].type === 'object'
          ? { ...(config[key] as Record<string, unknown>), ...(value as Record<string, unknown>) }
          : value;
    }
  }
  const resolved = config as unknown as TrainConfig;
  if (resolved.route !== 'diffusion' && Object.keys(resolved.learning_rate_scales).length > 0)
    throw new UserError(
      'bad-config',
      `learning_rate_scales applies to the diffusion route only; remove it to train route ${resolved.route}`,
    );
  return resolved;
}

export function describeFields(): string {
  return Object.entries(FIELDS)
    .map(
      ([key, f]) =>
        `  ${key.padEnd(20)} ${f.doc}${f.choices ? ` (${f.choices.join(' | ')})` : ''}; default ${JSON.stringify((DEFAULT_TRAIN_CONFIG as unknown as Record<string, unknown>)[key]).slice(0, 60)}`,
    )
    .join('\n');
}
