import type { DType } from '../tensor/dtype.js';
import { Tensor } from '../tensor/tensor.js';
import { attr, type Attr, type Dim, type Graph, type Shape, Value } from './ir.js';

/**
 * ONNX ops as functions over IR values, each inferring its output dtype and shape (numbers where
 * known, symbols where not). Numbers given as operands become scalar constants of the other
 * operand's dtype. Ops follow ONNX opset 21 semantics.
 */

export type Operand = Value | number;

let unknownDims = 0;
/** A dim whose size is only known when the graph runs. Written to ONNX as an unnamed dim. */
export function unknownDim(): string {
  return `?${unknownDims++}`;
}

export function isUnknownDim(d: Dim): boolean {
  return typeof d === 'string' && d.startsWith('?');
}

function graphOf(...operands: Operand[]): Graph {
  for (const o of operands) if (o instanceof Value) return o.graph;
  throw new Error('an op needs at least one graph value among its operands');
}

function dtypeOf(...operands: Operand[]): DType {
  for (const o of operands) if (o instanceof Value) return o.dtype;
  throw new Error('an op needs at least one graph value among its operands');
}

function lift(g: Graph, x: Operand, dtype: DType): Value {
  return x instanceof Value ? x : g.scalar(x, dtype);
}

function normalizeAxis(axis: number, rank: number): number {
  const a = axis < 0 ? axis + rank : axis;
  if (a < 0 || a >= rank) throw new Error(`axis ${axis} is out of range for rank ${rank}`);
  return a;
}

function dimsEqual(a: Dim, b: Dim): boolean {
  return a === b;
}

function shapeText(s: Shape): string {
  return `[${s.join(', ')}]`;
}

/** numpy-style broadcasting of two shapes. */
export function broadcastShapes(a: Shape, b: Shape): Dim[] {
  const rank = Math.max(a.length, b.length);
  const out: Dim[] = [];
  for (let i = 0; i < rank; i++) {
    const da = i < rank - a.length ? 1 : a[i - (rank - a.length)]!;
    const db = i < rank - b.length ? 1 : b[i - (rank - b.length)]!;
    if (dimsEqual(da, db) || db === 1) out.push(da);
    else if (da === 1) out.push(db);
    else if (typeof da === 'number' && typeof db === 'number') {
      throw new Error(`shapes ${shapeText(a)} and ${shapeText(b)} do not broadcast`);
    } else if (typeof da === 'number') out.push(da);
    else if (typeof db === 'number') out.push(db);
    else out.push(unknownDim());
  }
  return out;
}

export function node(
  op: string,
  inputs: readonly (Value | null)[],
  attrs: Readonly<Record<string, Attr>>,
  dtype: DType,
  shape: Shape,
  domain = '',
): Value {
  const g = graphOf(...inputs.filter((v): v is Value => v !== null));
  return g.addNode(op, inputs, attrs, [{ dtype, shape }], domain)[0]!;
}

// ---- elementwise ----

function unary(op: string, x: Value, attrs: Readonly<Record<string, Attr>> = {}): Value {
  return node(op, [x], attrs, x.dtype, x.shape);
}

function binary(op: string, a: Operand, b: Operand, outDType?: DType): Value {
  const g = graphOf(a, b);
  const dtype = dtypeOf(a, b);
  const va = lift(g, a, dtype);
  const vb = lift(g, b, dtype);
  if (va.dtype !== vb.dtype) throw new Error(`${op}: dtypes ${va.dtype} and ${vb.dtype} differ`);
  return node(op, [va, vb], {}, outDType ?? dtype, broadcastShapes(va.shape, vb.shape));
}

export const add = (a: Operand, b: Operand): Value => binary('Add', a, b);
export const sub = (a: Operand, b: Operand): Value => binary('Sub', a, b);
export const mul = (a: Operand, b: Operand): Value => binary('Mul', a, b);
export const div = (a: Operand, b: Operand): Value => binary('Div', a, b);
export const pow = (a: Operand, b: Operand): Value => binary('Pow', a, b);
export const equal = (a: Operand, b: Operand): Value => binary('Equal', a, b, 'bool');
export const less = (a: Operand, b: Operand): Value => binary('Less', a, b, 'bool');
export const greater = (a: Operand, b: Operand): Value => binary('Greater', a, b, 'bool');
export const max = (a: Operand, b: Operand): Value => binary('Max', a, b);
export const min = (a: Operand, b: Operand): Value => binary('Min', a, b);

