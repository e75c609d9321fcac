import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import { freemem, totalmem } from 'node:os';
import { basename, dirname, extname, join, relative, resolve, sep } from 'node:path';
import type { Duplex } from 'node:stream';
import multipart from '@fastify/multipart';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import sharp from 'sharp';
import { WebSocketServer, type WebSocket } from 'ws';
import { isUserError } from '../errors.js';
import { listModels } from '../generation/models.js';
import { isOutputImageName } from '../generation/outputs.js';
import { writeFileAtomically } from '../io/atomic.js';
import { decodeImage } from '../io/image.js';
import { Tensor } from '../tensor/tensor.js';
import { takeExtraNetworks } from '../tokenizers/prompt-schedule.js';
import type { Job, JobEvent, JobQueue, JobRequest } from './jobs.js';
import type { ModelManager } from './models.js';

/**
 * ComfyUI's HTTP and WebSocket API (conventions.md §3c) over gesso's job queue, so programs that
 * drive ComfyUI (its websockets_api_example.py and the scripts and bots built like it) drive
 * gesso: a workflow in API form goes to POST /prompt, its progress comes over /ws, its images
 * through /history and /view. gesso runs the graph its pipeline is: one checkpoint, LoRA
 * loaders, CLIPSetLastLayer, positive and negative CLIPTextEncode, an EmptyLatentImage (or an
 * uploaded image through LoadImage and VAEEncode, masked by its transparency for inpainting),
 * one KSampler or KSamplerAdvanced, VAEDecode, and SaveImage or PreviewImage. A node it lacks is
 * refused at submit time as ComfyUI refuses a node that is not installed.
 */

type Link = readonly [string, number];

interface WorkflowNode {
  readonly class_type: string;
  readonly inputs: Readonly<Record<string, unknown>>;
}

type Workflow = Readonly<Record<string, WorkflowNode>>;

type InputSpec =
  | { readonly kind: 'INT'; readonly default: number; readonly min: number; readonly max: number }
  | {
      readonly kind: 'FLOAT';
      readonly default: number;
      readonly min: number;
      readonly max: number;
      readonly step: number;
    }
  | { readonly kind: 'STRING'; readonly default: string; readonly multiline: boolean }
  | { readonly kind: 'COMBO'; readonly options: readonly string[] }
  | { readonly kind: 'LINK'; readonly type: string };

interface NodeDef {
  readonly displayName: string;
  readonly category: string;
  readonly description: string;
  readonly inputs: Readonly<Record<string, InputSpec>>;
  readonly outputs: readonly string[];
  readonly outputNode: boolean;
}

/** ComfyUI's sampler names gesso samples, and the gesso scheduler each is. */
const SAMPLERS: Readonly<Record<string, string>> = {
  euler: 'euler',
  euler_ancestral: 'euler_ancestral',
  heun: 'heun',
  lms: 'lms',
  dpmpp_2m: 'dpmpp_2m',
  dpmpp_2m_sde: 'dpmpp_2m_sde',
  ddim: 'ddim',
  ddpm: 'ddpm',
  uni_pc: 'unipc',
  lcm: 'lcm',
};
/** gesso has Karras sigmas for these. */
const KARRAS = new Set(['euler', 'heun', 'lms', 'dpmpp_2m', 'dpmpp_2m_sde']);
/**
 * ComfyUI's `normal` schedule takes `steps` timesteps evenly from the last to the first
 * (comfy/samplers.py normal_scheduler): the timesteps of diffusers' `linspace` spacing (ComfyUI
 * interpolates log σ between whole timesteps where diffusers interpolates σ, a small difference).
 * `karras` is Karras et al.'s sigmas between the model's extremes, as diffusers' use_karras_sigmas.
 */
const SCHEDULERS = ['normal', 'karras'] as const;

/** The images the input folder holds and /view serves, by extension. */
const IMAGE_TYPES: Readonly<Record<string, string>> = {
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.webp': 'image/webp',
};

/** ComfyUI's seed widget bound is 2^64 − 1; beyond 2^53 a JSON number is not the integer sent. */
const MAX_SEED = Number.MAX_SAFE_INTEGER;

