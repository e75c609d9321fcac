import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { foundationSuite } from './foundation.js';
import { fullSizeSuite } from './full-size.js';
import { formatTable, machine, type Measurement } from './harness.js';
import { trainingSuite } from './training.js';

const { values } = parseArgs({
  options: {
    suite: { type: 'string', default: 'foundation,training' },
    runs: { type: 'string', default: '7' },
    out: { type: 'string', default: 'bench-results' },
    threads: { type: 'string' },
    sizes: { type: 'string' },
  },
});
const runs = Number(values.runs);
const fullSize = {
  ...(values.threads !== undefined ? { threads: Number(values.threads) } : {}),
  ...(values.sizes !== undefined ? { sizes: values.sizes.split(',').map(Number) } : {}),
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
  `machine: ${info.cpu}, ${info.cores} cores, ${info.memoryGiB} GiB; node ${info.node}; onnxruntime ${info.onnxruntime}\n`,
);
for (const name of values.suite.split(',')) {
  const suite = SUITES[name];
  if (suite === undefined)
    throw new Error(`unknown suite '${name}' (have: ${Object.keys(SUITES).join(', ')})`);
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
