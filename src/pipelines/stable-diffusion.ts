import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { UserError } from '../errors.js';
import { readConfig } from '../loaders/component.js';
import { readLora, type LoraSpec } from '../loaders/lora.js';
import { openSingleFile } from '../loaders/single-file.js';
import { createScheduler, type Scheduler, type SchedulerConfig } from '../schedulers/index.js';
import { availableMemoryBytes } from '../runtime/cpu.js';
import { fromModelPixels } from '../io/image.js';
import { concat, map } from '../tensor/ops.js';
import {
  randomSeed,
  seededGenerator,
  type NormalGenerator,
  type RngSource,
} from '../tensor/rng.js';
import { Tensor } from '../tensor/tensor.js';
import { ClipTokenizer, loadTokenizer, type Tokenizer } from '../tokenizers/index.js';
import { applyComfyWeights, comfyPromptChunks } from '../tokenizers/comfy-prompt.js';
import { applyEmphasis, promptChunks, type PromptSyntax } from '../tokenizers/prompt.js';
import {
  composablePrompt,
  conditioningPlan,
  scheduledIndex,
  type ConditioningPlan,
  type ImageConditions,
} from '../tokenizers/prompt-schedule.js';
import { TextEncoder, UNet, Vae, type ComponentOptions } from './components.js';
import { variationNoise } from './variation-noise.js';

/**
 * Text-to-image and image-to-image with Stable Diffusion 1.x/2.x models from a diffusers folder,
 * step for step as diffusers' `StableDiffusionPipeline` and `StableDiffusionImg2ImgPipeline`:
 * tokenizer → text encoder → scheduler loop over the UNet with classifier-free guidance → VAE.
 */

type F32 = Tensor<'float32'>;

export interface ProgressInfo {
  /** 1-based index of the step just finished, and the number of steps. */
  readonly step: number;
  readonly steps: number;
  readonly timestep: number;
  /** The latents after this step. */
  readonly latents: F32;
}

export interface GenerateOptions {
  readonly prompt: string | readonly string[];
  readonly negativePrompt?: string | readonly string[];
  /** Denoising steps (default: the folder's recommendation, else 50). */
  readonly steps?: number;
  /** Classifier-free guidance scale (default: the folder's, else 7.5); 1 or less turns it off. */
  readonly guidance?: number;
  /** Image size in pixels (default: the model's native size), multiples of 8. */
  readonly width?: number;
  readonly height?: number;
  /** Images per prompt (default 1). */
  readonly count?: number;
  /**
   * A seed for one generator drawing the whole batch (as diffusers with one `torch.Generator`),
   * or one seed per image (one generator each). Default: a random seed.
   */
  readonly seed?: number | readonly number[];
  /** Generators to draw from instead of seeds (TorchGenerator, PhiloxGenerator). */
  readonly generator?: NormalGenerator | readonly NormalGenerator[];
  /**
   * What seeds feed: 'cpu', PyTorch's CPU generator (default; diffusers on CPU, ComfyUI, A1111's
   * CPU source), or 'nv', PyTorch's CUDA generator as A1111's NV source computes it (A1111's
   * default GPU source on NVIDIA cards).
   */
  readonly rng?: RngSource;
  /**
   * A1111's eta noise seed delta (ENSD): past the starting noise, each image's generator is
   * seeded again with its seed plus this, so what ancestral and SDE samplers draw later changes
   * (0 by default; 31337 in setups copied from NovelAI). Needs one seed per image.
   */
  readonly noiseSeedDelta?: number;
  /**
   * AUTOMATIC1111's variation seeds: each image's starting noise spherically interpolated toward
   * the noise of its variation seed by `strength` (0: its own seed's, 1: the variation seed's).
   * Needs one seed per image.
   */
  readonly variation?: { readonly seeds: readonly number[]; readonly strength: number };
  /** A1111's "resize seed from": each seed's noise drawn as for this size, centred in the image. */
  readonly seedResizeFrom?: { readonly width: number; readonly height: number };
  /**
   * A scheduler by name (`euler_a`, `dpmpp_2m_karras`, ...), which keeps the folder's
   * training-schedule keys as diffusers' `from_config` does; or a Scheduler built by the caller.
   * Default: the folder's.
   */
  readonly scheduler?: string | Scheduler;
  /** Scheduler config keys to override (`timestep_spacing`, `use_karras_sigmas`, ...). */
  readonly schedulerConfig?: SchedulerConfig;
  /** Starting noise [B, 4, h, w], unscaled (the scheduler's init sigma is applied, as diffusers). */
  readonly latents?: F32;
  /** Use the text encoder's output this many layers before the last. */
  readonly clipSkip?: number;
  /**
   * How prompts are read: 'plain' text as diffusers reads it (default), or 'a1111':
   * AUTOMATIC1111's emphasis syntax (`(word:1.3)`, `(word)`, `[word]`, `BREAK`), prompts longer
   * than 75 tokens in chunks (see tokenizers/prompt.ts for exactly what weights do), prompt
   * editing `[from:to:when]`, alternation `[a|b]` and composition `A AND B:0.5`
   * (tokenizers/prompt-schedule.ts); or 'comfy': ComfyUI's emphasis and chunking
   * (tokenizers/comfy-prompt.ts).
   */
  readonly promptSyntax?: PromptSyntax;
  /** DDIM's η (default 0). */
  readonly eta?: number;
  /** Guidance rescale φ of Lin et al. (2023), 0 to 1 (default 0). */
  readonly guidanceRescale?: number;
  /** Image-to-image: the starting image, NCHW float in [0, 1] or NHWC uint8. */
  readonly image?: Tensor;
  /** Image-to-image: how much of the schedule to run (default 0.8; 1 when inpainting). */
  readonly strength?: number;
  /**
   * Inpainting: which pixels of `image` to repaint (white, ≥ 0.5) and which to keep (black), as
   * NHWC uint8 (1 or 3 channels) or NCHW float in [0, 1]. A 9-channel inpainting UNet sees the
   * mask and the masked image; an ordinary model keeps the unmasked latents at every step.
   */
  readonly mask?: Tensor;
  /** Inpainting: paste the kept pixels of `image` back over the result (default true). */
  readonly keepUnmasked?: boolean;
  readonly signal?: AbortSignal;
  readonly onProgress?: (info: ProgressInfo) => void | Promise<void>;
  /** Skip the VAE and return only latents. */
  readonly latentsOnly?: boolean;
  /** Decode with the tiny autoencoder (PipelineOptions.tinyVae): much faster, a little softer. */
  readonly fastDecode?: boolean;
  /**
   * Decode in overlapping tiles (diffusers' `enable_tiling`), so memory stays that of one tile.
   * Default: only when the image is more than twice the VAE's training size on a side.
   */
  readonly tiledDecode?: boolean;
}

