import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { mkdir, readdir, readFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { isUserError } from '../errors.js';
import {
  modelTraits,
  OutputFolder,
  renderBatch,
  sameBatch,
  saveBatch,
  seedCounter,
  type ImageSettings,
} from '../generation/outputs.js';
import { resolvePromptLoras } from '../generation/networks.js';
import { toUint8 } from '../io/image.js';
import { writeFileAtomically } from '../io/atomic.js';
import { encodePng } from '../io/png.js';
import { StableDiffusionPipeline } from '../pipelines/stable-diffusion.js';
import type { RngSource } from '../tensor/rng.js';
import { Tensor } from '../tensor/tensor.js';
import type { PromptSyntax } from '../tokenizers/prompt.js';
import type { ModelManager } from './models.js';

/**
 * The server's jobs: a FIFO queue run one job at a time on the loaded model, each job's state
 * kept on disk beside its images (`jobs/<id>.json` in the output folder) so finished results
 * survive a restart, and every change announced to listeners (the event streams).
 */

export interface JobRequest {
  readonly prompt: string;
  readonly negative_prompt: string;
  readonly steps?: number;
  readonly guidance?: number;
  readonly scheduler?: string;
  readonly width?: number;
  readonly height?: number;
  /** Seed of the first image (each further image adds 1); random when absent. */
  readonly seed?: number;
  /**
   * A1111's variation seed of the first image and its strength: with a strength, every image
   * keeps the seed and each further one adds 1 to the variation seed instead.
   */
  readonly subseed?: number;
  readonly subseed_strength?: number;
  readonly seed_resize_from?: { readonly width: number; readonly height: number };
  readonly count: number;
  readonly batch_size: number;
  /** Image-to-image: the starting image and how much of the schedule to run. */
  readonly init_image?: Tensor<'uint8'>;
  readonly strength?: number;
  /** Inpainting: repaint where this image (the init image's size) is white. */
  readonly mask?: Tensor<'uint8'>;
  /** Text-encoder layers to skip from the end (0: the last layer's states). */
  readonly clip_skip?: number;
  /** What seeds feed (default cpu; nv: PyTorch's CUDA generator, A1111's NV). */
  readonly rng?: RngSource;
  /** A1111's eta noise seed delta (0: none). */
  readonly ensd?: number;
  /**
   * One generator seeded with `seed` draws the whole job's starting noise (ComfyUI, diffusers)
   * instead of one per image counting up from it (A1111); the job is then drawn as one batch.
   */
  readonly batch_noise?: boolean;
  /** The scheduler's timestep spacing (diffusers' `timestep_spacing`), else the model's. */
  readonly timestep_spacing?: string;
  /** PNG text chunks written instead of A1111's `parameters` (ComfyUI's `prompt`, `workflow`). */
  readonly png_text?: Readonly<Record<string, string>>;
  /** 'plain': the prompt's brackets are text, not A1111's emphasis and editing (default 'a1111'). */
  readonly prompt_syntax?: PromptSyntax;
  /** The model to switch the server to before drawing (default: the one loaded). */
  readonly model?: string;
}

export type JobState = 'queued' | 'running' | 'done' | 'failed' | 'cancelled';

export interface Job {
  readonly id: string;
  state: JobState;
  readonly created: string;
  finished?: string;
  readonly request: Omit<JobRequest, 'init_image' | 'mask'>;
  /** Each image's full settings, known once the job starts. */
  settings: ImageSettings[];
  /** Steps done and to do over the whole job (every batch). */
  step: number;
  total: number;
  /** File names of finished images, in the output folder. */
  images: string[];
  error?: string;
}

export interface JobEvent {
  readonly type: 'queued' | 'started' | 'progress' | 'image' | 'done' | 'failed' | 'cancelled';
  readonly job: Job;
  /** A small PNG of the current state of the first image, on some progress events. */
  readonly preview?: Buffer;
}

/** A job's public view: what the API returns. */
export function jobView(job: Job, position: number | undefined, urlFor: (file: string) => string) {
  return {
    id: job.id,
    state: job.state,
    created: job.created,
    ...(job.finished !== undefined ? { finished: job.finished } : {}),
    ...(position !== undefined ? { queue_position: position } : {}),
    progress: { step: job.step, total: job.total },
    request: job.request,
    images: job.images.map((file, i) => ({
      url: urlFor(file),
      file,
      ...(job.settings[i] !== undefined ? { seed: job.settings[i]!.seed } : {}),
    })),
    settings: job.settings,
    ...(job.error !== undefined ? { error: job.error } : {}),
  };
}

export class JobQueue extends EventEmitter {
  private readonly jobs = new Map<string, Job>();
  private readonly inputs = new Map<string, { image: Tensor<'uint8'>; mask?: Tensor<'uint8'> }>();
  private readonly queue: string[] = [];
  private running: { id: string; controller: AbortController } | undefined;
  private latestPreview: Buffer | undefined;
  private idle: Promise<void> = Promise.resolve();
  private readonly writes = new Map<string, Promise<void>>();
  private closing = false;

  constructor(
    private readonly folder: OutputFolder,
    private readonly models: ModelManager,
    private readonly previewEvery: number,
  ) {
    super();
    this.setMaxListeners(0);
  }

  /** Loads the jobs a previous run left in the output folder. */
  static async open(dir: string, models: ModelManager, previewEvery: number): Promise<JobQueue> {
    const queue = new JobQueue(await OutputFolder.open(dir), models, previewEvery);
    const jobsDir = join(dir, 'jobs');
    await mkdir(jobsDir, { recursive: true });
    for (const name of await readdir(jobsDir)) {
      if (!name.endsWith('.json')) continue;
      try {
        const job = JSON.parse(await readFile(join(jobsDir, name), 'utf8')) as Job;
        if (job.state === 'queued' || job.state === 'running') {
          // It was waiting or drawing when the server stopped: it did not finish.
          job.state = 'failed';
          job.error = 'the server stopped before this job finished';
          await queue.persist(job);
        }
        queue.jobs.set(job.id, job);
      } catch {
        // a damaged record: skip it rather than refuse to start
      }
    }
    return queue;
  }

  get(id: string): Job | undefined {
    return this.jobs.get(id);
  }

  list(): Job[] {
    return [...this.jobs.values()].sort((a, b) => b.created.localeCompare(a.created));
  }

  /** 0 for the running job, 1.. for those waiting; undefined when neither. */
  position(id: string): number | undefined {
    if (this.running?.id === id) return 0;
    const i = this.queue.indexOf(id);
    return i < 0 ? undefined : i + 1;
  }

  get current(): Job | undefined {
    return this.running !== undefined ? this.jobs.get(this.running.id) : undefined;
  }

  get preview(): Buffer | undefined {
    return this.latestPreview;
  }

  get pending(): number {
    return this.queue.length + (this.running !== undefined ? 1 : 0);
  }

  /** `id`: the job's id (default: a new UUID); `front`: run it before those waiting. */
  submit(request: JobRequest, options: { id?: string; front?: boolean } = {}): Job {
    if (this.closing) throw new Error('the server is shutting down');
    const { init_image: image, mask, ...rest } = request;
    const job: Job = {
      id: options.id ?? randomUUID(),
      state: 'queued',
      created: new Date().toISOString(),
      request: rest,
      settings: [],
      step: 0,
      total: 0,
      images: [],
    };
    this.jobs.set(job.id, job);
    if (image !== undefined)
      this.inputs.set(job.id, { image, ...(mask !== undefined ? { mask } : {}) });
    if (options.front === true) this.queue.unshift(job.id);
    else this.queue.push(job.id);
    void this.persist(job).catch(() => undefined);
    this.announce({ type: 'queued', job });
    this.idle = this.idle.then(() => this.runNext());
    return job;
  }

  /** Runs `work` between jobs (after the running one and those queued before it). */
  exclusive<T>(work: () => Promise<T>): Promise<T> {
    const result = this.idle.then(work);
    this.idle = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }

  /** Cancels a waiting job at once, or stops a running one within a step. */
  cancel(id: string): boolean {
    const job = this.jobs.get(id);
    if (job === undefined || (job.state !== 'queued' && job.state !== 'running')) return false;
    if (this.running?.id === id) {
      this.running.controller.abort();
      return true;
    }
    this.queue.splice(this.queue.indexOf(id), 1);
    this.finish(job, 'cancelled');
    return true;
  }

  /** Stops taking jobs, stops the running one and fails those waiting; resolves when idle. */
  async close(): Promise<void> {
    this.closing = true;
    for (const id of [...this.queue]) {
      const job = this.jobs.get(id)!;
      job.error = 'the server shut down before this job ran';
      this.finish(job, 'failed');
    }
    this.queue.length = 0;
    this.running?.controller.abort(new Error('the server is shutting down'));
    await this.idle;
    await Promise.all(this.writes.values());
  }

  private announce(event: JobEvent): void {
    this.emit('event', event);
    this.emit(event.job.id, event);
  }

  /** Writes a job's record; writes of one job happen in order, and `close` waits for them. */
  private persist(job: Job): Promise<void> {
    const snapshot = `${JSON.stringify(job, null, 2)}\n`;
    const path = join(this.folder.dir, 'jobs', `${job.id}.json`);
    const previous = this.writes.get(job.id) ?? Promise.resolve();
    const next = previous.then(() => writeFileAtomically(path, snapshot));
    const tracked = next.catch(() => undefined);
    this.writes.set(job.id, tracked);
    void tracked.then(() => {
      if (this.writes.get(job.id) === tracked) this.writes.delete(job.id);
    });
    return next;
  }

  private finish(job: Job, state: 'done' | 'failed' | 'cancelled'): void {
    job.state = state;
    job.finished = new Date().toISOString();
    this.inputs.delete(job.id);
    void this.persist(job).catch(() => undefined);
    this.announce({ type: state, job });
  }

  private async runNext(): Promise<void> {
    const id = this.queue.shift();
    if (id === undefined) return;
    const job = this.jobs.get(id)!;
    const controller = new AbortController();
    this.running = { id, controller };
    this.latestPreview = undefined;
    job.state = 'running';
    this.announce({ type: 'started', job });
    try {
      if (job.request.model !== undefined && job.request.model !== this.models.name)
        await this.models.use(job.request.model);
      const loras = await resolvePromptLoras(job.request.prompt, this.models.loras);
      const pipe = await this.models.pipeline(loras.specs);
      const traits = modelTraits(pipe);
      const r = job.request;
      const nextSeeds = seedCounter(r.seed, r.subseed, r.subseed_strength ?? 0);
      const batchSeed = r.batch_noise === true ? nextSeeds().seed : undefined;
      const { image, mask } = this.inputs.get(id) ?? {};
      job.settings = Array.from({ length: r.count }, () => ({
        prompt: r.prompt,
        negative_prompt: r.negative_prompt,
        ...(batchSeed !== undefined ? { seed: batchSeed, batch_noise: true } : nextSeeds()),
        ...(r.seed_resize_from !== undefined ? { seed_resize_from: r.seed_resize_from } : {}),
        steps: r.steps ?? traits.defaults.steps,
        guidance: r.guidance ?? traits.defaults.guidance,
        scheduler: r.scheduler ?? traits.folderScheduler,
        width: r.width ?? (image?.shape[2] as number | undefined) ?? traits.nativeSize,
        height: r.height ?? (image?.shape[1] as number | undefined) ?? traits.nativeSize,
        model: this.models.displayName,
        model_path: this.models.path,
        route: traits.route,
        ...(image !== undefined ? { init_image: 'uploaded', strength: r.strength ?? 0.75 } : {}),
        ...(mask !== undefined ? { mask: 'uploaded' } : {}),
        ...(r.clip_skip !== undefined ? { clip_skip: r.clip_skip } : {}),
        ...(loras.hashes !== undefined ? { lora_hashes: loras.hashes } : {}),
        ...(r.rng === 'nv' ? { rng: r.rng } : {}),
        ...((r.ensd ?? 0) !== 0 ? { ensd: r.ensd! } : {}),
      }));
      const batches: ImageSettings[][] = [];
      for (const s of job.settings) {
        const last = batches[batches.length - 1];
        if (last !== undefined && last.length < r.batch_size && sameBatch(last[0]!, s))
          last.push(s);
        else batches.push([s]);
      }
      const stepsPerBatch = traits.route === 'gan' ? 1 : job.settings[0]!.steps;
      job.total = batches.length * stepsPerBatch;
      let done = 0;
      for (const batch of batches) {
        controller.signal.throwIfAborted();
        const result = await renderBatch(pipe, traits, batch, {
          ...(image !== undefined ? { image } : {}),
          ...(mask !== undefined ? { mask } : {}),
          ...(r.timestep_spacing !== undefined ? { timestepSpacing: r.timestep_spacing } : {}),
          ...(r.prompt_syntax !== undefined ? { promptSyntax: r.prompt_syntax } : {}),
          signal: controller.signal,
          onProgress: (step, steps, latents) => {
            // The job's step moves only as it is announced: a stream that opens while a preview
            // is being made must not show a step whose event is still to come.
            const reached = done + Math.round((step / steps) * stepsPerBatch);
            const wantPreview =
              step === steps || (this.previewEvery > 0 && step % this.previewEvery === 0);
            if (!wantPreview || !(pipe instanceof StableDiffusionPipeline)) {
              job.step = reached;
              this.announce({ type: 'progress', job });
              return;
            }
            return this.previewOf(pipe, latents).then((preview) => {
              this.latestPreview = preview;
              job.step = reached;
              this.announce({ type: 'progress', job, preview });
            });
          },
        });
        done += stepsPerBatch;
        job.step = done;
        const pixels = toUint8(result.images);
        const paths = await saveBatch(this.folder, batch, pixels, { job: job.id }, r.png_text);
        job.images.push(...paths.map((p) => basename(p)));
        this.latestPreview = encodePng({
          width: batch[0]!.width,
          height: batch[0]!.height,
          channels: 3,
          data: (pixels.data as Uint8Array).subarray(0, batch[0]!.width * batch[0]!.height * 3),
        });
        this.announce({ type: 'image', job, preview: this.latestPreview });
      }
      this.finish(job, 'done');
    } catch (error) {
      if (controller.signal.aborted) {
        const reason: unknown = controller.signal.reason;
        if (reason instanceof Error && reason.message.includes('shutting down')) {
          job.error = 'the server shut down while this job ran';
          this.finish(job, 'failed');
        } else this.finish(job, 'cancelled');
      } else {
        job.error = isUserError(error)
          ? error.message
          : `internal error: ${(error as Error).message}`;
        this.finish(job, 'failed');
      }
    } finally {
      this.running = undefined;
    }
  }

  /** The first image of the batch as it stands, decoded (small models) for a live preview. */
  private async previewOf(
    pipe: StableDiffusionPipeline,
    latents: Tensor<'float32'>,
  ): Promise<Buffer> {
    const per = latents.size / latents.shape[0]!;
    const first = new Tensor('float32', [1, ...latents.shape.slice(1)], latents.data.slice(0, per));
    const image = toUint8(await pipe.decode(first, { fast: true }));
    const [, h, w] = image.shape as [number, number, number];
    return encodePng({ width: w, height: h, channels: 3, data: image.data as Uint8Array });
  }
}