export const neg = (x: Value): Value => unary('Neg', x);
export const exp = (x: Value): Value => unary('Exp', x);
export const log = (x: Value): Value => unary('Log', x);
export const sqrt = (x: Value): Value => unary('Sqrt', x);
export const reciprocal = (x: Value): Value => unary('Reciprocal', x);
export const abs = (x: Value): Value => unary('Abs', x);
export const sigmoid = (x: Value): Value => unary('Sigmoid', x);
export const tanh = (x: Value): Value => unary('Tanh', x);
export const erf = (x: Value): Value => unary('Erf', x);
export const relu = (x: Value): Value => unary('Relu', x);
export const sin = (x: Value): Value => unary('Sin', x);
export const cos = (x: Value): Value => unary('Cos', x);
export const identity = (x: Value): Value => unary('Identity', x);
export const leakyRelu = (x: Value, alpha: number): Value =>
  unary('LeakyRelu', x, { alpha: attr.float(alpha) });

export function where(condition: Value, a: Operand, b: Operand): Value {
  const g = condition.graph;
  const dtype = dtypeOf(a, b);
  const va = lift(g, a, dtype);
  const vb = lift(g, b, dtype);
  const shape = broadcastShapes(broadcastShapes(condition.shape, va.shape), vb.shape);
  return node('Where', [condition, va, vb], {}, dtype, shape);
}

export function cast(x: Value, to: DType): Value {
  if (x.dtype === to) return x;
  return node('Cast', [x], { to: attr.int(onnxDataType(to)) }, to, x.shape);
}

/** ONNX TensorProto.DataType codes. */
export function onnxDataType(dtype: DType): number {
  const codes: Record<DType, number> = {
    float32: 1,
    uint8: 2,
    int8: 3,
    int16: 5,
    int32: 6,
    int64: 7,
    bool: 9,
    float16: 10,
    float64: 11,
    bfloat16: 16,
  };
  return codes[dtype];
}

// ---- linear algebra ----

export function matmul(a: Value, b: Value): Value {
  if (a.rank === 0 || b.rank === 0) throw new Error('MatMul needs operands of rank 1 or more');
  const as = a.rank === 1 ? [1, ...a.shape] : [...a.shape];
  const bs = b.rank === 1 ? [...b.shape, 1] : [...b.shape];
  const k1 = as[as.length - 1]!;
  const k2 = bs[bs.length - 2]!;
  if (typeof k1 === 'number' && typeof k2 === 'number' && k1 !== k2) {
    throw new Error(
      `MatMul: shapes ${shapeText(a.shape)} and ${shapeText(b.shape)} do not multiply`,
    );
  }
  const batch = broadcastShapes(as.slice(0, -2), bs.slice(0, -2));
  const out: Dim[] = [...batch];
  if (a.rank > 1) out.push(as[as.length - 2]!);
  if (b.rank > 1) out.push(bs[bs.length - 1]!);
  return node('MatMul', [a, b], {}, a.dtype, out);
}

export interface GemmOptions {
  alpha?: number;
  beta?: number;
  transA?: boolean;
  transB?: boolean;
}

/** alpha * A' B' + beta * C for 2-D A and B. */
export function gemm(a: Value, b: Value, c: Value | null, options: GemmOptions = {}): Value {
  const { alpha = 1, beta = 1, transA = false, transB = false } = options;
  if (a.rank !== 2 || b.rank !== 2) throw new Error('Gemm needs 2-D operands');
  const m = transA ? a.shape[1]! : a.shape[0]!;
  const n = transB ? b.shape[0]! : b.shape[1]!;
  const attrs: Record<string, Attr> = {};
  if (alpha !== 1) attrs.alpha = attr.float(alpha);
  if (beta !== 1) attrs.beta = attr.float(beta);
  if (transA) attrs.transA = attr.int(1);
  if (transB) attrs.transB = attr.int(1);
  return node('Gemm', c === null ? [a, b] : [a, b, c], attrs, a.dtype, [m, n]);
}

