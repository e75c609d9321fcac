import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';

/**
 * One generation in a fresh process, reporting its peak resident memory as JSON:
 *   node dist/bench/memory-probe.js MODEL_DIR SIZE STEPS [low-memory] [fp16]
 * The full-size suite runs it in child processes so each figure is one pipeline's alone.
 */
const [dir, size, steps, ...flags] = process.argv.slice(2);
if (dir === undefined || size === undefined || steps === undefined)
  throw new Error('usage: memory-probe MODEL_DIR SIZE STEPS [low-memory] [fp16]');
const pipe = await StableDiffusionPipeline.fromPretrained(dir, {
  lowMemory: flags.includes('low-memory'),
  ...(flags.includes('fp16') ? { variant: 'fp16' } : {}),
});
await pipe.generate({
  prompt: 'a red circle',
  steps: Number(steps),
  guidance: 7.5,
  seed: 1,
  width: Number(size),
  height: Number(size),
});
await pipe.release();
process.stdout.write(`${JSON.stringify({ maxRssBytes: process.resourceUsage().maxRSS * 1024 })}\n`);
