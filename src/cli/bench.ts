import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { UserError } from '../errors.js';

export const BENCH_USAGE = `usage: gesso bench [--suite foundation,training,sd15,sd21,sdxl] [--runs N] [--threads N]
                   [--sizes 512,256] [--skip export,images,int8,memory] [--out DIR]

Measures speed and memory (the same program as 'npm run bench'). foundation and training take a
few minutes; sd15, sd21 and sdxl first write full-size models with random weights (speed does
not depend on the values) into ~/.cache/gesso/bench-models, then time the text encoder, the UNet
at batch 1 and 2, the VAE, loading, and whole images, with the UNet's multiply–accumulate rate as
a fraction of this machine's measured peak; ORT on a PyTorch export of the same UNet (export),
whole images at 1 and 20 steps (images), the int8 UNet (int8) and each memory mode in a fresh
process (memory), which --skip leaves out of a long run. Prints each figure as it is measured and
a table at the end, and writes JSON to --out (after every figure).`;

/** Runs the repository's benchmark program (dist/bench/main.js) with the same arguments. */
export async function benchCommand(args: readonly string[]): Promise<number> {
  if (args.includes('--help') || args.includes('-h')) {
    process.stdout.write(`${BENCH_USAGE}\n`);
    return 0;
  }
  const program = fileURLToPath(new URL('../../bench/main.js', import.meta.url));
  if (!existsSync(program))
    throw new UserError(
      'missing-bench',
      `${program} is missing: gesso bench runs from a built checkout (npm run build)`,
    );
  const result = spawnSync(process.execPath, [program, ...args], { stdio: 'inherit' });
  return result.status ?? 1;
}