// ---- convolution and pooling ----

export interface ConvOptions {
  strides?: readonly number[];
  /** [begin_0, begin_1, ..., end_0, end_1, ...], as in ONNX. */
  pads?: readonly number[];
  dilations?: readonly number[];
  group?: number;
}

function spatialOut(
  input: Dim,
  kernel: number,
  stride: number,
  padBegin: number,
  padEnd: number,
  dilation: number,
): Dim {
  const span = dilation * (kernel - 1) + 1;
  if (typeof input === 'number') return Math.floor((input + padBegin + padEnd - span) / stride) + 1;
  return stride === 1 && padBegin + padEnd === span - 1 ? input : unknownDim();
}

function convAttrs(spatial: number, options: ConvOptions) {
  const strides = options.strides ?? new Array<number>(spatial).fill(1);
  const pads = options.pads ?? new Array<number>(2 * spatial).fill(0);
  const dilations = options.dilations ?? new Array<number>(spatial).fill(1);
  const group = options.group ?? 1;
  if (strides.length !== spatial || pads.length !== 2 * spatial || dilations.length !== spatial) {
    throw new Error(`convolution options do not fit ${spatial} spatial dims`);
  }
  const attrs: Record<string, Attr> = {
    strides: attr.ints(strides),
    pads: attr.ints(pads),
    dilations: attr.ints(dilations),
  };
  if (group !== 1) attrs.group = attr.int(group);
  return { strides, pads, dilations, group, attrs };
}

/** A convolution's ONNX attributes and output shape, for `conv` and its quantized forms. */
export function convShape(
  x: Value,
  w: Value,
  options: ConvOptions = {},
): { attrs: Record<string, Attr>; shape: Dim[] } {
  const spatial = x.rank - 2;
  if (spatial < 1 || w.rank !== x.rank) {
    throw new Error(
      `Conv: input ${shapeText(x.shape)} and weight ${shapeText(w.shape)} do not fit`,
    );
  }
  const { strides, pads, dilations, group, attrs } = convAttrs(spatial, options);
  const channels = x.shape[1]!;
  const perGroup = w.shape[1]!;
  if (
    typeof channels === 'number' &&
    typeof perGroup === 'number' &&
    channels !== perGroup * group
  ) {
    throw new Error(
      `Conv: input has ${channels} channels, weight ${shapeText(w.shape)} expects ${Number(perGroup) * group}`,
    );
  }
  const kernel = w.shape.slice(2).map(Number);
  attrs.kernel_shape = attr.ints(kernel);
  const out: Dim[] = [x.shape[0]!, w.shape[0]!];
  for (let i = 0; i < spatial; i++) {
    out.push(
      spatialOut(
        x.shape[2 + i]!,
        kernel[i]!,
        strides[i]!,
        pads[i]!,
        pads[spatial + i]!,
        dilations[i]!,
      ),
    );
  }
  return { attrs, shape: out };
}

export function conv(x: Value, w: Value, b: Value | null, options: ConvOptions = {}): Value {
  const { attrs, shape } = convShape(x, w, options);
  return node('Conv', b === null ? [x, w] : [x, w, b], attrs, x.dtype, shape);
}

export interface ConvTransposeOptions extends ConvOptions {
  outputPadding?: readonly number[];
}

export function convTranspose(
  x: Value,
  w: Value,
  b: Value | null,
  options: ConvTransposeOptions = {},
): Value {
  const spatial = x.rank - 2;
  const { strides, pads, dilations, group, attrs } = convAttrs(spatial, options);
  const outputPadding = options.outputPadding ?? new Array<number>(spatial).fill(0);
  if (outputPadding.some((p) => p !== 0)) attrs.output_padding = attr.ints(outputPadding);
  const kernel = w.shape.slice(2).map(Number);
  attrs.kernel_shape = attr.ints(kernel);
  const outChannels = w.shape[1]!;
  const out: Dim[] = [
    x.shape[0]!,
    typeof outChannels === 'number' ? outChannels * group : unknownDim(),
  ];
  for (let i = 0; i < spatial; i++) {
    const input = x.shape[2 + i]!;
    out.push(
      typeof input === 'number'
        ? strides[i]! * (input - 1) +
            outputPadding[i]! +
            (kernel[i]! - 1) * dilations[i]! +
            1 -
            pads[i]! -
            pads[spatial + i]!
        : unknownDim(),
    );
  }
  return node('ConvTranspose', b === null ? [x, w] : [x, w, b], attrs, x.dtype, out);
}

