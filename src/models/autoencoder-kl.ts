import { UserError } from '../errors.js';
import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { activation } from '../nn/activations.js';
import { Conv2d } from '../nn/conv.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { GroupNorm } from '../nn/norm.js';
import { UNetDownBlock, UNetMidBlock, UpDecoderBlock, type BlockConfig } from './unet-blocks.js';

/**
 * diffusers' `AutoencoderKL`: an encoder to the mean and log-variance of a diagonal Gaussian over
 * latents, and a decoder back to pixels. `scalingFactor` (and `shiftFactor`) map VAE latents to
 * the scale the denoiser was trained on: z = (latent − shift) · scale.
 */

export interface AutoencoderKLConfig {
  readonly inChannels: number;
  readonly outChannels: number;
  readonly blockOutChannels: readonly number[];
  readonly layersPerBlock: number;
  readonly actFn: string;
  readonly latentChannels: number;
  readonly normNumGroups: number;
  readonly scalingFactor: number;
  readonly shiftFactor: number;
  readonly useQuantConv: boolean;
  readonly usePostQuantConv: boolean;
  readonly midBlockAddAttention: boolean;
  /** The image size the VAE was trained at: tiled decoding's tile size. */
  readonly sampleSize: number;
}

export function autoencoderKLConfig(c: Record<string, unknown>): AutoencoderKLConfig {
  const down = (c.down_block_types as string[] | undefined) ?? ['DownEncoderBlock2D'];
  const up = (c.up_block_types as string[] | undefined) ?? ['UpDecoderBlock2D'];
  for (const t of [...down, ...up]) {
    if (t !== 'DownEncoderBlock2D' && t !== 'UpDecoderBlock2D') {
      throw new UserError('unsupported-model', `gesso does not support VAE block '${t}'`);
    }
  }
  // Per-channel latent statistics (Playground v2.5) change how every latent is scaled; gesso
  // scales by scaling_factor and shift_factor alone, so such a VAE would decode wrong colours.
  for (const key of ['latents_mean', 'latents_std'])
    if (c[key] !== undefined && c[key] !== null)
      throw new UserError(
        'unsupported-model',
        `gesso does not support VAE config ${key} (per-channel latent statistics); only scaling_factor and shift_factor`,
      );
  const num = (key: string, fallback: number) =>
    typeof c[key] === 'number' ? (c[key] as number) : fallback;
  const blockOut = (c.block_out_channels as number[] | undefined) ?? [64];
  if (down.length !== blockOut.length || up.length !== blockOut.length) {
    throw new UserError(
      'bad-config',
      'vae config: block_out_channels and the block type lists differ in length',
    );
  }
  return {
    inChannels: num('in_channels', 3),
    outChannels: num('out_channels', 3),
    blockOutChannels: blockOut,
    layersPerBlock: num('layers_per_block', 1),
    actFn: typeof c.act_fn === 'string' ? c.act_fn : 'silu',
    latentChannels: num('latent_channels', 4),
    normNumGroups: num('norm_num_groups', 32),
    scalingFactor: num('scaling_factor', 0.18215),
    shiftFactor: num('shift_factor', 0),
    useQuantConv: c.use_quant_conv !== false,
    usePostQuantConv: c.use_post_quant_conv !== false,
    midBlockAddAttention: c.mid_block_add_attention !== false,
    sampleSize: num('sample_size', 512),
  };
}

function blockBase(
  c: AutoencoderKLConfig,
): Omit<BlockConfig, 'numLayers' | 'inChannels' | 'outChannels'> {
  return { tembChannels: undefined, eps: 1e-6, act: c.actFn, groups: c.normNumGroups };
}

/** The middle of the encoder and of the decoder: at the deepest width, attention if configured. */
function vaeMidBlock(c: AutoencoderKLConfig, channels: number, fused: boolean): UNetMidBlock {
  return new UNetMidBlock(
    {
      ...blockBase(c),
      numLayers: 1,
      inChannels: channels,
      outChannels: channels,
      fusedAttention: fused,
    },
    c.midBlockAddAttention ? 'self-attention' : 'none',
    channels,
  );
}

class Encoder extends Module {
  private readonly convIn: Conv2d;
  private readonly downBlocks: UNetDownBlock[];
  private readonly midBlock: UNetMidBlock;
  private readonly convNormOut: GroupNorm;
  private readonly convOut: Conv2d;
  private readonly act: (x: Value) => Value;

