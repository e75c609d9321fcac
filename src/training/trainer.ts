import { UserError } from '../errors.js';
import type { Graph, Value } from '../graph/ir.js';
import { emitOnnx } from '../graph/onnx.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import type { ParameterSource } from '../nn/module.js';
import { Session, type RuntimeOptions } from '../runtime/session.js';
import { TorchGenerator } from '../tensor/rng.js';
import { Tensor } from '../tensor/tensor.js';
import {
  buildTrainStep,
  DEFAULT_ADAMW,
  next,
  parameterLayout,
  STATE,
  type AdamWConfig,
  type ParameterLayout,
  type StateName,
  unflatten,
} from './step.js';

/**
 * The training loop: state on the host, one ONNX Runtime call per step. Everything random (data
 * and noise) comes from generators whose state is part of the checkpoint, and ONNX Runtime is
 * deterministic on CPU for a fixed thread count, so resuming continues bit for bit.
 */

/** A generator of training batches and the loss to train on them. */
export interface TrainingTask {
  /** Parameter shapes by full key (the model's state-dict keys). */
  readonly shapes: ReadonlyMap<string, readonly number[]>;
  /** Fresh parameters for a new run. */
  initialParameters(random: TorchGenerator): Map<string, Float32Array>;
  /** Emits the forward pass and returns the scalar loss; declares its own data inputs. */
  buildLoss(params: ParameterSource, graph: Graph): Value;
  /** The data inputs of step `step`, drawn from `random` (data) and `noise` (model noise). */
  batch(
    step: number,
    random: DataRandom,
    noise: TorchGenerator,
  ): Record<string, Tensor> | Promise<Record<string, Tensor>>;
  /** Identifies the graph (architecture and batch shape) for the graph cache. */
  readonly cacheKey: string;
}

/** mulberry32 with visible state, for reproducible data. */
export class DataRandom {
  state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** A `() => number` view for samplers. */
  readonly uniform = (): number => this.next();
}

export interface Schedule {
  readonly steps: number;
  readonly learningRate: number;
  readonly warmupSteps: number;
  /** 'cosine' decays to `finalLearningRate`; 'constant' holds after warm-up. */
  readonly decay: 'cosine' | 'constant';
  readonly finalLearningRate: number;
  /** The EMA decay, reached gradually ((1 + step) / (10 + step) early on). */
  readonly emaDecay: number;
}

export function learningRateAt(s: Schedule, step: number): number {
  if (step < s.warmupSteps) return (s.learningRate * (step + 1)) / s.warmupSteps;
  if (s.decay === 'constant') return s.learningRate;
  const progress = Math.min(1, (step - s.warmupSteps) / Math.max(1, s.steps - s.warmupSteps));
  return (
    s.finalLearningRate +
    0.5 * (s.learningRate - s.finalLearningRate) * (1 + Math.cos(Math.PI * progress))
  );
}

export function emaDecayAt(s: Schedule, step: number): number {
  return Math.min(s.emaDecay, (1 + step) / (10 + step));
}

export interface TrainerOptions {
  readonly schedule: Schedule;
  readonly adam?: AdamWConfig;
  readonly seed: number;
  readonly runtime?: RuntimeOptions;
}

export interface StepResult {
  readonly step: number;
  readonly loss: number;
  readonly gradNorm: number;
  readonly learningRate: number;
}

/**
 * One optimized parameter vector and its step graph: runs a step with data feeds, keeps the
 * parameters, Adam moments and EMA on the host.
 */
export class StepRunner {
  readonly layout: ParameterLayout;
  readonly state: Record<StateName, Float32Array>;
  private readonly session: Session;
  private readonly adam: AdamWConfig;

  private constructor(
    layout: ParameterLayout,
    session: Session,
    adam: AdamWConfig,
    params: Float32Array,
  ) {
    this.layout = layout;
    this.session = session;
    this.adam = adam;
    this.state = {
      params,
      adam_m: new Float32Array(layout.size),
      adam_v: new Float32Array(layout.size),
      ema: params.slice(),
    };
  }

  static async create(
    shapes: ReadonlyMap<string, readonly number[]>,
    buildLoss: (p: ParameterSource, g: Graph) => Value,
    init: ReadonlyMap<string, Float32Array>,
    options: { adam: AdamWConfig; runtime: RuntimeOptions; cacheKey: string },
  ): Promise<StepRunner> {
    const layout = parameterLayout(shapes);
    for (const prefix of Object.keys(options.adam.learningRateScales ?? {}))
      if (!layout.keys.some((key) => key.startsWith(prefix)))
        throw new UserError(
          'bad-config',
          `learning_rate_scales names '${prefix}', which begins no parameter's name; parameters are named as in the model's safetensors files with their folder in front (${[...new Set(layout.keys.map((k) => k.split('.')[0]))].map((p) => `${p}.`).join(', ')})`,
        );
    const session = await Session.create(
      {
        key: JSON.stringify({ trainStep: options.cacheKey, adam: options.adam }),
        emit: () => emitOnnx(buildTrainStep(shapes, buildLoss, options.adam).graph),
      },
      options.runtime,
    );
    const params = new Float32Array(layout.size);
    for (const key of layout.keys) {
      const values = init.get(key);
      if (values === undefined) throw new Error(`no initial value for '${key}'`);
      params.set(values, layout.offsets.get(key)!);
    }
    return new StepRunner(layout, session, options.adam, params);
  }

