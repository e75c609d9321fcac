import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { evaluate, formatReport } from '../eval/evaluate.js';
import { parseNumber } from './args.js';
import { bundledModelPath, resolveModel } from '../generation/models.js';

export const EVAL_USAGE = `usage: gesso eval [--model DIR] [options]

Measures a model on the shapes world: prompt fidelity per category (a pixel detector checks colour,
shape, size, position, count and relations), diversity, realism (a Fréchet distance in the feature
space of gesso's shapes network), speed and peak memory, and a binding diagnosis of the two-object
prompts (images with each named colour on the other's shape; for relations, on which side the
first-named colour's object lands). For a latent model, also its autoencoder's ceiling: real images
of the same prompts scored after a round trip through its VAE. Given an autoencoder's folder
instead (a vae/ folder, or what gesso train --route autoencoder writes), scores the real images of
the prompts after its round trip: the most a latent model trained on it could reach. Prints a
table; with --out, writes report.json and a contact sheet per category.

  --model DIR|NAME        a model folder, bundled name, Hub id or autoencoder folder
                          (default: shapes-diffusion)
  --prompts N             prompts per category (default 16)
  --images N              images per prompt, different seeds (default 4)
  --seed N                seeds the prompt set and the generation (default 1)
  --steps N, --guidance G, --scheduler NAME   sampling settings (default: the model's)
  --strength S            start from real images of the prompts noised to this fraction of the
                          schedule (image-to-image, 0 to 1) rather than from noise: how much of
                          a true scene a diffusion model keeps from that noise level down
  --features DIR          the feature network (default: models/shapes-features)
  --threads N             compute threads
  --out DIR               where to write report.json and contact sheets`;

export async function evalCommand(args: readonly string[]): Promise<number> {
  const { values } = parseArgs({
    args: [...args],
    options: {
      model: { type: 'string' },
      prompts: { type: 'string' },
      images: { type: 'string' },
      seed: { type: 'string' },
      steps: { type: 'string' },
      guidance: { type: 'string' },
      scheduler: { type: 'string' },
      strength: { type: 'string' },
      features: { type: 'string' },
      threads: { type: 'string' },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${EVAL_USAGE}\n`);
    return 0;
  }
  const model = await resolveModel(values.model);
  const steps = parseNumber('steps', values.steps, { integer: true, min: 1 });
  const guidance = parseNumber('guidance', values.guidance, { min: 0 });
  const threads = parseNumber('threads', values.threads, { integer: true, min: 1 });
  const strength = parseNumber('strength', values.strength, { min: 0, max: 1 });
  const report = await evaluate({
    model,
    features:
      values.features ?? bundledModelPath('shapes-features') ?? join('models', 'shapes-features'),
    seed: parseNumber('seed', values.seed, { integer: true, min: 0 }) ?? 1,
    promptsPerCategory: parseNumber('prompts', values.prompts, { integer: true, min: 1 }) ?? 16,
    imagesPerPrompt: parseNumber('images', values.images, { integer: true, min: 1 }) ?? 4,
    ...(steps !== undefined ? { steps } : {}),
    ...(guidance !== undefined ? { guidance } : {}),
    ...(values.scheduler !== undefined ? { scheduler: values.scheduler } : {}),
    ...(strength !== undefined ? { strength } : {}),
    ...(values.out !== undefined ? { out: values.out } : {}),
    ...(threads !== undefined ? { runtime: { threads } } : {}),
    onProgress: (done, total) => {
      if (process.stderr.isTTY) process.stderr.write(`\rgenerating ${done}/${total}`);
    },
  });
  if (process.stderr.isTTY) process.stderr.write('\n');
  process.stdout.write(`${formatReport(report)}\n`);
  return 0;
}
