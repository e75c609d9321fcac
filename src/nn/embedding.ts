import type { Value } from '../graph/ir.js';
import { gather } from '../graph/ops.js';
import { Module, type ParameterSource } from './module.js';

/** `nn.Embedding`: rows of weight [count, dim] picked by integer ids. */
export class Embedding extends Module {
  readonly count: number;
  readonly dim: number;

  constructor(count: number, dim: number, std = 0.02) {
    super();
    this.count = count;
    this.dim = dim;
    // transformers' CLIP initializes embeddings with std 0.02 (PyTorch's own default is 1).
    this.addParameter('weight', [count, dim], { kind: 'normal', std });
  }

  forward(params: ParameterSource, ids: Value): Value {
    return this.scoped(params, () => gather(this.param(params, 'weight'), ids, 0));
  }
}
