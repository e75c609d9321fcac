import { UserError } from '../errors.js';
import type { Value } from '../graph/ir.js';
import * as op from '../graph/ops.js';
import { activation } from '../nn/activations.js';
import { scaledDotProductAttention } from '../nn/attention.js';
import { Conv2d } from '../nn/conv.js';
import { Embedding } from '../nn/embedding.js';
import { Linear } from '../nn/linear.js';
import { Module, type ParameterSource } from '../nn/module.js';
import { LayerNorm } from '../nn/norm.js';
import { Tensor } from '../tensor/tensor.js';

/**
 * transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`: token and position embeddings,
 * pre-norm transformer layers with a causal mask, a final layer norm, the pooled state at the
 * first end-of-text token, and (with projection) `text_projection` of the pooled state.
 */

export interface ClipTextConfig {
  readonly vocabSize: number;
  readonly hiddenSize: number;
  readonly intermediateSize: number;
  readonly numHiddenLayers: number;
  readonly numAttentionHeads: number;
  readonly maxPositionEmbeddings: number;
  readonly hiddenAct: string;
  readonly layerNormEps: number;
  readonly eosTokenId: number;
  /**
   * Pool at the largest id instead of the first `eosTokenId`: transformers' rule for configs of
   * the first CLIP ports, which carry eos_token_id 2 while CLIP's end-of-text is its largest id.
   * Not for gesso's own encoders, whose `<eos>` really is id 2 (the largest id there is a word).
   */
  readonly eosAtLargestId: boolean;
  /** Width of `text_projection` (CLIPTextModelWithProjection), or undefined for none. */
  readonly projectionDim: number | undefined;
  /**
   * Causal self-attention, as CLIP; gesso's own text encoders are bidirectional (config key
   * `causal: false`).
   */
  readonly causal: boolean;
  /**
   * The spread of the word embeddings when training from scratch (gesso key
   * `gesso_token_embedding_std`; CLIP's 0.02 by default). At 0.02 the words are a small part of
   * what the layers put out, and a shapes encoder trained jointly with its UNet kept only colour
   * words apart; at 1, in 1000 steps on single-object captions, it kept place words apart and 29
   * of 72 objects landed in the named ninth of the image (6 of 72 at 0.02).
   */
  readonly tokenEmbeddingStd: number;
  /**
   * The spread of the position embeddings when training from scratch (gesso key
   * `gesso_position_embedding_std`; 0.02 by default, as CLIP). Words started at 1 and positions at
   * 0.02 leave the positions a tenth of the state after training, so a bidirectional encoder
   * reads the caption as a bag of words: "a red circle and a blue square" and "a blue circle and
   * a red square" gave the same state at each shape word (cosine 1.000), and nothing the UNet
   * sees tells which colour goes with which shape. Start both at one spread.
   */
  readonly positionEmbeddingStd: number;
  /**
   * Width of a learned window over neighbouring words added to each word's embedding before the
   * first layer (gesso key `gesso_token_mixing`, an odd number of tokens; 1, the default, adds
   * none). Trained jointly with a UNet, a shapes encoder left every shape word's state the same
   * whichever colour stood before it (cosine 0.998 and above), with its positions started at 0.02
   * or at 1; a window of 5 puts "red" into the state of the "circle" after it (0.87 to 0.95 after
   * 6000 steps).
   */
  readonly tokenMixing: number;
}

function num(config: Record<string, unknown>, key: string, fallback?: number): number {
  const v = config[key];
  if (typeof v === 'number') return v;
  if (fallback !== undefined) return fallback;
  throw new UserError('bad-config', `text encoder config.json has no numeric '${key}'`);
}

function positive(config: Record<string, unknown>, key: string, fallback: number): number {
  const v = num(config, key, fallback);
  if (!(v > 0))
    throw new UserError('bad-config', `text encoder config: '${key}' must be above 0 (got ${v})`);
  return v;
}

/** Reads a transformers `config.json` of a CLIP text model. */
export function clipTextConfig(config: Record<string, unknown>): ClipTextConfig {
  const architectures = Array.isArray(config.architectures)
    ? (config.architectures as unknown[])
    : [];
  const withProjection = architectures.includes('CLIPTextModelWithProjection');
  return {
    vocabSize: num(config, 'vocab_size', 49408),
    hiddenSize: num(config, 'hidden_size'),
    intermediateSize: num(config, 'intermediate_size'),
    numHiddenLayers: num(config, 'num_hidden_layers'),
    numAttentionHeads: num(config, 'num_attention_heads'),
    maxPositionEmbeddings: num(config, 'max_position_embeddings', 77),
    hiddenAct: typeof config.hidden_act === 'string' ? config.hidden_act : 'quick_gelu',
    layerNormEps: num(config, 'layer_norm_eps', 1e-5),
    eosTokenId: num(config, 'eos_token_id', 2),
    eosAtLargestId:
      num(config, 'eos_token_id', 2) === 2 && !architectures.includes('GessoTextModel'),
    projectionDim: withProjection ? num(config, 'projection_dim') : undefined,
    causal: config.causal !== false,
    tokenEmbeddingStd: positive(config, 'gesso_token_embedding_std', 0.02),
    positionEmbeddingStd: positive(config, 'gesso_position_embedding_std', 0.02),
    tokenMixing: oddWindow(config, 'gesso_token_mixing'),
  };
}

