import type { Value } from '../graph/ir.js';
import { gather } from '../graph/ops.js';
import { Module, type ParameterSource } from './module.js';

/** `nn.Embedding`: rows of weight [count, dim] picked by integer ids. */
export class Embedding extends Module {
  readonly count: number;
  readonly dim: number;

  constructor(count: number, dim: number) {
    super();
    this.count = count;
    this.dim = dim;
    this.addParameter('weight', [count, dim]);
  }

  forward(params: ParameterSource, ids: Value): Value {
    return this.scoped(params, () => gather(this.param(params, 'weight'), ids, 0));
  }
}
