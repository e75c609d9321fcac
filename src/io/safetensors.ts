import { open, stat, type FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { UserError } from '../errors.js';
import type { DType } from '../tensor/dtype.js';
import { Tensor } from '../tensor/tensor.js';
import { writeAtomically } from './atomic.js';

/**
 * The safetensors format: 8 bytes of little-endian header length N, N bytes of JSON mapping tensor
 * names to `{dtype, shape, data_offsets: [begin, end]}` (plus an optional `__metadata__` map of
 * strings), then the data section, every tensor's raw little-endian bytes, back to back.
 * Files are read lazily: only the header is read on open, tensor bytes on request, so files of
 * any size open in constant memory.
 */

export const MAX_HEADER_BYTES = 100_000_000;

/** Element types as safetensors names them, with their size in bytes. */
const FILE_DTYPE_BYTES = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
} as const;

export type FileDType = keyof typeof FILE_DTYPE_BYTES;

const TO_TENSOR_DTYPE: Partial<Record<FileDType, DType>> = {
  BOOL: 'bool',
  U8: 'uint8',
  I8: 'int8',
  I16: 'int16',
  F16: 'float16',
  BF16: 'bfloat16',
  I32: 'int32',
  F32: 'float32',
  F64: 'float64',
  I64: 'int64',
};

const FROM_TENSOR_DTYPE: Record<DType, FileDType> = {
  bool: 'BOOL',
  uint8: 'U8',
  int8: 'I8',
  int16: 'I16',
  float16: 'F16',
  bfloat16: 'BF16',
  int32: 'I32',
  float32: 'F32',
  float64: 'F64',
  int64: 'I64',
};

export function isFileDType(name: string): name is FileDType {
  return Object.hasOwn(FILE_DTYPE_BYTES, name);
}

export function fileDTypeBytes(dtype: FileDType): number {
  return FILE_DTYPE_BYTES[dtype];
}

/** The host dtype a file dtype loads as, or undefined for types gesso does not compute in. */
export function tensorDTypeOf(dtype: FileDType): DType | undefined {
  return TO_TENSOR_DTYPE[dtype];
}

export function fileDTypeOf(dtype: DType): FileDType {
  return FROM_TENSOR_DTYPE[dtype];
}

export interface TensorInfo {
  readonly name: string;
  readonly dtype: FileDType;
  readonly shape: readonly number[];
  /** Absolute position of the tensor's first byte in the file. */
  readonly byteOffset: number;
  readonly byteLength: number;
}

export interface SafetensorsHeader {
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  readonly metadata: Readonly<Record<string, string>>;
  /** Absolute position of the data section. */
  readonly dataOffset: number;
}

/** A malformed safetensors file. `code` names the kind of damage. */
export class SafetensorsError extends UserError {
  constructor(code: string, path: string, problem: string) {
    super(`safetensors-${code}`, `${path}: not a valid safetensors file: ${problem}`);
    this.name = 'SafetensorsError';
  }
}