export interface PoolOptions {
  kernel: readonly number[];
  strides?: readonly number[];
  pads?: readonly number[];
}

function pool(op: string, x: Value, options: PoolOptions, extra: Record<string, Attr>): Value {
  const spatial = x.rank - 2;
  const strides = options.strides ?? options.kernel;
  const pads = options.pads ?? new Array<number>(2 * spatial).fill(0);
  const out: Dim[] = [x.shape[0]!, x.shape[1]!];
  for (let i = 0; i < spatial; i++) {
    out.push(
      spatialOut(x.shape[2 + i]!, options.kernel[i]!, strides[i]!, pads[i]!, pads[spatial + i]!, 1),
    );
  }
  return node(
    op,
    [x],
    {
      kernel_shape: attr.ints(options.kernel),
      strides: attr.ints(strides),
      pads: attr.ints(pads),
      ...extra,
    },
    x.dtype,
    out,
  );
}

/** Average pooling; padding never counts toward the average (PyTorch's count_include_pad=False). */
export const averagePool = (x: Value, options: PoolOptions): Value =>
  pool('AveragePool', x, options, {});
export const maxPool = (x: Value, options: PoolOptions): Value => pool('MaxPool', x, options, {});

// ---- shape manipulation ----

const INT64_MAX = 2n ** 63n - 1n;

/** An int64 vector constant; infinities clamp to the int64 range (ONNX's 'to the end'). */
function int64Constant(g: Graph, values: readonly number[]): Value {
  const clamped = values.map((v) =>
    v >= 2 ** 63 ? INT64_MAX : v <= -(2 ** 63) ? -INT64_MAX - 1n : BigInt(v),
  );
  return g.constant(Tensor.int64([values.length], clamped));
}

/** ONNX Reshape: 0 copies the input dim, -1 is inferred. */
export function reshape(x: Value, shape: readonly number[]): Value {
  const out: Dim[] = shape.map((d, i) => (d === 0 ? x.shape[i]! : d));
  const unknown = out.indexOf(-1);
  if (unknown >= 0) {
    const total = x.staticShape()?.reduce((n, d) => n * d, 1);
    const rest = out.filter((_, i) => i !== unknown);
    if (total !== undefined && rest.every((d): d is number => typeof d === 'number')) {
      const known = rest.reduce((n, d) => n * d, 1);
      if (known === 0 || total % known !== 0) {
        throw new Error(`Reshape: cannot reshape ${shapeText(x.shape)} to ${shapeText(shape)}`);
      }
      out[unknown] = total / known;
    } else {
      out[unknown] = unknownDim();
    }
  }
  const before = x.staticShape()?.reduce((n, d) => n * d, 1);
  const after = out.every((d) => typeof d === 'number')
    ? (out as number[]).reduce((n, d) => n * d, 1)
    : undefined;
  if (before !== undefined && after !== undefined && before !== after) {
    throw new Error(`Reshape: cannot reshape ${shapeText(x.shape)} to ${shapeText(shape)}`);
  }
  return node('Reshape', [x, int64Constant(x.graph, shape)], {}, x.dtype, out);
}

export function transpose(x: Value, perm: readonly number[]): Value {
  if (perm.length !== x.rank)
    throw new Error(`Transpose: perm ${shapeText(perm)} for rank ${x.rank}`);
  return node(
    'Transpose',
    [x],
    { perm: attr.ints(perm) },
    x.dtype,
    perm.map((p) => x.shape[p]!),
  );
}

