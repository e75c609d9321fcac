import type { Value } from '../graph/ir.js';
import { add, gemm, matmul, transpose } from '../graph/ops.js';
import { Module, type Init, type ParameterSource } from './module.js';
import { int8Linear } from './quantize.js';

/** `nn.Linear`: y = x Wᵀ + b, with W stored [out, in] as PyTorch stores it. */
export class Linear extends Module {
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly bias: boolean;

  constructor(
    inFeatures: number,
    outFeatures: number,
    bias = true,
    init: { weight?: Init; bias?: Init } = {},
  ) {
    super();
    this.inFeatures = inFeatures;
    this.outFeatures = outFeatures;
    this.bias = bias;
    // PyTorch's default: U(±1/√fan_in) for weight and bias.
    const bound = 1 / Math.sqrt(inFeatures);
    this.addParameter(
      'weight',
      [outFeatures, inFeatures],
      init.weight ?? { kind: 'uniform', bound },
    );
    if (bias) this.addParameter('bias', [outFeatures], init.bias ?? { kind: 'uniform', bound });
  }

  forward(params: ParameterSource, x: Value): Value {
    return this.scoped(params, () => {
      const bias = this.bias ? this.param(params, 'bias') : null;
      const int8 = params.int8?.weight(this.path, 'linear');
      if (int8 !== undefined) return int8Linear(x, int8, bias);
      const weight = this.param(params, 'weight');
      if (x.rank === 2) return gemm(x, weight, bias, { transB: true });
      const y = matmul(x, transpose(weight, [1, 0]));
      return bias === null ? y : add(y, bias);
    });
  }
}