export interface GenerateResult {
  /** NHWC float in [0, 1] (empty when latentsOnly). */
  readonly images: F32;
  /** The final latents. */
  readonly latents: F32;
  /** The seed behind each image's generator, where seeds were used. */
  readonly seeds: readonly number[] | undefined;
}

/** Settings a model folder recommends (`_gesso.defaults` in model_index.json). */
export interface GenerationDefaults {
  readonly steps: number;
  readonly guidance: number;
}

/** diffusers' own defaults, for folders that recommend nothing. */
export const DIFFUSERS_DEFAULTS: GenerationDefaults = { steps: 50, guidance: 7.5 };

/** The folder's recommended steps and guidance, falling back to diffusers' defaults. */
export function generationDefaults(index: Readonly<Record<string, unknown>>): GenerationDefaults {
  const gesso = index._gesso as { defaults?: Record<string, unknown> } | undefined;
  const d = gesso?.defaults ?? {};
  const number = (v: unknown, fallback: number) =>
    typeof v === 'number' && Number.isFinite(v) ? v : fallback;
  return {
    steps: number(d.steps, DIFFUSERS_DEFAULTS.steps),
    guidance: number(d.guidance, DIFFUSERS_DEFAULTS.guidance),
  };
}

export interface PipelineOptions extends ComponentOptions {
  /** LoRA files to merge into the UNet and text encoders, each with its scale. */
  readonly loras?: readonly LoraSpec[];
  /** A scheduler by name to use by default instead of the folder's. */
  readonly scheduler?: string;
  /**
   * A tiny autoencoder's folder (diffusers' AutoencoderTiny: TAESD for SD 1.x/2.x, TAESDXL for
   * SDXL) for `fastDecode` and previews.
   */
  readonly tinyVae?: string;
  /**
   * Keep only the running model resident: the text encoders are released once the prompts are
   * encoded, the UNet after the last step, the VAE after decoding. Each generation then loads
   * them again (from the graph cache), trading seconds for gigabytes. `'auto'` (the default) does
   * so when the weights are more than {@link AUTO_LOW_MEMORY_SHARE} of the memory this process may
   * use (SDXL in fp32 on a 24 GB machine; SD 1.5 on an 8 GB one), as ComfyUI unloads models
   * to make room.
   */
  readonly lowMemory?: boolean | 'auto';
}

/**
 * The share of memory the weights may take before `lowMemory: 'auto'` releases idle models. With
 * every model resident, a generation peaks near 1.5× the weights (the VAE's activations at full
 * size come on top), measured on SD 1.5 and SDXL (BENCHMARKS.md), so past this share a 24 GB
 * machine would not hold SDXL.
 */
export const AUTO_LOW_MEMORY_SHARE = 0.4;

/** Whether a pipeline whose models weigh `weightBytes` keeps only the running one resident. */
export function resolveLowMemory(
  setting: boolean | 'auto' | undefined,
  weightBytes: number,
  memoryBytes: number = availableMemoryBytes(),
): boolean {
  if (typeof setting === 'boolean') return setting;
  return weightBytes > AUTO_LOW_MEMORY_SHARE * memoryBytes;
}

async function isFile(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined))?.isFile() === true;
}

/** Each item `count` times in a row: the per-image rows of a batch of prompts. */
function eachTimes<T>(list: readonly T[], count: number): T[] {
  return list.flatMap((item) => new Array<T>(count).fill(item));
}

function asList(value: string | readonly string[]): string[] {
  return typeof value === 'string' ? [value] : [...value];
}

/** diffusers' guidance-scale embedding for LCM-distilled UNets (`get_guidance_scale_embedding`). */
function guidanceEmbedding(w: number, dim: number, batch: number): F32 {
  const half = Math.floor(dim / 2);
  const f = Math.fround;
  const step = f(f(Math.log(10000)) / (half - 1));
  const out = new Tensor('float32', [batch, dim]);
  const scaled = f(w * 1000);
  for (let b = 0; b < batch; b++) {
    for (let i = 0; i < half; i++) {
      const angle = f(scaled * f(Math.exp(f(i * -step))));
      out.data[b * dim + i] = Math.sin(angle);
      out.data[b * dim + half + i] = Math.cos(angle);
    }
  }
  return out;
}

/** Mean and unbiased std over all but the first dim, per batch element. */
function stdPerItem(t: F32): number[] {
  const batch = t.shape[0]!;
  const per = t.size / batch;
  return Array.from({ length: batch }, (_, b) => {
    const row = t.data.subarray(b * per, (b + 1) * per);
    const mean = row.reduce((s, v) => s + v, 0) / per;
    return Math.sqrt(row.reduce((s, v) => s + (v - mean) ** 2, 0) / (per - 1));
  });
}

/** The loaded parts of a pipeline; SDXL's second tokenizer and text encoder where it has them. */
interface PipelineParts {
  readonly tokenizer: Tokenizer;
  readonly textEncoder: TextEncoder;
  readonly unet: UNet;
  readonly vae: Vae;
  readonly schedulerConfig: SchedulerConfig;
  readonly tokenizer2: Tokenizer | undefined;
  readonly textEncoder2: TextEncoder | undefined;
}