function oddWindow(config: Record<string, unknown>, key: string): number {
  const v = num(config, key, 1);
  if (!Number.isInteger(v) || v < 1 || v % 2 === 0)
    throw new UserError(
      'bad-config',
      `text encoder config: '${key}' must be an odd whole number of tokens, 1 for none (got ${v})`,
    );
  return v;
}

class ClipAttention extends Module {
  readonly heads: number;
  private readonly q: Linear;
  private readonly k: Linear;
  private readonly v: Linear;
  private readonly out: Linear;

  constructor(width: number, heads: number) {
    super();
    this.heads = heads;
    this.q = this.addModule('q_proj', new Linear(width, width));
    this.k = this.addModule('k_proj', new Linear(width, width));
    this.v = this.addModule('v_proj', new Linear(width, width));
    this.out = this.addModule('out_proj', new Linear(width, width));
  }

  forward(p: ParameterSource, x: Value, mask: Value | undefined): Value {
    return this.scoped(p, () => {
      const attended = scaledDotProductAttention(
        this.q.forward(p, x),
        this.k.forward(p, x),
        this.v.forward(p, x),
        this.heads,
        mask === undefined ? {} : { bias: mask },
      );
      return this.out.forward(p, attended);
    });
  }
}

class ClipMlp extends Module {
  private readonly fc1: Linear;
  private readonly fc2: Linear;
  private readonly act: (x: Value) => Value;

  constructor(width: number, inner: number, act: string) {
    super();
    this.fc1 = this.addModule('fc1', new Linear(width, inner));
    this.fc2 = this.addModule('fc2', new Linear(inner, width));
    this.act = activation(act);
  }

  forward(p: ParameterSource, x: Value): Value {
    return this.scoped(p, () => this.fc2.forward(p, this.act(this.fc1.forward(p, x))));
  }
}

class ClipEncoderLayer extends Module {
  private readonly attention: ClipAttention;
  private readonly norm1: LayerNorm;
  private readonly mlp: ClipMlp;
  private readonly norm2: LayerNorm;

  constructor(c: ClipTextConfig) {
    super();
    this.attention = this.addModule(
      'self_attn',
      new ClipAttention(c.hiddenSize, c.numAttentionHeads),
    );
    this.norm1 = this.addModule('layer_norm1', new LayerNorm(c.hiddenSize, c.layerNormEps));
    this.mlp = this.addModule('mlp', new ClipMlp(c.hiddenSize, c.intermediateSize, c.hiddenAct));
    this.norm2 = this.addModule('layer_norm2', new LayerNorm(c.hiddenSize, c.layerNormEps));
  }

  forward(p: ParameterSource, x: Value, mask: Value | undefined): Value {
    const h = op.add(x, this.attention.forward(p, this.norm1.forward(p, x), mask));
    return op.add(h, this.mlp.forward(p, this.norm2.forward(p, h)));
  }
}

class ClipEmbeddings extends Module {
  private readonly token: Embedding;
  private readonly position: Embedding;
  private readonly mixing: Conv2d | undefined;

  constructor(c: ClipTextConfig) {
    super();
    this.token = this.addModule(
      'token_embedding',
      new Embedding(c.vocabSize, c.hiddenSize, c.tokenEmbeddingStd),
    );
    this.position = this.addModule(
      'position_embedding',
      new Embedding(c.maxPositionEmbeddings, c.hiddenSize, c.positionEmbeddingStd),
    );
    // A 1 × window convolution along the caption, its channels the hidden state; no bias, which
    // would add the same vector to every word.
    this.mixing =
      c.tokenMixing > 1
        ? this.addModule(
            'token_mixing',
            new Conv2d(c.hiddenSize, c.hiddenSize, [1, c.tokenMixing], {
              padding: [0, (c.tokenMixing - 1) / 2],
              bias: false,
            }),
          )
        : undefined;
  }

