import { mkdir, stat, readdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { render, seededRandom } from '../data/shapes.js';
import { UserError } from '../errors.js';
import { writeFileAtomically } from '../io/atomic.js';
import { contactSheet, fromModelPixels, toUint8 } from '../io/image.js';
import { encodePng } from '../io/png.js';
import { readConfig } from '../loaders/component.js';
import { summarizeSafetensors } from '../loaders/describe.js';
import { patchify } from '../models/patch-autoencoder.js';
import { Vae } from '../pipelines/components.js';
import { loadPipeline } from '../pipelines/index.js';
import type { RuntimeOptions } from '../runtime/session.js';
import { concat, slice } from '../tensor/ops.js';
import { Tensor } from '../tensor/tensor.js';
import { FEATURE_DIM, FeatureExtractor } from './features.js';
import {
  CATEGORIES,
  fidelityPrompts,
  sceneFor,
  scoreFidelity,
  type BindingDiagnosis,
  type Category,
  type FidelityPrompt,
  type FidelityResult,
} from './fidelity.js';
import { frechetDistance, meanPairwiseDistance } from './statistics.js';

/**
 * `gesso eval`: prompt fidelity per category, diversity, realism and speed of any model folder
 * gesso loads, on the shapes world, with every random choice seeded.
 */

export interface EvalOptions {
  /**
   * A model folder, or an autoencoder's folder (a `config.json` of an AutoencoderKL, as
   * `gesso train --route autoencoder` writes or a model's `vae/`): then the real images of the
   * prompts after its round trip are what is scored, before any diffusion model is trained on it.
   */
  readonly model: string;
  /** Folder of the trained feature network (models/shapes-features). */
  readonly features: string;
  readonly seed: number;
  readonly promptsPerCategory: number;
  readonly imagesPerPrompt: number;
  readonly steps?: number;
  readonly guidance?: number;
  readonly scheduler?: string;
  /**
   * Start each image from the real image of its prompt, noised this far into the schedule
   * (image-to-image), instead of from pure noise: how much of a true scene the model keeps from
   * that noise level down, which separates drawing the details from composing the scene.
   */
  readonly strength?: number;
  readonly batchSize?: number;
  /** Folder for report.json and one contact sheet per category. */
  readonly out?: string;
  readonly runtime?: RuntimeOptions;
  readonly onProgress?: (done: number, total: number) => void;
}

/** Category scores and their means, without the per-image results. */
export interface FidelityScores {
  readonly perCategory: Record<Category, number>;
  readonly overall: number;
  readonly overallSeen: number;
  readonly binding: BindingDiagnosis;
}

function scoresOf(result: FidelityResult): FidelityScores {
  return {
    perCategory: { ...result.perCategory },
    overall: result.overall,
    overallSeen: result.overallSeen,
    binding: result.binding,
  };
}

export interface EvalReport {
  readonly model: string;
  readonly settings: Record<string, unknown>;
  readonly fidelity: FidelityScores;
  /** Mean pairwise feature distance of one prompt's images, generated and real, and their ratio. */
  readonly diversity: { readonly generated: number; readonly real: number; readonly ratio: number };
  readonly realism: {
    readonly frechetDistance: number;
    readonly images: number;
    readonly featureDim: number;
  };
  /**
   * Latent models only (latent diffusion, or a GAN that draws latents): the real images of the
   * same prompts scored after a round trip through the model's own autoencoder (encoder mean,
   * then decoder). No model can draw more than its latent space holds, so this is the most it can
   * score.
   */
  readonly autoencoder?: FidelityScores;
  readonly speed: { readonly imagesPerSecond: number; readonly secondsPerImage: number };
  readonly memory: { readonly peakResidentBytes: number };
  readonly size: { readonly parameters: number; readonly bytes: number };
}

/** NHWC uint8 images → encoder mean → decoder → NHWC uint8, in batches of `batch`. */
async function roundTrip(
  vae: Vae,
  images: Tensor<'uint8'>,
  batch: number,
): Promise<Tensor<'uint8'>> {
  const count = images.shape[0]!;
  const parts: Tensor<'uint8'>[] = [];
  for (let i = 0; i < count; i += batch) {
    const part = slice(images, 0, i, Math.min(i + batch, count));
    const latents = await vae.encodeMeanScaled(patchify(part, 1));
    parts.push(toUint8(fromModelPixels(await vae.decodeScaled(latents))));
  }
  return concat(parts);
}

async function folderBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    total += entry.isDirectory() ? await folderBytes(path) : (await stat(path)).size;
  }
  return total;
}

