import { UserError } from '../errors.js';
import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { activation } from '../nn/activations.js';
import { Conv2d } from '../nn/conv.js';
import { Linear } from '../nn/linear.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { GroupNorm } from '../nn/norm.js';
import { TimestepEmbedding, timestepEmbedding } from './embeddings.js';
import { UNetDownBlock, UNetMidBlock, UNetUpBlock, type BlockConfig } from './unet-blocks.js';

/**
 * diffusers' `UNet2DConditionModel`, built from its `config.json`: the Stable Diffusion 1.x/2.x,
 * SDXL (text_time added conditioning) and LCM (timestep_cond) denoisers.
 */

export interface UNetConfig {
  readonly inChannels: number;
  readonly outChannels: number;
  readonly centerInputSample: boolean;
  readonly flipSinToCos: boolean;
  readonly freqShift: number;
  readonly downBlockTypes: readonly string[];
  readonly midBlockType: string | null;
  readonly upBlockTypes: readonly string[];
  readonly onlyCrossAttention: readonly boolean[];
  readonly blockOutChannels: readonly number[];
  readonly layersPerBlock: readonly number[];
  readonly downsamplePadding: number;
  readonly midBlockScaleFactor: number;
  readonly actFn: string;
  readonly normNumGroups: number;
  readonly normEps: number;
  readonly crossAttentionDim: readonly number[];
  readonly transformerLayersPerBlock: readonly number[];
  /** Heads per block (diffusers reads `attention_head_dim` as the head count when `num_attention_heads` is unset). */
  readonly numAttentionHeads: readonly number[];
  readonly useLinearProjection: boolean;
  readonly resnetTimeScaleShift: 'default' | 'scale_shift';
  readonly timeEmbeddingDim: number | null;
  readonly timeEmbeddingActFn: string | null;
  readonly timestepPostAct: string | null;
  readonly timeCondProjDim: number | null;
  readonly convInKernel: number;
  readonly convOutKernel: number;
  readonly additionEmbedType: 'text_time' | null;
  readonly additionTimeEmbedDim: number | null;
  readonly projectionClassEmbeddingsInputDim: number | null;
  readonly sampleSize: number | null;
  /**
   * gesso's own models only (`gesso_position_embedding`): a learned embedding of each latent
   * cell, sample_size × sample_size, added after conv_in. Attention has no sense of place and
   * zero padding gives little on pure noise; this states each cell's place outright. (It did not
   * make the shapes models follow position words: cross-attention still had to learn which cells
   * a word is about.)
   */
  readonly positionEmbedding: boolean;
  /**
   * gesso's own models only (`gesso_text_layout`): a linear map from the mean of the text states
   * to a C × sample_size × sample_size feature map added after conv_in (zero at the start). A
   * caption's words reach a place in the image through one learned product instead of through
   * cross-attention's query–key match, which a model trained from scratch did not learn for place
   * words: on captions that differed only in the place, 400 steps placed 70 of 72 objects in the
   * named ninth of the image with this map and 10 of 72 (chance) without it. On the whole shapes
   * world it has not helped yet: there the jointly trained text encoder's mean state (most of its
   * positions are padding) hardly varies with the place words, so the map has little to read
   * (unless the word embeddings start wider: ClipTextConfig.tokenEmbeddingStd).
   */
  readonly textLayout: boolean;
  /**
   * gesso's own models only (`gesso_patch_size`, default 1): the UNet works on p×p patches of
   * the latents, each folded into channels on the way in (SpaceToDepth) and unfolded on the way
   * out, as DiT patchifies. A fine latent grid keeps the autoencoder's detail while the UNet runs
   * on a coarse one, where its levels and attention span the whole scene. The latents' sides must
   * be multiples of p; sample_size stays in latents.
   */
  readonly patchSize: number;
}

type Json = Record<string, unknown>;

