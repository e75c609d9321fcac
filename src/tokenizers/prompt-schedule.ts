import { UserError } from '../errors.js';
import type { PromptSyntax } from './prompt.js';

/**
 * AUTOMATIC1111's prompts that change while sampling, and prompts composed of parts.
 *
 * - Prompt editing: `[to:when]` adds `to` after step `when`, `[from::when]` removes `from`
 *   then, `[from:to:when]` swaps one for the other. A `when` written with a decimal point is a
 *   fraction of the steps (`0.5`, `.25`, `1.0`), otherwise a step number. They nest.
 * - Alternation: `[a|b|c]` takes `a` at step 1, `b` at step 2, and so on round.
 * - Composition: `A AND B:0.5` denoises with each part as its own condition and adds their
 *   guidance, weighted (Liu et al., "Compositional Visual Generation with Composable Diffusion
 *   Models", 2022).
 *
 * The schedule of a prompt is a list of `[endStep, text]`: the text holds up to and including
 * `endStep`, the last one to the end. Text that does not parse as A1111's grammar (a `|` outside
 * an alternation, a trailing lone backslash) is the prompt itself for every step, as A1111 does;
 * brackets that do not pair are kept as written. A1111 parses an ambiguous grammar with lark,
 * which where stray brackets sit against an edit sometimes keeps the edit as text; this parser
 * always takes the edit. Emphasis (`(word:1.2)`) passes through untouched: it is read from the
 * text of each step (prompt.ts).
 */

type Piece =
  | { readonly kind: 'text'; readonly text: string }
  | {
      readonly kind: 'scheduled';
      readonly before: readonly Piece[];
      readonly after: readonly Piece[];
      readonly when: string;
    }
  | { readonly kind: 'alternate'; readonly options: readonly (readonly Piece[])[] };

/** Where a parse stopped and what it read; undefined when the construct does not parse. */
type Parsed = { readonly pieces: Piece[]; readonly end: number };