export class StableDiffusionPipeline {
  readonly path: string;
  readonly tokenizer: Tokenizer;
  readonly textEncoder: TextEncoder;
  readonly unet: UNet;
  readonly vae: Vae;
  private tiny: Vae | undefined;
  readonly schedulerConfig: SchedulerConfig;
  readonly options: PipelineOptions;
  readonly defaults: GenerationDefaults;
  /** SDXL's second tokenizer and text encoder (CLIPTextModelWithProjection). */
  readonly tokenizer2: Tokenizer | undefined;
  readonly textEncoder2: TextEncoder | undefined;
  /** SDXL: with no negative prompt, the negative conditioning is zeros rather than "". */
  readonly forceZerosForEmptyPrompt: boolean;
  /** Whether only the running model stays resident (`options.lowMemory`, resolved). */
  readonly lowMemory: boolean;

  private constructor(
    path: string,
    parts: PipelineParts & { forceZerosForEmptyPrompt: boolean },
    options: PipelineOptions,
    defaults: GenerationDefaults,
  ) {
    this.path = path;
    this.defaults = defaults;
    this.tokenizer = parts.tokenizer;
    this.textEncoder = parts.textEncoder;
    this.unet = parts.unet;
    this.vae = parts.vae;
    this.schedulerConfig = parts.schedulerConfig;
    this.options = options;
    this.tokenizer2 = parts.tokenizer2;
    this.textEncoder2 = parts.textEncoder2;
    this.forceZerosForEmptyPrompt = parts.forceZerosForEmptyPrompt;
    this.lowMemory = resolveLowMemory(
      options.lowMemory,
      [parts.textEncoder, parts.textEncoder2, parts.unet, parts.vae].reduce(
        (sum, part) => sum + (part?.weightBytes ?? 0),
        0,
      ),
    );
  }

  /**
   * Loads a diffusers folder (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/`,
   * `scheduler/`; or the ONNX layout), or a single-file checkpoint (a `.safetensors` file with the
   * original key names).
   */
  static async fromPretrained(
    path: string,
    options: PipelineOptions = {},
  ): Promise<StableDiffusionPipeline> {
    if (options.loras !== undefined && options.loras.length > 0)
      options = {
        ...options,
        mergedLoras: await Promise.all(options.loras.map((l) => readLora(l))),
      };
    if (path.toLowerCase().endsWith('.safetensors') && (await isFile(path)))
      return StableDiffusionPipeline.fromSingleFile(path, options);
    const index = await readConfig(path, 'model_index.json');
    const named = (part: string) =>
      Array.isArray(index[part]) && (index[part] as unknown[])[0] !== null;
    // diffusers' ONNX layout (OnnxStableDiffusionPipeline) splits the VAE in two folders.
    const onnxVae = !named('vae') && named('vae_decoder');
    for (const part of [
      'tokenizer',
      'text_encoder',
      'unet',
      onnxVae ? 'vae_decoder' : 'vae',
      'scheduler',
    ]) {
      if (!named(part)) {
        throw new UserError(
          'missing-component',
          `${path}/model_index.json names no '${part}'; this is not a Stable Diffusion folder`,
        );
      }
    }
    const sdxl = named('text_encoder_2');
    const [tokenizer, textEncoder, unet, vae, schedulerConfig, tokenizer2, textEncoder2] =
      await Promise.all([
        loadTokenizer(join(path, 'tokenizer')),
        TextEncoder.load(join(path, 'text_encoder'), options),
        UNet.load(join(path, 'unet'), options),
        onnxVae
          ? Vae.loadOnnx(
              join(path, 'vae_decoder'),
              named('vae_encoder') ? join(path, 'vae_encoder') : undefined,
              options,
            )
          : Vae.load(join(path, 'vae'), options),
        readConfig(join(path, 'scheduler'), 'scheduler_config.json'),
        sdxl ? loadTokenizer(join(path, 'tokenizer_2')) : undefined,
        sdxl ? TextEncoder.load(join(path, 'text_encoder_2'), options) : undefined,
      ]);
    return StableDiffusionPipeline.assemble(
      path,
      index,
      { tokenizer, textEncoder, unet, vae, schedulerConfig, tokenizer2, textEncoder2 },
      options,
    );
  }

  /**
   * A single-file checkpoint (original CompVis / Stability key names): SD 1.x, SD 2.x or SDXL,
   * its architecture read from the tensor shapes, its weights used in place.
   */
  static async fromSingleFile(
    path: string,
    options: PipelineOptions = {},
  ): Promise<StableDiffusionPipeline> {
    const model = await openSingleFile(path);
    const { components: c, tokenizers } = model;
    const [tokenizer, textEncoder, unet, vae, tokenizer2, textEncoder2] = await Promise.all([
      ClipTokenizer.bundled(tokenizers.tokenizer!.padToken),
      TextEncoder.load(c.text_encoder!, options),
      UNet.load(c.unet!, options),
      Vae.load(c.vae!, options),
      tokenizers.tokenizer_2 !== undefined
        ? ClipTokenizer.bundled(tokenizers.tokenizer_2.padToken)
        : undefined,
      c.text_encoder_2 !== undefined ? TextEncoder.load(c.text_encoder_2, options) : undefined,
    ]);
    return StableDiffusionPipeline.assemble(
      path,
      model.index,
      {
        tokenizer,
        textEncoder,
        unet,
        vae,
        schedulerConfig: model.schedulerConfig,
        tokenizer2,
        textEncoder2,
      },
      options,
    );
  }

  private static async assemble(
    path: string,
    index: Readonly<Record<string, unknown>>,
    parts: PipelineParts,
    options: PipelineOptions,
  ): Promise<StableDiffusionPipeline> {
    if (options.scheduler !== undefined) createScheduler(parts.schedulerConfig, options.scheduler); // fail early on a bad name
    const pipe = new StableDiffusionPipeline(
      path,
      { ...parts, forceZerosForEmptyPrompt: index.force_zeros_for_empty_prompt === true },
      options,
      generationDefaults(index),
    );
    if (options.tinyVae !== undefined) await pipe.loadTinyVae(options.tinyVae);
    return pipe;
  }

  /** The tiny autoencoder for fast decoding and previews, when one is loaded. */
  get tinyVae(): Vae | undefined {
    return this.tiny;
  }

