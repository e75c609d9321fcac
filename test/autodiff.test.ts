import assert from 'node:assert/strict';
import test from 'node:test';
import { gradients } from '../src/graph/autodiff.js';
import { interpret, type F64 } from '../src/graph/interpret.js';
import { Graph, type Value } from '../src/graph/ir.js';
import { emitOnnx } from '../src/graph/onnx.js';
import * as op from '../src/graph/ops.js';
import {
  Attention,
  Conv2d,
  Embedding,
  GroupNorm,
  LayerNorm,
  Linear,
  Module,
  silu,
  type ParameterSource,
} from '../src/nn/index.js';
import { runOnce } from '../src/runtime/session.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';

// Every vector–Jacobian rule is checked against central finite differences in float64, on the
// reference interpreter: loss = Σ y·R for a fixed random R, perturbing each input element by ±h.

interface InputSpec {
  readonly shape: number[];
  /** Keep values away from 0 (for Log, Sqrt, Pow, Div, Abs). */
  readonly positive?: boolean;
  /** An int64 input with these values (not differentiated). */
  readonly ints?: number[];
}

const H = 1e-5;

function randomValues(g: TorchGenerator, n: number, positive: boolean): Float64Array {
  const r = g.randn([n]).data;
  return Float64Array.from(r, (v) => (positive ? 0.5 + Math.abs(v) : v));
}

function gradCheck(
  inputs: Record<string, InputSpec>,
  build: (ins: Record<string, Value>, g: Graph) => Value,
  seed = 0,
): void {
  const rng = new TorchGenerator(seed);
  const g = new Graph();
  const ins: Record<string, Value> = {};
  const feeds: Record<string, F64> = {};
  for (const [name, spec] of Object.entries(inputs)) {
    ins[name] = g.input(name, spec.ints ? 'int64' : 'float64', spec.shape);
    const n = spec.shape.reduce((a, d) => a * d, 1);
    feeds[name] = {
      shape: spec.shape,
      data: spec.ints ? Float64Array.from(spec.ints) : randomValues(rng, n, spec.positive ?? false),
    };
  }
  const y = build(ins, g);
  const weights = new Tensor(
    'float64',
    y.staticShape()!,
    randomValues(
      rng,
      y.staticShape()!.reduce((a, d) => a * d, 1),
      false,
    ),
  );
  const loss = op.reduceSum(
    op.mul(y, g.constant(weights)),
    y.shape.map((_, i) => i),
    false,
  );
  const wrt = Object.entries(inputs)
    .filter(([, s]) => !s.ints)
    .map(([name]) => ins[name]!);
  const grads = gradients(loss, wrt);
  const analytic = interpret(
    g,
    feeds,
    wrt.map((v) => grads.get(v)!),
  );
  const lossAt = (f: Record<string, F64>) => interpret(g, f, [loss])[0]!.data[0]!;
  wrt.forEach((v, k) => {
    const base = feeds[v.name]!;
    const numeric = new Float64Array(base.data.length);
    for (let i = 0; i < base.data.length; i++) {
      const plus = Float64Array.from(base.data);
      const minus = Float64Array.from(base.data);
      plus[i]! += H;
      minus[i]! -= H;
      numeric[i] =
        (lossAt({ ...feeds, [v.name]: { shape: base.shape, data: plus } }) -
          lossAt({ ...feeds, [v.name]: { shape: base.shape, data: minus } })) /
        (2 * H);
    }
    const a = analytic[k]!;
    assert.deepEqual(a.shape, base.shape, `gradient shape for ${v.name}`);
    for (let i = 0; i < numeric.length; i++) {
      const diff = Math.abs(a.data[i]! - numeric[i]!);
      assert.ok(
        diff <= 1e-6 * Math.max(1, Math.abs(numeric[i]!)),
        `${v.name}[${i}]: analytic ${a.data[i]}, numeric ${numeric[i]}`,
      );
    }
  });
}

const cases: Record<
  string,
  [Record<string, InputSpec>, (i: Record<string, Value>, g: Graph) => Value]
