import { closeSync, openSync, readSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { UserError } from '../errors.js';
import type { ExternalData, Graph, Value } from '../graph/ir.js';
import { cast } from '../graph/ops.js';
import {
  SafetensorsFile,
  tensorDTypeOf,
  writeSafetensors,
  type LazyTensor,
  type TensorInfo,
} from '../io/safetensors.js';
import { bytesPerElement, isFloatingDType, type DType } from '../tensor/dtype.js';
import { shapeSize, Tensor } from '../tensor/tensor.js';
import type { Module, ParameterSource } from './module.js';
import { quantizePerChannel, type Int8Source } from './quantize.js';

/** One stored weight: where its bytes are and what they are. */
export interface WeightRecord {
  readonly key: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** A byte range of a weight file (never copied), or a tensor in memory. */
  readonly data: ExternalData | Tensor;
}

function formatShape(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

function listSome(items: readonly string[], limit = 12): string {
  const shown = items.slice(0, limit).join('; ');
  return items.length > limit ? `${shown}; and ${items.length - limit} more` : shown;
}

/** Weights whose names do not fit a module tree: every problem at once. */
export class WeightMismatchError extends UserError {
  readonly missing: readonly string[];
  readonly unexpected: readonly string[];
  readonly misshapen: readonly string[];

  constructor(
    origin: string,
    model: string,
    missing: string[],
    unexpected: string[],
    misshapen: string[],
  ) {
    const parts: string[] = [];
    if (missing.length > 0) parts.push(`missing (${missing.length}): ${listSome(missing)}`);
    if (unexpected.length > 0)
      parts.push(`unexpected (${unexpected.length}): ${listSome(unexpected)}`);
    if (misshapen.length > 0)
      parts.push(`wrong shape (${misshapen.length}): ${listSome(misshapen)}`);
    super(
      'weights-mismatch',
      `the weights in ${origin} do not fit ${model}:\n  ${parts.join('\n  ')}\n` +
        `  (is this the right model folder, and does its config.json match its weights?)`,
    );
    this.name = 'WeightMismatchError';
    this.missing = missing;
    this.unexpected = unexpected;
    this.misshapen = misshapen;
  }
}

/** Identifies a weight file's contents for cache keys: path, size and modification time. */
export function fileFingerprint(
  path: string,
  info: { size: number; mtimeMs: number } | undefined,
): string {
  return `${path}:${info?.size ?? 0}:${info?.mtimeMs ?? 0}`;
}

/** A set of named weights, read from the headers of weight files or given as host tensors. */
export class WeightSet {
  readonly records: ReadonlyMap<string, WeightRecord>;
  /** What the weights came from, for messages and cache keys. */
  readonly origin: string;
  private readonly fingerprintText: string;

  private constructor(
    records: ReadonlyMap<string, WeightRecord>,
    origin: string,
    fingerprint: string,
  ) {
    this.records = records;
    this.origin = origin;
    this.fingerprintText = fingerprint;
  }

  /** Reads the headers of .safetensors files (tensor bytes stay on disk). */
  static async fromFiles(paths: string | readonly string[]): Promise<WeightSet> {
    const list = typeof paths === 'string' ? [paths] : paths;
    const records = new Map<string, WeightRecord>();
    const prints: string[] = [];
    for (const p of list) {
      const path = resolve(p);
      const info = await stat(path).catch(() => undefined);
      await SafetensorsFile.with(path, async (file) => {
        for (const t of file.tensors.values()) {
          const dtype = WeightSet.dtypeOf(t, path);
          if (records.has(t.name)) {
            throw new UserError(
              'duplicate-weight',
              `weight '${t.name}' appears in more than one file (${path})`,
            );
          }
          records.set(t.name, {
            key: t.name,
            dtype,
            shape: t.shape,
            data: { path, offset: t.byteOffset, length: t.byteLength },
          });
        }
      });
      prints.push(fileFingerprint(path, info));
    }
    return new WeightSet(records, list.join(', '), prints.join('|'));
  }

  /** The dtype gesso computes a stored tensor in, or a clear error for dtypes it cannot. */
  static dtypeOf(t: TensorInfo, path: string): DType {
    const dtype = tensorDTypeOf(t.dtype);
    if (dtype === undefined) {
      throw new UserError(
        'unsupported-dtype',
        `${path}: weight '${t.name}' has dtype ${t.dtype}, which gesso cannot compute with`,
      );
    }
    return dtype;
  }

  /** Records assembled elsewhere (a single-file checkpoint's components, renamed and split). */
  static fromRecords(
    records: Iterable<WeightRecord>,
    origin: string,
    fingerprint: string,
  ): WeightSet {
    const map = new Map<string, WeightRecord>();
    for (const r of records) {
      if (map.has(r.key))
        throw new UserError('duplicate-weight', `weight '${r.key}' appears twice in ${origin}`);
      map.set(r.key, r);
    }
    return new WeightSet(map, origin, fingerprint);
  }

  static fromTensors(tensors: Readonly<Record<string, Tensor>>, origin = 'memory'): WeightSet {
    const records = new Map<string, WeightRecord>();
    for (const [key, t] of Object.entries(tensors))
      records.set(key, { key, dtype: t.dtype, shape: t.shape, data: t });
    return new WeightSet(records, origin, `memory:${Math.random()}`);
  }

  /** Identifies the weights for cache keys: file paths, sizes and modification times. */
  get fingerprint(): string {
    return this.fingerprintText;
  }

  /**
   * Bytes the weights take once loaded for float32 compute: every floating-point weight at four
   * bytes whatever its file stores, the rest at their own size.
   */
  get computeBytes(): number {
    let bytes = 0;
    for (const r of this.records.values()) {
      const count = shapeSize(r.shape);
      bytes += count * (isFloatingDType(r.dtype) ? 4 : bytesPerElement(r.dtype));
    }
    return bytes;
  }

  has(key: string): boolean {
    return this.records.has(key);
  }

  get(key: string): WeightRecord | undefined {
    return this.records.get(key);
  }

  /** These weights with some replaced by host tensors (merged LoRAs, conversions). */
  withTensors(tensors: Readonly<Record<string, Tensor>>, tag: string): WeightSet {
    const out = new Map(this.records);
    for (const [key, t] of Object.entries(tensors))
      out.set(key, { key, dtype: t.dtype, shape: t.shape, data: t });
    return new WeightSet(out, this.origin, `${this.fingerprintText}|${tag}`);
  }

  /**
   * The same weights with every half-precision tensor of a weight file read from a float32 copy at
   * `path` instead, written there once (atomically) and reused while it still holds them all.
   * ORT's CPU kernels compute in float32, so a graph over fp16 files casts every weight; ORT folds
   * those casts into float32 copies when it loads the graph, and holds the fp16 tensors and the
   * copies at once (SDXL's fp16 UNet: 18.8 GiB against 12.0 from float32 files, BENCHMARKS.md).
   */
  async widened(path: string): Promise<WeightSet> {
    const half = [...this.records.values()].filter(
      (r) => !(r.data instanceof Tensor) && (r.dtype === 'float16' || r.dtype === 'bfloat16'),
    );
    if (half.length === 0) return this;
    const find = async (): Promise<Map<string, TensorInfo> | undefined> => {
      try {
        return await SafetensorsFile.with(path, async (file) => {
          const found = new Map<string, TensorInfo>();
          for (const r of half) {
            const info = file.has(r.key) ? file.info(r.key) : undefined;
            if (
              info?.dtype !== 'F32' ||
              info.shape.length !== r.shape.length ||
              info.shape.some((d, i) => d !== r.shape[i])
            )
              return undefined;
            found.set(r.key, info);
          }
          return found;
        });
      } catch {
        return undefined; // absent or damaged: written again below
      }
    };
    let copies = await find();
    if (copies === undefined) {
      const entries: Record<string, LazyTensor> = {};
      for (const r of half) {
        entries[r.key] = {
          dtype: 'float32',
          shape: r.shape,
          bytes: () => new Tensor('float32', r.shape, readFloat32(r)).bytes(),
        };
      }
      try {
        await writeSafetensors(path, entries);
      } catch (error) {
        const bytes = half.reduce((n, r) => n + 4 * shapeSize(r.shape), 0);
        throw new UserError(
          'weight-copy-failed',
          `could not write the float32 copy of ${this.origin}'s half-precision weights (${(bytes / 1e9).toFixed(2)} GB) to ${path}: ${(error as Error).message}; free that space, point GESSO_CACHE_DIR at a disk with room, or use float32 weight files`,
          { cause: error },
        );
      }
      copies = await find();
      if (copies === undefined) throw new Error(`${path} does not hold the weights just written`);
    }
    const out = new Map(this.records);
    for (const r of half) {
      const info = copies.get(r.key)!;
      out.set(r.key, {
        ...r,
        dtype: 'float32',
        data: { path, offset: info.byteOffset, length: info.byteLength },
      });
    }
    return new WeightSet(out, this.origin, `${this.fingerprintText}|float32`);
  }

  /** The same weights under new names; keys mapped to undefined are dropped. */
  rename(map: (key: string) => string | undefined): WeightSet {
    const out = new Map<string, WeightRecord>();
    for (const [key, record] of this.records) {
      const renamed = map(key);
      if (renamed !== undefined) out.set(renamed, { ...record, key: renamed });
    }
    return new WeightSet(out, this.origin, this.fingerprintText);
  }

  /**
   * Checks that these weights are exactly the module's parameters (same names, same shapes) and
   * throws one WeightMismatchError naming every missing, unexpected and mis-shaped weight.
   * `ignoreUnexpected` accepts known extras (such as buffers some exporters save).
   */
  bind(
    module: Module,
    options: { ignoreUnexpected?: (key: string) => boolean } = {},
  ): BoundWeights {
    const expected = module.namedParameters();
    const missing: string[] = [];
    const misshapen: string[] = [];
    for (const [key, shape] of expected) {
      const record = this.records.get(key);
      if (record === undefined) missing.push(`${key} ${formatShape(shape)}`);
      else if (
        record.shape.length !== shape.length ||
        record.shape.some((d, i) => d !== shape[i])
      ) {
        misshapen.push(
          `${key} is ${formatShape(record.shape)} in the file, the model expects ${formatShape(shape)}`,
        );
      }
    }
    const unexpected = [...this.records.keys()].filter(
      (key) => !expected.has(key) && options.ignoreUnexpected?.(key) !== true,
    );
    if (missing.length > 0 || unexpected.length > 0 || misshapen.length > 0) {
      throw new WeightMismatchError(
        this.origin,
        module.constructor.name,
        missing,
        unexpected,
        misshapen,
      );
    }
    return new BoundWeights(this);
  }
}

/**
 * Which layers of a graph run in int8: `scales` holds each quantized convolution's calibrated
 * output scale; `observe` (calibration) records every convolution's output instead.
 */
export interface Int8Plan {
  readonly scales: ReadonlyMap<string, number>;
  /** Layers kept in float (the first and last convolutions, by convention). */
  readonly keepFloat: (layer: string) => boolean;
  /** The largest weight magnitude in int8 (127, or 63 where 8 bits would saturate). */
  readonly weightLimit: number;
  readonly observe?: (layer: string, y: Value) => void;
}

/** A stored weight's values as float32, read now (quantization needs them at build time). */
function readFloat32(record: WeightRecord): Float32Array {
  if (record.data instanceof Tensor) return record.data.toFloat32().data;
  const { path, offset, length } = record.data;
  const bytes = Buffer.alloc(length);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, bytes, 0, length, offset);
  } finally {
    closeSync(fd);
  }
  return Tensor.fromBytes(record.dtype, record.shape, bytes).toFloat32().data;
}

