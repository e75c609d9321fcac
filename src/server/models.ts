import { existsSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import { resolveModel } from '../generation/models.js';
import { isUserError } from '../errors.js';
import { loadPipeline, StableDiffusionPipeline, type TextToImage } from '../pipelines/index.js';
import type { LoraFolder } from '../generation/networks.js';
import type { LoraSpec } from '../loaders/lora.js';
import type { RuntimeOptions } from '../runtime/session.js';

/** The server's one loaded model: loaded on first use, switched on request. */
export class ModelManager {
  private loaded: Promise<TextToImage> | undefined;
  /** The LoRAs merged into the loaded model (the prompt's `<lora:…>` tags that asked for them). */
  private loadedLoras: readonly LoraSpec[] = [];
  private resolvedPath = '';

  /**
   * `tinyVae`: a tiny autoencoder (folder or Hub id) for step previews, attached to every
   * diffusion model it fits; previews of the others use their own VAE. `loras`: the folder
   * prompts' `<lora:NAME:WEIGHT>` tags are looked up in.
   */
  constructor(
    private current: string,
    private readonly runtime: RuntimeOptions = {},
    private readonly tinyVae?: string,
    readonly loras?: LoraFolder,
  ) {}

  private async load(path: string, loras: readonly LoraSpec[] = []): Promise<TextToImage> {
    const pipe = await loadPipeline(path, {
      ...this.runtime,
      ...(loras.length > 0 ? { loras } : {}),
    });
    if (this.tinyVae !== undefined && pipe instanceof StableDiffusionPipeline) {
      try {
        await pipe.loadTinyVae(await resolveModel(this.tinyVae));
      } catch (error) {
        if (!isUserError(error)) throw error;
        process.stderr.write(`gesso serve: previews use the VAE: ${error.message}\n`);
      }
    }
    return pipe;
  }

  /** The model's name as users gave it (bundled name, configured name, Hub id or folder). */
  get name(): string {
    return this.current;
  }

  get path(): string {
    return this.resolvedPath;
  }

  /** The name written into images' metadata: as given, or a folder's own name. */
  get displayName(): string {
    return existsSync(this.current)
      ? basename(resolve(this.current)).replace(/\.safetensors$/i, '')
      : this.current;
  }

  /**
   * The model with these LoRAs merged in, loaded again when they differ from the loaded model's
   * (as A1111 swaps networks between jobs). Only the job queue, which runs one job at a time,
   * asks for LoRAs.
   */
  async pipeline(loras: readonly LoraSpec[] = this.loadedLoras): Promise<TextToImage> {
    if (this.loaded !== undefined && JSON.stringify(loras) !== JSON.stringify(this.loadedLoras)) {
      const previous = this.loaded;
      this.loaded = undefined;
      // Released first: two copies of a model may not fit.
      await (await previous.catch(() => undefined))?.release();
    }
    this.loaded ??= (async () => {
      this.resolvedPath = await resolveModel(this.current);
      return this.load(this.resolvedPath, loras);
    })();
    this.loadedLoras = loras;
    const attempt = this.loaded;
    // A failed load is not remembered: the next request tries again.
    attempt.catch(() => {
      if (this.loaded !== attempt) return;
      this.loaded = undefined;
      this.loadedLoras = [];
    });
    return attempt;
  }

  /** Switches to another model (loading it now, so a bad name fails here). */
  async use(name: string): Promise<void> {
    if (name === this.current && this.loaded !== undefined) return;
    const path = await resolveModel(name);
    const next = await this.load(path);
    const previous = this.loaded;
    this.loaded = Promise.resolve(next);
    this.loadedLoras = [];
    this.current = name;
    this.resolvedPath = path;
    if (previous !== undefined) await (await previous.catch(() => undefined))?.release();
  }

  async release(): Promise<void> {
    const pipe = await this.loaded?.catch(() => undefined);
    this.loaded = undefined;
    await pipe?.release();
  }
}
