import { isFloatingDType } from '../tensor/dtype.js';
import { Tensor } from '../tensor/tensor.js';
import type { Attr, Dim, Node, Shape, Value } from './ir.js';
import * as op from './ops.js';

/**
 * Reverse-mode differentiation of the IR: each op has a vector–Jacobian rule written in IR ops, so
 * the backward pass lands in the same graph as the forward pass and runs in ONNX Runtime. Rules
 * need static shapes wherever broadcasting, reshaping or pooling is undone.
 */

/** `needs[i]`: whether input i wants a gradient; rules skip the work for the rest. */
type Rule = (
  node: Node,
  grads: readonly (Value | undefined)[],
  needs: readonly boolean[],
) => (Value | undefined)[];

/** The value of `make()` when `wanted`, else undefined (and no graph nodes). */
function when(wanted: boolean | undefined, make: () => Value): Value | undefined {
  return wanted === true ? make() : undefined;
}

function staticShape(shape: Shape, what: string): number[] {
  if (!shape.every((d): d is number => typeof d === 'number')) {
    throw new Error(`autodiff: ${what} needs a static shape, got [${shape.join(', ')}]`);
  }
  return [...shape];
}

function sameShape(a: Shape, b: Shape): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** Sums a broadcast gradient back to the shape of the operand it came from. */
export function unbroadcast(grad: Value, shape: Shape): Value {
  if (sameShape(grad.shape, shape)) return grad;
  let g = grad;
  const extra = g.rank - shape.length;
  if (extra > 0)
    g = op.reduceSum(
      g,
      Array.from({ length: extra }, (_, i) => i),
      false,
    );
  const axes: number[] = [];
  shape.forEach((d, i) => {
    if (d === 1 && g.shape[i] !== 1) axes.push(i);
  });
  if (axes.length > 0) g = op.reduceSum(g, axes, true);
  return sameShape(g.shape, shape) ? g : op.reshape(g, staticShape(shape, 'unbroadcast'));
}

function attrInt(node: Node, name: string, fallback: number): number {
  const a = node.attrs[name];
  return a?.kind === 'int' ? a.value : fallback;
}

function attrFloat(node: Node, name: string, fallback: number): number {
  const a = node.attrs[name];
  return a?.kind === 'float' ? a.value : fallback;
}

function attrInts(node: Node, name: string): readonly number[] | undefined {
  const a: Attr | undefined = node.attrs[name];
  return a?.kind === 'ints' ? a.value : undefined;
}

/** The numbers of a constant int64 input (shapes, axes), which gesso's op helpers always make constants. */
function constantInts(v: Value | null | undefined): number[] {
  if (v === null || v === undefined) throw new Error('autodiff: missing constant input');
  const data = v.graph.initializers.get(v);
  if (!(data instanceof Tensor)) throw new Error(`autodiff: '${v.name}' must be a constant`);
  return data.toArray();
}

function input(node: Node, i: number): Value {
  const v = node.inputs[i];
  if (v === null || v === undefined) throw new Error(`autodiff: ${node.op} input ${i} is missing`);
  return v;
}

function normalizedAxes(axes: readonly number[], rank: number): number[] {
  return axes.map((a) => (a < 0 ? a + rank : a));
}

/** Expands a reduced gradient (keepdims or not) back over the reduced axes. */
function expandReduced(grad: Value, node: Node, x: Value): Value {
  const axes = normalizedAxes(constantInts(node.inputs[1]), x.rank);
  let g = grad;
  if (attrInt(node, 'keepdims', 1) === 0)
    g = op.unsqueeze(
      g,
      [...axes].sort((p, q) => p - q),
    );
  return op.expand(g, staticShape(x.shape, 'reduction'));
}

function count(shape: Shape, axes: readonly number[]): number {
  return axes.reduce((n, a) => n * Number(shape[a]), 1);
}