  constructor(c: AutoencoderKLConfig, fused: boolean) {
    super();
    const channels = c.blockOutChannels;
    const last = channels[channels.length - 1]!;
    this.act = activation(c.actFn);
    this.convIn = this.addModule(
      'conv_in',
      new Conv2d(c.inChannels, channels[0]!, 3, { padding: 1 }),
    );
    let output = channels[0]!;
    this.downBlocks = this.addModuleList(
      'down_blocks',
      channels.map((out, i) => {
        const input = output;
        output = out;
        return new UNetDownBlock(
          {
            ...blockBase(c),
            numLayers: c.layersPerBlock,
            inChannels: input,
            outChannels: out,
            addDownsample: i < channels.length - 1,
            downsamplePadding: 0,
          },
          false,
        );
      }),
    );
    this.midBlock = this.addModule('mid_block', vaeMidBlock(c, last, fused));
    this.convNormOut = this.addModule('conv_norm_out', new GroupNorm(c.normNumGroups, last, 1e-6));
    this.convOut = this.addModule(
      'conv_out',
      new Conv2d(last, 2 * c.latentChannels, 3, { padding: 1 }),
    );
  }

  forward(p: ParameterSource, x: Value): Value {
    return this.scoped(p, () => {
      let h = this.convIn.forward(p, x);
      for (const block of this.downBlocks) h = block.forward(p, h, undefined, undefined).out;
      h = this.midBlock.forward(p, h, undefined, undefined);
      return this.convOut.forward(p, this.act(this.convNormOut.forward(p, h)));
    });
  }
}

class Decoder extends Module {
  private readonly convIn: Conv2d;
  private readonly midBlock: UNetMidBlock;
  private readonly upBlocks: UpDecoderBlock[];
  private readonly convNormOut: GroupNorm;
  private readonly convOut: Conv2d;
  private readonly act: (x: Value) => Value;

  constructor(c: AutoencoderKLConfig, fused: boolean) {
    super();
    const reversed = [...c.blockOutChannels].reverse();
    const last = reversed[0]!;
    this.act = activation(c.actFn);
    this.convIn = this.addModule('conv_in', new Conv2d(c.latentChannels, last, 3, { padding: 1 }));
    this.midBlock = this.addModule('mid_block', vaeMidBlock(c, last, fused));
    let output = last;
    this.upBlocks = this.addModuleList(
      'up_blocks',
      reversed.map((out, i) => {
        const input = output;
        output = out;
        return new UpDecoderBlock({
          ...blockBase(c),
          numLayers: c.layersPerBlock + 1,
          inChannels: input,
          outChannels: out,
          addUpsample: i < reversed.length - 1,
        });
      }),
    );
    const first = c.blockOutChannels[0]!;
    this.convNormOut = this.addModule('conv_norm_out', new GroupNorm(c.normNumGroups, first, 1e-6));
    this.convOut = this.addModule('conv_out', new Conv2d(first, c.outChannels, 3, { padding: 1 }));
  }

  forward(p: ParameterSource, z: Value): Value {
    return this.scoped(p, () => {
      let h = this.convIn.forward(p, z);
      h = this.midBlock.forward(p, h, undefined, undefined);
      for (const block of this.upBlocks) h = block.forward(p, h);
      return this.convOut.forward(p, this.act(this.convNormOut.forward(p, h)));
    });
  }
}

export interface LatentDistribution {
  readonly mean: Value;
  /** exp(½ · clamp(logvar, −30, 20)). */
  readonly std: Value;
}

export class AutoencoderKL extends Module {
  readonly config: AutoencoderKLConfig;
  private readonly encoder: Encoder;
  private readonly decoder: Decoder;
  private readonly quantConv: Conv2d | undefined;
  private readonly postQuantConv: Conv2d | undefined;

  constructor(config: AutoencoderKLConfig, options: { fusedAttention?: boolean } = {}) {
    super();
    this.config = config;
    const fused = options.fusedAttention ?? true;
    const latent = config.latentChannels;
    this.encoder = this.addModule('encoder', new Encoder(config, fused));
    this.decoder = this.addModule('decoder', new Decoder(config, fused));
    this.quantConv = config.useQuantConv
      ? this.addModule('quant_conv', new Conv2d(2 * latent, 2 * latent, 1))
      : undefined;
    this.postQuantConv = config.usePostQuantConv
      ? this.addModule('post_quant_conv', new Conv2d(latent, latent, 1))
      : undefined;
  }

  /** Pixels in [−1, 1], [B, 3, H, W] → the latent distribution (unscaled latents). */
  encode(p: ParameterSource, image: Value): LatentDistribution {
    let moments = this.encoder.forward(p, image);
    if (this.quantConv !== undefined) moments = this.quantConv.forward(p, moments);
    const latent = this.config.latentChannels;
    const [mean, logvar] = op.split(moments, [latent, latent], 1) as [Value, Value];
    const std = op.exp(op.mul(op.min(op.max(logvar, -30), 20), 0.5));
    return { mean, std };
  }

  /** Unscaled latents [B, C, h, w] → pixels in about [−1, 1]. */
  decode(p: ParameterSource, latents: Value): Value {
    const z = this.postQuantConv === undefined ? latents : this.postQuantConv.forward(p, latents);
    return this.decoder.forward(p, z);
  }
}
