/** Element types of host tensors, named as ONNX Runtime's JavaScript API names them. */
export type DType =
  | 'float32'
  | 'float16'
  | 'bfloat16'
  | 'float64'
  | 'int64'
  | 'int32'
  | 'int16'
  | 'int8'
  | 'uint8'
  | 'bool';

/** How each dtype is stored: 16-bit floats as raw bits, bool as one byte per element. */
export interface StorageMap {
  float32: Float32Array;
  float16: Uint16Array;
  bfloat16: Uint16Array;
  float64: Float64Array;
  int64: BigInt64Array;
  int32: Int32Array;
  int16: Int16Array;
  int8: Int8Array;
  uint8: Uint8Array;
  bool: Uint8Array;
}

export type Storage = StorageMap[DType];

export const DTYPES: readonly DType[] = [
  'float32',
  'float16',
  'bfloat16',
  'float64',
  'int64',
  'int32',
  'int16',
  'int8',
  'uint8',
  'bool',
];

const BYTES: Record<DType, number> = {
  float32: 4,
  float16: 2,
  bfloat16: 2,
  float64: 8,
  int64: 8,
  int32: 4,
  int16: 2,
  int8: 1,
  uint8: 1,
  bool: 1,
};

export function bytesPerElement(dtype: DType): number {
  return BYTES[dtype];
}

export function isFloatingDType(dtype: DType): boolean {
  return dtype === 'float32' || dtype === 'float16' || dtype === 'bfloat16' || dtype === 'float64';
}

export function isDType(name: string): name is DType {
  return Object.hasOwn(BYTES, name);
}

export function allocateStorage<D extends DType>(dtype: D, length: number): StorageMap[D] {
  return storageView(dtype, new ArrayBuffer(length * BYTES[dtype]), 0, length);
}

/**
 * A typed view of `length` elements at `byteOffset` of `buffer`. The offset must be aligned to the
 * element size; callers holding unaligned bytes copy them first (see `storageFromBytes`).
 */
export function storageView<D extends DType>(
  dtype: D,
  buffer: ArrayBufferLike,
  byteOffset: number,
  length: number,
): StorageMap[D] {
  const views: { [K in DType]: () => StorageMap[K] } = {
    float32: () => new Float32Array(buffer, byteOffset, length),
    float16: () => new Uint16Array(buffer, byteOffset, length),
    bfloat16: () => new Uint16Array(buffer, byteOffset, length),
    float64: () => new Float64Array(buffer, byteOffset, length),
    int64: () => new BigInt64Array(buffer, byteOffset, length),
    int32: () => new Int32Array(buffer, byteOffset, length),
    int16: () => new Int16Array(buffer, byteOffset, length),
    int8: () => new Int8Array(buffer, byteOffset, length),
    uint8: () => new Uint8Array(buffer, byteOffset, length),
    bool: () => new Uint8Array(buffer, byteOffset, length),
  };
  return views[dtype]();
}

/** Typed storage holding a copy of little-endian `bytes` (any alignment). */
export function storageFromBytes<D extends DType>(dtype: D, bytes: Uint8Array): StorageMap[D] {
  const size = BYTES[dtype];
  if (bytes.byteLength % size !== 0) {
    throw new RangeError(`${bytes.byteLength} bytes is not a whole number of ${dtype} elements`);
  }
  const copy = new Uint8Array(bytes.byteLength);
  copy.set(bytes);
  return storageView(dtype, copy.buffer, 0, bytes.byteLength / size);
}