/**
 * d/dx of a normalization y = (x − mean)/√(var + eps) over `axes` (before any affine): with
 * x̂ = y and incoming gradient g, dx = (g − mean(g) − x̂·mean(g·x̂)) / √(var + eps).
 */
function normalizationGrad(
  x: Value,
  g: Value,
  axes: readonly number[],
  eps: number,
): { dx: Value; xhat: Value } {
  const mean = op.reduceMean(x, axes);
  const centered = op.sub(x, mean);
  const invStd = op.reciprocal(
    op.sqrt(op.add(op.reduceMean(op.mul(centered, centered), axes), eps)),
  );
  const xhat = op.mul(centered, invStd);
  const dx = op.mul(
    op.sub(op.sub(g, op.reduceMean(g, axes)), op.mul(xhat, op.reduceMean(op.mul(g, xhat), axes))),
    invStd,
  );
  return { dx, xhat };
}

/**
 * dW[o, c, p, q] = Σ_{n,y,x} dY[n, o, y, x] · X[n, c, y·s + p·d − pad, x·s + q·d − pad]: one
 * matrix product over (n, y, x) for every channel and kernel tap at once. Each tap's input is a
 * strided slice of the padded input (an explicit im2col), which keeps the inner dimension N·Ho·Wo
 * long, where expressing the same sum as a convolution would make ONNX Runtime run a skinny, slow
 * one.
 */
function convWeightGrad(node: Node, x: Value, dy: Value, kernel: readonly number[]): Value {
  if (attrInt(node, 'group', 1) !== 1)
    throw new Error('autodiff: weight gradients of grouped convolutions are not supported');
  const strides = attrInts(node, 'strides') ?? [1, 1];
  const dil = attrInts(node, 'dilations') ?? [1, 1];
  const pads = attrInts(node, 'pads') ?? [0, 0, 0, 0];
  const [n, c] = staticShape(x.shape, 'conv input') as [number, number];
  const [, o, ho, wo] = staticShape(dy.shape, 'conv output gradient') as [
    number,
    number,
    number,
    number,
  ];
  const [kh, kw] = kernel as [number, number];
  // im2col with the channels outermost: each tap of x, as [C, 1, N·Ho·Wo], concatenated into
  // [C·taps, N·Ho·Wo], so that one product with dY as [O, N·Ho·Wo] gives dW in its own layout.
  const channelsFirst = op.transpose(x, [1, 0, 2, 3]);
  const padded = pads.some((v) => v !== 0)
    ? op.pad(channelsFirst, [0, 0, pads[0]!, pads[1]!, 0, 0, pads[2]!, pads[3]!])
    : channelsFirst;
  const k = n * ho * wo;
  const taps: Value[] = [];
  for (let p = 0; p < kh; p++) {
    for (let q = 0; q < kw; q++) {
      const y0 = p * dil[0]!;
      const x0 = q * dil[1]!;
      const tap = op.slice(
        padded,
        [y0, x0],
        [y0 + (ho - 1) * strides[0]! + 1, x0 + (wo - 1) * strides[1]! + 1],
        [2, 3],
        strides,
      );
      taps.push(op.reshape(tap, [c, 1, k]));
    }
  }
  const cols = op.reshape(op.concat(taps, 1), [c * kh * kw, k]);
  const dyMat = op.reshape(op.transpose(dy, [1, 0, 2, 3]), [o, k]);
  return op.reshape(op.matmul(dyMat, op.transpose(cols, [1, 0])), [o, c, kh, kw]);
}

