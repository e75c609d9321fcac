import { shapeSize as size, Tensor } from '../tensor/tensor.js';
import type { Attr, Graph, Node, Value } from './ir.js';

/**
 * A slow, exact reference interpreter of the IR in float64, written from the ONNX operator
 * specification independently of ONNX Runtime. It exists to check things: gradient rules against
 * central finite differences in float64 (ORT's CPU kernels are float32-only for many ops) and
 * graph semantics on small shapes. Every value is a float64 array; integer and boolean tensors hold
 * their numbers as doubles.
 */

export interface F64 {
  readonly shape: readonly number[];
  readonly data: Float64Array;
}

function strides(shape: readonly number[]): number[] {
  const out = new Array<number>(shape.length);
  let s = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    out[i] = s;
    s *= shape[i]!;
  }
  return out;
}

function tensor(shape: readonly number[], data?: Float64Array): F64 {
  return { shape: [...shape], data: data ?? new Float64Array(size(shape)) };
}

export function fromTensor(t: Tensor): F64 {
  return { shape: [...t.shape], data: Float64Array.from(t.toArray()) };
}

export function toTensor(t: F64): Tensor<'float64'> {
  return new Tensor('float64', t.shape, t.data);
}

function broadcastShape(a: readonly number[], b: readonly number[]): number[] {
  const rank = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < rank; i++) {
    const da = a[i - (rank - a.length)] ?? 1;
    const db = b[i - (rank - b.length)] ?? 1;
    if (da !== db && da !== 1 && db !== 1)
      throw new Error(`interpreter: [${a}] and [${b}] do not broadcast`);
    out.push(Math.max(da, db) === 1 ? 1 : da === 1 ? db : da);
  }
  return out;
}

/** Index into `t` for a position of a (larger) broadcast shape. */
function broadcastIndexer(
  from: readonly number[],
  to: readonly number[],
): (index: readonly number[]) => number {
  const s = strides(from);
  const offset = to.length - from.length;
  return (index) => {
    let k = 0;
    for (let i = 0; i < from.length; i++) if (from[i] !== 1) k += index[i + offset]! * s[i]!;
    return k;
  };
}

function forEachIndex(shape: readonly number[], fn: (index: number[], flat: number) => void): void {
  const n = size(shape);
  const index = new Array<number>(shape.length).fill(0);
  for (let flat = 0; flat < n; flat++) {
    fn(index, flat);
    for (let d = shape.length - 1; d >= 0; d--) {
      index[d]! += 1;
      if (index[d]! < shape[d]!) break;
      index[d] = 0;
    }
  }
}

function elementwise(inputs: readonly F64[], fn: (...xs: number[]) => number): F64 {
  const shape = inputs.map((t) => t.shape).reduce((a, b) => broadcastShape(a, b));
  const out = tensor(shape);
  const indexers = inputs.map((t) => broadcastIndexer(t.shape, shape));
  forEachIndex(shape, (index, flat) => {
    out.data[flat] = fn(...inputs.map((t, i) => t.data[indexers[i]!(index)]!));
  });
  return out;
}

function intAttr(node: Node, name: string, fallback: number): number {
  const a = node.attrs[name];
  return a?.kind === 'int' ? a.value : fallback;
}

function floatAttr(node: Node, name: string, fallback: number): number {
  const a = node.attrs[name];
  return a?.kind === 'float' ? a.value : fallback;
}

function intsAttr(node: Node, name: string): readonly number[] | undefined {
  const a: Attr | undefined = node.attrs[name];
  return a?.kind === 'ints' ? a.value : undefined;
}

function axis(a: number, rank: number): number {
  return a < 0 ? a + rank : a;
}

