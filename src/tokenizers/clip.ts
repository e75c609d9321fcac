import { fileURLToPath } from 'node:url';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { decodeHTML } from 'entities';
import { UserError } from '../errors.js';

/**
 * CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` runs it: the text is cleaned
 * (NFC, HTML entities decoded, curly quotes and Latin ligatures straightened as ftfy does,
 * whitespace collapsed, lower-cased), split by CLIP's pattern, each piece mapped to byte symbols and
 * merged by rank, with `</w>` marking the end of each word; then bos + ids + eos, truncated and
 * padded to the model's length with the pad token its folder names.
 */

export interface ClipTokenizerOptions {
  /** Sequence length with bos and eos (77 for every Stable Diffusion text encoder). */
  readonly maxLength: number;
  readonly bosToken: string;
  readonly eosToken: string;
  readonly padToken: string;
  readonly unkToken: string;
}

const SPLIT =
  /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/giu;

/** GPT-2's reversible map from bytes to printable characters. */
function byteSymbols(): string[] {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const symbols = new Array<string>(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    symbols[b] = String.fromCodePoint(printable.includes(b) ? b : 256 + extra++);
  }
  return symbols;
}

const BYTE_SYMBOLS = byteSymbols();

const QUOTES: Readonly<Record<string, string>> = {
  '\u2018': "'",
  '\u2019': "'",
  '\u201a': "'",
  '\u201b': "'",
  '\u201c': '"',
  '\u201d': '"',
  '\u201e': '"',
  '\u201f': '"',
};
const LIGATURES: Readonly<Record<string, string>> = {
  '\ufb00': 'ff',
  '\ufb01': 'fi',
  '\ufb02': 'fl',
  '\ufb03': 'ffi',
  '\ufb04': 'ffl',
  '\ufb05': 'st',
  '\ufb06': 'st',
  '\u0132': 'IJ',
  '\u0133': 'ij',
  '\u0149': '\u02bcn',
  '\u01c7': 'LJ',
  '\u01c8': 'Lj',
  '\u01c9': 'lj',
  '\u01ca': 'NJ',
  '\u01cb': 'Nj',
  '\u01cc': 'nj',
};

/** The text cleaning CLIP applies before splitting. */
export function cleanText(text: string): string {
  let t = decodeHTML(decodeHTML(text.normalize('NFC')));
  t = t.replace(/[\u2018-\u201f]/g, (c) => QUOTES[c] ?? c);
  t = t.replace(/[\ufb00-\ufb06\u0132\u0133\u0149\u01c7-\u01cc]/g, (c) => LIGATURES[c] ?? c);
  return t.normalize('NFC').replace(/\s+/gu, ' ').trim().toLowerCase();
}

export class ClipTokenizer {
  readonly options: ClipTokenizerOptions;
  private readonly vocab: ReadonlyMap<string, number>;
  private readonly idToToken: readonly string[];
  private readonly ranks: ReadonlyMap<string, number>;
  private readonly cache = new Map<string, string[]>();

  constructor(
    vocab: ReadonlyMap<string, number>,
    merges: readonly string[],
    options: ClipTokenizerOptions,
  ) {
    this.vocab = vocab;
    this.options = options;
    const ids: string[] = [];
    for (const [token, id] of vocab) ids[id] = token;
    this.idToToken = ids;
    const ranks = new Map<string, number>();
    merges.forEach((m, i) => ranks.set(m, i));
    this.ranks = ranks;
    for (const special of [
      options.bosToken,
      options.eosToken,
      options.padToken,
      options.unkToken,
    ]) {
      if (!vocab.has(special))
        throw new UserError(
          'bad-tokenizer',
          `tokenizer vocabulary lacks the special token '${special}'`,
        );
    }
  }

  /**
   * CLIP's vocabulary as the repository bundles it (assets/clip-tokenizer), for models that carry
   * no tokenizer (single-file checkpoints). SD 2.x and SDXL's OpenCLIP encoders pad with '!'.
   */
  static async bundled(padToken = '<|endoftext|>'): Promise<ClipTokenizer> {
    const dir = fileURLToPath(new URL('../../../assets/clip-tokenizer', import.meta.url));
    return ClipTokenizer.fromFolder(dir, { pad_token: padToken });
  }

