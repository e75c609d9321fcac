import assert from 'node:assert/strict';
import { loraSetKey, promptLoras } from '../src/generation/networks.js';
import test from 'node:test';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import {
  composablePrompt,
  conditioningPlan,
  promptSchedule,
  scheduledText,
} from '../src/tokenizers/prompt-schedule.js';
import type { Tensor } from '../src/tensor/tensor.js';
import { golden, needsGolden } from './helpers.js';

test('prompt editing and alternation schedule as A1111 does', () => {
  // The doctests of AUTOMATIC1111's get_learned_conditioning_prompt_schedules (10 steps), then
  // cases checked against that function run under lark 1.1.5.
  const cases: [string, [number, string][]][] = [
    ['test', [[10, 'test']]],
    [
      'a [b:3]',
      [
        [3, 'a '],
        [10, 'a b'],
      ],
    ],
    [
      'a [b: 3]',
      [
        [3, 'a '],
        [10, 'a b'],
      ],
    ],
    [
      'a [[[b]]:2]',
      [
        [2, 'a '],
        [10, 'a [[b]]'],
      ],
    ],
    [
      '[(a:2):3]',
      [
        [3, ''],
        [10, '(a:2)'],
      ],
    ],
    [
      'a [b : c : 1] d',
      [
        [1, 'a b  d'],
        [10, 'a  c  d'],
      ],
    ],
    [
      'a[b:[c:d:2]:1]e',
      [
        [1, 'abe'],
        [2, 'ace'],
        [10, 'ade'],
      ],
    ],
    ['a [unbalanced', [[10, 'a [unbalanced']]],
    [
      'a [b:.5] c',
      [
        [5, 'a  c'],
        [10, 'a b c'],
      ],
    ],
    [
      '((a][:b:c [d:3]',
      [
        [3, '((a][:b:c '],
        [10, '((a][:b:c d'],
      ],
    ],
    [
      '[a|(b:1.1)]',
      Array.from(
        { length: 10 },
        (_, i) => [i + 1, i % 2 === 0 ? 'a' : '(b:1.1)'] as [number, string],
      ),
    ],
    [
      '[fe|]male',
      Array.from(
        { length: 10 },
        (_, i) => [i + 1, i % 2 === 0 ? 'female' : 'male'] as [number, string],
      ),
    ],
    [
      '[fe|||]male',
      Array.from(
        { length: 10 },
        (_, i) => [i + 1, i % 4 === 0 ? 'female' : 'male'] as [number, string],
      ),
    ],
    // A point makes a fraction (1.0 is the last step); no point, a step number; past the end or
    // below 1 there is no switch.
    ['a [b:c:1.0]', [[10, 'a b']]],
    ['a [b:c:12]', [[10, 'a b']]],
    ['x [a:b:0] y', [[10, 'x b y']]],
    ['[a:b:-2]', [[10, 'b']]],
    [
      '[a:b: 4 ]',
      [
        [4, 'a'],
        [10, 'b'],
      ],
    ],
    ['[a::5.]', [[10, 'a']]],
    // A | outside an alternation: the whole prompt, unparsed.
    ['a [{b|d{:.5] c', [[10, 'a [{b|d{:.5] c']]],
    ['a | b [c:2]', [[10, 'a | b [c:2]']]],
    [
      '\\[a:2\\] [b:2]',
      [
        [2, '\\[a:2\\] '],
        [10, '\\[a:2\\] b'],
      ],
    ],
    [
      '( [a:3]',
      [
        [3, '( '],
        [10, '( a'],
      ],
    ],
    [
      '[x] [b:3] ]',
      [
        [3, '[x]  ]'],
        [10, '[x] b ]'],
      ],
    ],
  ];
  for (const [prompt, expected] of cases)
    assert.deepEqual(promptSchedule(prompt, 10), expected, JSON.stringify(prompt));
  // Nested past the stack's depth: plain text, not a crash.
  const deep = '['.repeat(50_000) + 'a:2' + ']'.repeat(50_000);
  assert.deepEqual(promptSchedule(deep, 10), [[10, deep]]);
  // Steps counted from 0, as A1111's sampler counts them: the first text holds through step 3.
  const schedule = promptSchedule('a [b:3]', 10);
  assert.deepEqual(
    [0, 3, 4, 9, 15].map((s) => scheduledText(schedule, s)),
    ['a ', 'a ', 'a b', 'a b', 'a b'],
  );
});

