import { UserError } from '../errors.js';
import { Tensor } from '../tensor/tensor.js';
import {
  arange,
  fill,
  linspace,
  num,
  roundHalfEven,
  str,
  type F32,
  type PredictionType,
  type SchedulerConfig,
} from './scheduler.js';

/** Shared arithmetic of the schedulers that work on ᾱ(t) and integer timesteps (DDIM, DDPM, PNDM, LCM). */

/** diffusers' integer timestep spacings: `linspace`, `leading` (+ steps_offset) and `trailing`. */
export function integerTimesteps(
  config: SchedulerConfig,
  steps: number,
  defaultSpacing: string,
): number[] {
  const total = num(config, 'num_train_timesteps', 1000);
  if (!Number.isInteger(steps) || steps < 1)
    throw new UserError('bad-steps', `steps must be a positive integer (got ${steps})`);
  if (steps > total) {
    throw new UserError(
      'bad-steps',
      `${steps} steps is more than the ${total} timesteps this model was trained with`,
    );
  }
  const spacing = str(config, 'timestep_spacing', defaultSpacing);
  if (spacing === 'linspace')
    return linspace(0, total - 1, steps)
      .map(roundHalfEven)
      .reverse();
  if (spacing === 'leading') {
    const ratio = Math.floor(total / steps);
    const offset = num(config, 'steps_offset', 0);
    return arange(0, steps)
      .map((i) => i * ratio + offset)
      .reverse();
  }
  if (spacing === 'trailing') {
    const ratio = total / steps;
    return arange(total, 0, -ratio).map((t) => roundHalfEven(t) - 1);
  }
  throw new UserError(
    'bad-config',
    `timestep_spacing '${spacing}' is not one of linspace, leading, trailing`,
  );
}

/** x₀ and ε from a model output at ᾱ, for each prediction type. */
export function predictOriginalAndEpsilon(
  type: PredictionType,
  modelOutput: F32,
  sample: F32,
  alphaProd: number,
): { original: F32; epsilon: F32 } {
  const a = Math.sqrt(alphaProd);
  const b = Math.sqrt(1 - alphaProd);
  const m = modelOutput.data;
  const x = sample.data;
  if (type === 'epsilon')
    return { original: fill(sample.shape, (i) => (x[i]! - b * m[i]!) / a), epsilon: modelOutput };
  if (type === 'sample')
    return { original: modelOutput, epsilon: fill(sample.shape, (i) => (x[i]! - a * m[i]!) / b) };
  return {
    original: fill(sample.shape, (i) => a * x[i]! - b * m[i]!),
    epsilon: fill(sample.shape, (i) => a * m[i]! + b * x[i]!),
  };
}

/** Clamps to ±clip_sample_range, or applies dynamic thresholding, as the config asks. */
export function clipOriginal(config: SchedulerConfig, original: F32, clipDefault: boolean): F32 {
  if (config.thresholding === true) return thresholdSample(original, config);
  const clip = typeof config.clip_sample === 'boolean' ? config.clip_sample : clipDefault;
  if (!clip) return original;
  const r = num(config, 'clip_sample_range', 1);
  const d = original.data;
  return fill(original.shape, (i) => Math.min(Math.max(d[i]!, -r), r));
}

/** Imagen's dynamic thresholding (diffusers' `_threshold_sample`). */
export function thresholdSample(sample: F32, config: SchedulerConfig): F32 {
  const ratio = num(config, 'dynamic_thresholding_ratio', 0.995);
  const maxValue = num(config, 'sample_max_value', 1);
  const batch = sample.shape[0]!;
  const per = sample.size / batch;
  const out = new Float32Array(sample.size);
  for (let b = 0; b < batch; b++) {
    const row = sample.data.subarray(b * per, (b + 1) * per);
    const sorted = Float64Array.from(row, Math.abs).sort();
    const pos = ratio * (per - 1);
    const lo = Math.floor(pos);
    const quantile =
      sorted[lo]! + (pos - lo) * ((sorted[Math.min(lo + 1, per - 1)] ?? 0) - sorted[lo]!);
    const s = Math.min(Math.max(quantile, 1), maxValue);
    for (let i = 0; i < per; i++) out[b * per + i] = Math.min(Math.max(row[i]!, -s), s) / s;
  }
  return new Tensor('float32', sample.shape, out);
}

/** √ᾱ·x₀ + √(1 − ᾱ)·noise at integer timestep t. */
export function addNoiseAt(
  alphasCumprod: Float32Array,
  original: F32,
  noise: F32,
  timestep: number,
): F32 {
  const a = alphasCumprod[timestep];
  if (a === undefined) throw new Error(`timestep ${timestep} is outside the training schedule`);
  const sa = Math.sqrt(a);
  const sb = Math.sqrt(1 - a);
  const o = original.data;
  const n = noise.data;
  return fill(original.shape, (i) => sa * o[i]! + sb * n[i]!);
}
