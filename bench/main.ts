import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseNumber } from '../src/cli/args.js';
import { BENCH_USAGE } from '../src/cli/bench.js';
import { foundationSuite } from './foundation.js';
import { fullSizeSuite } from './full-size.js';
import { formatTable, machine, type Measurement } from './harness.js';
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
const fullSize = {
  ...(values.threads !== undefined ? { threads: positive('threads', values.threads) } : {}),
  ...(values.sizes !== undefined
    ? { sizes: values.sizes.split(',').map((s) => positive('sizes', s)) }
    : {}),
};

/**
 * foundation and training are quick; sd15, sd21 and sdxl make full-size random-weight models once
 * (~4 GB, ~5 GB, ~14 GB with their fp16 variants) and take minutes each.
 */
const SUITES: Record<string, (runs: number) => Promise<Measurement[]>> = {
  foundation: foundationSuite,
  training: trainingSuite,
  sd15: (n) => fullSizeSuite('sd15', n, fullSize),
  sd21: (n) => fullSizeSuite('sd21', n, fullSize),
  sdxl: (n) => fullSizeSuite('sdxl', n, fullSize),
};
const info = machine();
process.stdout.write(
  `machine: ${info.cpu} (${info.cpuId}; ${info.cpuFeatures.join(' ')}), ${info.cores} cores (${info.computeThreads} compute threads), ${info.memoryGiB} GiB; node ${info.node}; onnxruntime ${info.onnxruntime}\n`,
);
const unknown = values.suite.split(',').filter((name) => SUITES[name] === undefined);
if (unknown.length > 0)
  usageError(`unknown suite '${unknown.join(',')}' (have: ${Object.keys(SUITES).join(', ')})`);
for (const name of values.suite.split(',')) {
  const suite = SUITES[name]!;
  process.stdout.write(`\n== ${name} (${runs} runs, medians) ==\n`);
  const results = await suite(runs);
  process.stdout.write(`${formatTable(results)}\n`);
  await mkdir(values.out, { recursive: true });
  const file = join(values.out, `${name}.json`);
  await writeFile(
    file,
    JSON.stringify(
      { suite: name, date: new Date().toISOString(), machine: info, results },
      null,
      2,
    ),
  );
  process.stdout.write(`wrote ${file}\n`);
}
