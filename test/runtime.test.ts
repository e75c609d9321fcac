import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { readdir, writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import test from 'node:test';
import { isUserError } from '../src/errors.js';
import { Graph } from '../src/graph/ir.js';
import { emitOnnx } from '../src/graph/onnx.js';
import * as op from '../src/graph/ops.js';
import { writeSafetensors } from '../src/io/safetensors.js';
import { Linear, WeightSet } from '../src/nn/index.js';
import { defaultComputeThreads, processorIdentity } from '../src/runtime/cpu.js';
import { runOnce, Session } from '../src/runtime/session.js';
import { Tensor } from '../src/tensor/tensor.js';
import { withTempDir } from './helpers.js';

function tinyModel() {
  const g = new Graph();
  const x = g.input('x', 'float32', ['n']);
  g.output(op.add(op.mul(x, 3), 1), 'y');
  return emitOnnx(g);
}

test('execution providers: a clear error where the platform has none', async () => {
  const unavailable = process.platform === 'darwin' ? 'dml' : 'coreml';
  await assert.rejects(
    Session.create(
      { key: undefined, emit: tinyModel },
      { executionProvider: unavailable, cacheDir: false },
    ),
    (e: unknown) => {
      assert.ok(isUserError(e));
      assert.equal(e.code, 'execution-provider-unavailable');
      assert.match(
        e.message,
        new RegExp(`'${unavailable}' is not available on ${process.platform}`),
      );
      return true;
    },
  );
});

test(
  'cuda without its libraries fails as a user error, not a crash',
  { skip: process.platform !== 'linux' ? 'Linux only' : false },
  async () => {
    try {
      const s = await Session.create(
        { key: undefined, emit: tinyModel },
        { executionProvider: 'cuda', cacheDir: false },
      );
      await s.release(); // a machine with CUDA: nothing to check
    } catch (e) {
      assert.ok(isUserError(e), String(e));
      assert.match(e.code, /execution-provider-(unavailable|failed)/);
    }
  },
);

test('the default thread count is one per physical core the kernel lists', () => {
  const threads = defaultComputeThreads();
  assert.ok(threads >= 1 && threads <= availableParallelism(), `${threads}`);
  if (!existsSync('/proc/cpuinfo')) return;
  // Counted here independently: distinct (physical id, core id) pairs, hyper-threads once.
  const cores = new Set<string>();
  let packageId = '0';
  for (const line of readFileSync('/proc/cpuinfo', 'utf8').split('\n')) {
    const [key, value] = line.split(':').map((part) => part.trim());
    if (key === 'physical id') packageId = value!;
    if (key === 'core id') cores.add(`${packageId}/${value}`);
  }
  if (cores.size > 0) assert.equal(threads, Math.min(cores.size, availableParallelism()));
  const identity = processorIdentity();
  assert.ok(identity.name.length > 0);
  if (process.arch === 'x64') assert.match(identity.id, /^family \d+ model \d+$/);
});

test('threads and optimization level are honoured options', async () => {
  for (const [threads, level] of [
    [1, 'disabled'],
    [2, 'all'],
  ] as const) {
    const r = await runOnce(
      tinyModel(),
      { x: Tensor.float32([3], [0, 1, 2]) },
      { threads, graphOptimization: level },
    );
    assert.deepEqual(r.y!.toArray(), [1, 4, 7]);
  }
});

test('the graph cache: emit once, reuse by key, rebuild on a new key or a damaged entry', async () => {
  await withTempDir(async (dir) => {
    let emits = 0;
    const source = (key: string) => ({
      key,
      emit: () => {
        emits++;
        return tinyModel();
      },
    });
    const x = Tensor.float32([2], [1, 2]);
    const first = await Session.create(source('model-a'), { cacheDir: dir });
    assert.equal(first.origin, 'emitted');
    assert.deepEqual((await first.run({ x })).y!.toArray(), [4, 7]);
    await first.release();
    const second = await Session.create(source('model-a'), { cacheDir: dir });
    assert.equal(second.origin, 'cache');
    assert.deepEqual((await second.run({ x })).y!.toArray(), [4, 7]);
    await second.release();
    assert.equal(emits, 1);

    const other = await Session.create(source('model-b'), { cacheDir: dir });
    assert.equal(other.origin, 'emitted');
    await other.release();
    assert.equal(emits, 2);

    // Damage every cached graph: the next load notices and rebuilds.
    const graphs = join(dir, 'graphs');
    for (const entry of await readdir(graphs))
      await writeFile(join(graphs, entry, 'model.onnx'), 'garbage');
    const rebuilt = await Session.create(source('model-a'), { cacheDir: dir });
    assert.equal(rebuilt.origin, 'emitted');
    assert.deepEqual((await rebuilt.run({ x })).y!.toArray(), [4, 7]);
    await rebuilt.release();
  });
});

test('the optimized-graph cache loads ORT’s optimized model and gives the same results', async () => {
  await withTempDir(async (dir) => {
    const weightsPath = join(dir, 'w.safetensors');
    await writeSafetensors(weightsPath, {
      weight: Tensor.float32(
        [300, 400],
        Array.from({ length: 120000 }, (_, i) => Math.sin(i)),
      ),
      bias: Tensor.full([300], 0.5),
    });
    const layer = new Linear(400, 300);
    const weights = (await WeightSet.fromFiles(weightsPath)).bind(layer);
    const emit = () => {
      const g = new Graph();
      g.output(layer.forward(weights.parameters(g), g.input('x', 'float32', ['n', 400])), 'y');
      return emitOnnx(g);
    };
    const key = `linear:${weights.weights.fingerprint}`;
    const x = Tensor.float32(
      [2, 400],
      Array.from({ length: 800 }, (_, i) => Math.cos(i)),
    );
    const cold = await Session.create({ key, emit }, { cacheDir: dir, cacheOptimized: true });
    const expected = (await cold.run({ x })).y!;
    await cold.release();
    const warm = await Session.create({ key, emit }, { cacheDir: dir, cacheOptimized: true });
    assert.equal(warm.origin, 'optimized-cache');
    assert.deepEqual((await warm.run({ x })).y!.toArray(), expected.toArray());
    await warm.release();
  });
});

/** A graph that computes for a while: `rounds` chained [n, n] matrix products. */
function busyModel(n: number, rounds: number) {
  const g = new Graph();
  const x = g.input('x', 'float32', [n, n]);
  let y = x;
  for (let i = 0; i < rounds; i++) y = op.mul(op.matmul(y, x), 1 / n);
  g.output(y, 'y');
  return emitOnnx(g);
}

/**
 * Starts `work` from a timer callback and says whether it settled before the next timer fired.
 * A run on this thread happens in the same turn of the event loop (onnxruntime-node runs it in a
 * setImmediate callback), so it settles first; a run elsewhere lets the timer fire meanwhile.
 */
function settlesBeforeNextTimer<T>(work: () => Promise<T>): Promise<{ value: T; first: boolean }> {
  return new Promise((resolve, reject) => {
    setTimeout(() => {
      let settled = false;
      const timerSaw = new Promise<boolean>((seen) => setTimeout(() => seen(settled), 0));
      work()
        .finally(() => (settled = true))
        .then(async (value) => resolve({ value, first: await timerSaw }), reject);
    }, 0);
  });
}

test('off-thread sessions: the same results, with this thread’s event loop running meanwhile', async () => {
  const n = 512;
  const x = Tensor.float32(
    [n, n],
    Array.from({ length: n * n }, (_, i) => Math.abs(Math.sin(i))),
  );
  const model = busyModel(n, 32);
  const results: Tensor[] = [];
  const settledFirst: boolean[] = [];
  for (const offThread of [false, true]) {
    const session = await Session.create(
      { key: undefined, emit: () => model },
      {
        cacheDir: false,
        offThread,
      },
    );
    assert.deepEqual(session.inputNames, ['x']);
    assert.deepEqual(session.outputNames, ['y']);
    const run = await settlesBeforeNextTimer(() => session.run({ x }));
    results.push(run.value.y!);
    settledFirst.push(run.first);
    await session.release();
  }
  // onnxruntime-node runs on the calling thread: no timer fires until the run is over. Should a
  // later version run asynchronously, this fails and the worker thread is no longer needed.
  assert.equal(settledFirst[0], true, 'a same-thread run let a timer fire before it finished');
  assert.equal(settledFirst[1], false, 'the off-thread run held up this thread’s timers');
  assert.deepEqual(results[1]!.shape, [n, n]);
  assert.deepEqual(results[1]!.data, results[0]!.data);
  // The inputs were copied, not moved: the caller's tensor is intact.
  assert.equal(x.data.length, n * n);
});

test('off-thread sessions: errors come back as errors, with ONNX Runtime’s message', async () => {
  const session = await Session.create(
    { key: undefined, emit: tinyModel },
    { cacheDir: false, offThread: true },
  );
  await assert.rejects(session.run({ z: Tensor.float32([1], [1]) }), /x|input/i);
  await assert.rejects(
    session.run({ x: new Tensor('bfloat16', [1]) }),
    /no bfloat16 tensors; cast to float32 first/,
  );
  // A feed viewing part of a larger buffer sends its own elements.
  const wide = Float32Array.from([9, 0, 1, 9]);
  const part = new Tensor('float32', [2], wide.subarray(1, 3));
  assert.deepEqual((await session.run({ x: part })).y!.toArray(), [1, 4]);
  // Still usable after a failed run.
  assert.deepEqual((await session.run({ x: Tensor.float32([2], [0, 1]) })).y!.toArray(), [1, 4]);
  await session.release();
  await assert.rejects(
    Session.create(
      {
        key: undefined,
        emit: () => ({ bytes: new Uint8Array([1, 2, 3]), externalDataFolder: undefined }),
      },
      { cacheDir: false, offThread: true },
    ),
    Error,
  );
});

test('off-thread sessions: an idle worker thread does not keep the process alive', async () => {
  const session = new URL('../src/runtime/session.js', import.meta.url).href;
  const graph = new URL('../src/graph/ir.js', import.meta.url).href;
  const ops = new URL('../src/graph/ops.js', import.meta.url).href;
  const onnx = new URL('../src/graph/onnx.js', import.meta.url).href;
  const tensor = new URL('../src/tensor/tensor.js', import.meta.url).href;
  const script = `
    import { Session } from '${session}';
    import { Graph } from '${graph}';
    import * as op from '${ops}';
    import { emitOnnx } from '${onnx}';
    import { Tensor } from '${tensor}';
    const g = new Graph();
    g.output(op.add(g.input('x', 'float32', ['n']), 1), 'y');
    const model = emitOnnx(g);
    const s = await Session.create({ key: undefined, emit: () => model }, { cacheDir: false, offThread: true });
    const r = await s.run({ x: Tensor.float32([2], [1, 2]) });
    console.log(JSON.stringify(r.y.toArray()));
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (out += chunk.toString()));
  const timeout = setTimeout(() => child.kill('SIGKILL'), 60_000);
  const [code, signal] = (await once(child, 'close')) as [number | null, string | null];
  clearTimeout(timeout);
  assert.equal(signal, null, `the process had to be killed (still running after 60 s): ${out}`);
  assert.equal(code, 0, out);
  assert.equal(out.trim(), '[2,3]');
});
