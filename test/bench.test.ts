import assert from 'node:assert/strict';
import test from 'node:test';
import { fullSizeSuite } from '../bench/full-size.js';
import { withTempDir } from './helpers.js';

test('the full-size benchmark suite runs end to end (on SD 1.x’s structure at a small width)', async () => {
  await withTempDir(async (dir) => {
    const before = process.env.GESSO_BENCH_MODELS;
    process.env.GESSO_BENCH_MODELS = dir;
    try {
      const results = await fullSizeSuite('sd15-mini', 1, { sizes: [64] });
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
      for (const r of results) assert.ok(r.median > 0 && Number.isFinite(r.median), r.name);
      assert.match(
        results.find((r) => r.name === 'sd15-mini: UNet 64×64 batch 2')!.note!,
        /% of peak/,
      );
      assert.match(results.find((r) => r.name.endsWith('batch 2, int8'))!.note!, /PSNR vs fp32 \d/);
    } finally {
      if (before === undefined) delete process.env.GESSO_BENCH_MODELS;
      else process.env.GESSO_BENCH_MODELS = before;
    }
  });
});
