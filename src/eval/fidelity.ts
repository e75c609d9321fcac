import { detect, type DetectedObject, type Detection } from '../data/detect.js';
import {
  BACKGROUND_NAMES,
  CANVAS,
  centroid,
  place,
  randomSize,
  relationHolds,
  type Background,
  type Scene,
  type SceneObject,
  COLOUR_NAMES,
  HELD_OUT,
  isHeldOut,
  POSITION_PHRASES,
  POSITIONS,
  positionOf,
  RELATIONS,
  seededRandom,
  SHAPES,
  type Colour,
  type Position,
  type Random,
  type Relation,
  type ShapeKind,
  type Size,
} from '../data/shapes.js';
import type { Tensor } from '../tensor/tensor.js';

/**
 * Prompt fidelity on the shapes world, scored as GenEval scores real models: each prompt's image
 * passes or fails by what the pixel detector finds, a category's score is its pass rate, and the
 * overall score is the mean of the category scores (shared/specs/shapes-world.md).
 */

export const CATEGORIES = [
  'single object',
  'colour',
  'size',
  'position',
  'counting',
  'two objects',
  'spatial relation',
  'held-out pairs',
] as const;
export type Category = (typeof CATEGORIES)[number];

export type Expectation =
  | { kind: 'one'; shape: ShapeKind; colour?: Colour; size?: Size; position?: Position }
  | { kind: 'count'; shape: ShapeKind; colour: Colour; count: number }
  | { kind: 'pair'; a: [Colour, ShapeKind]; b: [Colour, ShapeKind]; relation?: Relation };

export interface FidelityPrompt {
  readonly category: Category;
  readonly prompt: string;
  readonly expect: Expectation;
}

const NUMBER_WORDS = ['one', 'two', 'three', 'four'];

function a(next: string): string {
  return /^[aeiou]/.test(next) ? `an ${next}` : `a ${next}`;
}

function pick<T>(random: Random, items: readonly T[]): T {
  return items[Math.floor(random() * items.length)]!;
}

function trainedPair(random: Random): [Colour, ShapeKind] {
  for (;;) {
    const shape = pick(random, SHAPES);
    const colour = pick(random, COLOUR_NAMES);
    if (!isHeldOut(colour, shape)) return [colour, shape];
  }
}

/** A seeded prompt set with `perCategory` prompts in each category. */
export function fidelityPrompts(seed: number, perCategory: number): FidelityPrompt[] {
  const random = seededRandom(seed);
  const out: FidelityPrompt[] = [];
  for (let i = 0; i < perCategory; i++) {
    const shape = SHAPES[i % SHAPES.length]!;
    out.push({ category: 'single object', prompt: a(shape), expect: { kind: 'one', shape } });
  }
  for (let i = 0; i < perCategory; i++) {
    const [colour, shape] = trainedPair(random);
    out.push({
      category: 'colour',
      prompt: a(`${colour} ${shape}`),
      expect: { kind: 'one', shape, colour },
    });
  }
  for (let i = 0; i < perCategory; i++) {
    const [colour, shape] = trainedPair(random);
    const size: Size = i % 2 === 0 ? 'small' : 'large';
    out.push({
      category: 'size',
      prompt: a(`${size} ${colour} ${shape}`),
      expect: { kind: 'one', shape, colour, size },
    });
  }
  for (let i = 0; i < perCategory; i++) {
    const [colour, shape] = trainedPair(random);
    const position = POSITIONS[i % POSITIONS.length]!;
    out.push({
      category: 'position',
      prompt: `${a(`${colour} ${shape}`)} ${POSITION_PHRASES[position]}`,
      expect: { kind: 'one', shape, colour, position },
    });
  }
  for (let i = 0; i < perCategory; i++) {
    const [colour, shape] = trainedPair(random);
    const count = 2 + (i % 3);
    out.push({
      category: 'counting',
      prompt: `${NUMBER_WORDS[count - 1]} ${colour} ${shape}s`,
      expect: { kind: 'count', shape, colour, count },
    });
  }
  const twoDistinct = (): [[Colour, ShapeKind], [Colour, ShapeKind]] => {
    for (;;) {
      const p = trainedPair(random);
      const q = trainedPair(random);
      if (p[0] !== q[0] || p[1] !== q[1]) return [p, q];
    }
  };
  for (let i = 0; i < perCategory; i++) {
    const [p, q] = twoDistinct();
    out.push({
      category: 'two objects',
      prompt: `${a(`${p[0]} ${p[1]}`)} and ${a(`${q[0]} ${q[1]}`)}`,
      expect: { kind: 'pair', a: p, b: q },
    });
  }
  for (let i = 0; i < perCategory; i++) {
    const [p, q] = twoDistinct();
    const relation = RELATIONS[i % RELATIONS.length]!;
    const words =
      relation === 'left of' || relation === 'right of' ? `to the ${relation}` : relation;
    out.push({
      category: 'spatial relation',
      prompt: `${a(`${p[0]} ${p[1]}`)} ${words} ${a(`${q[0]} ${q[1]}`)}`,
      expect: { kind: 'pair', a: p, b: q, relation },
    });
  }
  for (let i = 0; i < perCategory; i++) {
    const [colour, shape] = HELD_OUT[i % HELD_OUT.length]!;
    out.push({
      category: 'held-out pairs',
      prompt: a(`${colour} ${shape}`),
      expect: { kind: 'one', shape, colour },
    });
  }
  return out;
}

