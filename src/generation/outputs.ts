import { appendFile, mkdir, readdir } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { UserError } from '../errors.js';
import { formatInfotext, parseInfotext, pythonFloat } from '../io/infotext.js';
import { writePng } from '../io/image.js';
import { readPngText } from '../io/png.js';
import { GanPipeline, StableDiffusionPipeline, type TextToImage } from '../pipelines/index.js';
import type { GenerateResult } from '../pipelines/stable-diffusion.js';
import { randomSeed, type RngSource } from '../tensor/rng.js';
import type { Tensor } from '../tensor/tensor.js';
import { a1111ScheduleType, displayName } from '../schedulers/index.js';
import type { PromptSyntax } from '../tokenizers/prompt.js';
import { loraSetKey, promptLoras } from './networks.js';

/**
 * What gesso writes for each image (the CLI and the server alike): an A1111-style file name, the `parameters` text
 * chunk A1111's PNG Info reads, and a manifest line with every setting; and the way back from a
 * PNG's metadata to the settings that made it.
 */

/** Everything that determines one image, as written to the manifest. */
export interface ImageSettings {
  readonly prompt: string;
  readonly negative_prompt: string;
  readonly seed: number;
  /** A1111's variation seed and how far the starting noise moves toward its noise (0 to 1). */
  readonly subseed?: number;
  readonly subseed_strength?: number;
  /** A1111's "resize seed from": the size the seed's noise is drawn for, centred in this one. */
  readonly seed_resize_from?: { readonly width: number; readonly height: number };
  /** What the seeds feed: PyTorch's CPU generator (absent) or its CUDA one (A1111's NV). */
  readonly rng?: RngSource;
  /** A1111's eta noise seed delta: later sampler noise from seed + this. */
  readonly ensd?: number;
  /**
   * One generator seeded with `seed` draws the starting noise of the whole batch, as ComfyUI and
   * diffusers draw it (every image of the batch then carries the batch's seed); absent: one
   * generator per image, as A1111.
   */
  readonly batch_noise?: boolean;
  readonly steps: number;
  readonly guidance: number;
  /** The scheduler name asked for, or the model's own scheduler class. */
  readonly scheduler: string;
  readonly width: number;
  readonly height: number;
  /** The model as the user named it (bundled name, folder), and the folder it resolved to. */
  readonly model: string;
  readonly model_path: string;
  /** A GAN draws in one step and has no sampler, steps or guidance. */
  readonly route: 'diffusion' | 'gan';
  readonly clip_skip?: number;
  /** LoRAs merged into the model, as `path:scale`. */
  readonly loras?: readonly string[];
  /** The LoRAs the prompt's `<lora:…>` tags named, as A1111's `Lora hashes` (`name: hash`). */
  readonly lora_hashes?: string;
  readonly init_image?: string;
  readonly strength?: number;
  /** Inpainting: the mask image. */
  readonly mask?: string;
  /** The tiny autoencoder the image was decoded with (--fast-decode), as the user named it. */
  readonly vae?: string;
}

/**
 * Counts a run's seeds as A1111 does: each further image adds 1 to the seed, or, with a variation
 * strength, every image keeps the seed and the variation seed counts instead. Absent seeds are
 * drawn at random. `next(own)` gives an image's seeds; `own` is a seed its prompt fixed, counted
 * from by `index` without moving the run's count.
 */
export function seedCounter(
  seed: number | undefined,
  subseed: number | undefined,
  strength: number,
): (own?: {
  seed: number;
  index: number;
}) => Pick<ImageSettings, 'seed' | 'subseed' | 'subseed_strength'> {
  const step = strength !== 0 ? 0 : 1;
  let nextSeed = seed ?? randomSeed();
  let nextSubseed = strength !== 0 ? (subseed ?? randomSeed()) : undefined;
  return (own) => {
    const imageSeed = own !== undefined ? own.seed + own.index * step : (nextSeed += step) - step;
    return {
      seed: imageSeed,
      ...(nextSubseed !== undefined ? { subseed: nextSubseed++, subseed_strength: strength } : {}),
    };
  };
}