  /** Loads a tiny autoencoder (an AutoencoderTiny folder) for `fastDecode` and previews. */
  async loadTinyVae(dir: string): Promise<void> {
    const tiny = await Vae.load(dir, this.options);
    if (
      tiny.latentChannels !== this.vae.latentChannels ||
      tiny.scaleFactor !== this.vae.scaleFactor
    )
      throw new UserError(
        'bad-model',
        `the tiny autoencoder ${dir} does not fit this model (${tiny.latentChannels} latent channels at 1/${tiny.scaleFactor} scale; the model's VAE: ${this.vae.latentChannels} at 1/${this.vae.scaleFactor})`,
      );
    await this.tiny?.release();
    this.tiny = tiny;
  }

  /** The default image size: the UNet's sample size times the VAE's scale factor. */
  get defaultSize(): number {
    return (this.unet.config.sampleSize ?? 64) * this.vae.scaleFactor;
  }

  /** A fresh scheduler for one generation. */
  makeScheduler(name?: string, overrides: SchedulerConfig = {}): Scheduler {
    return createScheduler(this.schedulerConfig, name ?? this.options.scheduler, overrides);
  }

  /** Token ids for each prompt, padded to the text encoder's length. */
  tokenize(prompts: readonly string[], tokenizer: Tokenizer = this.tokenizer): Tensor<'int64'> {
    const length = tokenizer.maxLength;
    const ids = prompts.flatMap((p) => tokenizer.encode(p, { maxLength: length }));
    return Tensor.int64([prompts.length, length], ids);
  }

  /**
   * One set of prompts encoded: per-token states for cross-attention, and for SDXL the pooled
   * embedding (both encoders' penultimate states side by side; encoder 2's projected pooled state).
   */
  private async encodeIds(
    ids: Tensor<'int64'>,
    ids2: Tensor<'int64'> | undefined,
    clipSkip: number,
  ): Promise<{ hidden: F32; pooled: F32 | undefined }> {
    if (this.textEncoder2 === undefined || ids2 === undefined) {
      const { hidden } = await this.textEncoder.encode(ids, clipSkip);
      return { hidden, pooled: undefined };
    }
    const first = await this.textEncoder.encodeSdxl(ids, clipSkip);
    const second = await this.textEncoder2.encodeSdxl(ids2, clipSkip);
    return { hidden: concat([first.hidden, second.hidden], 2), pooled: second.pooled };
  }

  /** Chunks of A1111- or ComfyUI-syntax prompts for each tokenizer, or undefined for plain ones. */
  private chunked(prompts: readonly string[], syntax: PromptSyntax) {
    const tokenizers = [this.tokenizer, this.tokenizer2].filter((t) => t !== undefined);
    if (syntax === 'plain' || !tokenizers.every((t) => t instanceof ClipTokenizer))
      return undefined;
    const chunks = syntax === 'comfy' ? comfyPromptChunks : promptChunks;
    return (tokenizers as ClipTokenizer[]).map((t) => prompts.map((p) => chunks(t, p)));
  }

  private async encodeText(
    prompts: readonly string[],
    clipSkip: number,
    syntax: PromptSyntax,
    chunkCount: number,
  ): Promise<{ hidden: F32; pooled: F32 | undefined }> {
    const chunks = this.chunked(prompts, syntax);
    if (chunks === undefined) {
      return this.encodeIds(
        this.tokenize(prompts),
        this.tokenizer2 !== undefined ? this.tokenize(prompts, this.tokenizer2) : undefined,
        clipSkip,
      );
    }
    // Chunk i of every prompt is encoded together; prompts with fewer chunks get empty ones.
    const empty = (t: ClipTokenizer) => promptChunks(t, '');
    const tokenizers = [this.tokenizer, this.tokenizer2].filter(
      (t) => t !== undefined,
    ) as ClipTokenizer[];
    const parts: F32[] = [];
    let pooled: F32 | undefined;
    const tensor = (rows: readonly { ids: readonly number[] }[]) =>
      Tensor.int64(
        [rows.length, rows[0]!.ids.length],
        rows.flatMap((r) => r.ids),
      );
    // ComfyUI weighs a token against the empty text's state: start, end, then padding.
    let emptyStates: Float32Array | undefined;
    const emptyText = async () => {
      const row = (t: ClipTokenizer) => ({
        ids: [t.bosId, t.eosId, ...new Array<number>(t.maxLength - 2).fill(t.padId)],
      });
      emptyStates ??= (
        await this.encodeIds(
          tensor([row(tokenizers[0]!)]),
          tokenizers.length > 1 ? tensor([row(tokenizers[1]!)]) : undefined,
          clipSkip,
        )
      ).hidden.data;
      return emptyStates;
    };
    for (let c = 0; c < chunkCount; c++) {
      const pick = (k: number) =>
        chunks[k]!.map((pc) =>
          c < pc.ids.length
            ? { ids: pc.ids[c]!, weights: pc.weights[c]! }
            : { ids: empty(tokenizers[k]!).ids[0]!, weights: empty(tokenizers[k]!).weights[0]! },
        );
      const first = pick(0);
      const encoded = await this.encodeIds(
        tensor(first),
        chunks.length > 1 ? tensor(pick(1)) : undefined,
        clipSkip,
      );
      pooled ??= encoded.pooled; // A1111 and ComfyUI take the pooled state of the first chunk
      const [batch, tokens, width] = encoded.hidden.shape as [number, number, number];
      const weighted = new Tensor('float32', encoded.hidden.shape);
      for (let b = 0; b < batch; b++) {
        const size = tokens * width;
        const states = encoded.hidden.data.subarray(b * size, (b + 1) * size);
        const weights = first[b]!.weights;
        weighted.data.set(
          syntax === 'comfy'
            ? weights.every((w) => w === 1)
              ? states
              : applyComfyWeights(states, await emptyText(), weights, width)
            : applyEmphasis(states, weights, width),
          b * size,
        );
      }
      parts.push(weighted);
    }
    return { hidden: parts.length === 1 ? parts[0]! : concat(parts, 1), pooled };
  }

