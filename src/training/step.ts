import { gradients } from '../graph/autodiff.js';
import { Graph, type Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import type { ParameterSource } from '../nn/module.js';
import { shapeSize, Tensor } from '../tensor/tensor.js';

/**
 * One training step as one ONNX graph: forward, loss, backward, global-norm gradient clipping,
 * AdamW (decoupled weight decay) and an exponential moving average of the weights.
 *
 * All parameters live in one flat float32 vector (and so do Adam's moments and the EMA): the model
 * reads each parameter as a slice of it, and the update is a handful of ops over whole vectors
 * instead of a dozen per parameter. The host keeps the four vectors between steps.
 */

export interface AdamWConfig {
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  /** Clip the gradients' global L2 norm to this (0: no clipping). */
  readonly maxGradNorm: number;
  /** Keep an EMA of the weights. */
  readonly ema: boolean;
  /**
   * Learning-rate multipliers by parameter-name prefix, as PyTorch's parameter groups: a parameter
   * takes the scale of the longest prefix it starts with (1 when none does), for its update and its
   * weight decay alike.
   */
  readonly learningRateScales?: Readonly<Record<string, number>>;
}

export const DEFAULT_ADAMW: AdamWConfig = {
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0.01,
  maxGradNorm: 1,
  ema: true,
};

/** Names of the step graph's state inputs; outputs are the same names with `next/` in front. */
export const STATE = ['params', 'adam_m', 'adam_v', 'ema'] as const;
export type StateName = (typeof STATE)[number];
export const next = (name: string) => `next/${name}`;

/** Scalar inputs the host sets every step. */
export const STEP_SCALARS = ['lr', 'bias_correction1', 'bias_correction2', 'ema_decay'] as const;

/** The learning-rate multiplier of parameter `key` (see AdamWConfig.learningRateScales). */
export function learningRateScaleOf(
  scales: Readonly<Record<string, number>> | undefined,
  key: string,
): number {
  let best: string | undefined;
  for (const prefix of Object.keys(scales ?? {}))
    if (key.startsWith(prefix) && (best === undefined || prefix.length > best.length))
      best = prefix;
  return best === undefined ? 1 : scales![best]!;
}

/** Where each parameter sits in the flat vector. */
export interface ParameterLayout {
  readonly keys: readonly string[];
  readonly shapes: ReadonlyMap<string, readonly number[]>;
  readonly offsets: ReadonlyMap<string, number>;
  readonly size: number;
}

export function parameterLayout(shapes: ReadonlyMap<string, readonly number[]>): ParameterLayout {
  const offsets = new Map<string, number>();
  let size = 0;
  for (const [key, shape] of shapes) {
    offsets.set(key, size);
    size += shapeSize(shape);
  }
  return { keys: [...shapes.keys()], shapes, offsets, size };
}

/** The named tensors of a flat vector (views, not copies). */
export function unflatten(
  layout: ParameterLayout,
  flat: Float32Array,
): Record<string, Tensor<'float32'>> {
  const out: Record<string, Tensor<'float32'>> = {};
  for (const key of layout.keys) {
    const shape = layout.shapes.get(key)!;
    const offset = layout.offsets.get(key)!;
    const n = shapeSize(shape);
    out[key] = new Tensor('float32', shape, flat.subarray(offset, offset + n));
  }
  return out;
}

/** Named tensors into a flat vector; every key of the layout must be present with its shape. */
export function flatten(
  layout: ParameterLayout,
  tensors: Readonly<Record<string, Tensor>>,
): Float32Array {
  const flat = new Float32Array(layout.size);
  for (const key of layout.keys) {
    const t = tensors[key];
    const shape = layout.shapes.get(key)!;
    if (t === undefined) throw new Error(`missing parameter '${key}'`);
    if (t.shape.join() !== shape.join())
      throw new Error(
        `parameter '${key}' is [${t.shape.join(', ')}], expected [${shape.join(', ')}]`,
      );
    flat.set(t.toFloat32().data, layout.offsets.get(key)!);
  }
  return flat;
}

/**
 * Parameters read as slices of a flat vector input (the trainable ones, or a frozen model's, such
 * as the discriminator inside a generator step).
 */
export function flatParameters(
  graph: Graph,
  flat: Value,
  layout: ParameterLayout,
): { source: ParameterSource; values: Map<string, Value> } {
  const values = new Map<string, Value>();
  graph.scope(`parameters/${flat.name}`, () => {
    for (const key of layout.keys) {
      const shape = layout.shapes.get(key)!;
      const offset = layout.offsets.get(key)!;
      const n = shapeSize(shape);
      values.set(key, op.reshape(op.slice(flat, [offset], [offset + n], [0]), shape));
    }
  });
  const source: ParameterSource = {
    graph,
    parameter: (key: string) => {
      const v = values.get(key);
      if (v === undefined) throw new Error(`no parameter '${key}' in '${flat.name}'`);
      return v;
    },
  };
  return { source, values };
}

export interface TrainStep {
  readonly graph: Graph;
  readonly layout: ParameterLayout;
}

/**
 * Builds the step graph. `buildLoss` emits the forward pass and returns a scalar loss; it gets the
 * parameters as graph values and declares its own data inputs. `decays(key, shape)` says which
 * parameters take weight decay (by default: matrices and kernels, not biases or norms).
 */
export function buildTrainStep(
  shapes: ReadonlyMap<string, readonly number[]>,
  buildLoss: (params: ParameterSource, graph: Graph) => Value,
  config: AdamWConfig = DEFAULT_ADAMW,
  decays: (key: string, shape: readonly number[]) => boolean = (_, shape) => shape.length >= 2,
): TrainStep {
  const layout = parameterLayout(shapes);
  const graph = new Graph('train_step');
  const flat = graph.input('params', 'float32', [layout.size]);
  const { source, values: params } = flatParameters(graph, flat, layout);
  const loss = buildLoss(source, graph);
  const leaves = layout.keys.map((k) => params.get(k)!);
  const grads = gradients(loss, leaves);

  const [lr, bc1, bc2, emaDecay] = STEP_SCALARS.map((name) => graph.input(name, 'float32', [])) as [
    Value,
    Value,
    Value,
    Value,
  ];
  graph.scope('optimizer', () => {
    let g = op.concat(
      leaves.map((v) => op.reshape(grads.get(v)!, [-1])),
      0,
    );
    const norm = op.sqrt(op.reduceSum(op.mul(g, g), [0], false));
    graph.output(loss, 'loss');
    graph.output(norm, 'grad_norm');
    if (config.maxGradNorm > 0)
      g = op.mul(g, op.min(op.div(config.maxGradNorm, op.add(norm, 1e-6)), 1));
    const m = graph.input('adam_m', 'float32', [layout.size]);
    const v = graph.input('adam_v', 'float32', [layout.size]);
    const m2 = op.add(op.mul(m, config.beta1), op.mul(g, 1 - config.beta1));
    const v2 = op.add(op.mul(v, config.beta2), op.mul(op.mul(g, g), 1 - config.beta2));
    const update = op.div(op.mul(m2, bc1), op.add(op.sqrt(op.mul(v2, bc2)), config.eps));
    // A vector over the flat parameters holding each parameter's own value in its range.
    const perElement = (
      valueOf: (key: string, shape: readonly number[]) => number,
      name: string,
    ) => {
      const values = new Float32Array(layout.size);
      for (const key of layout.keys) {
        const shape = layout.shapes.get(key)!;
        const offset = layout.offsets.get(key)!;
        values.fill(valueOf(key, shape), offset, offset + shapeSize(shape));
      }
      return graph.constant(new Tensor('float32', [layout.size], values), name);
    };
    // A step size per element when any parameter's learning rate is scaled; the scalar otherwise.
    const scaleOf = (key: string) => learningRateScaleOf(config.learningRateScales, key);
    const step: Value = layout.keys.some((key) => scaleOf(key) !== 1)
      ? op.mul(perElement(scaleOf, 'learning_rate_scale'), lr)
      : lr;
    let p = flat;
    if (config.weightDecay > 0) {
      const decay = perElement(
        (key, shape) => (decays(key, shape) ? config.weightDecay : 0),
        'weight_decay',
      );
      p = op.sub(p, op.mul(op.mul(p, decay), step));
    }
    const p2 = op.sub(p, op.mul(update, step));
    graph.output(p2, next('params'));
    graph.output(m2, next('adam_m'));
    graph.output(v2, next('adam_v'));
    if (config.ema) {
      const e = graph.input('ema', 'float32', [layout.size]);
      graph.output(op.add(op.mul(e, emaDecay), op.mul(p2, op.sub(1, emaDecay))), next('ema'));
    }
  });
  return { graph, layout };
}
