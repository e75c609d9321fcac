import { existsSync } from 'node:fs';
import { appendFile, mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { folderSource, shapesSource, type DataSource } from '../data/source.js';
import { UserError } from '../errors.js';
import { FeatureTask } from '../eval/features.js';
import { writeFileAtomically } from '../io/atomic.js';
import { contactSheet, toUint8 } from '../io/image.js';
import { encodePng } from '../io/png.js';
import { loadPipeline } from '../pipelines/index.js';
import {
  describeFields,
  readTrainConfigFile,
  resolveTrainConfig,
  type TrainConfig,
} from '../training/config.js';
import { AutoencoderTask, DecoderTask, reconstructionObjective } from '../training/autoencoder.js';
import { DiffusionTask, LatentSpace, type DiffusionRecipe } from '../training/diffusion.js';
import { GanTrainer, type GanRecipe } from '../training/gan.js';
import { sentencePooling } from '../models/gan.js';
import {
  Trainer,
  type Schedule,
  type TrainerOptions,
  type TrainingTask,
} from '../training/trainer.js';
import type { RuntimeOptions } from '../runtime/session.js';
import { parseNumber } from './args.js';
import { formatDuration } from './format.js';
import { runAgainWith, tunedMallocEnvironment } from './tuned-malloc.js';

export const TRAIN_USAGE = `usage: gesso train [--config FILE.json|FILE.yaml] [options]

Trains a text-to-image model from scratch (on the shapes world unless --data names a folder).
A run folder holds checkpoint/ (resume state), model/ (the model, for gesso generate --model),
samples/ (grids) and log.jsonl. Ctrl-C saves before stopping; --resume continues bit for bit.

options (each overrides the config file's field of the same name):
  --config FILE        a JSON or YAML file of the fields below
  --route R            diffusion, gan, autoencoder, or features
  --out DIR            run folder
  --steps N            optimizer steps in all
  --batch-size N       images per step
  --learning-rate X    peak learning rate
  --final-learning-rate X  learning rate at the last step
  --warmup-steps N     steps of linear warm-up to the peak
  --init-from DIR      diffusion route: fine-tune the model in DIR instead of starting fresh
  --seed N             seed for everything random
  --data shapes|DIR    training data
  --save-every N       checkpoint interval
  --sample-every N     sample-grid interval (0: none)
  --threads N          compute threads
  --resume             continue the run in --out from its checkpoint

config fields:
${describeFields()}`;

function fromFlags(values: Record<string, string | boolean | undefined>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const numbers: [string, string, boolean][] = [
    ['steps', 'steps', true],
    ['batch-size', 'batch_size', true],
    ['learning-rate', 'learning_rate', false],
    ['final-learning-rate', 'final_learning_rate', false],
    ['warmup-steps', 'warmup_steps', true],
    ['seed', 'seed', true],
    ['save-every', 'save_every', true],
    ['sample-every', 'sample_every', true],
    ['threads', 'threads', true],
  ];
  for (const [flag, key, integer] of numbers) {
    const v = parseNumber(flag, values[flag] as string | undefined, { integer, min: 0 });
    if (v !== undefined) out[key] = v;
  }
  for (const key of ['out', 'data', 'route'] as const)
    if (typeof values[key] === 'string') out[key] = values[key];
  if (typeof values['init-from'] === 'string') out.init_from = values['init-from'];
  return out;
}

export function recipeOf(config: TrainConfig): DiffusionRecipe {
  return {
    batchSize: config.batch_size,
    captionDropout: config.caption_dropout,
    patchSize: config.model.patch_size,
    maxLength: config.model.max_length,
    textEncoder: config.model.text_encoder,
    unet: config.model.unet,
    noise: config.model.noise,
    snrWeightCap: config.model.snr_weight_cap,
  };
}

/** `latents`: the autoencoder of a latent GAN (vae_from); the GAN then draws its latents. */
export function ganRecipeOf(
  config: TrainConfig,
  textDim: number,
  latents?: { channels: number; side: number },
): GanRecipe {
  const g = config.gan;
  if (!Number.isInteger(g.blocks_per_resolution) || g.blocks_per_resolution < 1)
    throw new UserError(
      'bad-config',
      `gan.blocks_per_resolution must be a whole number of 1 or more (got ${JSON.stringify(g.blocks_per_resolution)})`,
    );
  return {
    batchSize: config.batch_size,
    generator: {
      zDim: g.z_dim,
      textDim,
      nf: g.nf,
      imageSize: latents?.side ?? 64,
      patchSize: latents !== undefined ? 1 : g.patch_size,
      attentionResolutions: g.attention_resolutions,
      latentChannels: latents?.channels ?? 0,
      blocksPerResolution: g.blocks_per_resolution,
      sentencePooling: sentencePooling(g.sentence, 'gan.sentence'),
    },
    generatorLearningRate: g.generator_learning_rate,
    discriminatorLearningRate: g.discriminator_learning_rate,
    gpWeight: g.gp_weight,
    gpPower: g.gp_power,
    textEncoderFrom: config.text_encoder_from,
  };
}

function scheduleOf(config: TrainConfig): Schedule {
  return {
    steps: config.steps,
    learningRate: config.learning_rate,
    warmupSteps: config.warmup_steps,
    decay: config.decay,
    finalLearningRate: config.final_learning_rate,
    emaDecay: config.ema_decay,
  };
}

/** The thread count the config asks for, as runtime options. */
function runtimeOf(config: TrainConfig): RuntimeOptions {
  return config.threads !== null ? { threads: config.threads } : {};
}

/** A new trainer for `task`, or the one saved at `checkpoint` when resuming. */
function startTrainer(
  task: TrainingTask,
  options: TrainerOptions,
  resume: boolean,
  checkpoint: string,
): Promise<Trainer> {
  return resume ? Trainer.resume(checkpoint, task, options) : Trainer.create(task, options);
}

/** A training run as the loop sees it, whatever the route. */
interface Run {
  readonly step: number;
  readonly description: string;
  /** Where a new run starts (default: from scratch). */
  readonly startsFrom?: string;
  /** One step; the losses to report, by name. */
  runStep(): Promise<Record<string, number>>;
  /** Checkpoint and model folder. */
  save(): Promise<void>;
  readonly modelDir: string | undefined;
  release(): Promise<void>;
}

async function writeSampleGrid(path: string, modelDir: string, config: TrainConfig): Promise<void> {
  const pipe = await loadPipeline(modelDir, {
    cacheDir: false,
    ...runtimeOf(config),
  });
  try {
    const prompts = config.sample_prompts;
    const { images } = await pipe.generate({
      prompt: prompts,
      steps: config.sample_steps,
      guidance: config.sample_guidance,
      seed: prompts.map((_, i) => config.seed * 1000 + i),
    });
    const pixels = toUint8(images);
    await writeFileAtomically(
      path,
      encodePng(contactSheet(pixels, Math.min(pixels.shape[0]!, 4)), {
        prompts: prompts.join('\n'),
      }),
    );
  } finally {
    await pipe.release();
  }
}

async function dataSource(config: TrainConfig): Promise<DataSource> {
  return config.data === 'shapes'
    ? shapesSource(config.shapes_colourless)
    : folderSource(config.data, 64);
}

/** The autoencoder vae_from names, loaded; undefined for pixel space. */
async function latentSpaceOf(
  config: TrainConfig,
  runtime: RuntimeOptions,
): Promise<LatentSpace | undefined> {
  if (config.vae_from === '') return undefined;
  if (!existsSync(join(config.vae_from, 'config.json')))
    throw new UserError(
      'missing-autoencoder',
      `vae_from names ${config.vae_from}, which holds no trained autoencoder (config.json); train one with --route autoencoder, or leave vae_from empty for pixel space`,
    );
  return LatentSpace.load(config.vae_from, runtime);
}

async function diffusionRun(
  config: TrainConfig,
  resume: boolean,
  checkpoint: string,
): Promise<Run> {
  const data = await dataSource(config);
  const runtime = runtimeOf(config);
  const latents = await latentSpaceOf(config, runtime);
  const task = new DiffusionTask(recipeOf(config), data, latents);
  const init = config.init_from;
  if (init !== '' && !resume) {
    for (const file of [
      'tokenizer/vocab.json',
      'text_encoder/model.safetensors',
      'unet/diffusion_pytorch_model.safetensors',
    ])
      if (!existsSync(join(init, file)))
        throw new UserError(
          'missing-model',
          `init_from names ${init}, which has no ${file}; name a diffusion model folder that gesso train wrote (a run's model/)`,
        );
    await task.startFrom(init);
  }
  const options = {
    seed: config.seed,
    schedule: scheduleOf(config),
    adam: {
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weightDecay: config.weight_decay,
      maxGradNorm: config.max_grad_norm,
      ema: true,
      learningRateScales: config.learning_rate_scales,
    },
    runtime,
  };
  const trainer = await startTrainer(task, options, resume, checkpoint);
  const modelDir = join(config.out, 'model');
  return {
    get step() {
      return trainer.step;
    },
    description: `a diffusion model of ${task.model.parameterCount().toLocaleString('en-US')} parameters on ${data.description}`,
    ...(init !== '' ? { startsFrom: `from the weights of ${init}` } : {}),
    runStep: async () => {
      const r = await trainer.runStep();
      return { loss: r.loss, grad_norm: r.gradNorm, lr: r.learningRate };
    },
    save: async () => {
      await trainer.save(checkpoint, { config: JSON.stringify(config) });
      await task.exportModel(modelDir, trainer.weights('ema'), {
        note: `step ${trainer.step} of ${config.steps}`,
      });
    },
    modelDir,
    release: async () => {
      await trainer.release();
      await latents?.release();
    },
  };
}

async function ganRun(config: TrainConfig, resume: boolean, checkpoint: string): Promise<Run> {
  if (!existsSync(join(config.text_encoder_from, 'text_encoder', 'config.json'))) {
    throw new UserError(
      'missing-text-encoder',
      `the GAN route takes its frozen text encoder from a trained diffusion model; ${config.text_encoder_from} has none (set text_encoder_from)`,
    );
  }
  const textConfig = JSON.parse(
    await readFile(join(config.text_encoder_from, 'text_encoder', 'config.json'), 'utf8'),
  ) as { hidden_size: number };
  const data = await dataSource(config);
  const runtime = runtimeOf(config);
  const latents = await latentSpaceOf(config, runtime);
  const recipe = ganRecipeOf(config, textConfig.hidden_size, latents);
  const options = {
    seed: config.seed,
    schedule: scheduleOf(config),
    runtime,
    ...(latents !== undefined ? { latents } : {}),
  };
  const trainer = resume
    ? await GanTrainer.resume(checkpoint, recipe, data, options)
    : await GanTrainer.create(recipe, data, options);
  const modelDir = join(config.out, 'model');
  return {
    get step() {
      return trainer.step;
    },
    description: `a GAN (generator ${trainer.generator.parameterCount().toLocaleString('en-US')}, discriminator ${trainer.discriminator.parameterCount().toLocaleString('en-US')} parameters) on ${data.description}`,
    runStep: async () => {
      const r = await trainer.runStep();
      return { g_loss: r.generatorLoss, d_loss: r.discriminatorLoss };
    },
    save: async () => {
      await trainer.save(checkpoint, { config: JSON.stringify(config) });
      await trainer.exportModel(modelDir, { note: `step ${trainer.step} of ${config.steps}` });
    },
    modelDir,
    release: async () => {
      await trainer.release();
      await latents?.release();
    },
  };
}

async function autoencoderRun(
  config: TrainConfig,
  resume: boolean,
  checkpoint: string,
): Promise<Run> {
  const data = await dataSource(config);
  const runtime = runtimeOf(config);
  const base = config.autoencoder.finetune_decoder_of;
  const objective = reconstructionObjective(config.autoencoder);
  if (base !== '' && !existsSync(join(base, 'diffusion_pytorch_model.safetensors')))
    throw new UserError(
      'missing-autoencoder',
      `finetune_decoder_of names ${base}, which holds no trained autoencoder (diffusion_pytorch_model.safetensors)`,
    );
  const task =
    base !== ''
      ? await DecoderTask.load(base, config.batch_size, objective, data, runtime)
      : new AutoencoderTask(
          {
            batchSize: config.batch_size,
            vae: config.autoencoder.vae,
            klWeight: config.autoencoder.kl_weight,
            ...objective,
          },
          data,
        );
  const options = { seed: config.seed, schedule: scheduleOf(config), runtime };
  const trainer = await startTrainer(task, options, resume, checkpoint);
  const modelDir = join(config.out, 'model');
  return {
    get step() {
      return trainer.step;
    },
    description:
      task instanceof DecoderTask
        ? `the decoder of ${base} (${task.trainedParameters.toLocaleString('en-US')} parameters; encoder frozen) on ${data.description}`
        : `an autoencoder of ${task.model.parameterCount().toLocaleString('en-US')} parameters on ${data.description}`,
    ...(task instanceof DecoderTask ? { startsFrom: 'from its trained weights' } : {}),
    runStep: async () => ({ loss: (await trainer.runStep()).loss }),
    save: async () => {
      await trainer.save(checkpoint, { config: JSON.stringify(config) });
      await task.exportModel(modelDir, trainer.weights('ema'), runtime);
    },
    // Not a text-to-image model: no sample grids.
    modelDir: undefined,
    release: async () => {
      await trainer.release();
      if (task instanceof DecoderTask) await task.release();
    },
  };
}

async function featuresRun(config: TrainConfig, resume: boolean, checkpoint: string): Promise<Run> {
  const task = new FeatureTask(config.batch_size);
  const options = {
    seed: config.seed,
    schedule: scheduleOf(config),
    runtime: runtimeOf(config),
  };
  const trainer = await startTrainer(task, options, resume, checkpoint);
  return {
    get step() {
      return trainer.step;
    },
    description: 'the shapes feature network',
    runStep: async () => ({ loss: (await trainer.runStep()).loss }),
    save: async () => {
      await trainer.save(checkpoint, { config: JSON.stringify(config) });
      await task.export(config.out, trainer.weights('ema'));
    },
    modelDir: undefined,
    release: () => trainer.release(),
  };
}

/**
 * Ctrl-C during training: the first interrupt stops the run after its step (and saves), a second
 * quits without saving. One interrupt can arrive twice, sent to every gesso process at once
 * (pkill -f, a process group) and passed on by the process that started this one
 * (tuned-malloc.ts), so a repeat within half a second is the same interrupt. Interrupts reach
 * this handler only between steps (ONNX Runtime holds the thread during one), so a second Ctrl-C
 * quits once the 'stopping' message has shown.
 */
export function interruptHandler(
  stop: () => void,
  quit: () => void,
  now: () => number = Date.now,
): () => void {
  let first: number | undefined;
  return () => {
    if (first === undefined) {
      first = now();
      stop();
    } else if (now() - first >= 500) quit();
  };
}

export async function trainCommand(args: readonly string[]): Promise<number> {
  const { values } = parseArgs({
    args: [...args],
    options: {
      config: { type: 'string' },
      route: { type: 'string' },
      out: { type: 'string' },
      steps: { type: 'string' },
      'batch-size': { type: 'string' },
      'learning-rate': { type: 'string' },
      'final-learning-rate': { type: 'string' },
      'warmup-steps': { type: 'string' },
      'init-from': { type: 'string' },
      seed: { type: 'string' },
      data: { type: 'string' },
      'save-every': { type: 'string' },
      'sample-every': { type: 'string' },
      threads: { type: 'string' },
      resume: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${TRAIN_USAGE}\n`);
    return 0;
  }
  const flags = fromFlags(values);
  let config: TrainConfig;
  if (values.resume) {
    const runDir =
      (flags.out as string | undefined) ??
      (values.config !== undefined
        ? resolveTrainConfig(await readTrainConfigFile(values.config)).out
        : undefined);
    if (runDir === undefined)
      throw new UserError(
        'usage',
        '--resume needs the run folder (--out DIR or the config that names it)',
      );
    const saved = join(runDir, 'config.json');
    if (!existsSync(join(runDir, 'checkpoint', 'state.safetensors')) || !existsSync(saved)) {
      throw new UserError(
        'no-checkpoint',
        `${runDir} has no checkpoint to resume; start the run without --resume`,
      );
    }
    const { steps, threads } = flags;
    // The folder named here, not the one saved: a run folder may have been moved or renamed.
    config = resolveTrainConfig(
      JSON.parse(await readFile(saved, 'utf8')) as Record<string, unknown>,
      { steps, threads, out: runDir },
    );
  } else {
    const file = values.config === undefined ? {} : await readTrainConfigFile(values.config);
    config = resolveTrainConfig(file, flags);
    if (existsSync(join(config.out, 'checkpoint', 'state.safetensors'))) {
      throw new UserError(
        'run-exists',
        `${config.out} already holds a run; continue it with --resume or choose another --out`,
      );
    }
  }
  const tuned = tunedMallocEnvironment();
  if (tuned !== undefined) return await runAgainWith(tuned);

  const checkpoint = join(config.out, 'checkpoint', 'state.safetensors');
  const make = {
    diffusion: diffusionRun,
    gan: ganRun,
    features: featuresRun,
    autoencoder: autoencoderRun,
  }[config.route];
  const run = await make(config, values.resume === true, checkpoint);
  await mkdir(join(config.out, 'samples'), { recursive: true });
  await writeFileAtomically(
    join(config.out, 'config.json'),
    `${JSON.stringify(config, null, 2)}\n`,
  );
  process.stderr.write(
    `training ${run.description}, ${values.resume ? `resuming at step ${run.step}` : (run.startsFrom ?? 'from scratch')} → ${config.out}\n`,
  );

  let stopping = false;
  const onSigint = interruptHandler(
    () => {
      stopping = true;
      process.stderr.write('\nstopping after this step (Ctrl-C again to quit without saving)...\n');
    },
    () => process.exit(130),
  );
  process.on('SIGINT', onSigint);
  const started = Date.now();
  const firstStep = run.step;
  const tty = process.stderr.isTTY;
  try {
    while (run.step < config.steps && !stopping) {
      const losses = await run.runStep();
      const step = run.step;
      const elapsed = (Date.now() - started) / 1000;
      const rate = (step - firstStep) / elapsed;
      const shown = Object.entries(losses)
        .filter(([k]) => k.endsWith('loss'))
        .map(([k, v]) => `${k} ${v.toFixed(4)}`)
        .join('  ');
      const line = `step ${step}/${config.steps}  ${shown}  ${rate.toFixed(2)} steps/s  ${formatDuration((config.steps - step) / rate)} left`;
      if (tty) process.stderr.write(`\r${line}   `);
      else if (step % 50 === 0 || step === config.steps) process.stderr.write(`${line}\n`);
      await appendFile(
        join(config.out, 'log.jsonl'),
        `${JSON.stringify({ step, ...losses, seconds: elapsed })}\n`,
      );
      const sample =
        config.sample_every > 0 &&
        run.modelDir !== undefined &&
        (step % config.sample_every === 0 || step === config.steps);
      if (step % config.save_every === 0 || step === config.steps || sample) await run.save();
      if (sample)
        await writeSampleGrid(
          join(config.out, 'samples', `step-${String(step).padStart(6, '0')}.png`),
          run.modelDir!,
          config,
        );
    }
    if (tty) process.stderr.write('\n');
    if (stopping) {
      await run.save();
      process.stderr.write(
        `saved at step ${run.step}; continue with: gesso train --resume --out ${config.out}\n`,
      );
      return 130;
    }
    process.stdout.write(`${run.modelDir ?? config.out}: trained ${config.steps} steps\n`);
    return 0;
  } finally {
    process.off('SIGINT', onSigint);
    await run.release();
  }
}
