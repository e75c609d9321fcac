import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';

/**
 * One generation in a fresh process, as a user's first command runs it:
 *   node dist/bench/memory-probe.js MODEL_DIR SIZE STEPS [low-memory|keep-loaded] [fp16] [threads=N]
 * It prints JSON: the process's peak resident memory, its seconds from start to the image, and
 * whether the pipeline kept only the running model resident (asked for, or on by itself for a large
 * model). The full-size suite runs it in child processes, so each figure is one pipeline's alone.
 */
const [dir, size, steps, ...flags] = process.argv.slice(2);
if (dir === undefined || size === undefined || steps === undefined)
  throw new Error(
    'usage: memory-probe MODEL_DIR SIZE STEPS [low-memory|keep-loaded] [fp16] [threads=N]',
  );
const threads = flags.find((f) => f.startsWith('threads='));
const pipe = await StableDiffusionPipeline.fromPretrained(dir, {
  ...(flags.includes('low-memory') ? { lowMemory: true } : {}),
  ...(flags.includes('keep-loaded') ? { lowMemory: false } : {}),
  ...(flags.includes('fp16') ? { variant: 'fp16' } : {}),
  ...(threads !== undefined ? { threads: Number(threads.slice('threads='.length)) } : {}),
});
await pipe.generate({
  prompt: 'a red circle',
  steps: Number(steps),
  guidance: 7.5,
  seed: 1,
  width: Number(size),
  height: Number(size),
});
const seconds = performance.now() / 1000;
await pipe.release();
process.stdout.write(
  `${JSON.stringify({ maxRssBytes: process.resourceUsage().maxRSS * 1024, seconds, lowMemory: pipe.lowMemory })}\n`,
);