test('AND splits a prompt into weighted parts as A1111 does', () => {
  const parts = (p: string) => composablePrompt(p).map(({ text, weight }) => [text, weight]);
  assert.deepEqual(parts('a red circle'), [['a red circle', 1]]);
  assert.deepEqual(parts('a red circle AND a blue square:0.5'), [
    ['a red circle', 1],
    [' a blue square', 0.5],
  ]);
  assert.deepEqual(parts('cat : 1.5 AND dog:-.5'), [
    ['cat', 1.5],
    [' dog', -0.5],
  ]);
  // Only the word: not inside another word, not lower case.
  assert.deepEqual(parts('SANDY and ANDES'), [['SANDY and ANDES', 1]]);
  assert.deepEqual(parts('x AND'), [
    ['x', 1],
    ['', 1],
  ]);
  // A colon that is not a weight stays in the text.
  assert.deepEqual(parts('ratio 4:3 photo'), [['ratio 4:3 photo', 1]]);
});

test('a conditioning plan encodes each text once and knows what varies', () => {
  const plan = conditioningPlan(['a [b:c:2] AND d:0.5', 'd', 'd'], ['', null, '[x|y]'], 4, 'a1111');
  assert.deepEqual(plan.texts, ['a b', 'a c', ' d', '', 'd', 'x', 'y']);
  assert.equal(plan.composite, true);
  assert.equal(plan.scheduled, true);
  assert.deepEqual(
    plan.images[0]!.parts.map((p) => p.weight),
    [1, 0.5],
  );
  assert.deepEqual(plan.images[1]!.negative, [[4, -1]]); // zeros
  const plain = conditioningPlan(['a [b:c:2] AND d'], undefined, 4, 'plain');
  assert.deepEqual(plain.texts, ['a [b:c:2] AND d']);
  assert.equal(plain.composite || plain.scheduled, false);
});

test('an extra-network tag in an A1111 prompt is refused by name, not encoded as words', () => {
  for (const [prompt, negative, message] of [
    [
      'a cat <lora:foo:0.8>',
      '',
      /the prompt names an extra network, <lora:foo:0.8>, that was not loaded; .*--lora-dir DIR/,
    ],
    [
      'a cat <hypernet:h:1>',
      '',
      /the prompt names an extra network, <hypernet:h:1>, and gesso loads no 'hypernet' networks/,
    ],
    [
      'a cat',
      'blurry, <hypernet:bar:1>',
      /the negative prompt names an extra network, <hypernet:bar:1>, and gesso loads networks only from the prompt/,
    ],
    [
      'a cat [<lora:x y:1>:a dog:2]',
      '',
      /the prompt names an extra network, <lora:x y:1>, that was not loaded/,
    ],
  ] as const) {
    assert.throws(() => conditioningPlan([prompt], [negative], 4, 'a1111'), message, prompt);
  }
  // Angle brackets that are no tag, and every prompt read as plain text, pass as written.
  for (const prompt of ['a <cat>', 'x < y: z', 'a <:b>'])
    assert.deepEqual(conditioningPlan([prompt], undefined, 4, 'a1111').texts, [prompt]);
  assert.deepEqual(conditioningPlan(['a <lora:foo:1>'], undefined, 4, 'plain').texts, [
    'a <lora:foo:1>',
  ]);
});