function erf(x: number): number {
  // Abramowitz–Stegun 7.1.26 is too coarse for float64 checks; use the series / continued fraction.
  const t = Math.abs(x);
  if (t < 2.5) {
    let sum = t;
    let term = t;
    for (let n = 1; n < 200; n++) {
      term *= (-t * t) / n;
      const add = term / (2 * n + 1);
      sum += add;
      if (Math.abs(add) < 1e-17 * Math.abs(sum)) break;
    }
    return Math.sign(x) * (2 / Math.sqrt(Math.PI)) * sum;
  }
  // erfc continued fraction (Lentz).
  let f = t;
  let c = t;
  let d = 0;
  for (let n = 1; n < 300; n++) {
    const an = n / 2;
    d = t + an * d;
    d = d === 0 ? 1e-300 : 1 / d;
    c = t + an / c;
    const delta = c * d;
    f *= delta;
    if (Math.abs(delta - 1) < 1e-16) break;
  }
  const erfc = Math.exp(-t * t) / (Math.sqrt(Math.PI) * f);
  return Math.sign(x) * (1 - erfc);
}

function reduce(
  x: F64,
  axes: readonly number[],
  keep: boolean,
  init: number,
  fn: (acc: number, v: number) => number,
  finish?: (acc: number, count: number) => number,
): F64 {
  const rank = x.shape.length;
  const ax = new Set(axes.map((a) => axis(a, rank)));
  const keptShape = x.shape.map((d, i) => (ax.has(i) ? 1 : d));
  const out = tensor(keptShape, new Float64Array(size(keptShape)).fill(init));
  const s = strides(keptShape);
  const count = size(x.shape) / size(keptShape);
  forEachIndex(x.shape, (index, flat) => {
    let k = 0;
    for (let i = 0; i < rank; i++) if (!ax.has(i)) k += index[i]! * s[i]!;
    out.data[k] = fn(out.data[k]!, x.data[flat]!);
  });
  if (finish !== undefined)
    for (let i = 0; i < out.data.length; i++) out.data[i] = finish(out.data[i]!, count);
  return keep
    ? out
    : tensor(
        x.shape.filter((_, i) => !ax.has(i)),
        out.data,
      );
}

function transpose(x: F64, perm: readonly number[]): F64 {
  const shape = perm.map((p) => x.shape[p]!);
  const out = tensor(shape);
  const s = strides(x.shape);
  forEachIndex(shape, (index, flat) => {
    let k = 0;
    for (let i = 0; i < perm.length; i++) k += index[i]! * s[perm[i]!]!;
    out.data[flat] = x.data[k]!;
  });
  return out;
}

function matmul(a: F64, b: F64): F64 {
  const a2 = a.shape.length === 1 ? tensor([1, a.shape[0]!], a.data) : a;
  const b2 = b.shape.length === 1 ? tensor([b.shape[0]!, 1], b.data) : b;
  const m = a2.shape[a2.shape.length - 2]!;
  const k = a2.shape[a2.shape.length - 1]!;
  const n = b2.shape[b2.shape.length - 1]!;
  const batch = broadcastShape(a2.shape.slice(0, -2), b2.shape.slice(0, -2));
  const out = tensor([...batch, m, n]);
  const ia = broadcastIndexer(a2.shape.slice(0, -2), batch);
  const ib = broadcastIndexer(b2.shape.slice(0, -2), batch);
  forEachIndex(batch, (index, flat) => {
    const oa = ia(index) * m * k;
    const ob = ib(index) * k * n;
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let p = 0; p < k; p++) s += a2.data[oa + i * k + p]! * b2.data[ob + p * n + j]!;
        out.data[flat * m * n + i * n + j] = s;
      }
    }
  });
  let shape = out.shape;
  if (a.shape.length === 1) shape = shape.filter((_, i) => i !== shape.length - 2);
  if (b.shape.length === 1) shape = shape.slice(0, -1);
  return tensor(shape, out.data);
}

