import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * int8 inference: weights quantized per output channel (symmetric), activations per tensor at run
 * time (ONNX's DynamicQuantizeLinear, uint8 with a zero point). Linear layers become
 * `com.microsoft.MatMulIntegerToFloat`; convolutions `QLinearConv`, whose uint8 output needs a
 * scale fixed in advance: each layer's largest output magnitude, measured by running the float
 * graph on calibration inputs (`observe`). Both run on ONNX Runtime's VNNI/AMX integer kernels.
 */

export interface Int8Weight {
  /** int8: [in, out] for a linear layer (MatMul's B), [out, in, kh, kw] for a convolution. */
  readonly weight: Value;
  /** Per output channel, float [out]. */
  readonly scale: Value;
  readonly channels: number;
}

/** What a ParameterSource offers for quantized graphs. */
export interface Int8Source {
  /** Layer `layer`'s weight in int8, or undefined to keep it in float. */
  weight(layer: string, kind: 'linear' | 'conv'): Int8Weight | undefined;
  /** A convolution's calibrated output scale (largest |y| / 127), if measured. */
  outputScale(layer: string): number | undefined;
  /** Calibration builds: records layer `layer`'s float output. */
  observe?(layer: string, y: Value): void;
}

/**
 * A float weight [out, ...] → int8 values in [-limit, limit] and one scale per output channel
 * (`limit` 63 where the processor's integer kernels would saturate on 8 bits: runtime/cpu.ts).
 */
export function quantizePerChannel(
  values: Float32Array,
  shape: readonly number[],
  transposeTo2d = false,
  limit = 127,
): { values: Int8Array; scales: Float32Array; shape: number[] } {
  const out = shape[0]!;
  const per = values.length / out;
  const q = new Int8Array(values.length);
  const scales = new Float32Array(out);
  for (let o = 0; o < out; o++) {
    let max = 0;
    for (let i = 0; i < per; i++) max = Math.max(max, Math.abs(values[o * per + i]!));
    const scale = max > 0 ? max / limit : 1;
    scales[o] = scale;
    for (let i = 0; i < per; i++) {
      const v = Math.max(-limit, Math.min(limit, Math.round(values[o * per + i]! / scale)));
      // A linear layer's B is [in, out]: element (i, o).
      q[transposeTo2d ? i * out + o : o * per + i] = v;
    }
  }
  return { values: q, scales, shape: transposeTo2d ? [per, out] : [...shape] };
}

function dynamicQuantize(x: Value): [Value, Value, Value] {
  const [q, scale, zero] = x.graph.addNode('DynamicQuantizeLinear', [x], {}, [
    { dtype: 'uint8', shape: x.shape },
    { dtype: 'float32', shape: [] },
    { dtype: 'uint8', shape: [] },
  ]) as [Value, Value, Value];
  return [q, scale, zero];
}

/** x Wᵀ + b with int8 W: the integer product, scaled back to float in the same op. */
export function int8Linear(x: Value, w: Int8Weight, bias: Value | null): Value {
  const [q, scale, zero] = dynamicQuantize(x);
  return op.node(
    'MatMulIntegerToFloat',
    [q, w.weight, scale, w.scale, zero, null, bias],
    {},
    'float32',
    [...x.shape.slice(0, -1), w.channels],
    'com.microsoft',
  );
}

/** A convolution with int8 weights and a calibrated output scale, dequantized to float. */
export function int8Conv(
  x: Value,
  w: Int8Weight,
  bias: Value | null,
  outputScale: number,
  options: op.ConvOptions,
): Value {
  const g = x.graph;
  const { attrs, shape } = op.convShape(x, w.weight, options);
  const [q, scale, zero] = dynamicQuantize(x);
  const ys = g.constant(Tensor.float32([], [outputScale]));
  const yz = g.constant(new Tensor('uint8', [], Uint8Array.of(128)));
  const wz = g.constant(new Tensor('int8', [w.channels], new Int8Array(w.channels)));
  const y = op.node(
    'QLinearConv',
    [q, scale, zero, w.weight, w.scale, wz, ys, yz],
    attrs,
    'uint8',
    shape,
  );
  const dequantized = op.node('DequantizeLinear', [y, ys, yz], {}, 'float32', shape);
  return bias === null ? dequantized : op.add(dequantized, op.reshape(bias, [1, -1, 1, 1]));
}
