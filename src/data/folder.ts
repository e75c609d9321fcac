import { readdir, readFile } from 'node:fs/promises';
import { basename, extname, join } from 'node:path';
import sharp from 'sharp';
import { UserError } from '../errors.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * Image–caption folders as people keep them: images beside same-named `.txt` captions, or a
 * `metadata.jsonl` with `file_name` and `text` per line (the Hugging Face ImageFolder layout).
 * Images are resized so the shorter side fits and centre-cropped to a square, once, on load.
 */

const IMAGE_EXTENSIONS = new Set([
  '.png',
  '.jpg',
  '.jpeg',
  '.webp',
  '.bmp',
  '.gif',
  '.tif',
  '.tiff',
]);

export interface CaptionedImages {
  /** NHWC uint8 [N, size, size, 3]. */
  readonly images: Tensor<'uint8'>;
  readonly captions: readonly string[];
}

async function readCaptions(dir: string, files: readonly string[]): Promise<Map<string, string>> {
  const captions = new Map<string, string>();
  if (files.includes('metadata.jsonl')) {
    const lines = (await readFile(join(dir, 'metadata.jsonl'), 'utf8')).split('\n');
    lines.forEach((line, i) => {
      if (line.trim() === '') return;
      let entry: unknown;
      try {
        entry = JSON.parse(line);
      } catch {
        throw new UserError(
          'bad-dataset',
          `${join(dir, 'metadata.jsonl')} line ${i + 1} is not JSON`,
        );
      }
      const { file_name: file, text } = (entry ?? {}) as { file_name?: unknown; text?: unknown };
      if (typeof file !== 'string' || typeof text !== 'string') {
        throw new UserError(
          'bad-dataset',
          `${join(dir, 'metadata.jsonl')} line ${i + 1} needs string 'file_name' and 'text'`,
        );
      }
      captions.set(file, text);
    });
  }
  for (const file of files) {
    if (extname(file).toLowerCase() !== '.txt') continue;
    const stem = basename(file, extname(file));
    const image = files.find(
      (f) => IMAGE_EXTENSIONS.has(extname(f).toLowerCase()) && basename(f, extname(f)) === stem,
    );
    if (image !== undefined && !captions.has(image))
      captions.set(image, (await readFile(join(dir, file), 'utf8')).trim());
  }
  return captions;
}

export async function loadCaptionedFolder(dir: string, size: number): Promise<CaptionedImages> {
  let files: string[];
  try {
    files = (await readdir(dir)).sort();
  } catch {
    throw new UserError('bad-dataset', `the dataset folder ${dir} does not exist`);
  }
  const captions = await readCaptions(dir, files);
  if (captions.size === 0) {
    throw new UserError(
      'bad-dataset',
      `${dir} has no captioned images: put NAME.txt beside each image, or a metadata.jsonl with file_name and text`,
    );
  }
  const names = [...captions.keys()].sort();
  const data = new Uint8Array(names.length * size * size * 3);
  for (const [i, name] of names.entries()) {
    try {
      const { data: pixels } = await sharp(join(dir, name))
        .removeAlpha()
        .toColourspace('srgb')
        .resize(size, size, { fit: 'cover', position: 'centre', kernel: 'lanczos3' })
        .raw()
        .toBuffer({ resolveWithObject: true });
      data.set(pixels, i * size * size * 3);
    } catch (error) {
      throw new UserError(
        'bad-dataset',
        `${join(dir, name)} is not a readable image: ${(error as Error).message}`,
      );
    }
  }
  return {
    images: new Tensor('uint8', [names.length, size, size, 3], data),
    captions: names.map((n) => captions.get(n)!),
  };
}