  /** Loads `vocab.json`, `merges.txt` and `tokenizer_config.json` / `special_tokens_map.json`. */
  static async fromFolder(
    dir: string,
    overrides: Readonly<Record<string, unknown>> = {},
  ): Promise<ClipTokenizer> {
    const read = async (name: string): Promise<string | undefined> =>
      readFile(join(dir, name), 'utf8').catch(() => undefined);
    const vocabText = await read('vocab.json');
    const mergesText = await read('merges.txt');
    if (vocabText === undefined || mergesText === undefined) {
      throw new UserError(
        'bad-tokenizer',
        `${dir} is not a CLIP tokenizer folder: vocab.json and merges.txt are required`,
      );
    }
    let vocabObject: Record<string, number>;
    try {
      vocabObject = JSON.parse(vocabText) as Record<string, number>;
    } catch (error) {
      throw new UserError(
        'bad-tokenizer',
        `${join(dir, 'vocab.json')} is not valid JSON: ${(error as Error).message}`,
      );
    }
    const config = {
      ...parseLoose(await read('special_tokens_map.json')),
      ...parseLoose(await read('tokenizer_config.json')),
      ...overrides,
    };
    const token = (key: string, fallback: string): string => {
      const v = config[key];
      if (typeof v === 'string') return v;
      if (
        typeof v === 'object' &&
        v !== null &&
        typeof (v as { content?: unknown }).content === 'string'
      ) {
        return (v as { content: string }).content;
      }
      return fallback;
    };
    // As transformers' slow CLIPTokenizer: the header line is skipped and at most 48894 merges used.
    const merges = mergesText
      .replace(/\r\n/g, '\n')
      .trim()
      .split('\n')
      .slice(1, 49152 - 256 - 2 + 1);
    const maxLength =
      typeof config.model_max_length === 'number' && config.model_max_length < 10_000
        ? config.model_max_length
        : 77;
    return new ClipTokenizer(new Map(Object.entries(vocabObject)), merges, {
      maxLength,
      bosToken: token('bos_token', '<|startoftext|>'),
      eosToken: token('eos_token', '<|endoftext|>'),
      padToken: token('pad_token', '<|endoftext|>'),
      unkToken: token('unk_token', '<|endoftext|>'),
    });
  }

  get maxLength(): number {
    return this.options.maxLength;
  }

  get bosId(): number {
    return this.vocab.get(this.options.bosToken)!;
  }

  get eosId(): number {
    return this.vocab.get(this.options.eosToken)!;
  }

  get padId(): number {
    return this.vocab.get(this.options.padToken)!;
  }

  /** The id of ",", where A1111's chunking prefers to cut long prompts. */
  get commaId(): number | undefined {
    return this.vocab.get(',</w>');
  }

  private bpe(word: string): string[] {
    const cached = this.cache.get(word);
    if (cached !== undefined) return cached;
    const chars = [...word];
    let parts = chars.map((c, i) => (i === chars.length - 1 ? `${c}</w>` : c));
    while (parts.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i < parts.length - 1; i++) {
        const rank = this.ranks.get(`${parts[i]} ${parts[i + 1]}`);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          best = i;
        }
      }
      if (best < 0) break;
      const first = parts[best]!;
      const second = parts[best + 1]!;
      const merged: string[] = [];
      for (let i = 0; i < parts.length;) {
        if (i < parts.length - 1 && parts[i] === first && parts[i + 1] === second) {
          merged.push(first + second);
          i += 2;
        } else {
          merged.push(parts[i]!);
          i += 1;
        }
      }
      parts = merged;
    }
    if (this.cache.size < 100_000) this.cache.set(word, parts);
    return parts;
  }

  /** Token ids of the text, without bos/eos, padding or truncation. */
  tokenize(text: string): number[] {
    const ids: number[] = [];
    const unk = this.vocab.get(this.options.unkToken)!;
    for (const match of cleanText(text).matchAll(SPLIT)) {
      const piece = match[0];
      if (piece === '<|startoftext|>' || piece === '<|endoftext|>') {
        ids.push(this.vocab.get(piece) ?? unk);
        continue;
      }
      const symbols = Array.from(new TextEncoder().encode(piece), (b) => BYTE_SYMBOLS[b]!).join('');
      for (const part of this.bpe(symbols)) ids.push(this.vocab.get(part) ?? unk);
    }
    return ids;
  }

  /**
   * bos + ids + eos, with the ids truncated to fit `maxLength` and the rest filled with the pad
   * token (pass `pad: false` for the unpadded ids).
   */
  encode(
    text: string,
    options: { pad?: boolean; truncate?: boolean; maxLength?: number } = {},
  ): number[] {
    const maxLength = options.maxLength ?? this.options.maxLength;
    let ids = this.tokenize(text);
    if (options.truncate ?? true) ids = ids.slice(0, maxLength - 2);
    const out = [this.bosId, ...ids, this.eosId];
    if (options.pad ?? true) while (out.length < maxLength) out.push(this.padId);
    return out;
  }

  /** Text for ids (byte symbols mapped back; `</w>` becomes a space). */
  decode(ids: readonly number[]): string {
    const symbolToByte = new Map(BYTE_SYMBOLS.map((s, b) => [s, b]));
    const text = ids.map((id) => this.idToToken[id] ?? '').join('');
    const bytes = Array.from(text.replace(/<\/w>/g, ' '), (c) =>
      c === ' ' ? 0x20 : (symbolToByte.get(c) ?? 0x3f),
    );
    return new TextDecoder().decode(Uint8Array.from(bytes)).trim();
  }
}

function parseLoose(text: string | undefined): Record<string, unknown> {
  if (text === undefined) return {};
  try {
    const v: unknown = JSON.parse(text);
    return typeof v === 'object' && v !== null ? (v as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}
