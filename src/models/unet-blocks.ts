import { UserError } from '../errors.js';
import type { Value } from '../graph/ir.js';
import { concat } from '../graph/ops.js';
import { Attention } from '../nn/attention.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { Downsample2D, Upsample2D } from '../nn/sampling.js';
import { ResnetBlock2D } from './resnet.js';
import { Transformer2DModel } from './transformer-2d.js';

/**
 * The down, mid and up blocks of diffusers' `unet_2d_blocks.py` that Stable Diffusion UNets and
 * VAEs use, with the same parameter paths.
 */

export interface BlockConfig {
  readonly numLayers: number;
  readonly inChannels: number;
  readonly outChannels: number;
  readonly tembChannels: number | undefined;
  readonly eps: number;
  readonly act: string;
  readonly groups: number;
  readonly timeScaleShift?: 'default' | 'scale_shift';
  readonly outputScaleFactor?: number;
  // Cross-attention blocks only:
  readonly heads?: number;
  readonly transformerLayers?: readonly number[];
  readonly crossAttentionDim?: number;
  readonly useLinearProjection?: boolean;
  readonly onlyCrossAttention?: boolean;
  readonly fusedAttention?: boolean;
  // Down blocks:
  readonly addDownsample?: boolean;
  readonly downsamplePadding?: number;
  // Up blocks:
  readonly prevOutputChannels?: number;
  readonly addUpsample?: boolean;
}

function resnet(c: BlockConfig, inChannels: number, outChannels: number): ResnetBlock2D {
  return new ResnetBlock2D({
    inChannels,
    outChannels,
    tembChannels: c.tembChannels,
    groups: c.groups,
    eps: c.eps,
    act: c.act,
    timeEmbeddingNorm: c.timeScaleShift,
    outputScaleFactor: c.outputScaleFactor,
  });
}

function transformer(c: BlockConfig, channels: number, layer: number): Transformer2DModel {
  const heads = c.heads ?? 1;
  return new Transformer2DModel({
    heads,
    headDim: Math.floor(channels / heads),
    inChannels: channels,
    layers: c.transformerLayers?.[layer] ?? 1,
    crossAttentionDim: c.crossAttentionDim,
    normGroups: c.groups,
    useLinearProjection: c.useLinearProjection ?? false,
    onlyCrossAttention: c.onlyCrossAttention,
    fusedAttention: c.fusedAttention,
  });
}

export interface DownBlock {
  /** Returns the block's output and the states it hands to the up path. */
  forward(
    p: ParameterSource,
    x: Value,
    temb: Value | undefined,
    context: Value | undefined,
  ): { out: Value; skips: Value[] };
}

/** `DownBlock2D` and `CrossAttnDownBlock2D` (with `attentions`), and the VAE's `DownEncoderBlock2D`. */
export class UNetDownBlock extends Module implements DownBlock {
  private readonly resnets: ResnetBlock2D[];
  private readonly attentions: Transformer2DModel[] | undefined;
  private readonly downsampler: Downsample2D | undefined;

  constructor(c: BlockConfig, crossAttention: boolean) {
    super();
    this.resnets = this.addModuleList(
      'resnets',
      Array.from({ length: c.numLayers }, (_, i) =>
        resnet(c, i === 0 ? c.inChannels : c.outChannels, c.outChannels),
      ),
    );
    this.attentions = crossAttention
      ? this.addModuleList(
          'attentions',
          Array.from({ length: c.numLayers }, (_, i) => transformer(c, c.outChannels, i)),
        )
      : undefined;
    this.downsampler =
      c.addDownsample === true
        ? this.addModuleList('downsamplers', [
            new Downsample2D(c.outChannels, { padding: c.downsamplePadding ?? 1 }),
          ])[0]
        : undefined;
  }

  forward(
    p: ParameterSource,
    x: Value,
    temb: Value | undefined,
    context: Value | undefined,
  ): { out: Value; skips: Value[] } {
    return this.scoped(p, () => {
      const skips: Value[] = [];
      let h = x;
      this.resnets.forEach((r, i) => {
        h = r.forward(p, h, temb);
        if (this.attentions !== undefined) h = this.attentions[i]!.forward(p, h, context);
        skips.push(h);
      });
      if (this.downsampler !== undefined) {
        h = this.downsampler.forward(p, h);
        skips.push(h);
      }
      return { out: h, skips };
    });
  }
}

/** `UNetMidBlock2DCrossAttn` (transformers) or the VAE's `UNetMidBlock2D` (spatial self-attention). */
export class UNetMidBlock extends Module {
  private readonly resnets: ResnetBlock2D[];
  private readonly attentions: (Transformer2DModel | Attention)[];