/** Weights checked against a module tree, ready to become graph initializers. */
export class BoundWeights {
  readonly weights: WeightSet;

  constructor(weights: WeightSet) {
    this.weights = weights;
  }

  private int8Source(graph: Graph, plan: Int8Plan): Int8Source {
    const weights = this.weights;
    return {
      weight(layer, kind) {
        if (plan.keepFloat(layer) || plan.observe !== undefined) return undefined;
        const record = weights.get(`${layer}.weight`);
        if (record === undefined) return undefined;
        const q = quantizePerChannel(
          readFloat32(record),
          record.shape,
          kind === 'linear',
          plan.weightLimit,
        );
        return {
          weight: graph.initializer(
            `${layer}.weight_int8`,
            'int8',
            q.shape,
            new Tensor('int8', q.shape, q.values),
          ),
          scale: graph.initializer(
            `${layer}.weight_scale`,
            'float32',
            [q.scales.length],
            new Tensor('float32', [q.scales.length], q.scales),
          ),
          channels: record.shape[0]!,
        };
      },
      outputScale: (layer) => (plan.keepFloat(layer) ? undefined : plan.scales.get(layer)),
      ...(plan.observe !== undefined ? { observe: plan.observe } : {}),
    };
  }

  /**
   * A parameter source for one graph: each parameter becomes an initializer named by its key,
   * pointing into its file in place, cast in the graph when the file's dtype is not `compute`.
   */
  parameters(graph: Graph, compute: DType = 'float32', int8?: Int8Plan): ParameterSource {
    const values = new Map<string, Value>();
    const weights = this.weights;
    return {
      graph,
      ...(int8 !== undefined ? { int8: this.int8Source(graph, int8) } : {}),
      parameter(key: string): Value {
        let value = values.get(key);
        if (value === undefined) {
          const record = weights.get(key);
          if (record === undefined)
            throw new Error(`no weight '${key}' (bind() should have caught this)`);
          const stored = graph.initializer(key, record.dtype, record.shape, record.data);
          value = graph.scope(key, () => cast(stored, compute));
          values.set(key, value);
        }
        return value;
      },
    };
  }
}
