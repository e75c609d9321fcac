import { existsSync } from 'node:fs';
import { totalmem } from 'node:os';
import { basename, extname, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { isUserError, UserError } from '../errors.js';
import { readUserFile } from '../io/atomic.js';
import { readImage, toUint8, writePng } from '../io/image.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { loadPipeline, type TextToImage } from '../pipelines/index.js';
import { StableDiffusionPipeline } from '../pipelines/stable-diffusion.js';
import type { ExecutionProvider } from '../runtime/session.js';
import {
  displayName,
  isSchedulerName,
  SCHEDULER_NAMES,
  unknownScheduler,
  withScheduleType,
} from '../schedulers/index.js';
import type { RngSource } from '../tensor/rng.js';
import type { Tensor } from '../tensor/tensor.js';
import { parseNumber } from './args.js';
import { formatBytes, progressBar, ProgressLine } from './format.js';
import { DEFAULT_MODEL, resolveModel } from '../generation/models.js';
import {
  LoraFolder,
  loraSetKey,
  resolvePromptLoras,
  type ResolvedLoras,
} from '../generation/networks.js';
import {
  infotextFor,
  modelTraits,
  OutputFolder,
  renderBatch,
  saveBatch,
  sameBatch,
  seedCounter,
  readParameters,
  settingsFromInfotext,
  type ImageSettings,
  type ParsedSettings,
} from '../generation/outputs.js';

export const GENERATE_USAGE = `usage: gesso generate [PROMPT] [options]

  --model DIR|NAME        a model folder (diffusers layout) or a bundled model name
                          (default: ${DEFAULT_MODEL})
  --prompt TEXT           what to draw (or give it as the argument)
  --prompts FILE          one prompt per line, or JSON lines with per-prompt options:
                          {"prompt", "negative_prompt", "seed", "steps", "guidance",
                           "scheduler", "width", "height", "count"}
  --negative-prompt TEXT  what to steer away from
  -n, --count N           images per prompt (default 1)
  --batch-size N          images computed together (default 1)
  --seed N                seed of the first image; each further image adds 1
                          (default, or -1 as in A1111: random, reported)
  --steps N               denoising steps (default: the model's, else 50)
  --guidance G            classifier-free guidance scale (default: the model's, else 7.5)
  --scheduler NAME        ${SCHEDULER_NAMES.join(', ')}
                          (A1111 names such as "DPM++ 2M Karras" work too)
  --timestep-spacing S    override the scheduler's spacing: leading, trailing or linspace
  --size WxH              image size in pixels, multiples of 8 (default: the model's)
  --width W, --height H   the same, one side at a time
  --init-image FILE       start from this image (image-to-image)
  --strength S            how much of the schedule to run from the image (default 0.8;
                          1 with --mask)
  --mask FILE             inpainting: repaint the white pixels of this image, keep the black
  --latents FILE          starting noise: a .safetensors file with a tensor named 'latents'
  --subseed N             variation seed (A1111; -1 random); with --subseed-strength, every
                          image keeps --seed and each further one adds 1 to the variation seed
  --subseed-strength S    how far the starting noise moves toward the variation seed's,
                          0 to 1 (default 0: none)
  --seed-resize-from WxH  draw each seed's noise as for this size, centred in the image
  --rng cpu|nv            what seeds feed: PyTorch's CPU generator (default; diffusers,
                          ComfyUI, A1111's CPU) or its CUDA one (A1111's NV, and its default
                          GPU source on NVIDIA cards; gpu is taken as nv)
  --ensd N                A1111's eta noise seed delta: ancestral and SDE samplers' later noise
                          from each seed + N (default 0)
  --clip-skip N           use the text encoder's output N layers before the last
  --from IMAGE.png        reproduce an image from its 'parameters' metadata (flags given
                          alongside override what it says)
  --lora FILE[:SCALE]     merge a LoRA (diffusers/PEFT or kohya .safetensors) into the model,
                          scaled by SCALE (default 1); repeatable
  --lora-dir DIR          where prompts' <lora:NAME:WEIGHT> tags find NAME.safetensors (as
                          A1111's --lora-dir; subfolders too)
  --fast-decode           decode with the tiny autoencoder (TAESD): much faster, a little softer
  --tiny-vae MODEL        its folder or Hub id (default madebyollin/taesd, taesdxl for SDXL)
  --low-memory            keep only the running model resident (text encoder, UNet, VAE in turn);
                          on by itself when the model's weights exceed 40% of memory
  --keep-loaded           keep every model resident even then
  --quantize int8         run the UNet's convolutions and matrix products in int8 (faster on
                          CPUs with VNNI/AMX; images change slightly)
  --variant fp16          load the fp16 weight files
  --threads N             compute threads (default: one per core)
  --provider NAME         cpu (default), cuda, coreml, dml
  --out PATH              a folder for numbered PNGs and manifest.jsonl (default: outputs),
                          or one file: FILE.png, or FILE.safetensors for the raw tensors
                          'image' (NHWC float in [0, 1]) and 'latents'`;

/** One prompt and what may vary with it. */
interface PromptEntry {
  readonly prompt: string;
  readonly negativePrompt?: string;
  readonly seed?: number;
  readonly steps?: number;
  readonly guidance?: number;
  readonly scheduler?: string;
  readonly width?: number;
  readonly height?: number;
  readonly count?: number;
}

const ENTRY_KEYS = [
  'prompt',
  'negative_prompt',
  'seed',
  'steps',
  'guidance',
  'cfg_scale',
  'scheduler',
  'sampler',
  'width',
  'height',
  'count',
  'n',
];

function entryFromJson(value: unknown, where: string): PromptEntry {
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new UserError('bad-prompts', `${where}: a JSON line must be an object`);
  const o = value as Record<string, unknown>;
  for (const key of Object.keys(o)) {
    if (!ENTRY_KEYS.includes(key))
      throw new UserError(
        'bad-prompts',
        `${where}: unknown key '${key}' (known: ${ENTRY_KEYS.join(', ')})`,
      );
  }
  const text = (key: string): string | undefined => {
    const v = o[key];
    if (v === undefined) return undefined;
    if (typeof v !== 'string')
      throw new UserError('bad-prompts', `${where}: '${key}' must be a string`);
    return v;
  };
  const num = (key: string, integer: boolean, min: number): number | undefined => {
    const v = o[key];
    if (v === undefined) return undefined;
    if (
      typeof v !== 'number' ||
      !Number.isFinite(v) ||
      (integer && !Number.isInteger(v)) ||
      v < min
    )
      throw new UserError(
        'bad-prompts',
        `${where}: '${key}' must be ${integer ? 'an integer' : 'a number'} of at least ${min}`,
      );
    return v;
  };
  const prompt = text('prompt');
  if (prompt === undefined || prompt.trim() === '')
    throw new UserError('bad-prompts', `${where}: 'prompt' is missing`);
  const fields = {
    prompt,
    negativePrompt: text('negative_prompt'),
    // -1 is A1111's random seed: the same as leaving the field out.
    seed: seedOrRandom(num('seed', true, -1)),
    steps: num('steps', true, 1),
    guidance: num('guidance', false, 0) ?? num('cfg_scale', false, 0),
    scheduler: text('scheduler') ?? text('sampler'),
    width: num('width', true, 8),
    height: num('height', true, 8),
    count: num('count', true, 1) ?? num('n', true, 1),
  };
  return Object.fromEntries(
    Object.entries(fields).filter(([, v]) => v !== undefined),
  ) as unknown as PromptEntry;
}

async function readPromptFile(path: string): Promise<PromptEntry[]> {
  const text = (await readUserFile(path, 'prompts file ')).toString('utf8');
  const entries: PromptEntry[] = [];
  text.split(/\r?\n/).forEach((line, i) => {
    const where = `${path}:${i + 1}`;
    if (line.trim() === '') return;
    if (line.trimStart().startsWith('{')) {
      let value: unknown;
      try {
        value = JSON.parse(line);
      } catch (error) {
        throw new UserError(
          'bad-prompts',
          `${where}: not valid JSON (${(error as Error).message})`,
        );
      }
      entries.push(entryFromJson(value, where));
    } else entries.push({ prompt: line.trim() });
  });
  if (entries.length === 0) throw new UserError('bad-prompts', `${path} holds no prompts`);
  return entries;
}

function parseSize(
  value: string | undefined,
  flag = 'size',
): { width: number; height: number } | undefined {
  if (value === undefined) return undefined;
  const m = /^\s*(\d+)\s*[x×]\s*(\d+)\s*$/i.exec(value);
  if (m === null)
    throw new UserError(
      'usage',
      `--${flag} must be WIDTHxHEIGHT, such as 512x768 (got '${value}')`,
    );
  return { width: Number(m[1]), height: Number(m[2]) };
}

/**
 * Refuses sizes whose largest attention map would not fit in this machine's memory (the UNet's
 * first self-attention holds (h·w/64)² scores per image), before any work starts.
 */
function checkFitsInMemory(pipe: TextToImage, width: number, height: number, batch: number): void {
  if (!(pipe instanceof StableDiffusionPipeline)) return;
  const scale = pipe.vae.scaleFactor;
  const tokens = (width / scale) * (height / scale);
  const bytes = tokens * tokens * 4 * batch * 2;
  if (bytes > totalmem()) {
    throw new UserError(
      'bad-size',
      `${width}x${height} needs about ${formatBytes(bytes)} for attention alone and this machine has ${formatBytes(totalmem())}; choose a smaller --size or --batch-size`,
    );
  }
}

/** Whether an image's metadata is gesso's own (`Version: gesso`), not A1111's. */
function madeByGesso(from: ParsedSettings): boolean {
  return from.params.some(([key, value]) => key === 'Version' && value === 'gesso');
}

/**
 * The metadata keys --from draws with, or that do not change the picture (hashes, names).
 * Others (A1111's hires fix, face restoration, token merging, textual-inversion embeddings …)
 * are named in a note.
 */
const APPLIED_KEYS: ReadonlySet<string> = new Set([
  'Steps',
  'Sampler',
  'Schedule type',
  'CFG scale',
  'Seed',
  'Size',
  'Model',
  'Model hash',
  'VAE',
  'VAE hash',
  'Variation seed',
  'Variation seed strength',
  'Seed resize from',
  'Denoising strength',
  'Clip skip',
  'ENSD',
  'RNG',
  'Lora hashes',
  'Version',
  'User',
]);

/**
 * The scheduler an image's metadata names. gesso writes the sampler alone, and one that names the
 * folder's own scheduler means exactly it; A1111 1.9 on writes the sigma spacing apart
 * (`Sampler: DPM++ 2M, Schedule type: Karras`), read as the A1111 routes read it.
 */
function samplerOf(
  from: ParsedSettings | undefined,
  folderScheduler: string,
  source: string | undefined,
): string | undefined {
  if (from?.sampler === undefined || from.sampler === 'GAN') return undefined;
  if (from.scheduleType === undefined)
    return from.sampler === displayName(folderScheduler) ? folderScheduler : from.sampler;
  try {
    return withScheduleType(from.sampler, from.scheduleType);
  } catch (error) {
    if (!isUserError(error)) throw error;
    throw new UserError(
      'usage',
      `${source} was drawn with 'Sampler: ${from.sampler}, Schedule type: ${from.scheduleType}': ${error.message}; or choose one with --scheduler`,
    );
  }
}

/**
 * The generator seeds feed: as asked, else as the --from image says (A1111 writes `RNG: CPU` or
 * `NV`, nothing for its default GPU source, which on NVIDIA cards is NV's; gesso writes it
 * always), else the CPU one.
 */
function rngSource(
  flag: string | undefined,
  from: ParsedSettings | undefined,
  source: string | undefined,
): RngSource {
  const named = flag ?? from?.rng;
  if (named !== undefined) {
    const value = named.toLowerCase();
    if (value === 'cpu') return 'cpu';
    if (value === 'nv' || value === 'gpu') return 'nv';
    throw new UserError(
      'usage',
      flag !== undefined
        ? `--rng must be cpu or nv (got '${flag}')`
        : `${source} says 'RNG: ${named}', which gesso does not know; give --rng cpu or nv`,
    );
  }
  if (from === undefined || madeByGesso(from)) return 'cpu';
  process.stderr.write(
    `note: ${source} names no RNG, so A1111 drew its noise on the GPU; gesso draws it as NVIDIA cards do (--rng nv; --rng cpu for other cards)\n`,
  );
  return 'nv';
}

function seedOrRandom(seed: number | undefined): number | undefined {
  return seed === -1 ? undefined : seed;
}

/**
 * The arguments with `--seed -1` and `--subseed -1` written as `--seed=-1`: A1111 users type the
 * former, and Node's parser would take the -1 for an option.
 */
function joinNegativeSeeds(args: readonly string[]): string[] {
  const joined: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    const next = args[i + 1];
    if ((arg === '--seed' || arg === '--subseed') && next !== undefined && /^-\d+$/.test(next)) {
      joined.push(`${arg}=${next}`);
      i++;
    } else joined.push(arg);
  }
  return joined;
}