const RULES: Record<string, Rule> = {
  Identity: (_, [g]) => [g],
  Neg: (_, [g]) => [op.neg(g!)],
  Add: (n, [g], needs) => [
    when(needs[0], () => unbroadcast(g!, input(n, 0).shape)),
    when(needs[1], () => unbroadcast(g!, input(n, 1).shape)),
  ],
  Sub: (n, [g], needs) => [
    when(needs[0], () => unbroadcast(g!, input(n, 0).shape)),
    when(needs[1], () => unbroadcast(op.neg(g!), input(n, 1).shape)),
  ],
  Mul: (n, [g], needs) => {
    const [a, b] = [input(n, 0), input(n, 1)];
    return [
      when(needs[0], () => unbroadcast(op.mul(g!, b), a.shape)),
      when(needs[1], () => unbroadcast(op.mul(g!, a), b.shape)),
    ];
  },
  Div: (n, [g], needs) => {
    const [a, b] = [input(n, 0), input(n, 1)];
    const y = n.outputs[0]!;
    return [
      when(needs[0], () => unbroadcast(op.div(g!, b), a.shape)),
      when(needs[1], () => unbroadcast(op.neg(op.div(op.mul(g!, y), b)), b.shape)),
    ];
  },
  Pow: (n, [g], needs) => {
    const [a, b] = [input(n, 0), input(n, 1)];
    const y = n.outputs[0]!;
    return [
      when(needs[0], () => unbroadcast(op.mul(g!, op.mul(b, op.pow(a, op.sub(b, 1)))), a.shape)),
      when(needs[1], () => unbroadcast(op.mul(g!, op.mul(y, op.log(a))), b.shape)),
    ];
  },
  Max: (n, [g], needs) => {
    const [a, b] = [input(n, 0), input(n, 1)];
    const takeA = op.cast(op.greater(a, b), g!.dtype);
    return [
      when(needs[0], () => unbroadcast(op.mul(g!, takeA), a.shape)),
      when(needs[1], () => unbroadcast(op.mul(g!, op.sub(1, takeA)), b.shape)),
    ];
  },
  Min: (n, [g], needs) => {
    const [a, b] = [input(n, 0), input(n, 1)];
    const takeA = op.cast(op.less(a, b), g!.dtype);
    return [
      when(needs[0], () => unbroadcast(op.mul(g!, takeA), a.shape)),
      when(needs[1], () => unbroadcast(op.mul(g!, op.sub(1, takeA)), b.shape)),
    ];
  },
  Exp: (n, [g]) => [op.mul(g!, n.outputs[0]!)],
  Log: (n, [g]) => [op.div(g!, input(n, 0))],
  Sqrt: (n, [g]) => [op.div(op.mul(g!, 0.5), n.outputs[0]!)],
  Reciprocal: (n, [g]) => {
    const y = n.outputs[0]!;
    return [op.neg(op.mul(g!, op.mul(y, y)))];
  },
  Abs: (n, [g]) => {
    const x = input(n, 0);
    return [op.where(op.less(x, 0), op.neg(g!), g!)];
  },
  Sigmoid: (n, [g]) => {
    const y = n.outputs[0]!;
    return [op.mul(g!, op.mul(y, op.sub(1, y)))];
  },
  Tanh: (n, [g]) => {
    const y = n.outputs[0]!;
    return [op.mul(g!, op.sub(1, op.mul(y, y)))];
  },
  Erf: (n, [g]) => {
    const x = input(n, 0);
    return [op.mul(g!, op.mul(op.exp(op.neg(op.mul(x, x))), 2 / Math.sqrt(Math.PI)))];
  },
  Relu: (n, [g]) => [op.where(op.greater(input(n, 0), 0), g!, 0)],
  LeakyRelu: (n, [g]) => [
    op.where(op.greater(input(n, 0), 0), g!, op.mul(g!, attrFloat(n, 'alpha', 0.01))),
  ],
  Sin: (n, [g]) => [op.mul(g!, op.cos(input(n, 0)))],
  Cos: (n, [g]) => [op.neg(op.mul(g!, op.sin(input(n, 0))))],
  Where: (n, [g], needs) => {
    const [c, a, b] = [input(n, 0), input(n, 1), input(n, 2)];
    return [
      undefined,
      when(needs[1], () => unbroadcast(op.where(c, g!, 0), a.shape)),
      when(needs[2], () => unbroadcast(op.where(c, 0, g!), b.shape)),
    ];
  },
  Cast: (n, [g]) => [op.cast(g!, input(n, 0).dtype)],
  MatMul: (n, [g], needs) => {
    let [a, b] = [input(n, 0), input(n, 1)];
    let dy = g!;
    const aVector = a.rank === 1;
    const bVector = b.rank === 1;
    if (aVector) {
      a = op.unsqueeze(a, [0]);
      dy = op.unsqueeze(dy, [dy.rank - (bVector ? 0 : 1)]);
    }
    if (bVector) {
      b = op.unsqueeze(b, [1]);
      dy = op.unsqueeze(dy, [dy.rank]);
    }
    const swap = (v: Value) =>
      op.transpose(v, [...Array.from({ length: v.rank - 2 }, (_, i) => i), v.rank - 1, v.rank - 2]);
    return [
      when(needs[0], () => {
        const da = unbroadcast(op.matmul(dy, swap(b)), a.shape);
        return aVector ? op.reshape(da, staticShape(input(n, 0).shape, 'matmul')) : da;
      }),
      when(needs[1], () => {
        const [inner, outer] = [a.shape[a.rank - 1], dy.shape[dy.rank - 1]];
        // A weight shared across a batch: one product over the flattened rows, rather than a
        // product per batch item summed afterwards (a [batch, in, out] intermediate).
        const db =
          b.rank === 2 && a.rank > 2 && typeof inner === 'number' && typeof outer === 'number'
            ? op.matmul(
                op.transpose(op.reshape(a, [-1, inner]), [1, 0]),
                op.reshape(dy, [-1, outer]),
              )
            : unbroadcast(op.matmul(swap(a), dy), b.shape);
        return bVector ? op.reshape(db, staticShape(input(n, 1).shape, 'matmul')) : db;
      }),
    ];
  },
  Gemm: (n, [g], needs) => {
    const [a, b] = [input(n, 0), input(n, 1)];
    const c = n.inputs[2] ?? null;
    const alpha = attrFloat(n, 'alpha', 1);
    const beta = attrFloat(n, 'beta', 1);
    const ta = attrInt(n, 'transA', 0) === 1;
    const tb = attrInt(n, 'transB', 0) === 1;
    const dy = alpha === 1 ? g! : op.mul(g!, alpha);
    // Y = A' B' with A' = ta ? Aᵀ : A and B' = tb ? Bᵀ : B.
    return [
      when(needs[0], () => {
        const da = op.matmul(dy, tb ? b : op.transpose(b, [1, 0]));
        return ta ? op.transpose(da, [1, 0]) : da;
      }),
      when(needs[1], () => {
        const db = op.matmul(ta ? a : op.transpose(a, [1, 0]), dy);
        return tb ? op.transpose(db, [1, 0]) : db;
      }),
      c === null
        ? undefined
        : when(needs[2], () => unbroadcast(beta === 1 ? g! : op.mul(g!, beta), c.shape)),
    ];
  },
  Conv: (n, [g], needs) => {
    const [x, w] = [input(n, 0), input(n, 1)];
    const bias = n.inputs[2] ?? null;
    const strides = attrInts(n, 'strides') ?? [1, 1];
    const pads = attrInts(n, 'pads') ?? [0, 0, 0, 0];
    const dil = attrInts(n, 'dilations') ?? [1, 1];
    const group = attrInt(n, 'group', 1);
    const kernel = staticShape(w.shape, 'conv weight').slice(2);
    return [
      when(needs[0], () => {
        // The transposed convolution, with output padding recovering sizes lost to striding.
        const xs = staticShape(x.shape, 'conv input');
        const ys = staticShape(g!.shape, 'conv output');
        const outputPadding = [0, 1].map(
          (i) =>
            xs[2 + i]! -
            (strides[i]! * (ys[2 + i]! - 1) +
              (kernel[i]! - 1) * dil[i]! +
              1 -
              pads[i]! -
              pads[2 + i]!),
        );
        return op.convTranspose(g!, w, null, {
          strides,
          pads,
          dilations: dil,
          group,
          outputPadding,
        });
      }),
      when(needs[1], () => convWeightGrad(n, x, g!, kernel)),
      bias === null ? undefined : when(needs[2], () => op.reduceSum(g!, [0, 2, 3], false)),
    ];
  },
  ConvTranspose: (n, [g], needs) => {
    const [x, w] = [input(n, 0), input(n, 1)];
    const bias = n.inputs[2] ?? null;
    if (attrInt(n, 'group', 1) !== 1)
      throw new Error('autodiff: grouped transposed convolutions are not supported');
    const strides = attrInts(n, 'strides') ?? [1, 1];
    const pads = attrInts(n, 'pads') ?? [0, 0, 0, 0];
    const dil = attrInts(n, 'dilations') ?? [1, 1];
    const kernel = staticShape(w.shape, 'conv weight').slice(2);
    // Y = convᵀ(X, W) ⇒ dX = conv(dY, W), and dW is that conv's weight gradient (shape [C, M, k, k], W's).
    return [
      when(needs[0], () => op.conv(g!, w, null, { strides, pads, dilations: dil })),
      when(needs[1], () => convWeightGrad(n, g!, x, kernel)),
      bias === null ? undefined : when(needs[2], () => op.reduceSum(g!, [0, 2, 3], false)),
    ];
  },
  Reshape: (n, [g]) => [op.reshape(g!, staticShape(input(n, 0).shape, 'reshape'))],
  // Both are permutations of elements, each the other's inverse (DCR order).
  SpaceToDepth: (n, [g]) => [op.depthToSpace(g!, attrInt(n, 'blocksize', 1))],
  DepthToSpace: (n, [g]) => {
    if (n.attrs.mode?.kind === 'string' && n.attrs.mode.value !== 'DCR')
      throw new Error('autodiff: DepthToSpace gradients are for DCR mode');
    return [op.spaceToDepth(g!, attrInt(n, 'blocksize', 1))];
  },
  Squeeze: (n, [g]) => [op.reshape(g!, staticShape(input(n, 0).shape, 'squeeze'))],
  Unsqueeze: (n, [g]) => [op.reshape(g!, staticShape(input(n, 0).shape, 'unsqueeze'))],
  Expand: (n, [g]) => [unbroadcast(g!, input(n, 0).shape)],
  Transpose: (n, [g]) => {
    const perm = attrInts(n, 'perm')!;
    const inverse = new Array<number>(perm.length);
    perm.forEach((p, i) => (inverse[p] = i));
    return [op.transpose(g!, inverse)];
  },
  Concat: (n, [g]) => {
    const axis = attrInt(n, 'axis', 0);
    const sizes = n.inputs.map((v) => Number(v!.shape[axis]));
    return op.split(g!, sizes, axis);
  },
  Split: (n, grads) => {
    const axis = attrInt(n, 'axis', 0);
    const parts = n.outputs.map((o, i) => grads[i] ?? op.mul(o, 0));
    return [op.concat(parts, axis)];
  },
  Slice: (n, [g]) => {
    const x = input(n, 0);
    const xs = staticShape(x.shape, 'slice');
    const starts = constantInts(n.inputs[1]);
    const axes = n.inputs[3]
      ? normalizedAxes(constantInts(n.inputs[3]), x.rank)
      : starts.map((_, i) => i);
    const steps = n.inputs[4] ? constantInts(n.inputs[4]) : starts.map(() => 1);
    if (steps.some((s) => s < 1))
      throw new Error('autodiff: slices with negative steps are not supported');
    // Scatter dY back into zeros of X's shape, one axis at a time: a strided axis first spreads its
    // n values s apart (pad a new axis of size 1 to s, merge), then the axis is padded to X's length.
    let dx = g!;
    axes.forEach((a, i) => {
      const dim = xs[a]!;
      const step = steps[i]!;
      const start = Math.min(Math.max(starts[i]! < 0 ? starts[i]! + dim : starts[i]!, 0), dim);
      const count = Number(dx.shape[a]);
      const shape = staticShape(dx.shape, 'slice');
      if (step > 1 && count > 0) {
        const split = [...shape.slice(0, a + 1), 1, ...shape.slice(a + 1)];
        const pads = new Array<number>(2 * split.length).fill(0);
        pads[split.length + a + 1] = step - 1;
        dx = op.reshape(op.pad(op.reshape(dx, split), pads), [
          ...shape.slice(0, a),
          count * step,
          ...shape.slice(a + 1),
        ]);
        const keep = Math.min(count * step, dim - start);
        if (keep < count * step) dx = op.slice(dx, [0], [keep], [a]);
      }
      const length = Number(dx.shape[a]);
      const pads = new Array<number>(2 * dx.rank).fill(0);
      pads[a] = start;
      pads[dx.rank + a] = dim - start - length;
      if (start !== 0 || dim - start - length !== 0) dx = op.pad(dx, pads);
    });
    return [dx];
  },

  Pad: (n, [g]) => {
    const pads = constantInts(n.inputs[1]);
    const rank = g!.rank;
    const ys = staticShape(g!.shape, 'pad');
    return [
      op.slice(
        g!,
        pads.slice(0, rank),
        ys.map((d, i) => d - pads[rank + i]!),
        Array.from({ length: rank }, (_, i) => i),
      ),
    ];
  },
  Gather: (n, [g]) => {
    const [data, indices] = [input(n, 0), input(n, 1)];
    if (attrInt(n, 'axis', 0) !== 0 || data.rank !== 2)
      throw new Error('autodiff: Gather gradients are for embedding lookups (axis 0 of a matrix)');
    const [rows, width] = staticShape(data.shape, 'embedding') as [number, number];
    // dW = onehot(ids)ᵀ · dY, over the flattened ids.
    const flatIds = op.reshape(indices, [-1, 1]);
    const range = data.graph.constant(
      Tensor.int64(
        [1, rows],
        Array.from({ length: rows }, (_, i) => i),
      ),
    );
    const oneHot = op.cast(op.equal(flatIds, range), g!.dtype); // [K, rows]
    const dy = op.reshape(g!, [-1, width]); // [K, width]
    return [op.matmul(op.transpose(oneHot, [1, 0]), dy), undefined];
  },
  ReduceSum: (n, [g]) => [expandReduced(g!, n, input(n, 0))],
  ReduceMean: (n, [g]) => {
    const x = input(n, 0);
    const axes = normalizedAxes(constantInts(n.inputs[1]), x.rank);
    return [op.div(expandReduced(g!, n, x), count(x.shape, axes))];
  },
  ReduceMax: (n, [g]) => {
    const x = input(n, 0);
    const y = n.outputs[0]!;
    const yk =
      attrInt(n, 'keepdims', 1) === 0
        ? op.unsqueeze(
            y,
            normalizedAxes(constantInts(n.inputs[1]), x.rank).sort((p, q) => p - q),
          )
        : y;
    const mask = op.cast(op.equal(x, yk), g!.dtype);
    return [op.mul(expandReduced(g!, n, x), mask)];
  },
  Softmax: (n, [g]) => {
    const y = n.outputs[0]!;
    const axis = attrInt(n, 'axis', -1);
    return [op.mul(y, op.sub(g!, op.reduceSum(op.mul(g!, y), [axis])))];
  },
  LayerNormalization: (n, [g], needs) => {
    const [x, scale] = [input(n, 0), input(n, 1)];
    const bias = n.inputs[2] ?? null;
    const axis = attrInt(n, 'axis', -1);
    const a = axis < 0 ? axis + x.rank : axis;
    const axes = Array.from({ length: x.rank - a }, (_, i) => a + i);
    const { dx, xhat } = normalizationGrad(
      x,
      op.mul(g!, scale),
      axes,
      attrFloat(n, 'epsilon', 1e-5),
    );
    return [
      needs[0] ? dx : undefined,
      when(needs[1], () => unbroadcast(op.mul(g!, xhat), scale.shape)),
      bias === null ? undefined : when(needs[2], () => unbroadcast(g!, bias.shape)),
    ];
  },
  GroupNormalization: (n, [g], needs) => {
    const [x, scale] = [input(n, 0), input(n, 1)];
    const groups = attrInt(n, 'num_groups', 1);
    const xs = staticShape(x.shape, 'group norm');
    const channelShape: Dim[] = [1, xs[1]!, ...xs.slice(2).map(() => 1)];
    const s = op.reshape(scale, channelShape as number[]);
    const grouped = [xs[0]!, groups, -1];
    const { dx, xhat } = normalizationGrad(
      op.reshape(x, grouped),
      op.reshape(op.mul(g!, s), grouped),
      [2],
      attrFloat(n, 'epsilon', 1e-5),
    );
    const xhatFull = op.reshape(xhat, xs);
    const reduceAxes = [0, ...xs.slice(2).map((_, i) => i + 2)];
    return [
      when(needs[0], () => op.reshape(dx, xs)),
      when(needs[1], () => op.reduceSum(op.mul(g!, xhatFull), reduceAxes, false)),
      when(needs[2], () => op.reduceSum(g!, reduceAxes, false)),
    ];
  },
  InstanceNormalization: (n, [g], needs) => {
    const [x, scale] = [input(n, 0), input(n, 1)];
    const xs = staticShape(x.shape, 'instance norm');
    const s = op.reshape(scale, [1, xs[1]!, ...xs.slice(2).map(() => 1)]);
    const spatial = xs.slice(2).map((_, i) => i + 2);
    const { dx, xhat } = normalizationGrad(
      x,
      op.mul(g!, s),
      spatial,
      attrFloat(n, 'epsilon', 1e-5),
    );
    const reduceAxes = [0, ...spatial];
    return [
      dx,
      when(needs[1], () => op.reduceSum(op.mul(g!, xhat), reduceAxes, false)),
      when(needs[2], () => op.reduceSum(g!, reduceAxes, false)),
    ];
  },
  Resize: (n, [g]) => {
    const x = input(n, 0);
    const xs = staticShape(x.shape, 'resize');
    const ys = staticShape(g!.shape, 'resize');
    const factors = [ys[2]! / xs[2]!, ys[3]! / xs[3]!];
    if (
      !factors.every((f) => Number.isInteger(f) && f >= 1) ||
      ys[0] !== xs[0] ||
      ys[1] !== xs[1]
    ) {
      throw new Error('autodiff: Resize gradients are for integer nearest upsampling');
    }
    // Each input pixel fed an f×f block: its gradient is that block's sum.
    return [
      op.mul(op.averagePool(g!, { kernel: factors, strides: factors }), factors[0]! * factors[1]!),
    ];
  },
  AveragePool: (n, [g]) => {
    const kernel = attrInts(n, 'kernel_shape')!;
    const strides = attrInts(n, 'strides') ?? kernel;
    const pads = attrInts(n, 'pads') ?? [0, 0, 0, 0];
    if (kernel.some((k, i) => k !== strides[i]) || pads.some((p) => p !== 0)) {
      throw new Error('autodiff: AveragePool gradients need stride = kernel and no padding');
    }
    const up = op.upsampleNearest(g!, kernel);
    const x = input(n, 0);
    const full = sameShape(up.shape, x.shape) ? up : op.pad(up, padTo(up.shape, x.shape));
    return [
      op.div(
        full,
        kernel.reduce((a, k) => a * k, 1),
      ),
    ];
  },
  MaxPool: (n, [g]) => {
    const kernel = attrInts(n, 'kernel_shape')!;
    const strides = attrInts(n, 'strides') ?? kernel;
    const pads = attrInts(n, 'pads') ?? [0, 0, 0, 0];
    if (kernel.some((k, i) => k !== strides[i]) || pads.some((p) => p !== 0)) {
      throw new Error('autodiff: MaxPool gradients need stride = kernel and no padding');
    }
    const x = input(n, 0);
    const upY = op.upsampleNearest(n.outputs[0]!, kernel);
    const upG = op.upsampleNearest(g!, kernel);
    const fit = (v: Value, fill: number) =>
      sameShape(v.shape, x.shape) ? v : op.pad(v, padTo(v.shape, x.shape), fill);
    const mask = op.cast(op.equal(x, fit(upY, Number.NaN)), g!.dtype);
    return [op.mul(fit(upG, 0), mask)];
  },
};

