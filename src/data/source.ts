import { WordTokenizer } from '../tokenizers/word.js';
import { Tensor } from '../tensor/tensor.js';
import { loadCaptionedFolder } from './folder.js';
import { sampleBatch, SHAPES_WORDS, type Random } from './shapes.js';

/** Where training pairs come from: the shapes world, generated on the fly, or a folder. */
export interface DataSource {
  readonly description: string;
  /** The words a tokenizer for this data needs. */
  readonly vocabulary: readonly string[];
  sample(random: Random, count: number): { images: Tensor<'uint8'>; captions: string[] };
}

/** `colourless`: the fraction of single-object captions that name no colour (SampleOptions). */
export function shapesSource(colourless = 0): DataSource {
  return {
    description: 'the shapes world (held-out colour–shape pairs excluded)',
    vocabulary: SHAPES_WORDS,
    sample: (random, count) => {
      const { images, captions } = sampleBatch(random, count, {
        excludeHeldOut: true,
        colourless,
      });
      return { images, captions };
    },
  };
}

/** A captioned image folder, loaded once at `size`×`size`; the vocabulary is its most common words. */
export async function folderSource(
  dir: string,
  size: number,
  maxWords = 2000,
): Promise<DataSource> {
  const { images, captions } = await loadCaptionedFolder(dir, size);
  const counts = new Map<string, number>();
  for (const c of captions)
    for (const w of WordTokenizer.words(c)) counts.set(w, (counts.get(w) ?? 0) + 1);
  const vocabulary = [...counts.entries()]
    .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))
    .slice(0, maxWords)
    .map(([w]) => w);
  const per = size * size * 3;
  return {
    description: `${captions.length} captioned images from ${dir}`,
    vocabulary,
    sample: (random, count) => {
      const picks = Array.from({ length: count }, () => Math.floor(random() * captions.length));
      const out = new Uint8Array(count * per);
      picks.forEach((p, i) =>
        out.set((images.data as Uint8Array).subarray(p * per, (p + 1) * per), i * per),
      );
      return {
        images: new Tensor('uint8', [count, size, size, 3], out),
        captions: picks.map((p) => captions[p]!),
      };
    },
  };
}