function perBlock<T>(value: unknown, count: number, key: string, fallback: T): T[] {
  if (value === undefined || value === null) return new Array<T>(count).fill(fallback);
  if (Array.isArray(value)) {
    if (value.length !== count) {
      throw new UserError(
        'bad-config',
        `unet config '${key}' has ${value.length} entries for ${count} blocks`,
      );
    }
    return value as T[];
  }
  return new Array<T>(count).fill(value as T);
}

const DOWN = new Set(['DownBlock2D', 'CrossAttnDownBlock2D']);
const UP = new Set(['UpBlock2D', 'CrossAttnUpBlock2D']);

export function unetConfig(c: Json): UNetConfig {
  const unsupported = (key: string, allowed: readonly unknown[]) => {
    const v = c[key];
    if (v !== undefined && !allowed.includes(v)) {
      throw new UserError(
        'unsupported-model',
        `gesso does not support UNet config ${key} = ${JSON.stringify(v)}`,
      );
    }
  };
  unsupported('time_embedding_type', ['positional']);
  unsupported('class_embed_type', [null]);
  unsupported('addition_embed_type', [null, 'text_time']);
  unsupported('encoder_hid_dim_type', [null]);
  unsupported('dual_cross_attention', [false]);
  unsupported('attention_type', ['default']);
  unsupported('mid_block_type', ['UNetMidBlock2DCrossAttn', null]);
  unsupported('cross_attention_norm', [null]);
  unsupported('resnet_skip_time_act', [false]);
  unsupported('resnet_out_scale_factor', [1, 1.0]);
  unsupported('class_embeddings_concat', [false]);
  // Each of these adds a layer or an input the model would need (diffusers: a class embedding
  // fed by class_labels, a projection of encoder_hidden_states, per-layer transformer depths in
  // the up blocks, other resnet conditionings); read as absent, the model would run wrong.
  unsupported('num_class_embeds', [null]);
  unsupported('encoder_hid_dim', [null]);
  unsupported('reverse_transformer_layers_per_block', [null]);
  unsupported('resnet_time_scale_shift', ['default', 'scale_shift']);

  const down = (c.down_block_types as string[] | undefined) ?? [
    'CrossAttnDownBlock2D',
    'CrossAttnDownBlock2D',
    'CrossAttnDownBlock2D',
    'DownBlock2D',
  ];
  const up = (c.up_block_types as string[] | undefined) ?? [
    'UpBlock2D',
    'CrossAttnUpBlock2D',
    'CrossAttnUpBlock2D',
    'CrossAttnUpBlock2D',
  ];
  for (const t of down)
    if (!DOWN.has(t))
      throw new UserError('unsupported-model', `gesso does not support UNet down block '${t}'`);
  for (const t of up)
    if (!UP.has(t))
      throw new UserError('unsupported-model', `gesso does not support UNet up block '${t}'`);
  const n = down.length;
  const blockOut = (c.block_out_channels as number[] | undefined) ?? [320, 640, 1280, 1280];
  if (blockOut.length !== n || up.length !== n) {
    throw new UserError(
      'bad-config',
      'unet config: block_out_channels, down_block_types and up_block_types differ in length',
    );
  }
  const headDim = c.attention_head_dim ?? 8;
  const heads = c.num_attention_heads ?? headDim;
  const num = (key: string, fallback: number): number =>
    typeof c[key] === 'number' ? (c[key] as number) : fallback;
  const optNum = (key: string): number | null =>
    typeof c[key] === 'number' ? (c[key] as number) : null;
  const optStr = (key: string): string | null =>
    typeof c[key] === 'string' ? (c[key] as string) : null;
  const transformerLayers = perBlock<number | number[]>(
    c.transformer_layers_per_block,
    n,
    'transformer_layers_per_block',
    1,
  );
  if (transformerLayers.some((t) => Array.isArray(t))) {
    throw new UserError(
      'unsupported-model',
      'gesso does not support per-layer transformer_layers_per_block lists yet',
    );
  }
  return {
    inChannels: num('in_channels', 4),
    outChannels: num('out_channels', 4),
    centerInputSample: c.center_input_sample === true,
    flipSinToCos: c.flip_sin_to_cos !== false,
    freqShift: num('freq_shift', 0),
    downBlockTypes: down,
    midBlockType: c.mid_block_type === null ? null : 'UNetMidBlock2DCrossAttn',
    upBlockTypes: up,
    onlyCrossAttention: perBlock<boolean>(c.only_cross_attention, n, 'only_cross_attention', false),
    blockOutChannels: blockOut,
    layersPerBlock: perBlock<number>(c.layers_per_block, n, 'layers_per_block', 2),
    downsamplePadding: num('downsample_padding', 1),
    midBlockScaleFactor: num('mid_block_scale_factor', 1),
    actFn: optStr('act_fn') ?? 'silu',
    normNumGroups: num('norm_num_groups', 32),
    normEps: num('norm_eps', 1e-5),
    crossAttentionDim: perBlock<number>(c.cross_attention_dim, n, 'cross_attention_dim', 1280),
    transformerLayersPerBlock: transformerLayers as number[],
    numAttentionHeads: perBlock<number>(heads, n, 'num_attention_heads', 8),
    useLinearProjection: c.use_linear_projection === true,
    resnetTimeScaleShift: c.resnet_time_scale_shift === 'scale_shift' ? 'scale_shift' : 'default',
    timeEmbeddingDim: optNum('time_embedding_dim'),
    timeEmbeddingActFn: optStr('time_embedding_act_fn'),
    timestepPostAct: optStr('timestep_post_act'),
    timeCondProjDim: optNum('time_cond_proj_dim'),
    convInKernel: num('conv_in_kernel', 3),
    convOutKernel: num('conv_out_kernel', 3),
    additionEmbedType: c.addition_embed_type === 'text_time' ? 'text_time' : null,
    additionTimeEmbedDim: optNum('addition_time_embed_dim'),
    projectionClassEmbeddingsInputDim: optNum('projection_class_embeddings_input_dim'),
    sampleSize: optNum('sample_size'),
    positionEmbedding: c.gesso_position_embedding === true,
    textLayout: c.gesso_text_layout === true,
    patchSize: num('gesso_patch_size', 1),
  };
}

