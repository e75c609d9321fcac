import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import cors from '@fastify/cors';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { isUserError } from '../errors.js';
import { LoraFolder, resolvePromptLoras } from '../generation/networks.js';
import { infotextFor, isOutputImageName } from '../generation/outputs.js';
import { listModels } from '../generation/models.js';
import { decodeImage } from '../io/image.js';
import { parseInfotext } from '../io/infotext.js';
import { readPngText } from '../io/png.js';
import { refuseExtraNetworks } from '../tokenizers/prompt-schedule.js';
import type { RuntimeOptions } from '../runtime/session.js';
import {
  A1111_SCHEDULE_TYPES,
  displayName,
  isSchedulerName,
  SCHEDULER_NAMES,
  withScheduleType,
} from '../schedulers/index.js';
import { COMFY_ROUTES, registerComfy } from './comfy.js';
import { JobQueue, jobView, type Job, type JobEvent, type JobRequest } from './jobs.js';
import { ModelManager } from './models.js';

/**
 * `gesso serve`: gesso's own jobs API (submit, follow as server-sent events, cancel, fetch
 * images), the AUTOMATIC1111 routes, the OpenAI Images route and ComfyUI's API (comfy.ts) that
 * existing clients speak, and the web page, on Fastify. One model is loaded; jobs run one at a
 * time through the queue.
 */

export interface Limits {
  /** Largest width or height in pixels. */
  readonly maxSide: number;
  readonly maxSteps: number;
  /** Most images per request. */
  readonly maxImages: number;
  /** Longest prompt, in characters. */
  readonly maxPromptLength: number;
}

export const DEFAULT_LIMITS: Limits = {
  maxSide: 1024,
  maxSteps: 150,
  maxImages: 16,
  maxPromptLength: 2000,
};

export interface ServerOptions {
  readonly model: string;
  /** The output folder: images, manifest.jsonl and jobs/. */
  readonly out: string;
  /** Bearer tokens accepted on the API routes; none: no authentication. */
  readonly apiKeys?: readonly string[];
  /** Origins allowed by CORS (`*` for any); none: same-origin only. */
  readonly corsOrigins?: readonly string[];
  readonly limits?: Partial<Limits>;
  /** Send a decoded preview every this many steps (0: never). */
  readonly previewEvery?: number;
  /** A tiny autoencoder (TAESD folder or Hub id) that decodes the previews fast. */
  readonly tinyVae?: string;
  /** The folder prompts' `<lora:NAME:WEIGHT>` tags find their files in (A1111's --lora-dir). */
  readonly loraDir?: string;
  /**
   * ONNX Runtime's settings. Models load and run off the server's thread unless `offThread` is
   * false here, so requests are answered while a model loads or a step runs.
   */
  readonly runtime?: RuntimeOptions;
  /** Fastify's logger: true for JSON lines on stdout. */
  readonly logger?: boolean;
}

export interface GessoServer {
  readonly app: FastifyInstance;
  readonly queue: JobQueue;
  readonly models: ModelManager;
  /** Stops accepting work, ends the running job cleanly, closes the port and the model. */
  close(): Promise<void>;
}

const PAGE = resolve(fileURLToPath(new URL('../../../web/index.html', import.meta.url)));
/** OpenAI model names existing programs send: they mean "the model this server runs". */
const OPENAI_MODELS = new Set(['dall-e-2', 'dall-e-3', 'gpt-image-1', 'gpt-image-1-mini']);

class RequestError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param?: string,
  ) {
    super(message);
  }
}

function sizeFields(limits: Limits) {
  return { type: 'integer', minimum: 8, maximum: limits.maxSide, multipleOf: 8 } as const;
}

/** `allowEmpty`: A1111's routes draw an empty prompt unconditionally, as its web UI does. */
function checkPrompt(prompt: string, limits: Limits, field = 'prompt', allowEmpty = false): void {
  if (!allowEmpty && prompt.trim() === '') throw new RequestError(400, `${field} is empty`, field);
  if (prompt.length > limits.maxPromptLength)
    throw new RequestError(
      400,
      `${field} is ${prompt.length} characters; this server takes at most ${limits.maxPromptLength}`,
      field,
    );
}

function checkScheduler(name: string | undefined): string | undefined {
  if (name === undefined || name === '') return undefined;
  if (isSchedulerName(name)) return name;
  throw new RequestError(
    400,
    `unknown sampler '${name}'; use one of: ${SCHEDULER_NAMES.map((n) => displayName(n)).join(', ')}`,
    'sampler_name',
  );
}