  /** One optimizer step (`step` counts from 0); returns the loss, norm and the graph's other outputs. */
  async run(
    data: Readonly<Record<string, Tensor>>,
    step: number,
    learningRate: number,
    emaDecay: number,
  ): Promise<{ loss: number; gradNorm: number; outputs: Record<string, Tensor> }> {
    const t = step + 1;
    const feeds: Record<string, Tensor> = {
      ...data,
      lr: Tensor.full([], learningRate),
      bias_correction1: Tensor.full([], 1 / (1 - this.adam.beta1 ** t)),
      bias_correction2: Tensor.full([], 1 / (1 - this.adam.beta2 ** t)),
      ema_decay: Tensor.full([], emaDecay),
    };
    for (const name of STATE)
      feeds[name] = new Tensor('float32', [this.layout.size], this.state[name]);
    const out = await this.session.run(feeds);
    // The step's outputs become the state as they are: copying them would be one more pass
    // over all four vectors every step.
    for (const name of STATE) {
      const updated = out[next(name)];
      if (updated !== undefined) this.state[name] = updated.data as Float32Array;
    }
    const loss = (out.loss!.data as Float32Array)[0]!;
    if (!Number.isFinite(loss))
      throw new Error(`the loss became ${loss} at step ${step}; lower the learning rate`);
    return { loss, gradNorm: (out.grad_norm!.data as Float32Array)[0]!, outputs: out };
  }

  /** Named weights (the EMA by default) as inference loads them. */
  weights(which: 'ema' | 'params' = 'ema'): Record<string, Tensor<'float32'>> {
    // A copy: the state's vectors are the step's outputs, replaced every step.
    return unflatten(this.layout, this.state[which].slice());
  }

  /** The state tensors for a checkpoint, names prefixed. */
  checkpointTensors(prefix = ''): Record<string, Tensor> {
    const tensors: Record<string, Tensor> = {};
    for (const name of STATE)
      tensors[prefix + name] = new Tensor('float32', [this.layout.size], this.state[name]);
    return tensors;
  }

  async restore(file: SafetensorsFile, prefix = ''): Promise<void> {
    for (const name of STATE)
      this.state[name].set((await file.read(prefix + name)).toFloat32().data);
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

/** The shared bookkeeping of a checkpoint: format, step, layout and generator states. */
export function checkpointMetadata(
  step: number,
  layout: string,
  data: DataRandom,
  noise: TorchGenerator,
): Record<string, string> {
  return {
    format: 'gesso-training-state',
    step: String(step),
    layout,
    data_random: String(data.state),
    noise_random: JSON.stringify({ ...noise.getState(), mt: Array.from(noise.getState().mt) }),
  };
}

export function restoreCheckpointMetadata(
  path: string,
  meta: Readonly<Record<string, string>>,
  layout: string,
  data: DataRandom,
  noise: TorchGenerator,
): number {
  if (meta.format !== 'gesso-training-state')
    throw new UserError('bad-checkpoint', `${path} is not a gesso training checkpoint`);
  if (meta.layout !== layout) {
    throw new UserError(
      'bad-checkpoint',
      `${path} was written for a different model or configuration; start a new run or use its config`,
    );
  }
  data.state = Number(meta.data_random);
  noise.setState(JSON.parse(meta.noise_random!) as Parameters<TorchGenerator['setState']>[0]);
  return Number(meta.step);
}

export class Trainer {
  readonly task: TrainingTask;
  readonly options: TrainerOptions;
  /** Steps done. */
  step = 0;
  readonly dataRandom: DataRandom;
  readonly noise: TorchGenerator;
  private readonly runner: StepRunner;

  private constructor(task: TrainingTask, options: TrainerOptions, runner: StepRunner) {
    this.task = task;
    this.options = options;
    this.runner = runner;
    this.dataRandom = new DataRandom(options.seed);
    this.noise = new TorchGenerator(options.seed + 1);
  }

  get layout(): ParameterLayout {
    return this.runner.layout;
  }

  get state(): Record<StateName, Float32Array> {
    return this.runner.state;
  }

  static async create(task: TrainingTask, options: TrainerOptions): Promise<Trainer> {
    const runner = await StepRunner.create(
      task.shapes,
      (p, g) => task.buildLoss(p, g),
      task.initialParameters(new TorchGenerator(options.seed)),
      {
        adam: options.adam ?? DEFAULT_ADAMW,
        runtime: options.runtime ?? {},
        cacheKey: task.cacheKey,
      },
    );
    return new Trainer(task, options, runner);
  }

  /** A trainer continuing from a checkpoint written by `save`. */
  static async resume(path: string, task: TrainingTask, options: TrainerOptions): Promise<Trainer> {
    const trainer = await Trainer.create(task, options);
    await SafetensorsFile.with(path, async (file) => {
      trainer.step = restoreCheckpointMetadata(
        path,
        file.metadata,
        trainer.layoutKey,
        trainer.dataRandom,
        trainer.noise,
      );
      await trainer.runner.restore(file);
    });
    return trainer;
  }

  private get layoutKey(): string {
    return JSON.stringify([...this.runner.layout.shapes]);
  }

  async runStep(): Promise<StepResult> {
    const { schedule } = this.options;
    const step = this.step;
    const learningRate = learningRateAt(schedule, step);
    const r = await this.runner.run(
      await this.task.batch(step, this.dataRandom, this.noise),
      step,
      learningRate,
      emaDecayAt(schedule, step),
    );
    this.step += 1;
    return { step: this.step, loss: r.loss, gradNorm: r.gradNorm, learningRate };
  }

  weights(which: 'ema' | 'params' = 'ema'): Record<string, Tensor<'float32'>> {
    return this.runner.weights(which);
  }

  /** Writes everything needed to resume (atomically). */
  async save(path: string, extraMetadata: Record<string, string> = {}): Promise<void> {
    await writeSafetensors(path, this.runner.checkpointTensors(), {
      ...extraMetadata,
      ...checkpointMetadata(this.step, this.layoutKey, this.dataRandom, this.noise),
    });
  }

  async release(): Promise<void> {
    await this.runner.release();
  }
}
