import { Worker } from 'node:worker_threads';
import type ort from 'onnxruntime-node';

/**
 * ONNX Runtime on a worker thread. onnxruntime-node loads and runs graphs synchronously on the
 * thread that calls it (its promises resolve after the work, not during it), so a server calling
 * it directly answers nothing while a model loads or a UNet step runs. Sessions opened here live
 * on one worker thread shared by the process; each run copies its inputs there and moves its
 * outputs back.
 */

/** A tensor as it crosses threads: ORT's type name, dimensions and elements. */
export interface WireTensor {
  readonly dtype: string;
  readonly shape: readonly number[];
  readonly data:
    | Float32Array
    | Float64Array
    | Uint16Array
    | BigInt64Array
    | Int32Array
    | Int16Array
    | Int8Array
    | Uint8Array;
}

export type ThreadRequest = { readonly id: number } & (
  | {
      readonly kind: 'create';
      /** The serialized graph, or the path of an .onnx file. */
      readonly model: Uint8Array | string;
      readonly options: ort.InferenceSession.SessionOptions;
    }
  | {
      readonly kind: 'run';
      readonly session: number;
      readonly feeds: Readonly<Record<string, WireTensor>>;
      readonly outputs: readonly string[] | undefined;
    }
  | { readonly kind: 'release'; readonly session: number }
);

export type ThreadReply =
  | { readonly id: number; readonly ok: true; readonly value: unknown }
  | { readonly id: number; readonly ok: false; readonly message: string };

type RequestBody = ThreadRequest extends infer R
  ? R extends unknown
    ? Omit<R, 'id'>
    : never
  : never;

interface Pending {
  readonly resolve: (value: unknown) => void;
  readonly reject: (error: Error) => void;
}

/**
 * The worker inherits this process's Node options (memory limits, loaders) except those that
 * describe the main script's source (`node -e`, `--input-type`), which Node refuses for a file.
 */
function workerExecArgv(): string[] {
  const kept: string[] = [];
  const args = process.execArgv;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (['-e', '--eval', '-p', '--print'].includes(arg)) i++;
    else if (!/^(--eval|--print|--input-type)(=|$)/.test(arg)) kept.push(arg);
  }
  return kept;
}

/** The process's ONNX Runtime thread: started on first use, not keeping the process alive idle. */
class OrtThread {
  private worker: Worker | undefined;
  /** Counts worker starts, so a session knows whether the worker that holds it still runs. */
  private generation = 0;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();

  private start(): Worker {
    const worker = new Worker(new URL('./ort-thread-worker.js', import.meta.url), {
      execArgv: workerExecArgv(),
    });
    this.generation++;
    const fail = (error: Error) => {
      if (this.worker !== worker) return;
      this.worker = undefined;
      for (const { reject } of this.pending.values()) reject(error);
      this.pending.clear();
    };
    worker.on('message', (reply: ThreadReply) => {
      const waiting = this.pending.get(reply.id);
      if (waiting === undefined) return;
      this.pending.delete(reply.id);
      if (this.pending.size === 0) worker.unref();
      if (reply.ok) waiting.resolve(reply.value);
      else waiting.reject(new Error(reply.message));
    });
    worker.on('error', (error) =>
      fail(new Error(`ONNX Runtime's thread failed: ${error.message}`, { cause: error })),
    );
    worker.on('exit', (code) =>
      fail(new Error(`ONNX Runtime's thread stopped (exit code ${code})`)),
    );
    worker.unref();
    this.worker = worker;
    return worker;
  }

  /** The current worker's generation (starting it if needed). */
  current(): number {
    this.worker ??= this.start();
    return this.generation;
  }

  request(body: RequestBody, generation?: number): Promise<unknown> {
    if (generation !== undefined && (this.worker === undefined || generation !== this.generation)) {
      return Promise.reject(
        new Error("this session's ONNX Runtime thread has stopped; load the model again"),
      );
    }
    const worker = (this.worker ??= this.start());
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.ref();
      worker.postMessage({ ...body, id } as ThreadRequest);
    });
  }
}

const thread = new OrtThread();

/** A session held by the ONNX Runtime thread. */
export class ThreadSession {
  private constructor(
    private readonly id: number,
    private readonly generation: number,
    readonly inputNames: readonly string[],
    readonly outputNames: readonly string[],
  ) {}

  static async create(
    model: Uint8Array | string,
    options: ort.InferenceSession.SessionOptions,
  ): Promise<ThreadSession> {
    const generation = thread.current();
    const created = (await thread.request({ kind: 'create', model, options }, generation)) as {
      session: number;
      inputNames: string[];
      outputNames: string[];
    };
    return new ThreadSession(created.session, generation, created.inputNames, created.outputNames);
  }

  async run(
    feeds: Readonly<Record<string, WireTensor>>,
    outputs?: readonly string[],
  ): Promise<Record<string, WireTensor>> {
    const reply = await thread.request(
      { kind: 'run', session: this.id, feeds, outputs },
      this.generation,
    );
    return reply as Record<string, WireTensor>;
  }

  async release(): Promise<void> {
    await thread.request({ kind: 'release', session: this.id }, this.generation).catch(() => {
      // The thread that held it is gone, and the session with it.
    });
  }
}