  forward(p: ParameterSource, ids: Value): Value {
    const length = Number(ids.shape[1]);
    const positions = p.graph.constant(
      Tensor.int64(
        [length],
        Array.from({ length }, (_, i) => i),
      ),
    );
    const embedded = op.add(this.token.forward(p, ids), this.position.forward(p, positions));
    if (this.mixing === undefined) return embedded;
    return this.scoped(p, () => {
      // [B, S, hidden] as an image [B, hidden, 1, S], and back.
      const image = op.unsqueeze(op.transpose(embedded, [0, 2, 1]), [2]);
      const mixed = op.transpose(op.squeeze(this.mixing!.forward(p, image), [2]), [0, 2, 1]);
      return op.add(embedded, mixed);
    });
  }
}

class ClipEncoder extends Module {
  readonly layers: ClipEncoderLayer[];

  constructor(c: ClipTextConfig) {
    super();
    this.layers = this.addModuleList(
      'layers',
      Array.from({ length: c.numHiddenLayers }, () => new ClipEncoderLayer(c)),
    );
  }
}

class ClipTextTransformer extends Module {
  readonly embeddings: ClipEmbeddings;
  readonly encoder: ClipEncoder;
  readonly finalLayerNorm: LayerNorm;

  constructor(c: ClipTextConfig) {
    super();
    this.embeddings = this.addModule('embeddings', new ClipEmbeddings(c));
    this.encoder = this.addModule('encoder', new ClipEncoder(c));
    this.finalLayerNorm = this.addModule(
      'final_layer_norm',
      new LayerNorm(c.hiddenSize, c.layerNormEps),
    );
  }
}

export interface ClipTextOutputs {
  /** The final layer norm of the last layer's output: [B, S, hidden]. */
  readonly lastHiddenState: Value;
  /** The last hidden state at each sequence's first end-of-text token: [B, hidden]. */
  readonly pooled: Value;
  /** `text_projection(pooled)` for CLIPTextModelWithProjection: [B, projection]. */
  readonly textEmbeds: Value | undefined;
  /** The embeddings, then every layer's output (before the final norm): numHiddenLayers + 1. */
  readonly hiddenStates: readonly Value[];
  /** The final layer norm applied to any hidden state (for clip skip). */
  readonly finalNorm: (x: Value) => Value;
}

export class ClipTextModel extends Module {
  readonly config: ClipTextConfig;
  readonly textModel: ClipTextTransformer;
  private readonly projection: Linear | undefined;

  constructor(config: ClipTextConfig) {
    super();
    this.config = config;
    this.textModel = this.addModule('text_model', new ClipTextTransformer(config));
    this.projection =
      config.projectionDim === undefined
        ? undefined
        : this.addModule(
            'text_projection',
            new Linear(config.hiddenSize, config.projectionDim, false),
          );
  }

  /** Checkpoints of older transformers versions also store this buffer; it is not a weight. */
  static isIgnorableKey(key: string): boolean {
    return key === 'text_model.embeddings.position_ids';
  }

  /** `ids`: int64 [batch, sequence] token ids. */
  forward(p: ParameterSource, ids: Value): ClipTextOutputs {
    const g = p.graph;
    const length = Number(ids.shape[1]);
    if (!Number.isInteger(length) || length > this.config.maxPositionEmbeddings) {
      throw new Error(
        `text encoder input needs a static sequence length of at most ${this.config.maxPositionEmbeddings}`,
      );
    }
    // CLIP attends causally; gesso's own encoders (`causal: false`) see the whole caption.
    let mask: Value | undefined;
    if (this.config.causal) {
      const causal = new Tensor('float32', [1, 1, length, length]);
      for (let i = 0; i < length; i++)
        for (let j = i + 1; j < length; j++) causal.data[i * length + j] = -Infinity;
      mask = g.constant(causal, 'causal_mask');
    }

    const tm = this.textModel;
    let h = tm.embeddings.forward(p, ids);
    const hiddenStates = [h];
    for (const layer of tm.encoder.layers) {
      h = layer.forward(p, h, mask);
      hiddenStates.push(h);
    }
    const finalNorm = (x: Value) => tm.finalLayerNorm.forward(p, x);
    const lastHiddenState = finalNorm(h);

    // Position of the end-of-text token: its first occurrence (or the largest id, see config).
    const eosPosition = this.config.eosAtLargestId
      ? op.argMax(ids, 1)
      : op.argMax(op.cast(op.equal(ids, this.config.eosTokenId), 'int32'), 1);
    const range = g.constant(
      Tensor.int64(
        [1, length],
        Array.from({ length }, (_, i) => i),
      ),
    );
    const oneHot = op.cast(op.equal(range, op.unsqueeze(eosPosition, [1])), 'float32');
    const pooled = op.reduceSum(op.mul(lastHiddenState, op.unsqueeze(oneHot, [2])), [1], false);
    const textEmbeds = this.projection?.forward(p, pooled);
    return { lastHiddenState, pooled, textEmbeds, hiddenStates, finalNorm };
  }
}
