import type { ChunkingTokenizer, PromptChunks, WeightedText } from './prompt.js';

/**
 * ComfyUI's prompt syntax (comfy/sd1_clip.py), which differs from A1111's:
 *
 * - `(text)` multiplies the weight by 1.1 and `(text:w)` sets it to w (an inner weight replaces
 *   the outer, it does not multiply); `[text]` is plain text; an unclosed `(` is plain text;
 *   `\(` and `\)` are literal brackets. There is no BREAK, editing or AND.
 * - The text is cut at spaces into words, each tokenized alone, and the words are packed into
 *   chunks of start + 75 + end; a word of fewer than 8 tokens that does not fit moves whole to the
 *   next chunk, a longer one is split.
 * - What a weight does: a token's hidden state moves away from the state the empty text has at
 *   that position, `(z − z_empty)·w + z_empty`, with no rescaling afterwards.
 */

/** The pieces of ComfyUI's parse_parentheses: top-level `( … )` groups and the text between. */
function topLevelGroups(text: string): string[] {
  const groups: string[] = [];
  let current = '';
  let depth = 0;
  for (const char of text) {
    if (char === '(') {
      if (depth === 0) {
        if (current !== '') groups.push(current);
        current = '(';
      } else current += char;
      depth += 1;
    } else if (char === ')') {
      depth -= 1;
      if (depth === 0) {
        groups.push(`${current})`);
        current = '';
      } else current += char;
    } else current += char;
  }
  if (current !== '') groups.push(current);
  return groups;
}

const PYTHON_FLOAT =
  /^[+-]?(?:(?:\d(?:_?\d)*)?\.?\d(?:_?\d)*(?:[eE][+-]?\d(?:_?\d)*)?|\d(?:_?\d)*\.|inf(?:inity)?|nan)$/i;

/** Python's float() of a string, or undefined where it would raise. */
function pythonFloat(text: string): number | undefined {
  const s = text.trim();
  if (!PYTHON_FLOAT.test(s)) return undefined;
  const lower = s.toLowerCase().replace(/_/g, '');
  if (lower.endsWith('inf') || lower.endsWith('infinity'))
    return lower.startsWith('-') ? -Infinity : Infinity;
  if (lower.endsWith('nan')) return NaN;
  return Number(lower);
}

// Escaped brackets are hidden from the parse as these pairs, then put back.
const ESCAPED_CLOSE = '\u0000\u0001';
const ESCAPED_OPEN = '\u0000\u0002';

function weighted(text: string, weight: number): WeightedText[] {
  const out: WeightedText[] = [];
  for (const group of topLevelGroups(text)) {
    if (group.length >= 2 && group.startsWith('(') && group.endsWith(')')) {
      let inner = group.slice(1, -1);
      let groupWeight = weight * 1.1;
      const colon = inner.lastIndexOf(':');
      if (colon > 0) {
        const explicit = pythonFloat(inner.slice(colon + 1));
        if (explicit !== undefined) {
          groupWeight = explicit;
          inner = inner.slice(0, colon);
        }
      }
      out.push(...weighted(inner, groupWeight));
    } else out.push([group, weight]);
  }
  return out;
}

/** ComfyUI's token_weights: the text in pieces, each with its weight, escapes resolved. */
export function parseComfyWeights(text: string): WeightedText[] {
  const hidden = text.replaceAll('\\)', ESCAPED_CLOSE).replaceAll('\\(', ESCAPED_OPEN);
  return weighted(hidden, 1).map(([piece, weight]) => [
    piece.replaceAll(ESCAPED_CLOSE, ')').replaceAll(ESCAPED_OPEN, '('),
    weight,
  ]);
}

/** Words of this many tokens or more may be split across chunks (ComfyUI's max_word_length). */
const LONG_WORD = 8;

/** A prompt in ComfyUI syntax as chunks of token ids and their weights (tokenize_with_weights). */
export function comfyPromptChunks(tokenizer: ChunkingTokenizer, prompt: string): PromptChunks {
  const words: [number, number][][] = [];
  for (const [piece, weight] of parseComfyWeights(prompt))
    for (const word of piece.replaceAll('\n', ' ').split(' '))
      if (word !== '') words.push(tokenizer.tokenize(word).map((id) => [id, weight]));

  const length = tokenizer.maxLength;
  const chunks: [number, number][][] = [];
  let chunk: [number, number][] = [[tokenizer.bosId, 1]];
  const end = () => {
    chunk.push([tokenizer.eosId, 1]);
    while (chunk.length < length) chunk.push([tokenizer.padId, 1]);
    chunks.push(chunk);
    chunk = [[tokenizer.bosId, 1]];
  };
  for (let group of words) {
    const long = group.length >= LONG_WORD;
    while (group.length > 0) {
      if (group.length + chunk.length > length - 1) {
        if (long) {
          const room = length - chunk.length - 1;
          chunk.push(...group.slice(0, room));
          group = group.slice(room);
        }
        end();
      } else {
        chunk.push(...group);
        group = [];
      }
    }
  }
  end();
  return {
    ids: chunks.map((c) => c.map(([id]) => id)),
    weights: chunks.map((c) => c.map(([, weight]) => weight)),
  };
}

/**
 * A chunk's hidden states [tokens × width] with ComfyUI's weights applied: each weighted token's
 * state moved away from the empty text's state at its position by its weight.
 */
export function applyComfyWeights(
  hidden: Float32Array,
  empty: Float32Array,
  weights: readonly number[],
  width: number,
): Float32Array {
  const out = hidden.slice();
  for (let t = 0; t < weights.length; t++) {
    const w = weights[t]!;
    if (w === 1) continue;
    for (let k = t * width; k < (t + 1) * width; k++)
      out[k] = (hidden[k]! - empty[k]!) * w + empty[k]!;
  }
  return out;
}