function nodeDefs(
  checkpoints: readonly string[],
  loras: readonly string[],
  inputs: readonly string[],
  limits: { readonly maxSide: number; readonly maxSteps: number },
) {
  const clip = { kind: 'LINK', type: 'CLIP' } as const;
  const model = { kind: 'LINK', type: 'MODEL' } as const;
  const strength = { kind: 'FLOAT', default: 1, min: -100, max: 100, step: 0.01 } as const;
  // The inputs both samplers share, in ComfyUI's order.
  const sampling = {
    steps: { kind: 'INT', default: 20, min: 1, max: limits.maxSteps },
    cfg: { kind: 'FLOAT', default: 8, min: 0, max: 100, step: 0.1 },
    sampler_name: { kind: 'COMBO', options: Object.keys(SAMPLERS) },
    scheduler: { kind: 'COMBO', options: SCHEDULERS },
    positive: { kind: 'LINK', type: 'CONDITIONING' },
    negative: { kind: 'LINK', type: 'CONDITIONING' },
    latent_image: { kind: 'LINK', type: 'LATENT' },
  } as const;
  const defs: Record<string, NodeDef> = {
    CheckpointLoaderSimple: {
      displayName: 'Load Checkpoint',
      category: 'loaders',
      description: 'Loads a model gesso knows (gesso list-models) for the rest of the graph.',
      inputs: { ckpt_name: { kind: 'COMBO', options: checkpoints } },
      outputs: ['MODEL', 'CLIP', 'VAE'],
      outputNode: false,
    },
    LoraLoader: {
      displayName: 'Load LoRA',
      category: 'loaders',
      description: "Merges a LoRA from the server's --lora-dir into the model and text encoder.",
      inputs: {
        model,
        clip,
        lora_name: { kind: 'COMBO', options: loras },
        strength_model: strength,
        strength_clip: strength,
      },
      outputs: ['MODEL', 'CLIP'],
      outputNode: false,
    },
    LoraLoaderModelOnly: {
      displayName: 'LoraLoaderModelOnly',
      category: 'loaders',
      description: "Merges a LoRA from the server's --lora-dir into the model only.",
      inputs: { model, lora_name: { kind: 'COMBO', options: loras }, strength_model: strength },
      outputs: ['MODEL'],
      outputNode: false,
    },
    CLIPSetLastLayer: {
      displayName: 'CLIP Set Last Layer',
      category: 'conditioning',
      description: 'Uses the text encoder up to this layer (-2: clip skip 2).',
      inputs: { clip, stop_at_clip_layer: { kind: 'INT', default: -1, min: -24, max: -1 } },
      outputs: ['CLIP'],
      outputNode: false,
    },
    CLIPTextEncode: {
      displayName: 'CLIP Text Encode (Prompt)',
      category: 'conditioning',
      description: 'The text the image is guided toward (or away from, as negative).',
      inputs: { text: { kind: 'STRING', default: '', multiline: true }, clip },
      outputs: ['CONDITIONING'],
      outputNode: false,
    },
    EmptyLatentImage: {
      displayName: 'Empty Latent Image',
      category: 'latent',
      description: 'The size and number of images to draw.',
      inputs: {
        width: { kind: 'INT', default: 512, min: 16, max: limits.maxSide },
        height: { kind: 'INT', default: 512, min: 16, max: limits.maxSide },
        batch_size: { kind: 'INT', default: 1, min: 1, max: 4096 },
      },
      outputs: ['LATENT'],
      outputNode: false,
    },
    LoadImage: {
      displayName: 'Load Image',
      category: 'image',
      description:
        "Loads an image from the server's input folder (POST /upload/image puts it there).",
      inputs: { image: { kind: 'COMBO', options: inputs } },
      outputs: ['IMAGE', 'MASK'],
      outputNode: false,
    },
    VAEEncode: {
      displayName: 'VAE Encode',
      category: 'latent',
      description: 'Encodes an image into latents, for a KSampler to redraw with denoise below 1.',
      inputs: { pixels: { kind: 'LINK', type: 'IMAGE' }, vae: { kind: 'LINK', type: 'VAE' } },
      outputs: ['LATENT'],
      outputNode: false,
    },
    VAEEncodeForInpaint: {
      displayName: 'VAE Encode (for Inpainting)',
      category: 'latent/inpaint',
      description:
        'Encodes an image with its masked pixels grey, for a KSampler to repaint the mask (grown by grow_mask_by pixels).',
      inputs: {
        pixels: { kind: 'LINK', type: 'IMAGE' },
        vae: { kind: 'LINK', type: 'VAE' },
        mask: { kind: 'LINK', type: 'MASK' },
        grow_mask_by: { kind: 'INT', default: 6, min: 0, max: 64 },
      },
      outputs: ['LATENT'],
      outputNode: false,
    },
    SetLatentNoiseMask: {
      displayName: 'Set Latent Noise Mask',
      category: 'latent/inpaint',
      description: 'Makes a KSampler redraw only where the mask is set.',
      inputs: { samples: { kind: 'LINK', type: 'LATENT' }, mask: { kind: 'LINK', type: 'MASK' } },
      outputs: ['LATENT'],
      outputNode: false,
    },
    KSampler: {
      displayName: 'KSampler',
      category: 'sampling',
      description: "Denoises the latent image with one of gesso's samplers.",
      inputs: {
        model,
        seed: { kind: 'INT', default: 0, min: 0, max: MAX_SEED },
        ...sampling,
        denoise: { kind: 'FLOAT', default: 1, min: 0, max: 1, step: 0.01 },
      },
      outputs: ['LATENT'],
      outputNode: false,
    },
    KSamplerAdvanced: {
      displayName: 'KSampler (Advanced)',
      category: 'sampling',
      description:
        'A KSampler that starts at a step of its schedule (from an encoded image); gesso runs it to the end, with noise added.',
      inputs: {
        model,
        add_noise: { kind: 'COMBO', options: ['enable', 'disable'] },
        noise_seed: { kind: 'INT', default: 0, min: 0, max: MAX_SEED },
        ...sampling,
        start_at_step: { kind: 'INT', default: 0, min: 0, max: 10000 },
        end_at_step: { kind: 'INT', default: 10000, min: 0, max: 10000 },
        return_with_leftover_noise: { kind: 'COMBO', options: ['disable', 'enable'] },
      },
      outputs: ['LATENT'],
      outputNode: false,
    },
    VAEDecode: {
      displayName: 'VAE Decode',
      category: 'latent',
      description: 'Decodes latents into images.',
      inputs: { samples: { kind: 'LINK', type: 'LATENT' }, vae: { kind: 'LINK', type: 'VAE' } },
      outputs: ['IMAGE'],
      outputNode: false,
    },
    SaveImage: {
      displayName: 'Save Image',
      category: 'image',
      description:
        "Saves the images to the server's output folder (named as gesso names them), with the workflow in the PNG.",
      inputs: {
        images: { kind: 'LINK', type: 'IMAGE' },
        filename_prefix: { kind: 'STRING', default: 'ComfyUI', multiline: false },
      },
      outputs: [],
      outputNode: true,
    },
    PreviewImage: {
      displayName: 'Preview Image',
      category: 'image',
      description: 'Shows the images (gesso keeps them in the output folder too).',
      inputs: { images: { kind: 'LINK', type: 'IMAGE' } },
      outputs: [],
      outputNode: true,
    },
  };
  return defs;
}

/** A node definition as ComfyUI's GET /object_info describes it. */
function objectInfo(name: string, def: NodeDef) {
  const input = (spec: InputSpec): unknown[] => {
    switch (spec.kind) {
      case 'INT':
        return ['INT', { default: spec.default, min: spec.min, max: spec.max, step: 1 }];
      case 'FLOAT':
        return [
          'FLOAT',
          { default: spec.default, min: spec.min, max: spec.max, step: spec.step, round: 0.01 },
        ];
      case 'STRING':
        return ['STRING', { default: spec.default, multiline: spec.multiline }];
      case 'COMBO':
        return [[...spec.options]];
      case 'LINK':
        return [spec.type];
    }
  };
  return {
    input: {
      required: Object.fromEntries(Object.entries(def.inputs).map(([k, s]) => [k, input(s)])),
    },
    input_order: { required: Object.keys(def.inputs) },
    output: def.outputs,
    output_is_list: def.outputs.map(() => false),
    output_name: def.outputs,
    name,
    display_name: def.displayName,
    description: def.description,
    python_module: 'nodes',
    category: def.category,
    output_node: def.outputNode,
  };
}

interface NodeError {
  readonly type: string;
  readonly message: string;
  readonly details: string;
  readonly extra_info: Record<string, unknown>;
}

/** A refused prompt, answered as ComfyUI answers it: 400 with `error` and `node_errors`. */
class PromptError extends Error {
  readonly error: NodeError;

  constructor(
    type: string,
    message: string,
    details = '',
    extraInfo: Record<string, unknown> = {},
    readonly nodeErrors: Record<string, unknown> = {},
  ) {
    super(message);
    this.error = { type, message, details, extra_info: extraInfo };
  }
}

function badPromptId(details: string): PromptError {
  return new PromptError('invalid_prompt_id', 'Invalid prompt_id', details);
}

/** ComfyUI's answer when nodes' inputs fail: the errors themselves are in `nodeErrors`. */
function failedValidation(nodeErrors: Record<string, unknown>, details = ''): PromptError {
  return new PromptError(
    'prompt_outputs_failed_validation',
    'Prompt outputs failed validation',
    details,
    {},
    nodeErrors,
  );
}

function isLink(value: unknown): value is Link {
  return (
    Array.isArray(value) &&
    value.length === 2 &&
    typeof value[0] === 'string' &&
    typeof value[1] === 'number'
  );
}

/**
 * Checks every input the output nodes depend on against its node's definition, as ComfyUI's
 * validate_inputs does (missing inputs, links to the wrong type, numbers out of range, values not
 * in a list), and returns the errors by node, each with the outputs it keeps from running.
 */
