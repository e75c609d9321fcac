import { readConfig } from '../loaders/component.js';
import type { ComponentOptions } from './components.js';
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
  generate(options: GenerateOptions): Promise<GenerateResult>;
  release(): Promise<void>;
}

/** Loads any model folder gesso runs: a diffusion pipeline, or one of gesso's GANs. */
export async function loadPipeline(
  path: string,
  options: PipelineOptions & ComponentOptions = {},
): Promise<TextToImage> {
  const index = await readConfig(path, 'model_index.json');
  if (index._class_name === 'GessoGanPipeline') return GanPipeline.fromPretrained(path, options);
  return StableDiffusionPipeline.fromPretrained(path, options);
}

export { GanPipeline, StableDiffusionPipeline };