/**
 * A1111 request fields gesso's routes do not do, refused when they ask for something (clients
 * send most of them at their defaults, which are accepted): a picture made without them would
 * not be what was asked for.
 */
function refuseUnsupported(b: Record<string, unknown>): void {
  const asks: [string, boolean][] = [
    ['enable_hr', b.enable_hr === true],
    ['restore_faces', b.restore_faces === true],
    ['tiling', b.tiling === true],
    ['styles', Array.isArray(b.styles) && b.styles.length > 0],
    ['script_name', typeof b.script_name === 'string' && b.script_name !== ''],
    [
      'alwayson_scripts',
      typeof b.alwayson_scripts === 'object' &&
        b.alwayson_scripts !== null &&
        Object.keys(b.alwayson_scripts).length > 0,
    ],
  ];
  for (const [field, asked] of asks)
    if (asked)
      throw new RequestError(
        400,
        `${field} is not supported by gesso's AUTOMATIC1111 routes; leave it at its default (hires fix, face restoration, tiling, styles and scripts are not implemented)`,
        field,
      );
}

/** A1111's variation seed fields as a job's (subseed −1: random; sizes ≤ 0: not resized). */
function variationOf(
  b: Record<string, unknown>,
): Pick<JobRequest, 'subseed' | 'subseed_strength' | 'seed_resize_from'> {
  const strength = (b.subseed_strength as number | undefined) ?? 0;
  const subseed = b.subseed as number | undefined;
  const [width, height] = [b.seed_resize_from_w, b.seed_resize_from_h] as (number | undefined)[];
  return {
    ...(strength !== 0 ? { subseed_strength: strength } : {}),
    ...(strength !== 0 && subseed !== undefined && subseed >= 0 ? { subseed } : {}),
    ...(width !== undefined && height !== undefined && width > 0 && height > 0
      ? { seed_resize_from: { width, height } }
      : {}),
  };
}

/** A1111's CLIP_stop_at_last_layers (1: the last layer), checked; `where` names the field. */
function clipStopOf(layers: unknown, where: string): number | undefined {
  if (layers === undefined) return undefined;
  if (typeof layers !== 'number' || !Number.isInteger(layers) || layers < 1 || layers > 12)
    throw new RequestError(
      400,
      `${where}CLIP_stop_at_last_layers must be a whole number from 1 to 12 (got ${JSON.stringify(layers)})`,
      where === '' ? 'CLIP_stop_at_last_layers' : 'override_settings',
    );
  return layers;
}

/**
 * A1111's randn_source (GPU, CPU or NV), checked: gesso draws CPU noise as PyTorch's CPU
 * generator does and NV (GPU's on NVIDIA cards) as A1111's re-derivation of CUDA's does.
 */
function randnSourceOf(source: unknown, where: string): 'CPU' | 'GPU' | 'NV' | undefined {
  if (source === undefined) return undefined;
  if (source === 'CPU' || source === 'GPU' || source === 'NV') return source;
  throw new RequestError(
    400,
    `${where}randn_source must be GPU, CPU or NV (got ${JSON.stringify(source)})`,
    where === '' ? 'randn_source' : 'override_settings',
  );
}

/** A1111's eta_noise_seed_delta, checked: a whole number from 0. */
function noiseSeedDeltaOf(delta: unknown, where: string): number | undefined {
  if (delta === undefined) return undefined;
  if (typeof delta !== 'number' || !Number.isInteger(delta) || delta < 0 || delta > 2 ** 32)
    throw new RequestError(
      400,
      `${where}eta_noise_seed_delta must be a whole number from 0 to 4294967296 (got ${JSON.stringify(delta)})`,
      where === '' ? 'eta_noise_seed_delta' : 'override_settings',
    );
  return delta;
}

/** Beyond 2^53 a JSON number is not the integer sent, so it would seed something else. */
const MAX_SEED = Number.MAX_SAFE_INTEGER;

/** The bytes of an A1111 image field: base64, with or without a `data:image/...;base64,` prefix. */
function base64Image(field: string): Buffer {
  return Buffer.from(field.replace(/^data:image\/\w+;base64,/, ''), 'base64');
}

/** Waits for a job to end. */
function settled(queue: JobQueue, job: Job): Promise<Job> {
  if (job.state === 'done' || job.state === 'failed' || job.state === 'cancelled')
    return Promise.resolve(job);
  return new Promise((resolveJob) => {
    const listener = (event: JobEvent) => {
      if (event.type === 'done' || event.type === 'failed' || event.type === 'cancelled') {
        queue.off(job.id, listener);
        resolveJob(event.job);
      }
    };
    queue.on(job.id, listener);
  });
}