/** The A1111 infotext of an image's settings: prompt, negative prompt, then the parameter line. */
export function infotextFor(s: ImageSettings, modelName: string): string {
  const scheduleType = a1111ScheduleType(s.scheduler);
  const params: [string, string][] =
    s.route === 'gan'
      ? [['Sampler', 'GAN']]
      : [
          ['Steps', String(s.steps)],
          ['Sampler', displayName(s.scheduler)],
          ...(scheduleType !== undefined
            ? [['Schedule type', scheduleType] as [string, string]]
            : []),
          ['CFG scale', pythonFloat(s.guidance)],
        ];
  params.push(['Seed', String(s.seed)], ['Size', `${s.width}x${s.height}`], ['Model', modelName]);
  if (s.subseed !== undefined && (s.subseed_strength ?? 0) !== 0)
    params.push(
      ['Variation seed', String(s.subseed)],
      ['Variation seed strength', pythonFloat(s.subseed_strength!)],
    );
  if (s.seed_resize_from !== undefined)
    params.push(['Seed resize from', `${s.seed_resize_from.width}x${s.seed_resize_from.height}`]);
  if (s.strength !== undefined) params.push(['Denoising strength', String(s.strength)]);
  if (s.clip_skip !== undefined && s.clip_skip > 0)
    params.push(['Clip skip', String(s.clip_skip + 1)]);
  if ((s.ensd ?? 0) !== 0) params.push(['ENSD', String(s.ensd)]);
  if (s.vae !== undefined) params.push(['VAE', s.vae]);
  // A1111 writes RNG unless it is its default GPU source; gesso's default is the CPU one.
  params.push(['RNG', s.rng === 'nv' ? 'NV' : 'CPU']);
  if (s.lora_hashes !== undefined) params.push(['Lora hashes', s.lora_hashes]);
  params.push(['Version', 'gesso']);
  return formatInfotext({ prompt: s.prompt, negativePrompt: s.negative_prompt, params });
}

/** Settings read back from a PNG's `parameters` chunk (the keys it holds). */
export interface ParsedSettings {
  readonly prompt: string;
  readonly negativePrompt: string;
  readonly steps?: number;
  readonly guidance?: number;
  readonly sampler?: string;
  /** A1111 1.9 on: the sigma spacing, written apart from the sampler (`Karras`, `Automatic`). */
  readonly scheduleType?: string;
  /** A1111's random number source as written (`CPU`, `NV`; absent means its default, `GPU`). */
  readonly rng?: string;
  readonly ensd?: number;
  readonly seed?: number;
  readonly subseed?: number;
  readonly subseedStrength?: number;
  readonly seedResizeFrom?: { readonly width: number; readonly height: number };
  readonly width?: number;
  readonly height?: number;
  readonly model?: string;
  readonly clipSkip?: number;
  readonly strength?: number;
  readonly vae?: string;
  /** Every key and value as written, in order. */
  readonly params: readonly (readonly [string, string])[];
}

export function settingsFromInfotext(text: string, source: string): ParsedSettings {
  const info = parseInfotext(text);
  const get = (key: string) => info.params.find(([k]) => k === key)?.[1];
  const number = (key: string): number | undefined => {
    const v = get(key);
    if (v === undefined) return undefined;
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n))
      throw new UserError('bad-metadata', `${source}: '${key}: ${v}' is not a number`);
    return n;
  };
  const sizeOf = (key: string): { width: number; height: number } | undefined => {
    const size = get(key);
    if (size === undefined) return undefined;
    const m = /^(\d+)x(\d+)$/.exec(size.trim());
    if (m === null) throw new UserError('bad-metadata', `${source}: '${key}: ${size}' is not WxH`);
    return { width: Number(m[1]), height: Number(m[2]) };
  };
  const size = sizeOf('Size');
  const width = size?.width;
  const height = size?.height;
  const subseed = number('Variation seed');
  const subseedStrength = number('Variation seed strength');
  const seedResizeFrom = sizeOf('Seed resize from');
  const clip = number('Clip skip');
  const sampler = get('Sampler');
  const scheduleType = get('Schedule type');
  const rng = get('RNG');
  const ensd = number('ENSD');
  const steps = number('Steps');
  const guidance = number('CFG scale');
  const seed = number('Seed');
  const model = get('Model');
  const strength = number('Denoising strength');
  const vae = get('VAE');
  return {
    prompt: info.prompt,
    negativePrompt: info.negativePrompt,
    params: info.params,
    ...(steps !== undefined ? { steps } : {}),
    ...(guidance !== undefined ? { guidance } : {}),
    ...(sampler !== undefined ? { sampler } : {}),
    ...(scheduleType !== undefined ? { scheduleType } : {}),
    ...(rng !== undefined ? { rng } : {}),
    ...(ensd !== undefined ? { ensd } : {}),
    ...(seed !== undefined ? { seed } : {}),
    ...(subseed !== undefined ? { subseed } : {}),
    ...(subseedStrength !== undefined ? { subseedStrength } : {}),
    ...(seedResizeFrom !== undefined ? { seedResizeFrom } : {}),
    ...(width !== undefined ? { width, height: height! } : {}),
    ...(model !== undefined ? { model } : {}),
    ...(clip !== undefined ? { clipSkip: clip - 1 } : {}),
    ...(strength !== undefined ? { strength } : {}),
    ...(vae !== undefined ? { vae } : {}),
  };
}

