/**
 * AUTOMATIC1111's prompt syntax: emphasis and prompts of any length.
 *
 * - `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1, `(text:w)`
 *   multiplies by w; brackets nest (multiply); an unclosed bracket runs to the end; `\(`, `\)`,
 *   `\[`, `\]` and `\\` are literal characters. `BREAK` ends the current chunk.
 * - The tokens are cut into chunks of 75 (if a comma lies within the last 20 tokens of a full
 *   chunk, the text after it moves to the next chunk), each encoded alone as start + 75 + end,
 *   and the chunks' hidden states are laid side by side (77·k tokens for the UNet to attend to).
 * - What a weight does: each token's hidden state is multiplied by its weight, then the whole
 *   chunk is rescaled so its mean equals the unweighted mean (A1111's default "Original" mode).
 *   A weight of 1 everywhere changes nothing.
 */

/** How prompts are read: as plain text, as AUTOMATIC1111 reads them, or as ComfyUI does. */
export type PromptSyntax = 'plain' | 'a1111' | 'comfy';

export type WeightedText = [text: string, weight: number];

/** A piece that stands for `BREAK` in the parse (weight −1, as A1111 marks it). */
export const BREAK: WeightedText = ['BREAK', -1];

const ATTENTION = /\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()[\]:]+|:/g;
const BREAK_WORD = /\s*\bBREAK\b\s*/s;

/** A1111's `parse_prompt_attention`: the text in pieces, each with its weight. */
export function parsePromptAttention(text: string): WeightedText[] {
  const res: WeightedText[] = [];
  const round: number[] = [];
  const square: number[] = [];
  const multiply = (start: number, by: number) => {
    for (let p = start; p < res.length; p++) res[p]![1] *= by;
  };
  for (const m of text.matchAll(ATTENTION)) {
    const piece = m[0];
    const weight = m[1];
    if (piece.startsWith('\\')) res.push([piece.slice(1), 1]);
    else if (piece === '(') round.push(res.length);
    else if (piece === '[') square.push(res.length);
    else if (weight !== undefined && round.length > 0) multiply(round.pop()!, Number(weight));
    else if (piece === ')' && round.length > 0) multiply(round.pop()!, 1.1);
    else if (piece === ']' && square.length > 0) multiply(square.pop()!, 1 / 1.1);
    else {
      piece.split(BREAK_WORD).forEach((part, i) => {
        if (i > 0) res.push([...BREAK]);
        res.push([part, 1]);
      });
    }
  }
  for (const p of round) multiply(p, 1.1);
  for (const p of square) multiply(p, 1 / 1.1);
  if (res.length === 0) res.push(['', 1]);
  // Neighbours of equal weight merge.
  for (let i = 0; i + 1 < res.length;) {
    if (res[i]![1] === res[i + 1]![1]) {
      res[i]![0] += res[i + 1]![0];
      res.splice(i + 1, 1);
    } else i++;
  }
  return res;
}

/** What chunking needs of a tokenizer: ids without specials, and the special ids. */
export interface ChunkingTokenizer {
  readonly maxLength: number;
  tokenize(text: string): number[];
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  /** The id of ",", for the comma backtrack. */
  readonly commaId: number | undefined;
}

export interface PromptChunks {
  /** Each chunk: start, 75 tokens or fewer, end, padding to the model length. */
  readonly ids: number[][];
  /** The weight of every position (1 for the special tokens and padding). */
  readonly weights: number[][];
}

const COMMA_BACKTRACK = 20;

/** A prompt in A1111 syntax as chunks of token ids and their weights. */
export function promptChunks(tokenizer: ChunkingTokenizer, prompt: string): PromptChunks {
  const length = tokenizer.maxLength - 2;
  const ids: number[][] = [];
  const weights: number[][] = [];
  let tokens: number[] = [];
  let multipliers: number[] = [];
  let lastComma = -1;
  const nextChunk = () => {
    const pad = tokenizer.maxLength - 2 - tokens.length;
    ids.push([
      tokenizer.bosId,
      ...tokens,
      tokenizer.eosId,
      ...new Array<number>(pad).fill(tokenizer.padId),
    ]);
    weights.push([1, ...multipliers, 1, ...new Array<number>(pad).fill(1)]);
    tokens = [];
    multipliers = [];
    lastComma = -1;
  };
  for (const [text, weight] of parsePromptAttention(prompt)) {
    if (text === BREAK[0] && weight === BREAK[1]) {
      nextChunk();
      continue;
    }
    for (const token of tokenizer.tokenize(text)) {
      if (token === tokenizer.commaId) lastComma = tokens.length;
      else if (
        tokens.length === length &&
        lastComma !== -1 &&
        tokens.length - lastComma <= COMMA_BACKTRACK
      ) {
        // Move the words after the last comma to the next chunk, so no phrase is cut in two.
        const cut = lastComma + 1;
        const movedTokens = tokens.slice(cut);
        const movedWeights = multipliers.slice(cut);
        tokens = tokens.slice(0, cut);
        multipliers = multipliers.slice(0, cut);
        nextChunk();
        tokens = movedTokens;
        multipliers = movedWeights;
      }
      if (tokens.length === length) nextChunk();
      tokens.push(token);
      multipliers.push(weight);
    }
  }
  if (tokens.length > 0 || ids.length === 0) nextChunk();
  return { ids, weights };
}

/** A chunk's hidden states [tokens × width] scaled by its weights, then back to its mean. */
export function applyEmphasis(
  hidden: Float32Array,
  weights: readonly number[],
  width: number,
): Float32Array {
  let before = 0;
  for (const v of hidden) before += v;
  const out = new Float32Array(hidden.length);
  let after = 0;
  for (let t = 0; t < weights.length; t++) {
    const w = weights[t]!;
    for (let k = 0; k < width; k++) {
      const v = hidden[t * width + k]! * w;
      out[t * width + k] = v;
      after += v;
    }
  }
  if (after === 0) return out;
  const ratio = before / after;
  for (let i = 0; i < out.length; i++) out[i] = out[i]! * ratio;
  return out;
}