  /** How many 75-token chunks the longest of these prompts needs (1 for plain prompts). */
  private chunkCount(prompts: readonly string[], syntax: PromptSyntax): number {
    const chunks = this.chunked(prompts, syntax);
    return chunks === undefined ? 1 : Math.max(1, ...chunks.flat().map((c) => c.ids.length));
  }

  /**
   * Prompt embeddings: [negative..., positive...] with guidance, else [positive...]; `count` each
   * (with A1111 syntax, a prompt composed with `AND` has one positive row per part, and edits
   * are read at the first step). `negatives` undefined means no negative prompt: "" for SD 1/2,
   * zeros for SDXL folders with `force_zeros_for_empty_prompt` (as diffusers).
   */
  async encodePrompts(
    prompts: readonly string[],
    negatives: readonly string[] | undefined,
    count: number,
    clipSkip = 0,
    guided = negatives !== undefined,
    syntax: PromptSyntax = 'plain',
  ): Promise<{ embeddings: F32; pooled: F32 | undefined }> {
    const plan = conditioningPlan(
      eachTimes(prompts, count),
      guided ? eachTimes(this.negativeTexts(prompts, negatives), count) : undefined,
      1,
      syntax,
    );
    return (await this.conditioning(plan, clipSkip, syntax)).at(0);
  }

  /** Each prompt's negative prompt: the one given, else "" (or zeros, null, where SDXL wants them). */
  private negativeTexts(
    prompts: readonly string[],
    negatives: readonly string[] | undefined,
  ): (string | null)[] {
    if (negatives === undefined)
      return prompts.map(() => (this.forceZerosForEmptyPrompt ? null : ''));
    if (negatives.length === 1) return prompts.map(() => negatives[0]!);
    if (negatives.length !== prompts.length)
      throw new UserError(
        'bad-request',
        `${negatives.length} negative prompts for ${prompts.length} prompts`,
      );
    return [...negatives];
  }

  /**
   * The plan's texts encoded once, and the UNet's conditioning rows at each step: the images'
   * negative prompts (when guided), then every part of every image's prompt, in order.
   */
  private async conditioning(
    plan: ConditioningPlan,
    clipSkip: number,
    syntax: PromptSyntax,
  ): Promise<{ at(step: number): { embeddings: F32; pooled: F32 | undefined } }> {
    const encoded = await this.encodeText(
      plan.texts,
      clipSkip,
      syntax,
      this.chunkCount(plan.texts, syntax),
    );
    const built = new Map<string, { embeddings: F32; pooled: F32 | undefined }>();
    return {
      at(step: number) {
        const texts = [
          ...plan.images.flatMap((c) =>
            c.negative !== undefined ? [scheduledIndex(c.negative, step)] : [],
          ),
          ...plan.images.flatMap((c) => c.parts.map((p) => scheduledIndex(p.schedule, step))),
        ];
        const key = texts.join();
        let result = built.get(key);
        if (result === undefined) {
          result = {
            embeddings: gatherRows(encoded.hidden, texts),
            pooled: encoded.pooled !== undefined ? gatherRows(encoded.pooled, texts) : undefined,
          };
          built.set(key, result);
        }
        return result;
      },
    };
  }