/** The `parameters` text of a PNG file, or a clear error when it has none. */
export function readParameters(bytes: Uint8Array, path: string): string {
  const text = readPngText(bytes, path);
  const parameters = text.parameters;
  if (parameters === undefined) {
    const keys = Object.keys(text);
    if (text.prompt !== undefined && keys.every((k) => k === 'prompt' || k === 'workflow'))
      throw new UserError(
        'no-metadata',
        `${path} is a ComfyUI image: its 'prompt' text chunk holds the workflow, not A1111's parameters; queue that workflow on gesso serve's POST /prompt to draw it again`,
      );
    throw new UserError(
      'no-metadata',
      `${path} has no 'parameters' text chunk (${keys.length === 0 ? 'no text chunks at all' : `it has: ${keys.join(', ')}`}); it was not written by gesso or AUTOMATIC1111, or the metadata was stripped`,
    );
  }
  return parameters;
}

/** Whether a file name is one an OutputFolder gives its images (`00012-1234567890.png`). */
export function isOutputImageName(name: string): boolean {
  return /^\d{5,}-\d+\.png$/.test(name);
}

/**
 * An output folder: files named as A1111 names them (`00012-1234567890.png`, a five-digit counter
 * that continues from the highest already there, then the seed) and a `manifest.jsonl` beside them.
 */
export class OutputFolder {
  private constructor(
    readonly dir: string,
    private counter: number,
  ) {}

  static async open(dir: string): Promise<OutputFolder> {
    try {
      await mkdir(dir, { recursive: true });
    } catch (error) {
      throw new UserError(
        'bad-output',
        `cannot create output folder ${dir}: ${(error as Error).message}`,
      );
    }
    let highest = -1;
    for (const name of await readdir(dir)) {
      const m = /^(\d{5,})-/.exec(name);
      if (m !== null) highest = Math.max(highest, Number(m[1]));
    }
    return new OutputFolder(dir, highest + 1);
  }

  /** The path for the next image of this seed. */
  nextPath(seed: number): string {
    const name = `${String(this.counter).padStart(5, '0')}-${seed}.png`;
    this.counter += 1;
    return join(this.dir, name);
  }

  /** Appends one image's record; called only after its PNG is in place. */
  async record(entry: Readonly<Record<string, unknown>>): Promise<void> {
    await appendFile(join(this.dir, 'manifest.jsonl'), `${JSON.stringify(entry)}\n`);
  }
}

/** What a loaded model draws by default, for filling in settings. */
export interface ModelTraits {
  readonly route: 'diffusion' | 'gan';
  readonly nativeSize: number;
  /** The class of the folder's scheduler, or 'none' for a GAN. */
  readonly folderScheduler: string;
  readonly defaults: { readonly steps: number; readonly guidance: number };
}

export function modelTraits(pipe: TextToImage): ModelTraits {
  if (pipe instanceof StableDiffusionPipeline) {
    return {
      route: 'diffusion',
      nativeSize: pipe.defaultSize,
      folderScheduler: String(pipe.schedulerConfig._class_name ?? ''),
      defaults: pipe.defaults,
    };
  }
  return {
    route: 'gan',
    nativeSize: (pipe as GanPipeline).defaultSize,
    folderScheduler: 'none',
    defaults: pipe.defaults,
  };
}

export interface RenderOptions {
  readonly image?: Tensor<'uint8'>;
  readonly mask?: Tensor<'uint8'>;
  readonly latents?: Tensor<'float32'>;
  readonly timestepSpacing?: string;
  /** How prompts are read (default 'a1111', as the command line and the server read them). */
  readonly promptSyntax?: PromptSyntax;
  readonly signal?: AbortSignal;
  readonly onProgress?: (step: number, steps: number, latents: Tensor<'float32'>) => void;
}

