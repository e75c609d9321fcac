import { deflateSync, inflateSync } from 'node:zlib';
import { UserError } from '../errors.js';

/**
 * PNG files written byte for byte by gesso (so their text chunks are exactly what tools such as
 * AUTOMATIC1111's PNG Info expect), and read back: 8-bit grayscale, RGB and RGBA, all five
 * filter types, non-interlaced; `tEXt`, `zTXt` and `iTXt` chunks.
 */

const SIGNATURE = Uint8Array.of(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a);

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(parts: readonly Uint8Array[]): number {
  let c = 0xffffffff;
  for (const bytes of parts) for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Uint8Array): Buffer {
  const typeBytes = Buffer.from(type, 'latin1');
  const out = Buffer.alloc(12 + data.byteLength);
  out.writeUInt32BE(data.byteLength, 0);
  typeBytes.copy(out, 4);
  Buffer.from(data.buffer, data.byteOffset, data.byteLength).copy(out, 8);
  out.writeUInt32BE(crc32([typeBytes, data]), 8 + data.byteLength);
  return out;
}

/** A text chunk: `tEXt` when the text is Latin-1, otherwise UTF-8 `iTXt` (as A1111 does). */
function textChunk(keyword: string, text: string): Buffer {
  if (!/^[\x20-\x7e\xa1-\xff]{1,79}$/.test(keyword))
    throw new RangeError(`invalid PNG text keyword '${keyword}'`);
  // eslint-disable-next-line no-control-regex
  if (/^[\x00-\xff]*$/.test(text) && !text.includes('\0')) {
    return chunk(
      'tEXt',
      Buffer.concat([
        Buffer.from(keyword, 'latin1'),
        Buffer.from([0]),
        Buffer.from(text, 'latin1'),
      ]),
    );
  }
  return chunk(
    'iTXt',
    Buffer.concat([
      Buffer.from(keyword, 'latin1'),
      Buffer.from([0, 0, 0, 0, 0]),
      Buffer.from(text, 'utf8'),
    ]),
  );
}

export interface RawImage {
  readonly width: number;
  readonly height: number;
  /** 1 (gray), 3 (RGB) or 4 (RGBA). */
  readonly channels: 1 | 3 | 4;
  /** Row-major, interleaved 8-bit samples. */
  readonly data: Uint8Array;
}

const COLOR_TYPE: Record<1 | 3 | 4, number> = { 1: 0, 3: 2, 4: 6 };

export function encodePng(image: RawImage, text: Readonly<Record<string, string>> = {}): Buffer {
  const { width, height, channels, data } = image;
  if (data.byteLength !== width * height * channels) {
    throw new RangeError(
      `${width}×${height}×${channels} image needs ${width * height * channels} bytes, got ${data.byteLength}`,
    );
  }
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8;
  header[9] = COLOR_TYPE[channels];
  const stride = width * channels;
  // Filter type 1 (Sub) on every row: a good, simple predictor for photographs and renders.
  const filtered = Buffer.alloc((stride + 1) * height);
  for (let y = 0; y < height; y++) {
    const row = y * (stride + 1);
    filtered[row] = 1;
    for (let x = 0; x < stride; x++) {
      const v = data[y * stride + x]!;
      const left = x >= channels ? data[y * stride + x - channels]! : 0;
      filtered[row + 1 + x] = (v - left) & 0xff;
    }
  }
  return Buffer.concat([
    SIGNATURE,
    chunk('IHDR', header),
    ...Object.entries(text).map(([k, v]) => textChunk(k, v)),
    chunk('IDAT', deflateSync(filtered, { level: 6 })),
    chunk('IEND', new Uint8Array(0)),
  ]);
}

export interface DecodedPng extends RawImage {
  /** Text chunks by keyword, in file order. */
  readonly text: Readonly<Record<string, string>>;
}

