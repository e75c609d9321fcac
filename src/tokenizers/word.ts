import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { UserError } from '../errors.js';

/**
 * gesso's word tokenizer for its own small models: lower-cased words and numbers, punctuation
 * ignored, each word looked up in a fixed vocabulary (or as its other spelling: grey, centre, 3);
 * a word outside it becomes `<unk>` instead of an error, so any prompt encodes. Sequences are
 * `<bos> words <eos>` padded with `<pad>`.
 */

export const SPECIAL_TOKENS = ['<pad>', '<bos>', '<eos>', '<unk>'] as const;

/**
 * Other ways to write a word: British spellings and numerals. Looked up only when the vocabulary
 * lacks the word as written, so a vocabulary learned from captions that spell `grey` keeps it.
 */
const SAME_WORD: ReadonlyMap<string, string> = new Map([
  ['grey', 'gray'],
  ['centre', 'center'],
  ['colour', 'color'],
  ['colours', 'colors'],
  ['0', 'zero'],
  ['1', 'one'],
  ['2', 'two'],
  ['3', 'three'],
  ['4', 'four'],
  ['5', 'five'],
  ['6', 'six'],
  ['7', 'seven'],
  ['8', 'eight'],
  ['9', 'nine'],
  ['10', 'ten'],
]);

export interface WordTokenizerConfig {
  readonly tokenizer_class: 'GessoWordTokenizer';
  readonly model_max_length: number;
}

export class WordTokenizer {
  readonly vocab: readonly string[];
  readonly maxLength: number;
  private readonly ids: ReadonlyMap<string, number>;

  constructor(words: readonly string[], maxLength: number) {
    const vocab = [
      ...SPECIAL_TOKENS,
      ...words.filter((w) => !(SPECIAL_TOKENS as readonly string[]).includes(w)),
    ];
    this.vocab = vocab;
    this.ids = new Map(vocab.map((w, i) => [w, i]));
    this.maxLength = maxLength;
  }

  static async fromFolder(dir: string): Promise<WordTokenizer> {
    let vocab: unknown;
    let config: unknown;
    try {
      vocab = JSON.parse(await readFile(join(dir, 'vocab.json'), 'utf8'));
      config = JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8'));
    } catch (error) {
      throw new UserError(
        'bad-tokenizer',
        `${dir} is not a gesso word tokenizer: ${(error as Error).message}`,
      );
    }
    if (!Array.isArray(vocab) || !vocab.every((w) => typeof w === 'string')) {
      throw new UserError(
        'bad-tokenizer',
        `${join(dir, 'vocab.json')} must be a JSON list of words`,
      );
    }
    const length = (config as { model_max_length?: unknown }).model_max_length;
    return new WordTokenizer(vocab as string[], typeof length === 'number' ? length : 32);
  }

  get padId(): number {
    return 0;
  }

  get bosId(): number {
    return 1;
  }

  get eosId(): number {
    return 2;
  }

  get unkId(): number {
    return 3;
  }

  /** The words of a text, as the tokenizer sees them. */
  static words(text: string): string[] {
    return (
      text
        .normalize('NFKC')
        .toLowerCase()
        .match(/[\p{L}]+|[\p{N}]+/gu) ?? []
    );
  }

  tokenize(text: string): number[] {
    return WordTokenizer.words(text).map(
      (w) => this.ids.get(w) ?? this.ids.get(SAME_WORD.get(w) ?? '') ?? this.unkId,
    );
  }

  encode(text: string, options: { maxLength?: number } = {}): number[] {
    const maxLength = options.maxLength ?? this.maxLength;
    const ids = [this.bosId, ...this.tokenize(text).slice(0, maxLength - 2), this.eosId];
    while (ids.length < maxLength) ids.push(this.padId);
    return ids;
  }

  decode(ids: readonly number[]): string {
    return ids
      .filter((id) => id > 3)
      .map((id) => this.vocab[id] ?? '<unk>')
      .join(' ');
  }

  /** The folder files: vocab.json (the words) and tokenizer_config.json. */
  files(): Record<string, string> {
    const config: WordTokenizerConfig = {
      tokenizer_class: 'GessoWordTokenizer',
      model_max_length: this.maxLength,
    };
    return {
      'vocab.json': `${JSON.stringify(this.vocab.slice(SPECIAL_TOKENS.length))}\n`,
      'tokenizer_config.json': `${JSON.stringify(config, null, 2)}\n`,
    };
  }
}
