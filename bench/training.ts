import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
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

/** Debian's python3-torch lives with the system Python, not a pyenv one. */
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const SCRIPT = join(import.meta.dirname, '..', '..', 'bench', 'torch_diffusion_step.py');

/**
 * Training steps per second of the default shapes diffusion recipe (batch 32: forward, loss,
 * backward, clipping, AdamW, EMA), gesso on ONNX Runtime beside PyTorch on CPU running the same
 * architecture (bench/torch_diffusion_step.py), which first proves it is the same architecture by
 * loading gesso's weights strictly and matching its outputs.
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
    for (let i = 0; i < 3; i++) await trainer.runStep(); // warm-up
    const times: number[] = [];
    const dataTimes: number[] = [];
    for (let i = 0; i < steps; i++) {
      const start = process.hrtime.bigint();
      await trainer.runStep();
      times.push(Number(process.hrtime.bigint() - start) / 1e9);
    }
    // The host's share of a step: sampling the shapes world, tokenizing, noising.
    const random = new DataRandom(5);
    const noise = new TorchGenerator(5);
    for (let i = 0; i < steps; i++) {
      const start = process.hrtime.bigint();
      await task.batch(i, random, noise);
      dataTimes.push(Number(process.hrtime.bigint() - start) / 1e9);
    }
    const batch = DEFAULT_DIFFUSION_RECIPE.batchSize;
    results.push(
      measurement(
        `gesso training step, shapes diffusion (${task.model.parameterCount().toLocaleString('en-US')} params, batch ${batch})`,
        's',
        times,
        (m) => `${(1 / m).toFixed(2)} steps/s, ${(batch / m).toFixed(1)} images/s`,
      ),
      measurement('  of which host data (render, tokenize, noise)', 's', dataTimes),
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
