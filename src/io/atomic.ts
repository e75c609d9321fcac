import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, rm, type FileHandle } from 'node:fs/promises';
import { UserError } from '../errors.js';
import { dirname } from 'node:path';

/**
 * Writes `path` all at once or not at all: the content goes to a temporary file beside it, is
 * flushed to disk, and is renamed over `path` only when `write` succeeded. A crash or an error
 * leaves any earlier file at `path` untouched and no partial file under its name.
 */
export async function writeAtomically(
  path: string,
  write: (file: FileHandle) => Promise<void>,
): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const temporary = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const file = await open(temporary, 'wx');
  try {
    await write(file);
    await file.sync();
    await file.close();
    await rename(temporary, path);
  } catch (error) {
    await file.close().catch(() => undefined);
    await rm(temporary, { force: true });
    throw error;
  }
}

export async function writeFileAtomically(path: string, data: Uint8Array | string): Promise<void> {
  await writeAtomically(path, async (file) => {
    await file.writeFile(data);
  });
}

/**
 * Reads a file the user named; a missing or unreadable file is the user's error, worded
 * `cannot read <what><path>: <reason>` (`what` such as "image " or "prompts file ").
 */
export async function readUserFile(path: string, what = ''): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (error) {
    throw new UserError(
      'file-not-found',
      `cannot read ${what}${path}: ${(error as Error).message}`,
    );
  }
}
