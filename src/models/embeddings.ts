import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { activation } from '../nn/activations.js';
import { Linear } from '../nn/linear.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * diffusers' sinusoidal timestep embedding (`get_timestep_embedding`) of a [B] tensor of
 * (possibly fractional) timesteps: [sin, cos] (or [cos, sin]) of t · exp(-ln(maxPeriod)·i/(half −
 * shift)). The frequencies are computed in float32 as PyTorch computes them.
 */
export function timestepEmbedding(
  timesteps: Value,
  dim: number,
  options: {
    flipSinToCos: boolean;
    downscaleFreqShift: number;
    scale?: number;
    maxPeriod?: number;
  },
): Value {
  const half = Math.floor(dim / 2);
  const maxPeriod = options.maxPeriod ?? 10000;
  const f = Math.fround;
  const frequencies = new Float32Array(half);
  const logPeriod = f(-Math.log(maxPeriod));
  const divisor = f(half - options.downscaleFreqShift);
  for (let i = 0; i < half; i++) frequencies[i] = f(Math.exp(f(f(logPeriod * i) / divisor)));
  const g = timesteps.graph;
  const t = op.unsqueeze(op.cast(timesteps, 'float32'), [1]);
  let angles = op.mul(t, g.constant(new Tensor('float32', [1, half], frequencies)));
  if ((options.scale ?? 1) !== 1) angles = op.mul(angles, options.scale ?? 1);
  const parts = options.flipSinToCos
    ? [op.cos(angles), op.sin(angles)]
    : [op.sin(angles), op.cos(angles)];
  const emb = op.concat(parts, 1);
  return dim % 2 === 1 ? op.pad(emb, [0, 0, 0, 1]) : emb;
}

/** diffusers' `TimestepEmbedding`: linear_1 → act → linear_2 (→ post act), with an optional cond_proj. */
export class TimestepEmbedding extends Module {
  private readonly linear1: Linear;
  private readonly linear2: Linear;
  private readonly condProj: Linear | undefined;
  private readonly act: (x: Value) => Value;
  private readonly postAct: ((x: Value) => Value) | undefined;

  constructor(
    inChannels: number,
    embedDim: number,
    options: {
      act?: string;
      outDim?: number;
      postAct?: string | null;
      condProjDim?: number | null;
    } = {},
  ) {
    super();
    this.linear1 = this.addModule('linear_1', new Linear(inChannels, embedDim));
    this.condProj =
      options.condProjDim === undefined || options.condProjDim === null
        ? undefined
        : this.addModule('cond_proj', new Linear(options.condProjDim, inChannels, false));
    this.act = activation(options.act ?? 'silu');
    this.linear2 = this.addModule('linear_2', new Linear(embedDim, options.outDim ?? embedDim));
    this.postAct =
      options.postAct === undefined || options.postAct === null
        ? undefined
        : activation(options.postAct);
  }

  forward(p: ParameterSource, sample: Value, condition?: Value): Value {
    return this.scoped(p, () => {
      let x = sample;
      if (condition !== undefined) {
        if (this.condProj === undefined) throw new Error('this TimestepEmbedding has no cond_proj');
        x = op.add(x, this.condProj.forward(p, condition));
      }
      x = this.linear2.forward(p, this.act(this.linear1.forward(p, x)));
      return this.postAct === undefined ? x : this.postAct(x);
    });
  }
}
