import {
  BACKGROUND_NAMES,
  BACKGROUNDS,
  CANVAS,
  COLOUR_NAMES,
  COLOURS,
  inside,
  SHAPES,
  type Background,
  type Colour,
  type ShapeKind,
} from './shapes.js';

/**
 * A detector for the shapes world that reads pixels: the background from the border, objects as
 * connected regions that differ from it, each object's colour from its palette-nearest core colour,
 * its shape by the best overlap with the four ideal shapes fitted to its bounding box, its size as
 * the longer side of that box. Generated images are judged by this, so it tolerates soft edges and
 * slightly off colours, but not a shape that fits no template.
 */

export interface DetectedObject {
  readonly colour: Colour;
  /** The best-fitting shape, or undefined when none overlaps its template by at least `minIoU`. */
  readonly shape: ShapeKind | undefined;
  /** The overlap (intersection over union) with that shape's template. */
  readonly fit: number;
  readonly size: number;
  /** Centroid of the region's pixels. */
  readonly cx: number;
  readonly cy: number;
  readonly pixels: number;
}

export interface Detection {
  readonly background: Background;
  readonly objects: readonly DetectedObject[];
}

export interface DetectOptions {
  /** RGB distance from the background that makes a pixel foreground. */
  readonly threshold?: number;
  /** Regions smaller than this are noise. */
  readonly minPixels?: number;
  /** Least template overlap for a shape to be named. */
  readonly minIoU?: number;
}

function distance(a: ArrayLike<number>, b: ArrayLike<number>): number {
  return Math.hypot(a[0]! - b[0]!, a[1]! - b[1]!, a[2]! - b[2]!);
}

function nearest<K extends string>(
  rgb: ArrayLike<number>,
  table: Record<K, readonly number[]>,
  names: readonly K[],
): K {
  let best = names[0]!;
  let bestDistance = Infinity;
  for (const name of names) {
    const d = distance(rgb, table[name]);
    if (d < bestDistance) {
      bestDistance = d;
      best = name;
    }
  }
  return best;
}

/** Detects the objects of one 64×64 RGB image (row-major, 3 bytes a pixel). */
export function detect(image: Uint8Array, options: DetectOptions = {}): Detection {
  const threshold = options.threshold ?? 60;
  const minPixels = options.minPixels ?? 12;
  const minIoU = options.minIoU ?? 0.6;
  const n = CANVAS;
  const pixel = (i: number) => image.subarray(i * 3, i * 3 + 3);

  // Background: the border's median colour, snapped to the nearest background.
  const border: number[][] = [[], [], []];
  for (let i = 0; i < n; i++) {
    for (const p of [i, (n - 1) * n + i, i * n, i * n + n - 1])
      for (let k = 0; k < 3; k++) border[k]!.push(image[p * 3 + k]!);
  }
  const median = border.map((c) => c.sort((a, b) => a - b)[c.length >> 1]!);
  const background = nearest(median, BACKGROUNDS, BACKGROUND_NAMES);
  const bg = BACKGROUNDS[background];

  const foreground = new Uint8Array(n * n);
  for (let i = 0; i < n * n; i++) if (distance(pixel(i), bg) > threshold) foreground[i] = 1;

  const label = new Int32Array(n * n).fill(-1);
  const objects: DetectedObject[] = [];
  for (let start = 0; start < n * n; start++) {
    if (foreground[start] === 0 || label[start] !== -1) continue;
    const region: number[] = [];
    const stack = [start];
    label[start] = objects.length;
    while (stack.length > 0) {
      const p = stack.pop()!;
      region.push(p);
      const x = p % n;
      const y = (p - x) / n;
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const qx = x + dx;
          const qy = y + dy;
          if (qx < 0 || qy < 0 || qx >= n || qy >= n) continue;
          const q = qy * n + qx;
          if (foreground[q] === 1 && label[q] === -1) {
            label[q] = objects.length;
            stack.push(q);
          }
        }
      }
    }
    if (region.length < minPixels) continue;
    objects.push(describe(image, region, bg, minIoU));
  }
  return { background, objects };
}

