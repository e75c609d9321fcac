import { basename, extname, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { UserError } from '../errors.js';
import { readImage, toUint8, writePng } from '../io/image.js';
import { formatInfotext, pythonFloat } from '../io/infotext.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { loadPipeline } from '../pipelines/index.js';
import { StableDiffusionPipeline } from '../pipelines/stable-diffusion.js';
import { displayName, SCHEDULER_NAMES } from '../schedulers/index.js';
import type { ExecutionProvider } from '../runtime/session.js';
import { parseNumber } from './args.js';

export const GENERATE_USAGE = `usage: gesso generate --model DIR [PROMPT] [options]

  --model DIR             a diffusers model folder
  --prompt TEXT           what to draw (or give it as the argument)
  --negative-prompt TEXT  what to steer away from
  --steps N               denoising steps (default 50)
  --guidance G            classifier-free guidance scale (default 7.5)
  --scheduler NAME        ${SCHEDULER_NAMES.join(', ')}
  --timestep-spacing S    override the scheduler's spacing: leading, trailing or linspace
  --seed N                random seed (default: random, reported)
  --width W, --height H   image size in pixels, multiples of 8 (default: the model's)
  --init-image FILE       start from this image (image-to-image)
  --strength S            how much of the schedule to run from the image (default 0.8)
  --latents FILE          starting noise: a .safetensors file with a tensor named 'latents'
  --clip-skip N           use the text encoder's output N layers before the last
  --variant fp16          load the fp16 weight files
  --threads N             compute threads (default: one per core)
  --provider NAME         cpu (default), cuda, coreml, dml
  --out FILE              output: FILE.png, or FILE.safetensors for the raw tensors
                          'image' (NHWC float in [0, 1]) and 'latents'`;

export async function generateCommand(args: readonly string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: [...args],
    options: {
      model: { type: 'string' },
      prompt: { type: 'string' },
      'negative-prompt': { type: 'string', default: '' },
      steps: { type: 'string' },
      guidance: { type: 'string' },
      scheduler: { type: 'string' },
      'timestep-spacing': { type: 'string' },
      seed: { type: 'string' },
      width: { type: 'string' },
      height: { type: 'string' },
      'init-image': { type: 'string' },
      strength: { type: 'string' },
      latents: { type: 'string' },
      'clip-skip': { type: 'string' },
      variant: { type: 'string' },
      threads: { type: 'string' },
      provider: { type: 'string' },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    allowPositionals: true,
  });
  if (values.help) {
    process.stdout.write(`${GENERATE_USAGE}\n`);
    return 0;
  }
  const prompt = values.prompt ?? positionals.join(' ');
  if (values.prompt !== undefined && positionals.length > 0) {
    throw new UserError('usage', 'give the prompt either as --prompt or as the argument, not both');
  }
  if (prompt.trim() === '') throw new UserError('usage', `no prompt given\n${GENERATE_USAGE}`);
  if (values.model === undefined)
    throw new UserError('usage', `--model DIR is required\n${GENERATE_USAGE}`);
  const out = values.out ?? 'gesso.png';
  const format = extname(out).toLowerCase();
  if (format !== '.png' && format !== '.safetensors') {
    throw new UserError('usage', `--out must end in .png or .safetensors (got '${out}')`);
  }
  const spacing = values['timestep-spacing'];
  if (spacing !== undefined && !['leading', 'trailing', 'linspace'].includes(spacing)) {
    throw new UserError(
      'usage',
      `--timestep-spacing must be leading, trailing or linspace (got '${spacing}')`,
    );
  }
  const provider = values.provider as ExecutionProvider | undefined;
  if (provider !== undefined && !['cpu', 'cuda', 'coreml', 'dml', 'webgpu'].includes(provider)) {
    throw new UserError(
      'usage',
      `--provider must be cpu, cuda, coreml, dml or webgpu (got '${provider}')`,
    );
  }
  const steps = parseNumber('steps', values.steps, { integer: true, min: 1, max: 1000 }) ?? 50;
  const guidance = parseNumber('guidance', values.guidance, { min: 0 }) ?? 7.5;
  const seed =
    parseNumber('seed', values.seed, { integer: true, min: 0, max: 2 ** 53 - 1 }) ??
    Math.floor(Math.random() * 2 ** 32);
  const width = parseNumber('width', values.width, { integer: true, min: 8 });
  const height = parseNumber('height', values.height, { integer: true, min: 8 });
  const strength = parseNumber('strength', values.strength, { min: 0, max: 1 });
  const clipSkip = parseNumber('clip-skip', values['clip-skip'], { integer: true, min: 0 });
  const threads = parseNumber('threads', values.threads, { integer: true, min: 1 });

  const pipe = await loadPipeline(values.model, {
    ...(values.variant !== undefined ? { variant: values.variant } : {}),
    ...(threads !== undefined ? { threads } : {}),
    ...(provider !== undefined ? { executionProvider: provider } : {}),
  });
  try {
    const image =
      values['init-image'] === undefined
        ? undefined
        : await readImage(
            values['init-image'],
            width !== undefined && height !== undefined ? { width, height } : undefined,
          );
    let latents;
    if (values.latents !== undefined) {
      latents = await SafetensorsFile.with(values.latents, async (f) => {
        if (!f.has('latents'))
          throw new UserError(
            'bad-latents',
            `${values.latents} has no tensor named 'latents' (it has: ${f.names.join(', ')})`,
          );
        return (await f.read('latents')).toFloat32();
      });
    }
    const controller = new AbortController();
    const onSigint = () => controller.abort();
    process.once('SIGINT', onSigint);
    const started = Date.now();
    const result = await pipe
      .generate({
        prompt,
        negativePrompt: values['negative-prompt'],
        steps,
        guidance,
        seed,
        ...(values.scheduler !== undefined ? { scheduler: values.scheduler } : {}),
        ...(spacing !== undefined ? { schedulerConfig: { timestep_spacing: spacing } } : {}),
        ...(width !== undefined ? { width } : {}),
        ...(height !== undefined ? { height } : {}),
        ...(image !== undefined ? { image } : {}),
        ...(strength !== undefined ? { strength } : {}),
        ...(latents !== undefined ? { latents } : {}),
        ...(clipSkip !== undefined ? { clipSkip } : {}),
        signal: controller.signal,
        onProgress: ({ step, steps: total }) => {
          if (process.stderr.isTTY) process.stderr.write(`\rstep ${step}/${total}`);
        },
      })
      .finally(() => process.off('SIGINT', onSigint));
    if (process.stderr.isTTY) process.stderr.write('\n');
    const [, h, w] = result.images.shape as [number, number, number, number];
    if (format === '.safetensors') {
      await writeSafetensors(out, { image: result.images, latents: result.latents });
    } else {
      const params: [string, string][] =
        pipe instanceof StableDiffusionPipeline
          ? [
              ['Steps', String(steps)],
              [
                'Sampler',
                displayName(values.scheduler ?? String(pipe.schedulerConfig._class_name ?? '')),
              ],
              ['CFG scale', pythonFloat(guidance)],
            ]
          : [['Sampler', 'GAN']];
      params.push(
        ['Seed', String(seed)],
        ['Size', `${w}x${h}`],
        ['Model', basename(resolve(values.model))],
      );
      if (image !== undefined) params.push(['Denoising strength', String(strength ?? 0.8)]);
      if (clipSkip !== undefined && clipSkip > 0) params.push(['Clip skip', String(clipSkip + 1)]);
      params.push(['Version', 'gesso']);
      const parameters = formatInfotext({
        prompt,
        negativePrompt: values['negative-prompt'],
        params,
      });
      await writePng(out, toUint8(result.images), 0, { parameters });
    }
    process.stdout.write(
      `${out}: ${w}×${h}, seed ${seed}, ${((Date.now() - started) / 1000).toFixed(1)} s\n`,
    );
    return 0;
  } finally {
    await pipe.release();
  }
}
