import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeSafetensors } from '../src/io/safetensors.js';
import { TextEncoder, UNet } from '../src/pipelines/components.js';
import { defaultComputeThreads } from '../src/runtime/cpu.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import type { Tensor } from '../src/tensor/tensor.js';
import { DEFAULT_DIFFUSION_RECIPE, DiffusionTask } from '../src/training/diffusion.js';
import { DataRandom, Trainer } from '../src/training/trainer.js';
import { measurement, type Recorder } from './harness.js';

const REPO = join(import.meta.dirname, '..', '..');

/** Debian's python3-torch lives with the system Python, not a pyenv one. */
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const SCRIPT = join(REPO, 'bench', 'torch_diffusion_step.py');

const GESSO = join(REPO, 'dist', 'src', 'cli', 'main.js');

/**
 * Seconds per step of `gesso train` as its log records them: the command as users run it, in its
 * own process with the malloc settings it chooses (src/cli/tuned-malloc.ts) unless `env` sets
 * others.
 */
function commandStepTimes(
  out: string,
  steps: number,
  options: { config?: string; env?: NodeJS.ProcessEnv } = {},
): number[] {
  const warmUp = 3;
  const args = ['train', '--out', out, '--steps', String(steps + warmUp), '--seed', '1'];
  if (options.config !== undefined) args.push('--config', options.config);
  const quiet = ['--save-every', '100000', '--sample-every', '0'];
  execFileSync(process.execPath, [GESSO, ...args, ...quiet], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: options.env ?? process.env,
  });
  const seconds = readFileSync(join(out, 'log.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((line) => (JSON.parse(line) as { seconds: number }).seconds);
  return seconds.slice(warmUp).map((s, i) => s - seconds[warmUp - 1 + i]!);
}

/**
 * The bundled model's recipe (configs/shapes-diffusion.yaml), in the latent space of the bundled
 * model's own autoencoder so it runs on a fresh clone.
 */
async function bundledRecipe(dir: string): Promise<string> {
  const text = await readFile(join(REPO, 'configs', 'shapes-diffusion.yaml'), 'utf8');
  const config = join(dir, 'shapes-diffusion.yaml');
  const vae = join(REPO, 'models', 'shapes-diffusion', 'vae');
  await writeFile(config, text.replace(/^vae_from: .*$/m, `vae_from: ${JSON.stringify(vae)}`));
  return config;
}

/**
 * Training steps per second of the default shapes diffusion recipe (batch 32: forward, loss,
 * backward, clipping, AdamW, EMA), gesso on ONNX Runtime beside PyTorch on CPU running the same
 * architecture (bench/torch_diffusion_step.py), which first proves it is the same architecture by
 * loading gesso's weights strictly and matching its outputs; and the bundled model's latent recipe,
 * with gesso's malloc settings and without.
 */
export async function trainingSuite(runs: number, results: Recorder): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'gesso-bench-train-'));
  try {
    const task = new DiffusionTask(DEFAULT_DIFFUSION_RECIPE);
    const trainer = await Trainer.create(task, {
      seed: 1,
      schedule: {
        steps: 1000,
        learningRate: 1e-3,
        warmupSteps: 0,
        decay: 'constant',
        finalLearningRate: 1e-3,
        emaDecay: 0.999,
      },
    });
    const steps = Math.max(runs, 10);
    // The host's share of a step: sampling the shapes world, tokenizing, noising.
    const random = new DataRandom(5);
    const noise = new TorchGenerator(5);
    const dataTimes: number[] = [];
    for (let i = 0; i < steps; i++) {
      const start = process.hrtime.bigint();
      await task.batch(i, random, noise);
      dataTimes.push(Number(process.hrtime.bigint() - start) / 1e9);
    }
    const batch = DEFAULT_DIFFUSION_RECIPE.batchSize;
    // Throughput is the mean's: one slow step in three barely moves the median.
    const trainingSteps = (name: string, times: number[]) => {
      const mean = times.reduce((a, b) => a + b, 0) / times.length;
      return measurement(name, 's', times, () =>
        [
          `mean ${mean.toFixed(3)} s`,
          `${(1 / mean).toFixed(2)} steps/s`,
          `${(batch / mean).toFixed(1)} images/s`,
        ].join(', '),
      );
    };
    const params = task.model.parameterCount().toLocaleString('en-US');
    results.push(
      trainingSteps(
        `gesso train, default recipe (${params} params, batch ${batch})`,
        commandStepTimes(join(dir, 'default'), steps),
      ),
      measurement('  of which host data (render, tokenize, noise)', 's', dataTimes),
    );
    const bundled = await bundledRecipe(dir);
    results.push(
      trainingSteps(
        'gesso train, configs/shapes-diffusion.yaml (8×8×8 latents)',
        commandStepTimes(join(dir, 'bundled'), steps, { config: bundled }),
      ),
      // A malloc setting of the user's own keeps gesso from choosing: this one changes nothing.
      trainingSteps(
        '  the same with glibc malloc as it starts (GLIBC_TUNABLES=glibc.malloc.perturb=0)',
        commandStepTimes(join(dir, 'untuned'), steps, {
          config: bundled,
          env: { ...process.env, GLIBC_TUNABLES: 'glibc.malloc.perturb=0' },
        }),
      ),
    );

    // The same architecture in PyTorch: check it against gesso's outputs, then time it.
    const model = join(dir, 'model');
    await task.exportModel(model, trainer.weights('params'));
    const b = await task.batch(0, new DataRandom(9), new TorchGenerator(9));
    const text = await TextEncoder.load(join(model, 'text_encoder'), { cacheDir: false });
    const unet = await UNet.load(join(model, 'unet'), { cacheDir: false });
    const ids = b.input_ids as Tensor<'int64'>;
    const { hidden } = await text.encode(ids);
    const prediction = await unet.predict({
      sample: b.noisy as Tensor<'float32'>,
      timestep: b.timestep as Tensor<'float32'>,
      encoderHiddenStates: hidden,
    });
    await Promise.all([text.release(), unet.release(), trainer.release()]);
    const fixture = join(dir, 'fixture.safetensors');
    await writeSafetensors(fixture, {
      input_ids: ids,
      noisy: b.noisy!,
      timestep: b.timestep!,
      hidden,
      prediction,
    });
    let torch:
      | {
          median_seconds_per_step: number;
          min_seconds: number;
          max_seconds: number;
          seconds: number[];
        }
      | undefined;
    try {
      process.stdout.write(
        execFileSync(PYTHON, [SCRIPT, '--check', fixture, model], { encoding: 'utf8' }),
      );
      const out = execFileSync(
        PYTHON,
        [
          SCRIPT,
          '--model',
          model,
          '--batch',
          String(batch),
          '--threads',
          String(defaultComputeThreads()),
          '--steps',
          String(steps),
        ],
        { encoding: 'utf8' },
      );
      torch = JSON.parse(out.trim().split('\n').pop()!) as typeof torch;
    } catch (error) {
      process.stdout.write(
        `PyTorch comparison skipped: ${PYTHON} with torch is needed (apt-get install python3-torch): ${(error as Error).message.split('\n')[0]}\n`,
      );
    }
    if (torch !== undefined) {
      results.push({
        name: `PyTorch training step, same architecture (batch ${batch}, ${defaultComputeThreads()} threads)`,
        unit: 's',
        runs: torch.seconds,
        median: torch.median_seconds_per_step,
        min: torch.min_seconds,
        max: torch.max_seconds,
        note: `${(1 / torch.median_seconds_per_step).toFixed(2)} steps/s`,
      });
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
