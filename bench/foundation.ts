import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Graph } from '../src/graph/ir.js';
import { emitOnnx } from '../src/graph/onnx.js';
import * as op from '../src/graph/ops.js';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import { Linear, Module, WeightSet } from '../src/nn/index.js';
import { Session } from '../src/runtime/session.js';
import { float16ArrayToFloat32, float32ArrayToFloat16 } from '../src/tensor/half.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { measurement, timeRuns, type Recorder } from './harness.js';

class Stack extends Module {
  readonly layers: Linear[];
  constructor(depth: number, width: number) {
    super();
    this.layers = this.addModuleList(
      'layers',
      Array.from({ length: depth }, () => new Linear(width, width)),
    );
  }
}

/**
 * The foundation's costs around a model: random latents, half-precision conversion, weight files,
 * graph emission, and ONNX Runtime session start-up from weights referenced in place, with and
 * without the optimized-graph cache.
 */
export async function foundationSuite(runs: number, results: Recorder): Promise<void> {
  const g = new TorchGenerator(0);
  results.push(
    measurement(
      'randn [1,4,128,128] (SDXL latents)',
      's',
      await timeRuns(runs, () => g.randn([1, 4, 128, 128])),
      (m) => `${(65536 / m / 1e6).toFixed(1)} M values/s`,
    ),
  );
  const values = g.randn([16 * 1024 * 1024]).data;
  const halves = float32ArrayToFloat16(values);
  results.push(
    measurement(
      'float16 -> float32, 16 M values',
      's',
      await timeRuns(runs, () => float16ArrayToFloat32(halves)),
      (m) => `${(halves.length / m / 1e6).toFixed(0)} M values/s`,
    ),
  );
  results.push(
    measurement(
      'float32 -> float16, 16 M values',
      's',
      await timeRuns(runs, () => float32ArrayToFloat16(values)),
      (m) => `${(values.length / m / 1e6).toFixed(0)} M values/s`,
    ),
  );

  const dir = await mkdtemp(join(tmpdir(), 'gesso-bench-'));
  try {
    // 16 layers of 2048x2048 in fp16: 128 MiB of weights.
    const depth = 16;
    const width = 2048;
    const model = new Stack(depth, width);
    const path = join(dir, 'stack.fp16.safetensors');
    const tensors: Record<string, { dtype: 'F16'; shape: number[]; bytes: () => Uint8Array }> = {};
    for (const [key, shape] of model.namedParameters()) {
      tensors[key] = {
        dtype: 'F16',
        shape: [...shape],
        bytes: () => {
          const t = g.randn(shape).data;
          for (let i = 0; i < t.length; i++) t[i] = t[i]! * 0.02;
          const h = float32ArrayToFloat16(t);
          return new Uint8Array(h.buffer);
        },
      };
    }
    await writeSafetensors(path, tensors);
    const size = (await stat(path)).size;
    results.push(
      measurement(
        'open safetensors header (32 tensors)',
        's',
        await timeRuns(runs, () => SafetensorsFile.with(path, async () => undefined)),
      ),
    );
    results.push(
      measurement(
        'read every tensor of a 128 MiB file',
        's',
        await timeRuns(runs, () =>
          SafetensorsFile.with(path, async (f) => {
            for (const n of f.names) await f.readBytes(n);
          }),
        ),
        (m) => `${(size / m / 2 ** 30).toFixed(2)} GiB/s`,
      ),
    );

    const weights = (await WeightSet.fromFiles(path)).bind(model);
    const build = () => {
      const graph = new Graph();
      const p = weights.parameters(graph);
      let x = graph.input('x', 'float32', ['batch', width]);
      for (const layer of model.layers) x = op.relu(layer.forward(p, x));
      graph.output(x, 'y');
      return emitOnnx(graph);
    };
    results.push(
      measurement(
        'build + emit graph (16 fp16 layers)',
        's',
        await timeRuns(runs, build),
        (m) => `${(m * 1000).toFixed(2)} ms`,
      ),
    );

    const x = g.randn([2, width]);
    const cache = join(dir, 'cache');
    const key = `stack:${weights.weights.fingerprint}`;
    results.push(
      measurement(
        'session from fp16 weights in place (no cache)',
        's',
        await timeRuns(runs, async () =>
          (await Session.create({ key: undefined, emit: build }, { cacheDir: false })).release(),
        ),
      ),
    );
    await (
      await Session.create({ key, emit: build }, { cacheDir: cache, cacheOptimized: true })
    ).release();
    results.push(
      measurement(
        'session from the optimized-graph cache',
        's',
        await timeRuns(runs, async () =>
          (
            await Session.create({ key, emit: build }, { cacheDir: cache, cacheOptimized: true })
          ).release(),
        ),
      ),
    );
    const session = await Session.create({ key, emit: build }, { cacheDir: cache });
    results.push(
      measurement(
        'run: batch 2 through 16 layers (268 M MACs)',
        's',
        await timeRuns(runs * 3, () => session.run({ x })),
        (m) => `${((2 * depth * width * width) / m / 1e9).toFixed(1)} GMAC/s`,
      ),
    );
    await session.release();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
