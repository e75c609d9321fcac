import { Tensor } from '../tensor/tensor.js';

/**
 * The shapes world of shared/specs/shapes-world.md: 64×64 scenes of flat coloured circles, squares,
 * triangles and diamonds on a gray, white or black background, with captions from its grammar.
 * Scenes are sampled from a seeded generator, so a seed names a dataset.
 */

export const CANVAS = 64;

export const COLOURS = {
  red: [220, 38, 38],
  orange: [249, 115, 22],
  yellow: [234, 200, 8],
  green: [22, 163, 74],
  blue: [37, 99, 235],
  purple: [147, 51, 234],
  white: [250, 250, 250],
  black: [10, 10, 10],
} as const satisfies Record<string, readonly [number, number, number]>;
export type Colour = keyof typeof COLOURS;
export const COLOUR_NAMES = Object.keys(COLOURS) as Colour[];

export const BACKGROUNDS = {
  gray: [128, 128, 128],
  white: [250, 250, 250],
  black: [10, 10, 10],
} as const;
export type Background = keyof typeof BACKGROUNDS;
export const BACKGROUND_NAMES = Object.keys(BACKGROUNDS) as Background[];

export const SHAPES = ['circle', 'square', 'triangle', 'diamond'] as const;
export type ShapeKind = (typeof SHAPES)[number];

export type Size = 'small' | 'large';
export const SIZE_RANGE: Record<Size, readonly [number, number]> = {
  small: [8, 14],
  large: [20, 30],
};

export const POSITIONS = [
  'top left',
  'top',
  'top right',
  'left',
  'center',
  'right',
  'bottom left',
  'bottom',
  'bottom right',
] as const;
export type Position = (typeof POSITIONS)[number];
export const POSITION_PHRASES: Record<Position, string> = {
  'top left': 'in the top left corner',
  top: 'at the top',
  'top right': 'in the top right corner',
  left: 'on the left',
  center: 'in the center',
  right: 'on the right',
  'bottom left': 'in the bottom left corner',
  bottom: 'at the bottom',
  'bottom right': 'in the bottom right corner',
};

export const RELATIONS = ['left of', 'right of', 'above', 'below'] as const;
export type Relation = (typeof RELATIONS)[number];

/** Colour–shape pairs that training never sees, in images or captions. */
export const HELD_OUT: readonly (readonly [Colour, ShapeKind])[] = [
  ['purple', 'triangle'],
  ['orange', 'circle'],
  ['green', 'square'],
  ['yellow', 'diamond'],
];

export function isHeldOut(colour: Colour, shape: ShapeKind): boolean {
  return HELD_OUT.some(([c, s]) => c === colour && s === shape);
}

export interface SceneObject {
  readonly shape: ShapeKind;
  readonly colour: Colour;
  /** Longer side of the bounding box, in pixels. */
  readonly size: number;
  /** Centre of the bounding box. */
  readonly cx: number;
  readonly cy: number;
}

export interface Scene {
  readonly background: Background;
  readonly objects: readonly SceneObject[];
}

/** A uniform random source in [0, 1). */
export type Random = () => number;

