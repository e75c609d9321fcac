import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdir, readFile, rename, rm } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import ort from 'onnxruntime-node';
import { UserError } from '../errors.js';
import { writeFileAtomically } from '../io/atomic.js';
import { defaultComputeThreads, processorIdentity } from './cpu.js';
import { ThreadSession, type WireTensor } from './ort-thread.js';
import type { DType } from '../tensor/dtype.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * The one place gesso touches ONNX Runtime: sessions from serialized graphs, execution providers,
 * threads, and the on-disk cache of emitted and ORT-optimized graphs.
 */

export type ExecutionProvider = 'cpu' | 'cuda' | 'coreml' | 'dml' | 'webgpu';
export type GraphOptimization = 'disabled' | 'basic' | 'extended' | 'all';

export interface RuntimeOptions {
  /** Where the graph runs. Default 'cpu'. */
  readonly executionProvider?: ExecutionProvider;
  /** Threads inside one op (ORT's intra-op pool). Default: one per physical core (see cpu.ts). */
  readonly threads?: number;
  readonly interOpThreads?: number;
  readonly graphOptimization?: GraphOptimization;
  readonly memoryArena?: boolean;
  /** Folder for cached graphs; false turns the cache off. Default: see `defaultCacheDir`. */
  readonly cacheDir?: string | false;
  /**
   * Also cache ORT's optimized graph (a converted copy of the weights; big for big models). Off
   * unless asked; the pipelines' components ask for it for models from 256 MiB to a quarter of
   * the memory.
   */
  readonly cacheOptimized?: boolean;
  /**
   * Load and run graphs on a worker thread (one per process) instead of this one, so this
   * thread's event loop keeps running meanwhile (a server answering requests during a step).
   * Each run copies its inputs to that thread. Default false.
   */
  readonly offThread?: boolean;
}

/** A serialized ONNX model and the folder its external-data locations are relative to. */
export interface OnnxModel {
  readonly bytes: Uint8Array;
  readonly externalDataFolder: string | undefined;
}

/** A graph to run: a cache key naming what shaped it, and how to emit it on a cache miss. */
export interface GraphSource {
  /** Everything the graph depends on (model files, config, build options); undefined: never cache. */
  readonly key: string | undefined;
  readonly emit: () => OnnxModel | Promise<OnnxModel>;
}

/** Bump when the emitted graphs change, so older cache entries are not used. */
const GRAPH_FORMAT = 1;

let fingerprint: string | undefined;

/**
 * A hash of the code that emits graphs (every compiled module of this package), part of every
 * cache key: a cached graph is only reused by the same code that emitted it, so changing a model
 * or an autodiff rule can never run a stale graph.
 */
export function codeFingerprint(): string {
  if (fingerprint === undefined) {
    const root = fileURLToPath(new URL('..', import.meta.url));
    const hash = createHash('sha256');
    const files = readdirSync(root, { recursive: true, withFileTypes: true })
      .filter((e) => e.isFile() && e.name.endsWith('.js'))
      .map((e) => join(e.parentPath, e.name))
      .sort();
    for (const file of files) hash.update(file.slice(root.length)).update(readFileSync(file));
    fingerprint = hash.digest('hex').slice(0, 16);
  }
  return fingerprint;
}

export function defaultCacheDir(): string {
  const env = process.env.GESSO_CACHE_DIR;
  if (env !== undefined && env !== '') return env;
  const xdg = process.env.XDG_CACHE_HOME;
  return join(xdg !== undefined && xdg !== '' ? xdg : join(homedir(), '.cache'), 'gesso');
}

const ORT_TYPES: Readonly<Record<string, DType>> = {
  float32: 'float32',
  float16: 'float16',
  float64: 'float64',
  int64: 'int64',
  int32: 'int32',
  int16: 'int16',
  int8: 'int8',
  uint8: 'uint8',
  bool: 'bool',
};

function feedType(t: Tensor): ort.Tensor.Type {
  if (t.dtype === 'bfloat16') {
    throw new Error('ONNX Runtime for JavaScript has no bfloat16 tensors; cast to float32 first');
  }
  return t.dtype;
}

function toOrt(t: Tensor): ort.Tensor {
  return new ort.Tensor(feedType(t), t.data as ort.Tensor.DataType, [...t.shape]);
}

function fromOrt(t: {
  readonly type: string;
  readonly dims: readonly number[];
  readonly data: unknown;
}): Tensor {
  const dtype = ORT_TYPES[t.type];
  if (dtype === undefined) throw new Error(`unsupported ONNX Runtime output type ${t.type}`);
  return new Tensor(dtype, t.dims, t.data as Tensor['data']);
}

/** What a Session runs on: an ONNX Runtime session here or on the runtime thread. */
interface Engine {
  readonly inputNames: readonly string[];
  readonly outputNames: readonly string[];
  run(
    feeds: Readonly<Record<string, Tensor>>,
    outputs: readonly string[] | undefined,
  ): Promise<Record<string, Tensor>>;
  release(): Promise<void>;
}

