import { UserError } from '../errors.js';
import type { NormalGenerator } from '../tensor/rng.js';
import { concat } from '../tensor/ops.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * What every scheduler shares: diffusers' beta schedules and timestep spacings, computed in
 * float32 where diffusers computes in float32 (torch tensors) and in float64 where it uses NumPy,
 * and the small state machine of step indices. Each scheduler is configured by the keys of
 * diffusers' `scheduler_config.json`.
 */

export type F32 = Tensor<'float32'>;
export type SchedulerConfig = Readonly<Record<string, unknown>>;
/** One generator for the whole batch, or one per batch element (as diffusers accepts). */
export type Generators = NormalGenerator | readonly NormalGenerator[];

const f = Math.fround;

/** `torch.linspace(start, end, steps, dtype=float32)`, element for element. */
export function linspaceFloat32(start: number, end: number, steps: number): Float32Array {
  const out = new Float32Array(steps);
  if (steps === 1) {
    out[0] = start;
    return out;
  }
  const s = f(start);
  const e = f(end);
  const step = f(f(e - s) / (steps - 1));
  const halfway = Math.floor(steps / 2);
  for (let i = 0; i < steps; i++)
    out[i] = i < halfway ? f(s + f(step * i)) : f(e - f(step * (steps - i - 1)));
  return out;
}

/** `np.linspace(start, end, num)` in float64 (NumPy's formula). */
export function linspace(start: number, end: number, num: number, endpoint = true): number[] {
  const div = endpoint ? num - 1 : num;
  const step = div > 0 ? (end - start) / div : 0;
  const out = Array.from({ length: num }, (_, i) => start + i * step);
  if (endpoint && num > 1) out[num - 1] = end;
  return out;
}

/** Rounds half to even, as `np.round` does. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** `np.arange(start, stop, step)` for a positive or negative step. */
export function arange(start: number, stop: number, step = 1): number[] {
  const n = Math.max(0, Math.ceil((stop - start) / step));
  return Array.from({ length: n }, (_, i) => start + i * step);
}

/** `np.interp(x, [0, 1, ..., n-1], values)`. */
export function interpIndex(x: number, values: ArrayLike<number>): number {
  const n = values.length;
  if (x <= 0) return values[0]!;
  if (x >= n - 1) return values[n - 1]!;
  const i = Math.floor(x);
  const w = x - i;
  return values[i]! + w * (values[i + 1]! - values[i]!);
}

function cosineBetas(count: number, maxBeta = 0.999): Float32Array {
  const alphaBar = (t: number) => Math.cos(((t + 0.008) / 1.008) * (Math.PI / 2)) ** 2;
  return Float32Array.from({ length: count }, (_, i) =>
    Math.min(1 - alphaBar((i + 1) / count) / alphaBar(i / count), maxBeta),
  );
}

function rescaleZeroTerminalSnr(betas: Float32Array): Float32Array {
  const n = betas.length;
  const cumprod = new Float32Array(n);
  let acc = 1;
  for (let i = 0; i < n; i++) cumprod[i] = acc = f(acc * f(1 - betas[i]!));
  const sqrt = cumprod.map((v) => f(Math.sqrt(v)));
  const first = sqrt[0]!;
  const last = sqrt[n - 1]!;
  const bar = sqrt.map((v) => f(f(f(v - last) * f(first / f(first - last))) ** 2));
  const out = new Float32Array(n);
  out[0] = f(1 - bar[0]!);
  for (let i = 1; i < n; i++) out[i] = f(1 - f(bar[i]! / bar[i - 1]!));
  return out;
}

/** diffusers' betas for `beta_schedule` (`linear`, `scaled_linear`, `squaredcos_cap_v2`, ...). */
export function betasFor(config: SchedulerConfig): Float32Array {
  const count = num(config, 'num_train_timesteps', 1000);
  const trained = config.trained_betas;
  let betas: Float32Array;
  if (Array.isArray(trained) && trained.length > 0) betas = Float32Array.from(trained as number[]);
  else {
    const schedule = str(config, 'beta_schedule', 'linear');
    const start = num(config, 'beta_start', 0.0001);
    const end = num(config, 'beta_end', 0.02);
    if (schedule === 'linear') betas = linspaceFloat32(start, end, count);
    else if (schedule === 'scaled_linear')
      betas = linspaceFloat32(start ** 0.5, end ** 0.5, count).map((b) => f(b * b));
    else if (schedule === 'squaredcos_cap_v2') betas = cosineBetas(count);
    else if (schedule === 'sigmoid') {
      betas = linspaceFloat32(-6, 6, count).map((x) =>
        f(f(f(1 / (1 + Math.exp(-x))) * f(end - start)) + start),
      );
    } else throw new UserError('bad-config', `unknown beta_schedule '${schedule}'`);
  }
  return config.rescale_betas_zero_snr === true ? rescaleZeroTerminalSnr(betas) : betas;
}

/** cumprod(1 − betas) in float32, as torch computes it. */
export function alphasCumprodFor(config: SchedulerConfig): Float32Array {
  const betas = betasFor(config);
  const out = new Float32Array(betas.length);
  let acc = 1;
  for (let i = 0; i < betas.length; i++) out[i] = acc = f(acc * f(1 - betas[i]!));
  if (config.rescale_betas_zero_snr === true) out[out.length - 1] = 2 ** -24;
  return out;
}

/** σ(t) = √((1 − ᾱ)/ᾱ) for every training timestep, in float32. */
export function trainingSigmas(alphasCumprod: Float32Array): Float32Array {
  return alphasCumprod.map((a) => f(Math.sqrt(f(f(1 - a) / a))));
}