export interface UNetInputs {
  /** Noisy latents [B, C, H, W]. */
  readonly sample: Value;
  /** One timestep per batch element, float32 [B]. */
  readonly timestep: Value;
  /** Text states [B, L, cross_attention_dim]. */
  readonly encoderHiddenStates: Value;
  /** SDXL: pooled text embeddings [B, E] and the six size/crop ids [B, 6]. */
  readonly textEmbeds?: Value;
  readonly timeIds?: Value;
  /** LCM: the guidance-scale embedding [B, time_cond_proj_dim]. */
  readonly timestepCond?: Value;
}

export interface UNetBuildOptions {
  /** Use ONNX Runtime's fused attention kernel (default true). */
  readonly fusedAttention?: boolean;
}

export class UNet2DConditionModel extends Module {
  readonly config: UNetConfig;
  private readonly convIn: Conv2d;
  private readonly textLayout: Linear | undefined;
  /** Cells per side of the patch grid the per-cell additions are made on (when there are any). */
  private readonly gridSide: number | undefined;
  private readonly timeEmbedding: TimestepEmbedding;
  private readonly addEmbedding: TimestepEmbedding | undefined;
  private readonly downBlocks: UNetDownBlock[];
  private readonly midBlock: UNetMidBlock | undefined;
  private readonly upBlocks: UNetUpBlock[];
  private readonly convNormOut: GroupNorm;
  private readonly convOut: Conv2d;
  private readonly act: (x: Value) => Value;

