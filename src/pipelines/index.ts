import { statSync } from 'node:fs';
import { UserError } from '../errors.js';
import { readConfig } from '../loaders/component.js';
import type { ComponentOptions, Vae } from './components.js';
import { GanPipeline } from './gan.js';
import {
  StableDiffusionPipeline,
  type GenerateOptions,
  type GenerateResult,
  type GenerationDefaults,
  type PipelineOptions,
} from './stable-diffusion.js';

/** What every surface needs of a model: prompts in, images out. */
export interface TextToImage {
  readonly path: string;
  /** Steps and guidance used when a request names none. */
  readonly defaults: GenerationDefaults;
  /** The autoencoder whose latents the model draws; none for a GAN that draws pixels. */
  readonly vae?: Vae | undefined;
  generate(options: GenerateOptions): Promise<GenerateResult>;
  release(): Promise<void>;
}

/**
 * Loads any model gesso runs: a diffusion pipeline folder or single-file checkpoint, or one of
 * gesso's GANs.
 */
export async function loadPipeline(
  path: string,
  options: PipelineOptions & ComponentOptions = {},
): Promise<TextToImage> {
  if (/\.safetensors$/i.test(path) && statSync(path, { throwIfNoEntry: false })?.isFile() === true)
    return StableDiffusionPipeline.fromSingleFile(path, options);
  const index = await readConfig(path, 'model_index.json');
  if (index._class_name === 'GessoGanPipeline') {
    // A LoRA is a delta for a UNet and CLIP text encoders; a GAN has neither.
    if ((options.loras?.length ?? 0) > 0)
      throw new UserError(
        'usage',
        `${path} is a GAN; LoRAs merge into Stable Diffusion models (a UNet and CLIP text encoders)`,
      );
    return GanPipeline.fromPretrained(path, options);
  }
  return StableDiffusionPipeline.fromPretrained(path, options);
}

export { GanPipeline, StableDiffusionPipeline };
