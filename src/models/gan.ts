import { UserError } from '../errors.js';
import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { Attention } from '../nn/attention.js';
import { Conv2d } from '../nn/conv.js';
import { Linear } from '../nn/linear.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { GroupNorm } from '../nn/norm.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * gesso's text-conditioned GAN, after DF-GAN (Tao et al., 2022): a one-stage generator from noise
 * and a sentence embedding, upsampling residual blocks whose activations are modulated channel by
 * channel from [noise, sentence] ("deep fusion"), plus word-level cross-attention as AttnGAN has;
 * and a discriminator that judges image and sentence together. Both work on the image as a grid of
 * p×p patches (pixel shuffle), as gesso's diffusion models do, so most layers run at a quarter of
 * the resolution or less.
 */

export interface GanConfig {
  readonly zDim: number;
  /** Width of the text encoder's states (sentence and words). */
  readonly textDim: number;
  /** Base channel count (DF-GAN's nf). */
  readonly nf: number;
  readonly imageSize: number;
  /** Pixels per side of a patch: the networks see an (imageSize / patchSize)² grid. */
  readonly patchSize: number;
  /** Grid sizes after whose generator block word cross-attention runs. */
  readonly attentionResolutions: readonly number[];
  /**
   * 0: the networks draw and judge RGB pixels (tanh output). Otherwise the channels of an
   * autoencoder's scaled latents, which they draw and judge instead (linear output; imageSize is
   * then the latent side), and the pipeline decodes.
   */
  readonly latentChannels: number;
  /**
   * Generator blocks per grid size: one that doubles the grid, then this many minus one that keep
   * it (DF-GAN: 1). A latent grid is small, so depth comes from here rather than from upsampling.
   */
  readonly blocksPerResolution: number;
  /** How a caption becomes the sentence vector both networks are conditioned on. */
  readonly sentencePooling: SentencePooling;
}

/**
 * `eos`: the text encoder's pooled state at the end-of-text token (DF-GAN with its own encoder).
 * `max`: the largest value of each feature over the caption's tokens, start to end-of-text. A
 * frozen encoder trained for a diffusion model's cross-attention has no reason to gather the
 * caption at one token: the bundled shapes encoder's end-of-text state tells the colour of "a
 * COLOUR SHAPE" captions apart no better than chance (nearest class mean: 6 % right, chance 12.5 %),
 * its max over the tokens 92 % (shape: 90 % and 97 %).
 */
export type SentencePooling = 'eos' | 'max';

export const SENTENCE_POOLINGS: readonly SentencePooling[] = ['eos', 'max'];

/** A config's pooling name, checked (`key` names the field in the error). */
export function sentencePooling(value: unknown, key: string): SentencePooling {
  const found = SENTENCE_POOLINGS.find((p) => p === value);
  if (found === undefined)
    throw new UserError(
      'bad-config',
      `${key} must be one of ${SENTENCE_POOLINGS.join(', ')} (got ${JSON.stringify(value)})`,
    );
  return found;
}

/** The sentence vector [B, D] of encoded captions (states [B, L, D], ids [B, L]). */
export function poolSentence(
  pooling: SentencePooling,
  encoding: { readonly hidden: Tensor<'float32'>; readonly pooled: Tensor<'float32'> },
  ids: Tensor<'int64'>,
  eosId: number,
): Tensor<'float32'> {
  if (pooling === 'eos') return encoding.pooled;
  const [batch, length, width] = encoding.hidden.shape as [number, number, number];
  const out = new Tensor('float32', [batch, width]);
  for (let b = 0; b < batch; b++) {
    let end = length - 1;
    for (let t = 0; t < length; t++) {
      if (Number(ids.data[b * length + t]) === eosId) {
        end = t;
        break;
      }
    }
    const row = out.data.subarray(b * width, (b + 1) * width);
    row.fill(-Infinity);
    for (let t = 0; t <= end; t++) {
      const state = encoding.hidden.data.subarray(
        (b * length + t) * width,
        (b * length + t + 1) * width,
      );
      for (let d = 0; d < width; d++) row[d] = Math.max(row[d]!, state[d]!);
    }
  }
  return out;
}