export function concat(values: readonly Value[], axis: number): Value {
  const first = values[0];
  if (first === undefined) throw new Error('Concat needs at least one value');
  const a = normalizeAxis(axis, first.rank);
  const out: Dim[] = [...first.shape];
  let total: Dim = 0;
  for (const v of values) {
    if (v.rank !== first.rank) throw new Error('Concat: ranks differ');
    const d = v.shape[a]!;
    total = typeof total === 'number' && typeof d === 'number' ? total + d : unknownDim();
  }
  out[a] = total;
  return node('Concat', values, { axis: attr.int(a) }, first.dtype, out);
}

/** x[starts:ends:steps] along `axes` (defaults: every axis from 0, step 1); `Infinity` ends at the end. */
export function slice(
  x: Value,
  starts: readonly number[],
  ends: readonly number[],
  axes?: readonly number[],
  steps?: readonly number[],
): Value {
  const ax = (axes ?? starts.map((_, i) => i)).map((a) => normalizeAxis(a, x.rank));
  const st = steps ?? starts.map(() => 1);
  const out: Dim[] = [...x.shape];
  ax.forEach((a, i) => {
    const dim = x.shape[a]!;
    const step = st[i]!;
    let start = starts[i]!;
    let end = ends[i]!;
    if (typeof dim !== 'number') {
      out[a] = start === 0 && end >= 2 ** 62 && step === 1 ? dim : unknownDim();
      return;
    }
    if (start < 0) start += dim;
    if (end < 0) end += dim;
    if (step > 0) {
      start = Math.min(Math.max(start, 0), dim);
      end = Math.min(Math.max(end, 0), dim);
      out[a] = Math.max(0, Math.ceil((end - start) / step));
    } else {
      start = Math.min(Math.max(start, -1), dim - 1);
      end = Math.min(Math.max(end, -1), dim - 1);
      out[a] = Math.max(0, Math.ceil((start - end) / -step));
    }
  });
  const g = x.graph;
  const inputs = [x, int64Constant(g, starts), int64Constant(g, ends)];
  inputs.push(int64Constant(g, ax));
  if (st.some((s) => s !== 1)) inputs.push(int64Constant(g, st));
  return node('Slice', inputs, {}, x.dtype, out);
}

/** Splits `x` along `axis` into pieces of the given sizes. */
export function split(x: Value, sizes: readonly number[], axis: number): Value[] {
  const a = normalizeAxis(axis, x.rank);
  const dim = x.shape[a]!;
  const total = sizes.reduce((n, s) => n + s, 0);
  if (typeof dim === 'number' && dim !== total) {
    throw new Error(`Split: sizes ${shapeText(sizes)} do not add up to dim ${dim}`);
  }
  const types = sizes.map((s) => {
    const shape = [...x.shape];
    shape[a] = s;
    return { dtype: x.dtype, shape };
  });
  return x.graph.addNode('Split', [x, int64Constant(x.graph, sizes)], { axis: attr.int(a) }, types);
}

export function unsqueeze(x: Value, axes: readonly number[]): Value {
  const rank = x.rank + axes.length;
  const normalized = axes.map((a) => normalizeAxis(a, rank)).sort((p, q) => p - q);
  const out: Dim[] = [];
  let source = 0;
  for (let i = 0; i < rank; i++) out.push(normalized.includes(i) ? 1 : x.shape[source++]!);
  return node('Unsqueeze', [x, int64Constant(x.graph, normalized)], {}, x.dtype, out);
}

export function squeeze(x: Value, axes: readonly number[]): Value {
  const normalized = axes.map((a) => normalizeAxis(a, x.rank));
  for (const a of normalized) {
    const d = x.shape[a]!;
    if (typeof d === 'number' && d !== 1)
      throw new Error(`Squeeze: dim ${a} of ${shapeText(x.shape)} is not 1`);
  }
  const out = x.shape.filter((_, i) => !normalized.includes(i));
  return node('Squeeze', [x, int64Constant(x.graph, normalized)], {}, x.dtype, out);
}

/** Broadcasts `x` to `shape` (numpy rules, so the result may be larger than `shape`). */
export function expand(x: Value, shape: readonly number[]): Value {
  const out = broadcastShapes(x.shape, shape);
  return node('Expand', [x, int64Constant(x.graph, shape)], {}, x.dtype, out);
}

