import assert from 'node:assert/strict';
import test from 'node:test';
import * as op from '../src/graph/ops.js';
import { Tensor } from '../src/tensor/tensor.js';
import { StepRunner } from '../src/training/trainer.js';

/**
 * The step graph's optimizer against AdamW written out by hand (Loshchilov & Hutter; PyTorch's
 * torch.optim.AdamW with decoupled weight decay), after global-norm clipping, with the EMA: a
 * least-squares loss whose gradient is known in closed form, over steps whose learning rate,
 * EMA decay and clipping change.
 */

const X = [
  [0.5, -1.2],
  [1.5, 0.3],
  [-0.7, 0.9],
  [0.2, 2.0],
];
const Y = [
  [1, -1, 0.5],
  [0.3, 2, -1],
  [-2, 0.1, 0.4],
  [0.9, 0.5, 1.5],
];

/**
 * loss = mean((X·W + b − Y)²) and its gradient, in float64, over the parameters laid out as the
 * step lays them out: b (3), then W (2×3).
 */
function lossAndGrad(params: Float64Array): { loss: number; grad: Float64Array } {
  const [b, w] = [params.subarray(0, 3), params.subarray(3)];
  const grad = new Float64Array(9);
  const [db, dw] = [grad.subarray(0, 3), grad.subarray(3)];
  let loss = 0;
  for (let r = 0; r < 4; r++) {
    for (let j = 0; j < 3; j++) {
      const pred = X[r]![0]! * w[j]! + X[r]![1]! * w[3 + j]! + b[j]!;
      const e = pred - Y[r]![j]!;
      loss += (e * e) / 12;
      const d = (2 * e) / 12;
      dw[j]! += X[r]![0]! * d;
      dw[3 + j]! += X[r]![1]! * d;
      db[j]! += d;
    }
  }
  return { loss, grad };
}

test('the training step applies AdamW with clipping, decoupled weight decay and the EMA, as written by hand', async () => {
  const adam = {
    beta1: 0.8,
    beta2: 0.95,
    eps: 1e-6,
    weightDecay: 0.1,
    maxGradNorm: 0.5,
    ema: true,
  };
  const shapes = new Map<string, readonly number[]>([
    ['bias', [3]],
    ['weight', [2, 3]],
  ]);
  const w0 = [0.3, -0.2, 0.1, 0.05, 0.4, -0.3];
  const b0 = [0.1, 0, -0.1];
  const runner = await StepRunner.create(
    shapes,
    (p, g) => {
      const x = g.input('x', 'float32', [4, 2]);
      const y = g.input('y', 'float32', [4, 3]);
      const e = op.sub(
        op.add(op.matmul(x, p.parameter('weight', [2, 3])), p.parameter('bias', [3])),
        y,
      );
      return op.reduceMean(op.mul(e, e), [0, 1], false);
    },
    new Map([
      ['bias', Float32Array.from(b0)],
      ['weight', Float32Array.from(w0)],
    ]),
    { adam, runtime: { cacheDir: false }, cacheKey: 'adamw-by-hand' },
  );
  const data = {
    x: new Tensor('float32', [4, 2], Float32Array.from(X.flat())),
    y: new Tensor('float32', [4, 3], Float32Array.from(Y.flat())),
  };
  // The reference, in the layout's order (the order of `shapes`: bias, then weight).
  const params = Float64Array.from([...b0, ...w0]);
  const m = new Float64Array(9);
  const v = new Float64Array(9);
  const ema = params.slice();
  const steps = [
    { lr: 0.1, decay: 0 },
    { lr: 0.05, decay: 0.5 },
    { lr: 0.2, decay: 0.9 },
    { lr: 0.01, decay: 0.99 },
  ];
  let clipped = 0;
  for (const [i, s] of steps.entries()) {
    const { loss, grad: g } = lossAndGrad(params);
    const norm = Math.sqrt(g.reduce((a, x) => a + x * x, 0));
    const scale = Math.min(adam.maxGradNorm / (norm + 1e-6), 1);
    if (scale < 1) clipped++;
    const t = i + 1;
    for (let k = 0; k < 9; k++) {
      const gk = g[k]! * scale;
      m[k] = adam.beta1 * m[k]! + (1 - adam.beta1) * gk;
      v[k] = adam.beta2 * v[k]! + (1 - adam.beta2) * gk * gk;
      const mHat = m[k]! / (1 - adam.beta1 ** t);
      const vHat = v[k]! / (1 - adam.beta2 ** t);
      const p = params[k]!;
      const decayed = k >= 3 ? p - s.lr * adam.weightDecay * p : p; // matrices decay, biases do not
      params[k] = decayed - (s.lr * mHat) / (Math.sqrt(vHat) + adam.eps);
      ema[k] = s.decay * ema[k]! + (1 - s.decay) * params[k]!;
    }
    const r = await runner.run(data, i, s.lr, s.decay);
    assert.ok(Math.abs(r.loss - loss) < 1e-5, `step ${t}: loss ${r.loss} against ${loss}`);
    assert.ok(
      Math.abs(r.gradNorm - norm) < 1e-5,
      `step ${t}: gradient norm ${r.gradNorm} against ${norm}`,
    );
    const expected: Record<string, ArrayLike<number>> = {
      params,
      adam_m: m,
      adam_v: v,
      ema,
    };
    for (const [name, want] of Object.entries(expected)) {
      const got = runner.state[name as keyof typeof runner.state];
      for (let k = 0; k < 9; k++)
        assert.ok(
          Math.abs(got[k]! - want[k]!) <= 1e-6 + 1e-5 * Math.abs(want[k]!),
          `step ${t}: ${name}[${k}] = ${got[k]} against ${want[k]}`,
        );
    }
  }
  assert.ok(clipped >= 2, `clipping should act on some steps (it did on ${clipped})`);
  await runner.release();
});