export async function createServer(options: ServerOptions): Promise<GessoServer> {
  const limits: Limits = { ...DEFAULT_LIMITS, ...options.limits };
  /**
   * A1111 settings the server keeps between requests (GET and POST /sdapi/v1/options). The noise
   * source is the CPU one, gesso's, unless a client asks (A1111's own default is GPU).
   */
  const settings: {
    clipStop: number;
    randnSource: 'CPU' | 'GPU' | 'NV';
    noiseSeedDelta: number;
  } = { clipStop: 1, randnSource: 'CPU', noiseSeedDelta: 0 };
  const models = new ModelManager(
    options.model,
    { offThread: true, ...options.runtime },
    options.tinyVae,
    options.loraDir !== undefined ? new LoraFolder(options.loraDir) : undefined,
  );
  const queue = await JobQueue.open(options.out, models, options.previewEvery ?? 5);
  // A LoRA the folder lacks, or a tag gesso does not load, is the request's mistake: refused
  // now, not when its job runs.
  const checkNetworks = async (prompt: string, negative = '') => {
    await resolvePromptLoras(prompt, models.loras);
    refuseExtraNetworks(negative, 'negative prompt');
  };
  const keys = new Set(options.apiKeys ?? []);
  const app = Fastify({
    logger: options.logger === true ? { level: 'info' } : false,
    bodyLimit: 64 * 1024 * 1024,
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false } },
  });

  if (options.corsOrigins !== undefined && options.corsOrigins.length > 0) {
    await app.register(cors, {
      origin: options.corsOrigins.includes('*') ? true : [...options.corsOrigins],
    });
  }

  // Errors in the shape each API's clients expect, with the message first.
  app.setErrorHandler((error: unknown, request, reply) => {
    const e = error as Error & { statusCode?: number; validation?: unknown };
    let status = e.statusCode ?? 500;
    let message = e.message;
    let param: string | undefined;
    if (error instanceof RequestError) {
      status = error.status;
      param = error.param;
    } else if (isUserError(error)) status = 400;
    else if (e.validation !== undefined) status = 400;
    else if (status >= 500) {
      request.log.error(error);
      message = `internal error: ${e.message}`;
    }
    if (request.url.startsWith('/v1/'))
      return reply.status(status).send({
        error: { message, type: 'invalid_request_error', param: param ?? null, code: null },
      });
    if (request.url.startsWith('/sdapi/'))
      return reply.status(status).send({ error: 'Bad Request', detail: message, errors: message });
    return reply.status(status).send({ error: message });
  });

  // Browsers cannot put headers on EventSource, WebSocket or <img> requests: GETs may carry ?key=.
  const authorized = (request: IncomingMessage) => {
    if (keys.size === 0) return true;
    const header = request.headers.authorization ?? '';
    const query =
      request.method === 'GET'
        ? new URL(request.url ?? '/', 'http://localhost').searchParams.get('key')
        : null;
    return keys.has(header.startsWith('Bearer ') ? header.slice(7) : (query ?? ''));
  };
  app.addHook('onRequest', async (request, reply) => {
    const path = request.url.split('?')[0]!;
    if (!/^\/(api|sdapi|v1)\//.test(path) && !COMFY_ROUTES.test(path)) return;
    if (!authorized(request.raw)) {
      await reply
        .status(401)
        .send({ error: 'missing or wrong API key: send Authorization: Bearer <key>' });
    }
  });

  const imageUrl = (request: FastifyRequest | undefined, file: string) => {
    const path = `/api/images/${file}`;
    if (request === undefined) return path;
    return `${request.protocol}://${request.headers.host ?? request.hostname}${path}`;
  };
  const view = (job: Job, request?: FastifyRequest) =>
    jobView(job, queue.position(job.id), (f) =>
      request ? imageUrl(request, f) : imageUrl(undefined, f),
    );

  const readImages = async (job: Job) =>
    Promise.all(
      job.images.map(async (f) => (await readFile(join(options.out, f))).toString('base64')),
    );

  // --- health and the page -------------------------------------------------------------------
  app.get('/health', async () => ({ status: 'ok', model: models.name, queue: queue.pending }));

  app.get('/', async (_request, reply) => {
    if (!existsSync(PAGE))
      return reply.status(404).send({ error: 'the web page is not installed' });
    return reply
      .type('text/html; charset=utf-8')
      .header(
        'content-security-policy',
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
      )
      .send(await readFile(PAGE));
  });

  // --- gesso's jobs API ---------------------------------------------------------------------
  app.post(
    '/api/jobs',
    {
      schema: {
        body: {
          type: 'object',
          required: ['prompt'],
          additionalProperties: false,
          properties: {
            prompt: { type: 'string' },
            negative_prompt: { type: 'string' },
            steps: { type: 'integer', minimum: 1, maximum: limits.maxSteps },
            guidance: { type: 'number', minimum: 0, maximum: 50 },
            sampler: { type: 'string' },
            width: sizeFields(limits),
            height: sizeFields(limits),
            seed: { type: 'integer', minimum: 0, maximum: MAX_SEED },
            rng: { type: 'string', enum: ['cpu', 'nv'] },
            count: { type: 'integer', minimum: 1, maximum: limits.maxImages },
            batch_size: { type: 'integer', minimum: 1, maximum: limits.maxImages },
          },
        },
      },
    },
    async (request, reply) => {
      const b = request.body as Record<string, unknown>;
      checkPrompt(b.prompt as string, limits);
      await checkNetworks(b.prompt as string, b.negative_prompt as string | undefined);
      const scheduler = checkScheduler(b.sampler as string | undefined);
      const job = queue.submit({
        prompt: b.prompt as string,
        negative_prompt: (b.negative_prompt as string | undefined) ?? '',
        count: (b.count as number | undefined) ?? 1,
        batch_size: (b.batch_size as number | undefined) ?? 1,
        ...pick(b, ['steps', 'guidance', 'width', 'height', 'seed']),
        ...(b.rng === 'nv' ? { rng: 'nv' as const } : {}),
        ...(scheduler !== undefined ? { scheduler } : {}),
      });
      return reply.status(202).send(view(job, request));
    },
  );

  app.get('/api/jobs', async (request) => ({ jobs: queue.list().map((j) => view(j, request)) }));

  const jobOr404 = (id: string): Job => {
    const job = queue.get(id);
    if (job === undefined) throw new RequestError(404, `no job ${id}`);
    return job;
  };

  app.get('/api/jobs/:id', async (request) =>
    view(jobOr404((request.params as { id: string }).id), request),
  );

  const cancel = async (request: FastifyRequest) => {
    const job = jobOr404((request.params as { id: string }).id);
    if (!queue.cancel(job.id)) throw new RequestError(409, `job ${job.id} is already ${job.state}`);
    // The steps done when the cancel arrived: a running job stops after at most one more.
    return { id: job.id, cancelling: true, step: job.step };
  };
  app.post('/api/jobs/:id/cancel', cancel);
  app.delete('/api/jobs/:id', cancel);

  app.get('/api/jobs/:id/events', (request: FastifyRequest, reply: FastifyReply) => {
    const job = jobOr404((request.params as { id: string }).id);
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, {
      'content-type': 'text/event-stream',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
    });
    const send = (type: string, job: Job, preview?: Buffer) => {
      const data = {
        ...view(job, request),
        ...(preview !== undefined
          ? { preview: `data:image/png;base64,${preview.toString('base64')}` }
          : {}),
      };
      res.write(`event: ${type}\ndata: ${JSON.stringify(data)}\n\n`);
    };
    const end = () => {
      queue.off(job.id, listener);
      queue.off('event', positions);
      res.end();
    };
    const listener = (event: JobEvent) => {
      send(event.type, event.job, event.preview);
      if (event.type === 'done' || event.type === 'failed' || event.type === 'cancelled') end();
    };
    // While waiting, every other job's start moves this one up the queue.
    const positions = (event: JobEvent) => {
      if (event.job.id !== job.id && event.type === 'started' && job.state === 'queued')
        send('queued', job);
    };
    send(job.state === 'running' ? 'started' : job.state, job);
    if (job.state === 'done' || job.state === 'failed' || job.state === 'cancelled') {
      res.end();
      return;
    }
    queue.on(job.id, listener);
    queue.on('event', positions);
    request.raw.on('close', () => {
      queue.off(job.id, listener);
      queue.off('event', positions);
    });
  });

  app.get('/api/images/:file', async (request, reply) => {
    const file = (request.params as { file: string }).file;
    if (!isOutputImageName(file) || !existsSync(join(options.out, file)))
      throw new RequestError(404, `no image ${file}`);
    return reply.type('image/png').send(await readFile(join(options.out, file)));
  });

  app.get('/api/models', async () => {
    const known = listModels().map((m) => ({ name: m.name, source: m.source, family: m.family }));
    if (!known.some((m) => m.name === models.name))
      known.unshift({ name: models.name, source: 'configured', family: 'loaded' });
    return { current: models.name, models: known };
  });

  app.get('/api/samplers', async () => ({
    samplers: SCHEDULER_NAMES.map((name) => ({ name, label: displayName(name) })),
  }));

  // --- AUTOMATIC1111 ------------------------------------------------------------------------
  const a1111Body = {
    type: 'object',
    additionalProperties: true,
    properties: {
      prompt: { type: 'string' },
      negative_prompt: { type: 'string' },
      steps: { type: 'integer', minimum: 1, maximum: limits.maxSteps },
      cfg_scale: { type: 'number', minimum: 0, maximum: 50 },
      width: sizeFields(limits),
      height: sizeFields(limits),
      seed: { type: 'integer', minimum: -1, maximum: MAX_SEED },
      batch_size: { type: 'integer', minimum: 1, maximum: limits.maxImages },
      n_iter: { type: 'integer', minimum: 1, maximum: limits.maxImages },
      sampler_name: { type: 'string' },
      sampler_index: { type: 'string' },
      scheduler: { type: 'string' },
      denoising_strength: { type: 'number', minimum: 0, maximum: 1 },
      init_images: { type: 'array', items: { type: 'string' }, maxItems: 1 },
      mask: { type: ['string', 'null'] },
      inpainting_mask_invert: { type: 'integer', enum: [0, 1] },
      override_settings: { type: 'object' },
      subseed: { type: 'integer', minimum: -1, maximum: MAX_SEED },
      subseed_strength: { type: 'number', minimum: 0, maximum: 1 },
      seed_resize_from_w: { type: 'integer', minimum: -1 },
      seed_resize_from_h: { type: 'integer', minimum: -1 },
    },
  } as const;

  const a1111 = async (request: FastifyRequest, img2img: boolean) => {
    const b = request.body as Record<string, unknown>;
    const prompt = (b.prompt as string | undefined) ?? '';
    checkPrompt(prompt, limits, 'prompt', true);
    await checkNetworks(prompt, b.negative_prompt as string | undefined);
    refuseUnsupported(b);
    const overrides = b.override_settings as Record<string, unknown> | undefined;
    // The request's own setting, else the server's (POST /sdapi/v1/options), as A1111 does.
    const clipStop =
      clipStopOf(overrides?.CLIP_stop_at_last_layers, 'override_settings.') ?? settings.clipStop;
    const clipSkip = clipStop > 1 ? clipStop - 1 : undefined;
    const randnSource =
      randnSourceOf(overrides?.randn_source, 'override_settings.') ?? settings.randnSource;
    const noiseSeedDelta =
      noiseSeedDeltaOf(overrides?.eta_noise_seed_delta, 'override_settings.') ??
      settings.noiseSeedDelta;
    const checkpoint = overrides?.sd_model_checkpoint;
    if (checkpoint !== undefined && checkpoint !== models.name)
      throw new RequestError(
        400,
        `override_settings.sd_model_checkpoint is ${JSON.stringify(checkpoint)} but this server has '${models.name}' loaded; switch models with POST /sdapi/v1/options first`,
        'override_settings',
      );
    const batchSize = (b.batch_size as number | undefined) ?? 1;
    const iterations = (b.n_iter as number | undefined) ?? 1;
    if (batchSize * iterations > limits.maxImages)
      throw new RequestError(
        400,
        `batch_size × n_iter is ${batchSize * iterations}; this server makes at most ${limits.maxImages} images a request`,
      );
    const sampler = checkScheduler(
      (b.sampler_name as string | undefined) ?? (b.sampler_index as string | undefined),
    );
    const scheduleType = (b.scheduler as string | undefined) ?? '';
    if (sampler === undefined && !['', 'automatic'].includes(scheduleType.toLowerCase()))
      throw new RequestError(
        400,
        `scheduler '${scheduleType}' needs the sampler_name it goes with`,
        'scheduler',
      );
    const scheduler =
      sampler !== undefined && scheduleType !== ''
        ? withScheduleType(sampler, scheduleType)
        : sampler;
    const seed = b.seed as number | undefined;
    let init: Awaited<ReturnType<typeof decodeImage>> | undefined;
    if (img2img) {
      const images = b.init_images as string[] | undefined;
      if (images === undefined || images.length === 0)
        throw new RequestError(400, 'img2img needs init_images: one base64 image', 'init_images');
      init = await decodeImage(base64Image(images[0]!), 'init_images[0]', {
        width: (b.width as number | undefined) ?? 512,
        height: (b.height as number | undefined) ?? 512,
      });
    }
    let mask: Awaited<ReturnType<typeof decodeImage>> | undefined;
    if (typeof b.mask === 'string' && b.mask !== '') {
      if (init === undefined)
        throw new RequestError(400, 'a mask goes with img2img and its init_images', 'mask');
      mask = await decodeImage(base64Image(b.mask), 'mask', {
        width: init.shape[2]!,
        height: init.shape[1]!,
      });
      // A1111 repaints the white of the mask; inpainting_mask_invert 1 repaints the black.
      if (b.inpainting_mask_invert === 1) mask.data.forEach((v, i) => (mask!.data[i] = 255 - v));
    }
    const job = queue.submit({
      prompt,
      negative_prompt: (b.negative_prompt as string | undefined) ?? '',
      count: batchSize * iterations,
      batch_size: batchSize,
      ...(seed !== undefined && seed >= 0 ? { seed } : {}),
      ...(b.steps !== undefined ? { steps: b.steps as number } : {}),
      ...(b.cfg_scale !== undefined ? { guidance: b.cfg_scale as number } : {}),
      ...(b.width !== undefined ? { width: b.width as number } : {}),
      ...(b.height !== undefined ? { height: b.height as number } : {}),
      ...(scheduler !== undefined ? { scheduler } : {}),
      ...(init !== undefined
        ? { init_image: init, strength: (b.denoising_strength as number | undefined) ?? 0.75 }
        : {}),
      ...(mask !== undefined ? { mask } : {}),
      ...(clipSkip !== undefined ? { clip_skip: clipSkip } : {}),
      ...(randnSource !== 'CPU' ? { rng: 'nv' as const } : {}),
      ...(noiseSeedDelta !== 0 ? { ensd: noiseSeedDelta } : {}),
      ...variationOf(b),
    });
    const finished = await settled(queue, job);
    if (finished.state === 'failed')
      throw new RequestError(400, finished.error ?? 'generation failed');
    const s = finished.settings;
    const first = s[0];
    const infotexts = s.slice(0, finished.images.length).map((x) => infotextFor(x, x.model));
    const info = {
      prompt,
      all_prompts: s.map((x) => x.prompt),
      negative_prompt: first?.negative_prompt ?? '',
      all_negative_prompts: s.map((x) => x.negative_prompt),
      seed: first?.seed ?? -1,
      all_seeds: s.map((x) => x.seed),
      subseed: first?.subseed ?? -1,
      all_subseeds: s.map((x) => x.subseed ?? -1),
      subseed_strength: first?.subseed_strength ?? 0,
      width: first?.width,
      height: first?.height,
      sampler_name:
        first !== undefined ? (first.route === 'gan' ? 'GAN' : displayName(first.scheduler)) : '',
      cfg_scale: first?.guidance,
      steps: first?.steps,
      batch_size: batchSize,
      restore_faces: false,
      face_restoration_model: null,
      sd_model_name: models.name,
      sd_model_hash: null,
      sd_vae_name: null,
      sd_vae_hash: null,
      seed_resize_from_w: first?.seed_resize_from?.width ?? -1,
      seed_resize_from_h: first?.seed_resize_from?.height ?? -1,
      denoising_strength: img2img ? (first?.strength ?? 0.75) : 0,
      extra_generation_params: {},
      index_of_first_image: 0,
      infotexts,
      styles: [],
      job_timestamp: finished.created.replace(/\D/g, '').slice(0, 14),
      clip_skip: (first?.clip_skip ?? 0) + 1,
      is_using_inpainting_conditioning: false,
      version: 'gesso',
    };
    return {
      // send_images false: the client reads the images elsewhere (A1111 answers an empty list).
      images: b.send_images === false ? [] : await readImages(finished),
      parameters: { ...b, ...(img2img ? { init_images: null } : {}) },
      info: JSON.stringify(info),
    };
  };
  app.post('/sdapi/v1/txt2img', { schema: { body: a1111Body } }, (r) => a1111(r, false));
  app.post('/sdapi/v1/img2img', { schema: { body: a1111Body } }, (r) => a1111(r, true));

  app.get('/sdapi/v1/progress', async (request) => {
    const job = queue.current;
    const skip = (request.query as Record<string, string>).skip_current_image === 'true';
    const preview = queue.preview;
    const fraction = job === undefined || job.total === 0 ? 0 : job.step / job.total;
    const elapsed = job !== undefined ? (Date.now() - Date.parse(job.created)) / 1000 : 0;
    return {
      progress: fraction,
      eta_relative: fraction > 0 ? (elapsed / fraction) * (1 - fraction) : 0,
      state: {
        skipped: false,
        interrupted: false,
        job: job?.id ?? '',
        job_count: queue.pending,
        job_timestamp: job?.created.replace(/\D/g, '').slice(0, 14) ?? '0',
        job_no: 0,
        sampling_step: job?.step ?? 0,
        sampling_steps: job?.total ?? 0,
      },
      current_image:
        skip || job === undefined || preview === undefined ? null : preview.toString('base64'),
      textinfo: null,
    };
  });

  app.post('/sdapi/v1/interrupt', async () => {
    const job = queue.current;
    if (job !== undefined) queue.cancel(job.id);
    return {};
  });

  app.get('/sdapi/v1/sd-models', async () =>
    listModels().map((m) => ({
      title: m.name,
      model_name: m.name,
      hash: null,
      sha256: null,
      filename: m.path,
      config: null,
    })),
  );

  // The LoRAs prompts can name (the folder is read on each request, so refreshing is a no-op).
  app.get('/sdapi/v1/loras', async () => (await models.loras?.list()) ?? []);
  app.post('/sdapi/v1/refresh-loras', async () => null);

  app.get('/sdapi/v1/samplers', async () =>
    SCHEDULER_NAMES.map((name) => ({ name: displayName(name), aliases: [name], options: {} })),
  );

  // A1111's PNG Info: the parameters chunk as written, its other text chunks, and the pairs parsed
  // as its parse_generation_parameters names them (a size `WxH` as `Size-1` and `Size-2`).
  app.post(
    '/sdapi/v1/png-info',
    {
      schema: {
        body: {
          type: 'object',
          required: ['image'],
          properties: { image: { type: 'string', minLength: 1 } },
        },
      },
    },
    async (request) => {
      const { parameters: info = '', ...items } = readPngText(
        base64Image((request.body as { image: string }).image),
        'image',
      );
      const parameters: Record<string, string> = {};
      if (info !== '') {
        const parsed = parseInfotext(info);
        parameters.Prompt = parsed.prompt;
        parameters['Negative prompt'] = parsed.negativePrompt;
        for (const [key, value] of parsed.params) {
          const size = /^(\d+)x(\d+)$/.exec(value);
          if (size === null) parameters[key] = value;
          else [parameters[`${key}-1`], parameters[`${key}-2`]] = [size[1]!, size[2]!];
        }
      }
      return { info, items, parameters };
    },
  );

  // Lists an A1111 client may read before drawing: gesso has no upscalers, separate VAEs,
  // styles, embeddings or hypernetworks, and says so with empty lists rather than 404s. "None"
  // is A1111's no-upscaler entry.
  app.get('/sdapi/v1/upscalers', async () => [
    { name: 'None', model_name: null, model_path: null, model_url: null, scale: 4 },
  ]);
  app.get('/sdapi/v1/latent-upscale-modes', async () => []);
  app.get('/sdapi/v1/sd-vae', async () => []);
  app.get('/sdapi/v1/prompt-styles', async () => []);
  app.get('/sdapi/v1/hypernetworks', async () => []);
  app.get('/sdapi/v1/embeddings', async () => ({ loaded: {}, skipped: {} }));

  app.get('/sdapi/v1/schedulers', async () =>
    A1111_SCHEDULE_TYPES.map((label) => ({
      name: label.toLowerCase(),
      label,
      aliases: null,
      default_rho: label === 'Karras' ? 7 : -1,
      need_inner_model: false,
    })),
  );

  app.get('/sdapi/v1/options', async () => ({
    sd_model_checkpoint: models.name,
    CLIP_stop_at_last_layers: settings.clipStop,
    randn_source: settings.randnSource,
    eta_noise_seed_delta: settings.noiseSeedDelta,
    samples_format: 'png',
  }));

  app.post(
    '/sdapi/v1/options',
    { schema: { body: { type: 'object', additionalProperties: true } } },
    async (request) => {
      const body = request.body as Record<string, unknown>;
      const clipStop = clipStopOf(body.CLIP_stop_at_last_layers, '');
      const randnSource = randnSourceOf(body.randn_source, '');
      const noiseSeedDelta = noiseSeedDeltaOf(body.eta_noise_seed_delta, '');
      const checkpoint = body.sd_model_checkpoint;
      if (checkpoint !== undefined && typeof checkpoint !== 'string')
        throw new RequestError(400, 'sd_model_checkpoint must be a model name');
      if (clipStop !== undefined) settings.clipStop = clipStop;
      if (randnSource !== undefined) settings.randnSource = randnSource;
      if (noiseSeedDelta !== undefined) settings.noiseSeedDelta = noiseSeedDelta;
      if (checkpoint !== undefined) {
        await queue.exclusive(() => models.use(checkpoint));
      }
      return null;
    },
  );

  // --- OpenAI Images ------------------------------------------------------------------------
  app.post(
    '/v1/images/generations',
    {
      schema: {
        body: {
          type: 'object',
          required: ['prompt'],
          additionalProperties: true,
          properties: {
            prompt: { type: 'string' },
            model: { type: 'string' },
            n: { type: 'integer', minimum: 1, maximum: limits.maxImages },
            size: { type: 'string' },
            response_format: { type: 'string', enum: ['url', 'b64_json'] },
          },
        },
      },
    },
    async (request) => {
      const b = request.body as Record<string, unknown>;
      const prompt = b.prompt as string;
      checkPrompt(prompt, limits);
      await checkNetworks(prompt);
      // gpt-image-1's output fields: what gesso cannot give is refused, not answered with a PNG.
      if (b.output_format !== undefined && b.output_format !== 'png')
        throw new RequestError(
          400,
          `output_format '${String(b.output_format)}' is not supported: gesso answers PNG, whose text chunk carries the generation parameters; ask for png or leave it out`,
          'output_format',
        );
      if (b.background === 'transparent')
        throw new RequestError(
          400,
          "background 'transparent' is not supported: gesso's models draw opaque images; ask for opaque or auto",
          'background',
        );
      const model = b.model as string | undefined;
      if (model !== undefined && model !== models.name && !OPENAI_MODELS.has(model)) {
        const known = listModels().map((m) => m.name);
        if (!known.includes(model))
          throw new RequestError(
            404,
            `model '${model}' does not exist here; available: ${known.join(', ')}`,
            'model',
          );
        await queue.exclusive(() => models.use(model));
      }
      let size: { width: number; height: number } | undefined;
      const sizeText = b.size as string | undefined;
      if (sizeText !== undefined && sizeText !== 'auto') {
        const m = /^(\d+)x(\d+)$/.exec(sizeText);
        const bad = (why: string) => new RequestError(400, `size '${sizeText}' ${why}`, 'size');
        if (m === null) throw bad("is not 'WIDTHxHEIGHT' or 'auto'");
        size = { width: Number(m[1]), height: Number(m[2]) };
        if (size.width % 8 !== 0 || size.height % 8 !== 0)
          throw bad('is not a multiple of 8 on both sides');
        if (size.width > limits.maxSide || size.height > limits.maxSide)
          throw bad(`exceeds this server's ${limits.maxSide}-pixel limit`);
      }
      const n = (b.n as number | undefined) ?? 1;
      const job = queue.submit({
        prompt,
        negative_prompt: '',
        count: n,
        batch_size: n,
        ...(size !== undefined ? size : {}),
      });
      const finished = await settled(queue, job);
      if (finished.state !== 'done')
        throw new RequestError(
          finished.state === 'failed' ? 400 : 409,
          finished.error ?? `the request was ${finished.state}`,
        );
      const format = (b.response_format as string | undefined) ?? 'url';
      const data =
        format === 'b64_json'
          ? (await readImages(finished)).map((b64_json) => ({ b64_json, revised_prompt: prompt }))
          : finished.images.map((f) => ({ url: imageUrl(request, f), revised_prompt: prompt }));
      return { created: Math.floor(Date.parse(finished.created) / 1000), data };
    },
  );

  const closeComfy = await registerComfy(app, {
    queue,
    models,
    out: options.out,
    maxSide: limits.maxSide,
    maxSteps: limits.maxSteps,
    maxImages: limits.maxImages,
    authorized,
  });

  return {
    app,
    queue,
    models,
    close: async () => {
      await queue.close();
      await closeComfy();
      await app.close();
      await models.release();
    },
  };
}

function pick(o: Record<string, unknown>, keys: readonly string[]): Partial<JobRequest> {
  const out: Record<string, unknown> = {};
  for (const k of keys) if (o[k] !== undefined) out[k] = o[k];
  return out as Partial<JobRequest>;
}