function conv(node: Node, x: F64, w: F64, b: F64 | undefined, transposed: boolean): F64 {
  const spatial = x.shape.length - 2;
  if (spatial !== 2) throw new Error('interpreter: only 2-D convolutions');
  const strides = intsAttr(node, 'strides') ?? [1, 1];
  const pads = intsAttr(node, 'pads') ?? [0, 0, 0, 0];
  const dil = intsAttr(node, 'dilations') ?? [1, 1];
  const group = intAttr(node, 'group', 1);
  const [n, c, h, wd] = x.shape as [number, number, number, number];
  const kh = w.shape[2]!;
  const kw = w.shape[3]!;
  if (!transposed) {
    const m = w.shape[0]!;
    const cg = w.shape[1]!;
    const oh = Math.floor((h + pads[0]! + pads[2]! - dil[0]! * (kh - 1) - 1) / strides[0]!) + 1;
    const ow = Math.floor((wd + pads[1]! + pads[3]! - dil[1]! * (kw - 1) - 1) / strides[1]!) + 1;
    const out = tensor([n, m, oh, ow]);
    const mg = m / group;
    for (let b0 = 0; b0 < n; b0++)
      for (let o = 0; o < m; o++) {
        const g = Math.floor(o / mg);
        for (let y = 0; y < oh; y++)
          for (let xo = 0; xo < ow; xo++) {
            let s = b?.data[o] ?? 0;
            for (let ci = 0; ci < cg; ci++)
              for (let p = 0; p < kh; p++)
                for (let q = 0; q < kw; q++) {
                  const iy = y * strides[0]! - pads[0]! + p * dil[0]!;
                  const ix = xo * strides[1]! - pads[1]! + q * dil[1]!;
                  if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
                  s +=
                    x.data[((b0 * c + g * cg + ci) * h + iy) * wd + ix]! *
                    w.data[((o * cg + ci) * kh + p) * kw + q]!;
                }
            out.data[((b0 * m + o) * oh + y) * ow + xo] = s;
          }
      }
    return out;
  }
  const mg = w.shape[1]!;
  const m = mg * group;
  const cg = c / group;
  const outPad = intsAttr(node, 'output_padding') ?? [0, 0];
  const oh = strides[0]! * (h - 1) + outPad[0]! + (kh - 1) * dil[0]! + 1 - pads[0]! - pads[2]!;
  const ow = strides[1]! * (wd - 1) + outPad[1]! + (kw - 1) * dil[1]! + 1 - pads[1]! - pads[3]!;
  const out = tensor([n, m, oh, ow]);
  for (let b0 = 0; b0 < n; b0++)
    for (let ci = 0; ci < c; ci++) {
      const g = Math.floor(ci / cg);
      for (let y = 0; y < h; y++)
        for (let xi = 0; xi < wd; xi++) {
          const v = x.data[((b0 * c + ci) * h + y) * wd + xi]!;
          for (let o = 0; o < mg; o++)
            for (let p = 0; p < kh; p++)
              for (let q = 0; q < kw; q++) {
                const oy = y * strides[0]! - pads[0]! + p * dil[0]!;
                const ox = xi * strides[1]! - pads[1]! + q * dil[1]!;
                if (oy < 0 || oy >= oh || ox < 0 || ox >= ow) continue;
                out.data[((b0 * m + g * mg + o) * oh + oy) * ow + ox]! +=
                  v * w.data[((ci * mg + o) * kh + p) * kw + q]!;
              }
        }
    }
  if (b !== undefined)
    forEachIndex(out.shape, (index, flat) => (out.data[flat]! += b.data[index[1]!]!));
  return out;
}

function normalize(
  x: F64,
  groupShape: readonly number[],
  reduceAxes: readonly number[],
  eps: number,
): F64 {
  const grouped = tensor(groupShape, x.data);
  const mean = reduce(
    grouped,
    reduceAxes,
    true,
    0,
    (a, v) => a + v,
    (a, n) => a / n,
  );
  const centered = elementwise([grouped, mean], (v, m) => v - m);
  const variance = reduce(
    centered,
    reduceAxes,
    true,
    0,
    (a, v) => a + v * v,
    (a, n) => a / n,
  );
  const y = elementwise([centered, variance], (v, s) => v / Math.sqrt(s + eps));
  return tensor(x.shape, y.data);
}

