import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join, resolve } from 'node:path';

/** The repository's models/ folder, where the bundled models live. */
export const BUNDLED_DIR = resolve(fileURLToPath(new URL('../../../models', import.meta.url)));

/** The path of a bundled model, if it is installed. */
export function bundledModelPath(name: string): string | undefined {
  const dir = join(BUNDLED_DIR, name);
  return existsSync(join(dir, 'model_index.json')) || existsSync(join(dir, 'config.json'))
    ? dir
    : undefined;
}