/** Whether `dir` is an autoencoder's own folder rather than a model's. */
async function isAutoencoderFolder(dir: string): Promise<boolean> {
  if (existsSync(join(dir, 'model_index.json')) || !existsSync(join(dir, 'config.json')))
    return false;
  const kind = (await readConfig(dir))._class_name;
  return kind === 'AutoencoderKL' || kind === 'GessoPatchAutoencoder';
}

/** Draws jobs from..to as NHWC uint8 images: a model's generation, or an autoencoder's round trip. */
type Draw = (from: number, to: number) => Promise<Tensor<'uint8'>>;

export async function evaluate(options: EvalOptions): Promise<EvalReport> {
  const runtime = options.runtime ?? {};
  const autoencoder = (await isAutoencoderFolder(options.model))
    ? await Vae.load(options.model, { ...runtime, cacheDir: false })
    : undefined;
  if (autoencoder !== undefined) {
    const sampling = (['steps', 'guidance', 'scheduler', 'strength'] as const).filter(
      (key) => options[key] !== undefined,
    );
    if (sampling.length > 0) {
      await autoencoder.release();
      throw new UserError(
        'bad-request',
        `${options.model} is an autoencoder, which samples nothing: leave out ${sampling.map((k) => `--${k}`).join(', ')}`,
      );
    }
  }
  const pipe = autoencoder === undefined ? await loadPipeline(options.model, runtime) : undefined;
  const extractor = await FeatureExtractor.load(options.features, runtime);
  try {
    const prompts = fidelityPrompts(options.seed, options.promptsPerCategory);
    const jobs: { prompt: FidelityPrompt; seed: number }[] = [];
    prompts.forEach((prompt, i) => {
      for (let k = 0; k < options.imagesPerPrompt; k++)
        jobs.push({ prompt, seed: options.seed * 100_003 + i * 97 + k });
    });
    // The real images of the same prompts: for realism, diversity, the autoencoder's ceiling, and
    // the starting images of --strength.
    const random = seededRandom(options.seed + 17);
    const real = render(jobs.map((j) => sceneFor(j.prompt.expect, random)));
    const per = real.size / jobs.length;
    const batch = options.batchSize ?? 16;
    const draw: Draw =
      pipe === undefined
        ? (from, to) => roundTrip(autoencoder!, slice(real, 0, from, to), batch)
        : async (from, to) =>
            toUint8(
              (
                await pipe.generate({
                  prompt: jobs.slice(from, to).map((j) => j.prompt.prompt),
                  seed: jobs.slice(from, to).map((j) => j.seed),
                  ...(options.steps !== undefined ? { steps: options.steps } : {}),
                  ...(options.guidance !== undefined ? { guidance: options.guidance } : {}),
                  ...(options.scheduler !== undefined ? { scheduler: options.scheduler } : {}),
                  ...(options.strength !== undefined
                    ? { image: slice(real, 0, from, to), strength: options.strength }
                    : {}),
                })
              ).images,
            );
    // The speed is that of a loaded model: building and optimizing its graphs happen before.
    await draw(0, 1);
    const chunks: Tensor<'uint8'>[] = [];
    const started = Date.now();
    for (let i = 0; i < jobs.length; i += batch) {
      chunks.push(await draw(i, Math.min(i + batch, jobs.length)));
      options.onProgress?.(Math.min(i + batch, jobs.length), jobs.length);
    }
    const seconds = (Date.now() - started) / 1000;
    const generated = concat(chunks);
    const fidelity = scoreFidelity(
      jobs.map((j) => j.prompt),
      generated,
    );

    // Realism: generated images against as many real images of the same prompts.
    const generatedFeatures = await extractor.embed(generated);
    const realFeatures = await extractor.embed(real);
    const frechet = frechetDistance(generatedFeatures, realFeatures);
    const ceiling =
      pipe?.vae !== undefined
        ? scoreFidelity(
            jobs.map((j) => j.prompt),
            await roundTrip(pipe.vae, real, batch),
          )
        : undefined;

    // Diversity: the colour category leaves position, size and background free.
    const groups = new Map<FidelityPrompt, number[]>();
    jobs.forEach((j, i) => {
      if (j.prompt.category !== 'colour') return;
      groups.set(j.prompt, [...(groups.get(j.prompt) ?? []), i]);
    });
    const spread = (features: Float64Array[]) => {
      const values = [...groups.values()].map((idx) =>
        meanPairwiseDistance(idx.map((i) => features[i]!)),
      );
      return values.reduce((a, b) => a + b, 0) / Math.max(1, values.length);
    };
    const diversityGenerated = spread(generatedFeatures);
    const diversityReal = spread(realFeatures);

    let parameters = 0;
    for (const part of autoencoder !== undefined ? ['.'] : ['text_encoder', 'unet', 'generator']) {
      try {
        for (const file of await readdir(join(options.model, part))) {
          if (file.endsWith('.safetensors'))
            parameters +=
              (await summarizeSafetensors(join(options.model, part, file))).parameters ?? 0;
        }
      } catch {
        // a component the model does not have
      }
    }

    const report: EvalReport = {
      model: options.model,
      settings: {
        seed: options.seed,
        promptsPerCategory: options.promptsPerCategory,
        imagesPerPrompt: options.imagesPerPrompt,
        ...(autoencoder !== undefined
          ? { roundTrip: true }
          : {
              steps: options.steps ?? 'model default',
              guidance: options.guidance ?? 'model default',
              scheduler: options.scheduler ?? 'model default',
              ...(options.strength !== undefined ? { strength: options.strength } : {}),
            }),
        images: jobs.length,
      },
      fidelity: scoresOf(fidelity),
      diversity: {
        generated: diversityGenerated,
        real: diversityReal,
        ratio: diversityGenerated / diversityReal,
      },
      realism: { frechetDistance: frechet, images: jobs.length, featureDim: FEATURE_DIM },
      ...(ceiling !== undefined ? { autoencoder: scoresOf(ceiling) } : {}),
      speed: { imagesPerSecond: jobs.length / seconds, secondsPerImage: seconds / jobs.length },
      memory: { peakResidentBytes: process.resourceUsage().maxRSS * 1024 },
      size: { parameters, bytes: await folderBytes(options.model) },
    };

    if (options.out !== undefined) {
      await mkdir(options.out, { recursive: true });
      await writeFileAtomically(
        join(options.out, 'report.json'),
        `${JSON.stringify(report, null, 2)}\n`,
      );
      for (const category of CATEGORIES) {
        const idx = jobs
          .map((j, i) => (j.prompt.category === category ? i : -1))
          .filter((i) => i >= 0);
        const images = new Tensor('uint8', [idx.length, 64, 64, 3]);
        idx.forEach((src, k) =>
          (images.data as Uint8Array).set(
            (generated.data as Uint8Array).subarray(src * per, (src + 1) * per),
            k * per,
          ),
        );
        const columns = options.imagesPerPrompt * Math.min(4, options.promptsPerCategory);
        const text = idx
          .map((i) => `${fidelity.results[i]!.passed ? 'pass' : 'FAIL'}: ${jobs[i]!.prompt.prompt}`)
          .join('\n');
        await writeFileAtomically(
          join(options.out, `${category.replace(/[^a-z]+/g, '-')}.png`),
          encodePng(contactSheet(images, columns), { prompts: text }),
        );
      }
    }
    return report;
  } finally {
    await (pipe ?? autoencoder)!.release();
    await extractor.release();
  }
}

