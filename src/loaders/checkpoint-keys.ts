/**
 * The key names of original (CompVis / Stability) Stable Diffusion checkpoints and their diffusers
 * equivalents, in both directions. One table per component serves reading single files and writing
 * them, so the two directions cannot drift apart.
 *
 * A mapped key may also need its tensor reshaped: `conv1x1` (the VAE's mid-block attention is
 * 1×1 convolutions in the original, linear layers in diffusers), `qkv` (OpenCLIP keeps the query,
 * key and value projections as one [3C, C] matrix; diffusers has three), `transpose` (OpenCLIP's
 * text projection is applied as x·P, a linear layer's weight is Pᵀ).
 */

export type KeyTransform = 'same' | 'conv1x1' | 'qkv' | 'transpose';

/** A diffusers key (or, for `qkv`, the three keys q, k, v) for one original key. */
export interface KeyLink {
  readonly diffusers: readonly string[];
  readonly transform: KeyTransform;
}

const RESNET_UNET: readonly (readonly [string, string])[] = [
  ['in_layers.0', 'norm1'],
  ['in_layers.2', 'conv1'],
  ['emb_layers.1', 'time_emb_proj'],
  ['out_layers.0', 'norm2'],
  ['out_layers.3', 'conv2'],
  ['skip_connection', 'conv_shortcut'],
];

const RESNET_VAE: readonly (readonly [string, string])[] = [['nin_shortcut', 'conv_shortcut']];

const UNET_TOP: readonly (readonly [string, string])[] = [
  ['time_embed.0', 'time_embedding.linear_1'],
  ['time_embed.2', 'time_embedding.linear_2'],
  ['label_emb.0.0', 'add_embedding.linear_1'],
  ['label_emb.0.2', 'add_embedding.linear_2'],
  ['input_blocks.0.0', 'conv_in'],
  ['out.0', 'conv_norm_out'],
  ['out.2', 'conv_out'],
];

/** Replaces a leading dotted prefix `from` by `to` (whole segments only). */
function swapPrefix(key: string, from: string, to: string): string | undefined {
  if (key === from) return to;
  return key.startsWith(`${from}.`) ? `${to}${key.slice(from.length)}` : undefined;
}

/** The first table entry (either direction) whose prefix matches. */
function viaTable(
  key: string,
  table: readonly (readonly [string, string])[],
  forward: boolean,
): string | undefined {
  for (const [original, diffusers] of table) {
    const swapped = forward
      ? swapPrefix(key, original, diffusers)
      : swapPrefix(key, diffusers, original);
    if (swapped !== undefined) return swapped;
  }
  return undefined;
}

function resnetPart(rest: string, table: readonly (readonly [string, string])[], forward: boolean) {
  return viaTable(rest, table, forward) ?? rest;
}

// ---- UNet (original prefix `model.diffusion_model.`) ----

/**
 * An original UNet key (without its prefix) as a diffusers key. `layers` is layers_per_block: the
 * original numbers blocks 1, 2, … through all levels with a downsampler after each level's layers.
 */
export function unetKeyToDiffusers(key: string, layers: number): string | undefined {
  const top = viaTable(key, UNET_TOP, true);
  if (top !== undefined) return top;
  let m = /^input_blocks\.(\d+)\.(\d+)\.(.+)$/.exec(key);
  if (m !== null) {
    const n = Number(m[1]) - 1;
    const level = Math.floor(n / (layers + 1));
    const layer = n % (layers + 1);
    const [part, rest] = [Number(m[2]), m[3]!];
    if (layer === layers) {
      const tail = swapPrefix(rest, 'op', 'conv');
      return tail === undefined ? undefined : `down_blocks.${level}.downsamplers.0.${tail}`;
    }
    return part === 0
      ? `down_blocks.${level}.resnets.${layer}.${resnetPart(rest, RESNET_UNET, true)}`
      : `down_blocks.${level}.attentions.${layer}.${rest}`;
  }
  m = /^middle_block\.(\d)\.(.+)$/.exec(key);
  if (m !== null) {
    const rest = m[2]!;
    if (m[1] === '1') return `mid_block.attentions.0.${rest}`;
    return `mid_block.resnets.${m[1] === '0' ? 0 : 1}.${resnetPart(rest, RESNET_UNET, true)}`;
  }
  m = /^output_blocks\.(\d+)\.(\d+)\.(.+)$/.exec(key);
  if (m !== null) {
    const n = Number(m[1]);
    const level = Math.floor(n / (layers + 1));
    const layer = n % (layers + 1);
    const [part, rest] = [Number(m[2]), m[3]!];
    if (part === 0)
      return `up_blocks.${level}.resnets.${layer}.${resnetPart(rest, RESNET_UNET, true)}`;
    // The upsampler follows the last layer: part 1 without attention, part 2 with it.
    if (rest.startsWith('conv.')) return `up_blocks.${level}.upsamplers.0.${rest}`;
    return `up_blocks.${level}.attentions.${layer}.${rest}`;
  }
  return undefined;
}

