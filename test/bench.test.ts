import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import test from 'node:test';
import { fileURLToPath } from 'node:url';
import { fullSizeSuite } from '../bench/full-size.js';
import { formatLine, machine, type Measurement } from '../bench/harness.js';
import { MATRIX_FEATURES } from '../src/runtime/cpu.js';
import { withTempDir } from './helpers.js';

test('the full-size benchmark suite runs end to end (on SD 1.x’s structure at a small width)', async () => {
  await withTempDir(async (dir) => {
    const before = process.env.GESSO_BENCH_MODELS;
    process.env.GESSO_BENCH_MODELS = dir;
    try {
      const results: Measurement[] = [];
      await fullSizeSuite('sd15-mini', 1, results, { sizes: [64] });
      const names = results.map((r) => r.name);
      for (const expected of [
        'machine fp32 MatMul peak (2048³)',
        'sd15-mini: UNet 64×64 batch 2',
        'sd15-mini: VAE decode 64×64',
        'sd15-mini: image 64² 20 steps, guidance 7.5',
        'sd15-mini: UNet 64×64 batch 2, int8',
        'sd15-mini: peak resident memory, 64² image (fp16, low-memory)',
      ])
        assert.ok(names.includes(expected), `${expected} in ${names.join('; ')}`);
      const batch2 = results.find((r) => r.name === 'sd15-mini: UNet 64×64 batch 2')!;
      assert.equal(
        formatLine(batch2),
        `sd15-mini: UNet 64×64 batch 2: ${Number(batch2.median.toPrecision(4))} s; ${batch2.note!}`,
      );
      assert.equal(
        formatLine({
          name: 'x',
          unit: 's',
          runs: [1000, 1064],
          median: 1032,
          min: 1000,
          max: 1064,
        }),
        'x: 1032 s (1000–1060, 2 runs)',
      );
      for (const r of results) assert.ok(r.median > 0 && Number.isFinite(r.median), r.name);
      assert.match(
        results.find((r) => r.name === 'sd15-mini: UNet 64×64 batch 2')!.note!,
        /% of MatMul peak/,
      );
      // Present where the machine has a C compiler and python3-torch (the suite notes when not).
      const fma = results.find((r) => r.name === 'machine fp32 FMA peak (all threads)');
      if (fma !== undefined)
        assert.match(
          results.find((r) => r.name === 'sd15-mini: UNet 64×64 batch 1')!.note!,
          /% of FMA peak/,
        );
      const exported = results.find(
        (r) => r.name === 'sd15-mini: UNet 64×64 batch 2, ORT on a PyTorch export',
      );
      if (exported !== undefined) assert.match(exported.note!, /GMAC\/s/);
      assert.match(results.find((r) => r.name.endsWith('batch 2, int8'))!.note!, /PSNR vs fp32 \d/);

      // --skip leaves out the slow parts and nothing else.
      const quick: Measurement[] = [];
      await fullSizeSuite('sd15-mini', 1, quick, {
        sizes: [64],
        peak: 1e11,
        skip: ['export', 'images', 'int8', 'memory'],
      });
      const kept = quick.map((r) => r.name);
      assert.ok(kept.includes('sd15-mini: UNet 64×64 batch 2'), kept.join('; '));
      assert.ok(kept.includes('sd15-mini: VAE decode 64×64'), kept.join('; '));
      for (const left of ['PyTorch export', ' step', 'int8', 'resident memory, 64²'])
        assert.ok(!kept.some((n) => n.includes(left)), `${left} in ${kept.join('; ')}`);
    } finally {
      if (before === undefined) delete process.env.GESSO_BENCH_MODELS;
      else process.env.GESSO_BENCH_MODELS = before;
    }
  });
});

const BENCH = fileURLToPath(new URL('../bench/main.js', import.meta.url));
const bench = (...args: string[]) =>
  spawnSync(process.execPath, [BENCH, ...args], { encoding: 'utf8', timeout: 60_000 });

test('npm run bench: a wrong argument is one message and the usage, exit status 2', () => {
  for (const [args, message] of [
    [['--runs', '0'], 'gesso bench: --runs must be at least 1 (got 0)'],
    [['--sizes', '512,x'], "gesso bench: --sizes must be an integer (got 'x')"],
    [['--suite', 'sd15,nope'], "gesso bench: unknown suite 'nope' (have: foundation, training"],
    [['--frobnicate'], "gesso bench: Unknown option '--frobnicate'"],
    [
      ['--skip', 'images,nope'],
      "gesso bench: --skip: unknown part 'nope' (have: export, images, int8, memory)",
    ],
  ] as const) {
    const r = bench(...args);
    assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.ok(r.stderr.startsWith(message), `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, /usage: gesso bench/);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  }
  const help = bench('--help');
  assert.equal(help.status, 0);
  assert.match(help.stdout, /^usage: gesso bench \[--suite/);
});

test('benchmark results name the processor by family, model and matrix features', () => {
  const info = machine();
  assert.match(info.cpuId, /^family \d+ model \d+$|^unknown$/);
  for (const feature of info.cpuFeatures)
    assert.ok(MATRIX_FEATURES.includes(feature), `${feature} is not a matrix feature`);
  if (process.arch === 'x64' && process.platform === 'linux')
    assert.ok(info.cpuFeatures.includes('avx2'));
});
