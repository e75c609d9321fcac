import { spawn } from 'node:child_process';
import { constants } from 'node:os';

/**
 * A training step hands ONNX Runtime the whole optimizer state (parameters, Adam's two moments,
 * the EMA) and gets a new copy back in fresh buffers, four times the parameter count in floats.
 * glibc's default malloc lets its mmap threshold follow the largest block freed and trims the
 * heap's free top, so those buffers go back to the kernel every few steps and fault in again
 * page by page: on the bundled diffusion recipe (5 M parameters) such a step took 20 000 page
 * faults and 540 ms instead of 280 (BENCHMARKS.md). Fixed thresholds keep the freed buffers in
 * the heap for the next step. glibc reads them only when a process starts, so `gesso train` runs
 * itself again with them set.
 */
const MALLOC_TUNABLES = [
  'glibc.malloc.mmap_threshold=1073741824',
  'glibc.malloc.trim_threshold=4294967296',
];

function hasGlibc(): boolean {
  if (process.platform !== 'linux') return false;
  const report = process.report.getReport() as { header?: { glibcVersionRuntime?: string } };
  return report.header?.glibcVersionRuntime !== undefined;
}

/**
 * The environment to run again with, or undefined when this process already has it (or its
 * user chose malloc settings of their own, or the C library is not glibc).
 */
export function tunedMallocEnvironment(
  env: NodeJS.ProcessEnv = process.env,
): NodeJS.ProcessEnv | undefined {
  if (env.GLIBC_TUNABLES?.includes('glibc.malloc.') === true || !hasGlibc()) return undefined;
  const tunables = [env.GLIBC_TUNABLES, ...MALLOC_TUNABLES].filter(
    (t) => t !== undefined && t !== '',
  );
  return { ...env, GLIBC_TUNABLES: tunables.join(':') };
}

/**
 * Runs this command again in a child process with `env` and resolves to its exit code. The child
 * has a process group of its own, so a Ctrl-C reaches it once, through this process; SIGINT,
 * SIGTERM and SIGHUP sent here are passed on.
 */
export async function runAgainWith(env: NodeJS.ProcessEnv): Promise<number> {
  const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
    env,
    stdio: 'inherit',
    detached: true,
  });
  const signals = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
  const forward = (signal: NodeJS.Signals) => child.kill(signal);
  for (const signal of signals) process.on(signal, forward);
  const stopChild = () => child.kill('SIGTERM');
  process.on('exit', stopChild);
  try {
    return await new Promise<number>((resolve, reject) => {
      child.on('error', reject);
      child.on('exit', (code, signal) =>
        resolve(code ?? 128 + (signal === null ? 0 : constants.signals[signal])),
      );
    });
  } finally {
    for (const signal of signals) process.off(signal, forward);
    process.off('exit', stopChild);
  }
}
