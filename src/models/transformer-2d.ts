import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { gelu } from '../nn/activations.js';
import { Attention } from '../nn/attention.js';
import { Conv2d } from '../nn/conv.js';
import { Linear } from '../nn/linear.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { GroupNorm, LayerNorm } from '../nn/norm.js';

/** diffusers' `GEGLU`: proj to 2× width, then value · GELU(gate). */
class GEGLU extends Module {
  private readonly proj: Linear;
  private readonly width: number;

  constructor(dim: number, inner: number) {
    super();
    this.width = inner;
    this.proj = this.addModule('proj', new Linear(dim, inner * 2));
  }

  forward(p: ParameterSource, x: Value): Value {
    return this.scoped(p, () => {
      const [value, gate] = op.split(this.proj.forward(p, x), [this.width, this.width], -1) as [
        Value,
        Value,
      ];
      return op.mul(value, gelu(gate));
    });
  }
}

/** diffusers' `FeedForward` with the GEGLU activation: net.0 (GEGLU), net.2 (Linear). */
class FeedForward extends Module {
  private readonly geglu: GEGLU;
  private readonly out: Linear;

  constructor(dim: number, mult = 4) {
    super();
    const inner = dim * mult;
    const [geglu, , out] = this.addModuleList('net', [
      new GEGLU(dim, inner),
      new Dropout(),
      new Linear(inner, dim),
    ]);
    this.geglu = geglu as GEGLU;
    this.out = out as Linear;
  }

  forward(p: ParameterSource, x: Value): Value {
    return this.scoped(p, () => this.out.forward(p, this.geglu.forward(p, x)));
  }
}

/** A placeholder keeping PyTorch's module indices (net.1 is a parameterless Dropout). */
class Dropout extends Module {}

export interface TransformerBlockConfig {
  readonly dim: number;
  readonly heads: number;
  readonly headDim: number;
  readonly crossAttentionDim: number | undefined;
  readonly onlyCrossAttention?: boolean;
  readonly attentionBias?: boolean;
  readonly normEps?: number;
  readonly fusedAttention?: boolean;
}

/** diffusers' `BasicTransformerBlock` (layer-norm variant): self-attention, cross-attention, GEGLU MLP. */
export class BasicTransformerBlock extends Module {
  private readonly norm1: LayerNorm;
  private readonly attn1: Attention;
  private readonly norm2: LayerNorm | undefined;
  private readonly attn2: Attention | undefined;
  private readonly norm3: LayerNorm;
  private readonly ff: FeedForward;
  private readonly onlyCross: boolean;

  constructor(c: TransformerBlockConfig) {
    super();
    const eps = c.normEps ?? 1e-5;
    const bias = c.attentionBias ?? false;
    this.onlyCross = c.onlyCrossAttention ?? false;
    const attention = (cross: number | undefined) =>
      new Attention({
        queryDim: c.dim,
        crossAttentionDim: cross,
        heads: c.heads,
        dimHead: c.headDim,
        qkvBias: bias,
        fused: c.fusedAttention,
      });
    this.norm1 = this.addModule('norm1', new LayerNorm(c.dim, eps));
    this.attn1 = this.addModule(
      'attn1',
      attention(this.onlyCross ? c.crossAttentionDim : undefined),
    );
    if (c.crossAttentionDim !== undefined) {
      this.norm2 = this.addModule('norm2', new LayerNorm(c.dim, eps));
      this.attn2 = this.addModule('attn2', attention(c.crossAttentionDim));
    }
    this.norm3 = this.addModule('norm3', new LayerNorm(c.dim, eps));
    this.ff = this.addModule('ff', new FeedForward(c.dim));
  }

  forward(p: ParameterSource, x: Value, context: Value | undefined): Value {
    return this.scoped(p, () => {
      let h = op.add(
        this.attn1.forward(p, this.norm1.forward(p, x), this.onlyCross ? context : undefined),
        x,
      );
      if (this.attn2 !== undefined && this.norm2 !== undefined) {
        h = op.add(this.attn2.forward(p, this.norm2.forward(p, h), context), h);
      }
      return op.add(this.ff.forward(p, this.norm3.forward(p, h)), h);
    });
  }
}

export interface Transformer2DConfig {
  readonly heads: number;
  readonly headDim: number;
  readonly inChannels: number;
  readonly layers: number;
  readonly crossAttentionDim: number | undefined;
  readonly normGroups: number;
  readonly useLinearProjection: boolean;
  readonly onlyCrossAttention?: boolean;
  readonly fusedAttention?: boolean;
}

/** diffusers' `Transformer2DModel` on feature maps: norm → proj_in → blocks → proj_out, + input. */
export class Transformer2DModel extends Module {
  private readonly config: Transformer2DConfig;
  private readonly norm: GroupNorm;
  private readonly projIn: Linear | Conv2d;
  private readonly blocks: BasicTransformerBlock[];
  private readonly projOut: Linear | Conv2d;

  constructor(c: Transformer2DConfig) {
    super();
    this.config = c;
    const inner = c.heads * c.headDim;
    if (inner !== c.inChannels) {
      throw new Error(
        `Transformer2DModel: ${c.heads} heads × ${c.headDim} must equal its ${c.inChannels} channels`,
      );
    }
    this.norm = this.addModule('norm', new GroupNorm(c.normGroups, c.inChannels, 1e-6));
    this.projIn = this.addModule(
      'proj_in',
      c.useLinearProjection ? new Linear(c.inChannels, inner) : new Conv2d(c.inChannels, inner, 1),
    );
    this.blocks = this.addModuleList(
      'transformer_blocks',
      Array.from(
        { length: c.layers },
        () =>
          new BasicTransformerBlock({
            dim: inner,
            heads: c.heads,
            headDim: c.headDim,
            crossAttentionDim: c.crossAttentionDim,
            onlyCrossAttention: c.onlyCrossAttention,
            fusedAttention: c.fusedAttention,
          }),
      ),
    );
    this.projOut = this.addModule(
      'proj_out',
      c.useLinearProjection ? new Linear(inner, c.inChannels) : new Conv2d(inner, c.inChannels, 1),
    );
  }

  forward(p: ParameterSource, input: Value, context: Value | undefined): Value {
    return this.scoped(p, () => {
      const tokens = (x: Value) => op.transpose(op.reshape(x, [0, 0, -1]), [0, 2, 1]); // [B,C,H,W] -> [B,HW,C]
      const map = (x: Value) => op.reshapeLike(op.transpose(x, [0, 2, 1]), input); // back to [B,C,H,W]
      const normed = this.norm.forward(p, input);
      let h = this.config.useLinearProjection
        ? this.projIn.forward(p, tokens(normed))
        : tokens(this.projIn.forward(p, normed));
      for (const block of this.blocks) h = block.forward(p, h, context);
      const out = this.config.useLinearProjection
        ? map(this.projOut.forward(p, h))
        : this.projOut.forward(p, map(h));
      return op.add(out, input);
    });
  }
}