export function gather(data: Value, indices: Value, axis = 0): Value {
  const a = normalizeAxis(axis, data.rank);
  const out = [...data.shape.slice(0, a), ...indices.shape, ...data.shape.slice(a + 1)];
  return node('Gather', [data, indices], { axis: attr.int(a) }, data.dtype, out);
}

/** Constant-value padding; `pads` is [begin_0, ..., end_0, ...] over all axes, as in ONNX. */
export function pad(x: Value, pads: readonly number[], value = 0): Value {
  if (pads.length !== 2 * x.rank) throw new Error(`Pad: ${pads.length} pads for rank ${x.rank}`);
  const out = x.shape.map((d, i) =>
    typeof d === 'number'
      ? d + pads[i]! + pads[x.rank + i]!
      : pads[i] === 0 && pads[x.rank + i] === 0
        ? d
        : unknownDim(),
  );
  const g = x.graph;
  return node('Pad', [x, int64Constant(g, pads), g.scalar(value, x.dtype)], {}, x.dtype, out);
}

/** Nearest-neighbour upsampling by integer factors on the spatial dims (PyTorch's 'nearest'). */
export function upsampleNearest(x: Value, factors: readonly number[]): Value {
  const spatial = x.rank - 2;
  if (factors.length !== spatial) throw new Error('upsampleNearest: one factor per spatial dim');
  const scales = [1, 1, ...factors];
  const out = x.shape.map((d, i) =>
    typeof d === 'number' ? d * scales[i]! : scales[i] === 1 ? d : unknownDim(),
  );
  const g = x.graph;
  const scaleValue = g.constant(Tensor.float32([scales.length], scales));
  return node(
    'Resize',
    [x, null, scaleValue],
    {
      mode: attr.string('nearest'),
      coordinate_transformation_mode: attr.string('asymmetric'),
      nearest_mode: attr.string('floor'),
    },
    x.dtype,
    out,
  );
}

/** The runtime shape of `x` as an int64 vector (optionally dims [start, end)). */
export function shapeOf(x: Value, start?: number, end?: number): Value {
  const attrs: Record<string, Attr> = {};
  if (start !== undefined) attrs.start = attr.int(start);
  if (end !== undefined) attrs.end = attr.int(end);
  const from = start === undefined ? 0 : start < 0 ? start + x.rank : start;
  const to = end === undefined ? x.rank : end < 0 ? end + x.rank : end;
  return node('Shape', [x], attrs, 'int64', [Math.max(0, to - from)]);
}

/** Reshapes `x` to the runtime shape of `like` (same element count). */
export function reshapeLike(x: Value, like: Value): Value {
  return node('Reshape', [x, shapeOf(like)], {}, x.dtype, like.shape);
}

/**
 * Nearest-neighbour resize of the spatial dims to those of `like` (PyTorch's
 * `interpolate(size=..., mode='nearest')`), for upsampling onto a skip connection's size.
 */
export function resizeNearestLike(x: Value, like: Value): Value {
  const sizes = concat([shapeOf(x, 0, 2), shapeOf(like, 2)], 0);
  return node(
    'Resize',
    [x, null, null, sizes],
    {
      mode: attr.string('nearest'),
      coordinate_transformation_mode: attr.string('asymmetric'),
      nearest_mode: attr.string('floor'),
    },
    x.dtype,
    [x.shape[0]!, x.shape[1]!, ...like.shape.slice(2)],
  );
}

/** Index of the largest element along `axis` (the first one on ties). */
export function argMax(x: Value, axis: number, keepdims = false): Value {
  const a = normalizeAxis(axis, x.rank);
  const out = x.shape.flatMap((d, i) => (i !== a ? [d] : keepdims ? [1] : []));
  return node(
    'ArgMax',
    [x],
    { axis: attr.int(a), keepdims: attr.int(keepdims ? 1 : 0) },
    'int64',
    out,
  );
}