function padTo(from: Shape, to: Shape): number[] {
  const f = staticShape(from, 'pool');
  const t = staticShape(to, 'pool');
  return [...f.map(() => 0), ...f.map((d, i) => t[i]! - d)];
}

/** Ops whose outputs carry no gradient (integer or boolean results). */
const NON_DIFFERENTIABLE = new Set(['Shape', 'ArgMax', 'Equal', 'Less', 'Greater']);

/**
 * Gradients of scalar `loss` with respect to each of `wrt`, built into loss's graph. A value that
 * `loss` does not depend on gets a zero gradient of its shape.
 */
export function gradients(loss: Value, wrt: readonly Value[]): Map<Value, Value> {
  const graph = loss.graph;
  if (loss.shape.length !== 0 && !(loss.shape.length === 1 && loss.shape[0] === 1)) {
    throw new Error(`autodiff: the loss must be a scalar, got [${loss.shape.join(', ')}]`);
  }
  // Values that depend on wrt (forward reachability) and values loss depends on (backward).
  const dependsOnWrt = new Set<Value>(wrt);
  for (const node of graph.nodes) {
    if (node.inputs.some((v) => v !== null && dependsOnWrt.has(v)))
      for (const o of node.outputs) dependsOnWrt.add(o);
  }
  const grads = new Map<Value, Value>();
  const accumulate = (v: Value, g: Value) => {
    const previous = grads.get(v);
    grads.set(v, previous === undefined ? g : op.add(previous, g));
  };
  grads.set(loss, graph.constant(Tensor.full(staticShape(loss.shape, 'loss'), 1).to(loss.dtype)));

  const nodeIndex = graph.nodes.indexOf(loss.producer!);
  for (let i = nodeIndex; i >= 0; i--) {
    const node = graph.nodes[i]!;
    const outGrads = node.outputs.map((o) => grads.get(o));
    if (outGrads.every((g) => g === undefined)) continue;
    if (!node.inputs.some((v) => v !== null && dependsOnWrt.has(v) && isFloatingDType(v.dtype)))
      continue;
    if (NON_DIFFERENTIABLE.has(node.op)) continue;
    const rule = RULES[node.op];
    if (rule === undefined)
      throw new Error(
        `autodiff: no gradient rule for ${node.domain ? `${node.domain}.` : ''}${node.op} (node ${node.name})`,
      );
    const needs = node.inputs.map(
      (v) => v !== null && dependsOnWrt.has(v) && isFloatingDType(v.dtype),
    );
    const inGrads = graph.scope(`grad/${node.name}`, () => rule(node, outGrads, needs));
    node.inputs.forEach((v, k) => {
      const g = inGrads[k];
      if (v !== null && g !== undefined && dependsOnWrt.has(v) && isFloatingDType(v.dtype))
        accumulate(v, g);
    });
  }
  const out = new Map<Value, Value>();
  for (const v of wrt) out.set(v, grads.get(v) ?? op.mul(v, 0));
  return out;
}