function sameThreadEngine(session: ort.InferenceSession): Engine {
  return {
    inputNames: session.inputNames,
    outputNames: session.outputNames,
    async run(feeds, outputs) {
      const ortFeeds: Record<string, ort.Tensor> = {};
      for (const [name, t] of Object.entries(feeds)) ortFeeds[name] = toOrt(t);
      const results =
        outputs === undefined
          ? await session.run(ortFeeds)
          : await session.run(ortFeeds, [...outputs]);
      const out: Record<string, Tensor> = {};
      for (const [name, t] of Object.entries(results)) out[name] = fromOrt(t);
      return out;
    },
    release: () => session.release(),
  };
}

function threadEngine(session: ThreadSession): Engine {
  return {
    inputNames: session.inputNames,
    outputNames: session.outputNames,
    async run(feeds, outputs) {
      const wire: Record<string, WireTensor> = {};
      for (const [name, t] of Object.entries(feeds)) {
        // Posting a view copies the whole buffer under it; a view of part of one goes alone.
        const data = t.data.byteLength === t.data.buffer.byteLength ? t.data : t.data.slice();
        wire[name] = { dtype: feedType(t), shape: t.shape, data };
      }
      const results = await session.run(wire, outputs);
      const out: Record<string, Tensor> = {};
      for (const [name, t] of Object.entries(results)) {
        out[name] = fromOrt({ type: t.dtype, dims: t.shape, data: t.data });
      }
      return out;
    },
    release: () => session.release(),
  };
}

function providerList(ep: ExecutionProvider): string[] {
  if (ep === 'cpu') return ['cpu'];
  const available = ort.listSupportedBackends().map((b) => b.name);
  const platformHas: Record<ExecutionProvider, boolean> = {
    cpu: true,
    cuda: available.includes('cuda'),
    webgpu: available.includes('webgpu'),
    coreml: process.platform === 'darwin',
    dml: process.platform === 'win32',
  };
  if (!platformHas[ep]) {
    const usable = (['cpu', 'cuda', 'coreml', 'dml', 'webgpu'] as const).filter(
      (p) => platformHas[p],
    );
    throw new UserError(
      'execution-provider-unavailable',
      `execution provider '${ep}' is not available on ${process.platform}-${process.arch}; use one of: ${usable.join(', ')}`,
    );
  }
  return [ep, 'cpu'];
}

function sessionOptions(options: RuntimeOptions): ort.InferenceSession.SessionOptions {
  const ep = options.executionProvider ?? 'cpu';
  return {
    executionProviders: providerList(ep),
    graphOptimizationLevel: options.graphOptimization ?? 'all',
    intraOpNumThreads: options.threads ?? defaultComputeThreads(),
    ...(options.interOpThreads !== undefined ? { interOpNumThreads: options.interOpThreads } : {}),
    ...(options.memoryArena !== undefined ? { enableCpuMemArena: options.memoryArena } : {}),
    logSeverityLevel: 3,
  };
}

function hash(text: string): string {
  return createHash('sha256').update(text).digest('hex').slice(0, 32);
}

/** Where the cache keeps what `key` names: `<root>/<folder>/<hash of key><suffix>`. */
export function cacheEntry(
  root: string | undefined,
  folder: string,
  key: string,
  suffix = '',
): string {
  return join(root ?? defaultCacheDir(), folder, `${hash(key)}${suffix}`);
}

/** A loaded graph, ready to run. */
export class Session {
  private constructor(
    private readonly engine: Engine,
    /** Where the session came from: 'emitted', 'cache' or 'optimized-cache'. */
    readonly origin: 'emitted' | 'cache' | 'optimized-cache',
  ) {}

  get inputNames(): readonly string[] {
    return this.engine.inputNames;
  }

  get outputNames(): readonly string[] {
    return this.engine.outputNames;
  }

  run(
    feeds: Readonly<Record<string, Tensor>>,
    outputs?: readonly string[],
  ): Promise<Record<string, Tensor>> {
    return this.engine.run(feeds, outputs);
  }

  async release(): Promise<void> {
    await this.engine.release();
  }

