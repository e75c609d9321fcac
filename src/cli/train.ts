import { existsSync } from 'node:fs';
import { appendFile, mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { folderSource, shapesSource } from '../data/source.js';
import { UserError } from '../errors.js';
import { writeFileAtomically } from '../io/atomic.js';
import { toUint8 } from '../io/image.js';
import { encodePng } from '../io/png.js';
import { StableDiffusionPipeline } from '../pipelines/stable-diffusion.js';
import {
  describeFields,
  readTrainConfigFile,
  resolveTrainConfig,
  type TrainConfig,
} from '../training/config.js';
import { DiffusionTask, type DiffusionRecipe } from '../training/diffusion.js';
import { Trainer } from '../training/trainer.js';
import { parseNumber } from './args.js';

export const TRAIN_USAGE = `usage: gesso train [--config FILE.json|FILE.yaml] [options]

Trains a text-to-image model from scratch (on the shapes world unless --data names a folder).
A run folder holds checkpoint/ (resume state), model/ (the model, for gesso generate --model),
samples/ (grids) and log.jsonl. Ctrl-C saves before stopping; --resume continues bit for bit.

options (each overrides the config file's field of the same name):
  --config FILE        a JSON or YAML file of the fields below
  --out DIR            run folder
  --steps N            optimizer steps in all
  --batch-size N       images per step
  --learning-rate X    peak learning rate
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
    ['seed', 'seed', true],
    ['save-every', 'save_every', true],
    ['sample-every', 'sample_every', true],
    ['threads', 'threads', true],
  ];
  for (const [flag, key, integer] of numbers) {
    const v = parseNumber(flag, values[flag] as string | undefined, { integer, min: 0 });
    if (v !== undefined) out[key] = v;
  }
  if (typeof values.out === 'string') out.out = values.out;
  if (typeof values.data === 'string') out.data = values.data;
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
  };
}

function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = Math.floor(seconds % 60);
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : `${m}m${String(s).padStart(2, '0')}s`;
}

async function writeSampleGrid(path: string, modelDir: string, config: TrainConfig): Promise<void> {
  const pipe = await StableDiffusionPipeline.fromPretrained(modelDir, {
    cacheDir: false,
    ...(config.threads ? { threads: config.threads } : {}),
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
    const [n, h, w] = pixels.shape as [number, number, number];
    const columns = Math.min(n, 4);
    const rows = Math.ceil(n / columns);
    const sheet = new Uint8Array(rows * h * columns * w * 3).fill(255);
    for (let k = 0; k < n; k++) {
      const gx = k % columns;
      const gy = Math.floor(k / columns);
      for (let y = 0; y < h; y++) {
        const src = (pixels.data as Uint8Array).subarray(
          (k * h + y) * w * 3,
          ((k * h + y) * w + w) * 3,
        );
        sheet.set(src, ((gy * h + y) * columns * w + gx * w) * 3);
      }
    }
    await writeFileAtomically(
      path,
      encodePng(
        { width: columns * w, height: rows * h, channels: 3, data: sheet },
        { prompts: prompts.join('\n') },
      ),
    );
  } finally {
    await pipe.release();
  }
}

export async function trainCommand(args: readonly string[]): Promise<number> {
  const { values } = parseArgs({
    args: [...args],
    options: {
      config: { type: 'string' },
      out: { type: 'string' },
      steps: { type: 'string' },
      'batch-size': { type: 'string' },
      'learning-rate': { type: 'string' },
      seed: { type: 'string' },
      data: { type: 'string' },
      'save-every': { type: 'string' },
      'sample-every': { type: 'string' },
      threads: { type: 'string' },
      route: { type: 'string' },
      resume: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${TRAIN_USAGE}\n`);
    return 0;
  }
  if (values.route !== undefined && values.route !== 'diffusion') {
    throw new UserError(
      'usage',
      `--route ${values.route} is not available yet; the diffusion route is`,
    );
  }
  const flags = fromFlags(values);
  let config: TrainConfig;
  const out0 = (flags.out as string | undefined) ?? undefined;
  if (values.resume) {
    const runDir =
      out0 ??
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
    config = resolveTrainConfig(
      JSON.parse(await readFile(saved, 'utf8')) as Record<string, unknown>,
      { steps, threads },
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

  const data = config.data === 'shapes' ? shapesSource() : await folderSource(config.data, 64);
  const task = new DiffusionTask(recipeOf(config), data);
  const trainerOptions = {
    seed: config.seed,
    schedule: {
      steps: config.steps,
      learningRate: config.learning_rate,
      warmupSteps: config.warmup_steps,
      decay: config.decay,
      finalLearningRate: config.final_learning_rate,
      emaDecay: config.ema_decay,
    },
    adam: {
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weightDecay: config.weight_decay,
      maxGradNorm: config.max_grad_norm,
      ema: true,
    },
    runtime: config.threads !== null ? { threads: config.threads } : {},
  };
  const checkpoint = join(config.out, 'checkpoint', 'state.safetensors');
  const trainer = values.resume
    ? await Trainer.resume(checkpoint, task, trainerOptions)
    : await Trainer.create(task, trainerOptions);
  await mkdir(join(config.out, 'samples'), { recursive: true });
  await writeFileAtomically(
    join(config.out, 'config.json'),
    `${JSON.stringify(config, null, 2)}\n`,
  );
  process.stderr.write(
    `training ${task.model.parameterCount().toLocaleString('en-US')} parameters on ${data.description}, ` +
      `${values.resume ? `resuming at step ${trainer.step}` : 'from scratch'} → ${config.out}\n`,
  );

  const save = async () => {
    await trainer.save(checkpoint, { config: JSON.stringify(config) });
    await task.exportModel(join(config.out, 'model'), trainer.weights('ema'), {
      note: `step ${trainer.step} of ${config.steps}`,
    });
  };
  let stopping = false;
  const onSigint = () => {
    if (stopping) process.exit(130);
    stopping = true;
    process.stderr.write('\nstopping after this step (Ctrl-C again to quit without saving)...\n');
  };
  process.on('SIGINT', onSigint);
  const started = Date.now();
  const firstStep = trainer.step;
  const tty = process.stderr.isTTY;
  try {
    while (trainer.step < config.steps && !stopping) {
      const r = await trainer.runStep();
      const elapsed = (Date.now() - started) / 1000;
      const rate = (r.step - firstStep) / elapsed;
      const line = `step ${r.step}/${config.steps}  loss ${r.loss.toFixed(4)}  ${rate.toFixed(2)} steps/s  ${formatDuration((config.steps - r.step) / rate)} left`;
      if (tty) process.stderr.write(`\r${line}   `);
      else if (r.step % 50 === 0 || r.step === config.steps) process.stderr.write(`${line}\n`);
      await appendFile(
        join(config.out, 'log.jsonl'),
        `${JSON.stringify({ step: r.step, loss: r.loss, grad_norm: r.gradNorm, lr: r.learningRate, seconds: elapsed })}\n`,
      );
      if (r.step % config.save_every === 0 || r.step === config.steps) await save();
      if (
        config.sample_every > 0 &&
        (r.step % config.sample_every === 0 || r.step === config.steps)
      ) {
        if (r.step % config.save_every !== 0 && r.step !== config.steps) await save();
        await writeSampleGrid(
          join(config.out, 'samples', `step-${String(r.step).padStart(6, '0')}.png`),
          join(config.out, 'model'),
          config,
        );
      }
    }
    if (tty) process.stderr.write('\n');
    if (stopping) {
      await save();
      process.stderr.write(
        `saved at step ${trainer.step}; continue with: gesso train --resume --out ${config.out}\n`,
      );
      return 130;
    }
    process.stdout.write(`${join(config.out, 'model')}: trained ${config.steps} steps\n`);
    return 0;
  } finally {
    process.off('SIGINT', onSigint);
    await trainer.release();
  }
}
