import { cp, mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { UserError } from '../errors.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import type { Tensor } from '../tensor/tensor.js';
import { folderToSingleFile, singleFileToFolder } from '../loaders/convert-layout.js';
import { formatBytes } from './format.js';

export const CONVERT_USAGE = `usage: gesso convert SOURCE DEST [--dtype fp16|fp32]

  gesso convert MODEL_DIR NEW_DIR --dtype fp16     a copy with every float weight in fp16 (or fp32)
  gesso convert MODEL_DIR MODEL.safetensors        a diffusers folder as one original-format file
  gesso convert MODEL.safetensors NEW_DIR          a single-file checkpoint as a diffusers folder

fp16 halves the size; gesso computes in float32 either way. Layout conversions keep each weight's
precision unless --dtype is given. Single files carry the original CompVis / Stability key names
(SD 1.x, SD 2.x, SDXL); the ones gesso writes also record the folder's configs in the header.`;

async function folderSize(dir: string): Promise<number> {
  const info = await stat(dir);
  if (info.isFile()) return info.size;
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += (await stat(join(entry.parentPath, entry.name))).size;
  }
  return total;
}

export async function convertCommand(args: readonly string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: [...args],
    options: { dtype: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
    allowPositionals: true,
  });
  if (values.help === true) {
    process.stdout.write(`${CONVERT_USAGE}\n`);
    return 0;
  }
  if (positionals.length !== 2) throw new UserError('usage', CONVERT_USAGE);
  const [source, dest] = positionals as [string, string];
  const dtype = { fp16: 'float16', fp32: 'float32' }[values.dtype ?? ''] as
    'float16' | 'float32' | undefined;
  if (values.dtype !== undefined && dtype === undefined)
    throw new UserError('usage', `--dtype must be fp16 or fp32 (got '${values.dtype}')`);
  if (existsSync(dest))
    throw new UserError('usage', `${dest} already exists; choose a new name or remove it`);
  const isFile = (p: string) => /\.safetensors$/i.test(p);
  if (isFile(source) || isFile(dest)) {
    if (isFile(source) && isFile(dest))
      throw new UserError('usage', 'one of SOURCE and DEST must be a model folder');
    if (isFile(source)) {
      if (!existsSync(source)) throw new UserError('model-not-found', `${source} does not exist`);
      await singleFileToFolder(source, dest, dtype);
    } else {
      if (!existsSync(join(source, 'model_index.json')))
        throw new UserError(
          'model-not-found',
          `${source} is not a model folder (no model_index.json)`,
        );
      await folderToSingleFile(source, dest, dtype);
    }
    process.stdout.write(
      `${dest}: ${formatBytes(await folderSize(dest))} (from ${formatBytes(await folderSize(source))})\n`,
    );
    return 0;
  }
  if (dtype === undefined)
    throw new UserError('usage', `copying a folder needs --dtype fp16 or fp32\n${CONVERT_USAGE}`);
  if (!existsSync(join(source, 'model_index.json')) && !existsSync(join(source, 'config.json')))
    throw new UserError(
      'model-not-found',
      `${source} is not a model folder (no model_index.json or config.json)`,
    );
  // Build beside the destination and rename at the end, so a failure leaves no half folder.
  const staging = `${dest}.tmp-${process.pid}`;
  await rm(staging, { recursive: true, force: true });
  await mkdir(staging, { recursive: true });
  try {
    await cp(source, staging, {
      recursive: true,
      filter: (path) =>
        !path.endsWith('.safetensors') && !path.split(/[\\/]/).includes('checkpoint'),
    });
    for (const entry of await readdir(source, { withFileTypes: true, recursive: true })) {
      if (!entry.isFile() || !entry.name.endsWith('.safetensors')) continue;
      const from = join(entry.parentPath, entry.name);
      const relative = from.slice(source.length).replace(/^[\\/]+/, '');
      if (relative.split(/[\\/]/).includes('checkpoint')) continue;
      const tensors: Record<string, Tensor> = {};
      const metadata = await SafetensorsFile.with(from, async (file) => {
        for (const name of file.names) {
          const t = await file.read(name);
          tensors[name] =
            t.dtype === 'float32' || t.dtype === 'float16' || t.dtype === 'bfloat16'
              ? t.to(dtype)
              : t;
        }
        return file.metadata;
      });
      await writeSafetensors(join(staging, relative), tensors, metadata);
    }
    await rename(staging, dest);
  } catch (error) {
    await rm(staging, { recursive: true, force: true });
    throw error;
  }
  process.stdout.write(
    `${dest}: ${formatBytes(await folderSize(dest))} (from ${formatBytes(await folderSize(source))})\n`,
  );
  return 0;
}
