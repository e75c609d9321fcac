import { UserError } from '../errors.js';
import type { Value } from '../graph/ir.js';
import { add, div, erf, mul, relu, sigmoid, tanh } from '../graph/ops.js';

/** SiLU (swish): x · σ(x). */
export function silu(x: Value): Value {
  return mul(x, sigmoid(x));
}

/** GELU, exact (x · Φ(x), with erf) or PyTorch's tanh approximation. */
export function gelu(x: Value, approximate: 'none' | 'tanh' = 'none'): Value {
  if (approximate === 'tanh') {
    const cube = mul(mul(x, x), x);
    const inner = mul(add(x, mul(cube, 0.044715)), Math.sqrt(2 / Math.PI));
    return mul(mul(x, 0.5), add(tanh(inner), 1));
  }
  // x / √2 rather than x · (1/√2): ONNX Runtime fuses this form (Div, Erf, Add, Mul, Mul) into
  // one Gelu kernel and leaves the other as five elementwise passes.
  return mul(mul(x, 0.5), add(erf(div(x, Math.SQRT2)), 1));
}

/** CLIP's QuickGELU: x · σ(1.702 x). */
export function quickGelu(x: Value): Value {
  return mul(x, sigmoid(mul(x, 1.702)));
}

export type Activation =
  | 'silu'
  | 'swish'
  | 'gelu'
  | 'gelu_tanh'
  | 'gelu_pytorch_tanh'
  | 'gelu_new'
  | 'quick_gelu'
  | 'relu';

/** Activations by the names configs use (`hidden_act`, `act_fn`). */
export function activation(name: Activation | string): (x: Value) => Value {
  switch (name) {
    case 'silu':
    case 'swish':
      return silu;
    case 'gelu':
      return (x) => gelu(x);
    case 'gelu_tanh':
    case 'gelu_pytorch_tanh':
    case 'gelu_new':
      return (x) => gelu(x, 'tanh');
    case 'quick_gelu':
      return quickGelu;
    case 'relu':
      return relu;
    default:
      // Read from a model's config: the user's file, not gesso's bug.
      throw new UserError(
        'unsupported-model',
        `gesso does not support the activation '${name}' (a config's hidden_act or act_fn); it knows silu, gelu, gelu_tanh, quick_gelu and relu`,
      );
  }
}