> = {
  'Add (broadcast)': [{ a: { shape: [2, 3] }, b: { shape: [3] } }, (i) => op.add(i.a!, i.b!)],
  'Sub (broadcast)': [{ a: { shape: [2, 1, 3] }, b: { shape: [4, 1] } }, (i) => op.sub(i.a!, i.b!)],
  'Mul (broadcast)': [{ a: { shape: [2, 3] }, b: { shape: [2, 1] } }, (i) => op.mul(i.a!, i.b!)],
  Div: [{ a: { shape: [2, 3] }, b: { shape: [3], positive: true } }, (i) => op.div(i.a!, i.b!)],
  Pow: [{ a: { shape: [5], positive: true }, b: { shape: [5] } }, (i) => op.pow(i.a!, i.b!)],
  'Pow (constant exponent)': [{ a: { shape: [5], positive: true } }, (i) => op.pow(i.a!, 3)],
  Max: [{ a: { shape: [6] }, b: { shape: [6] } }, (i) => op.max(i.a!, i.b!)],
  Min: [{ a: { shape: [6] }, b: { shape: [6] } }, (i) => op.min(i.a!, i.b!)],
  Neg: [{ a: { shape: [4] } }, (i) => op.neg(i.a!)],
  Exp: [{ a: { shape: [4] } }, (i) => op.exp(i.a!)],
  Log: [{ a: { shape: [4], positive: true } }, (i) => op.log(i.a!)],
  Sqrt: [{ a: { shape: [4], positive: true } }, (i) => op.sqrt(i.a!)],
  Reciprocal: [{ a: { shape: [4], positive: true } }, (i) => op.reciprocal(i.a!)],
  Abs: [{ a: { shape: [6] } }, (i) => op.abs(i.a!)],
  Sigmoid: [{ a: { shape: [5] } }, (i) => op.sigmoid(i.a!)],
  Tanh: [{ a: { shape: [5] } }, (i) => op.tanh(i.a!)],
  Erf: [{ a: { shape: [5] } }, (i) => op.erf(i.a!)],
  Relu: [{ a: { shape: [6] } }, (i) => op.relu(i.a!)],
  LeakyRelu: [{ a: { shape: [6] } }, (i) => op.leakyRelu(i.a!, 0.2)],
  Sin: [{ a: { shape: [4] } }, (i) => op.sin(i.a!)],
  Cos: [{ a: { shape: [4] } }, (i) => op.cos(i.a!)],
  Where: [
    { a: { shape: [6] }, b: { shape: [6] } },
    (i) => op.where(op.greater(i.a!, 0), i.a!, op.mul(i.b!, i.a!)),
  ],
  Cast: [{ a: { shape: [4] } }, (i) => op.cast(op.mul(op.cast(i.a!, 'float32'), 1), 'float64')],
  Identity: [{ a: { shape: [3] } }, (i) => op.identity(i.a!)],
  MatMul: [{ a: { shape: [3, 4] }, b: { shape: [4, 2] } }, (i) => op.matmul(i.a!, i.b!)],
  'MatMul (batched, broadcast)': [
    { a: { shape: [2, 3, 4] }, b: { shape: [4, 5] } },
    (i) => op.matmul(i.a!, i.b!),
  ],
  'MatMul (rank 4 by a shared matrix)': [
    { a: { shape: [2, 2, 3, 4] }, b: { shape: [4, 5] } },
    (i) => op.matmul(i.a!, i.b!),
  ],
  'MatMul (a shared matrix by a batch)': [
    { a: { shape: [3, 4] }, b: { shape: [2, 4, 5] } },
    (i) => op.matmul(i.a!, i.b!),
  ],
  'MatMul (vectors)': [
    { a: { shape: [4] }, b: { shape: [4, 3] }, c: { shape: [3] } },
    (i) => op.matmul(op.matmul(i.a!, i.b!), i.c!),
  ],
  Gemm: [
    { a: { shape: [4, 3] }, b: { shape: [5, 4] }, c: { shape: [5] } },
    (i) => op.gemm(i.a!, i.b!, i.c!, { transA: true, transB: true, alpha: 0.5, beta: 2 }),
  ],
  'Conv (stride 2, padding)': [
    { x: { shape: [2, 3, 5, 5] }, w: { shape: [4, 3, 3, 3] }, b: { shape: [4] } },
    (i) => op.conv(i.x!, i.w!, i.b!, { strides: [2, 2], pads: [1, 1, 1, 1] }),
  ],
  'Conv (dilated, rectangular, uneven padding)': [
    { x: { shape: [1, 2, 6, 5] }, w: { shape: [3, 2, 3, 2] } },
    (i) => op.conv(i.x!, i.w!, null, { dilations: [2, 1], pads: [0, 1, 2, 0] }),
  ],
  'ConvTranspose (stride 2)': [
    { x: { shape: [1, 3, 3, 3] }, w: { shape: [3, 2, 4, 4] }, b: { shape: [2] } },
    (i) => op.convTranspose(i.x!, i.w!, i.b!, { strides: [2, 2], pads: [1, 1, 1, 1] }),
  ],
  Reshape: [
    { a: { shape: [2, 6] } },
    (i) => op.mul(op.reshape(i.a!, [3, 4]), op.reshape(i.a!, [3, 4])),
  ],
  Squeeze: [{ a: { shape: [3, 1, 2] } }, (i) => op.exp(op.squeeze(i.a!, [1]))],
  Unsqueeze: [{ a: { shape: [3, 2] } }, (i) => op.exp(op.unsqueeze(i.a!, [0, 2]))],
  Expand: [{ a: { shape: [1, 3] } }, (i) => op.expand(i.a!, [4, 3])],
  Transpose: [{ a: { shape: [2, 3, 4] } }, (i) => op.transpose(i.a!, [2, 0, 1])],
  Concat: [
    { a: { shape: [2, 3] }, b: { shape: [2, 1] } },
    (i) => op.concat([i.a!, op.exp(i.b!), i.a!], 1),
  ],
  Split: [
    { a: { shape: [5, 2] } },
    (i) => {
      const [p, q] = op.split(i.a!, [2, 3], 0);
      return op.mul(op.reduceSum(p!, [0]), op.reduceSum(q!, [0]));
    },
  ],
  'Split (one part unused)': [
    { a: { shape: [5, 2] } },
    (i) => op.exp(op.split(i.a!, [2, 3], 0)[1]!),
  ],
  Slice: [{ a: { shape: [4, 5] } }, (i) => op.slice(i.a!, [1, -3], [3, Infinity], [0, 1])],
  'Slice (strided)': [
    { a: { shape: [7, 6] } },
    (i) => op.slice(i.a!, [1, 0], [7, 5], [0, 1], [3, 2]),
  ],
  'Conv weights through a strided conv (second order)': [
    { x: { shape: [1, 2, 5, 5] }, w: { shape: [3, 2, 3, 3] } },
    (i) => {
      // The gradient of Σ conv(x, w)² with respect to x, itself differentiated: double backprop.
      const y = op.conv(i.x!, i.w!, null, { strides: [2, 2], pads: [1, 1, 1, 1] });
      const loss = op.reduceSum(op.mul(y, y), [0, 1, 2, 3], false);
      return gradients(loss, [i.x!]).get(i.x!)!;
    },
  ],
  Pad: [{ a: { shape: [2, 3] } }, (i) => op.exp(op.pad(i.a!, [1, 0, 0, 2], 0.5))],
  Gather: [
    { w: { shape: [5, 3] }, ids: { shape: [2, 3], ints: [0, 4, 4, 1, 2, 0] } },
    (i) => op.gather(i.w!, i.ids!),
  ],
  ReduceSum: [{ a: { shape: [2, 3, 2] } }, (i) => op.reduceSum(i.a!, [0, 2], false)],
  ReduceMean: [{ a: { shape: [2, 3, 2] } }, (i) => op.reduceMean(i.a!, [1])],
  ReduceMax: [{ a: { shape: [3, 4] } }, (i) => op.reduceMax(i.a!, [1], false)],
  Softmax: [{ a: { shape: [2, 5] } }, (i) => op.softmax(i.a!, -1)],
  LayerNormalization: [
    { x: { shape: [2, 3, 6] }, s: { shape: [6] }, b: { shape: [6] } },
    (i) => op.layerNormalization(i.x!, i.s!, i.b!, 1e-5),
  ],
  GroupNormalization: [
    { x: { shape: [2, 4, 3, 2] }, s: { shape: [4] }, b: { shape: [4] } },
    (i) => op.groupNormalization(i.x!, i.s!, i.b!, 2, 1e-5),
  ],
  InstanceNormalization: [
    { x: { shape: [2, 3, 2, 3] }, s: { shape: [3] }, b: { shape: [3] } },
    (i) => op.instanceNormalization(i.x!, i.s!, i.b!, 1e-5),
  ],
  SpaceToDepth: [{ a: { shape: [1, 2, 4, 6] } }, (i) => op.spaceToDepth(i.a!, 2)],
  DepthToSpace: [{ a: { shape: [1, 8, 2, 3] } }, (i) => op.depthToSpace(i.a!, 2)],
  'Resize (nearest ×2)': [{ a: { shape: [1, 2, 2, 3] } }, (i) => op.upsampleNearest(i.a!, [2, 2])],
  AveragePool: [{ a: { shape: [1, 2, 4, 5] } }, (i) => op.averagePool(i.a!, { kernel: [2, 2] })],
  MaxPool: [{ a: { shape: [1, 2, 4, 4] } }, (i) => op.maxPool(i.a!, { kernel: [2, 2] })],
};