  constructor(config: UNetConfig, options: UNetBuildOptions = {}) {
    super();
    this.config = config;
    const c = config;
    const fused = options.fusedAttention ?? true;
    const first = c.blockOutChannels[0]!;
    const timeEmbedDim = c.timeEmbeddingDim ?? first * 4;
    this.act = activation(c.actFn);

    const patch = c.patchSize;
    if (!Number.isInteger(patch) || patch < 1)
      throw new UserError(
        'bad-config',
        `unet config: gesso_patch_size must be a positive integer (got ${patch})`,
      );
    this.convIn = this.addModule(
      'conv_in',
      new Conv2d(c.inChannels * patch ** 2, first, c.convInKernel, {
        padding: (c.convInKernel - 1) / 2,
      }),
    );
    // Both per-cell additions are made on the patch grid of sample_size latents per side.
    if (c.positionEmbedding || c.textLayout) {
      if (c.sampleSize === null || c.sampleSize % patch !== 0)
        throw new UserError(
          'bad-config',
          `unet config: ${c.positionEmbedding ? 'gesso_position_embedding' : 'gesso_text_layout'} needs sample_size (latents per side), a multiple of gesso_patch_size ${patch}`,
        );
      const side = c.sampleSize / patch;
      this.gridSide = side;
      if (c.positionEmbedding) this.addParameter('position_embedding', [1, first, side, side]);
      if (c.textLayout) {
        const zero = { kind: 'constant', value: 0 } as const;
        this.textLayout = this.addModule(
          'text_layout',
          new Linear(c.crossAttentionDim[0]!, first * side ** 2, true, {
            weight: zero,
            bias: zero,
          }),
        );
      }
    }
    this.timeEmbedding = this.addModule(
      'time_embedding',
      new TimestepEmbedding(first, timeEmbedDim, {
        act: c.actFn,
        postAct: c.timestepPostAct,
        condProjDim: c.timeCondProjDim,
      }),
    );
    if (c.additionEmbedType === 'text_time') {
      if (c.projectionClassEmbeddingsInputDim === null || c.additionTimeEmbedDim === null) {
        throw new UserError(
          'bad-config',
          'unet config: text_time conditioning needs projection_class_embeddings_input_dim and addition_time_embed_dim',
        );
      }
      this.addEmbedding = this.addModule(
        'add_embedding',
        new TimestepEmbedding(c.projectionClassEmbeddingsInputDim, timeEmbedDim),
      );
    }

    const base = (i: number): Omit<BlockConfig, 'numLayers' | 'inChannels' | 'outChannels'> => ({
      tembChannels: timeEmbedDim,
      eps: c.normEps,
      act: c.actFn,
      groups: c.normNumGroups,
      timeScaleShift: c.resnetTimeScaleShift,
      heads: c.numAttentionHeads[i]!,
      transformerLayers: new Array<number>(Math.max(...c.layersPerBlock) + 1).fill(
        c.transformerLayersPerBlock[i]!,
      ),
      crossAttentionDim: c.crossAttentionDim[i]!,
      useLinearProjection: c.useLinearProjection,
      onlyCrossAttention: c.onlyCrossAttention[i]!,
      fusedAttention: fused,
    });

    let output = first;
    this.downBlocks = this.addModuleList(
      'down_blocks',
      c.downBlockTypes.map((type, i) => {
        const input = output;
        output = c.blockOutChannels[i]!;
        return new UNetDownBlock(
          {
            ...base(i),
            numLayers: c.layersPerBlock[i]!,
            inChannels: input,
            outChannels: output,
            addDownsample: i < c.downBlockTypes.length - 1,
            downsamplePadding: c.downsamplePadding,
          },
          type === 'CrossAttnDownBlock2D',
        );
      }),
    );

    const last = c.blockOutChannels.length - 1;
    if (c.midBlockType !== null) {
      this.midBlock = this.addModule(
        'mid_block',
        new UNetMidBlock(
          {
            ...base(last),
            numLayers: 1,
            inChannels: c.blockOutChannels[last]!,
            outChannels: c.blockOutChannels[last]!,
            outputScaleFactor: c.midBlockScaleFactor,
          },
          'cross-attention',
        ),
      );
    }

    const reversedOut = [...c.blockOutChannels].reverse();
    const reversedLayers = [...c.layersPerBlock].reverse();
    const reversedIndex = (i: number) => c.blockOutChannels.length - 1 - i;
    output = reversedOut[0]!;
    this.upBlocks = this.addModuleList(
      'up_blocks',
      c.upBlockTypes.map((type, i) => {
        const prev = output;
        output = reversedOut[i]!;
        const input = reversedOut[Math.min(i + 1, reversedOut.length - 1)]!;
        return new UNetUpBlock(
          {
            ...base(reversedIndex(i)),
            numLayers: reversedLayers[i]! + 1,
            inChannels: input,
            outChannels: output,
            prevOutputChannels: prev,
            addUpsample: i < c.upBlockTypes.length - 1,
          },
          type === 'CrossAttnUpBlock2D',
        );
      }),
    );

    this.convNormOut = this.addModule(
      'conv_norm_out',
      new GroupNorm(c.normNumGroups, first, c.normEps),
    );
    this.convOut = this.addModule(
      'conv_out',
      new Conv2d(first, c.outChannels * c.patchSize ** 2, c.convOutKernel, {
        padding: (c.convOutKernel - 1) / 2,
      }),
    );
  }

