import type { Value } from '../graph/ir.js';
import { conv } from '../graph/ops.js';
import { Module, type ParameterSource } from './module.js';
import { int8Conv } from './quantize.js';

export interface Conv2dOptions {
  stride?: number | readonly [number, number];
  /** Symmetric zero padding per side, as PyTorch's `padding`. */
  padding?: number | readonly [number, number];
  dilation?: number | readonly [number, number];
  groups?: number;
  bias?: boolean;
}

function pair(v: number | readonly [number, number]): [number, number] {
  return typeof v === 'number' ? [v, v] : [v[0], v[1]];
}

/** `nn.Conv2d` with weight [out, in / groups, kh, kw]. */
export class Conv2d extends Module {
  readonly inChannels: number;
  readonly outChannels: number;
  readonly kernel: [number, number];
  readonly stride: [number, number];
  readonly padding: [number, number];
  readonly dilation: [number, number];
  readonly groups: number;
  readonly bias: boolean;

  constructor(
    inChannels: number,
    outChannels: number,
    kernel: number | readonly [number, number],
    options: Conv2dOptions = {},
  ) {
    super();
    this.inChannels = inChannels;
    this.outChannels = outChannels;
    this.kernel = pair(kernel);
    this.stride = pair(options.stride ?? 1);
    this.padding = pair(options.padding ?? 0);
    this.dilation = pair(options.dilation ?? 1);
    this.groups = options.groups ?? 1;
    this.bias = options.bias ?? true;
    if (inChannels % this.groups !== 0 || outChannels % this.groups !== 0) {
      throw new Error(
        `Conv2d: ${inChannels} -> ${outChannels} channels do not split into ${this.groups} groups`,
      );
    }
    const bound = 1 / Math.sqrt((inChannels / this.groups) * this.kernel[0] * this.kernel[1]);
    this.addParameter('weight', [outChannels, inChannels / this.groups, ...this.kernel], {
      kind: 'uniform',
      bound,
    });
    if (this.bias) this.addParameter('bias', [outChannels], { kind: 'uniform', bound });
  }

  forward(params: ParameterSource, x: Value): Value {
    return this.scoped(params, () => {
      const options = {
        strides: this.stride,
        pads: [this.padding[0], this.padding[1], this.padding[0], this.padding[1]],
        dilations: this.dilation,
        group: this.groups,
      };
      const bias = this.bias ? this.param(params, 'bias') : null;
      const int8 = params.int8;
      const scale = int8?.outputScale(this.path);
      const weight = scale !== undefined ? int8!.weight(this.path, 'conv') : undefined;
      if (weight !== undefined) return int8Conv(x, weight, bias, scale!, options);
      const y = conv(x, this.param(params, 'weight'), bias, options);
      int8?.observe?.(this.path, y);
      return y;
    });
  }
}