const UNARY: Record<string, (x: number, node: Node) => number> = {
  Neg: (x) => -x,
  Exp: Math.exp,
  Log: Math.log,
  Sqrt: Math.sqrt,
  Reciprocal: (x) => 1 / x,
  Abs: Math.abs,
  Sigmoid: (x) => 1 / (1 + Math.exp(-x)),
  Tanh: Math.tanh,
  Erf: erf,
  Relu: (x) => Math.max(x, 0),
  Sin: Math.sin,
  Cos: Math.cos,
  Identity: (x) => x,
  LeakyRelu: (x, node) => (x >= 0 ? x : floatAttr(node, 'alpha', 0.01) * x),
};

const BINARY: Record<string, (a: number, b: number) => number> = {
  Add: (a, b) => a + b,
  Sub: (a, b) => a - b,
  Mul: (a, b) => a * b,
  Div: (a, b) => a / b,
  Pow: (a, b) => a ** b,
  Max: Math.max,
  Min: Math.min,
  Equal: (a, b) => (a === b ? 1 : 0),
  Less: (a, b) => (a < b ? 1 : 0),
  Greater: (a, b) => (a > b ? 1 : 0),
};

function run(node: Node, ins: (F64 | undefined)[]): F64[] {
  const x = ins[0]!;
  const u = UNARY[node.op];
  if (u !== undefined) return [elementwise([x], (v) => u(v, node))];
  const bfn = BINARY[node.op];
  if (bfn !== undefined) return [elementwise([x, ins[1]!], bfn)];
  const ints = (t: F64 | undefined) => Array.from(t?.data ?? [], Number);
  switch (node.op) {
    case 'Where':
      return [elementwise([x, ins[1]!, ins[2]!], (c, a, b) => (c !== 0 ? a : b))];
    case 'Cast': {
      const to = intAttr(node, 'to', 1);
      const integer = [2, 3, 5, 6, 7].includes(to);
      return [
        elementwise([x], (v) => (to === 9 ? (v !== 0 ? 1 : 0) : integer ? Math.trunc(v) : v)),
      ];
    }
    case 'MatMul':
      return [matmul(x, ins[1]!)];
    case 'Gemm': {
      let a = x;
      let b = ins[1]!;
      if (intAttr(node, 'transA', 0)) a = transpose(a, [1, 0]);
      if (intAttr(node, 'transB', 0)) b = transpose(b, [1, 0]);
      const alpha = floatAttr(node, 'alpha', 1);
      const beta = floatAttr(node, 'beta', 1);
      const ab = elementwise([matmul(a, b)], (v) => alpha * v);
      return [ins[2] === undefined ? ab : elementwise([ab, ins[2]], (p, c) => p + beta * c)];
    }
    case 'Conv':
      return [conv(node, x, ins[1]!, ins[2], false)];
    case 'ConvTranspose':
      return [conv(node, x, ins[1]!, ins[2], true)];
    case 'Reshape': {
      const target = ints(ins[1]);
      const shape = target.map((d, i) => (d === 0 ? x.shape[i]! : d));
      const unknown = shape.indexOf(-1);
      if (unknown >= 0) shape[unknown] = size(x.shape) / -size(shape);
      return [tensor(shape, x.data)];
    }
    case 'Transpose':
      return [
        transpose(x, intsAttr(node, 'perm') ?? x.shape.map((_, i) => x.shape.length - 1 - i)),
      ];
    case 'Concat': {
      const a = axis(intAttr(node, 'axis', 0), x.shape.length);
      const parts = ins as F64[];
      const shape = [...x.shape];
      shape[a] = parts.reduce((s, t) => s + t.shape[a]!, 0);
      const out = tensor(shape);
      const outer = size(shape.slice(0, a));
      const inner = size(shape.slice(a + 1));
      let offset = 0;
      for (let o = 0; o < outer; o++)
        for (const t of parts) {
          const block = t.shape[a]! * inner;
          out.data.set(t.data.subarray(o * block, (o + 1) * block), offset);
          offset += block;
        }
      return [out];
    }
    case 'Split': {
      const a = axis(intAttr(node, 'axis', 0), x.shape.length);
      const sizes = ints(ins[1]);
      let start = 0;
      return sizes.map((s) => {
        const r = sliceAxis(x, a, start, start + s, 1);
        start += s;
        return r;
      });
    }
    case 'Slice': {
      const starts = ints(ins[1]);
      const ends = ints(ins[2]);
      const axes = ins[3] !== undefined ? ints(ins[3]) : starts.map((_, i) => i);
      const steps = ins[4] !== undefined ? ints(ins[4]) : starts.map(() => 1);
      let out = x;
      axes.forEach((a0, i) => {
        const a = axis(a0, x.shape.length);
        const dim = out.shape[a]!;
        const step = steps[i]!;
        let s = starts[i]!;
        let e = ends[i]!;
        if (s < 0) s += dim;
        if (e < 0) e += dim;
        if (step > 0) {
          s = Math.min(Math.max(s, 0), dim);
          e = Math.min(Math.max(e, 0), dim);
        } else {
          s = Math.min(Math.max(s, -1), dim - 1);
          e = Math.min(Math.max(e, -1), dim - 1);
        }
        out = sliceAxis(out, a, s, e, step);
      });
      return [out];
    }
    case 'Unsqueeze': {
      const axes = ints(ins[1])
        .map((a) => axis(a, x.shape.length + ints(ins[1]).length))
        .sort((p, q) => p - q);
      const shape = [...x.shape];
      for (const a of axes) shape.splice(a, 0, 1);
      return [tensor(shape, x.data)];
    }
    case 'Squeeze': {
      const axes = new Set(ints(ins[1]).map((a) => axis(a, x.shape.length)));
      return [
        tensor(
          x.shape.filter((_, i) => !axes.has(i)),
          x.data,
        ),
      ];
    }
    case 'Expand': {
      const shape = broadcastShape(x.shape, ints(ins[1]));
      return [elementwise([x, tensor(shape)], (v) => v)];
    }
    case 'Gather': {
      const a = axis(intAttr(node, 'axis', 0), x.shape.length);
      const idx = ins[1]!;
      const outer = size(x.shape.slice(0, a));
      const inner = size(x.shape.slice(a + 1));
      const dim = x.shape[a]!;
      const shape = [...x.shape.slice(0, a), ...idx.shape, ...x.shape.slice(a + 1)];
      const out = tensor(shape);
      const count = idx.data.length;
      for (let o = 0; o < outer; o++)
        for (let j = 0; j < count; j++) {
          let k = idx.data[j]!;
          if (k < 0) k += dim;
          out.data.set(
            x.data.subarray((o * dim + k) * inner, (o * dim + k + 1) * inner),
            (o * count + j) * inner,
          );
        }
      return [out];
    }
    case 'ReduceMean':
      return [
        reduce(
          x,
          ints(ins[1]),
          intAttr(node, 'keepdims', 1) === 1,
          0,
          (a, v) => a + v,
          (a, n) => a / n,
        ),
      ];
    case 'ReduceSum':
      return [reduce(x, ints(ins[1]), intAttr(node, 'keepdims', 1) === 1, 0, (a, v) => a + v)];
    case 'ReduceMax':
      return [reduce(x, ints(ins[1]), intAttr(node, 'keepdims', 1) === 1, -Infinity, Math.max)];
    case 'Softmax': {
      const a = axis(intAttr(node, 'axis', -1), x.shape.length);
      const m = reduce(x, [a], true, -Infinity, Math.max);
      const e = elementwise([x, m], (v, mx) => Math.exp(v - mx));
      const s = reduce(e, [a], true, 0, (p, v) => p + v);
      return [elementwise([e, s], (v, t) => v / t)];
    }
    case 'LayerNormalization': {
      const a = axis(intAttr(node, 'axis', -1), x.shape.length);
      const y = normalize(
        x,
        x.shape,
        x.shape.map((_, i) => i).filter((i) => i >= a),
        floatAttr(node, 'epsilon', 1e-5),
      );
      const scaled = elementwise([y, ins[1]!], (v, s) => v * s);
      return [ins[2] === undefined ? scaled : elementwise([scaled, ins[2]], (v, b) => v + b)];
    }
    case 'GroupNormalization': {
      const groups = intAttr(node, 'num_groups', 1);
      const [n, c] = x.shape as [number, number];
      const y = normalize(
        x,
        [n, groups, size(x.shape) / n / groups],
        [2],
        floatAttr(node, 'epsilon', 1e-5),
      );
      const channelShape = [1, c, ...x.shape.slice(2).map(() => 1)];
      return [
        elementwise(
          [y, tensor(channelShape, ins[1]!.data), tensor(channelShape, ins[2]!.data)],
          (v, s, b) => v * s + b,
        ),
      ];
    }
    case 'InstanceNormalization': {
      const [n, c] = x.shape as [number, number];
      const y = normalize(x, [n, c, size(x.shape) / n / c], [2], floatAttr(node, 'epsilon', 1e-5));
      const channelShape = [1, c, ...x.shape.slice(2).map(() => 1)];
      return [
        elementwise(
          [y, tensor(channelShape, ins[1]!.data), tensor(channelShape, ins[2]!.data)],
          (v, s, b) => v * s + b,
        ),
      ];
    }
    case 'Resize': {
      const scales =
        ins[2] !== undefined
          ? Array.from(ins[2].data)
          : ints(ins[3]).map((d, i) => d / x.shape[i]!);
      const shape = x.shape.map((d, i) => Math.floor(d * scales[i]!));
      const out = tensor(shape);
      const s = strides(x.shape);
      forEachIndex(shape, (index, flat) => {
        let k = 0;
        for (let i = 0; i < shape.length; i++)
          k += Math.min(Math.floor(index[i]! / scales[i]!), x.shape[i]! - 1) * s[i]!;
        out.data[flat] = x.data[k]!;
      });
      return [out];
    }
    case 'AveragePool':
    case 'MaxPool': {
      const kernel = intsAttr(node, 'kernel_shape')!;
      const st = intsAttr(node, 'strides') ?? kernel;
      const pads = intsAttr(node, 'pads') ?? [0, 0, 0, 0];
      const [n, c, h, w] = x.shape as [number, number, number, number];
      const oh = Math.floor((h + pads[0]! + pads[2]! - kernel[0]!) / st[0]!) + 1;
      const ow = Math.floor((w + pads[1]! + pads[3]! - kernel[1]!) / st[1]!) + 1;
      const out = tensor([n, c, oh, ow]);
      for (let b = 0; b < n * c; b++)
        for (let y = 0; y < oh; y++)
          for (let xo = 0; xo < ow; xo++) {
            let acc = node.op === 'MaxPool' ? -Infinity : 0;
            let count = 0;
            for (let p = 0; p < kernel[0]!; p++)
              for (let q = 0; q < kernel[1]!; q++) {
                const iy = y * st[0]! - pads[0]! + p;
                const ix = xo * st[1]! - pads[1]! + q;
                if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                const v = x.data[(b * h + iy) * w + ix]!;
                acc = node.op === 'MaxPool' ? Math.max(acc, v) : acc + v;
                count++;
              }
            out.data[(b * oh + y) * ow + xo] = node.op === 'MaxPool' ? acc : acc / count;
          }
      return [out];
    }
    case 'Pad': {
      const pads = ints(ins[1]);
      const value = ins[2]?.data[0] ?? 0;
      const rank = x.shape.length;
      const shape = x.shape.map((d, i) => d + pads[i]! + pads[rank + i]!);
      const out = tensor(shape, new Float64Array(size(shape)).fill(value));
      const s = strides(shape);
      forEachIndex(x.shape, (index, flat) => {
        let k = 0;
        for (let i = 0; i < rank; i++) k += (index[i]! + pads[i]!) * s[i]!;
        out.data[k] = x.data[flat]!;
      });
      return [out];
    }
    case 'SpaceToDepth':
    case 'DepthToSpace': {
      const b = intAttr(node, 'blocksize', 1);
      const [n, c, h, w] = x.shape as [number, number, number, number];
      const toDepth = node.op === 'SpaceToDepth';
      const shape = toDepth ? [n, c * b * b, h / b, w / b] : [n, c / (b * b), h * b, w * b];
      const out = tensor(shape);
      // DCR: depth channel (dy·b + dx)·C + c ↔ pixel (y·b + dy, x·b + dx) of channel c.
      const [dn, dc, dh, dw] = toDepth ? (shape as [number, number, number, number]) : [n, c, h, w];
      const cs = dc / (b * b);
      for (let i = 0; i < dn; i++)
        for (let ch = 0; ch < dc; ch++)
          for (let y = 0; y < dh; y++)
            for (let xx = 0; xx < dw; xx++) {
              const k = Math.floor(ch / cs);
              const sc = ch % cs;
              const sy = y * b + Math.floor(k / b);
              const sx = xx * b + (k % b);
              const depthIndex = ((i * dc + ch) * dh + y) * dw + xx;
              const spaceIndex = ((i * cs + sc) * dh * b + sy) * dw * b + sx;
              if (toDepth) out.data[depthIndex] = x.data[spaceIndex]!;
              else out.data[spaceIndex] = x.data[depthIndex]!;
            }
      return [out];
    }
    case 'Shape':
      return [tensor([x.shape.length], Float64Array.from(x.shape))];
    case 'ArgMax': {
      const a = axis(intAttr(node, 'axis', 0), x.shape.length);
      const keep = intAttr(node, 'keepdims', 1) === 1;
      const kept = x.shape.map((d, i) => (i === a ? 1 : d));
      const best = tensor(kept, new Float64Array(size(kept)).fill(-Infinity));
      const out = tensor(kept);
      const s = strides(kept);
      forEachIndex(x.shape, (index, flat) => {
        let k = 0;
        for (let i = 0; i < index.length; i++) if (i !== a) k += index[i]! * s[i]!;
        if (x.data[flat]! > best.data[k]!) {
          best.data[k] = x.data[flat]!;
          out.data[k] = index[a]!;
        }
      });
      return [
        keep
          ? out
          : tensor(
              x.shape.filter((_, i) => i !== a),
              out.data,
            ),
      ];
    }
    default:
      throw new Error(
        `interpreter: op ${node.domain ? `${node.domain}.` : ''}${node.op} is not implemented`,
      );
  }
}