function validate(
  workflow: Workflow,
  defs: Readonly<Record<string, NodeDef>>,
  outputs: readonly string[],
): Map<string, { errors: NodeError[]; dependent_outputs: string[]; class_type: string }> {
  const errors = new Map<
    string,
    { errors: NodeError[]; dependent_outputs: string[]; class_type: string }
  >();
  /** Each node checked: the nodes with errors it depends on (itself included). */
  const failing = new Map<string, ReadonlySet<string>>();
  const check = (id: string): ReadonlySet<string> => {
    const known = failing.get(id);
    if (known !== undefined) return known;
    const found = new Set<string>();
    failing.set(id, found); // a loop back to a node being checked adds nothing
    const node = workflow[id]!;
    const def = defs[node.class_type]!;
    const own: NodeError[] = [];
    for (const [name, spec] of Object.entries(def.inputs)) {
      const value = node.inputs[name];
      const fail = (type: string, message: string, details: string, extra = {}) =>
        own.push({ type, message, details, extra_info: { input_name: name, ...extra } });
      if (value === undefined) {
        fail('required_input_missing', 'Required input is missing', name);
        continue;
      }
      if (isLink(value)) {
        const source = workflow[value[0]];
        const sourceDef = source !== undefined ? defs[source.class_type] : undefined;
        const type = sourceDef?.outputs[value[1]];
        if (type === undefined) {
          fail(
            'bad_linked_input',
            'Bad linked input, must be a length-2 list of [node_id, slot_index]',
            `${name}: node '${value[0]}' has no output ${value[1]}`,
          );
        } else if (spec.kind !== 'LINK' || spec.type !== type) {
          const wanted = spec.kind === 'LINK' ? spec.type : spec.kind;
          fail(
            'return_type_mismatch',
            'Return type mismatch between linked nodes',
            `${name}, received_type(${type}) mismatch input_type(${wanted})`,
            { received_type: type, linked_node: value },
          );
        } else for (const f of check(value[0])) found.add(f);
        continue;
      }
      switch (spec.kind) {
        case 'LINK':
          fail(
            'bad_linked_input',
            'Bad linked input, must be a length-2 list of [node_id, slot_index]',
            `${name}: a ${spec.type} comes from another node's output, not a value`,
          );
          break;
        case 'INT':
        case 'FLOAT': {
          const n = value;
          if (typeof n !== 'number' || (spec.kind === 'INT' && !Number.isInteger(n))) {
            fail(
              'invalid_input_type',
              `Failed to convert an input value to a ${spec.kind} value`,
              `${name}, ${JSON.stringify(value)}`,
              { received_value: value },
            );
          } else if (n < spec.min) {
            fail('value_smaller_than_min', `Value ${n} smaller than min of ${spec.min}`, name, {
              received_value: n,
            });
          } else if (n > spec.max) {
            fail('value_bigger_than_max', `Value ${n} bigger than max of ${spec.max}`, name, {
              received_value: n,
            });
          }
          break;
        }
        case 'STRING':
          if (typeof value !== 'string')
            fail(
              'invalid_input_type',
              'Failed to convert an input value to a STRING value',
              `${name}, ${JSON.stringify(value)}`,
              { received_value: value },
            );
          break;
        case 'COMBO':
          if (typeof value !== 'string' || !spec.options.includes(value))
            fail(
              'value_not_in_list',
              'Value not in list',
              `${name}: '${String(value)}' not in [${spec.options.map((o) => `'${o}'`).join(', ')}]`,
              { received_value: value },
            );
          break;
      }
    }
    if (own.length > 0) {
      found.add(id);
      errors.set(id, { errors: own, dependent_outputs: [], class_type: node.class_type });
    }
    return found;
  };
  for (const output of outputs)
    for (const id of check(output)) errors.get(id)!.dependent_outputs.push(output);
  return errors;
}

/** A gesso limit a valid graph runs into, as the node error ComfyUI gives custom validation. */
function unsupported(id: string, node: WorkflowNode, input: string, why: string): PromptError {
  return failedValidation(
    {
      [id]: {
        errors: [
          {
            type: 'custom_validation_failed',
            message: 'Custom validation failed for node',
            details: `${input} - ${why}`,
            extra_info: { input_name: input },
          },
        ],
        dependent_outputs: [],
        class_type: node.class_type,
      },
    },
    why,
  );
}

/** What a valid workflow asks gesso to draw. */
interface Plan {
  readonly request: JobRequest;
  readonly sampler: string;
  readonly outputs: readonly string[];
  /** The schedule's length, and how many of its last steps run (all from an empty latent). */
  readonly schedule: { readonly total: number; readonly run: number };
  /** Image-to-image: the LoadImage node and its file. */
  readonly image?: { readonly node: string; readonly file: string };
  /**
   * Inpainting: the node that takes the mask, the file whose transparency it is, how far to grow
   * it, and whether the masked pixels are greyed before encoding (VAEEncodeForInpaint).
   */
  readonly mask?: {
    readonly node: string;
    readonly file: string;
    readonly grow: number;
    readonly grey: boolean;
  };
}

/**
 * Reads the one run a validated workflow describes: follows the output nodes back through
 * VAEDecode and KSampler to the texts, the starting latent (empty, or an image's) and the
 * checkpoint, collecting the LoRA loaders and the text encoder's last layer on the way.
 */