/** Fraction of a pixel inside a shape (4×4 supersampling). */
function coverage(o: Parameters<typeof inside>[0], x: number, y: number): number {
  let hits = 0;
  for (let j = 0; j < 4; j++)
    for (let i = 0; i < 4; i++) if (inside(o, x + (i + 0.5) / 4, y + (j + 0.5) / 4)) hits++;
  return hits / 16;
}

/** Area of a shape of side `s`, as a multiple of s². */
const AREA: Record<ShapeKind, number> = {
  square: 1,
  circle: Math.PI / 4,
  diamond: 0.5,
  triangle: 0.5,
};

function describe(
  image: Uint8Array,
  region: readonly number[],
  bg: readonly number[],
  minIoU: number,
): DetectedObject {
  const n = CANVAS;
  // The colour of the region's core: pixels far from the background (edges blend into it).
  let far = 0;
  for (const p of region) far = Math.max(far, distance(image.subarray(p * 3, p * 3 + 3), bg));
  const sum = [0, 0, 0];
  let count = 0;
  for (const p of region) {
    const rgb = image.subarray(p * 3, p * 3 + 3);
    if (distance(rgb, bg) >= 0.7 * far) {
      for (let k = 0; k < 3; k++) sum[k]! += rgb[k]!;
      count++;
    }
  }
  const mean = sum.map((v) => v / Math.max(1, count));
  const colour = nearest(mean, COLOURS, COLOUR_NAMES);

  // Soft mask: how much of each pixel the object covers, from its colour between background and core.
  const span = Math.max(1, distance(mean, bg));
  const alpha = new Map<number, number>();
  let area = 0;
  let mx = 0;
  let my = 0;
  let x0 = n;
  let y0 = n;
  let x1 = 0;
  let y1 = 0;
  for (const p of region) {
    const a = Math.min(1, distance(image.subarray(p * 3, p * 3 + 3), bg) / span);
    const x = p % n;
    const y = (p - x) / n;
    alpha.set(p, a);
    area += a;
    mx += a * (x + 0.5);
    my += a * (y + 0.5);
    x0 = Math.min(x0, x);
    y0 = Math.min(y0, y);
    x1 = Math.max(x1, x + 1);
    y1 = Math.max(y1, y + 1);
  }
  mx /= area;
  my /= area;

  // Fit each shape with the size its area implies, centred on the region's centroid; keep the best.
  let shape: ShapeKind | undefined;
  let fit = 0;
  let size = Math.max(x1 - x0, y1 - y0);
  for (const kind of SHAPES) {
    const s = Math.sqrt(area / AREA[kind]);
    const template = {
      shape: kind,
      colour,
      size: s,
      cx: mx,
      cy: kind === 'triangle' ? my - s / 6 : my,
    };
    let intersection = 0;
    let union = 0;
    const lo = Math.max(0, Math.min(x0, Math.floor(mx - s / 2)) - 1);
    const hi = Math.min(n, Math.max(x1, Math.ceil(mx + s / 2)) + 1);
    const top = Math.max(0, Math.min(y0, Math.floor(template.cy - s / 2)) - 1);
    const bottom = Math.min(n, Math.max(y1, Math.ceil(template.cy + s / 2)) + 1);
    for (let y = top; y < bottom; y++) {
      for (let x = lo; x < hi; x++) {
        const a = alpha.get(y * n + x) ?? 0;
        const t = coverage(template, x, y);
        intersection += Math.min(a, t);
        union += Math.max(a, t);
      }
    }
    const iou = union === 0 ? 0 : intersection / union;
    if (iou > fit) {
      fit = iou;
      shape = kind;
      size = s;
    }
  }
  return {
    colour,
    shape: fit >= minIoU ? shape : undefined,
    fit,
    size,
    cx: mx,
    cy: my,
    pixels: region.length,
  };
}