function sliceAxis(x: F64, a: number, start: number, end: number, step: number): F64 {
  const count = Math.max(0, Math.ceil((end - start) / step));
  const shape = [...x.shape];
  shape[a] = count;
  const out = tensor(shape);
  const s = strides(x.shape);
  forEachIndex(shape, (index, flat) => {
    let k = 0;
    for (let i = 0; i < shape.length; i++)
      k += (i === a ? start + index[i]! * step : index[i]!) * s[i]!;
    out.data[flat] = x.data[k]!;
  });
  return out;
}

/** Evaluates the graph on float64 feeds (by input name); returns the requested values. */
export function interpret(
  graph: Graph,
  feeds: Readonly<Record<string, F64>>,
  wanted: readonly Value[] = graph.outputs,
): F64[] {
  const values = new Map<Value, F64>();
  for (const input of graph.inputs) {
    const feed = feeds[input.name];
    if (feed === undefined) throw new Error(`interpreter: no feed for input '${input.name}'`);
    values.set(input, feed);
  }
  for (const [value, data] of graph.initializers) {
    if (!(data instanceof Tensor))
      throw new Error(`interpreter: initializer '${value.name}' is external; load it first`);
    values.set(value, fromTensor(data));
  }
  for (const node of graph.nodes) {
    const ins = node.inputs.map((v) => (v === null ? undefined : values.get(v)));
    const outs = run(node, ins);
    node.outputs.forEach((o, i) => values.set(o, outs[i]!));
  }
  return wanted.map((v) => {
    const r = values.get(v);
    if (r === undefined) throw new Error(`interpreter: '${v.name}' was not computed`);
    return r;
  });
}