/** The inverse of unetKeyToDiffusers; `upAttention[i]` tells whether up block i has attention. */
export function unetKeyToOriginal(
  key: string,
  layers: number,
  upAttention: readonly boolean[],
): string | undefined {
  const top = viaTable(key, UNET_TOP, false);
  if (top !== undefined) return top;
  let m = /^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$/.exec(key);
  if (m !== null) {
    const [level, kind, index, rest] = [Number(m[1]), m[2]!, Number(m[3]), m[4]!];
    if (kind === 'downsamplers') {
      const tail = swapPrefix(rest, 'conv', 'op');
      return tail === undefined
        ? undefined
        : `input_blocks.${(level + 1) * (layers + 1)}.0.${tail}`;
    }
    const block = 1 + level * (layers + 1) + index;
    return kind === 'resnets'
      ? `input_blocks.${block}.0.${resnetPart(rest, RESNET_UNET, false)}`
      : `input_blocks.${block}.1.${rest}`;
  }
  m = /^mid_block\.(resnets|attentions)\.(\d)\.(.+)$/.exec(key);
  if (m !== null) {
    if (m[1] === 'attentions') return `middle_block.1.${m[3]}`;
    return `middle_block.${m[2] === '0' ? 0 : 2}.${resnetPart(m[3]!, RESNET_UNET, false)}`;
  }
  m = /^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$/.exec(key);
  if (m !== null) {
    const [level, kind, index, rest] = [Number(m[1]), m[2]!, Number(m[3]), m[4]!];
    if (kind === 'upsamplers') {
      const part = upAttention[level] === true ? 2 : 1;
      return `output_blocks.${level * (layers + 1) + layers}.${part}.${rest}`;
    }
    const block = level * (layers + 1) + index;
    return kind === 'resnets'
      ? `output_blocks.${block}.0.${resnetPart(rest, RESNET_UNET, false)}`
      : `output_blocks.${block}.1.${rest}`;
  }
  return undefined;
}

// ---- VAE (original prefix `first_stage_model.`) ----

const VAE_ATTENTION: readonly (readonly [string, string])[] = [
  ['norm', 'group_norm'],
  ['q', 'to_q'],
  ['k', 'to_k'],
  ['v', 'to_v'],
  ['proj_out', 'to_out.0'],
];

/** An original VAE key as a diffusers key; `levels` is the number of resolution levels. */
export function vaeKeyToDiffusers(key: string, levels: number): KeyLink | undefined {
  const same = (k: string | undefined): KeyLink | undefined =>
    k === undefined ? undefined : { diffusers: [k], transform: 'same' };
  let m = /^(encoder|decoder)\.norm_out\.(.+)$/.exec(key);
  if (m !== null) return same(`${m[1]}.conv_norm_out.${m[2]}`);
  m = /^encoder\.down\.(\d+)\.(block|downsample)\.(.+)$/.exec(key);
  if (m !== null) {
    if (m[2] === 'downsample') return same(`encoder.down_blocks.${m[1]}.downsamplers.0.${m[3]}`);
    const [j, rest] = m[3]!.split(/\.(.*)/s) as [string, string];
    return same(`encoder.down_blocks.${m[1]}.resnets.${j}.${resnetPart(rest, RESNET_VAE, true)}`);
  }
  m = /^decoder\.up\.(\d+)\.(block|upsample)\.(.+)$/.exec(key);
  if (m !== null) {
    // The original numbers decoder levels from the lowest resolution up; diffusers the reverse.
    const level = levels - 1 - Number(m[1]);
    if (m[2] === 'upsample') return same(`decoder.up_blocks.${level}.upsamplers.0.${m[3]}`);
    const [j, rest] = m[3]!.split(/\.(.*)/s) as [string, string];
    return same(`decoder.up_blocks.${level}.resnets.${j}.${resnetPart(rest, RESNET_VAE, true)}`);
  }
  m = /^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$/.exec(key);
  if (m !== null) {
    if (m[2] !== 'attn_1') {
      const index = m[2] === 'block_1' ? 0 : 1;
      return same(`${m[1]}.mid_block.resnets.${index}.${resnetPart(m[3]!, RESNET_VAE, true)}`);
    }
    const mapped = viaTable(m[3]!, VAE_ATTENTION, true);
    if (mapped === undefined) return undefined;
    const transform =
      mapped.endsWith('.weight') && !mapped.startsWith('group_norm') ? 'conv1x1' : 'same';
    return { diffusers: [`${m[1]}.mid_block.attentions.0.${mapped}`], transform };
  }
  if (/^(encoder|decoder)\.(conv_in|conv_out)\./.test(key) || /^(post_)?quant_conv\./.test(key))
    return same(key);
  return undefined;
}