for (const [name, [inputs, build]] of Object.entries(cases)) {
  test(`gradient check (float64, central differences): ${name}`, () => gradCheck(inputs, build));
}

test('every differentiable op has a gradient check', () => {
  const covered = new Set(Object.keys(cases).map((k) => k.split(' ')[0]));
  for (const opName of [
    'Add',
    'Sub',
    'Mul',
    'Div',
    'Pow',
    'Max',
    'Min',
    'Neg',
    'Exp',
    'Log',
    'Sqrt',
    'Reciprocal',
    'Abs',
    'Sigmoid',
    'Tanh',
    'Erf',
    'Relu',
    'LeakyRelu',
    'Sin',
    'Cos',
    'Where',
    'Cast',
    'Identity',
    'MatMul',
    'Gemm',
    'Conv',
    'ConvTranspose',
    'Reshape',
    'Squeeze',
    'Unsqueeze',
    'Expand',
    'Transpose',
    'Concat',
    'Split',
    'Slice',
    'Pad',
    'Gather',
    'ReduceSum',
    'ReduceMean',
    'ReduceMax',
    'Softmax',
    'LayerNormalization',
    'GroupNormalization',
    'InstanceNormalization',
    'Resize',
    'AveragePool',
    'MaxPool',
  ]) {
    assert.ok(covered.has(opName), opName);
  }
});