  /**
   * Creates a session for `source`. With a key and a cache folder, the emitted graph is stored
   * (and with `cacheOptimized`, ORT's optimized graph too) so the next load skips that work.
   */
  static async create(source: GraphSource, options: RuntimeOptions = {}): Promise<Session> {
    const base = sessionOptions(options);
    const offThread = options.offThread === true;
    const cacheRoot =
      options.cacheDir === false ? undefined : (options.cacheDir ?? defaultCacheDir());
    const entry =
      cacheRoot !== undefined && source.key !== undefined
        ? cacheEntry(
            cacheRoot,
            'graphs',
            JSON.stringify({
              key: source.key,
              format: GRAPH_FORMAT,
              code: codeFingerprint(),
              ort: ort.env.versions.common,
            }),
          )
        : undefined;

    const optimizedDir =
      entry !== undefined && options.cacheOptimized === true
        ? join(
            entry,
            `optimized-${hash(
              JSON.stringify({
                ep: base.executionProviders,
                level: base.graphOptimizationLevel,
                cpu: processorIdentity(),
                arch: process.arch,
              }),
            )}`,
          )
        : undefined;
    if (optimizedDir !== undefined && existsSync(join(optimizedDir, 'model.onnx'))) {
      try {
        const engine = await openEngine(
          join(optimizedDir, 'model.onnx'),
          {
            ...base,
            graphOptimizationLevel: 'disabled',
          },
          offThread,
        );
        return new Session(engine, 'optimized-cache');
      } catch {
        await rm(optimizedDir, { recursive: true, force: true });
      }
    }

    const { model, origin } = await loadOrEmit(source, entry);
    const session: Record<string, string> = {};
    if (model.externalDataFolder !== undefined)
      session.model_external_initializers_file_folder_path = model.externalDataFolder;

    if (optimizedDir !== undefined) {
      // ORT writes the optimized graph itself; it goes to a private folder renamed into place after.
      const staging = `${optimizedDir}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
      await mkdir(staging, { recursive: true });
      try {
        const engine = await createOrt(model.bytes, offThread, {
          ...base,
          optimizedModelFilePath: join(staging, 'model.onnx'),
          extra: {
            session: {
              ...session,
              optimized_model_external_initializers_file_name: 'weights.bin',
              optimized_model_external_initializers_min_size_in_bytes: '1024',
            },
          },
        });
        await rename(staging, optimizedDir).catch(() =>
          rm(staging, { recursive: true, force: true }),
        );
        return new Session(engine, origin);
      } catch (error) {
        await rm(staging, { recursive: true, force: true });
        throw error;
      }
    }
    try {
      const engine = await createOrt(model.bytes, offThread, { ...base, extra: { session } });
      return new Session(engine, origin);
    } catch (error) {
      if (origin !== 'cache' || entry === undefined) throw error;
      // A damaged cache entry: drop it and build the graph again.
      await rm(entry, { recursive: true, force: true });
      return Session.create(source, options);
    }
  }
}

async function openEngine(
  model: Uint8Array | string,
  options: ort.InferenceSession.SessionOptions,
  offThread: boolean,
): Promise<Engine> {
  if (offThread) return threadEngine(await ThreadSession.create(model, options));
  const session =
    typeof model === 'string'
      ? await ort.InferenceSession.create(model, options)
      : await ort.InferenceSession.create(model, options);
  return sameThreadEngine(session);
}

async function createOrt(
  bytes: Uint8Array,
  offThread: boolean,
  options: ort.InferenceSession.SessionOptions,
): Promise<Engine> {
  try {
    return await openEngine(bytes, options, offThread);
  } catch (error) {
    const providers = options.executionProviders ?? [];
    if (providers.length > 1) {
      throw new UserError(
        'execution-provider-failed',
        `ONNX Runtime could not start execution provider '${String(providers[0])}': ${(error as Error).message}`,
        { cause: error },
      );
    }
    throw error;
  }
}

async function loadOrEmit(
  source: GraphSource,
  entry: string | undefined,
): Promise<{ model: OnnxModel; origin: 'emitted' | 'cache' }> {
  if (entry !== undefined) {
    try {
      const meta = JSON.parse(await readFile(join(entry, 'meta.json'), 'utf8')) as {
        externalDataFolder?: string;
        key?: string;
      };
      if (meta.key === source.key) {
        const bytes = await readFile(join(entry, 'model.onnx'));
        return { model: { bytes, externalDataFolder: meta.externalDataFolder }, origin: 'cache' };
      }
    } catch {
      // Missing or unreadable entry: emit afresh below.
    }
  }
  const model = await source.emit();
  if (entry !== undefined) {
    await mkdir(entry, { recursive: true });
    await writeFileAtomically(join(entry, 'model.onnx'), model.bytes);
    // meta.json last: an entry counts only once its graph is complete.
    await writeFileAtomically(
      join(entry, 'meta.json'),
      JSON.stringify({
        key: source.key,
        externalDataFolder: model.externalDataFolder,
        created: new Date().toISOString(),
      }),
    );
  }
  return { model, origin: 'emitted' };
}

export const onnxRuntimeVersion: string = ort.env.versions.common;

/** Runs a model once without caching: for tests and one-off graphs. */
export async function runOnce(
  model: OnnxModel,
  feeds: Readonly<Record<string, Tensor>>,
  options: RuntimeOptions = {},
): Promise<Record<string, Tensor>> {
  const session = await Session.create(
    { key: undefined, emit: () => model },
    { ...options, cacheDir: false },
  );
  try {
    return await session.run(feeds);
  } finally {
    await session.release();
  }
}