export function ganConfig(c: Record<string, unknown>): GanConfig {
  const num = (k: string, d: number) => (typeof c[k] === 'number' ? (c[k] as number) : d);
  return {
    zDim: num('z_dim', 100),
    textDim: num('text_dim', 128),
    nf: num('nf', 32),
    imageSize: num('image_size', 64),
    patchSize: num('patch_size', 4),
    attentionResolutions: Array.isArray(c.attention_resolutions)
      ? (c.attention_resolutions as number[])
      : [8, 16],
    latentChannels: num('latent_channels', 0),
    blocksPerResolution: num('blocks_per_resolution', 1),
    sentencePooling: sentencePooling(c.sentence_pooling ?? 'eos', 'sentence_pooling'),
  };
}

/** Channels of what the generator emits and the discriminator reads: RGB or latents. */
function sampleChannels(c: GanConfig): number {
  return c.latentChannels > 0 ? c.latentChannels : 3;
}

/** Side of the grid the networks work on. */
function gridSize(c: GanConfig): number {
  return c.imageSize / c.patchSize;
}

/** Generator channels from the 4×4 start up to the grid: nf·min(2^k, 8), halving as it grows. */
function generatorChannels(c: GanConfig): number[] {
  const blocks = Math.log2(gridSize(c)) - 2;
  return Array.from({ length: blocks + 1 }, (_, i) => c.nf * Math.min(2 ** (blocks + 1 - i), 8));
}

/** DF-GAN's affine: γ and β per channel from the condition (MLPs, γ starting at 1, β at 0). */
class Affine extends Module {
  private readonly gamma1: Linear;
  private readonly gamma2: Linear;
  private readonly beta1: Linear;
  private readonly beta2: Linear;

  constructor(condDim: number, channels: number) {
    super();
    this.gamma1 = this.addModule('fc_gamma_1', new Linear(condDim, condDim));
    this.gamma2 = this.addModule('fc_gamma_2', new FinalLinear(condDim, channels, 1));
    this.beta1 = this.addModule('fc_beta_1', new Linear(condDim, condDim));
    this.beta2 = this.addModule('fc_beta_2', new FinalLinear(condDim, channels, 0));
  }

  forward(p: ParameterSource, x: Value, cond: Value): Value {
    return this.scoped(p, () => {
      const gamma = this.gamma2.forward(p, op.relu(this.gamma1.forward(p, cond)));
      const beta = this.beta2.forward(p, op.relu(this.beta1.forward(p, cond)));
      return op.add(op.mul(x, op.unsqueeze(gamma, [2, 3])), op.unsqueeze(beta, [2, 3]));
    });
  }
}

/** A Linear whose weight starts at zero and bias at `bias` (so γ = 1, β = 0 at first). */
class FinalLinear extends Linear {
  constructor(inFeatures: number, outFeatures: number, bias: number) {
    super(inFeatures, outFeatures, true, {
      weight: { kind: 'constant', value: 0 },
      bias: { kind: 'constant', value: bias },
    });
  }
}

class FusionBlock extends Module {
  private readonly affine0: Affine;
  private readonly affine1: Affine;

  constructor(condDim: number, channels: number) {
    super();
    this.affine0 = this.addModule('affine0', new Affine(condDim, channels));
    this.affine1 = this.addModule('affine1', new Affine(condDim, channels));
  }

  forward(p: ParameterSource, x: Value, cond: Value): Value {
    const h = op.leakyRelu(this.affine0.forward(p, x, cond), 0.2);
    return op.leakyRelu(this.affine1.forward(p, h, cond), 0.2);
  }
}

class GeneratorBlock extends Module {
  private readonly fuse1: FusionBlock;
  private readonly conv1: Conv2d;
  private readonly fuse2: FusionBlock;
  private readonly conv2: Conv2d;
  private readonly shortcut: Conv2d | undefined;

