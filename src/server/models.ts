import { existsSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import { resolveModel } from '../generation/models.js';
import { loadPipeline, type TextToImage } from '../pipelines/index.js';
import type { RuntimeOptions } from '../runtime/session.js';

/** The server's one loaded model: loaded on first use, switched on request. */
export class ModelManager {
  private loaded: Promise<TextToImage> | undefined;
  private resolvedPath = '';

  constructor(
    private current: string,
    private readonly runtime: RuntimeOptions = {},
  ) {}

  /** The model's name as users gave it (bundled name, configured name, Hub id or folder). */
  get name(): string {
    return this.current;
  }

  get path(): string {
    return this.resolvedPath;
  }

  /** The name written into images' metadata: as given, or a folder's own name. */
  get displayName(): string {
    return existsSync(this.current) ? basename(resolve(this.current)) : this.current;
  }

  pipeline(): Promise<TextToImage> {
    this.loaded ??= (async () => {
      this.resolvedPath = await resolveModel(this.current);
      return loadPipeline(this.resolvedPath, this.runtime);
    })();
    const attempt = this.loaded;
    // A failed load is not remembered: the next request tries again.
    attempt.catch(() => {
      if (this.loaded === attempt) this.loaded = undefined;
    });
    return attempt;
  }

  /** Switches to another model (loading it now, so a bad name fails here). */
  async use(name: string): Promise<void> {
    if (name === this.current && this.loaded !== undefined) return;
    const path = await resolveModel(name);
    const next = await loadPipeline(path, this.runtime);
    const previous = this.loaded;
    this.loaded = Promise.resolve(next);
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