/** Size classes for judging generated images: the midpoint between the spec's ranges splits them. */
export function judgedSize(size: number): Size {
  return size < 17 ? 'small' : 'large';
}

function matches(o: DetectedObject, colour: Colour, shape: ShapeKind): boolean {
  return o.colour === colour && o.shape === shape;
}

function holds(a: DetectedObject, b: DetectedObject, relation: Relation): boolean {
  switch (relation) {
    case 'left of':
      return b.cx - a.cx >= 8;
    case 'right of':
      return a.cx - b.cx >= 8;
    case 'above':
      return b.cy - a.cy >= 8;
    case 'below':
      return a.cy - b.cy >= 8;
  }
}

/** Whether a detection satisfies a prompt's expectation. */
export function passes(expect: Expectation, detection: Detection): boolean {
  const objects = detection.objects;
  switch (expect.kind) {
    case 'one': {
      if (objects.length !== 1) return false;
      const o = objects[0]!;
      if (o.shape !== expect.shape) return false;
      if (expect.colour !== undefined && o.colour !== expect.colour) return false;
      if (expect.size !== undefined && judgedSize(o.size) !== expect.size) return false;
      if (expect.position !== undefined && positionOf(o.cx, o.cy) !== expect.position) return false;
      return true;
    }
    case 'count':
      return (
        objects.length === expect.count &&
        objects.every((o) => matches(o, expect.colour, expect.shape))
      );
    case 'pair': {
      if (objects.length !== 2) return false;
      const [x, y] = objects as [DetectedObject, DetectedObject];
      for (const [first, second] of [
        [x, y],
        [y, x],
      ] as const) {
        if (matches(first, ...expect.a) && matches(second, ...expect.b)) {
          if (expect.relation === undefined || holds(first, second, expect.relation)) return true;
        }
      }
      return false;
    }
  }
}

/**
 * What the pair prompts' images say about binding, beyond pass or fail: whether a model puts each
 * colour on its own shape and the first-named object on the named side, or only draws the words.
 */
export interface BindingDiagnosis {
  /** Images of pair prompts (two objects, relations) naming two colours and two shapes. */
  readonly pairImages: number;
  /** Of those, images of the two named colours and shapes with each colour on the other's shape. */
  readonly swapped: number;
  /** Images of relation prompts naming two colours that show exactly one object of each. */
  readonly relationImages: number;
  /** Of those, the first-named colour's object in the named relation to the other (any shapes). */
  readonly relationNamed: number;
  /** Of those, the first-named colour's object in the mirrored relation. */
  readonly relationMirrored: number;
}

const MIRRORED: Readonly<Record<Relation, Relation>> = {
  'left of': 'right of',
  'right of': 'left of',
  above: 'below',
  below: 'above',
};

/** Tallies binding outcomes over scored images (see BindingDiagnosis). */
export function diagnoseBinding(
  results: readonly { prompt: FidelityPrompt; detection: Detection }[],
): BindingDiagnosis {
  let pairImages = 0;
  let swapped = 0;
  let relationImages = 0;
  let relationNamed = 0;
  let relationMirrored = 0;
  for (const { prompt, detection } of results) {
    const expect = prompt.expect;
    if (expect.kind !== 'pair') continue;
    const [colourA, shapeA] = expect.a;
    const [colourB, shapeB] = expect.b;
    if (colourA === colourB) continue;
    if (shapeA !== shapeB) {
      pairImages++;
      // Swapped is the pair prompt with the shapes exchanged, in either order.
      if (passes({ kind: 'pair', a: [colourA, shapeB], b: [colourB, shapeA] }, detection))
        swapped++;
    }
    if (expect.relation === undefined) continue;
    const ofA = detection.objects.filter((o) => o.colour === colourA);
    const ofB = detection.objects.filter((o) => o.colour === colourB);
    if (ofA.length !== 1 || ofB.length !== 1) continue;
    relationImages++;
    if (holds(ofA[0]!, ofB[0]!, expect.relation)) relationNamed++;
    else if (holds(ofA[0]!, ofB[0]!, MIRRORED[expect.relation])) relationMirrored++;
  }
  return { pairImages, swapped, relationImages, relationNamed, relationMirrored };
}

