import {
  allocateStorage,
  bytesPerElement,
  type DType,
  type StorageMap,
  storageFromBytes,
} from './dtype.js';
import {
  bfloat16ArrayToFloat32,
  float16ArrayToFloat32,
  float32ArrayToBfloat16,
  float32ArrayToFloat16,
} from './half.js';

export function shapeSize(shape: readonly number[]): number {
  let size = 1;
  for (const d of shape) size *= d;
  return size;
}

export function shapeToString(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

function checkShape(shape: readonly number[]): void {
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new RangeError(`invalid tensor shape ${shapeToString(shape)}`);
    }
  }
}

/** A dense, row-major, host-side tensor. Data is owned by the tensor unless made by `view`. */
export class Tensor<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly data: StorageMap[D];

  constructor(dtype: D, shape: readonly number[], data?: StorageMap[D]) {
    checkShape(shape);
    const size = shapeSize(shape);
    if (data !== undefined && data.length !== size) {
      throw new RangeError(
        `${dtype} tensor of shape ${shapeToString(shape)} needs ${size} elements, got ${data.length}`,
      );
    }
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.data = data ?? allocateStorage(dtype, size);
  }

  static zeros<D extends DType>(dtype: D, shape: readonly number[]): Tensor<D> {
    return new Tensor(dtype, shape);
  }

  static float32(shape: readonly number[], values?: ArrayLike<number>): Tensor<'float32'> {
    return new Tensor(
      'float32',
      shape,
      values === undefined ? undefined : Float32Array.from(values),
    );
  }

  static int64(shape: readonly number[], values: ArrayLike<number | bigint>): Tensor<'int64'> {
    return new Tensor(
      'int64',
      shape,
      BigInt64Array.from(values, (v) => BigInt(v)),
    );
  }

  static full(shape: readonly number[], value: number): Tensor<'float32'> {
    return new Tensor('float32', shape, new Float32Array(shapeSize(shape)).fill(value));
  }

  /** A tensor holding a copy of little-endian raw bytes. */
  static fromBytes<D extends DType>(
    dtype: D,
    shape: readonly number[],
    bytes: Uint8Array,
  ): Tensor<D> {
    checkShape(shape);
    const expected = shapeSize(shape) * bytesPerElement(dtype);
    if (bytes.byteLength !== expected) {
      throw new RangeError(
        `${dtype} tensor of shape ${shapeToString(shape)} needs ${expected} bytes, got ${bytes.byteLength}`,
      );
    }
    return new Tensor(dtype, shape, storageFromBytes(dtype, bytes));
  }

  get size(): number {
    return this.data.length;
  }

  get rank(): number {
    return this.shape.length;
  }

  /** The raw little-endian bytes, sharing memory with the tensor. */
  bytes(): Uint8Array {
    return new Uint8Array(this.data.buffer, this.data.byteOffset, this.data.byteLength);
  }

  /** Same data, new shape; one dimension may be -1 and is then inferred. */
  reshape(shape: readonly number[]): Tensor<D> {
    const inferred = [...shape];
    const unknown = inferred.indexOf(-1);
    if (unknown >= 0) {
      const known = shapeSize(inferred.filter((_, i) => i !== unknown));
      if (known === 0 || this.size % known !== 0) {
        throw new RangeError(
          `cannot reshape ${shapeToString(this.shape)} to ${shapeToString(shape)}`,
        );
      }
      inferred[unknown] = this.size / known;
    }
    if (shapeSize(inferred) !== this.size) {
      throw new RangeError(
        `cannot reshape ${shapeToString(this.shape)} to ${shapeToString(shape)}`,
      );
    }
    return new Tensor(this.dtype, inferred, this.data);
  }

  clone(): Tensor<D> {
    return new Tensor(this.dtype, this.shape, this.data.slice() as StorageMap[D]);
  }

  /** Values as float32. 16-bit floats convert exactly; int64 beyond 2^24 rounds as float32 does. */
  toFloat32(): Tensor<'float32'> {
    return new Tensor('float32', this.shape, toFloat32Array(this));
  }

  /** A copy converted to `dtype` (floats round to nearest even; to integers truncates toward zero). */
  to<T extends DType>(dtype: T): Tensor<T> {
    if ((dtype as DType) === this.dtype) return this.clone() as unknown as Tensor<T>;
    const values = toFloat64Array(this);
    return new Tensor(dtype, this.shape, fromFloat64Array(dtype, values));
  }

  /** Element values as plain numbers (for tests and small tensors). */
  toArray(): number[] {
    return Array.from(toFloat64Array(this));
  }
}

function toFloat32Array(t: Tensor): Float32Array {
  switch (t.dtype) {
    case 'float32':
      return (t.data as Float32Array).slice();
    case 'float16':
      return float16ArrayToFloat32(t.data as Uint16Array);
    case 'bfloat16':
      return bfloat16ArrayToFloat32(t.data as Uint16Array);
    default:
      return Float32Array.from(toFloat64Array(t));
  }
}

function toFloat64Array(t: Tensor): Float64Array {
  switch (t.dtype) {
    case 'float16':
      return Float64Array.from(float16ArrayToFloat32(t.data as Uint16Array));
    case 'bfloat16':
      return Float64Array.from(bfloat16ArrayToFloat32(t.data as Uint16Array));
    case 'int64': {
      const src = t.data as BigInt64Array;
      const out = new Float64Array(src.length);
      for (let i = 0; i < src.length; i++) out[i] = Number(src[i]!);
      return out;
    }
    default:
      return Float64Array.from(t.data as Exclude<StorageMap[DType], BigInt64Array>);
  }
}

function fromFloat64Array<T extends DType>(dtype: T, values: Float64Array): StorageMap[T] {
  const out = allocateStorage(dtype, values.length);
  switch (dtype) {
    case 'float16':
      out.set(float32ArrayToFloat16(Float32Array.from(values)) as never);
      break;
    case 'bfloat16':
      out.set(float32ArrayToBfloat16(Float32Array.from(values)) as never);
      break;
    case 'int64': {
      const dst = out as BigInt64Array;
      for (let i = 0; i < values.length; i++) dst[i] = BigInt(Math.trunc(values[i]!));
      break;
    }
    case 'bool': {
      const dst = out as Uint8Array;
      for (let i = 0; i < values.length; i++) dst[i] = values[i] !== 0 ? 1 : 0;
      break;
    }
    default: {
      const dst = out as Exclude<StorageMap[DType], BigInt64Array>;
      for (let i = 0; i < values.length; i++) dst[i] = values[i]!;
    }
  }
  return out;
}
