import type { Value } from '../graph/ir.js';
import { groupNormalization, layerNormalization } from '../graph/ops.js';
import { Tensor } from '../tensor/tensor.js';
import { Module, type ParameterSource } from './module.js';

/** `nn.GroupNorm` over [N, C, ...]: statistics per group of channels, affine per channel. */
export class GroupNorm extends Module {
  readonly groups: number;
  readonly channels: number;
  readonly eps: number;
  readonly affine: boolean;

  constructor(groups: number, channels: number, eps = 1e-5, affine = true) {
    super();
    if (channels % groups !== 0)
      throw new Error(`GroupNorm: ${channels} channels do not split into ${groups} groups`);
    this.groups = groups;
    this.channels = channels;
    this.eps = eps;
    this.affine = affine;
    if (affine) {
      this.addParameter('weight', [channels], { kind: 'constant', value: 1 });
      this.addParameter('bias', [channels]);
    }
  }

  forward(params: ParameterSource, x: Value): Value {
    return this.scoped(params, () => {
      const g = params.graph;
      const scale = this.affine
        ? this.param(params, 'weight')
        : g.constant(Tensor.full([this.channels], 1));
      const bias = this.affine
        ? this.param(params, 'bias')
        : g.constant(Tensor.full([this.channels], 0));
      return groupNormalization(x, scale, bias, this.groups, this.eps);
    });
  }
}

/** `nn.LayerNorm` over the last dimension. */
export class LayerNorm extends Module {
  readonly dim: number;
  readonly eps: number;
  readonly affine: boolean;
  readonly bias: boolean;

  constructor(dim: number, eps = 1e-5, options: { affine?: boolean; bias?: boolean } = {}) {
    super();
    this.dim = dim;
    this.eps = eps;
    this.affine = options.affine ?? true;
    this.bias = this.affine && (options.bias ?? true);
    if (this.affine) this.addParameter('weight', [dim], { kind: 'constant', value: 1 });
    if (this.bias) this.addParameter('bias', [dim]);
  }

  forward(params: ParameterSource, x: Value): Value {
    return this.scoped(params, () => {
      const g = params.graph;
      const scale = this.affine
        ? this.param(params, 'weight')
        : g.constant(Tensor.full([this.dim], 1));
      return layerNormalization(x, scale, this.bias ? this.param(params, 'bias') : null, this.eps);
    });
  }
}
