import type { Graph, Node } from './ir.js';

/**
 * Multiply–accumulate count of a graph with static shapes: the matrix products and convolutions,
 * which are all but a sliver of a diffusion model's arithmetic.
 */
function product(shape: readonly (number | string)[]): number {
  return shape.reduce<number>((n, d) => n * (typeof d === 'number' ? d : Number.NaN), 1);
}

export function nodeMacs(node: Node): number {
  const out = node.outputs[0];
  if (out === undefined) return 0;
  switch (node.op) {
    case 'MatMul': {
      const a = node.inputs[0]!;
      return product(out.shape) * Number(a.shape[a.rank - 1]);
    }
    case 'Gemm': {
      const a = node.inputs[0]!;
      const transA = node.attrs.transA?.kind === 'int' && node.attrs.transA.value === 1;
      return product(out.shape) * Number(transA ? a.shape[0] : a.shape[1]);
    }
    case 'Conv': {
      const w = node.inputs[1]!;
      return product(out.shape) * product(w.shape.slice(1));
    }
    case 'ConvTranspose': {
      const x = node.inputs[0]!;
      const w = node.inputs[1]!;
      return product(x.shape) * product(w.shape.slice(1));
    }
    case 'MultiHeadAttention': {
      const q = node.inputs[0]!;
      const k = node.inputs[1]!;
      // QKᵀ and the weighted sum of V: 2 · B · S · L · width.
      return 2 * product(q.shape) * Number(k.shape[1]);
    }
    default:
      return 0;
  }
}

/** Total MACs; NaN when a counted op has a symbolic dim. */
export function countMacs(graph: Graph): number {
  return graph.nodes.reduce((sum, n) => sum + nodeMacs(n), 0);
}