function describe(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

/**
 * Checks the header of a file of `fileSize` bytes whose header is `headerBytes` long, strictly:
 * every tensor's dtype and shape agree with its byte range, and the ranges tile the data section
 * exactly, with no overlap and no gap. Throws SafetensorsError naming the first problem.
 */
export function parseHeader(
  headerBytes: Uint8Array,
  fileSize: number,
  path: string,
): SafetensorsHeader {
  const fail = (code: string, problem: string): never => {
    throw new SafetensorsError(code, path, problem);
  };
  const dataOffset = 8 + headerBytes.byteLength;
  const dataSize = fileSize - dataOffset;

  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(headerBytes);
  } catch {
    return fail('header-not-json', 'the header is not UTF-8 text');
  }
  if (!text.startsWith('{')) {
    return fail(
      'header-not-json',
      `the header does not start with '{' (starts ${describe(text.slice(0, 20))})`,
    );
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    return fail('header-not-json', `the header is not JSON (${(error as Error).message})`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    return fail('header-not-json', 'the header is not a JSON object');
  }

  const metadata: Record<string, string> = {};
  const entries: TensorInfo[] = [];
  for (const [name, entry] of Object.entries(parsed)) {
    if (name === '__metadata__') {
      if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
        return fail('bad-entry', '__metadata__ is not an object of strings');
      }
      for (const [key, value] of Object.entries(entry)) {
        if (typeof value !== 'string') {
          return fail('bad-entry', `__metadata__ value for ${describe(key)} is not a string`);
        }
        metadata[key] = value;
      }
      continue;
    }
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
      return fail('bad-entry', `tensor ${describe(name)} is not an object`);
    }
    const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
    if (typeof dtype !== 'string')
      return fail('bad-entry', `tensor ${describe(name)} has no dtype`);
    if (!isFileDType(dtype)) {
      return fail(
        'unknown-dtype',
        `tensor ${describe(name)} has unknown dtype ${describe(dtype)} (known: ${Object.keys(FILE_DTYPE_BYTES).join(', ')})`,
      );
    }
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      return fail('bad-entry', `tensor ${describe(name)} has invalid shape ${describe(shape)}`);
    }
    if (
      !Array.isArray(offsets) ||
      offsets.length !== 2 ||
      !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)
    ) {
      return fail(
        'bad-entry',
        `tensor ${describe(name)} has invalid data_offsets ${describe(offsets)}`,
      );
    }
    const [begin, end] = offsets as [number, number];
    if (begin > end) {
      return fail(
        'offsets-out-of-bounds',
        `tensor ${describe(name)} has data_offsets [${begin}, ${end}]: the range ends before it begins`,
      );
    }
    const expected =
      (shape as number[]).reduce((n, d) => n * BigInt(d), 1n) * BigInt(FILE_DTYPE_BYTES[dtype]);
    if (expected !== BigInt(end - begin)) {
      return fail(
        'shape-mismatch',
        `tensor ${describe(name)} of dtype ${dtype} and shape [${(shape as number[]).join(', ')}] needs ${expected} bytes, but its data_offsets [${begin}, ${end}] hold ${end - begin}`,
      );
    }
    entries.push({
      name,
      dtype,
      shape: Object.freeze([...(shape as number[])]),
      byteOffset: begin,
      byteLength: end - begin,
    });
  }

  // The ranges must tile [0, dataSize) exactly, as the reference implementation requires.
  const sorted = [...entries].sort(
    (a, b) => a.byteOffset - b.byteOffset || a.byteLength - b.byteLength,
  );
  let described = 0;
  let contiguous = true;
  for (const t of sorted) {
    if (t.byteOffset !== described) contiguous = false;
    described = Math.max(described, t.byteOffset + t.byteLength);
  }
  if (contiguous && described > dataSize) {
    return fail(
      'truncated',
      `the header describes ${described} bytes of tensor data but only ${dataSize} follow it; the file is cut short (download or copy it again)`,
    );
  }
  for (const t of sorted) {
    if (t.byteOffset + t.byteLength > dataSize) {
      return fail(
        'offsets-out-of-bounds',
        `tensor ${describe(t.name)} has data_offsets [${t.byteOffset}, ${t.byteOffset + t.byteLength}] past the end of the ${dataSize}-byte data section`,
      );
    }
  }
  let end = 0;
  let previous: TensorInfo | undefined;
  for (const t of sorted) {
    if (t.byteOffset < end) {
      return fail(
        'offsets-overlap',
        `tensors ${describe(previous?.name)} and ${describe(t.name)} overlap (bytes ${t.byteOffset} to ${Math.min(end, t.byteOffset + t.byteLength)})`,
      );
    }
    if (t.byteOffset > end) {
      return fail(
        'offsets-gap',
        `bytes ${end} to ${t.byteOffset} of the data section belong to no tensor (before ${describe(t.name)})`,
      );
    }
    end = t.byteOffset + t.byteLength;
    previous = t;
  }
  if (end < dataSize) {
    return fail(
      'offsets-gap',
      `the last ${dataSize - end} bytes of the file belong to no tensor (tensor data ends at ${end} of ${dataSize})`,
    );
  }

  const tensors = new Map<string, TensorInfo>();
  for (const t of entries) tensors.set(t.name, { ...t, byteOffset: t.byteOffset + dataOffset });
  return { tensors, metadata, dataOffset };
}

function assertLittleEndian(): void {
  if (endianness() !== 'LE') throw new Error('gesso needs a little-endian machine');
}

/** An open .safetensors file: header parsed and checked, tensor data read on request. */
export class SafetensorsFile {
  readonly path: string;
  readonly size: number;
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  readonly metadata: Readonly<Record<string, string>>;
  readonly dataOffset: number;
  private readonly handle: FileHandle;

  private constructor(path: string, size: number, header: SafetensorsHeader, handle: FileHandle) {
    this.path = path;
    this.size = size;
    this.tensors = header.tensors;
    this.metadata = header.metadata;
    this.dataOffset = header.dataOffset;
    this.handle = handle;
  }

  static async open(path: string): Promise<SafetensorsFile> {
    assertLittleEndian();
    let size: number;
    try {
      const info = await stat(path);
      if (!info.isFile()) throw new UserError('not-a-file', `${path} is not a file`);
      size = info.size;
    } catch (error) {
      if (error instanceof UserError) throw error;
      throw new UserError('file-not-found', `cannot open ${path}: ${(error as Error).message}`, {
        cause: error,
      });
    }
    const handle = await open(path, 'r');
    try {
      const header = await readHeader(handle, size, path);
      return new SafetensorsFile(path, size, header, handle);
    } catch (error) {
      await handle.close();
      throw error;
    }
  }

  /** Opens `path`, runs `use`, and closes the file whatever happens. */
  static async with<T>(path: string, use: (file: SafetensorsFile) => Promise<T>): Promise<T> {
    const file = await SafetensorsFile.open(path);
    try {
      return await use(file);
    } finally {
      await file.close();
    }
  }