/** Karras et al. (2022) sigmas: ρ = 7 interpolation between σ_max and σ_min. */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, steps: number): number[] {
  const rho = 7;
  const minInv = sigmaMin ** (1 / rho);
  const maxInv = sigmaMax ** (1 / rho);
  return linspace(0, 1, steps).map((r) => (maxInv + r * (minInv - maxInv)) ** rho);
}

/** The fractional training timestep whose log-sigma matches `sigma` (diffusers' `_sigma_to_t`). */
export function sigmaToT(sigma: number, logSigmas: ArrayLike<number>): number {
  const logSigma = Math.log(Math.max(sigma, 1e-10));
  // log-sigmas increase with t: the last one at or below logSigma starts the bracket.
  let low = 0;
  for (let i = 0; i < logSigmas.length; i++) if (logSigma - logSigmas[i]! >= 0) low = i;
  low = Math.min(low, logSigmas.length - 2);
  const lo = logSigmas[low]!;
  const hi = logSigmas[low + 1]!;
  const w = Math.min(Math.max((lo - logSigma) / (lo - hi), 0), 1);
  return (1 - w) * low + w * (low + 1);
}

/** np.log of a float32 array: float32 results. */
export function logFloat32(values: Float32Array): Float32Array {
  return values.map((v) => Math.fround(Math.log(v)));
}

export function num(config: SchedulerConfig, key: string, fallback: number): number {
  const v = config[key];
  return typeof v === 'number' ? v : fallback;
}

export function str(config: SchedulerConfig, key: string, fallback: string): string {
  const v = config[key];
  return typeof v === 'string' ? v : fallback;
}

export function bool(config: SchedulerConfig, key: string, fallback: boolean): boolean {
  const v = config[key];
  return typeof v === 'boolean' ? v : fallback;
}

export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';

export function predictionType(
  config: SchedulerConfig,
  allowed: readonly PredictionType[] = ['epsilon', 'v_prediction', 'sample'],
): PredictionType {
  const p = str(config, 'prediction_type', 'epsilon');
  const name = p === 'original_sample' ? 'sample' : p;
  if (!allowed.includes(name as PredictionType)) {
    throw new UserError(
      'bad-config',
      `this scheduler does not support prediction_type '${p}' (use ${allowed.join(', ')})`,
    );
  }
  return name as PredictionType;
}

/** Draws standard normal noise as diffusers' `randn_tensor` does for CPU generators. */
export function randnLike(shape: readonly number[], generator: Generators | undefined): F32 {
  if (generator === undefined) {
    throw new Error('this scheduler step draws noise and needs a generator');
  }
  if (!Array.isArray(generator)) return (generator as NormalGenerator).randn(shape);
  const gens = generator as readonly NormalGenerator[];
  if (gens.length !== shape[0])
    throw new Error(`${gens.length} generators for a batch of ${shape[0]}`);
  return concat(gens.map((g) => g.randn([1, ...shape.slice(1)])));
}

/** Elementwise `out[i] = fn(i)` over a tensor shape. */
export function fill(shape: readonly number[], fn: (i: number) => number): F32 {
  const t = new Tensor('float32', shape);
  const d = t.data;
  for (let i = 0; i < d.length; i++) d[i] = fn(i);
  return t;
}

/** The interface the pipelines drive; each scheduler is a small state machine over steps. */
export abstract class Scheduler {
  readonly config: SchedulerConfig;
  /** Model calls per denoising step (2 for Heun). */
  readonly order: number = 1;
  timesteps: number[] = [];
  initNoiseSigma = 1;
  protected stepIndexValue: number | undefined;
  protected beginIndexValue: number | undefined;

  constructor(config: SchedulerConfig) {
    this.config = config;
  }

  /** diffusers' class name (`EulerDiscreteScheduler`). */
  abstract readonly className: string;

  abstract setTimesteps(steps: number): void;

  /** Divides by √(σ² + 1) for sigma-based schedulers; identity for the rest. */
  scaleModelInput(sample: F32, _timestep: number): F32 {
    return sample;
  }

  /** One denoising step: the sample at the next timestep. */
  abstract step(modelOutput: F32, timestep: number, sample: F32, generator?: Generators): F32;

  /** The forward process: noise `original` to `timestep` (image-to-image). */
  abstract addNoise(original: F32, noise: F32, timestep: number): F32;

  get stepIndex(): number | undefined {
    return this.stepIndexValue;
  }

  /** Where the loop starts (image-to-image skips the first steps). */
  setBeginIndex(index: number): void {
    this.beginIndexValue = index;
  }

  protected resetIndices(): void {
    this.stepIndexValue = undefined;
    this.beginIndexValue = undefined;
  }

  /** The position of `timestep` in the schedule (the second match when it repeats, as diffusers). */
  protected indexForTimestep(timestep: number): number {
    const matches: number[] = [];
    this.timesteps.forEach((t, i) => {
      if (t === timestep) matches.push(i);
    });
    const index = matches.length > 1 ? matches[1] : matches[0];
    if (index === undefined) throw new Error(`timestep ${timestep} is not in the schedule`);
    return index;
  }

  protected initStepIndex(timestep: number): number {
    // diffusers takes the second copy of a repeated timestep, which for a schedule that repeats
    // its first one (Karras sigmas over a cosine schedule) skips a step and runs off the end of
    // the sigmas; a loop that begins at the first timestep starts at index 0.
    this.stepIndexValue ??=
      this.beginIndexValue ??
      (timestep === this.timesteps[0] ? 0 : this.indexForTimestep(timestep));
    return this.stepIndexValue;
  }
}