  async generate(options: GenerateOptions): Promise<GenerateResult> {
    const signal = options.signal;
    signal?.throwIfAborted();
    const prompts = asList(options.prompt);
    if (prompts.length === 0) throw new UserError('bad-request', 'no prompt given');
    const count = options.count ?? 1;
    const batch = prompts.length * count;
    const steps = options.steps ?? this.defaults.steps;
    const guidance = options.guidance ?? this.defaults.guidance;
    const cfg = guidance > 1 && this.unet.config.timeCondProjDim === null;
    const imageInput = options.image;
    const scale = this.vae.scaleFactor;
    // The size follows the starting image, else the starting latents, else the model.
    const fromLatents = (axis: 2 | 3) =>
      options.latents !== undefined ? options.latents.shape[axis]! * scale : this.defaultSize;
    const width =
      options.width ?? (imageInput !== undefined ? imageWidth(imageInput) : fromLatents(3));
    const height =
      options.height ?? (imageInput !== undefined ? imageHeight(imageInput) : fromLatents(2));
    checkSize(width, height, scale * this.unet.config.patchSize);
    if (!Number.isInteger(steps) || steps < 1)
      throw new UserError('bad-steps', `steps must be a positive integer (got ${steps})`);
    if (!Number.isInteger(count) || count < 1)
      throw new UserError('bad-request', `count must be a positive integer (got ${count})`);

    const syntax = options.promptSyntax ?? 'plain';
    // A prompt composed with AND is guided whatever the scale: its parts are added as guidance.
    const composite =
      syntax === 'a1111' &&
      prompts.some((p) => {
        const parts = composablePrompt(p);
        return parts.length > 1 || parts[0]!.weight !== 1;
      });
    if (composite && this.unet.config.timeCondProjDim !== null)
      throw new UserError(
        'bad-request',
        'AND in a prompt composes parts through classifier-free guidance, which this guidance-distilled model does not use; write one prompt',
      );
    const guided = cfg || composite;
    const negativePrompts =
      options.negativePrompt === undefined ? undefined : asList(options.negativePrompt);
    const plan = conditioningPlan(
      eachTimes(prompts, count),
      guided ? eachTimes(this.negativeTexts(prompts, negativePrompts), count) : undefined,
      steps,
      syntax,
    );

    // Generators: one for the batch, or one per image, as diffusers accepts.
    let seeds: number[] | undefined;
    let generator: NormalGenerator | NormalGenerator[];
    if (options.generator !== undefined) {
      generator = Array.isArray(options.generator)
        ? [...(options.generator as readonly NormalGenerator[])]
        : (options.generator as NormalGenerator);
    } else {
      const seed = options.seed ?? randomSeed();
      if (typeof seed === 'number') {
        seeds = new Array<number>(batch).fill(seed);
        generator = seededGenerator(seed, options.rng);
      } else {
        if (seed.length !== batch)
          throw new UserError('bad-request', `${seed.length} seeds for ${batch} images`);
        seeds = [...seed];
        generator = seeds.map((s) => seededGenerator(s, options.rng));
      }
    }
    if (Array.isArray(generator) && generator.length !== batch) {
      throw new UserError('bad-request', `${generator.length} generators for ${batch} images`);
    }
    const randn = (shape: readonly number[]): F32 =>
      Array.isArray(generator)
        ? concat((generator as NormalGenerator[]).map((g) => g.randn([1, ...shape.slice(1)])))
        : (generator as NormalGenerator).randn(shape);
    // The starting noise: A1111's variation and resized seeds where asked, else the seeds' own.
    let initialNoise = randn;
    const { variation, seedResizeFrom } = options;
    if (variation !== undefined || seedResizeFrom !== undefined) {
      const imageSeeds =
        seeds !== undefined && (Array.isArray(generator) || batch === 1) ? seeds : undefined;
      if (imageSeeds === undefined)
        throw new UserError(
          'bad-request',
          'variation seeds and resized seeds need one seed per image: pass the seeds as a list',
        );
      if (variation !== undefined && variation.seeds.length !== batch)
        throw new UserError(
          'bad-request',
          `${variation.seeds.length} variation seeds for ${batch} images`,
        );
      initialNoise = (shape) => {
        const drawn = imageSeeds.map((seed, b) =>
          variationNoise(seed, [shape[1]!, shape[2]!, shape[3]!], {
            subseed: variation?.seeds[b] ?? 0,
            strength: variation?.strength ?? 0,
            ...(options.rng !== undefined ? { rng: options.rng } : {}),
            ...(seedResizeFrom !== undefined
              ? {
                  resizeFrom: [
                    Math.floor(seedResizeFrom.height / scale),
                    Math.floor(seedResizeFrom.width / scale),
                  ],
                }
              : {}),
          }),
        );
        // What samplers draw later comes from each image's own seed, as in A1111.
        generator = drawn.map((d) => d.generator);
        return concat(drawn.map((d) => d.noise));
      };
    }

    const conditioning = await this.conditioning(plan, options.clipSkip ?? 0, syntax);
    // The image each UNet row denoises: negatives first when guided, then each prompt's parts.
    const rowImages = [
      ...(guided ? plan.images.map((_, b) => b) : []),
      ...plan.images.flatMap((c, b) => c.parts.map(() => b)),
    ];
    if (this.lowMemory) await Promise.all([this.textEncoder.unload(), this.textEncoder2?.unload()]);
    // SDXL's six time ids per row: original size, crop top-left, target size (all (h, w)).
    const timeIds =
      conditioning.at(0).pooled !== undefined
        ? new Tensor(
            'float32',
            [rowImages.length, 6],
            Float32Array.from(
              { length: rowImages.length * 6 },
              (_, i) => [height, width, 0, 0, height, width][i % 6]!,
            ),
          )
        : undefined;
    signal?.throwIfAborted();

    const scheduler =
      typeof options.scheduler === 'object'
        ? options.scheduler
        : this.makeScheduler(options.scheduler, options.schedulerConfig);
    if (options.eta !== undefined && 'eta' in scheduler)
      (scheduler as { eta: number }).eta = options.eta;
    scheduler.setTimesteps(steps);
    let timesteps = scheduler.timesteps;
    const latentChannels = this.vae.latentChannels;
    const inpaintingModel = this.unet.config.inChannels === 2 * latentChannels + 1;
    if (inpaintingModel && (imageInput === undefined || options.mask === undefined))
      throw new UserError(
        'bad-request',
        'this is an inpainting model: give it an image and a mask of what to repaint',
      );
    if (options.mask !== undefined && imageInput === undefined)
      throw new UserError('bad-request', 'a mask needs the image it masks');
    const latentShape = [batch, latentChannels, height / scale, width / scale];
    const [lh, lw] = [height / scale, width / scale];
    // The mask in pixels (1: repaint) and at latent size (nearest, as torch's interpolate).
    const pixelMask =
      options.mask !== undefined ? binaryMask(options.mask, width, height) : undefined;
    const latentMask =
      pixelMask !== undefined
        ? Float32Array.from({ length: lh * lw }, (_, i) => {
            const y = Math.floor((Math.floor(i / lw) * height) / lh);
            const x = Math.floor(((i % lw) * width) / lw);
            return pixelMask[y * width + x]!;
          })
        : undefined;

    let latents: F32;
    let imageLatents: F32 | undefined;
    let blendNoise: F32 | undefined;
    let maskedImageLatents: F32 | undefined;
    if (imageInput !== undefined && pixelMask !== undefined) {
      const strength = options.strength ?? 1;
      if (!(strength > 0 && strength <= 1))
        throw new UserError('bad-request', `strength must be within (0, 1] (got ${strength})`);
      const initSteps = Math.min(Math.floor(steps * strength), steps);
      const start = Math.max(steps - initSteps, 0);
      timesteps = timesteps.slice(start * scheduler.order);
      scheduler.setBeginIndex(start * scheduler.order);
      if (timesteps.length === 0)
        throw new UserError(
          'bad-request',
          `strength ${strength} with ${steps} steps leaves no step to run`,
        );
      if (!inpaintingModel || strength < 1)
        imageLatents = await this.imageLatents(imageInput, batch, width, height, randn);
      blendNoise = initialNoise(latentShape);
      latents =
        strength >= 1
          ? map(blendNoise, (v) => v * scheduler.initNoiseSigma)
          : scheduler.addNoise(imageLatents!, blendNoise, timesteps[0]!);
      if (inpaintingModel) {
        // diffusers zeroes the repainted pixels in [−1, 1], i.e. mid-gray; given here in [0, 1].
        const pixels = toModelPixels(imageInput);
        const masked = new Tensor('float32', pixels.shape);
        const plane = width * height;
        for (let i = 0; i < masked.size; i++)
          masked.data[i] = pixelMask[i % plane]! >= 0.5 ? 0.5 : pixels.data[i]! / 2 + 0.5;
        maskedImageLatents = await this.imageLatents(masked, batch, width, height, randn);
      }
    } else if (imageInput !== undefined) {
      const strength = options.strength ?? 0.8;
      if (!(strength >= 0 && strength <= 1))
        throw new UserError('bad-request', `strength must be within [0, 1] (got ${strength})`);
      const initSteps = Math.min(Math.floor(steps * strength), steps);
      const start = Math.max(steps - initSteps, 0);
      timesteps = timesteps.slice(start * scheduler.order);
      scheduler.setBeginIndex(start * scheduler.order);
      if (timesteps.length === 0) {
        throw new UserError(
          'bad-request',
          `strength ${strength} with ${steps} steps leaves no step to run; raise either`,
        );
      }
      latents = await this.imageLatents(imageInput, batch, width, height, randn);
      const noise = initialNoise(latents.shape);
      latents = scheduler.addNoise(latents, noise, timesteps[0]!);
    } else if (options.latents !== undefined) {
      if (options.latents.shape.join() !== latentShape.join()) {
        throw new UserError(
          'bad-latents',
          `starting latents have shape [${options.latents.shape.join(', ')}], this generation needs [${latentShape.join(', ')}]`,
        );
      }
      latents = map(options.latents.toFloat32(), (v) => v * scheduler.initNoiseSigma);
    } else {
      latents = map(initialNoise(latentShape), (v) => v * scheduler.initNoiseSigma);
    }

    const delta = options.noiseSeedDelta ?? 0;
    if (delta !== 0) {
      if (seeds === undefined || (!Array.isArray(generator) && batch > 1))
        throw new UserError(
          'bad-request',
          'a noise seed delta needs one seed per image: pass the seeds as a list',
        );
      generator = seeds.map((s) => seededGenerator(s + delta, options.rng));
    }

    const timestepCond =
      this.unet.config.timeCondProjDim !== null
        ? guidanceEmbedding(guidance - 1, this.unet.config.timeCondProjDim, batch)
        : undefined;
    const rescale = options.guidanceRescale ?? 0;

    for (let i = 0; i < timesteps.length; i++) {
      signal?.throwIfAborted();
      const t = timesteps[i]!;
      const { embeddings, pooled } = conditioning.at(i);
      let input = scheduler.scaleModelInput(gatherRows(latents, rowImages), t);
      if (inpaintingModel) {
        // The UNet's extra channels: the mask and the masked image's latents.
        const maskLatents = new Tensor('float32', [batch, 1, lh, lw]);
        for (let b = 0; b < batch; b++) maskLatents.data.set(latentMask!, b * lh * lw);
        const extra = concat([maskLatents, maskedImageLatents!], 1);
        input = concat([input, gatherRows(extra, rowImages)], 1);
      }
      const prediction = await this.unet.predict({
        sample: input,
        timestep: Tensor.full([input.shape[0]!], t),
        encoderHiddenStates: embeddings,
        ...(timestepCond !== undefined ? { timestepCond } : {}),
        ...(pooled !== undefined && timeIds !== undefined ? { textEmbeds: pooled, timeIds } : {}),
      });
      const noise = guided
        ? composeGuidance(prediction, plan.images, guidance, rescale)
        : prediction;
      latents = scheduler.step(noise, t, latents, generator);
      if (latentMask !== undefined && !inpaintingModel) {
        // An ordinary model inpaints by keeping the image's latents, noised to the next step,
        // wherever the mask says keep (diffusers' blending for 4-channel UNets).
        const next = timesteps[i + 1];
        const kept =
          next !== undefined ? scheduler.addNoise(imageLatents!, blendNoise!, next) : imageLatents!;
        const plane = lh * lw;
        const stepped = latents;
        latents = new Tensor('float32', stepped.shape);
        for (let j = 0; j < latents.size; j++) {
          const m = latentMask[j % plane]!;
          latents.data[j] = (1 - m) * kept.data[j]! + m * stepped.data[j]!;
        }
      }
      await options.onProgress?.({ step: i + 1, steps: timesteps.length, timestep: t, latents });
    }
    signal?.throwIfAborted();
    if (this.lowMemory) await this.unet.unload();

    if (options.latentsOnly === true) return { images: new Tensor('float32', [0]), latents, seeds };
    if (options.fastDecode === true && this.tiny === undefined)
      throw new UserError(
        'usage',
        'fast decoding needs a tiny autoencoder: pass tinyVae (a TAESD folder) when loading, or call loadTinyVae',
      );
    const images = await this.decode(latents, {
      fast: options.fastDecode === true,
      ...(options.tiledDecode !== undefined ? { tiled: options.tiledDecode } : {}),
    });
    if (this.lowMemory) await Promise.all([this.vae.unload(), this.tiny?.unload()]);
    if (pixelMask !== undefined && imageInput !== undefined && options.keepUnmasked !== false) {
      // The kept pixels come back exactly as they were (NHWC, [0, 1]).
      const original = toModelPixels(imageInput);
      const plane = width * height;
      const perImage = original.shape[0]!;
      for (let n = 0; n < batch; n++) {
        const src = n % perImage;
        for (let i = 0; i < plane; i++) {
          if (pixelMask[i]! >= 0.5) continue;
          for (let c = 0; c < 3; c++)
            images.data[(n * plane + i) * 3 + c] =
              original.data[(src * 3 + c) * plane + i]! / 2 + 0.5;
        }
      }
    }
    return { images, latents, seeds };
  }