  constructor(
    condDim: number,
    inChannels: number,
    outChannels: number,
    private readonly upsample: boolean,
  ) {
    super();
    this.fuse1 = this.addModule('fuse1', new FusionBlock(condDim, inChannels));
    this.conv1 = this.addModule('c1', new Conv2d(inChannels, outChannels, 3, { padding: 1 }));
    this.fuse2 = this.addModule('fuse2', new FusionBlock(condDim, outChannels));
    this.conv2 = this.addModule('c2', new Conv2d(outChannels, outChannels, 3, { padding: 1 }));
    this.shortcut =
      inChannels !== outChannels
        ? this.addModule('c_sc', new Conv2d(inChannels, outChannels, 1))
        : undefined;
  }

  forward(p: ParameterSource, x: Value, cond: Value): Value {
    return this.scoped(p, () => {
      const up = this.upsample ? op.upsampleNearest(x, [2, 2]) : x;
      const residual = this.conv2.forward(
        p,
        this.fuse2.forward(p, this.conv1.forward(p, this.fuse1.forward(p, up, cond)), cond),
      );
      return op.add(this.shortcut === undefined ? up : this.shortcut.forward(p, up), residual);
    });
  }
}

/** Word cross-attention over a feature map, added back (a residual), as AttnGAN's word attention. */
class WordAttention extends Module {
  private readonly norm: GroupNorm;
  private readonly attention: Attention;

  constructor(channels: number, textDim: number) {
    super();
    this.norm = this.addModule('norm', new GroupNorm(Math.min(8, channels), channels, 1e-6));
    this.attention = this.addModule(
      'attn',
      new Attention({
        queryDim: channels,
        crossAttentionDim: textDim,
        heads: 1,
        dimHead: channels,
      }),
    );
  }

  forward(p: ParameterSource, x: Value, words: Value): Value {
    return this.scoped(p, () =>
      op.add(x, this.attention.forward(p, this.norm.forward(p, x), words)),
    );
  }
}

export class GanGenerator extends Module {
  readonly config: GanConfig;
  private readonly fc: Linear;
  private readonly blocks: GeneratorBlock[];
  private readonly attentions: Map<number, WordAttention>;
  private readonly toRgb: Conv2d;

  constructor(config: GanConfig) {
    super();
    this.config = config;
    const channels = generatorChannels(config);
    const condDim = config.zDim + config.textDim;
    this.fc = this.addModule('fc', new Linear(config.zDim, channels[0]! * 16));
    const perResolution = config.blocksPerResolution;
    this.blocks = this.addModuleList(
      'blocks',
      channels
        .slice(1)
        .flatMap((out, i) =>
          Array.from(
            { length: perResolution },
            (_, k) => new GeneratorBlock(condDim, k === 0 ? channels[i]! : out, out, k === 0),
          ),
        ),
    );
    this.attentions = new Map();
    const list: WordAttention[] = [];
    channels.slice(1).forEach((ch, i) => {
      const resolution = 8 * 2 ** i; // the grid size after the blocks of step i
      if (config.attentionResolutions.includes(resolution)) {
        const a = new WordAttention(ch, config.textDim);
        this.attentions.set((i + 1) * perResolution - 1, a);
        list.push(a);
      }
    });
    this.addModuleList('attentions', list);
    this.toRgb = this.addModule(
      'to_rgb',
      new Conv2d(
        channels[channels.length - 1]!,
        sampleChannels(config) * config.patchSize ** 2,
        3,
        {
          padding: 1,
        },
      ),
    );
  }