  /** A per-cell map made on the patch grid, nearest-resized to `sample`'s size when that differs. */
  private atSizeOf(map: Value, sample: Value): Value {
    const size = this.gridSide!;
    return sample.shape[2] === size && sample.shape[3] === size
      ? map
      : op.resizeNearestLike(map, sample);
  }

  forward(p: ParameterSource, inputs: UNetInputs): Value {
    const c = this.config;
    let sample = inputs.sample;
    if (c.centerInputSample) sample = op.sub(op.mul(sample, 2), 1);

    let emb = this.timeEmbedding.forward(
      p,
      timestepEmbedding(inputs.timestep, c.blockOutChannels[0]!, {
        flipSinToCos: c.flipSinToCos,
        downscaleFreqShift: c.freqShift,
      }),
      inputs.timestepCond,
    );
    if (this.addEmbedding !== undefined) {
      if (inputs.textEmbeds === undefined || inputs.timeIds === undefined) {
        throw new Error('this UNet needs text_embeds and time_ids (SDXL added conditioning)');
      }
      const ids = inputs.timeIds;
      const timeEmbeds = op.reshape(
        timestepEmbedding(op.reshape(ids, [-1]), c.additionTimeEmbedDim!, {
          flipSinToCos: c.flipSinToCos,
          downscaleFreqShift: c.freqShift,
        }),
        [-1, Number(ids.shape[1]) * c.additionTimeEmbedDim!],
      );
      emb = op.add(
        emb,
        this.addEmbedding.forward(p, op.concat([inputs.textEmbeds, timeEmbeds], 1)),
      );
    }
    if (c.timeEmbeddingActFn !== null) emb = activation(c.timeEmbeddingActFn)(emb);

    const context = inputs.encoderHiddenStates;
    if (c.patchSize > 1) sample = op.spaceToDepth(sample, c.patchSize);
    sample = this.convIn.forward(p, sample);
    if (c.positionEmbedding)
      sample = op.add(sample, this.atSizeOf(this.param(p, 'position_embedding'), sample));
    if (this.textLayout !== undefined) {
      const size = this.gridSide!;
      const layout = op.reshape(this.textLayout.forward(p, op.reduceMean(context, [1], false)), [
        -1,
        c.blockOutChannels[0]!,
        size,
        size,
      ]);
      sample = op.add(sample, this.atSizeOf(layout, sample));
    }
    const skips: Value[] = [sample];
    for (const block of this.downBlocks) {
      const result = block.forward(p, sample, emb, context);
      sample = result.out;
      skips.push(...result.skips);
    }
    if (this.midBlock !== undefined) sample = this.midBlock.forward(p, sample, emb, context);
    for (const block of this.upBlocks) {
      const own = skips.splice(skips.length - block.layers, block.layers);
      sample = block.forward(p, sample, own, emb, context, skips[skips.length - 1]);
    }
    sample = this.act(this.convNormOut.forward(p, sample));
    sample = this.convOut.forward(p, sample);
    return c.patchSize > 1 ? op.depthToSpace(sample, c.patchSize) : sample;
  }
}
