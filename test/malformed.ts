import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/** Builds the raw bytes of a safetensors file from a header object (or raw header text) and data. */
export function rawFile(
  header: unknown,
  data: Uint8Array | number,
  headerLength?: bigint,
): Uint8Array {
  const text = typeof header === 'string' ? header : JSON.stringify(header);
  const json = Buffer.from(text, 'utf8');
  const body = typeof data === 'number' ? new Uint8Array(data) : data;
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(headerLength ?? BigInt(json.byteLength));
  return Buffer.concat([prefix, json, body]);
}

const f32 = (shape: number[], begin: number, end: number) => ({
  dtype: 'F32',
  shape,
  data_offsets: [begin, end],
});

const valid = rawFile({ a: f32([2], 0, 8), b: f32([1], 8, 12) }, 12);

/** One malformed file per kind of damage, with the error code gesso must report. */
export const MALFORMED: readonly {
  name: string;
  code: string;
  bytes: Uint8Array;
  message: RegExp;
}[] = [
  {
    name: 'shorter than 8 bytes',
    code: 'safetensors-truncated',
    bytes: new Uint8Array(5),
    message: /too short/,
  },
  {
    name: 'data cut short',
    code: 'safetensors-truncated',
    bytes: valid.subarray(0, valid.byteLength - 3),
    message: /cut short/,
  },
  {
    name: 'header length past the end',
    code: 'safetensors-header-past-end',
    bytes: rawFile({ a: f32([1], 0, 4) }, 4, 5000n),
    message: /past the end/,
  },
  {
    name: 'header length over 100 MB',
    code: 'safetensors-header-too-large',
    bytes: rawFile({}, 0, 200_000_000n),
    message: /over the 100000000-byte limit/,
  },
  {
    name: 'header not JSON',
    code: 'safetensors-header-not-json',
    bytes: rawFile('{"a": [1, 2', 0),
    message: /not JSON/,
  },
  {
    name: 'header not an object',
    code: 'safetensors-header-not-json',
    bytes: rawFile('[1, 2]', 0),
    message: /start with/,
  },
  {
    name: 'header not UTF-8',
    code: 'safetensors-header-not-json',
    bytes: Buffer.concat([
      Buffer.from([4, 0, 0, 0, 0, 0, 0, 0]),
      Buffer.from([0x7b, 0xff, 0xfe, 0x7d]),
    ]),
    message: /not UTF-8/,
  },
  {
    name: 'unknown dtype',
    code: 'safetensors-unknown-dtype',
    bytes: rawFile({ a: { dtype: 'F7', shape: [1], data_offsets: [0, 4] } }, 4),
    message: /unknown dtype "F7"/,
  },
  {
    name: 'offsets out of bounds',
    code: 'safetensors-offsets-out-of-bounds',
    bytes: rawFile({ a: f32([2], 0, 8), b: f32([2], 16, 24) }, 16),
    message: /past the end of the 16-byte data section/,
  },
  {
    name: 'offsets reversed',
    code: 'safetensors-offsets-out-of-bounds',
    bytes: rawFile({ a: { dtype: 'U8', shape: [0], data_offsets: [4, 0] } }, 4),
    message: /ends before it begins/,
  },
  {
    name: 'overlapping tensors',
    code: 'safetensors-offsets-overlap',
    bytes: rawFile({ a: f32([2], 0, 8), b: f32([2], 4, 12) }, 12),
    message: /"a" and "b" overlap/,
  },
  {
    name: 'gap between tensors',
    code: 'safetensors-offsets-gap',
    bytes: rawFile({ a: f32([1], 0, 4), b: f32([1], 8, 12) }, 12),
    message: /bytes 4 to 8 .* belong to no tensor/,
  },
  {
    name: 'bytes after the last tensor',
    code: 'safetensors-offsets-gap',
    bytes: rawFile({ a: f32([1], 0, 4) }, 12),
    message: /last 8 bytes/,
  },
  {
    name: 'shape does not match byte length',
    code: 'safetensors-shape-mismatch',
    bytes: rawFile({ a: f32([3], 0, 8) }, 8),
    message: /needs 12 bytes, but its data_offsets \[0, 8\] hold 8/,
  },
  {
    name: 'negative dim',
    code: 'safetensors-bad-entry',
    bytes: rawFile({ a: f32([-1], 0, 4) }, 4),
    message: /invalid shape/,
  },
];

export async function writeMalformed(
  dir: string,
): Promise<{ path: string; code: string; name: string; message: RegExp }[]> {
  const out = [];
  for (const [i, m] of MALFORMED.entries()) {
    const path = join(dir, `bad-${i}.safetensors`);
    await writeFile(path, m.bytes);
    out.push({ path, code: m.code, name: m.name, message: m.message });
  }
  return out;
}