  constructor(
    c: BlockConfig,
    kind: 'cross-attention' | 'self-attention' | 'none',
    attentionHeadDim?: number,
  ) {
    super();
    const layers = kind === 'none' ? 0 : c.numLayers;
    this.resnets = this.addModuleList(
      'resnets',
      Array.from({ length: layers + 1 }, () => resnet(c, c.inChannels, c.inChannels)),
    );
    this.attentions =
      kind === 'none'
        ? []
        : this.addModuleList(
            'attentions',
            Array.from({ length: layers }, (_, i) =>
              kind === 'cross-attention'
                ? transformer(c, c.inChannels, i)
                : new Attention({
                    queryDim: c.inChannels,
                    heads: Math.floor(c.inChannels / (attentionHeadDim ?? c.inChannels)),
                    dimHead: attentionHeadDim ?? c.inChannels,
                    qkvBias: true,
                    groupNorm: { groups: c.groups, eps: c.eps },
                    residualConnection: true,
                    rescaleOutputFactor: c.outputScaleFactor ?? 1,
                    fused: c.fusedAttention,
                  }),
            ),
          );
  }

  forward(
    p: ParameterSource,
    x: Value,
    temb: Value | undefined,
    context: Value | undefined,
  ): Value {
    return this.scoped(p, () => {
      let h = this.resnets[0]!.forward(p, x, temb);
      this.attentions.forEach((a, i) => {
        h = a instanceof Transformer2DModel ? a.forward(p, h, context) : a.forward(p, h);
        h = this.resnets[i + 1]!.forward(p, h, temb);
      });
      return h;
    });
  }
}

/** `UpBlock2D` and `CrossAttnUpBlock2D`: each resnet takes the last skip state concatenated. */
export class UNetUpBlock extends Module {
  private readonly resnets: ResnetBlock2D[];
  private readonly attentions: Transformer2DModel[] | undefined;
  private readonly upsampler: Upsample2D | undefined;
  readonly layers: number;

  constructor(c: BlockConfig, crossAttention: boolean) {
    super();
    this.layers = c.numLayers;
    const prev = c.prevOutputChannels ?? c.outChannels;
    this.resnets = this.addModuleList(
      'resnets',
      Array.from({ length: c.numLayers }, (_, i) => {
        const skipChannels = i === c.numLayers - 1 ? c.inChannels : c.outChannels;
        const resnetIn = i === 0 ? prev : c.outChannels;
        return resnet(c, resnetIn + skipChannels, c.outChannels);
      }),
    );
    this.attentions = crossAttention
      ? this.addModuleList(
          'attentions',
          Array.from({ length: c.numLayers }, (_, i) => transformer(c, c.outChannels, i)),
        )
      : undefined;
    this.upsampler =
      c.addUpsample === true
        ? this.addModuleList('upsamplers', [new Upsample2D(c.outChannels)])[0]
        : undefined;
  }

  /** `skips` are consumed from the end; `nextSkip` sets the upsampled size (or undefined: none). */
  forward(
    p: ParameterSource,
    x: Value,
    skips: Value[],
    temb: Value | undefined,
    context: Value | undefined,
    nextSkip: Value | undefined,
  ): Value {
    return this.scoped(p, () => {
      let h = x;
      this.resnets.forEach((r, i) => {
        const skip = skips.pop();
        if (skip === undefined) throw new Error('up block ran out of skip connections');
        h = r.forward(p, concat([h, skip], 1), temb);
        if (this.attentions !== undefined) h = this.attentions[i]!.forward(p, h, context);
      });
      if (this.upsampler !== undefined) {
        if (nextSkip === undefined)
          throw new Error('an upsampling block needs the next skip connection');
        h = this.upsampler.forward(p, h, nextSkip);
      }
      return h;
    });
  }
}

/** The VAE decoder's `UpDecoderBlock2D`: resnets without time embedding, then ×2 upsampling. */
export class UpDecoderBlock extends Module {
  private readonly resnets: ResnetBlock2D[];
  private readonly upsampler: Upsample2D | undefined;

  constructor(c: BlockConfig) {
    super();
    this.resnets = this.addModuleList(
      'resnets',
      Array.from({ length: c.numLayers }, (_, i) =>
        resnet(c, i === 0 ? c.inChannels : c.outChannels, c.outChannels),
      ),
    );
    this.upsampler =
      c.addUpsample === true
        ? this.addModuleList('upsamplers', [new Upsample2D(c.outChannels)])[0]
        : undefined;
  }

  forward(p: ParameterSource, x: Value): Value {
    return this.scoped(p, () => {
      let h = x;
      for (const r of this.resnets) h = r.forward(p, h, undefined);
      return this.upsampler === undefined ? h : this.upsampler.forward(p, h);
    });
  }
}

export function unsupported(what: string, value: unknown): never {
  throw new UserError(
    'unsupported-model',
    `gesso does not support ${what} ${JSON.stringify(value)} yet`,
  );
}