function paeth(a: number, b: number, c: number): number {
  const p = a + b - c;
  const pa = Math.abs(p - a);
  const pb = Math.abs(p - b);
  const pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

/** Only the text chunks of a PNG (any bit depth or color type). */
export function readPngText(bytes: Uint8Array, name = 'image'): Record<string, string> {
  return parseChunks(bytes, name).text;
}

function parseChunks(bytes: Uint8Array, name: string) {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const fail = (why: string): never => {
    throw new UserError('bad-image', `${name} is not a valid PNG file: ${why}`);
  };
  if (buf.byteLength < 8 || !SIGNATURE.every((b, i) => buf[i] === b))
    fail('the PNG signature is missing');
  const text: Record<string, string> = {};
  const idat: Buffer[] = [];
  let header: Buffer | undefined;
  let offset = 8;
  let ended = false;
  while (offset + 12 <= buf.byteLength) {
    const length = buf.readUInt32BE(offset);
    const type = buf.toString('latin1', offset + 4, offset + 8);
    const end = offset + 12 + length;
    if (end > buf.byteLength) fail(`chunk ${type} runs past the end of the file`);
    const data = buf.subarray(offset + 8, offset + 8 + length);
    if (
      crc32([buf.subarray(offset + 4, offset + 8), data]) !== buf.readUInt32BE(offset + 8 + length)
    ) {
      fail(`chunk ${type} fails its CRC check`);
    }
    if (type === 'IHDR') header = data;
    else if (type === 'IDAT') idat.push(data);
    else if (type === 'tEXt') {
      const zero = data.indexOf(0);
      if (zero > 0) text[data.toString('latin1', 0, zero)] = data.toString('latin1', zero + 1);
    } else if (type === 'zTXt') {
      const zero = data.indexOf(0);
      if (zero > 0) {
        try {
          text[data.toString('latin1', 0, zero)] = inflateSync(data.subarray(zero + 2)).toString(
            'latin1',
          );
        } catch {
          fail('a zTXt chunk does not decompress');
        }
      }
    } else if (type === 'iTXt') {
      const zero = data.indexOf(0);
      if (zero > 0) {
        const compressed = data[zero + 1] === 1;
        let p = zero + 3;
        p = data.indexOf(0, p) + 1; // language tag
        p = data.indexOf(0, p) + 1; // translated keyword
        if (p > 0) {
          const body = data.subarray(p);
          try {
            text[data.toString('latin1', 0, zero)] = (
              compressed ? inflateSync(body) : body
            ).toString('utf8');
          } catch {
            fail('an iTXt chunk does not decompress');
          }
        }
      }
    } else if (type === 'IEND') {
      ended = true;
      break;
    }
    offset = end;
  }
  if (header === undefined) fail('it has no IHDR chunk');
  if (!ended) fail('it is truncated (no IEND chunk)');
  return { header: header!, idat, text };
}

export function decodePng(bytes: Uint8Array, name = 'image'): DecodedPng {
  const { header, idat, text } = parseChunks(bytes, name);
  const width = header.readUInt32BE(0);
  const height = header.readUInt32BE(4);
  const depth = header[8];
  const colorType = header[9];
  const interlace = header[12];
  const channels = colorType === 0 ? 1 : colorType === 2 ? 3 : colorType === 6 ? 4 : undefined;
  if (depth !== 8 || channels === undefined || interlace !== 0) {
    throw new UserError(
      'bad-image',
      `${name}: gesso reads 8-bit gray, RGB and RGBA PNGs without interlacing directly (this one: depth ${depth}, color type ${colorType}, interlace ${interlace})`,
    );
  }
  let raw: Buffer;
  try {
    raw = inflateSync(Buffer.concat(idat));
  } catch {
    throw new UserError(
      'bad-image',
      `${name} is not a valid PNG file: its image data does not decompress`,
    );
  }
  const stride = width * channels;
  if (raw.byteLength < (stride + 1) * height)
    throw new UserError('bad-image', `${name} is not a valid PNG file: image data is short`);
  const out = new Uint8Array(stride * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const src = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const row = y * stride;
    const prev = y > 0 ? row - stride : -1;
    for (let x = 0; x < stride; x++) {
      const a = x >= channels ? out[row + x - channels]! : 0;
      const b = prev >= 0 ? out[prev + x]! : 0;
      const c = prev >= 0 && x >= channels ? out[prev + x - channels]! : 0;
      const v = src[x]!;
      let value: number;
      switch (filter) {
        case 0:
          value = v;
          break;
        case 1:
          value = v + a;
          break;
        case 2:
          value = v + b;
          break;
        case 3:
          value = v + ((a + b) >> 1);
          break;
        case 4:
          value = v + paeth(a, b, c);
          break;
        default:
          throw new UserError(
            'bad-image',
            `${name} is not a valid PNG file: unknown row filter ${filter}`,
          );
      }
      out[row + x] = value & 0xff;
    }
  }
  return { width, height, channels, data: out, text };
}
