import { shapeSize, shapeToString, Tensor } from './tensor.js';

/**
 * The host arithmetic pipelines do between model calls (scheduler steps, guidance, batching,
 * image layout). Everything else runs in ONNX Runtime. Float32 in, float32 out; each result is
 * rounded to float32 as PyTorch's float32 ops round.
 */

type F32 = Tensor<'float32'>;

function sameShape(a: Tensor, b: Tensor, op: string): void {
  if (a.shape.length !== b.shape.length || a.shape.some((d, i) => d !== b.shape[i])) {
    throw new RangeError(
      `${op}: shapes ${shapeToString(a.shape)} and ${shapeToString(b.shape)} differ`,
    );
  }
}

/** Σ coefficient·tensor over same-shaped tensors, e.g. a scheduler update or guidance. */
export function combine(terms: readonly (readonly [number, F32])[]): F32 {
  const first = terms[0];
  if (first === undefined) throw new RangeError('combine needs at least one term');
  const out = new Float32Array(first[1].size);
  for (const [coefficient, t] of terms) {
    sameShape(first[1], t, 'combine');
    const data = t.data;
    for (let i = 0; i < out.length; i++) out[i] = out[i]! + Math.fround(coefficient * data[i]!);
  }
  return new Tensor('float32', first[1].shape, out);
}

export function map(t: F32, fn: (value: number, index: number) => number): F32 {
  const out = new Float32Array(t.size);
  const data = t.data;
  for (let i = 0; i < out.length; i++) out[i] = fn(data[i]!, i);
  return new Tensor('float32', t.shape, out);
}

export function zip(a: F32, b: F32, fn: (x: number, y: number) => number): F32 {
  sameShape(a, b, 'zip');
  const out = new Float32Array(a.size);
  const da = a.data;
  const db = b.data;
  for (let i = 0; i < out.length; i++) out[i] = fn(da[i]!, db[i]!);
  return new Tensor('float32', a.shape, out);
}

export const add = (a: F32, b: F32): F32 => zip(a, b, (x, y) => x + y);
export const sub = (a: F32, b: F32): F32 => zip(a, b, (x, y) => x - y);
export const mul = (a: F32, b: F32): F32 => zip(a, b, (x, y) => x * y);
export const scale = (a: F32, s: number): F32 => map(a, (x) => x * Math.fround(s));
export const clamp = (a: F32, lo: number, hi: number): F32 =>
  map(a, (x) => Math.min(Math.max(x, lo), hi));

function axisOf(rank: number, axis: number): number {
  const a = axis < 0 ? axis + rank : axis;
  if (a < 0 || a >= rank) throw new RangeError(`axis ${axis} is out of range for rank ${rank}`);
  return a;
}

/** Joins tensors along `axis`; all other dims must agree. */
export function concat<T extends Tensor>(tensors: readonly T[], axis = 0): T {
  const first = tensors[0];
  if (first === undefined) throw new RangeError('concat needs at least one tensor');
  const a = axisOf(first.rank, axis);
  for (const t of tensors) {
    if (
      t.dtype !== first.dtype ||
      t.rank !== first.rank ||
      t.shape.some((d, i) => i !== a && d !== first.shape[i])
    ) {
      throw new RangeError(
        `concat: ${t.dtype}${shapeToString(t.shape)} does not fit ${first.dtype}${shapeToString(first.shape)}`,
      );
    }
  }
  const outer = shapeSize(first.shape.slice(0, a));
  const inner = shapeSize(first.shape.slice(a + 1));
  const shape = [...first.shape];
  shape[a] = tensors.reduce((n, t) => n + t.shape[a]!, 0);
  const out = new Tensor(first.dtype, shape);
  const dst = out.data as Float32Array;
  let offset = 0;
  for (let o = 0; o < outer; o++) {
    for (const t of tensors) {
      const block = t.shape[a]! * inner;
      dst.set((t.data as Float32Array).subarray(o * block, (o + 1) * block), offset);
      offset += block;
    }
  }
  return out as T;
}

/** Elements [start, end) along `axis`, copied. */
export function slice<T extends Tensor>(t: T, axis: number, start: number, end: number): T {
  const a = axisOf(t.rank, axis);
  const dim = t.shape[a]!;
  if (!(0 <= start && start <= end && end <= dim)) {
    throw new RangeError(
      `slice [${start}, ${end}) is out of range for dim ${a} of ${shapeToString(t.shape)}`,
    );
  }
  const outer = shapeSize(t.shape.slice(0, a));
  const inner = shapeSize(t.shape.slice(a + 1));
  const shape = [...t.shape];
  shape[a] = end - start;
  const out = new Tensor(t.dtype, shape);
  const src = t.data as Float32Array;
  const dst = out.data as Float32Array;
  const width = (end - start) * inner;
  for (let o = 0; o < outer; o++) {
    dst.set(
      src.subarray(o * dim * inner + start * inner, o * dim * inner + end * inner),
      o * width,
    );
  }
  return out as T;
}

/** Splits along `axis` into `count` equal parts (`torch.chunk` with an exact division). */
export function chunk<T extends Tensor>(t: T, count: number, axis = 0): T[] {
  const a = axisOf(t.rank, axis);
  const dim = t.shape[a]!;
  if (dim % count !== 0)
    throw new RangeError(`chunk: dim ${dim} does not split into ${count} parts`);
  const size = dim / count;
  return Array.from({ length: count }, (_, i) => slice(t, a, i * size, (i + 1) * size));
}

/** Reorders dims: out.shape[i] = t.shape[perm[i]]. */
export function permute<T extends Tensor>(t: T, perm: readonly number[]): T {
  if (perm.length !== t.rank || [...perm].sort((x, y) => x - y).some((p, i) => p !== i)) {
    throw new RangeError(`permute: ${shapeToString(perm)} is not a permutation of ${t.rank} dims`);
  }
  const shape = perm.map((p) => t.shape[p]!);
  const out = new Tensor(t.dtype, shape);
  const strides = new Array<number>(t.rank);
  let s = 1;
  for (let i = t.rank - 1; i >= 0; i--) {
    strides[i] = s;
    s *= t.shape[i]!;
  }
  const permStrides = perm.map((p) => strides[p]!);
  const src = t.data as Float32Array;
  const dst = out.data as Float32Array;
  const index = new Array<number>(t.rank).fill(0);
  let from = 0;
  for (let to = 0; to < dst.length; to++) {
    dst[to] = src[from]!;
    for (let d = t.rank - 1; d >= 0; d--) {
      index[d]! += 1;
      from += permStrides[d]!;
      if (index[d]! < shape[d]!) break;
      from -= permStrides[d]! * shape[d]!;
      index[d] = 0;
    }
  }
  return out as T;
}

export interface Stats {
  min: number;
  max: number;
  mean: number;
  std: number;
}

/** Summary statistics (population std), for logs, tests and inspection. */
export function stats(t: Tensor): Stats {
  const values = t.dtype === 'float32' ? (t.data as Float32Array) : t.toFloat32().data;
  let min = Infinity;
  let max = -Infinity;
  let sum = 0;
  for (const v of values) {
    if (v < min) min = v;
    if (v > max) max = v;
    sum += v;
  }
  const mean = values.length > 0 ? sum / values.length : NaN;
  let squares = 0;
  for (const v of values) squares += (v - mean) ** 2;
  return { min, max, mean, std: Math.sqrt(squares / values.length) };
}