function planOf(workflow: Workflow, outputs: readonly string[], maxImages: number): Plan {
  let hops = 0;
  const linked = (id: string, input: string): [string, WorkflowNode] => {
    // Every path here ends at a loader; one longer than the graph has gone round a loop.
    hops += 1;
    if (hops > 4 * Object.keys(workflow).length)
      throw unsupported(id, workflow[id]!, input, 'the graph loops back on itself here');
    const link = workflow[id]!.inputs[input] as Link;
    return [link[0], workflow[link[0]]!];
  };
  let sampler: string | undefined;
  for (const output of outputs) {
    const [decodeId, decode] = linked(output, 'images');
    const [samplesId, samples] = linked(decodeId, 'samples');
    if (samples.class_type !== 'KSampler' && samples.class_type !== 'KSamplerAdvanced')
      throw unsupported(decodeId, decode, 'samples', 'gesso decodes the latents of a KSampler');
    if (sampler !== undefined && sampler !== samplesId)
      throw unsupported(
        output,
        workflow[output]!,
        'images',
        `gesso runs one KSampler a prompt; this output draws from KSampler ${samplesId} and another from ${sampler}`,
      );
    sampler = samplesId;
  }
  const samplerNode = workflow[sampler!]!;
  const inputs = samplerNode.inputs;
  let [latentId, latent] = linked(sampler!, 'latent_image');
  const refuse = (input: string, why: string) => unsupported(sampler!, samplerNode, input, why);
  let image: Plan['image'];
  // A MASK comes from a LoadImage's second output: where its image is transparent.
  const maskOf = (id: string, grow: number, grey: boolean) => {
    const [, load] = linked(id, 'mask');
    return { node: id, file: load.inputs.image as string, grow, grey };
  };
  let mask: Plan['mask'];
  if (latent.class_type === 'SetLatentNoiseMask') {
    mask = maskOf(latentId, 0, false);
    [latentId, latent] = linked(latentId, 'samples');
  }
  if (latent.class_type === 'VAEEncode' || latent.class_type === 'VAEEncodeForInpaint') {
    const [loadId, load] = linked(latentId, 'pixels');
    if (load.class_type !== 'LoadImage')
      throw unsupported(latentId, latent, 'pixels', 'gesso encodes an image a LoadImage loads');
    image = { node: loadId, file: load.inputs.image as string };
    if (latent.class_type === 'VAEEncodeForInpaint') {
      if (mask !== undefined)
        throw unsupported(latentId, latent, 'mask', 'gesso takes one mask a prompt');
      mask = maskOf(latentId, latent.inputs.grow_mask_by as number, true);
    }
  } else if (mask !== undefined)
    throw unsupported(mask.node, workflow[mask.node]!, 'samples', 'a mask needs an encoded image');
  else if (latent.class_type !== 'EmptyLatentImage')
    throw refuse(
      'latent_image',
      'gesso starts a KSampler from an EmptyLatentImage or a VAEEncode (chained samplers are not supported)',
    );
  // The schedule and how many of its last steps run: KSampler runs `steps` at the end of a
  // schedule of steps / denoise; KSamplerAdvanced its own schedule from start_at_step.
  const steps = inputs.steps as number;
  let span: Plan['schedule'];
  if (samplerNode.class_type === 'KSampler') {
    const denoise = inputs.denoise as number;
    if (image === undefined && denoise !== 1)
      throw refuse(
        'denoise',
        'gesso draws from an empty latent with denoise 1 (a partial denoise needs a starting image: LoadImage and VAEEncode)',
      );
    if (denoise === 0) throw refuse('denoise', 'denoise 0 leaves nothing to draw');
    span = { total: Math.floor(steps / denoise), run: steps };
  } else {
    const start = inputs.start_at_step as number;
    if (inputs.add_noise !== 'enable')
      throw refuse('add_noise', 'gesso adds noise to the starting latent; set add_noise to enable');
    if ((inputs.end_at_step as number) < steps)
      throw refuse(
        'end_at_step',
        `gesso runs the schedule to its end; set end_at_step to ${steps} or more (a refiner stage after this one is not supported)`,
      );
    if (start >= steps)
      throw refuse('start_at_step', `start_at_step ${start} leaves none of ${steps} steps`);
    if (image === undefined && start !== 0)
      throw refuse(
        'start_at_step',
        'gesso starts an empty latent at step 0 (a later start needs a starting image)',
      );
    span = { total: steps, run: steps - start };
  }
  const samplerName = inputs.sampler_name as string;
  const schedule = inputs.scheduler as string;
  if (schedule === 'karras' && !KARRAS.has(samplerName))
    throw refuse(
      'scheduler',
      `gesso has Karras sigmas for ${[...KARRAS].join(', ')}, not for ${samplerName}; use the normal scheduler`,
    );

  // The checkpoint and LoRAs behind the model, and behind each text's encoder.
  const loraScales = new Map<string, { model: number; clip: number }>();
  const scaleOf = (name: string) => {
    const entry = loraScales.get(name) ?? { model: 0, clip: 0 };
    loraScales.set(name, entry);
    return entry;
  };
  let checkpoint: string | undefined;
  const checkpointOf = (id: string, node: WorkflowNode, input: string, ckpt: WorkflowNode) => {
    const name = ckpt.inputs.ckpt_name as string;
    if (checkpoint !== undefined && checkpoint !== name)
      throw unsupported(
        id,
        node,
        input,
        `gesso draws with one checkpoint a prompt; this graph loads '${checkpoint}' and '${name}'`,
      );
    checkpoint = name;
  };
  let [id, node] = linked(sampler!, 'model');
  let [fromId, from] = [sampler!, samplerNode];
  while (node.class_type !== 'CheckpointLoaderSimple') {
    const name = loraName(node.inputs.lora_name as string);
    scaleOf(name).model += node.inputs.strength_model as number;
    [fromId, from] = [id, node];
    [id, node] = linked(id, 'model');
  }
  checkpointOf(fromId, from, 'model', node);

  const encoderOf = (textId: string) => {
    let [cid, c] = linked(textId, 'clip');
    let lastLayer: number | undefined;
    const scales = new Map<string, number>();
    let [prevId, prev] = [textId, workflow[textId]!];
    while (c.class_type !== 'CheckpointLoaderSimple') {
      if (c.class_type === 'CLIPSetLastLayer') lastLayer ??= c.inputs.stop_at_clip_layer as number;
      else {
        const name = loraName(c.inputs.lora_name as string);
        scales.set(name, (scales.get(name) ?? 0) + (c.inputs.strength_clip as number));
      }
      [prevId, prev] = [cid, c];
      [cid, c] = linked(cid, 'clip');
    }
    checkpointOf(prevId, prev, 'clip', c);
    return { lastLayer: lastLayer ?? -1, scales, text: workflow[textId]!.inputs.text as string };
  };
  const [positiveId] = linked(sampler!, 'positive');
  const [negativeId] = linked(sampler!, 'negative');
  for (const [which, textId] of [
    ['positive', positiveId],
    ['negative', negativeId],
  ] as const)
    if (workflow[textId]!.class_type !== 'CLIPTextEncode')
      throw unsupported(sampler!, samplerNode, which, 'gesso conditions on a CLIPTextEncode');
  const positive = encoderOf(positiveId);
  const negative = encoderOf(negativeId);
  if (
    positive.lastLayer !== negative.lastLayer ||
    JSON.stringify([...positive.scales].sort()) !== JSON.stringify([...negative.scales].sort())
  )
    throw unsupported(
      negativeId,
      workflow[negativeId]!,
      'clip',
      'gesso encodes the positive and negative texts with one text encoder: give both the same CLIP (the same LoRAs and last layer)',
    );
  for (const [name, scale] of positive.scales) scaleOf(name).clip = scale;
  for (const [textId, text] of [
    [positiveId, positive.text],
    [negativeId, negative.text],
  ] as const)
    refuseComfySyntax(textId, workflow[textId]!, text);

  const [decodeId, decode] = linked(outputs[0]!, 'images');
  checkpointOf(decodeId, decode, 'vae', linked(decodeId, 'vae')[1]);

  if (image !== undefined) checkpointOf(latentId, latent, 'vae', linked(latentId, 'vae')[1]);
  const count = image !== undefined ? 1 : (latent.inputs.batch_size as number);
  if (count > maxImages)
    throw unsupported(
      latentId,
      latent,
      'batch_size',
      `this server makes at most ${maxImages} images a prompt`,
    );
  if (image === undefined)
    for (const side of ['width', 'height'] as const)
      if ((latent.inputs[side] as number) % 8 !== 0)
        throw unsupported(latentId, latent, side, `${side} must be a multiple of 8`);

  // A1111's tag form carries a text-encoder and a UNet scale apart, as the two LoRA inputs do.
  const tags = [...loraScales].map(([name, s]) => `<lora:${name}:${s.clip}:${s.model}>`).join(' ');
  const scheduler =
    schedule === 'karras' ? `${SAMPLERS[samplerName]!}_karras` : SAMPLERS[samplerName]!;
  return {
    sampler: sampler!,
    outputs,
    schedule: span,
    ...(image !== undefined ? { image } : {}),
    ...(mask !== undefined ? { mask } : {}),
    request: {
      prompt: tags === '' ? positive.text : `${positive.text} ${tags}`,
      negative_prompt: negative.text,
      seed: (samplerNode.class_type === 'KSampler' ? inputs.seed : inputs.noise_seed) as number,
      steps: span.total,
      guidance: inputs.cfg as number,
      scheduler,
      ...(schedule === 'normal' ? { timestep_spacing: 'linspace' } : {}),
      ...(image === undefined
        ? { width: latent.inputs.width as number, height: latent.inputs.height as number }
        : {}),
      count,
      batch_size: count,
      batch_noise: true,
      prompt_syntax: 'comfy',
      ...(positive.lastLayer < -1 ? { clip_skip: -positive.lastLayer - 1 } : {}),
      model: checkpoint!,
    },
  };
}