/** mulberry32: a small, fast, seedable generator for data (not for model noise). */
export function seededRandom(seed: number): Random {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function pick<T>(random: Random, items: readonly T[]): T {
  return items[Math.floor(random() * items.length)]!;
}

function int(random: Random, lo: number, hi: number): number {
  return lo + Math.floor(random() * (hi - lo + 1));
}

// ---- geometry ----

/** Coverage of pixel (x, y) by a shape, anti-aliased by 4×4 supersampling. */
function coverage(o: SceneObject, x: number, y: number): number {
  let hits = 0;
  for (let sy = 0; sy < 4; sy++) {
    for (let sx = 0; sx < 4; sx++) {
      if (inside(o, x + (sx + 0.5) / 4, y + (sy + 0.5) / 4)) hits++;
    }
  }
  return hits / 16;
}

/** Whether point (px, py) (pixel coordinates, pixel centres at +0.5) is inside the shape. */
export function inside(o: SceneObject, px: number, py: number): boolean {
  const half = o.size / 2;
  const dx = px - o.cx;
  const dy = py - o.cy;
  switch (o.shape) {
    case 'circle':
      return dx * dx + dy * dy <= half * half;
    case 'square':
      return Math.abs(dx) <= half && Math.abs(dy) <= half;
    case 'diamond':
      return Math.abs(dx) + Math.abs(dy) <= half;
    case 'triangle': {
      // Apex at the top centre, base along the bottom edge.
      if (dy < -half || dy > half) return false;
      const t = (dy + half) / (2 * half); // 0 at the apex, 1 at the base
      return Math.abs(dx) <= t * half;
    }
  }
}

/** Bounding box [x0, y0, x1, y1) of an object (its longer side is `size`). */
export function bounds(o: SceneObject): [number, number, number, number] {
  const half = o.size / 2;
  return [o.cx - half, o.cy - half, o.cx + half, o.cy + half];
}

/** The centroid of the shape's area (a triangle's is lower than its box centre). */
export function centroid(o: SceneObject): [number, number] {
  return o.shape === 'triangle' ? [o.cx, o.cy + o.size / 6] : [o.cx, o.cy];
}

export function positionOf(x: number, y: number): Position {
  const col = Math.min(2, Math.floor((x / CANVAS) * 3));
  const row = Math.min(2, Math.floor((y / CANVAS) * 3));
  return POSITIONS[row * 3 + col]!;
}

export function sizeClass(size: number): Size | undefined {
  if (size >= SIZE_RANGE.small[0] && size <= SIZE_RANGE.small[1]) return 'small';
  if (size >= SIZE_RANGE.large[0] && size <= SIZE_RANGE.large[1]) return 'large';
  return undefined;
}

export function relationHolds(a: SceneObject, b: SceneObject, relation: Relation): boolean {
  const [ax, ay] = centroid(a);
  const [bx, by] = centroid(b);
  switch (relation) {
    case 'left of':
      return bx - ax >= 8;
    case 'right of':
      return ax - bx >= 8;
    case 'above':
      return by - ay >= 8;
    case 'below':
      return ay - by >= 8;
  }
}

function separated(a: SceneObject, b: SceneObject): boolean {
  const [ax0, ay0, ax1, ay1] = bounds(a);
  const [bx0, by0, bx1, by1] = bounds(b);
  return ax1 + 2 <= bx0 || bx1 + 2 <= ax0 || ay1 + 2 <= by0 || by1 + 2 <= ay0;
}

// ---- rendering ----

/** Renders scenes to NHWC uint8 [N, 64, 64, 3]. */
export function render(scenes: readonly Scene[]): Tensor<'uint8'> {
  const out = new Uint8Array(scenes.length * CANVAS * CANVAS * 3);
  scenes.forEach((scene, n) => {
    const bg = BACKGROUNDS[scene.background];
    const image = new Float32Array(CANVAS * CANVAS * 3);
    for (let i = 0; i < CANVAS * CANVAS; i++) image.set(bg, i * 3);
    for (const o of scene.objects) {
      const colour = COLOURS[o.colour];
      const [x0, y0, x1, y1] = bounds(o);
      for (let y = Math.max(0, Math.floor(y0) - 1); y < Math.min(CANVAS, Math.ceil(y1) + 1); y++) {
        for (
          let x = Math.max(0, Math.floor(x0) - 1);
          x < Math.min(CANVAS, Math.ceil(x1) + 1);
          x++
        ) {
          const c = coverage(o, x, y);
          if (c === 0) continue;
          const p = (y * CANVAS + x) * 3;
          for (let k = 0; k < 3; k++) image[p + k] = image[p + k]! * (1 - c) + colour[k]! * c;
        }
      }
    }
    for (let i = 0; i < image.length; i++) out[n * image.length + i] = Math.round(image[i]!);
  });
  return new Tensor('uint8', [scenes.length, CANVAS, CANVAS, 3], out);
}

// ---- sampling scenes ----

export interface SampleOptions {
  /** Exclude the held-out colour–shape pairs (training data). */
  readonly excludeHeldOut: boolean;
  /**
   * Fraction of single-object captions that leave the colour unnamed ("a circle"). The grammar
   * always names it; training with some colourless captions puts prompts such as the `single
   * object` category's in the training distribution. Default 0: the grammar exactly.
   */
  readonly colourless?: number;
}

export function randomSize(random: Random, size: Size | undefined): number {
  const range = SIZE_RANGE[size ?? pick(random, ['small', 'large'] as const)];
  return int(random, range[0], range[1]);
}

/** Places an object fully on the canvas, away from the others; undefined when there is no room. */
export function place(
  random: Random,
  partial: Omit<SceneObject, 'cx' | 'cy'>,
  others: readonly SceneObject[],
  accept: (o: SceneObject) => boolean = () => true,
): SceneObject | undefined {
  const half = partial.size / 2;
  for (let attempt = 0; attempt < 200; attempt++) {
    const cx = half + 1 + random() * (CANVAS - 2 - 2 * half);
    const cy = half + 1 + random() * (CANVAS - 2 - 2 * half);
    const o = { ...partial, cx, cy };
    if (accept(o) && others.every((p) => separated(o, p))) return o;
  }
  return undefined;
}

function colourFor(
  random: Random,
  shape: ShapeKind,
  background: Background,
  options: SampleOptions,
  avoid?: Colour,
): Colour {
  for (;;) {
    const c = pick(random, COLOUR_NAMES);
    if (c === background) continue;
    if (c === avoid) continue;
    if (options.excludeHeldOut && isHeldOut(c, shape)) continue;
    return c;
  }
}

export interface CaptionedScene {
  readonly scene: Scene;
  readonly caption: string;
}

const NUMBERS = ['one', 'two', 'three', 'four'] as const;

function article(next: string): string {
  return /^[aeiou]/.test(next) ? 'an' : 'a';
}

function objectPhrase(
  random: Random,
  o: { colour: Colour | undefined; shape: ShapeKind },
  size: Size | undefined,
  count = 1,
): string {
  const noun = count > 1 ? `${o.shape}s` : o.shape;
  const words = [size, o.colour, noun].filter((w) => w !== undefined).join(' ');
  if (count > 1) return `${NUMBERS[count - 1]} ${words}`;
  const determiner = pick(random, ['a', 'a', 'one'] as const);
  const first = words;
  return `${determiner === 'one' ? 'one' : article(first)} ${first}`;
}

const PREFIXES = [
  '',
  'a photo of',
  'an image of',
  'a picture of',
  'a drawing of',
  'there is',
] as const;

function withPrefix(random: Random, body: string): string {
  const prefix = pick(random, PREFIXES);
  return prefix === '' ? body : `${prefix} ${body}`;
}

/** One scene and a caption from the grammar, both random. */
export function sampleCaptioned(random: Random, options: SampleOptions): CaptionedScene {
  for (;;) {
    const result = tryCaption(random, options);
    if (result !== undefined) return result;
  }
}

function tryCaption(random: Random, options: SampleOptions): CaptionedScene | undefined {
  const form = random();
  const namedBackground = random() < 0.4;
  const background = pick(random, BACKGROUND_NAMES);
  const backgroundPhrase = namedBackground ? ` on a ${background} background` : '';
  const namedSize = (): Size | undefined =>
    random() < 0.5 ? pick(random, ['small', 'large'] as const) : undefined;

  if (form < 0.4) {
    // single object, optionally with a position
    const shape = pick(random, SHAPES);
    const colour = colourFor(random, shape, background, options);
    const size = namedSize();
    const position = random() < 0.6 ? pick(random, POSITIONS) : undefined;
    const o = place(random, { shape, colour, size: randomSize(random, size) }, [], (c) => {
      const [x, y] = centroid(c);
      return position === undefined || positionOf(x, y) === position;
    });
    if (o === undefined) return undefined;
    const where = position === undefined ? '' : ` ${POSITION_PHRASES[position]}`;
    const colourless = (options.colourless ?? 0) > 0 && random() < options.colourless!;
    const named = { shape: o.shape, colour: colourless ? undefined : o.colour };
    return {
      scene: { background, objects: [o] },
      caption: withPrefix(
        random,
        `${objectPhrase(random, named, size)}${where}${backgroundPhrase}`,
      ),
    };
  }
  if (form < 0.65) {
    // counts
    const count = int(random, 2, 4);
    const shape = pick(random, SHAPES);
    const colour = colourFor(random, shape, background, options);
    const size = random() < 0.3 ? pick(random, ['small', 'large'] as const) : undefined;
    // An unnamed size is either, chosen once for the scene.
    const sizeClassOfScene = size ?? pick(random, ['small', 'large'] as const);
    const objects: SceneObject[] = [];
    for (let i = 0; i < count; i++) {
      const o = place(
        random,
        { shape, colour, size: randomSize(random, sizeClassOfScene) },
        objects,
      );
      if (o === undefined) return undefined;
      objects.push(o);
    }
    return {
      scene: { background, objects },
      caption: withPrefix(
        random,
        `${objectPhrase(random, { colour, shape }, size, count)}${backgroundPhrase}`,
      ),
    };
  }
  // two objects: "and" or a relation
  const relation = random() < 0.3 ? undefined : pick(random, RELATIONS);
  const shapeA = pick(random, SHAPES);
  const colourA = colourFor(random, shapeA, background, options);
  let shapeB = pick(random, SHAPES);
  let colourB = colourFor(random, shapeB, background, options);
  for (let k = 0; k < 20 && shapeB === shapeA && colourB === colourA; k++) {
    shapeB = pick(random, SHAPES);
    colourB = colourFor(random, shapeB, background, options);
  }
  if (shapeB === shapeA && colourB === colourA) return undefined;
  const sizeA = namedSize();
  const sizeB = namedSize();
  const a = place(random, { shape: shapeA, colour: colourA, size: randomSize(random, sizeA) }, []);
  if (a === undefined) return undefined;
  const b = place(
    random,
    { shape: shapeB, colour: colourB, size: randomSize(random, sizeB) },
    [a],
    (o) => (relation === undefined ? true : relationHolds(a, o, relation)),
  );
  if (b === undefined) return undefined;
  const phraseA = objectPhrase(random, a, sizeA);
  const phraseB = objectPhrase(random, b, sizeB);
  const joined =
    relation === undefined
      ? `${phraseA} and ${phraseB}`
      : `${phraseA} ${relation === 'left of' || relation === 'right of' ? `to the ${relation}` : relation} ${phraseB}`;
  return {
    scene: { background, objects: [a, b] },
    caption: withPrefix(random, `${joined}${backgroundPhrase}`),
  };
}

/** A batch of training pairs: images NHWC uint8 and their captions. */
export function sampleBatch(
  random: Random,
  count: number,
  options: SampleOptions,
): { images: Tensor<'uint8'>; captions: string[]; scenes: Scene[] } {
  const pairs = Array.from({ length: count }, () => sampleCaptioned(random, options));
  return {
    images: render(pairs.map((p) => p.scene)),
    captions: pairs.map((p) => p.caption),
    scenes: pairs.map((p) => p.scene),
  };
}

/** Every word the caption grammar uses (the vocabulary of gesso's own text encoders). */
export const SHAPES_WORDS: readonly string[] = [
  ...new Set([
    ...'a an one two three four photo image picture drawing of there is and'.split(' '),
    'small',
    'large',
    ...COLOUR_NAMES,
    ...BACKGROUND_NAMES,
    'background',
    ...SHAPES,
    ...SHAPES.map((s) => `${s}s`),
    ...'in the top left right bottom corner at on center to above below'.split(' '),
  ]),
];