/** The inverse of vaeKeyToDiffusers. */
export function vaeKeyToOriginal(key: string, levels: number): string | undefined {
  let m = /^(encoder|decoder)\.conv_norm_out\.(.+)$/.exec(key);
  if (m !== null) return `${m[1]}.norm_out.${m[2]}`;
  m = /^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)$/.exec(key);
  if (m !== null) {
    if (m[2] === 'downsamplers') return `encoder.down.${m[1]}.downsample.${m[4]}`;
    return `encoder.down.${m[1]}.block.${m[3]}.${resnetPart(m[4]!, RESNET_VAE, false)}`;
  }
  m = /^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$/.exec(key);
  if (m !== null) {
    const level = levels - 1 - Number(m[1]);
    if (m[2] === 'upsamplers') return `decoder.up.${level}.upsample.${m[4]}`;
    return `decoder.up.${level}.block.${m[3]}.${resnetPart(m[4]!, RESNET_VAE, false)}`;
  }
  m = /^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)$/.exec(key);
  if (m !== null) {
    if (m[2] === 'resnets')
      return `${m[1]}.mid.block_${m[3] === '0' ? 1 : 2}.${resnetPart(m[4]!, RESNET_VAE, false)}`;
    const mapped = viaTable(m[4]!, VAE_ATTENTION, false);
    return mapped === undefined ? undefined : `${m[1]}.mid.attn_1.${mapped}`;
  }
  if (/^(encoder|decoder)\.(conv_in|conv_out)\./.test(key) || /^(post_)?quant_conv\./.test(key))
    return key;
  return undefined;
}

// ---- OpenCLIP text encoders (SD 2.x `cond_stage_model.model.`, SDXL's second encoder) ----

const OPEN_CLIP_LAYER: readonly (readonly [string, string])[] = [
  ['ln_1', 'layer_norm1'],
  ['ln_2', 'layer_norm2'],
  ['mlp.c_fc', 'mlp.fc1'],
  ['mlp.c_proj', 'mlp.fc2'],
  ['attn.out_proj', 'self_attn.out_proj'],
];

/** An OpenCLIP text-model key as diffusers' CLIPTextModel key(s). */
export function openClipKeyToDiffusers(key: string): KeyLink | undefined {
  const same = (k: string): KeyLink => ({ diffusers: [k], transform: 'same' });
  if (key === 'token_embedding.weight') return same('text_model.embeddings.token_embedding.weight');
  if (key === 'positional_embedding')
    return same('text_model.embeddings.position_embedding.weight');
  if (key === 'text_projection')
    return { diffusers: ['text_projection.weight'], transform: 'transpose' };
  const final = swapPrefix(key, 'ln_final', 'text_model.final_layer_norm');
  if (final !== undefined) return same(final);
  const m = /^transformer\.resblocks\.(\d+)\.(.+)$/.exec(key);
  if (m === null) return undefined;
  const layer = `text_model.encoder.layers.${m[1]}`;
  const qkv = /^attn\.in_proj_(weight|bias)$/.exec(m[2]!);
  if (qkv !== null)
    return {
      diffusers: ['q', 'k', 'v'].map((p) => `${layer}.self_attn.${p}_proj.${qkv[1]}`),
      transform: 'qkv',
    };
  const mapped = viaTable(m[2]!, OPEN_CLIP_LAYER, true);
  return mapped === undefined ? undefined : same(`${layer}.${mapped}`);
}

/**
 * The inverse of openClipKeyToDiffusers: the original key a diffusers key belongs to. The q, k and
 * v projections all answer with the one `in_proj` key (the caller joins them).
 */
export function openClipKeyToOriginal(key: string): string | undefined {
  if (key === 'text_model.embeddings.token_embedding.weight') return 'token_embedding.weight';
  if (key === 'text_model.embeddings.position_embedding.weight') return 'positional_embedding';
  if (key === 'text_projection.weight') return 'text_projection';
  const final = swapPrefix(key, 'text_model.final_layer_norm', 'ln_final');
  if (final !== undefined) return final;
  const m = /^text_model\.encoder\.layers\.(\d+)\.(.+)$/.exec(key);
  if (m === null) return undefined;
  const block = `transformer.resblocks.${m[1]}`;
  const qkv = /^self_attn\.[qkv]_proj\.(weight|bias)$/.exec(m[2]!);
  if (qkv !== null) return `${block}.attn.in_proj_${qkv[1]}`;
  const mapped = viaTable(m[2]!, OPEN_CLIP_LAYER, false);
  return mapped === undefined ? undefined : `${block}.${mapped}`;
}
