import sharp from 'sharp';
import { UserError } from '../errors.js';
import { Tensor } from '../tensor/tensor.js';
import { readUserFile, writeFileAtomically } from './atomic.js';
import { encodePng, type RawImage } from './png.js';

/** Images between files and tensors: NHWC uint8 for pixels, NHWC float in [0, 1] from models. */

/** A model's NCHW pixels in [−1, 1] → NHWC images in [0, 1], as diffusers' postprocessing. */
export function fromModelPixels(pixels: Tensor<'float32'>): Tensor<'float32'> {
  const [b, c, h, w] = pixels.shape as [number, number, number, number];
  const out = new Tensor('float32', [b, h, w, c]);
  const src = pixels.data;
  for (let n = 0; n < b; n++) {
    for (let ch = 0; ch < c; ch++) {
      for (let i = 0; i < h * w; i++) {
        const v = Math.fround(Math.fround(src[(n * c + ch) * h * w + i]! / 2) + 0.5);
        out.data[(n * h * w + i) * c + ch] = Math.min(Math.max(v, 0), 1);
      }
    }
  }
  return out;
}

/** Float [0, 1] → uint8 as diffusers' `numpy_to_pil` does: (x · 255) rounded half to even. */
export function toUint8(images: Tensor<'float32'>): Tensor<'uint8'> {
  const out = new Uint8Array(images.size);
  const src = images.data;
  for (let i = 0; i < out.length; i++) {
    const v = Math.fround(Math.min(Math.max(src[i]!, 0), 1) * 255);
    const r = Math.round(v);
    out[i] = v - Math.floor(v) === 0.5 && r % 2 === 1 ? r - 1 : r;
  }
  return new Tensor('uint8', images.shape, out);
}

/** One image of an NHWC batch as a PNG file, written atomically, with text chunks. */
export async function writePng(
  path: string,
  images: Tensor<'uint8'>,
  index = 0,
  text: Readonly<Record<string, string>> = {},
): Promise<void> {
  const [, h, w, c] = images.shape as [number, number, number, number];
  const data = (images.data as Uint8Array).subarray(index * h * w * c, (index + 1) * h * w * c);
  await writeFileAtomically(
    path,
    encodePng({ width: w, height: h, channels: c as 1 | 3 | 4, data }, text),
  );
}

/**
 * Reads any common image file (PNG, JPEG, WebP, ...) as RGB, NHWC uint8 [1, H, W, 3], resized
 * with Lanczos filtering to `width`×`height` when given (as diffusers' image processor resizes).
 */
export async function readImage(
  path: string,
  size?: { width: number; height: number },
): Promise<Tensor<'uint8'>> {
  return decodeImage(await readUserFile(path, 'image '), path, size);
}

/** Decodes image bytes (PNG, JPEG, WebP, ...) as `readImage` does; `name` appears in errors. */
export async function decodeImage(
  bytes: Uint8Array,
  name: string,
  size?: { width: number; height: number },
): Promise<Tensor<'uint8'>> {
  try {
    let pipeline = sharp(bytes, { failOn: 'error' }).removeAlpha().toColourspace('srgb');
    if (size !== undefined)
      pipeline = pipeline.resize(size.width, size.height, { fit: 'fill', kernel: 'lanczos3' });
    const { data, info } = await pipeline.raw().toBuffer({ resolveWithObject: true });
    if (info.channels !== 3) throw new Error(`decoded ${info.channels} channels`);
    return new Tensor(
      'uint8',
      [1, info.height, info.width, 3],
      new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    );
  } catch (error) {
    throw new UserError(
      'bad-image',
      `${name} is not an image gesso can read: ${(error as Error).message}`,
    );
  }
}

/** NHWC uint8 RGB images laid out in a grid of `columns`, on white. */
export function contactSheet(images: Tensor<'uint8'>, columns: number): RawImage {
  const [n, h, w] = images.shape as [number, number, number];
  const rows = Math.ceil(n / columns);
  const sheet = new Uint8Array(rows * h * columns * w * 3).fill(255);
  for (let k = 0; k < n; k++) {
    const gx = k % columns;
    const gy = Math.floor(k / columns);
    for (let y = 0; y < h; y++) {
      sheet.set(
        (images.data as Uint8Array).subarray((k * h + y) * w * 3, (k * h + y + 1) * w * 3),
        ((gy * h + y) * columns * w + gx * w) * 3,
      );
    }
  }
  return { width: columns * w, height: rows * h, channels: 3, data: sheet };
}