export function formatReport(r: EvalReport): string {
  const lines = [`model: ${r.model}`];
  if (r.settings.roundTrip === true)
    lines.push(
      'an autoencoder: real images of the prompts after its round trip (encoder mean, decoder)',
    );
  if (r.settings.strength !== undefined)
    lines.push(`from real images of the prompts at strength ${String(r.settings.strength)}`);
  for (const c of CATEGORIES)
    lines.push(`  ${c.padEnd(18)} ${r.fidelity.perCategory[c].toFixed(3)}`);
  lines.push(
    `  ${'overall'.padEnd(18)} ${r.fidelity.overall.toFixed(3)}   (seen pairs only: ${r.fidelity.overallSeen.toFixed(3)})`,
  );
  const b = r.fidelity.binding;
  lines.push(
    `binding: each colour on the other's shape in ${b.swapped} of ${b.pairImages} pair images`,
    `  relations: of ${b.relationImages} images with one object of each colour, the first-named in the named relation ${b.relationNamed}, in the mirrored one ${b.relationMirrored}`,
  );
  lines.push(
    `diversity: ${r.diversity.generated.toFixed(3)} generated vs ${r.diversity.real.toFixed(3)} real (ratio ${r.diversity.ratio.toFixed(2)})`,
  );
  lines.push(
    `realism: Fréchet distance ${r.realism.frechetDistance.toFixed(3)} (${r.realism.images} images, ${r.realism.featureDim}-d shapes features)`,
  );
  if (r.autoencoder !== undefined)
    lines.push(
      `autoencoder ceiling: ${r.autoencoder.overall.toFixed(3)} overall (real images of the same prompts through the model's VAE)`,
    );
  lines.push(
    `speed: ${r.speed.imagesPerSecond.toFixed(2)} images/s; peak memory ${(r.memory.peakResidentBytes / 2 ** 20).toFixed(0)} MiB`,
  );
  lines.push(
    `size: ${r.size.parameters.toLocaleString('en-US')} parameters, ${(r.size.bytes / 2 ** 20).toFixed(1)} MiB on disk`,
  );
  return lines.join('\n');
}