export interface FidelityResult {
  readonly perCategory: Readonly<Record<Category, number>>;
  /** Mean of all category scores, held-out pairs included. */
  readonly overall: number;
  /** Mean of the category scores over the colour–shape pairs seen in training. */
  readonly overallSeen: number;
  readonly binding: BindingDiagnosis;
  readonly results: readonly { prompt: FidelityPrompt; passed: boolean; detection: Detection }[];
}

/** Scores images (NHWC uint8, one per prompt entry, in order). */
export function scoreFidelity(
  prompts: readonly FidelityPrompt[],
  images: Tensor<'uint8'>,
): FidelityResult {
  const pixels = CANVAS * CANVAS * 3;
  if (images.shape[1] !== CANVAS || images.shape[2] !== CANVAS) {
    throw new Error(
      `fidelity scoring reads ${CANVAS}×${CANVAS} images, got ${images.shape[2]}×${images.shape[1]}`,
    );
  }
  if (images.shape[0] !== prompts.length)
    throw new Error(`${images.shape[0]} images for ${prompts.length} prompts`);
  const results = prompts.map((prompt, i) => {
    const detection = detect((images.data as Uint8Array).subarray(i * pixels, (i + 1) * pixels));
    return { prompt, passed: passes(prompt.expect, detection), detection };
  });
  const perCategory = {} as Record<Category, number>;
  for (const category of CATEGORIES) {
    const mine = results.filter((r) => r.prompt.category === category);
    perCategory[category] =
      mine.length === 0 ? Number.NaN : mine.filter((r) => r.passed).length / mine.length;
  }
  const mean = (cs: readonly Category[]) => {
    const scored = cs.filter((c) => !Number.isNaN(perCategory[c]));
    return scored.reduce((s, c) => s + perCategory[c], 0) / scored.length;
  };
  return {
    perCategory,
    overall: mean(CATEGORIES),
    overallSeen: mean(CATEGORIES.filter((c) => c !== 'held-out pairs')),
    binding: diagnoseBinding(results),
    results,
  };
}

/**
 * A random scene that satisfies an expectation: what a perfect generator would draw for the
 * prompt. Used to check the detector and scoring (clean renders should pass), and as the real
 * images of each prompt for diversity.
 */
export function sceneFor(expect: Expectation, random: Random): Scene {
  for (;;) {
    const background = pick(random, BACKGROUND_NAMES);
    const colourOr = (c: Colour | undefined, shape: ShapeKind): Colour | undefined => {
      if (c !== undefined) return c === background ? undefined : c;
      for (;;) {
        const k = pick(random, COLOUR_NAMES);
        if (k !== background && !isHeldOut(k, shape)) return k;
      }
    };
    const objects: SceneObject[] = [];
    let ok = true;
    if (expect.kind === 'one') {
      const colour = colourOr(expect.colour, expect.shape);
      if (colour === undefined) continue;
      const sizeClass = expect.size ?? pick(random, ['small', 'large'] as const);
      const o = place(
        random,
        { shape: expect.shape, colour, size: randomSize(random, sizeClass) },
        [],
        (c) => {
          const [x, y] = centroid(c);
          return expect.position === undefined || positionOf(x, y) === expect.position;
        },
      );
      if (o === undefined) continue;
      objects.push(o);
    } else if (expect.kind === 'count') {
      if (expect.colour === background) continue;
      const sizeClass = pick(random, ['small', 'small', 'large'] as const);
      for (let i = 0; i < expect.count && ok; i++) {
        const o = place(
          random,
          { shape: expect.shape, colour: expect.colour, size: randomSize(random, sizeClass) },
          objects,
        );
        if (o === undefined) ok = false;
        else objects.push(o);
      }
    } else {
      if (expect.a[0] === background || expect.b[0] === background) continue;
      const a = place(
        random,
        { shape: expect.a[1], colour: expect.a[0], size: randomSize(random, undefined) },
        [],
      );
      const b =
        a === undefined
          ? undefined
          : place(
              random,
              { shape: expect.b[1], colour: expect.b[0], size: randomSize(random, undefined) },
              [a],
              (o) => (expect.relation === undefined ? true : relationHolds(a, o, expect.relation)),
            );
      if (a === undefined || b === undefined) ok = false;
      else objects.push(a, b);
    }
    if (ok) return { background: background as Background, objects };
  }
}
