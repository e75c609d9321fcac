import type { Value } from '../graph/ir.js';
import {
  add,
  div,
  matmul,
  mul,
  multiHeadAttention,
  reshape,
  reshapeLike,
  softmax,
  transpose,
} from '../graph/ops.js';
import { Linear } from './linear.js';
import { Module, type ParameterSource } from './module.js';
import { GroupNorm } from './norm.js';

export interface AttentionOptions {
  /** Additive bias on the scores, broadcastable to [batch, heads, queries, keys] (masks use -inf). */
  readonly bias?: Value;
  /** Multiplies QKᵀ; default 1/√(head dim). */
  readonly scale?: number;
  /**
   * Use ONNX Runtime's fused `com.microsoft.MultiHeadAttention` kernel instead of plain
   * MatMul/Softmax ops. Same result to float rounding; faster on CPU.
   */
  readonly fused?: boolean;
}

/**
 * softmax(Q Kᵀ · scale + bias) V over `heads` heads, on projected q [B, S, H·Dk],
 * k [B, L, H·Dk], v [B, L, H·Dv]; returns [B, S, H·Dv].
 */
export function scaledDotProductAttention(
  q: Value,
  k: Value,
  v: Value,
  heads: number,
  options: AttentionOptions = {},
): Value {
  const headDim = Number(q.shape[2]) / heads;
  const valueDim = Number(v.shape[2]) / heads;
  if (!Number.isInteger(headDim) || !Number.isInteger(valueDim)) {
    throw new Error(
      `attention: widths ${String(q.shape[2])}/${String(v.shape[2])} do not split into ${heads} heads`,
    );
  }
  const scale = options.scale ?? 1 / Math.sqrt(headDim);
  if (options.fused === true && options.bias === undefined) {
    return multiHeadAttention(q, k, v, heads, scale);
  }
  // Scaling q (not the scores) costs S·D multiplications instead of S·L.
  const qh = transpose(reshape(mul(q, scale), [0, 0, heads, headDim]), [0, 2, 1, 3]);
  const kh = transpose(reshape(k, [0, 0, heads, headDim]), [0, 2, 3, 1]);
  const vh = transpose(reshape(v, [0, 0, heads, valueDim]), [0, 2, 1, 3]);
  let scores = matmul(qh, kh);
  if (options.bias !== undefined) scores = add(scores, options.bias);
  const out = matmul(softmax(scores, -1), vh);
  return reshape(transpose(out, [0, 2, 1, 3]), [0, 0, heads * valueDim]);
}

export interface AttentionConfig {
  readonly queryDim: number;
  /** Width of the context for cross-attention; default: self-attention (queryDim). */
  readonly crossAttentionDim?: number;
  readonly heads: number;
  readonly dimHead: number;
  /** Bias on the q/k/v projections (diffusers' `bias`, default false). */
  readonly qkvBias?: boolean;
  /** Bias on the output projection (diffusers' `out_bias`, default true). */
  readonly outBias?: boolean;
  readonly outDim?: number;
  /** A `group_norm` over channels before attending (the VAE's attention blocks). */
  readonly groupNorm?: { readonly groups: number; readonly eps: number };
  /** Add the input to the output (diffusers' `residual_connection`). */
  readonly residualConnection?: boolean;
  /** Divide the output by this (diffusers' `rescale_output_factor`). */
  readonly rescaleOutputFactor?: number;
  /** Use ONNX Runtime's fused attention kernel (see AttentionOptions.fused). */
  readonly fused?: boolean;
}

/**
 * diffusers' `Attention` module (`to_q`, `to_k`, `to_v`, `to_out.0`, optionally `group_norm`):
 * self-attention, or cross-attention over a context such as text encoder states. Accepts
 * [B, S, C] tokens or a [B, C, H, W] feature map (attended over its H·W positions).
 */
export class Attention extends Module {
  readonly config: AttentionConfig;
  private readonly toQ: Linear;
  private readonly toK: Linear;
  private readonly toV: Linear;
  private readonly toOut: Linear;
  private readonly groupNorm: GroupNorm | undefined;

  constructor(config: AttentionConfig) {
    super();
    this.config = config;
    const inner = config.heads * config.dimHead;
    const context = config.crossAttentionDim ?? config.queryDim;
    const qkvBias = config.qkvBias ?? false;
    this.groupNorm =
      config.groupNorm === undefined
        ? undefined
        : this.addModule(
            'group_norm',
            new GroupNorm(config.groupNorm.groups, config.queryDim, config.groupNorm.eps),
          );
    this.toQ = this.addModule('to_q', new Linear(config.queryDim, inner, qkvBias));
    this.toK = this.addModule('to_k', new Linear(context, inner, qkvBias));
    this.toV = this.addModule('to_v', new Linear(context, inner, qkvBias));
    [this.toOut] = this.addModuleList('to_out', [
      new Linear(inner, config.outDim ?? config.queryDim, config.outBias ?? true),
    ]) as [Linear];
  }

  forward(
    params: ParameterSource,
    input: Value,
    context?: Value,
    options: AttentionOptions = {},
  ): Value {
    return this.scoped(params, () => {
      const spatial = input.rank === 4;
      // [B, C, H, W] -> [B, H·W, C]
      let hidden = spatial ? transpose(reshape(input, [0, 0, -1]), [0, 2, 1]) : input;
      if (this.groupNorm !== undefined) {
        hidden = transpose(this.groupNorm.forward(params, transpose(hidden, [0, 2, 1])), [0, 2, 1]);
      }
      const source = context ?? hidden;
      const q = this.toQ.forward(params, hidden);
      const k = this.toK.forward(params, source);
      const v = this.toV.forward(params, source);
      const attended = scaledDotProductAttention(q, k, v, this.config.heads, {
        fused: this.config.fused,
        ...options,
      });
      let out = this.toOut.forward(params, attended);
      if (spatial) out = reshapeLike(transpose(out, [0, 2, 1]), input);
      if (this.config.residualConnection === true) out = add(out, input);
      const rescale = this.config.rescaleOutputFactor ?? 1;
      return rescale === 1 ? out : div(out, rescale);
    });
  }
}