/** A1111's number (lark's SIGNED_NUMBER): sign, digits with an optional point, exponent. */
const NUMBER = /[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?/y;
const WHITESPACE = /\s*/y;
/** Characters plain text cannot hold unescaped. */
const SPECIAL = '\\[]():|';

class ScheduleParser {
  constructor(private readonly text: string) {}

  /** A run of text, emphasis, editing and alternation, up to the first character none can take. */
  sequence(start: number): Parsed {
    const pieces: Piece[] = [];
    let at = start;
    for (;;) {
      const plain = this.plain(at);
      if (plain > at) {
        pieces.push({ kind: 'text', text: this.text.slice(at, plain) });
        at = plain;
        continue;
      }
      const c = this.text[at];
      const construct = c === '[' ? this.square(at) : c === '(' ? this.round(at) : undefined;
      if (construct === undefined) return { pieces, end: at };
      pieces.push(...construct.pieces);
      at = construct.end;
    }
  }

  /** The end of plain text from `at` (characters other than SPECIAL, or any one escaped). */
  private plain(at: number): number {
    let end = at;
    while (end < this.text.length) {
      const c = this.text[end]!;
      if (c === '\\' && end + 1 < this.text.length) end += 2;
      else if (!SPECIAL.includes(c)) end += 1;
      else break;
    }
    return end;
  }

  /** `( prompt )` or `( prompt : prompt )`: emphasis, kept as written for prompt.ts. */
  private round(at: number): Parsed | undefined {
    const first = this.sequence(at + 1);
    if (this.text[first.end] === ')')
      return { pieces: [this.char('('), ...first.pieces, this.char(')')], end: first.end + 1 };
    if (this.text[first.end] !== ':') return undefined;
    const second = this.sequence(first.end + 1);
    if (this.text[second.end] !== ')') return undefined;
    return {
      pieces: [this.char('('), ...first.pieces, this.char(':'), ...second.pieces, this.char(')')],
      end: second.end + 1,
    };
  }

  /** `[ prompt ]` (emphasis), `[a|b|…]`, `[to:when]` or `[from:to:when]`. */
  private square(at: number): Parsed | undefined {
    const first = this.sequence(at + 1);
    const next = this.text[first.end];
    if (next === ']')
      return { pieces: [this.char('['), ...first.pieces, this.char(']')], end: first.end + 1 };
    if (next === '|') {
      const options = [first.pieces];
      let end = first.end;
      while (this.text[end] === '|') {
        const option = this.sequence(end + 1);
        options.push(option.pieces);
        end = option.end;
      }
      if (this.text[end] !== ']') return undefined;
      return { pieces: [{ kind: 'alternate', options }], end: end + 1 };
    }
    if (next !== ':') return undefined;
    const added = this.when(first.end + 1);
    if (added !== undefined)
      return {
        pieces: [{ kind: 'scheduled', before: [], after: first.pieces, when: added.number }],
        end: added.end,
      };
    const second = this.sequence(first.end + 1);
    if (this.text[second.end] !== ':') return undefined;
    const swapped = this.when(second.end + 1);
    if (swapped === undefined) return undefined;
    return {
      pieces: [
        { kind: 'scheduled', before: first.pieces, after: second.pieces, when: swapped.number },
      ],
      end: swapped.end,
    };
  }

  /** `NUMBER ]`, with whitespace allowed around the number. */
  private when(at: number): { number: string; end: number } | undefined {
    const skip = (from: number) => {
      WHITESPACE.lastIndex = from;
      WHITESPACE.exec(this.text);
      return WHITESPACE.lastIndex;
    };
    NUMBER.lastIndex = skip(at);
    const match = NUMBER.exec(this.text);
    if (match === null) return undefined;
    const close = skip(NUMBER.lastIndex);
    if (this.text[close] !== ']') return undefined;
    return { number: match[0], end: close + 1 };
  }

  private char(c: string): Piece {
    return { kind: 'text', text: c };
  }
}

/** The whole prompt as pieces; brackets and colons that fit nothing stay as text. */
function parseSchedule(prompt: string): Piece[] | undefined {
  const parser = new ScheduleParser(prompt);
  const pieces: Piece[] = [];
  let at = 0;
  for (;;) {
    const run = parser.sequence(at);
    pieces.push(...run.pieces);
    at = run.end;
    if (at >= prompt.length) return pieces;
    const c = prompt[at]!;
    if (!'[]():'.includes(c)) return undefined;
    pieces.push({ kind: 'text', text: c });
    at += 1;
  }
}

/** The step at which an edit happens: a fraction of `steps` when written with a point. */
function editStep(when: string, steps: number): number {
  const value = Number(when);
  return Math.min(steps, Math.trunc(when.includes('.') ? value * steps : value));
}

function visit(pieces: readonly Piece[], fn: (piece: Piece) => void): void {
  for (const piece of pieces) {
    fn(piece);
    if (piece.kind === 'scheduled') {
      visit(piece.before, fn);
      visit(piece.after, fn);
    } else if (piece.kind === 'alternate') piece.options.forEach((o) => visit(o, fn));
  }
}

function textAt(pieces: readonly Piece[], step: number, steps: number): string {
  let out = '';
  for (const piece of pieces) {
    if (piece.kind === 'text') out += piece.text;
    else if (piece.kind === 'scheduled')
      out += textAt(step <= editStep(piece.when, steps) ? piece.before : piece.after, step, steps);
    else out += textAt(piece.options[(step - 1) % piece.options.length]!, step, steps);
  }
  return out;
}

export type PromptSchedule = readonly (readonly [endStep: number, text: string])[];

/** A1111's `get_learned_conditioning_prompt_schedules` for one prompt. */
export function promptSchedule(prompt: string, steps: number): PromptSchedule {
  let pieces: Piece[] | undefined;
  try {
    pieces = parseSchedule(prompt);
  } catch (error) {
    // Brackets nested thousands deep exhaust the stack: read such a prompt as plain text.
    if (!(error instanceof RangeError)) throw error;
  }
  if (pieces === undefined) return [[steps, prompt]];
  const ends = new Set([steps]);
  visit(pieces, (piece) => {
    if (piece.kind === 'scheduled') {
      const step = editStep(piece.when, steps);
      if (step >= 1) ends.add(step);
    } else if (piece.kind === 'alternate') for (let s = 1; s <= steps; s++) ends.add(s);
  });
  return [...ends].sort((a, b) => a - b).map((end) => [end, textAt(pieces, end, steps)] as const);
}

/**
 * The text of a schedule at a sampling step counted from 0, as A1111 counts them (the first
 * text whose end is not before it); past the last end, the last text.
 */
export function scheduledText(schedule: PromptSchedule, step: number): string {
  return scheduleEntry(schedule, step)[1];
}

function scheduleEntry<T>(
  schedule: readonly (readonly [number, T])[],
  step: number,
): readonly [number, T] {
  return schedule.find(([end]) => step <= end) ?? schedule[schedule.length - 1]!;
}

/** `AND` as a word: Python's `\bAND\b`, whose word characters include every letter and digit. */
const AND = /(?<![\p{L}\p{N}_])AND(?![\p{L}\p{N}_])/u;
const WEIGHTED = /^([\s\S]*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$/;

export interface PromptPart {
  readonly text: string;
  readonly weight: number;
}

/** A1111's `get_multicond_prompt_list` for one prompt: its `AND` parts and their weights. */
export function composablePrompt(prompt: string): PromptPart[] {
  return prompt.split(AND).map((part) => {
    const match = WEIGHTED.exec(part);
    if (match === null) return { text: part, weight: 1 };
    return { text: match[1]!, weight: match[2] !== undefined ? Number(match[2]) : 1 };
  });
}

/** One image's conditions: its parts (weight, text index per step) and its negative prompt's. */
export interface ImageConditions {
  readonly parts: readonly { readonly weight: number; readonly schedule: IndexSchedule }[];
  /** undefined: the image is not guided. */
  readonly negative: IndexSchedule | undefined;
}

/** `[endStep, index into ConditioningPlan.texts]`; index −1 stands for zeros (no prompt at all). */
export type IndexSchedule = readonly (readonly [endStep: number, text: number])[];

/** Every distinct text to encode once, and what each image is conditioned on at each step. */
export interface ConditioningPlan {
  readonly texts: readonly string[];
  readonly images: readonly ImageConditions[];
  /** Whether some image has more than one part or a part weighted other than 1. */
  readonly composite: boolean;
  /** Whether some text changes between steps. */
  readonly scheduled: boolean;
}

/** A1111's extra-network tag, `re_extra_net` in its extra_networks.py: `<lora:name:weight>`. */
const EXTRA_NETWORK = /<([\p{L}\p{N}_]+):([^>]+)>/gu;

/** The tag types A1111 reads as LoRAs (`lyco` is LyCORIS's old name for the same tag). */
export const LORA_KINDS: ReadonlySet<string> = new Set(['lora', 'lyco']);

/** One extra-network tag, its arguments split as A1111's ExtraNetworkParams splits them. */
export interface ExtraNetworkTag {
  /** As written, `<lora:name:0.8>`. */
  readonly tag: string;
  /** The network type: `lora`, `hypernet`, … */
  readonly kind: string;
  /** The `:`-separated arguments without an `=` (the name first). */
  readonly positional: readonly string[];
  /** The `key=value` arguments. */
  readonly named: Readonly<Record<string, string>>;
}

/**
 * A1111's extra_networks.parse_prompt: the prompt with every extra-network tag taken out (as
 * A1111 takes them out before the prompt is read), and the tags in order.
 */
export function takeExtraNetworks(prompt: string): {
  readonly prompt: string;
  readonly tags: readonly ExtraNetworkTag[];
} {
  const tags: ExtraNetworkTag[] = [];
  const rest = prompt.replace(EXTRA_NETWORK, (tag, kind: string, args: string) => {
    const positional: string[] = [];
    const named: Record<string, string> = {};
    for (const item of args.split(':')) {
      const parts = item.split('=');
      if (parts.length === 2) named[parts[0]!] = parts[1]!;
      else positional.push(item);
    }
    tags.push({ tag, kind, positional, named });
    return '';
  });
  return { prompt: rest, tags };
}

/**
 * A tag left in a prompt the model is given would be encoded as words and steer the image in
 * silence; the command line and the server take LoRA tags out and merge their files first.
 */
export function refuseExtraNetworks(prompt: string, which: 'prompt' | 'negative prompt'): void {
  const tag = takeExtraNetworks(prompt).tags[0];
  if (tag !== undefined)
    throw new UserError(
      'bad-request',
      which === 'prompt' && LORA_KINDS.has(tag.kind)
        ? `the prompt names an extra network, ${tag.tag}, that was not loaded; gesso generate and gesso serve load <lora:NAME:WEIGHT> from --lora-dir DIR (or merge a file with --lora FILE[:SCALE])`
        : which === 'prompt'
          ? `the prompt names an extra network, ${tag.tag}, and gesso loads no '${tag.kind}' networks; remove the tag (LoRAs: <lora:NAME:WEIGHT> with --lora-dir DIR)`
          : `the negative prompt names an extra network, ${tag.tag}, and gesso loads networks only from the prompt; remove the tag`,
    );
}

/**
 * The conditioning of a batch as AUTOMATIC1111 reads prompts (`syntax` 'a1111': editing,
 * alternation and `AND` in prompts, editing and alternation in negative prompts) or as plain
 * text. `negatives[i]` null means zeros (SDXL with no negative prompt); `negatives` undefined
 * means no guidance.
 */
export function conditioningPlan(
  prompts: readonly string[],
  negatives: readonly (string | null)[] | undefined,
  steps: number,
  syntax: PromptSyntax,
): ConditioningPlan {
  const texts: string[] = [];
  const index = new Map<string, number>();
  const indexed = (schedule: PromptSchedule): IndexSchedule =>
    schedule.map(([end, text]) => {
      let i = index.get(text);
      if (i === undefined) {
        i = texts.push(text) - 1;
        index.set(text, i);
      }
      return [end, i] as const;
    });
  const scheduleOf = (text: string): PromptSchedule =>
    syntax === 'a1111' ? promptSchedule(text, steps) : [[steps, text]];
  if (syntax === 'a1111') {
    for (const text of prompts) refuseExtraNetworks(text, 'prompt');
    for (const text of negatives ?? [])
      if (text !== null) refuseExtraNetworks(text, 'negative prompt');
  }
  const images = prompts.map((prompt, i): ImageConditions => {
    const parts = syntax === 'a1111' ? composablePrompt(prompt) : [{ text: prompt, weight: 1 }];
    const negative = negatives?.[i];
    return {
      parts: parts.map((p) => ({ weight: p.weight, schedule: indexed(scheduleOf(p.text)) })),
      negative:
        negative === undefined
          ? undefined
          : negative === null
            ? [[steps, -1]]
            : indexed(scheduleOf(negative)),
    };
  });
  return {
    texts,
    images,
    composite: images.some((c) => c.parts.length > 1 || c.parts[0]!.weight !== 1),
    scheduled: images.some(
      (c) => c.parts.some((p) => p.schedule.length > 1) || (c.negative?.length ?? 0) > 1,
    ),
  };
}

/** The text index a schedule holds at a sampling step counted from 0 (see scheduledText). */
export function scheduledIndex(schedule: IndexSchedule, step: number): number {
  return scheduleEntry(schedule, step)[1];
}