  /**
   * Latents → NHWC images in [0, 1], as diffusers' VAE decode and postprocessing. `fast` decodes
   * with the tiny autoencoder when the pipeline has one (previews), else with the VAE.
   */
  async decode(latents: F32, options: { fast?: boolean; tiled?: boolean } = {}): Promise<F32> {
    const vae = options.fast === true && this.tiny !== undefined ? this.tiny : this.vae;
    return fromModelPixels(await vae.decodeScaled(latents, options.tiled ?? 'auto'));
  }

  /** VAE-encoded, sampled and scaled latents of the starting image, repeated to the batch. */
  private async imageLatents(
    image: Tensor,
    batch: number,
    width: number,
    height: number,
    randn: (shape: readonly number[]) => F32,
  ): Promise<F32> {
    const pixels = toModelPixels(image);
    if (pixels.shape[2] !== height || pixels.shape[3] !== width) {
      throw new UserError(
        'bad-image',
        `the starting image is ${pixels.shape[3]}×${pixels.shape[2]}, the generation is ${width}×${height}; resize it first`,
      );
    }
    if (batch % pixels.shape[0]! !== 0) {
      throw new UserError(
        'bad-image',
        `${pixels.shape[0]} starting images do not divide a batch of ${batch}`,
      );
    }
    const { mean, std } = await this.vae.encode(pixels);
    const noise = randn(mean.shape);
    const scaling = this.vae.scalingFactor;
    const shift = this.vae.shiftFactor;
    const out = new Tensor('float32', mean.shape);
    for (let i = 0; i < out.size; i++) {
      out.data[i] = scaling * (mean.data[i]! + std.data[i]! * noise.data[i]! - shift);
    }
    const repeats = batch / pixels.shape[0]!;
    return repeats === 1 ? out : concat(new Array<F32>(repeats).fill(out));
  }