  /**
   * z [B, zDim], sentence [B, textDim], words [B, L, textDim] → image [B, 3, S, S] in (−1, 1), or
   * scaled latents [B, C, S, S] for a latent GAN.
   */
  forward(p: ParameterSource, z: Value, sentence: Value, words: Value): Value {
    const channels = generatorChannels(this.config);
    const cond = op.concat([z, sentence], 1);
    let h = op.reshape(this.fc.forward(p, z), [-1, channels[0]!, 4, 4]);
    this.blocks.forEach((block, i) => {
      h = block.forward(p, h, cond);
      const attention = this.attentions.get(i);
      if (attention !== undefined) h = attention.forward(p, h, words);
    });
    const out = op.depthToSpace(this.toRgb.forward(p, op.leakyRelu(h, 0.2)), this.config.patchSize);
    return this.config.latentChannels > 0 ? out : op.tanh(out);
  }
}

class DiscriminatorBlock extends Module {
  private readonly conv1: Conv2d;
  private readonly conv2: Conv2d;
  private readonly shortcut: Conv2d | undefined;

  constructor(inChannels: number, outChannels: number) {
    super();
    this.conv1 = this.addModule(
      'conv_r1',
      new Conv2d(inChannels, outChannels, 4, { stride: 2, padding: 1, bias: false }),
    );
    this.conv2 = this.addModule(
      'conv_r2',
      new Conv2d(outChannels, outChannels, 3, { padding: 1, bias: false }),
    );
    this.shortcut =
      inChannels !== outChannels
        ? this.addModule('conv_s', new Conv2d(inChannels, outChannels, 1))
        : undefined;
    // DF-GAN scales the residual branch by a learned γ that starts at zero.
    this.addParameter('gamma', [1]);
  }

  forward(p: ParameterSource, x: Value): Value {
    return this.scoped(p, () => {
      const r = op.leakyRelu(
        this.conv2.forward(p, op.leakyRelu(this.conv1.forward(p, x), 0.2)),
        0.2,
      );
      const s = op.averagePool(this.shortcut === undefined ? x : this.shortcut.forward(p, x), {
        kernel: [2, 2],
      });
      return op.add(s, op.mul(r, this.param(p, 'gamma')));
    });
  }
}

export class GanDiscriminator extends Module {
  readonly config: GanConfig;
  private readonly convImage: Conv2d;
  private readonly blocks: DiscriminatorBlock[];
  private readonly joint1: Conv2d;
  private readonly joint2: Conv2d;

  constructor(config: GanConfig) {
    super();
    this.config = config;
    const count = Math.log2(gridSize(config)) - 2;
    const widths = Array.from(
      { length: count + 1 },
      (_, i) => config.nf * Math.min(2 ** (i + 1), 8),
    );
    this.convImage = this.addModule(
      'conv_img',
      new Conv2d(sampleChannels(config) * config.patchSize ** 2, widths[0]!, 3, { padding: 1 }),
    );
    this.blocks = this.addModuleList(
      'blocks',
      widths.slice(1).map((w, i) => new DiscriminatorBlock(widths[i]!, w)),
    );
    const top = widths[widths.length - 1]!;
    this.joint1 = this.addModule(
      'joint_conv1',
      new Conv2d(top + config.textDim, config.nf * 2, 3, { padding: 1, bias: false }),
    );
    this.joint2 = this.addModule('joint_conv2', new Conv2d(config.nf * 2, 1, 4));
  }

  /** Image features at 4×4. */
  features(p: ParameterSource, image: Value): Value {
    let h = this.convImage.forward(p, op.spaceToDepth(image, this.config.patchSize));
    for (const block of this.blocks) h = block.forward(p, h);
    return h;
  }

  /** DF-GAN's conditional head: the sentence tiled over the 4×4 features, two convs, one logit [B]. */
  logit(p: ParameterSource, features: Value, sentence: Value): Value {
    return this.scoped(p, () => {
      const tiled = op.expand(op.unsqueeze(sentence, [2, 3]), [1, 1, 4, 4]);
      const h = op.leakyRelu(this.joint1.forward(p, op.concat([features, tiled], 1)), 0.2);
      return op.reshape(this.joint2.forward(p, h), [-1]);
    });
  }
}
