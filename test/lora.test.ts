import assert from 'node:assert/strict';
import { cp } from 'node:fs/promises';
import { join } from 'node:path';
import test from 'node:test';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.js';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { TorchGenerator } from '../src/tensor/rng.js';
import { Tensor } from '../src/tensor/tensor.js';
import { golden, needsGolden, withTempDir } from './helpers.js';

/**
 * LoRA: a known low-rank delta, in the diffusers/PEFT and kohya formats, must change the model
 * exactly as merging W + scale·(alpha/rank)·B·A into a copy of the weights by hand does.
 */

const UNET_FILE = join('unet', 'diffusion_pytorch_model.safetensors');
const TEXT_FILE = join('text_encoder', 'model.safetensors');

interface Layer {
  readonly file: string;
  /** The weight's key in the model folder. */
  readonly key: string;
  readonly rank: number;
  readonly alpha?: number;
}

// A linear layer and a 1×1 conv (PEFT), a 3×3 conv and a text-encoder projection (kohya).
const PEFT: Layer[] = [
  {
    file: UNET_FILE,
    key: 'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight',
    rank: 2,
  },
  { file: UNET_FILE, key: 'mid_block.attentions.0.proj_in.weight', rank: 3 },
];
const KOHYA: Layer[] = [
  { file: UNET_FILE, key: 'up_blocks.0.resnets.0.conv1.weight', rank: 2, alpha: 1 },
  {
    file: TEXT_FILE,
    key: 'text_model.encoder.layers.0.self_attn.q_proj.weight',
    rank: 4,
    alpha: 8,
  },
];

async function readWeight(folder: string, file: string, key: string) {
  return SafetensorsFile.with(join(folder, file), async (f) => (await f.read(key)).toFloat32());
}

/** Random A (rank × in·k·k) and B (out × rank) for a weight. */
function factors(shape: readonly number[], rank: number, seed: number) {
  const g = new TorchGenerator(seed);
  const inner = shape.slice(1).reduce((a, b) => a * b, 1);
  return {
    down: Tensor.float32([rank, ...shape.slice(1)], g.randn([rank, inner]).data),
    up: Tensor.float32(
      [shape[0]!, rank, ...shape.slice(2).map(() => 1)],
      g.randn([shape[0]!, rank]).data,
    ),
  };
}

test(
  'LoRA (diffusers/PEFT and kohya, two at once, with scales) equals merging by hand',
  needsGolden(),
  async () => {
    await withTempDir(async (dir) => {
      const base = golden('sd1-tiny', 'sd-tiny');
      const peft: Record<string, Tensor> = {};
      const kohya: Record<string, Tensor> = {};
      const deltas = new Map<string, { file: string; delta: Float64Array }>();
      const add = async (
        layers: Layer[],
        scale: number,
        seed: number,
        write: (l: Layer, f: ReturnType<typeof factors>) => void,
      ) => {
        for (const [i, layer] of layers.entries()) {
          const w = await readWeight(base, layer.file, layer.key);
          const f = factors(w.shape, layer.rank, seed + i);
          write(layer, f);
          const inner = w.size / w.shape[0]!;
          const factor = scale * ((layer.alpha ?? layer.rank) / layer.rank);
          const entry = deltas.get(layer.key) ?? {
            file: layer.file,
            delta: new Float64Array(w.size),
          };
          for (let o = 0; o < w.shape[0]!; o++)
            for (let r = 0; r < layer.rank; r++)
              for (let k = 0; k < inner; k++)
                entry.delta[o * inner + k]! +=
                  factor * f.up.data[o * layer.rank + r]! * f.down.data[r * inner + k]!;
          deltas.set(layer.key, entry);
        }
      };
      await add(PEFT, 0.7, 100, (l, f) => {
        const module = `${l.file === TEXT_FILE ? 'text_encoder' : 'unet'}.${l.key.slice(0, -'.weight'.length)}`;
        peft[`${module}.lora_A.weight`] = f.down;
        peft[`${module}.lora_B.weight`] = f.up;
      });
      await add(KOHYA, 1.3, 200, (l, f) => {
        const prefix = l.file === TEXT_FILE ? 'lora_te_' : 'lora_unet_';
        const module = prefix + l.key.slice(0, -'.weight'.length).replace(/\./g, '_');
        kohya[`${module}.lora_down.weight`] = f.down;
        kohya[`${module}.lora_up.weight`] = f.up;
        kohya[`${module}.alpha`] = Tensor.float32([], [l.alpha!]);
      });
      await writeSafetensors(join(dir, 'peft.safetensors'), peft);
      await writeSafetensors(join(dir, 'kohya.safetensors'), kohya);

      // The hand-merged copy of the model folder.
      const merged = join(dir, 'merged');
      await cp(base, merged, { recursive: true, filter: (p) => !p.includes('.fp16.') });
      for (const file of [UNET_FILE, TEXT_FILE]) {
        const tensors = await SafetensorsFile.with(join(base, file), async (f) => {
          const out: Record<string, Tensor> = {};
          for (const name of f.names) out[name] = (await f.read(name)).toFloat32();
          return out;
        });
        for (const [key, { file: owner, delta }] of deltas) {
          if (owner !== file) continue;
          const w = tensors[key] as Tensor<'float32'>;
          tensors[key] = new Tensor(
            'float32',
            w.shape,
            Float32Array.from(w.data, (v, i) => v + delta[i]!),
          );
        }
        await writeSafetensors(join(merged, file), tensors);
      }

      const options = { cacheDir: false as const };
      const withLoras = await StableDiffusionPipeline.fromPretrained(base, {
        ...options,
        loras: [
          { path: join(dir, 'peft.safetensors'), scale: 0.7 },
          { path: join(dir, 'kohya.safetensors'), scale: 1.3 },
        ],
      });
      const byHand = await StableDiffusionPipeline.fromPretrained(merged, options);
      const plain = await StableDiffusionPipeline.fromPretrained(base, options);
      const run = (pipe: StableDiffusionPipeline) =>
        pipe.generate({
          prompt: 'a red circle',
          steps: 3,
          guidance: 5,
          seed: 4,
          latentsOnly: true,
        });
      const [a, b, c] = [await run(withLoras), await run(byHand), await run(plain)];
      let diff = 0;
      let change = 0;
      for (let i = 0; i < a.latents.size; i++) {
        diff = Math.max(diff, Math.abs(a.latents.data[i]! - b.latents.data[i]!));
        change = Math.max(change, Math.abs(a.latents.data[i]! - c.latents.data[i]!));
      }
      // Float32 merging against float64-then-float32: a few ulps through 3 steps.
      assert.ok(diff < 1e-4, `LoRA vs hand-merged latents differ by ${diff}`);
      assert.ok(change > 1e-2, `the LoRA changed the latents by only ${change}`);
      await Promise.all([withLoras.release(), byHand.release(), plain.release()]);

      await assert.rejects(
        StableDiffusionPipeline.fromPretrained(base, {
          ...options,
          loras: [{ path: join(dir, 'none.safetensors'), scale: 1 }],
        }),
        /LoRA file .* does not exist/,
      );
      await writeSafetensors(join(dir, 'wrong.safetensors'), {
        'unet.not_a_layer.lora_A.weight': Tensor.float32([1, 1]),
        'unet.not_a_layer.lora_B.weight': Tensor.float32([1, 1]),
      });
      await assert.rejects(
        StableDiffusionPipeline.fromPretrained(base, {
          ...options,
          loras: [{ path: join(dir, 'wrong.safetensors'), scale: 1 }],
        }),
        /layer 'not_a_layer' matches no weight of the unet/,
      );
    });
  },
);