/** `sub/name.safetensors` → `name`: the name gesso's LoRA folder finds a file by. */
function loraName(file: string): string {
  return basename(file, extname(file));
}

/**
 * Text ComfyUI would read another way than gesso can: a `<lora:…>` tag is text to ComfyUI (LoRAs
 * come from LoraLoader nodes), and `embedding:NAME` names a textual-inversion file, which gesso
 * does not load. Refused rather than drawn with another meaning.
 */
function refuseComfySyntax(id: string, node: WorkflowNode, text: string): void {
  if (takeExtraNetworks(text).tags.length > 0)
    throw unsupported(
      id,
      node,
      'text',
      'a <lora:…> tag is text to ComfyUI; load LoRAs with a LoraLoader node',
    );
  const embedding = /(?:^|[\s(])embedding:([^\s():]+)/.exec(text);
  if (embedding !== null)
    throw unsupported(
      id,
      node,
      'text',
      `gesso does not load textual-inversion embeddings (embedding:${embedding[1]!}); take it out of the text`,
    );
}

/**
 * A mask (255: repaint) rounded at half, then grown as VAEEncodeForInpaint grows it: a box of
 * `grow` pixels, its window from ⌈(grow − 1)/2⌉ before a pixel (0: unchanged). Grown along rows,
 * then along columns, each line in one pass: searching each pixel's whole box took 13.5 s at 1024²
 * and grow 64 (one 10×10 hole), blocking the server's thread; this takes about 30 ms.
 */
function growMask(mask: Uint8Array, width: number, height: number, grow: number): Uint8Array {
  const set = mask.map((v) => (v >= 128 ? 255 : 0));
  if (grow === 0) return set;
  const before = Math.ceil((grow - 1) / 2);
  const rows = growLines(set, height, width, width, 1, before, grow);
  return growLines(rows, width, height, 1, width, before, grow);
}

/**
 * Sets each pixel with a set pixel among the `grow` of its line from `before` pixels before it.
 * Line k's pixel i is at k·lineStep + i·step; a running count of set pixels in the window moves
 * along the line.
 */
function growLines(
  source: Uint8Array,
  lines: number,
  length: number,
  lineStep: number,
  step: number,
  before: number,
  grow: number,
): Uint8Array {
  const out = new Uint8Array(source.length);
  for (let line = 0; line < lines; line++) {
    const isSet = (i: number) => i >= 0 && i < length && source[line * lineStep + i * step] !== 0;
    let count = 0;
    for (let i = -before; i < grow - before; i++) if (isSet(i)) count++;
    for (let i = 0; i < length; i++) {
      if (count > 0) out[line * lineStep + i * step] = 255;
      if (isSet(i - before)) count--;
      if (isSet(i - before + grow)) count++;
    }
  }
  return out;
}

/** The image with its masked pixels (mask ≥ half) mid-grey, as VAEEncodeForInpaint encodes it. */
function greyWhere(pixels: Tensor<'uint8'>, mask: Uint8Array): Tensor<'uint8'> {
  const out = new Tensor('uint8', pixels.shape, (pixels.data as Uint8Array).slice());
  mask.forEach((v, i) => {
    if (v >= 128) out.data.fill(128, i * 3, i * 3 + 3);
  });
  return out;
}

/** A prompt ComfyUI's way: its queue entry, who follows it, and its history once finished. */
interface ComfyPrompt {
  readonly number: number;
  readonly id: string;
  readonly workflow: Workflow;
  readonly extraData: Record<string, unknown>;
  readonly outputs: readonly string[];
  readonly sampler: string;
  /** The steps the sampler runs. */
  readonly steps: number;
  readonly clientId: string | undefined;
  readonly messages: [string, Record<string, unknown>][];
}

export interface ComfyOptions {
  readonly queue: JobQueue;
  readonly models: ModelManager;
  /** The server's output folder, where the images are. */
  readonly out: string;
  readonly maxSide: number;
  readonly maxSteps: number;
  readonly maxImages: number;
  /** Whether a request carries a key the server accepts (always true without keys). */
  readonly authorized: (request: IncomingMessage) => boolean;
}

/** ComfyUI's routes, each also under /api as ComfyUI mounts them (gesso's own /api/… first). */
export const COMFY_ROUTES =
  /^\/(api\/)?(prompt|queue|interrupt|history|view|upload|object_info|system_stats|embeddings|models|features|ws)(\/|$)/;

/** Mounts ComfyUI's API on the server; returns a function that closes its sockets. */
export async function registerComfy(
  app: FastifyInstance,
  options: ComfyOptions,
): Promise<() => Promise<void>> {
  const { queue, models } = options;
  const prompts = new Map<string, ComfyPrompt>();
  /** Finished prompts in the order they finished (ComfyUI's history). */
  const history = new Map<string, Record<string, unknown>>();
  const sockets = new Map<string, WebSocket>();
  let counter = 0;

  const checkpoints = () => {
    const names = listModels().map((m) => m.name);
    return names.includes(models.name) ? names : [models.name, ...names];
  };
  const loraFiles = async () =>
    models.loras === undefined
      ? []
      : [...(await models.loras.files()).values()].map((path) => relative(models.loras!.dir, path));
  const inputDir = resolve(options.out, 'input');
  /** A file of the input folder, or undefined when the name would leave it. */
  const inputPath = (subfolder: string, name: string): string | undefined => {
    const path = resolve(inputDir, subfolder, name);
    return path.startsWith(inputDir + sep) ? path : undefined;
  };
  const inputFiles = async (): Promise<string[]> => {
    const entries = await readdir(inputDir, { recursive: true, withFileTypes: true }).catch(
      () => [],
    );
    return entries
      .filter((e) => e.isFile() && IMAGE_TYPES[extname(e.name).toLowerCase()] !== undefined)
      .map((e) => relative(inputDir, join(e.parentPath, e.name)).split(sep).join('/'))
      .sort();
  };
  const definitions = async () =>
    nodeDefs(checkpoints(), await loraFiles(), await inputFiles(), options);

  /**
   * The image a LoadImage names, as ComfyUI's LoadImage and VAEEncode take it: RGB, and apart
   * its transparency (LoadImage's MASK: 255 where the image is see-through), both cropped about
   * their centre to whole latent pixels (8 image pixels).
   */
  const loadInput = async (node: string, workflow: Workflow, file: string) => {
    const path = inputPath('', file);
    const bad = (why: string) => unsupported(node, workflow[node]!, 'image', why);
    if (path === undefined || !existsSync(path)) throw bad(`Invalid image file: ${file}`);
    const bytes = await readFile(path);
    let pixels: Tensor<'uint8'>;
    try {
      pixels = await decodeImage(bytes, file);
    } catch (error) {
      if (isUserError(error)) throw bad(`Invalid image file: ${error.message}`);
      throw error;
    }
    const [, h, w] = pixels.shape as [number, number, number];
    const [ch, cw] = [h - (h % 8), w - (w % 8)];
    if (ch === 0 || cw === 0 || ch > options.maxSide || cw > options.maxSide)
      throw bad(
        `the image is ${w}×${h}; this server draws from 8 to ${options.maxSide} pixels a side`,
      );
    const [top, left] = [Math.floor((h % 8) / 2), Math.floor((w % 8) / 2)];
    const crop = (data: Uint8Array, channels: number) => {
      const out = new Uint8Array(ch * cw * channels);
      for (let y = 0; y < ch; y++)
        out.set(
          data.subarray(((top + y) * w + left) * channels, ((top + y) * w + left + cw) * channels),
          y * cw * channels,
        );
      return out;
    };
    let mask: Uint8Array | undefined;
    if ((await sharp(bytes).metadata()).hasAlpha) {
      const alpha = await sharp(bytes).ensureAlpha().extractChannel(3).raw().toBuffer();
      mask = crop(alpha, 1).map((a) => 255 - a);
    }
    return {
      pixels: new Tensor('uint8', [1, ch, cw, 3], crop(pixels.data as Uint8Array, 3)),
      mask,
    };
  };

  // --- the WebSocket ---------------------------------------------------------------------------
  const wss = new WebSocketServer({ noServer: true });
  const send = (socket: WebSocket | undefined, type: string, data: Record<string, unknown>) => {
    if (socket !== undefined && socket.readyState === socket.OPEN)
      socket.send(JSON.stringify({ type, data }));
  };
  const broadcast = (type: string, data: Record<string, unknown>) => {
    for (const socket of sockets.values()) send(socket, type, data);
  };
  const status = () => ({ status: { exec_info: { queue_remaining: queue.pending } } });
  // Execution messages go to the client that queued the prompt, as ComfyUI sends them; progress
  // and previews go to every client when the prompt named none (ComfyUI broadcasts those then).
  const toClient = (p: ComfyPrompt, type: string, data: Record<string, unknown>) => {
    if (p.clientId !== undefined) send(sockets.get(p.clientId), type, data);
  };
  const toFollowers = (p: ComfyPrompt, type: string, data: Record<string, unknown>) => {
    if (p.clientId !== undefined) send(sockets.get(p.clientId), type, data);
    else broadcast(type, data);
  };
  const previewFrame = (png: Buffer) => {
    // ComfyUI's binary event: uint32 BE 1 (PREVIEW_IMAGE), uint32 BE 2 (PNG), the image.
    const head = Buffer.alloc(8);
    head.writeUInt32BE(1, 0);
    head.writeUInt32BE(2, 4);
    return Buffer.concat([head, png]);
  };

  const upgrade = (request: IncomingMessage, socket: Duplex, head: Buffer) => {
    const url = new URL(request.url ?? '/', 'http://localhost');
    if (!/^\/(api\/)?ws$/.test(url.pathname)) return;
    if (!options.authorized(request)) {
      socket.end('HTTP/1.1 401 Unauthorized\r\nconnection: close\r\n\r\n');
      return;
    }
    wss.handleUpgrade(request, socket, head, (ws) => {
      const sid = url.searchParams.get('clientId') ?? randomUUID().replace(/-/g, '');
      sockets.get(sid)?.close();
      sockets.set(sid, ws);
      send(ws, 'status', { ...status(), sid });
      const running = queue.current;
      const p = running !== undefined ? prompts.get(running.id) : undefined;
      if (p !== undefined && p.clientId === sid)
        send(ws, 'executing', { node: p.sampler, display_node: p.sampler, prompt_id: p.id });
      ws.on('message', (data, binary) => {
        if (binary) return;
        let message: unknown;
        try {
          message = JSON.parse(data.toString());
        } catch {
          return;
        }
        if ((message as { type?: unknown }).type === 'feature_flags')
          send(ws, 'feature_flags', { supports_preview_metadata: false });
      });
      ws.on('close', () => {
        if (sockets.get(sid) === ws) sockets.delete(sid);
      });
    });
  };
  app.server.on('upgrade', upgrade);

  const queueEntry = (p: ComfyPrompt) => [p.number, p.id, p.workflow, p.extraData, p.outputs];

  // --- following gesso's jobs -----------------------------------------------------------------
  const outputsOf = (p: ComfyPrompt, job: Job) =>
    Object.fromEntries(
      p.outputs.map((node) => [
        node,
        { images: job.images.map((filename) => ({ filename, subfolder: '', type: 'output' })) },
      ]),
    );
  const finish = (p: ComfyPrompt, job: Job, statusStr: 'success' | 'error') => {
    history.set(p.id, {
      prompt: queueEntry(p),
      outputs: job.state === 'done' ? outputsOf(p, job) : {},
      status: { status_str: statusStr, completed: job.state === 'done', messages: p.messages },
      meta: Object.fromEntries(
        p.outputs.map((node) => [
          node,
          { node_id: node, display_node: node, parent_node: null, real_node_id: node },
        ]),
      ),
    });
    prompts.delete(p.id);
  };
  const record = (p: ComfyPrompt, type: string, data: Record<string, unknown>) => {
    const stamped = { ...data, prompt_id: p.id, timestamp: Date.now() };
    p.messages.push([type, stamped]);
    toClient(p, type, stamped);
  };
  /** The last messages of a prompt (`executing` with no node means done), then its history. */
  const conclude = (p: ComfyPrompt, job: Job, type: string, data: Record<string, unknown>) => {
    record(p, type, data);
    toClient(p, 'executing', { node: null, prompt_id: p.id });
    finish(p, job, type === 'execution_success' ? 'success' : 'error');
  };
  const onEvent = (event: JobEvent) => {
    const p = prompts.get(event.job.id);
    if (p !== undefined) {
      const job = event.job;
      switch (event.type) {
        case 'started':
          record(p, 'execution_start', {});
          record(p, 'execution_cached', { nodes: [] });
          toClient(p, 'executing', { node: p.sampler, display_node: p.sampler, prompt_id: p.id });
          break;
        case 'progress':
          // In the KSampler's own steps (an image-to-image job runs the end of a longer schedule).
          toFollowers(p, 'progress', {
            value: job.total === 0 ? 0 : Math.round((job.step / job.total) * p.steps),
            max: p.steps,
            prompt_id: p.id,
            node: p.sampler,
          });
          if (event.preview !== undefined) {
            const frame = previewFrame(event.preview);
            if (p.clientId !== undefined) sockets.get(p.clientId)?.send(frame);
            else for (const socket of sockets.values()) socket.send(frame);
          }
          break;
        case 'done':
          for (const node of p.outputs) {
            toClient(p, 'executing', { node, display_node: node, prompt_id: p.id });
            toClient(p, 'executed', {
              node,
              display_node: node,
              output: outputsOf(p, job)[node],
              prompt_id: p.id,
            });
          }
          conclude(p, job, 'execution_success', {});
          break;
        case 'failed':
          conclude(p, job, 'execution_error', {
            node_id: p.sampler,
            node_type: p.workflow[p.sampler]!.class_type,
            executed: [],
            exception_message: job.error ?? 'generation failed',
            exception_type: 'gesso.GenerationError',
            traceback: [],
            current_inputs: {},
            current_outputs: {},
          });
          break;
        case 'cancelled':
          // Taken off the queue before it ran: gone, as ComfyUI drops a deleted queue item.
          if (p.messages.length === 0) {
            prompts.delete(p.id);
            break;
          }
          conclude(p, job, 'execution_interrupted', {
            node_id: p.sampler,
            node_type: p.workflow[p.sampler]!.class_type,
            executed: [],
          });
          break;
        default:
      }
    }
    if (['queued', 'started', 'done', 'failed', 'cancelled'].includes(event.type))
      broadcast('status', status());
  };
  queue.on('event', onEvent);

  // --- routes -----------------------------------------------------------------------------------
  // ComfyUI reads every body as JSON whatever its content type (its example client posts with
  // urllib's default, application/x-www-form-urlencoded, and fetch with a string body sends
  // text/plain); so do these routes, in their own scope.
  await app.register(async (scope) => {
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser('*', { parseAs: 'string' }, (_request, body, done) => {
      const text = String(body).trim();
      if (text === '') return done(null, undefined);
      try {
        done(null, JSON.parse(text));
      } catch {
        done(Object.assign(new Error('the body is not JSON'), { statusCode: 400 }), undefined);
      }
    });
    await scope.register(multipart, { limits: { fileSize: 64 * 1024 * 1024, files: 1 } });
    const route = (path: string) => [path, `/api${path}`];

    // ComfyUI's upload: the file in field `image`, into the input folder (or its `subfolder`); a
    // name already taken gets " (1)", " (2)" … unless `overwrite` or the bytes are the same.
    for (const path of route('/upload/image'))
      scope.post(path, async (request, reply) => {
        const refuse = (why: string) => reply.status(400).send({ error: why });
        if (!request.isMultipart()) return refuse('send the image as multipart/form-data');
        let upload: { name: string; bytes: Buffer } | undefined;
        const fields: Record<string, string> = {};
        for await (const part of request.parts()) {
          if (part.type === 'file') {
            const bytes = await part.toBuffer();
            if (part.fieldname === 'image') upload = { name: part.filename, bytes };
          } else fields[part.fieldname] = String(part.value);
        }
        if (upload === undefined) return refuse('no file in the form field `image`');
        if ((fields.type ?? 'input') !== 'input')
          return refuse(
            `gesso keeps uploads in its input folder; send type input, not ${fields.type}`,
          );
        const subfolder = fields.subfolder ?? '';
        let name = basename(upload.name);
        if (IMAGE_TYPES[extname(name).toLowerCase()] === undefined)
          return refuse(`${name}: gesso takes ${Object.keys(IMAGE_TYPES).join(', ')} images`);
        try {
          await decodeImage(upload.bytes, name);
        } catch (error) {
          if (isUserError(error)) return refuse(error.message);
          throw error;
        }
        let target = inputPath(subfolder, name);
        if (target === undefined) return refuse(`subfolder ${subfolder} leaves the input folder`);
        if (!['true', '1'].includes((fields.overwrite ?? '').toLowerCase())) {
          const [stem, ext] = [basename(name, extname(name)), extname(name)];
          for (let i = 1; existsSync(target!); i++) {
            if ((await readFile(target!)).equals(upload.bytes)) break;
            name = `${stem} (${i})${ext}`;
            target = inputPath(subfolder, name);
          }
        }
        await mkdir(dirname(target!), { recursive: true });
        await writeFileAtomically(target!, upload.bytes);
        return { name, subfolder, type: 'input' };
      });

    /** A prompt_id a queued, running or finished prompt holds is not given again. */
    const refuseIdInUse = (id: string) => {
      if (queue.get(id) !== undefined || history.has(id))
        throw badPromptId(`prompt_id ${id} is already in use`);
    };

    const submit = async (request: FastifyRequest, reply: FastifyReply) => {
      const body = (request.body ?? {}) as Record<string, unknown>;
      try {
        const workflow = body.prompt;
        if (typeof workflow !== 'object' || workflow === null || Array.isArray(workflow))
          throw new PromptError('no_prompt', 'No prompt provided', 'No prompt provided');
        let id: string = randomUUID();
        if (body.prompt_id !== undefined) {
          const given = body.prompt_id;
          if (
            typeof given !== 'string' ||
            !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(given)
          )
            throw badPromptId('prompt_id must be a canonical lowercase UUID');
          refuseIdInUse(given);
          id = given;
        }
        const defs = await definitions();
        const graph = workflow as Record<string, unknown>;
        for (const [nodeId, node] of Object.entries(graph)) {
          const classType = (node as { class_type?: unknown } | null)?.class_type;
          const inputs = (node as { inputs?: unknown } | null)?.inputs;
          if (typeof classType !== 'string' || typeof inputs !== 'object' || inputs === null)
            throw new PromptError(
              'invalid_prompt',
              'Cannot execute because a node is missing the class_type property.',
              `Node ID '#${nodeId}'`,
            );
          if (defs[classType] === undefined)
            throw new PromptError(
              'missing_node_type',
              `Node '${classType}' not found. gesso runs ${Object.keys(defs).join(', ')}.`,
              `Node ID '#${nodeId}'`,
              { node_id: nodeId, class_type: classType, node_title: classType },
            );
        }
        const nodes = graph as unknown as Workflow;
        let outputs = Object.keys(nodes).filter((n) => defs[nodes[n]!.class_type]!.outputNode);
        const targets = body.partial_execution_targets;
        if (Array.isArray(targets)) outputs = outputs.filter((n) => targets.includes(n));
        if (outputs.length === 0)
          throw new PromptError('prompt_no_outputs', 'Prompt has no outputs');
        const errors = validate(nodes, defs, outputs);
        const good = outputs.filter(
          (o) => ![...errors.values()].some((e) => e.dependent_outputs.includes(o)),
        );
        const nodeErrors = Object.fromEntries(errors);
        if (good.length === 0) throw failedValidation(nodeErrors);
        const plan = planOf(nodes, good, options.maxImages);
        const extraData =
          typeof body.extra_data === 'object' && body.extra_data !== null
            ? (body.extra_data as Record<string, unknown>)
            : {};
        const clientId =
          typeof body.client_id === 'string'
            ? body.client_id
            : (extraData.client_id as string | undefined);
        // As ComfyUI's SaveImage writes them: the prompt, then each extra_pnginfo entry.
        const pngInfo = (extraData.extra_pnginfo ?? {}) as Record<string, unknown>;
        const pngText = {
          prompt: JSON.stringify(nodes),
          ...Object.fromEntries(Object.entries(pngInfo).map(([k, v]) => [k, JSON.stringify(v)])),
        };
        const number = typeof body.number === 'number' ? body.number : counter;
        counter += 1;
        const p: ComfyPrompt = {
          number: body.front === true ? -number : number,
          id,
          workflow: nodes,
          extraData: { ...extraData, ...(clientId !== undefined ? { client_id: clientId } : {}) },
          outputs: plan.outputs,
          sampler: plan.sampler,
          steps: plan.schedule.run,
          clientId,
          messages: [],
        };
        let request: JobRequest = { ...plan.request, png_text: pngText };
        if (plan.image !== undefined) {
          const source = await loadInput(plan.image.node, nodes, plan.image.file);
          let pixels = source.pixels;
          let mask: Tensor<'uint8'> | undefined;
          if (plan.mask !== undefined) {
            const m = plan.mask;
            // Mostly the mask is the same LoadImage's: its file is read once.
            const drawn = (
              m.file === plan.image.file ? source : await loadInput(m.node, nodes, m.file)
            ).mask;
            const refuseMask = (why: string) => unsupported(m.node, nodes[m.node]!, 'mask', why);
            if (drawn === undefined)
              throw refuseMask(`${m.file} has no transparency, so its mask covers nothing`);
            if (drawn.length !== pixels.shape[1]! * pixels.shape[2]!)
              throw refuseMask(`the mask of ${m.file} is not the size of the image it masks`);
            const [h, w] = [pixels.shape[1]!, pixels.shape[2]!];
            mask = new Tensor('uint8', [1, h, w, 1], growMask(drawn, w, h, m.grow));
            if (m.grey) pixels = greyWhere(pixels, drawn);
          }
          // In diffusers' terms: the schedule, and a strength that keeps its last `run` steps.
          const { total, run } = plan.schedule;
          request = {
            ...request,
            init_image: pixels,
            ...(mask !== undefined ? { mask } : {}),
            width: pixels.shape[2]!,
            height: pixels.shape[1]!,
            strength: Math.min(1, (run + 0.5) / total),
          };
        }
        // Checked again: another request may have taken the id while this one read files.
        refuseIdInUse(id);
        prompts.set(id, p);
        queue.submit(request, { id, front: body.front === true });
        return { prompt_id: id, number: p.number, node_errors: nodeErrors };
      } catch (error) {
        if (error instanceof PromptError)
          return reply.status(400).send({ error: error.error, node_errors: error.nodeErrors });
        throw error;
      }
    };
    for (const path of route('/prompt')) {
      scope.post(path, submit);
      scope.get(path, async () => status().status);
    }

    const queueView = () => {
      const running: unknown[] = [];
      const pending: unknown[] = [];
      for (const p of prompts.values()) {
        const state = queue.get(p.id)?.state;
        if (state === 'running') running.push(queueEntry(p));
        else if (state === 'queued') pending.push(queueEntry(p));
      }
      return { queue_running: running, queue_pending: pending };
    };
    for (const path of route('/queue')) {
      scope.get(path, async () => queueView());
      scope.post(path, async (request) => {
        const body = (request.body ?? {}) as { clear?: unknown; delete?: unknown };
        if (body.clear === true)
          for (const p of prompts.values())
            if (queue.get(p.id)?.state === 'queued') queue.cancel(p.id);
        if (Array.isArray(body.delete))
          for (const id of body.delete)
            if (typeof id === 'string' && prompts.has(id) && queue.get(id)?.state === 'queued')
              queue.cancel(id);
        return {};
      });
    }

    for (const path of route('/interrupt'))
      scope.post(path, async (request) => {
        const target = ((request.body ?? {}) as { prompt_id?: unknown }).prompt_id;
        const running = queue.current;
        if (running !== undefined && (target === undefined || target === running.id))
          queue.cancel(running.id);
        return {};
      });

    for (const path of route('/history')) {
      scope.get(path, async (request) => {
        const query = request.query as { max_items?: string; offset?: string };
        const max = query.max_items !== undefined ? Number(query.max_items) : undefined;
        let offset = query.offset !== undefined ? Number(query.offset) : -1;
        const entries = [...history];
        if (offset < 0 && max !== undefined) offset = entries.length - max;
        const from = Math.max(0, offset);
        return Object.fromEntries(entries.slice(from, max !== undefined ? from + max : undefined));
      });
      scope.get(`${path}/:id`, async (request) => {
        const id = (request.params as { id: string }).id;
        const item = history.get(id);
        return item !== undefined ? { [id]: item } : {};
      });
      scope.post(path, async (request) => {
        const body = (request.body ?? {}) as { clear?: unknown; delete?: unknown };
        if (body.clear === true) history.clear();
        if (Array.isArray(body.delete)) for (const id of body.delete) history.delete(String(id));
        return {};
      });
    }

    for (const path of route('/view'))
      scope.get(path, async (request, reply) => {
        const query = request.query as Record<string, string | undefined>;
        const filename = query.filename ?? '';
        const subfolder = query.subfolder ?? '';
        if (filename === '') return reply.status(400).send();
        // gesso writes the images it draws to the output folder as A1111 names them (no
        // subfolders), and uploads to its input folder.
        const file =
          (query.type ?? 'output') === 'output'
            ? subfolder === '' && isOutputImageName(filename)
              ? join(options.out, filename)
              : undefined
            : query.type === 'input'
              ? inputPath(subfolder, filename)
              : undefined;
        if (file === undefined || !existsSync(file)) return reply.status(404).send();
        let bytes = await readFile(file);
        let mime = IMAGE_TYPES[extname(file).toLowerCase()] ?? 'application/octet-stream';
        let name = filename;
        const channel = query.channel ?? 'rgba';
        if (channel === 'rgb') {
          bytes = await sharp(bytes).removeAlpha().png().toBuffer();
          mime = 'image/png';
        } else if (channel === 'a') {
          // As ComfyUI answers it: black, with the image's alpha.
          const { data, info } = await sharp(bytes)
            .ensureAlpha()
            .raw()
            .toBuffer({ resolveWithObject: true });
          const alpha = Buffer.alloc(data.length);
          for (let k = 3; k < data.length; k += 4) alpha[k] = data[k]!;
          bytes = await sharp(alpha, {
            raw: { width: info.width, height: info.height, channels: 4 },
          })
            .png()
            .toBuffer();
          mime = 'image/png';
        }
        const preview = query.preview?.split(';');
        if (preview !== undefined && ['webp', 'jpeg'].includes(preview[0]!)) {
          const quality = Number(preview[1] ?? 90);
          const image = sharp(bytes);
          bytes =
            preview[0] === 'webp'
              ? await image.webp({ quality }).toBuffer()
              : await image.jpeg({ quality }).toBuffer();
          mime = `image/${preview[0]}`;
          name = `${basename(filename, '.png')}.${preview[0]}`;
        }
        return reply.type(mime).header('content-disposition', `filename="${name}"`).send(bytes);
      });

    for (const path of route('/object_info')) {
      scope.get(path, async () => {
        const defs = await definitions();
        return Object.fromEntries(Object.entries(defs).map(([k, d]) => [k, objectInfo(k, d)]));
      });
      scope.get(`${path}/:name`, async (request) => {
        const name = (request.params as { name: string }).name;
        const def = (await definitions())[name];
        return def !== undefined ? { [name]: objectInfo(name, def) } : {};
      });
    }

    for (const path of route('/system_stats'))
      scope.get(path, async () => ({
        system: {
          os: process.platform,
          ram_total: totalmem(),
          ram_free: freemem(),
          comfyui_version: 'gesso',
          python_version: '',
          pytorch_version: '',
          embedded_python: false,
          argv: process.argv.slice(1),
        },
        devices: [
          {
            name: 'cpu',
            type: 'cpu',
            index: null,
            vram_total: totalmem(),
            vram_free: freemem(),
            torch_vram_total: 0,
            torch_vram_free: 0,
          },
        ],
      }));

    // gesso's own GET /api/models (the models it knows) comes first; ComfyUI's is at /models.
    scope.get('/models', async () => ['checkpoints', 'loras']);
    scope.get('/models/:folder', async (request, reply) => {
      const folder = (request.params as { folder: string }).folder;
      if (folder === 'checkpoints') return checkpoints();
      if (folder === 'loras') return loraFiles();
      return reply.status(404).send();
    });
    for (const path of route('/embeddings')) scope.get(path, async () => []);
    for (const path of route('/features'))
      scope.get(path, async () => ({ supports_preview_metadata: false }));
  });

  return async () => {
    queue.off('event', onEvent);
    app.server.off('upgrade', upgrade);
    for (const socket of sockets.values()) socket.terminate();
    await new Promise<void>((resolveClose) => wss.close(() => resolveClose()));
  };
}