  async release(): Promise<void> {
    await Promise.all([
      this.textEncoder.release(),
      this.textEncoder2?.release(),
      this.unet.release(),
      this.vae.release(),
      this.tiny?.release(),
    ]);
  }
}

/** Rows of `t` (along its first axis) in the order `rows` names them; −1 gives a row of zeros. */
function gatherRows(t: F32, rows: readonly number[]): F32 {
  const per = t.size / t.shape[0]!;
  const out = new Tensor('float32', [rows.length, ...t.shape.slice(1)]);
  rows.forEach((row, i) => {
    if (row >= 0) out.data.set(t.data.subarray(row * per, (row + 1) * per), i * per);
  });
  return out;
}

/**
 * Classifier-free guidance over prompts composed with AND (A1111's combine_denoised): each
 * image's unconditional prediction plus, for every part of its prompt, weight × scale × (part −
 * unconditional); rows as `conditioning` lays them out. Guidance rescale measures against the
 * prompt's own prediction: the part itself for one part of weight 1, else the parts at scale 1.
 */
function composeGuidance(
  prediction: F32,
  images: readonly ImageConditions[],
  guidance: number,
  rescale: number,
): F32 {
  const batch = images.length;
  const shape = [batch, ...prediction.shape.slice(1)];
  const per = prediction.size / prediction.shape[0]!;
  const p = prediction.data;
  const guided = new Tensor('float32', shape);
  const reference = new Tensor('float32', shape);
  let row = batch;
  images.forEach(({ parts }, b) => {
    const single = parts.length === 1 && parts[0]!.weight === 1;
    for (let k = b * per; k < (b + 1) * per; k++) {
      const uncond = p[k]!;
      let sum = uncond;
      let atOne = uncond;
      parts.forEach((part, j) => {
        const difference = p[(row + j) * per + k - b * per]! - uncond;
        sum += difference * (part.weight * guidance);
        atOne += difference * part.weight;
      });
      guided.data[k] = sum;
      reference.data[k] = single ? p[row * per + k - b * per]! : atOne;
    }
    row += parts.length;
  });
  return rescale > 0 ? rescaleGuidance(guided, reference, rescale) : guided;
}

function rescaleGuidance(cfg: F32, text: F32, phi: number): F32 {
  const stdText = stdPerItem(text);
  const stdCfg = stdPerItem(cfg);
  const per = cfg.size / cfg.shape[0]!;
  return map(cfg, (v, i) => {
    const b = Math.floor(i / per);
    return phi * v * (stdText[b]! / stdCfg[b]!) + (1 - phi) * v;
  });
}

function imageWidth(image: Tensor): number {
  return image.dtype === 'uint8' ? image.shape[2]! : image.shape[3]!;
}

function imageHeight(image: Tensor): number {
  return image.dtype === 'uint8' ? image.shape[1]! : image.shape[2]!;
}

/** A mask as one plane of 0 (keep) and 1 (repaint), thresholded at 0.5 as diffusers does. */
function binaryMask(mask: Tensor, width: number, height: number): Float32Array {
  const uint8 = mask.dtype === 'uint8';
  const [h, w] = uint8 ? [mask.shape[1]!, mask.shape[2]!] : [mask.shape[2]!, mask.shape[3]!];
  if (h !== height || w !== width)
    throw new UserError('bad-mask', `the mask is ${w}×${h}, the image is ${width}×${height}`);
  const channels = uint8 ? mask.shape[3]! : 1;
  const out = new Float32Array(width * height);
  for (let i = 0; i < out.length; i++) {
    const v = uint8 ? Number(mask.data[i * channels]) / 255 : Number(mask.data[i]);
    out[i] = v >= 0.5 ? 1 : 0;
  }
  return out;
}

/** NHWC uint8 or NCHW float in [0, 1] → NCHW float in [−1, 1]. */
function toModelPixels(image: Tensor): F32 {
  if (image.dtype === 'uint8') {
    const [b, h, w, c] = image.shape as [number, number, number, number];
    if (c !== 3)
      throw new UserError('bad-image', `the starting image has ${c} channels; RGB is needed`);
    const out = new Tensor('float32', [b, 3, h, w]);
    const src = image.data as Uint8Array;
    for (let n = 0; n < b; n++) {
      for (let i = 0; i < h * w; i++) {
        for (let ch = 0; ch < 3; ch++)
          out.data[(n * 3 + ch) * h * w + i] =
            Math.fround(src[(n * h * w + i) * 3 + ch]! / 255) * 2 - 1;
      }
    }
    return out;
  }
  if (image.rank !== 4 || image.shape[1] !== 3) {
    throw new UserError(
      'bad-image',
      `the starting image must be NCHW RGB; got shape [${image.shape.join(', ')}]`,
    );
  }
  return map(image.toFloat32(), (v) => 2 * v - 1);
}

function checkSize(width: number, height: number, factor: number): void {
  for (const [name, v] of [
    ['width', width],
    ['height', height],
  ] as const) {
    if (!Number.isInteger(v) || v <= 0 || v % 8 !== 0 || v % factor !== 0) {
      throw new UserError(
        'bad-size',
        `${name} ${v} must be a positive multiple of ${Math.max(8, factor)}`,
      );
    }
    if (v > 8192) throw new UserError('bad-size', `${name} ${v} is larger than 8192 pixels`);
  }
}