/** [B, C, H, W] → [B, C·b², H/b, W/b]: each b×b block becomes channels ((dy·b + dx)·C + c). */
export function spaceToDepth(x: Value, block: number): Value {
  const [n, c, h, w] = x.shape;
  const down = (d: Dim | undefined) => (typeof d === 'number' ? d / block : unknownDim());
  const channels = typeof c === 'number' ? c * block * block : unknownDim();
  return node('SpaceToDepth', [x], { blocksize: attr.int(block) }, x.dtype, [
    n!,
    channels,
    down(h),
    down(w),
  ]);
}

/** The inverse of spaceToDepth (DepthToSpace in DCR order). */
export function depthToSpace(x: Value, block: number): Value {
  const [n, c, h, w] = x.shape;
  const up = (d: Dim | undefined) => (typeof d === 'number' ? d * block : unknownDim());
  const channels = typeof c === 'number' ? c / (block * block) : unknownDim();
  return node(
    'DepthToSpace',
    [x],
    { blocksize: attr.int(block), mode: attr.string('DCR') },
    x.dtype,
    [n!, channels, up(h), up(w)],
  );
}

// ---- reductions and normalization ----

function reduce(op: string, x: Value, axes: readonly number[], keepdims: boolean): Value {
  const normalized = axes.map((a) => normalizeAxis(a, x.rank));
  const out: Dim[] = [];
  x.shape.forEach((d, i) => {
    if (!normalized.includes(i)) out.push(d);
    else if (keepdims) out.push(1);
  });
  return node(
    op,
    [x, int64Constant(x.graph, normalized)],
    { keepdims: attr.int(keepdims ? 1 : 0) },
    x.dtype,
    out,
  );
}

export const reduceMean = (x: Value, axes: readonly number[], keepdims = true): Value =>
  reduce('ReduceMean', x, axes, keepdims);
export const reduceSum = (x: Value, axes: readonly number[], keepdims = true): Value =>
  reduce('ReduceSum', x, axes, keepdims);
export const reduceMax = (x: Value, axes: readonly number[], keepdims = true): Value =>
  reduce('ReduceMax', x, axes, keepdims);

export function softmax(x: Value, axis = -1): Value {
  return node('Softmax', [x], { axis: attr.int(normalizeAxis(axis, x.rank)) }, x.dtype, x.shape);
}

/** Normalizes over the trailing dims from `axis` on. */
export function layerNormalization(
  x: Value,
  scale: Value,
  bias: Value | null,
  epsilon: number,
  axis = -1,
): Value {
  return node(
    'LayerNormalization',
    bias === null ? [x, scale] : [x, scale, bias],
    { axis: attr.int(normalizeAxis(axis, x.rank)), epsilon: attr.float(epsilon) },
    x.dtype,
    x.shape,
  );
}

/** Opset-21 GroupNormalization: statistics per group, scale and bias per channel. */
export function groupNormalization(
  x: Value,
  scale: Value,
  bias: Value,
  groups: number,
  epsilon: number,
): Value {
  return node(
    'GroupNormalization',
    [x, scale, bias],
    { num_groups: attr.int(groups), epsilon: attr.float(epsilon) },
    x.dtype,
    x.shape,
  );
}

export function instanceNormalization(x: Value, scale: Value, bias: Value, epsilon: number): Value {
  return node(
    'InstanceNormalization',
    [x, scale, bias],
    { epsilon: attr.float(epsilon) },
    x.dtype,
    x.shape,
  );
}

// ---- contrib ops ----

/**
 * ONNX Runtime's fused attention (`com.microsoft.MultiHeadAttention`) on already projected
 * q [B, S, H*Dk], k [B, L, H*Dk], v [B, L, H*Dv]; returns [B, S, H*Dv].
 */
export function multiHeadAttention(
  q: Value,
  k: Value,
  v: Value,
  heads: number,
  scale?: number,
): Value {
  const attrs: Record<string, Attr> = { num_heads: attr.int(heads) };
  if (scale !== undefined) attrs.scale = attr.float(scale);
  q.graph.useDomain('com.microsoft', 1);
  return node(
    'MultiHeadAttention',
    [q, k, v],
    attrs,
    q.dtype,
    [q.shape[0]!, q.shape[1]!, v.shape[2]!],
    'com.microsoft',
  );
}