export async function generateCommand(args: readonly string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: joinNegativeSeeds(args),
    options: {
      model: { type: 'string' },
      prompt: { type: 'string' },
      prompts: { type: 'string' },
      'negative-prompt': { type: 'string' },
      count: { type: 'string', short: 'n' },
      'batch-size': { type: 'string' },
      steps: { type: 'string' },
      guidance: { type: 'string' },
      scheduler: { type: 'string' },
      'timestep-spacing': { type: 'string' },
      seed: { type: 'string' },
      size: { type: 'string' },
      width: { type: 'string' },
      height: { type: 'string' },
      'init-image': { type: 'string' },
      strength: { type: 'string' },
      mask: { type: 'string' },
      latents: { type: 'string' },
      'clip-skip': { type: 'string' },
      subseed: { type: 'string' },
      'subseed-strength': { type: 'string' },
      'seed-resize-from': { type: 'string' },
      rng: { type: 'string' },
      ensd: { type: 'string' },
      from: { type: 'string' },
      variant: { type: 'string' },
      lora: { type: 'string', multiple: true },
      'lora-dir': { type: 'string' },
      'fast-decode': { type: 'boolean', default: false },
      'low-memory': { type: 'boolean', default: false },
      'keep-loaded': { type: 'boolean', default: false },
      quantize: { type: 'string' },
      'tiny-vae': { type: 'string' },
      threads: { type: 'string' },
      provider: { type: 'string' },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    allowPositionals: true,
  });
  if (values.help) {
    process.stdout.write(`${GENERATE_USAGE}\n`);
    return 0;
  }

  // Settings from an existing image, which flags given alongside override.
  let from: ParsedSettings | undefined;
  if (values.from !== undefined) {
    const bytes = await readUserFile(values.from);
    from = settingsFromInfotext(readParameters(bytes, values.from), values.from);
    if (from.strength !== undefined && values['init-image'] === undefined) {
      throw new UserError(
        'usage',
        `${values.from} is an image-to-image result (Denoising strength ${from.strength}); reproducing it needs the starting image: add --init-image FILE`,
      );
    }
  }

  const given = [values.prompt !== undefined, positionals.length > 0, values.prompts !== undefined];
  if (given.filter(Boolean).length > 1)
    throw new UserError(
      'usage',
      'give prompts one way: as the argument, --prompt, or --prompts FILE',
    );
  const negativeFlag = values['negative-prompt'];
  let entries: PromptEntry[];
  if (values.prompts !== undefined) entries = await readPromptFile(values.prompts);
  else {
    const prompt = values.prompt ?? (positionals.length > 0 ? positionals.join(' ') : from?.prompt);
    // An empty prompt given on purpose draws unconditionally, as in A1111 and diffusers.
    if (prompt === undefined) throw new UserError('usage', `no prompt given\n${GENERATE_USAGE}`);
    entries = [{ prompt }];
  }

  const out = values.out ?? 'outputs';
  const extension = extname(out).toLowerCase();
  const singleFile = extension === '.png' || extension === '.safetensors';
  const spacing = values['timestep-spacing'];
  if (spacing !== undefined && !['leading', 'trailing', 'linspace'].includes(spacing)) {
    throw new UserError(
      'usage',
      `--timestep-spacing must be leading, trailing or linspace (got '${spacing}')`,
    );
  }
  const provider = values.provider as ExecutionProvider | undefined;
  if (provider !== undefined && !['cpu', 'cuda', 'coreml', 'dml', 'webgpu'].includes(provider)) {
    throw new UserError(
      'usage',
      `--provider must be cpu, cuda, coreml, dml or webgpu (got '${provider}')`,
    );
  }
  const count = parseNumber('count', values.count, { integer: true, min: 1, max: 10_000 }) ?? 1;
  const batchSize =
    parseNumber('batch-size', values['batch-size'], { integer: true, min: 1, max: 64 }) ?? 1;
  const stepsFlag =
    parseNumber('steps', values.steps, { integer: true, min: 1, max: 1000 }) ?? from?.steps;
  const guidanceFlag = parseNumber('guidance', values.guidance, { min: 0 }) ?? from?.guidance;
  // -1 asks for a random seed, as in A1111, even over the seed of a --from image.
  const seedOption = (flag: 'seed' | 'subseed', fromImage: number | undefined) => {
    const value = parseNumber(flag, values[flag], { integer: true, min: -1, max: 2 ** 53 - 1 });
    return value === -1 ? undefined : (value ?? fromImage);
  };
  const seedFlag = seedOption('seed', from?.seed);
  const size = parseSize(values.size);
  if (size !== undefined && (values.width !== undefined || values.height !== undefined))
    throw new UserError('usage', 'give the size as --size WxH or as --width/--height, not both');
  const widthFlag =
    size?.width ?? parseNumber('width', values.width, { integer: true, min: 8 }) ?? from?.width;
  const heightFlag =
    size?.height ?? parseNumber('height', values.height, { integer: true, min: 8 }) ?? from?.height;
  const strength = parseNumber('strength', values.strength, { min: 0, max: 1 }) ?? from?.strength;
  const clipSkip =
    parseNumber('clip-skip', values['clip-skip'], { integer: true, min: 0 }) ?? from?.clipSkip;
  const subseedFlag = seedOption('subseed', from?.subseed);
  const subseedStrength =
    parseNumber('subseed-strength', values['subseed-strength'], { min: 0, max: 1 }) ??
    from?.subseedStrength ??
    0;
  const seedResizeFrom =
    parseSize(values['seed-resize-from'], 'seed-resize-from') ?? from?.seedResizeFrom;
  const rng = rngSource(values.rng, from, values.from);
  const ensd =
    parseNumber('ensd', values.ensd, { integer: true, min: 0, max: 2 ** 32 }) ?? from?.ensd ?? 0;
  const threads = parseNumber('threads', values.threads, { integer: true, min: 1 });
  if (values.quantize !== undefined && values.quantize !== 'int8')
    throw new UserError('usage', `--quantize takes int8 (got '${values.quantize}')`);
  if (values['low-memory'] && values['keep-loaded'])
    throw new UserError(
      'usage',
      '--low-memory and --keep-loaded ask for opposite things; give one',
    );
  const quantize = values.quantize === 'int8' ? ('int8' as const) : undefined;

  const modelName = values.model ?? from?.model;
  const progress = new ProgressLine();
  let modelPath: string;
  try {
    modelPath = await resolveModel(modelName, {
      ...(values.variant !== undefined ? { variant: values.variant } : {}),
      onFile: ({ path, bytes, cached }) => {
        if (!cached) process.stderr.write(`downloaded ${path} (${formatBytes(bytes)})\n`);
      },
    });
  } catch (error) {
    if (values.model === undefined && from?.model !== undefined && isUserError(error))
      throw new UserError(
        'model-not-found',
        `${values.from} was made with model '${from.model}', which is not a folder, bundled model or Hub id here (${error.message}); pass --model`,
      );
    throw error;
  }
  // As A1111 names the checkpoint: the bundled name or Hub id as typed, else the folder's name
  // (a single file's without its extension).
  const shownModel =
    modelName === undefined
      ? DEFAULT_MODEL
      : existsSync(modelName)
        ? basename(resolve(modelPath)).replace(/\.safetensors$/i, '')
        : modelName;

  const loras = (values.lora ?? []).map((spec) => {
    const m = /^(.*?)(?::(-?[\d.]+))?$/.exec(spec)!;
    const scale = m[2] === undefined ? 1 : Number(m[2]);
    if (!Number.isFinite(scale))
      throw new UserError('usage', `--lora ${spec}: the scale is not a number`);
    return { path: m[1]!, scale };
  });
  // The LoRAs each prompt's tags name, found before anything loads so a wrong name fails first.
  const loraFolder =
    values['lora-dir'] !== undefined ? new LoraFolder(values['lora-dir']) : undefined;
  await loraFolder?.files();
  const promptLoras = new Map<string, ResolvedLoras>();
  for (const { prompt } of entries)
    if (!promptLoras.has(prompt))
      promptLoras.set(prompt, await resolvePromptLoras(prompt, loraFolder));
  // A LoRA file changed since the image was made draws a different picture: say so.
  const madeWith = from?.params.find(([key]) => key === 'Lora hashes')?.[1];
  const nowWith = from !== undefined ? promptLoras.get(from.prompt)?.hashes : undefined;
  if (madeWith !== undefined && nowWith !== undefined && madeWith !== nowWith)
    process.stderr.write(
      `note: ${values.from} was made with LoRAs ${madeWith}; ${values['lora-dir']} has ${nowWith}, so the image may differ\n`,
    );
  // gesso's `VAE` is the tiny autoencoder it decoded with; A1111's is a separate full VAE file.
  const fromGesso = from !== undefined && madeByGesso(from);
  const fromTinyVae = fromGesso ? from?.vae : undefined;
  const unapplied =
    from?.params.filter(([key]) => !APPLIED_KEYS.has(key) || (key === 'VAE' && !fromGesso)) ?? [];
  if (unapplied.length > 0)
    process.stderr.write(
      `note: ${values.from} also says ${unapplied.map(([k, v]) => `${k}: ${v}`).join(', ')}, which gesso does not apply, so the image will differ\n`,
    );
  const pipelineOptions = {
    ...(values.variant !== undefined ? { variant: values.variant } : {}),
    ...(values['low-memory']
      ? { lowMemory: true }
      : values['keep-loaded']
        ? { lowMemory: false }
        : {}),
    ...(quantize !== undefined ? { quantize } : {}),
    ...(threads !== undefined ? { threads } : {}),
    ...(provider !== undefined ? { executionProvider: provider } : {}),
  };
  // One model loaded at a time, with the --lora files and the LoRAs its prompt's tags name.
  let tinyVaePath: string | undefined;
  const loadFor = async (prompt: string): Promise<TextToImage> => {
    const all = [...loras, ...promptLoras.get(prompt)!.specs];
    const loaded = await loadPipeline(modelPath, {
      ...pipelineOptions,
      ...(all.length > 0 ? { loras: all } : {}),
    });
    if (tinyVaePath !== undefined && loaded instanceof StableDiffusionPipeline)
      await loaded.loadTinyVae(tinyVaePath);
    return loaded;
  };
  let pipe = await loadFor(entries[0]!.prompt);
  let pipeLoras = loraSetKey(entries[0]!.prompt);
  let released = false;
  // The tiny autoencoder: as asked, as the --from image recorded, else TAESD for the family.
  const fastDecode = values['fast-decode'] || (values['tiny-vae'] ?? fromTinyVae) !== undefined;
  let tinyVaeName: string | undefined;
  if (fastDecode) {
    if (!(pipe instanceof StableDiffusionPipeline))
      throw new UserError('usage', '--fast-decode is for diffusion models; a GAN has no decoder');
    tinyVaeName =
      values['tiny-vae'] ??
      fromTinyVae ??
      (pipe.textEncoder2 !== undefined ? 'madebyollin/taesdxl' : 'madebyollin/taesd');
    tinyVaePath = await resolveModel(tinyVaeName);
    await pipe.loadTinyVae(tinyVaePath);
  }
  const controller = new AbortController();
  const onSigint = () => {
    if (controller.signal.aborted) process.exit(130);
    controller.abort();
  };
  process.on('SIGINT', onSigint);
  try {
    const traits = modelTraits(pipe);
    const { route, nativeSize, folderScheduler } = traits;
    const schedulerFlag = values.scheduler ?? samplerOf(from, folderScheduler, values.from);

    // A misspelt sampler is the user's to mend before anything is drawn or reported.
    for (const name of [schedulerFlag, ...entries.map((e) => e.scheduler)])
      if (name !== undefined && !isSchedulerName(name)) throw unknownScheduler(name);
    // Every image to draw, with its own seed or its own variation seed.
    const nextSeeds = seedCounter(seedFlag, subseedFlag, subseedStrength);
    const seedWasRandom = seedFlag === undefined;
    const jobs: ImageSettings[] = [];
    for (const entry of entries) {
      const n = entry.count ?? count;
      for (let k = 0; k < n; k++) {
        jobs.push({
          prompt: entry.prompt,
          negative_prompt: entry.negativePrompt ?? negativeFlag ?? from?.negativePrompt ?? '',
          ...nextSeeds(entry.seed !== undefined ? { seed: entry.seed, index: k } : undefined),
          ...(seedResizeFrom !== undefined ? { seed_resize_from: seedResizeFrom } : {}),
          ...(rng === 'nv' ? { rng } : {}),
          ...(ensd !== 0 ? { ensd } : {}),
          steps: entry.steps ?? stepsFlag ?? pipe.defaults.steps,
          guidance: entry.guidance ?? guidanceFlag ?? pipe.defaults.guidance,
          scheduler: entry.scheduler ?? schedulerFlag ?? folderScheduler,
          width: entry.width ?? widthFlag ?? nativeSize,
          height: entry.height ?? heightFlag ?? nativeSize,
          model: shownModel,
          model_path: resolve(modelPath),
          ...(loras.length > 0 ? { loras: loras.map((l) => `${l.path}:${l.scale}`) } : {}),
          ...(promptLoras.get(entry.prompt)!.hashes !== undefined
            ? { lora_hashes: promptLoras.get(entry.prompt)!.hashes! }
            : {}),
          route,
          ...(clipSkip !== undefined ? { clip_skip: clipSkip } : {}),
          ...(tinyVaeName !== undefined ? { vae: tinyVaeName } : {}),
          ...(values['init-image'] !== undefined
            ? {
                init_image: values['init-image'],
                strength: strength ?? (values.mask !== undefined ? 1 : 0.8),
                ...(values.mask !== undefined ? { mask: values.mask } : {}),
              }
            : {}),
        });
      }
    }
    if (singleFile && jobs.length > 1) {
      throw new UserError(
        'usage',
        `--out ${out} names one file but this run makes ${jobs.length} images; give --out a folder`,
      );
    }
    for (const job of jobs) {
      if (job.width % 8 !== 0 || job.height % 8 !== 0)
        throw new UserError(
          'bad-size',
          `image size ${job.width}x${job.height} is not a multiple of 8 on both sides; try ${Math.round(job.width / 8) * 8}x${Math.round(job.height / 8) * 8}`,
        );
      checkFitsInMemory(pipe, job.width, job.height, batchSize);
    }

    const image =
      values['init-image'] === undefined
        ? undefined
        : await readImage(
            values['init-image'],
            widthFlag !== undefined && heightFlag !== undefined
              ? { width: widthFlag, height: heightFlag }
              : undefined,
          );
    if (values.mask !== undefined && image === undefined)
      throw new UserError('usage', '--mask needs --init-image, the picture it masks');
    const mask =
      values.mask === undefined
        ? undefined
        : await readImage(values.mask, { width: image!.shape[2]!, height: image!.shape[1]! });
    let latents: Tensor<'float32'> | undefined;
    if (values.latents !== undefined) {
      latents = await SafetensorsFile.with(values.latents, async (f) => {
        if (!f.has('latents'))
          throw new UserError(
            'bad-latents',
            `${values.latents} has no tensor named 'latents' (it has: ${f.names.join(', ')})`,
          );
        return (await f.read('latents')).toFloat32();
      });
      if (jobs.length > 1)
        throw new UserError(
          'usage',
          '--latents gives the noise of one image; make one image with it',
        );
    }

    const folder = singleFile ? undefined : await OutputFolder.open(out);
    if (seedWasRandom && entries.every((e) => e.seed === undefined))
      process.stderr.write(`seed ${jobs[0]!.seed} (random)\n`);
    let written = 0;
    let index = 0;
    while (index < jobs.length) {
      const first = jobs[index]!;
      const batch: ImageSettings[] = [first];
      while (
        batch.length < batchSize &&
        index + batch.length < jobs.length &&
        sameBatch(jobs[index + batch.length]!, first)
      )
        batch.push(jobs[index + batch.length]!);
      const batchLoras = loraSetKey(first.prompt);
      if (batchLoras !== pipeLoras) {
        // Released before the next loads: two copies of a model may not fit.
        released = true;
        await pipe.release();
        pipe = await loadFor(first.prompt);
        released = false;
        pipeLoras = batchLoras;
      }
      const label =
        batch.length === 1
          ? `image ${index + 1}/${jobs.length}`
          : `images ${index + 1}-${index + batch.length}/${jobs.length}`;
      const started = Date.now();
      let result;
      try {
        result = await renderBatch(pipe, traits, batch, {
          ...(image !== undefined ? { image } : {}),
          ...(mask !== undefined ? { mask } : {}),
          ...(latents !== undefined ? { latents } : {}),
          ...(spacing !== undefined ? { timestepSpacing: spacing } : {}),
          signal: controller.signal,
          onProgress: (step, steps) => {
            progress.update(progressBar(label, step, steps, (Date.now() - started) / 1000));
          },
        });
      } catch (error) {
        progress.clear();
        if (controller.signal.aborted) {
          process.stderr.write(
            `stopped: ${written} of ${jobs.length} images written${folder !== undefined ? ` to ${folder.dir}` : ''}\n`,
          );
          return 130;
        }
        throw error;
      }
      progress.clear();
      const seconds = (Date.now() - started) / 1000;
      const pixels = toUint8(result.images);
      const each = seconds / batch.length;
      let paths: string[];
      if (folder !== undefined) paths = await saveBatch(folder, batch, pixels, { seconds: each });
      else if (extension === '.safetensors') {
        await writeSafetensors(out, { image: result.images, latents: result.latents });
        paths = [out];
      } else {
        await writePng(out, pixels, 0, { parameters: infotextFor(first, first.model) });
        paths = [out];
      }
      paths.forEach((path, k) => {
        const settings = batch[k]!;
        process.stdout.write(
          `${path}: ${settings.width}×${settings.height}, seed ${settings.seed}, ${each.toFixed(1)} s\n`,
        );
      });
      written += paths.length;
      index += batch.length;
    }
    return 0;
  } finally {
    process.off('SIGINT', onSigint);
    if (!released) await pipe.release();
  }
}