  get names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (t === undefined)
      throw new UserError('tensor-not-found', `${this.path} has no tensor named '${name}'`);
    return t;
  }

  async readBytes(name: string): Promise<Uint8Array> {
    const t = this.info(name);
    const bytes = new Uint8Array(t.byteLength);
    let done = 0;
    while (done < t.byteLength) {
      const { bytesRead } = await this.handle.read(
        bytes,
        done,
        t.byteLength - done,
        t.byteOffset + done,
      );
      if (bytesRead === 0) {
        throw new SafetensorsError(
          'truncated',
          this.path,
          `the file ended while reading tensor '${name}'`,
        );
      }
      done += bytesRead;
    }
    return bytes;
  }

  /** The tensor as a host tensor of its own dtype. */
  async read(name: string): Promise<Tensor> {
    const t = this.info(name);
    const dtype = tensorDTypeOf(t.dtype);
    if (dtype === undefined) {
      throw new UserError(
        'unsupported-dtype',
        `${this.path}: tensor '${name}' has dtype ${t.dtype}, which gesso cannot load as a tensor`,
      );
    }
    return Tensor.fromBytes(dtype, t.shape, await this.readBytes(name));
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

async function readHeader(
  handle: FileHandle,
  size: number,
  path: string,
): Promise<SafetensorsHeader> {
  if (size < 8) {
    throw new SafetensorsError(
      'truncated',
      path,
      `the file is ${size} bytes long, too short for the 8-byte header length that starts every safetensors file`,
    );
  }
  const prefix = Buffer.alloc(8);
  await handle.read(prefix, 0, 8, 0);
  const headerLength = prefix.readBigUInt64LE(0);
  if (headerLength > BigInt(MAX_HEADER_BYTES)) {
    throw new SafetensorsError(
      'header-too-large',
      path,
      `the header length is ${headerLength} bytes, over the ${MAX_HEADER_BYTES}-byte limit`,
    );
  }
  const length = Number(headerLength);
  if (8 + length > size) {
    throw new SafetensorsError(
      'header-past-end',
      path,
      `the header length is ${length} bytes, past the end of the ${size}-byte file`,
    );
  }
  const header = Buffer.alloc(length);
  await handle.read(header, 0, length, 8);
  return parseHeader(header, size, path);
}

export interface LazyTensor {
  readonly dtype: FileDType | DType;
  readonly shape: readonly number[];
  /** Produces the tensor's little-endian bytes when the writer reaches it. */
  readonly bytes: () => Uint8Array | Promise<Uint8Array>;
}

function entryDType(entry: Tensor | LazyTensor): FileDType {
  return isFileDType(entry.dtype) ? entry.dtype : fileDTypeOf(entry.dtype);
}

/**
 * Writes a .safetensors file atomically. Tensors are laid out by element size, largest first, and
 * the header is padded to a multiple of 8 bytes, so every tensor is aligned to its element size.
 * Lazy entries are produced one at a time, so files larger than memory can be written.
 */
export async function writeSafetensors(
  path: string,
  tensors: Readonly<Record<string, Tensor | LazyTensor>>,
  metadata?: Readonly<Record<string, string>>,
): Promise<void> {
  assertLittleEndian();
  const names = Object.keys(tensors).sort((a, b) => {
    const sizeOrder =
      fileDTypeBytes(entryDType(tensors[b]!)) - fileDTypeBytes(entryDType(tensors[a]!));
    return sizeOrder !== 0 ? sizeOrder : a < b ? -1 : a > b ? 1 : 0;
  });
  const header: Record<string, unknown> = {};
  if (metadata !== undefined && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  for (const name of names) {
    if (name === '__metadata__') throw new RangeError("'__metadata__' cannot name a tensor");
    const entry = tensors[name]!;
    const dtype = entryDType(entry);
    const length = entry.shape.reduce((n, d) => n * d, 1) * fileDTypeBytes(dtype);
    header[name] = { dtype, shape: entry.shape, data_offsets: [offset, offset + length] };
    offset += length;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const padding = (8 - (json.byteLength % 8)) % 8;
  if (padding > 0) json = Buffer.concat([json, Buffer.alloc(padding, 0x20)]);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(json.byteLength));

  await writeAtomically(path, async (file) => {
    await file.write(prefix);
    await file.write(json);
    for (const name of names) {
      const entry = tensors[name]!;
      const bytes = entry instanceof Tensor ? entry.bytes() : await entry.bytes();
      const { data_offsets: range } = header[name] as { data_offsets: [number, number] };
      if (bytes.byteLength !== range[1] - range[0]) {
        throw new RangeError(
          `tensor '${name}' produced ${bytes.byteLength} bytes, its shape needs ${range[1] - range[0]}`,
        );
      }
      let written = 0;
      while (written < bytes.byteLength) {
        const { bytesWritten } = await file.write(bytes, written, bytes.byteLength - written);
        written += bytesWritten;
      }
    }
  });
}
