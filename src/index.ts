/** gesso's library entry point. */
export { UserError, isUserError } from './errors.js';
export * from './tensor/dtype.js';
export * from './tensor/tensor.js';
export * as hostOps from './tensor/ops.js';
export { PhiloxGenerator, TorchGenerator, type RngSource } from './tensor/rng.js';
export * from './io/safetensors.js';
export { writeAtomically, writeFileAtomically } from './io/atomic.js';
export { Graph, Value, attr, type Dim, type Shape, type ExternalData } from './graph/ir.js';
export * as ops from './graph/ops.js';
export { emitOnnx, OPSET, IR_VERSION, type EmittedModel } from './graph/onnx.js';
export * from './runtime/session.js';
export * as nn from './nn/index.js';
export { describeModelFolder } from './loaders/describe.js';
export { ClipTokenizer } from './tokenizers/clip.js';
export { createScheduler, SCHEDULER_NAMES, Scheduler } from './schedulers/index.js';
export {
  StableDiffusionPipeline,
  type GenerateOptions,
  type GenerateResult,
} from './pipelines/stable-diffusion.js';
export { readImage, toUint8, writePng } from './io/image.js';
export { decodePng, encodePng } from './io/png.js';
export { formatInfotext, parseInfotext } from './io/infotext.js';