test('LoRA tags: taken out of the prompt with their weights as A1111 reads them; other tags stay', () => {
  const { prompt, loras } = promptLoras(
    'a <lora:x:0.5> cat <lyco:y:te=0.2:unet=1.5> <lora:z> <hypernet:h:1> <lora:w:0.3:0.9>',
  );
  assert.equal(prompt, 'a  cat   <hypernet:h:1> ');
  assert.deepEqual(
    loras.map((l) => [l.name, l.textEncoderScale, l.unetScale]),
    [
      ['x', 0.5, 0.5],
      ['y', 0.2, 1.5],
      ['z', 1, 1],
      ['w', 0.3, 0.9],
    ],
  );
  assert.equal(loraSetKey('<lora:x:0.5>a'), loraSetKey('b <lora:x:.5>'));
  assert.notEqual(loraSetKey('<lora:x:0.5>a'), loraSetKey('<lora:x:0.6>a'));
  assert.equal(loraSetKey('a cat'), '[]');
  for (const [text, message] of [
    ['<lora::1>', /names no LoRA/],
    ['<lora:x:1:2:3>', /not a dyn rank/],
    ['<lora:x:dyn=4>', /not a dyn rank/],
    ['<lora:x:strength=1>', /unknown argument strength=/],
    ['<lora:x:abc>', /the weight 'abc' is not a number/],
  ] as const)
    assert.throws(() => promptLoras(text), message, text);
});

const sameData = (a: Tensor, b: Tensor) =>
  a.size === b.size && a.data.every((v, i) => v === b.data[i]);

test(
  'composable prompts and prompt editing reach the UNet, step by step',
  needsGolden(),
  async () => {
    const pipe = await StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny'), {
      cacheDir: false,
    });
    const run = async (prompt: string, options: { guidance?: number; negative?: string } = {}) => {
      const latents: Tensor[] = [];
      const result = await pipe.generate({
        prompt,
        ...(options.negative !== undefined ? { negativePrompt: options.negative } : {}),
        steps: 6,
        guidance: options.guidance ?? 5,
        seed: 7,
        promptSyntax: 'a1111',
        onProgress: ({ latents: l }) => {
          latents.push(l);
        },
      });
      return { image: result.images, latents };
    };
    const red = await run('a red circle');
    const blue = await run('a blue square');

    // A part of weight 0 adds nothing; a weight multiplies the guidance scale.
    assert.ok(sameData((await run('a red circle AND a blue square:0')).image, red.image));
    assert.ok(sameData((await run('a red circle:2', { guidance: 2.5 })).image, red.image));
    // Two parts: the sum of both guidances, whichever order they are written in.
    const both = await run('a red circle AND a blue square');
    const swapped = await run('a blue square AND a red circle');
    assert.ok(!sameData(both.image, red.image) && !sameData(both.image, blue.image));
    const largest = both.image.data.reduce(
      (m, v, i) => Math.max(m, Math.abs(v - swapped.image.data[i]!)),
      0,
    );
    assert.ok(largest < 1e-4, `the order of the parts changed the image by ${largest}`);

    // [red:blue:2]: the red prompt for steps 0, 1 and 2 (counted from 0), then the blue one.
    const edited = await run('a [red circle:blue square:2]');
    edited.latents.forEach((l, step) =>
      assert.equal(sameData(l, red.latents[step]!), step <= 2, `step ${step}`),
    );
    assert.ok(sameData((await run('a [red circle:blue square:1.0]')).image, red.image));
    assert.ok(sameData((await run('a [red circle:blue square:0]')).image, blue.image));
    // Alternation: red at steps 0 and 1 (A1111's count), blue at step 2.
    const alternating = await run('a [red circle|blue square]');
    assert.deepEqual(
      alternating.latents.slice(0, 3).map((l, step) => sameData(l, red.latents[step]!)),
      [true, true, false],
    );
    // Negative prompts are edited too.
    const negative = await run('a red circle', { negative: '[green:purple:3]' });
    const green = await run('a red circle', { negative: 'green' });
    negative.latents.forEach((l, step) =>
      assert.equal(sameData(l, green.latents[step]!), step <= 3, `negative, step ${step}`),
    );

    // Guided rows for a composed prompt: the negative, then one per part.
    const rows = await pipe.encodePrompts(['a AND b AND c'], [''], 1, 0, true, 'a1111');
    assert.equal(rows.embeddings.shape[0], 4);
    await pipe.release();
  },
);