/**
 * Draws one batch of images that share their sampling settings (see `sameBatch`). The prompts'
 * `<lora:…>` tags are taken out here: `pipe` must have been loaded with the LoRAs they name
 * (`resolvePromptLoras`).
 */
export async function renderBatch(
  pipe: TextToImage,
  traits: ModelTraits,
  batch: readonly ImageSettings[],
  options: RenderOptions = {},
): Promise<GenerateResult> {
  const first = batch[0]!;
  return pipe.generate({
    prompt: batch.map((j) => promptLoras(j.prompt).prompt),
    // No negative prompt at all is not the same as "" for SDXL (zeros): pass none then.
    ...(batch.some((j) => j.negative_prompt !== '')
      ? { negativePrompt: batch.map((j) => j.negative_prompt) }
      : {}),
    seed: first.batch_noise === true ? first.seed : batch.map((j) => j.seed),
    ...((first.subseed_strength ?? 0) !== 0
      ? {
          variation: {
            seeds: batch.map((j) => j.subseed ?? 0),
            strength: first.subseed_strength!,
          },
        }
      : {}),
    ...(first.seed_resize_from !== undefined ? { seedResizeFrom: first.seed_resize_from } : {}),
    ...(first.rng !== undefined ? { rng: first.rng } : {}),
    ...((first.ensd ?? 0) !== 0 ? { noiseSeedDelta: first.ensd! } : {}),
    promptSyntax: options.promptSyntax ?? 'a1111',
    steps: first.steps,
    guidance: first.guidance,
    width: first.width,
    height: first.height,
    ...(first.scheduler !== traits.folderScheduler ? { scheduler: first.scheduler } : {}),
    ...(options.timestepSpacing !== undefined
      ? { schedulerConfig: { timestep_spacing: options.timestepSpacing } }
      : {}),
    ...(options.image !== undefined
      ? { image: options.image, strength: first.strength ?? 0.8 }
      : {}),
    ...(options.mask !== undefined ? { mask: options.mask } : {}),
    ...(options.latents !== undefined ? { latents: options.latents } : {}),
    ...(first.clip_skip !== undefined ? { clipSkip: first.clip_skip } : {}),
    ...(first.vae !== undefined ? { fastDecode: true } : {}),
    ...(options.signal !== undefined ? { signal: options.signal } : {}),
    onProgress: ({ step, steps, latents }) => options.onProgress?.(step, steps, latents),
  });
}

/**
 * Whether two images can be drawn in one batch (the same steps, guidance, sampler, size and
 * LoRAs).
 */
export function sameBatch(a: ImageSettings, b: ImageSettings): boolean {
  return (
    loraSetKey(a.prompt) === loraSetKey(b.prompt) &&
    a.steps === b.steps &&
    a.guidance === b.guidance &&
    a.scheduler === b.scheduler &&
    a.width === b.width &&
    a.height === b.height &&
    (a.subseed_strength ?? 0) === (b.subseed_strength ?? 0) &&
    (a.rng ?? 'cpu') === (b.rng ?? 'cpu') &&
    (a.ensd ?? 0) === (b.ensd ?? 0) &&
    (a.batch_noise ?? false) === (b.batch_noise ?? false) &&
    (a.batch_noise !== true || a.seed === b.seed) &&
    a.seed_resize_from?.width === b.seed_resize_from?.width &&
    a.seed_resize_from?.height === b.seed_resize_from?.height
  );
}

/**
 * Writes a batch's images as numbered PNGs with their metadata and manifest lines. `text`: the
 * PNG text chunks to write instead of A1111's `parameters` (ComfyUI's `prompt` and `workflow`).
 */
export async function saveBatch(
  folder: OutputFolder,
  batch: readonly ImageSettings[],
  images: Tensor<'uint8'>,
  extra: Readonly<Record<string, unknown>> = {},
  text?: Readonly<Record<string, string>>,
): Promise<string[]> {
  const paths: string[] = [];
  for (let k = 0; k < batch.length; k++) {
    const settings = batch[k]!;
    const path = folder.nextPath(settings.seed);
    await writePng(path, images, k, text ?? { parameters: infotextFor(settings, settings.model) });
    await folder.record({
      file: basename(path),
      ...settings,
      batch_size: batch.length,
      created: new Date().toISOString(),
      ...extra,
    });
    paths.push(path);
  }
  return paths;
}