/** A model touching every module kind the generators use. */
class Block extends Module {
  readonly embed = this.addModule('embed', new Embedding(7, 8));
  readonly conv = this.addModule('conv', new Conv2d(3, 8, 3, { padding: 1, stride: 2 }));
  readonly norm = this.addModule('norm', new GroupNorm(2, 8));
  readonly attn = this.addModule(
    'attn',
    new Attention({ queryDim: 8, crossAttentionDim: 8, heads: 2, dimHead: 4 }),
  );
  readonly ln = this.addModule('ln', new LayerNorm(8));
  readonly out = this.addModule('out', new Linear(8, 3));

  forward(p: ParameterSource, image: Value, ids: Value): Value {
    const text = this.ln.forward(p, this.embed.forward(p, ids));
    const h = silu(this.norm.forward(p, this.conv.forward(p, image)));
    const attended = this.attn.forward(p, h, text);
    const pooled = op.reduceMean(attended, [2, 3], false);
    return this.out.forward(p, pooled);
  }
}

test('composite model: full gradients in float64 match finite differences', () => {
  const block = new Block();
  const rng = new TorchGenerator(4);
  const tensors: Record<string, Tensor> = {};
  for (const [key, shape] of block.namedParameters()) tensors[key] = rng.randn(shape).to('float64');
  const paramSpecs = Object.fromEntries(
    Object.entries(tensors).map(([k, t]) => [k, { shape: [...t.shape] }]),
  );
  gradCheck(
    { image: { shape: [1, 3, 4, 4] }, ids: { shape: [1, 3], ints: [1, 6, 2] }, ...paramSpecs },
    (ins, g) => {
      const p = { graph: g, parameter: (key: string) => ins[key]! };
      return block.forward(p, ins.image!, ins.ids!);
    },
    9,
  );
});

test('ONNX Runtime (float32) computes the same gradients as the float64 interpreter', async () => {
  const block = new Block();
  const rng = new TorchGenerator(5);
  const g = new Graph();
  const params: Record<string, Value> = {};
  const feeds: Record<string, Tensor> = {};
  for (const [key, shape] of block.namedParameters()) {
    params[key] = g.input(key, 'float32', shape);
    feeds[key] = rng.randn(shape);
  }
  const image = g.input('image', 'float32', [2, 3, 8, 8]);
  const ids = g.input('ids', 'int64', [2, 4]);
  feeds.image = rng.randn([2, 3, 8, 8]);
  feeds.ids = Tensor.int64([2, 4], [0, 3, 6, 6, 1, 1, 2, 5]);
  const y = block.forward({ graph: g, parameter: (key) => params[key]! }, image, ids);
  const loss = op.reduceMean(op.mul(y, y), [0, 1], false);
  const grads = gradients(loss, Object.values(params));
  g.output(loss, 'loss');
  for (const [key, v] of Object.entries(params)) g.output(grads.get(v)!, `grad.${key}`);
  const ort = await runOnce(emitOnnx(g), feeds);
  const f64: Record<string, F64> = {};
  for (const [k, t] of Object.entries(feeds))
    f64[k] = { shape: [...t.shape], data: Float64Array.from(t.toArray()) };
  const reference = interpret(g, f64);
  g.outputs.forEach((o, k) => {
    const a = ort[o.name]!.toArray();
    const e = reference[k]!.data;
    const scale = e.reduce((m, v) => Math.max(m, Math.abs(v)), 1e-6);
    a.forEach((v, i) =>
      assert.ok(Math.abs(v - e[i]!) <= 1e-4 * scale, `${o.name}[${i}]: ${v} vs ${e[i]}`),
    );
  });
});
