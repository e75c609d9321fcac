import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseNumber } from '../src/cli/args.js';
import { BENCH_USAGE } from '../src/cli/bench.js';
import { writeFileAtomically } from '../src/io/atomic.js';
import { foundationSuite } from './foundation.js';
import { FULL_SIZE_PARTS, fullSizeSuite, type FullSizePart } from './full-size.js';
import { formatLine, formatTable, machine, type Measurement, type Recorder } from './harness.js';
import { trainingSuite } from './training.js';

/** A mistake in the arguments: the message and the usage, no stack trace. */
function usageError(message: string): never {
  process.stderr.write(`gesso bench: ${message}\n\n${BENCH_USAGE}\n`);
  process.exit(2);
}

function parse() {
  try {
    return parseArgs({
      options: {
        suite: { type: 'string', default: 'foundation,training' },
        runs: { type: 'string', default: '7' },
        out: { type: 'string', default: 'bench-results' },
        threads: { type: 'string' },
        sizes: { type: 'string' },
        skip: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }).values;
  } catch (error) {
    return usageError((error as Error).message);
  }
}

const values = parse();
if (values.help === true) {
  process.stdout.write(`${BENCH_USAGE}\n`);
  process.exit(0);
}
/** A whole number of at least 1, checked as the gesso commands check theirs. */
const positive = (flag: string, text: string): number => {
  try {
    return parseNumber(flag, text, { integer: true, min: 1 })!;
  } catch (error) {
    return usageError((error as Error).message);
  }
};
const runs = positive('runs', values.runs);
function skipList(text: string): FullSizePart[] {
  const parts = text.split(',');
  const unknown = parts.filter((p) => !(FULL_SIZE_PARTS as readonly string[]).includes(p));
  if (unknown.length > 0)
    usageError(`--skip: unknown part '${unknown.join(',')}' (have: ${FULL_SIZE_PARTS.join(', ')})`);
  return parts as FullSizePart[];
}
const fullSize = {
  ...(values.threads !== undefined ? { threads: positive('threads', values.threads) } : {}),
  ...(values.sizes !== undefined
    ? { sizes: values.sizes.split(',').map((s) => positive('sizes', s)) }
    : {}),
  ...(values.skip !== undefined ? { skip: skipList(values.skip) } : {}),
};

/**
 * foundation and training are quick; sd15, sd21 and sdxl make full-size random-weight models once
 * (~4 GB, ~5 GB, ~14 GB with their fp16 variants) and take minutes each.
 */
const SUITES: Record<string, (runs: number, results: Recorder) => Promise<void>> = {
  foundation: foundationSuite,
  training: trainingSuite,
  sd15: (n, results) => fullSizeSuite('sd15', n, results, fullSize),
  sd21: (n, results) => fullSizeSuite('sd21', n, results, fullSize),
  sdxl: (n, results) => fullSizeSuite('sdxl', n, results, fullSize),
};
const info = machine();
process.stdout.write(
  `machine: ${info.cpu} (${info.cpuId}; ${info.cpuFeatures.join(' ')}), ${info.cores} cores (${info.computeThreads} compute threads), ${info.memoryGiB} GiB; node ${info.node}; onnxruntime ${info.onnxruntime}\n`,
);
const unknown = values.suite.split(',').filter((name) => SUITES[name] === undefined);
if (unknown.length > 0)
  usageError(`unknown suite '${unknown.join(',')}' (have: ${Object.keys(SUITES).join(', ')})`);
await mkdir(values.out, { recursive: true });
for (const name of values.suite.split(',')) {
  const suite = SUITES[name]!;
  process.stdout.write(`\n== ${name} (${runs} runs, medians) ==\n`);
  const file = join(values.out, `${name}.json`);
  const results: Measurement[] = [];
  const save = (complete: boolean) =>
    writeFileAtomically(
      file,
      JSON.stringify(
        { suite: name, date: new Date().toISOString(), complete, machine: info, results },
        null,
        2,
      ),
    );
  // Saved (whole or not at all) after every measurement.
  let saved = Promise.resolve();
  await suite(runs, {
    push(...taken: Measurement[]) {
      results.push(...taken);
      for (const m of taken) process.stdout.write(`  ${formatLine(m)}\n`);
      saved = saved.then(() => save(false));
      return results.length;
    },
  });
  await saved;
  await save(true);
  process.stdout.write(`\n${formatTable(results)}\nwrote ${file}\n`);
}
