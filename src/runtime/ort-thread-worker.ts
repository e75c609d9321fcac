import { parentPort } from 'node:worker_threads';
import ort from 'onnxruntime-node';
import type { ThreadReply, ThreadRequest, WireTensor } from './ort-thread.js';

/**
 * The worker side of `ort-thread.ts`: holds ONNX Runtime sessions and runs them here, so the
 * thread that asked keeps its event loop while a graph loads or runs.
 */

const port = parentPort;
if (port === null) throw new Error('ort-thread-worker.js runs as a worker thread only');

const sessions = new Map<number, ort.InferenceSession>();
let nextSession = 1;

function toOrt(t: WireTensor): ort.Tensor {
  return new ort.Tensor(t.dtype as ort.Tensor.Type, t.data as ort.Tensor.DataType, [...t.shape]);
}

function fromOrt(t: ort.Tensor): WireTensor {
  return { dtype: t.type, shape: [...t.dims], data: t.data as WireTensor['data'] };
}

function session(id: number): ort.InferenceSession {
  const found = sessions.get(id);
  if (found === undefined) throw new Error(`no ONNX Runtime session ${id} on this thread`);
  return found;
}

async function handle(
  request: ThreadRequest,
): Promise<{ value: unknown; transfer: ArrayBuffer[] }> {
  switch (request.kind) {
    case 'create': {
      const created =
        typeof request.model === 'string'
          ? await ort.InferenceSession.create(request.model, request.options)
          : await ort.InferenceSession.create(request.model, request.options);
      const id = nextSession++;
      sessions.set(id, created);
      return {
        value: { session: id, inputNames: created.inputNames, outputNames: created.outputNames },
        transfer: [],
      };
    }
    case 'run': {
      const feeds: Record<string, ort.Tensor> = {};
      for (const [name, t] of Object.entries(request.feeds)) feeds[name] = toOrt(t);
      const target = session(request.session);
      const results =
        request.outputs === undefined
          ? await target.run(feeds)
          : await target.run(feeds, [...request.outputs]);
      const outputs: Record<string, WireTensor> = {};
      const transfer: ArrayBuffer[] = [];
      for (const [name, t] of Object.entries(results)) {
        const wire = fromOrt(t);
        outputs[name] = wire;
        // Moved, not copied, to the asking thread; this thread keeps no reference to them.
        if (wire.data.buffer instanceof ArrayBuffer && !transfer.includes(wire.data.buffer)) {
          transfer.push(wire.data.buffer);
        }
      }
      return { value: outputs, transfer };
    }
    case 'release': {
      await sessions.get(request.session)?.release();
      sessions.delete(request.session);
      return { value: null, transfer: [] };
    }
  }
}

port.on('message', (request: ThreadRequest) => {
  handle(request).then(
    ({ value, transfer }) => {
      const reply: ThreadReply = { id: request.id, ok: true, value };
      try {
        port.postMessage(reply, transfer);
      } catch {
        // A buffer ONNX Runtime does not let go of (an external one) is copied instead.
        port.postMessage(reply);
      }
    },
    (error: unknown) => {
      const reply: ThreadReply = {
        id: request.id,
        ok: false,
        message: error instanceof Error ? error.message : String(error),
      };
      port.postMessage(reply);
    },
  );
});
