import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ClipTokenizer } from './clip.js';
import { WordTokenizer } from './word.js';

/** What a pipeline needs of a tokenizer: fixed-length id sequences for any text. */
export interface Tokenizer {
  readonly maxLength: number;
  encode(text: string, options?: { maxLength?: number }): number[];
}

/** Loads the tokenizer a folder's `tokenizer_config.json` names (CLIP's BPE or gesso's words). */
export async function loadTokenizer(dir: string): Promise<Tokenizer> {
  let kind: unknown;
  try {
    kind = (
      JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8')) as {
        tokenizer_class?: unknown;
      }
    ).tokenizer_class;
  } catch {
    kind = undefined;
  }
  return kind === 'GessoWordTokenizer'
    ? WordTokenizer.fromFolder(dir)
    : ClipTokenizer.fromFolder(dir);
}

export { ClipTokenizer, WordTokenizer };
